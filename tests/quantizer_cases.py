"""Every quantizer configuration the tests build, by name, each tagged with the
test modules that run it: `contract` (test_quantizers.py, the contract on all of
them), `fuzz` (test_fuzz.py, a subset that covers every class: each entry runs
VQTRAIN_FUZZ_CASES generated cases), `ddp` (test_distributed.py). Select with
`select(tag)`. Small (dim 8 or 4, 16 codes or fewer) so that the tests run in
seconds on a CPU; a module that needs a quantizer's input width reads `.dim`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from vqtrain.quantizers import (
    BSQ,
    FSQ,
    IBQ,
    LFQ,
    Quantizer,
    ResidualFSQ,
    ResidualLFQ,
    ResidualQuantizer,
    SimVQ,
    VectorQuantizer,
)

DIM = 8
CODES = 16
CONTRACT, FUZZ, DDP = "contract", "fuzz", "ddp"


def vq(**kwargs) -> Callable[[], VectorQuantizer]:
    return partial(VectorQuantizer, DIM, CODES, **kwargs)


def residual(level, **kwargs) -> Callable[[], ResidualQuantizer]:
    return partial(ResidualQuantizer, DIM, quantizer=level, num_levels=3, **kwargs)


# The distributed runs are 8 SGD steps on (24, 2, 6) rows that drift: their EMA
# codebooks decay fast (0.8) so the statistics move visibly within 8 steps, and
# their dead-code settings (usage decay 0.5, threshold 0.5) make restarts fire
# within those 8 steps, which the contract's settings would not.
DDP_TRICKS = partial(
    VectorQuantizer, decay=0.8, kmeans_init=True, kmeans_iters=3, dead_code_threshold=0.5, usage_decay=0.5
)

CASES: dict[str, tuple[Callable[[], Quantizer], frozenset[str]]] = {
    name: (factory, frozenset(tags))
    for name, factory, *tags in [
        ("vq_ema", vq(), CONTRACT, FUZZ),
        ("vq_gradient", vq(learning="gradient"), CONTRACT),
        ("vq_cosine", vq(distance="cosine"), CONTRACT),
        ("vq_cosine_gradient", vq(distance="cosine", learning="gradient"), CONTRACT),
        ("vq_cosine_rotation", vq(distance="cosine", estimator="rotation"), CONTRACT, FUZZ),
        ("vq_codebook_dim", vq(codebook_dim=3), CONTRACT),
        ("vq_groups", vq(groups=2), CONTRACT),
        ("vq_groups_codebook_dim_gradient", vq(groups=2, codebook_dim=3, learning="gradient"), CONTRACT, FUZZ),
        ("vq_rotation", vq(learning="gradient", estimator="rotation"), CONTRACT),
        ("vq_kmeans", vq(kmeans_init=True, kmeans_iters=3, kmeans_max_samples=12), CONTRACT),
        ("vq_kmeans_gradient_groups", vq(kmeans_init=True, kmeans_iters=3, learning="gradient", groups=2), CONTRACT),
        (
            "vq_codebook_dim_kmeans_dead",
            vq(codebook_dim=2, kmeans_init=True, kmeans_iters=2, dead_code_threshold=0.5),
            CONTRACT,
            FUZZ,
        ),
        ("vq_dead_code", vq(dead_code_threshold=0.9, usage_decay=0.5), CONTRACT),
        (
            "vq_dead_code_gradient_cosine",
            vq(dead_code_threshold=0.9, usage_decay=0.5, learning="gradient", distance="cosine"),
            CONTRACT,
        ),
        ("simvq", partial(SimVQ, DIM, CODES), CONTRACT, FUZZ, DDP),  # DDP: learned by gradient, averaged by DDP
        (
            "simvq_groups_cosine_ste",
            partial(SimVQ, DIM, CODES, groups=2, distance="cosine", estimator="ste", learn_basis=True),
            CONTRACT,
        ),
        ("fsq", partial(FSQ, 4, levels=[5, 4, 3, 3]), CONTRACT, FUZZ),
        ("fsq_projection", partial(FSQ, DIM, levels=[5, 4, 3]), CONTRACT, FUZZ),
        ("fsq_two_codebooks", partial(FSQ, DIM, levels=[5, 4, 3, 3], num_codebooks=2), CONTRACT),
        ("fsq_two_codebooks_projection", partial(FSQ, DIM, levels=[4, 3], num_codebooks=2, scale=0.5), CONTRACT),
        ("fsq_symmetric", partial(FSQ, 4, levels=[5, 4, 3, 2], symmetric=True), CONTRACT, FUZZ),
        (
            "fsq_symmetric_clamp_projection",
            partial(FSQ, DIM, levels=[8, 5], num_codebooks=2, symmetric=True, bound="clamp", scale=0.5),
            CONTRACT,
        ),
        ("rvq", residual(partial(VectorQuantizer, codebook_size=CODES)), CONTRACT),
        (
            "rvq_shared",
            residual(partial(VectorQuantizer, codebook_size=CODES, learning="gradient"), shared_codebook=True),
            CONTRACT,
        ),
        (
            "rvq_dropout",
            residual(partial(VectorQuantizer, codebook_size=CODES, learning="gradient"), dropout=0.5),
            CONTRACT,
            FUZZ,
        ),
        (
            "rvq_dropout_batch_kmeans_dead",
            residual(
                partial(
                    VectorQuantizer,
                    codebook_size=CODES,
                    kmeans_init=True,
                    kmeans_iters=2,
                    dead_code_threshold=0.9,
                    usage_decay=0.5,
                ),
                codebook_dim=4,
                dropout=0.5,
                dropout_mode="batch",
            ),
            CONTRACT,
            FUZZ,
        ),
        ("rsimvq", residual(partial(SimVQ, codebook_size=CODES)), CONTRACT),
        ("rsimvq_dropout", residual(partial(SimVQ, codebook_size=CODES), dropout=0.5), CONTRACT),
        ("rfsq", partial(ResidualFSQ, DIM, levels=[5, 5, 3], num_levels=3), CONTRACT, FUZZ),
        ("rfsq_dropout", partial(ResidualFSQ, DIM, levels=[5, 5, 3], num_levels=3, dropout=0.5), CONTRACT),
        ("rfsq_symmetric", partial(ResidualFSQ, DIM, levels=[8, 5, 4], num_levels=3, symmetric=True), CONTRACT, FUZZ),
        (
            "rfsq_symmetric_dropout",
            partial(ResidualFSQ, DIM, levels=[8, 5, 4], num_levels=3, symmetric=True, dropout=0.5),
            CONTRACT,
        ),
        ("lfq", partial(LFQ, 4, CODES, commitment_weight=0.25), CONTRACT, FUZZ),
        (
            "lfq_two_codebooks_projection",
            partial(LFQ, DIM, 8, num_codebooks=2, inv_temperature=1.0, chunk_elements=7, commitment_weight=0.25),
            CONTRACT,
            FUZZ,
        ),
        (
            "lfq_factorized_projection",
            partial(LFQ, DIM, CODES, codebook_entropy="factorized", commitment_weight=0.25),
            CONTRACT,
        ),
        ("bsq_factorized", partial(BSQ, 4, CODES, codebook_entropy="factorized"), CONTRACT, FUZZ),
        ("bsq", partial(BSQ, 4, CODES), CONTRACT),
        (
            "bsq_exact_two_codebooks_projection",
            partial(BSQ, DIM, 8, num_codebooks=2, codebook_entropy="exact", scale=2.0, chunk_elements=5),
            CONTRACT,
            FUZZ,
        ),
        ("rlfq", partial(ResidualLFQ, DIM, num_levels=3, codebook_size=CODES, commitment_weight=0.25), CONTRACT),
        (
            "rlfq_dropout",
            partial(
                ResidualLFQ,
                DIM,
                num_levels=3,
                codebook_size=8,
                dropout=0.5,
                inv_temperature=1.0,
                commitment_weight=0.25,
            ),
            CONTRACT,
            FUZZ,
        ),
        ("ibq", partial(IBQ, DIM, CODES), CONTRACT, FUZZ),
        (
            "ibq_codebook_dim_entropy_chunked",
            partial(IBQ, DIM, CODES, codebook_dim=3, entropy_weight=0.1, inv_temperature=1.0, chunk_elements=7),
            CONTRACT,
            FUZZ,
        ),
        # -- the distributed runs' own (dim 4: the 6 -> 4 -> 6 autoencoder of test_distributed.py) --
        ("ddp_vq_ema", partial(VectorQuantizer, 4, CODES, decay=0.8), DDP),
        ("ddp_vq", partial(DDP_TRICKS, 4, CODES), DDP),
        # quantizer dropout drawn per sample and rank ...
        (
            "ddp_rvq",
            partial(ResidualQuantizer, 4, DDP_TRICKS, num_levels=3, codebook_size=CODES, dropout=0.5),
            DDP,
        ),
        # ... or once per step for all ranks, which one process can reproduce
        (
            "ddp_rvq_batch_dropout",
            partial(
                ResidualQuantizer, 4, DDP_TRICKS, num_levels=3, codebook_size=CODES, dropout=0.5, dropout_mode="batch"
            ),
            DDP,
        ),
        # entropy penalties at inverse temperature 1 (a gradient that moves the rows in 8 steps), chunked over
        # rows: the batch-codebook entropy's mean probabilities are all-reduced (with their gradient)
        ("ddp_lfq", partial(LFQ, 4, CODES, inv_temperature=1.0, chunk_elements=50), DDP),
        ("ddp_bsq", partial(BSQ, 4, CODES, inv_temperature=1.0, codebook_entropy="factorized"), DDP),
        ("ddp_bsq_exact", partial(BSQ, 4, CODES, inv_temperature=1.0, codebook_entropy="exact"), DDP),
        ("ddp_rlfq", partial(ResidualLFQ, 4, num_levels=2, codebook_size=CODES, inv_temperature=1.0), DDP),
        ("ddp_ibq", partial(IBQ, 4, CODES, entropy_weight=0.1, inv_temperature=1.0, chunk_elements=50), DDP),
    ]
}


def select(tag: str) -> dict[str, Callable[[], Quantizer]]:
    """The factories of the entries tagged `tag`, by name, in registry order."""
    return {name: factory for name, (factory, tags) in CASES.items() if tag in tags}
