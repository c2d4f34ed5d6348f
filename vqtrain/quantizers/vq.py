"""Vector quantization (VQ-VAE, van den Oord et al. 2017) with the usual tricks.

Options: euclidean or cosine distance; codebook learned by EMA or by gradient;
k-means init; dead-code restart; low-dimensional (projected) codebooks; several
groups, each with its own codebook; straight-through or rotation-trick
gradients; per-code update weights (0 freezes a code).

Dead codes: a code is restarted when its share of the assignments, averaged
by an EMA over steps (`usage_decay`), falls below `dead_code_threshold / K`,
i.e. below that fraction of the share it would get if all K codes were used
equally. The threshold is therefore independent of batch size and token count.
The average starts from zero, bias-corrected as in Adam, so a code that is never
chosen is dead at the first training step, and one whose share was s and that
stops being used at step t is restarted at step t + n, the first n with
decay^n < threshold / (s K): with the defaults (0.1, 0.8), 11 steps for a code
at the uniform share 1/K.
Restarts move dead codes onto distinct latents of the step, drawn with
probability proportional to their squared distance from their code (k-means++
seeding): latents the codebook serves worst first, and never onto a latent a code
already sits on, so no two codes are ever identical. The draw has fixed shapes,
so it runs on the device at every step without a host-device sync (it changes
nothing while no code is dead): a weighted sample without replacement by the
Gumbel-top-k trick, over distinct latents (copies of one latent pooled, their
weights summed), all ranks pooled by merging each rank's top candidates.

Initial codes: uniform in [-1/K, 1/K], near the origin (as in VQ-VAE and
taming-transformers), so the first assignments go by the direction of a latent
for any latent larger than that. A unit-Gaussian codebook lies far out from
small latents (a quiet audio clip's), which then all pick the few codes of
smallest norm: collapse before training starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vqtrain.distributed import all_gather, all_reduce_sum, broadcast, gather_rows, rank, world_size
from vqtrain.quantizers.base import (
    ESTIMATORS,
    Quantizer,
    check_choice,
    check_positive_int,
    check_weight,
    commitment_and_codebook,
    real_rows,
    zero,
)
from vqtrain.quantizers.search import count_by_code, gather_codes, kmeans, nearest_codes, sum_by_code
from vqtrain.utils import exists, l2norm


def scale_gradient(x: Tensor, weight: Tensor) -> Tensor:
    """Value exactly `x`; gradient to `x` multiplied by `weight`."""
    return x.detach() + (x - x.detach()) * weight


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not (0 < value < 1):
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return float(value)


class VectorQuantizer(Quantizer):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int | None = None,
        groups: int = 1,
        distance: str = "euclidean",
        learning: str = "ema",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        commitment_weight: float = 0.25,
        codebook_weight: float = 1.0,
        estimator: str = "ste",
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        kmeans_max_samples: int = 65536,
        dead_code_threshold: float = 0.0,
        usage_decay: float = 0.8,
        frozen_codes: list[int] | None = None,
        chunk_elements: int | None = None,
    ):
        super().__init__(dim)
        self.num_codes = check_positive_int("codebook_size", codebook_size)
        self.groups = check_positive_int("groups", groups)
        self.distance = check_choice("distance", distance, {"euclidean", "cosine"})
        self.learning = check_choice("learning", learning, {"ema", "gradient"})
        self.estimator = check_choice("estimator", estimator, set(ESTIMATORS))
        self.decay = check_fraction("decay", decay)
        self.usage_decay = check_fraction("usage_decay", usage_decay)
        self.epsilon = check_weight("epsilon", epsilon)
        if self.epsilon == 0:
            raise ValueError("epsilon (Laplace smoothing) must be > 0: unused codes would divide 0 by 0")
        self.weights = {
            "commitment": check_weight("commitment_weight", commitment_weight),
            "codebook": check_weight("codebook_weight", codebook_weight),
        }
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = check_positive_int("kmeans_iters", kmeans_iters)
        self.kmeans_max_samples = check_positive_int("kmeans_max_samples", kmeans_max_samples)
        self.dead_code_threshold = check_weight("dead_code_threshold", dead_code_threshold)
        if self.dead_code_threshold >= 1:
            raise ValueError(
                f"dead_code_threshold is a fraction of the uniform share and must be < 1, got {dead_code_threshold}"
            )
        self.chunk_elements = None if chunk_elements is None else check_positive_int("chunk_elements", chunk_elements)

        if exists(codebook_dim):
            self.code_dim = check_positive_int("codebook_dim", codebook_dim)
            self.project_in = nn.Linear(dim, groups * self.code_dim)
            self.project_out = nn.Linear(groups * self.code_dim, dim)
        else:
            if dim % groups:
                raise ValueError(f"dim ({dim}) must be divisible by groups ({groups}), or set codebook_dim")
            self.code_dim = dim // groups
            self.project_in = self.project_out = nn.Identity()
        self.codebook_sizes = [self.num_codes] * groups

        shape = (groups, self.num_codes, self.code_dim)
        self._init_codebook(torch.empty(shape).uniform_(-1 / self.num_codes, 1 / self.num_codes))
        update_weight = torch.ones(groups, self.num_codes)
        if exists(frozen_codes):
            frozen = torch.as_tensor(list(frozen_codes), dtype=torch.long)
            if frozen.numel() and (frozen.min() < 0 or frozen.max() >= self.num_codes):
                raise ValueError(f"frozen_codes must lie in [0, {self.num_codes}), got {list(frozen_codes)}")
            update_weight[:, frozen] = 0.0
        self.register_buffer("update_weight", update_weight)
        self.register_buffer("usage", torch.zeros(groups, self.num_codes))  # EMA of shares, before bias correction
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        self.initted_seen = not self.kmeans_init  # `initted` as last read on the host: read until it is True
        if self.dead_code_threshold > 0:  # restarts hash rows by their bits: odd multipliers, one per coordinate
            multipliers = torch.arange(1, self.code_dim + 1) * 0x5851F42D4C957F2D | 1  # wraps around
            self.register_buffer("hash_multipliers", multipliers, persistent=False)

    def _init_codebook(self, codebook: Tensor) -> None:
        if self.learning == "gradient":
            self.embed = nn.Parameter(codebook)
        else:
            self.register_buffer("embed", codebook)
            self.register_buffer("cluster_size", torch.ones(codebook.shape[:2]))
            self.register_buffer("embed_sum", codebook.clone())

    @property
    def codebook(self) -> Tensor:
        """(G, K, d) codes used for lookup (l2-normalised for cosine distance).

        A learned codebook's gradient is scaled per code by `update_weight` here,
        in the graph, so frozen codes stay frozen in copies of the module too
        (a hook on the parameter is lost by `copy.deepcopy` and pickling)."""
        embed = self.embed
        if isinstance(embed, nn.Parameter):
            embed = scale_gradient(embed, self.update_weight.unsqueeze(-1))
        return l2norm(embed) if self.distance == "cosine" else embed

    def set_update_weight(self, weight: Tensor) -> None:
        """Per-code update weight in [0, 1], shape (K,) or (G, K); 0 freezes a code."""
        weight = torch.as_tensor(weight, dtype=torch.float32).expand_as(self.update_weight)
        if bool(((weight < 0) | (weight > 1)).any()):
            raise ValueError("update weights must lie in [0, 1]")
        self.update_weight.copy_(weight)

    # -- forward -----------------------------------------------------------
    def to_code_space(self, x: Tensor) -> Tensor:
        """(N, D) -> (G, N, d)."""
        h = self.project_in(x).view(x.shape[0], self.groups, self.code_dim).transpose(0, 1)
        return l2norm(h) if self.distance == "cosine" else h

    def from_code_space(self, h: Tensor) -> Tensor:
        """(G, N, d) -> (N, D)."""
        return self.project_out(h.transpose(0, 1).reshape(h.shape[1], self.groups * self.code_dim))

    def quantize_rows(self, x: Tensor, weight: Tensor, sample_ids: Tensor):
        h = self.to_code_space(x)
        if self.updating and not self.kmeans_done():
            self._kmeans_init(h.detach(), weight)
        codebook = self.codebook
        indices = nearest_codes(h.detach(), codebook.detach(), self.distance == "cosine", self.chunk_elements)
        q = gather_codes(codebook, indices)
        commitment, codebook_loss = commitment_and_codebook(h, q, weight)
        # an EMA codebook has no codebook term (q has no gradient to take)
        losses = {
            "commitment": commitment,
            "codebook": codebook_loss if self.learning == "gradient" else zero(x.device),
        }
        if self.updating:
            update = compiled_update_statistics() if self.compiled_bookkeeping else VectorQuantizer._update_statistics
            update(self, h.detach(), indices, weight, q)
        out = ESTIMATORS[self.estimator](h, q) if torch.is_grad_enabled() else q
        return self.from_code_space(out), indices.T, losses, self.weigh(losses, self.weights)

    def kmeans_done(self) -> bool:
        """Whether k-means init has run: one host read of `initted` until it has (it runs once)."""
        if not self.initted_seen:
            self.initted_seen = bool(self.initted)
        return self.initted_seen

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.initted_seen = not self.kmeans_init  # read the loaded `initted` again

    def decode_rows(self, indices: Tensor) -> Tensor:
        if bool((indices < 0).any()):
            raise IndexError("grouped VQ decodes whole positions: -1 must mark every group of a position or none")
        return self.from_code_space(gather_codes(self.codebook, indices.T))

    # -- codebook statistics (training forward only) ---------------------
    @torch.no_grad()
    def _kmeans_init(self, h: Tensor, weight: Tensor) -> None:
        """Initialise from the real vectors of the first training batch, all ranks pooled.
        It runs once, and may sync: it picks the real rows by a boolean index."""
        h = h[:, weight > 0]
        pooled = gather_rows(h.transpose(0, 1).contiguous()).transpose(0, 1)  # (G, N_all, d)
        if pooled.shape[1] == 0:
            return  # nothing real seen yet: try again on the next batch
        seed = int(torch.randint(2**62, ()))  # drawn on every rank: RNG streams stay aligned
        if rank() == 0:
            generator = torch.Generator().manual_seed(seed)
            if pooled.shape[1] > self.kmeans_max_samples:
                keep = torch.randperm(pooled.shape[1], generator=generator)[: self.kmeans_max_samples]
                pooled = pooled[:, keep.to(h.device)]
            centroids, counts = kmeans(
                pooled, self.embed.detach(), self.kmeans_iters, self.distance == "cosine", generator
            )
        else:
            centroids = torch.empty_like(self.embed)
            counts = torch.empty(self.update_weight.shape, device=h.device)
        broadcast(centroids)
        broadcast(counts)
        self._replace_codes(self.update_weight > 0, centroids, counts.clamp_min(1))
        self.initted.fill_(True)
        self.initted_seen = True

    @torch.no_grad()
    def _update_statistics(self, h: Tensor, indices: Tensor, weight: Tensor, codes: Tensor) -> None:
        """EMA codebook, usage shares and restarts, on the device: a group without a
        real row anywhere (all ranks) keeps its statistics as they are. `codes` (G, N, d):
        the code each row was given."""
        counts = all_reduce_sum(count_by_code(indices, self.num_codes, weight))
        total = counts.sum(-1, keepdim=True)
        learn = total > 0  # (G, 1)
        # restarts weigh latents by their distance to the code they were given, before it moves
        if self.dead_code_threshold > 0:
            error = (h - codes).pow(2).sum(-1) * weight
        if self.learning == "ema":
            sums = all_reduce_sum(sum_by_code(real_rows(h, weight), indices, self.num_codes))
            # a lerp of rate 0 leaves its value exactly (what it moves towards is finite)
            rate = (1 - self.decay) * learn
            self.cluster_size.lerp_(counts, rate)
            self.embed_sum.lerp_(sums, rate.unsqueeze(-1))
            size = self.cluster_size.sum(-1, keepdim=True)
            smoothed = (self.cluster_size + self.epsilon) / (size + self.num_codes * self.epsilon) * size
            target = self.embed_sum / smoothed.unsqueeze(-1)
            if self.distance == "cosine":
                target = l2norm(target)
            self.embed.lerp_(target, (self.update_weight * learn).unsqueeze(-1))
        self.usage.lerp_(counts / total.clamp_min(1), (1 - self.usage_decay) * learn)
        self.usage_steps += learn.all()
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(h, error)

    def usage_share(self) -> Tensor:
        """(G, K) bias-corrected EMA of each code's share of the assignments."""
        return self.usage / self.usage_correction()

    def usage_correction(self) -> Tensor:
        """The bias correction of the usage EMA (it starts from zero): 1 - usage_decay^steps."""
        return 1 - self.usage_decay**self.usage_steps

    @torch.no_grad()
    def _restart_dead_codes(self, h: Tensor, error: Tensor) -> None:
        """Move dead codes onto distinct real latents of this step (all ranks pooled),
        drawn without replacement with probability proportional to the summed squared
        distance of a latent's copies to their code. `error` is 0 for rows that must
        not be drawn (padding). Fixed shapes throughout: nothing here syncs."""
        correction = self.usage_correction()
        dead = (self.usage / correction < self.dead_code_threshold / self.num_codes) & (self.update_weight > 0)
        # a latent (nearly) on its code would make a twin code: ties then fall to float rounding
        error = torch.where(error > 1e-8 * h.pow(2).sum(-1), error, 0.0)
        keys, latents = restart_candidates(h, error, self.num_codes, self.hash_multipliers)
        if world_size() > 1:  # every rank's best candidates, merged alike on every rank
            keys, latents = restart_candidates(
                flatten_ranks(all_gather(latents)),
                flatten_ranks(all_gather(keys)),
                self.num_codes,
                self.hash_multipliers,
                gathered=True,
            )
        slot = (dead.cumsum(-1) - 1).clamp_min(0)  # the n-th dead code takes the n-th best candidate
        where = dead & (keys.gather(1, slot) > -torch.inf)
        codes = latents.gather(1, slot[..., None].expand_as(self.embed))  # taken where `where` is True
        sizes = self.cluster_size.mean(-1, keepdim=True).expand_as(dead) if self.learning == "ema" else None
        self._replace_codes(where, codes, sizes)
        # a fresh code: the uniform share (a masked fill with a tensor value would read it on the host)
        torch.where(where, correction / self.num_codes, self.usage, out=self.usage)

    def _replace_codes(self, where: Tensor, codes: Tensor, cluster_size: Tensor | None) -> None:
        """Set the codes selected by `where` (G, K), keeping EMA statistics consistent
        (each `where` writes into the buffer it reads: one kernel, not a where and a copy)."""
        torch.where(where.unsqueeze(-1), codes, self.embed.data, out=self.embed.data)
        if self.learning == "ema":
            torch.where(where, cluster_size, self.cluster_size, out=self.cluster_size)
            sums = codes * self.cluster_size.unsqueeze(-1)
            torch.where(where.unsqueeze(-1), sums, self.embed_sum, out=self.embed_sum)


@functools.cache
def compiled_update_statistics() -> Callable[..., None]:
    """`model.compile`: the statistics' update in a few fused kernels instead of dozens of
    launches (`Quantizer.compile_bookkeeping`; made on first use, so that importing stays
    quick). Restarts draw from the generator as eager code does (`fallback_random`): a run
    takes the same random draws compiled or not."""
    return torch.compile(VectorQuantizer._update_statistics, options={"fallback_random": True})


def flatten_ranks(t: Tensor) -> Tensor:
    """(world, G, M, ...) gathered per rank -> (G, world * M, ...)."""
    return t.transpose(0, 1).flatten(1, 2)


@torch.no_grad()
def restart_candidates(
    h: Tensor, weight: Tensor, count: int, hash_multipliers: Tensor, gathered: bool = False
) -> tuple[Tensor, Tensor]:
    """The `count` best restart candidates per group, drawn from the rows h (G, N, d)
    with weights (G, N): (keys (G, count), latents (G, count, d)), best first; a key
    of -inf marks no candidate (too few rows of weight > 0).

    A weighted sample without replacement by the Gumbel-top-k trick: key = log w + Gumbel
    noise, the largest keys win. Copies of one latent (equal rows; -0.0 = 0.0) are one
    candidate with the largest of their keys, which is a draw with their summed weight.
    Copies are found by sorting on a hash of the row's bits (odd int64 `hash_multipliers`
    (d,), one per coordinate), then comparing neighbours exactly. With `gathered`,
    `weight` holds keys already drawn (candidates of several ranks, merged): only the
    pooling of copies and the top-k run again."""
    groups, num_rows, dim = h.shape
    h = h + 0.0  # -0.0 -> 0.0: equal values, equal bits
    if gathered:
        keys = weight
    else:
        uniform = torch.rand(world_size(), groups, num_rows, device=h.device)[rank()]  # each rank its own draw
        # Gumbel noise is -log(-log u): subtracting log(-log u) saves negating it
        minus_gumbel = torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
        keys = torch.where(weight > 0, weight.clamp_min(1e-38).log() - minus_gumbel, -torch.inf)
    if num_rows < count:  # too few rows: pad with non-candidates
        keys = torch.cat([keys, keys.new_full((groups, count - num_rows), -torch.inf)], 1)
        h = torch.cat([h, h.new_zeros(groups, count - num_rows, dim)], 1)
        num_rows = count
    bits = h.view(torch.int32).long()
    row_hash = (bits * hash_multipliers).sum(-1)  # wraps around: a hash, exactly equal for equal rows
    order = keys.sort(dim=-1, descending=True, stable=True).indices  # copies: the best key first ...
    order = order.gather(1, row_hash.gather(1, order).sort(dim=-1, stable=True).indices)  # ... in runs of one hash
    sorted_rows = h.gather(1, order[..., None].expand(-1, -1, dim))
    first_copy = torch.ones(groups, num_rows, dtype=torch.bool, device=h.device)
    first_copy[:, 1:] = (sorted_rows[:, 1:] != sorted_rows[:, :-1]).any(-1)
    sorted_keys = torch.where(first_copy, keys.gather(1, order), -torch.inf)
    best, position = sorted_keys.topk(count, dim=-1)
    return best, sorted_rows.gather(1, position[..., None].expand(-1, -1, dim))
