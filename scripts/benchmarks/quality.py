"""quality: every quantizer config of ours beside vector-quantize-pytorch's counterpart,
trained in one fixed harness on real data, then scored on the whole test split.

    python scripts/bench.py quality                       # MNIST, 200x64 and 600x128, all methods
    python scripts/bench.py quality --data fsdd           # FSDD, padded batches with masks
    python scripts/bench.py quality --methods vq fsq --steps 200 --batch-size 64

Harness (the same for both sides of a row): a small conv autoencoder, Adam at
1e-3 over every trainable parameter (net and quantizer), loss = reconstruction
MSE + the quantizer's own loss (ours: `out.loss`; the reference: its returned
aux loss, summed over levels; FSQ has none). One seed gives the same net
init (seeded before the quantizer is built), the same batch order (a generator
of its own) and the same seed before the first step, for both sides; each row
records a hash of every training batch it saw (`data_hash`) and of the net's
initial weights (`init_hash`), so the pairs can be checked to match.

- mnist: ../shared/data/MNIST/raw/*.gz (IDX), pixels scaled to [0, 1]; encoder
  conv 1->32 (4x4, stride 2), ReLU, conv 32->64 (4x4, stride 2) -> 7x7x64
  latents; decoder the mirror with transposed convs, linear output. Test: all
  10,000 test images.
- fsdd: ../shared/data/fsdd/recordings, 8 kHz clips of varying length, each
  scaled to -20 dBFS RMS (gain limited so no sample exceeds 1, as the fsdd
  data config does); speaker theo is the test split (500 clips), the other
  five train (2,500). Batches are zero-padded to the longest clip (rounded up
  to 16 samples) with a mask. Encoder conv1d 1->32 (k 8, stride 4), ReLU,
  conv1d 32->64 (k 8, stride 4): one 64-d latent per 16 samples, real where it
  starts inside the clip; decoder the mirror. The MSE counts real samples
  only. Ours gets the latent mask; the reference gets `mask=` where its forward
  takes one (VectorQuantize, ResidualVQ); SimVQ, ResidualSimVQ, FSQ and
  ResidualFSQ take none, so they see the padded latents too (their commitment
  losses average over padding); their output is zeroed at padding by the
  harness, as ours and the masked reference's are, so the decoder sees the
  same thing. Test: all 500 theo clips, whole.

Scores, in eval mode over the test split (real positions only): test MSE,
utilization (distinct codes used at least once / K, per level for residual
quantizers), perplexity (exp of the entropy of the code histogram, per level),
dead codes (K - used, per level), training steps/s (the optimizer steps
alone, data already in memory; the first step, which holds one-off costs such
as k-means init and the reference's einx tracing, is left out and reported
as first_step_seconds) and the wall time of the whole run (build,
train, evaluate). Ours are built from the Hydra configs
(`quantizer=NAME quantizer.codebook_size=K model.latent_dim=64 seed=SEED`),
so the shipped defaults are what is measured; the reference is
vector-quantize-pytorch with its defaults except where a row's constructor
says otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
REFERENCE = "vector-quantize-pytorch"
OURS = "vqtrain"
DIM = 64
LR = 1e-3
FSDD_TEST_SPEAKERS = ("theo",)
FSDD_STRIDE = 16
FSDD_RMS_DB = -20.0
DEFAULT_BUDGETS = {"mnist": ([200, 600], [64, 128]), "fsdd": ([200, 600], [16, 16])}


# --- the methods: our config beside the reference's counterpart -------------------


@dataclass(frozen=True)
class Method:
    config: str  # configs/quantizer/<config>.yaml
    codebook_size: int  # quantizer.codebook_size override (per level for residual)
    reference: str | None  # the reference's constructor, as text (None: no counterpart)
    build_reference: Callable[[Any], nn.Module] | None  # vector_quantize_pytorch -> module
    reference_sizes: tuple[int, ...] = ()  # the reference's K per index column
    reference_takes_mask: bool = False


METHODS: dict[str, Method] = {
    "vq": Method(
        "vq",
        1024,
        "VectorQuantize(dim=64, codebook_size=1024)",
        lambda vqp: vqp.VectorQuantize(dim=DIM, codebook_size=1024),
        (1024,),
        True,
    ),
    "vq_tricks": Method(
        "vq_tricks",
        1024,
        "VectorQuantize(dim=64, codebook_size=1024, kmeans_init=True, threshold_ema_dead_code=2)",
        lambda vqp: vqp.VectorQuantize(dim=DIM, codebook_size=1024, kmeans_init=True, threshold_ema_dead_code=2),
        (1024,),
        True,
    ),
    "simvq": Method(
        "simvq", 1024, "SimVQ(dim=64, codebook_size=1024)", lambda vqp: vqp.SimVQ(dim=DIM, codebook_size=1024), (1024,)
    ),
    "fsq": Method(
        "fsq", 1024, "FSQ(levels=[8, 5, 5, 5], dim=64)", lambda vqp: vqp.FSQ(levels=[8, 5, 5, 5], dim=DIM), (1000,)
    ),
    # the paper's levels for 4,096 codes (4,375 of them): where FSQ's utilization falls short (README, FSQ)
    "fsq4096": Method(
        "fsq",
        4096,
        "FSQ(levels=[7, 5, 5, 5, 5], dim=64)",
        lambda vqp: vqp.FSQ(levels=[7, 5, 5, 5, 5], dim=DIM),
        (4375,),
    ),
    "rvq": Method(
        "rvq",
        256,
        "ResidualVQ(dim=64, num_quantizers=4, codebook_size=256)",
        lambda vqp: vqp.ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=256),
        (256,) * 4,
        True,
    ),
    "rsimvq": Method(
        "rsimvq",
        256,
        "ResidualSimVQ(dim=64, num_quantizers=4, codebook_size=256)",
        lambda vqp: vqp.ResidualSimVQ(dim=DIM, num_quantizers=4, codebook_size=256),
        (256,) * 4,
    ),
    "rfsq": Method(
        "rfsq",
        1024,
        "ResidualFSQ(dim=64, levels=[8, 5, 5, 5], num_quantizers=4)",
        lambda vqp: vqp.ResidualFSQ(dim=DIM, levels=[8, 5, 5, 5], num_quantizers=4),
        (1000,) * 4,
    ),
    "lfq": Method(
        "lfq", 1024, "LFQ(dim=64, codebook_size=1024)", lambda vqp: vqp.LFQ(dim=DIM, codebook_size=1024), (1024,), True
    ),
    "bsq": Method(
        "bsq",
        1024,
        "LFQ(dim=64, codebook_size=1024, spherical=True)",
        lambda vqp: vqp.LFQ(dim=DIM, codebook_size=1024, spherical=True),
        (1024,),
        True,
    ),
    "ibq": Method("ibq", 1024, None, None),
    "rlfq": Method(
        "rlfq",
        1024,
        "ResidualLFQ(dim=64, num_quantizers=4, codebook_size=1024)",
        lambda vqp: vqp.ResidualLFQ(dim=DIM, num_quantizers=4, codebook_size=1024),
        (1024,) * 4,
        True,
    ),
}


class Side:
    """One quantizer behind one interface: channel-last latents (B, *S, D) and a
    latent mask (B, *S) or None -> quantized (zero at padding), indices (B, *S, Q), loss."""

    def __init__(
        self, module: nn.Module, sizes: list[int], call: Callable, description: str, config: dict | None = None
    ):
        self.module, self.sizes, self.call, self.description, self.config = (
            module,
            list(sizes),
            call,
            description,
            config,
        )

    def __call__(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return self.call(self.module, z, mask)


def build_ours(name: str, seed: int, overrides: list[str] = ()) -> Side:
    """Our quantizer as the Hydra config composes it, plus `overrides` (e.g. `quantizer.commitment_weight=0`)."""
    import hydra
    from omegaconf import OmegaConf

    from vqtrain.config import compose

    method = METHODS[name]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose(
            [
                f"quantizer={method.config}",
                f"quantizer.codebook_size={method.codebook_size}",
                f"model.latent_dim={DIM}",
                f"seed={seed}",
                *overrides,
            ],
            run_dir,
        )
    module = hydra.utils.instantiate(cfg.quantizer)

    def call(m, z, mask):
        out = m(z, mask)
        columns = len(m.codebook_sizes)
        indices = out.indices if columns > 1 else out.indices.unsqueeze(-1)
        return out.quantized, indices, out.loss

    return Side(
        module,
        module.codebook_sizes,
        call,
        " ".join([f"configs/quantizer/{method.config}.yaml, codebook_size={method.codebook_size}", *overrides]),
        OmegaConf.to_container(cfg.quantizer, resolve=True),
    )


def build_reference(name: str) -> Side:
    import vector_quantize_pytorch as vqp

    method = METHODS[name]
    module = method.build_reference(vqp)
    takes_mask = method.reference_takes_mask

    def call(m, z, mask):
        lead = z.shape[:-1]
        tokens = z.reshape(lead[0], -1, z.shape[-1])  # the reference wants (B, N, D) channel-last
        flat_mask = None if mask is None else mask.reshape(lead[0], -1)
        out = m(tokens, mask=flat_mask) if takes_mask and flat_mask is not None else m(tokens)
        quantized, indices = out[0], out[1].long()
        loss = out[2].sum() if len(out) > 2 and torch.is_tensor(out[2]) else tokens.new_zeros(())
        if (
            flat_mask is not None
        ):  # the unmasked ones quantized the padding too: the decoder gets zeros there, as from ours
            quantized = quantized * flat_mask.unsqueeze(-1)
        if indices.ndim == 2:
            indices = indices.unsqueeze(-1)
        return quantized.reshape(z.shape), indices.reshape(*lead, indices.shape[-1]), loss

    return Side(module, list(method.reference_sizes), call, method.reference)


# --- the data and the nets ------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class MNIST:
    name = "mnist"
    eval_batch = 500

    def __init__(self, root: Path, train_limit: int | None, test_limit: int | None):
        raw = root / "MNIST" / "raw"
        self.train = (
            torch.from_numpy(read_idx(raw / "train-images-idx3-ubyte.gz")[:train_limit].copy())
            .float()
            .div(255)
            .unsqueeze(1)
        )
        self.test = (
            torch.from_numpy(read_idx(raw / "t10k-images-idx3-ubyte.gz")[:test_limit].copy())
            .float()
            .div(255)
            .unsqueeze(1)
        )
        self.train_size, self.test_size = len(self.train), len(self.test)
        self.test_var = float(self.test.var())

    def net(self) -> nn.Module:
        return ConvAE(nn.Conv2d, nn.ConvTranspose2d, kernel=4, stride=2, padding=1)

    def train_batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.train[indices], None

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for start in range(0, self.test_size, self.eval_batch):
            yield self.test[start : start + self.eval_batch], None


class FSDD:
    name = "fsdd"
    eval_batch = 32

    def __init__(self, root: Path, train_limit: int | None, test_limit: int | None):
        import soundfile as sf

        from vqtrain.data.audio import normalize_loudness

        files = sorted((root / "fsdd" / "recordings").glob("*.wav"))
        if not files:
            raise FileNotFoundError(f"no WAV files under {root / 'fsdd' / 'recordings'}")
        split: dict[str, list[Tensor]] = {"train": [], "test": []}
        for path in files:
            part = "test" if path.stem.split("_")[1] in FSDD_TEST_SPEAKERS else "train"
            limit = {"train": train_limit, "test": test_limit}[part]
            if limit is not None and len(split[part]) >= limit:
                continue
            audio, rate = sf.read(path, dtype="float32", always_2d=True)
            if rate != 8000:
                raise ValueError(f"{path}: {rate} Hz, expected 8000")
            split[part].append(normalize_loudness(torch.from_numpy(audio.mean(1)), FSDD_RMS_DB))
        self.train = split["train"]
        self.test = sorted(split["test"], key=len)  # evaluation batches of similar lengths: little padding
        self.train_size, self.test_size = len(self.train), len(self.test)
        self.test_var = float(torch.cat(self.test).var())

    def net(self) -> nn.Module:
        return ConvAE(nn.Conv1d, nn.ConvTranspose1d, kernel=8, stride=4, padding=2)

    @staticmethod
    def pad(clips: list[Tensor]) -> tuple[Tensor, Tensor]:
        length = -(-max(len(c) for c in clips) // FSDD_STRIDE) * FSDD_STRIDE
        x = torch.zeros(len(clips), 1, length)
        mask = torch.zeros(len(clips), length, dtype=torch.bool)
        for i, clip in enumerate(clips):
            x[i, 0, : len(clip)] = clip
            mask[i, : len(clip)] = True
        return x, mask

    def train_batch(self, indices: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.pad([self.train[i] for i in indices.tolist()])

    def test_batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for start in range(0, self.test_size, self.eval_batch):
            yield self.pad(self.test[start : start + self.eval_batch])


class ConvAE(nn.Module):
    """Two strided convs down to DIM channels, the mirror up; images (B, 1, H, W) or audio (B, 1, T)."""

    def __init__(self, conv, deconv, kernel: int, stride: int, padding: int):
        super().__init__()
        self.stride = stride * stride
        self.encoder = nn.Sequential(
            conv(1, 32, kernel, stride, padding), nn.ReLU(), conv(32, DIM, kernel, stride, padding)
        )
        self.decoder = nn.Sequential(
            deconv(DIM, 32, kernel, stride, padding), nn.ReLU(), deconv(32, 1, kernel, stride, padding)
        )

    def latent_mask(self, mask: Tensor | None) -> Tensor | None:
        """Sample mask (B, T) -> latent mask (B, T / stride): a latent is real where its first sample is."""
        return None if mask is None else mask[:, :: self.stride]


def forward(net: ConvAE, side: Side, x: Tensor, mask: Tensor | None):
    z = net.encoder(x).movedim(1, -1)  # channel-last (B, *S, D)
    latent_mask = net.latent_mask(mask)
    quantized, indices, aux = side(z, latent_mask)
    x_hat = net.decoder(quantized.movedim(-1, 1))
    if mask is None:
        recon = F.mse_loss(x_hat, x)
    else:
        m = mask.unsqueeze(1).to(x.dtype)
        recon = ((x_hat - x).pow(2) * m).sum() / m.sum().clamp_min(1)
    return recon, aux, indices, latent_mask, x_hat


# --- one run ----------------------------------------------------------------------


def tensor_hash(*tensors: Tensor | None) -> bytes:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def code_stats(indices: Tensor, sizes: list[int]) -> dict:
    """indices (N, Q) of real positions -> per-level utilization, perplexity, dead codes."""
    util, perplexity, dead = [], [], []
    for level, size in enumerate(sizes):
        counts = torch.bincount(indices[:, level], minlength=size).double()
        used = int((counts > 0).sum())
        p = counts[counts > 0] / counts.sum().clamp_min(1)
        util.append(round(used / size, 4))
        perplexity.append(round(float(torch.exp(-(p * p.log()).sum())), 1))
        dead.append(size - used)
    return {"codebook_sizes": sizes, "utilization": util, "perplexity": perplexity, "dead_codes": dead}


def run_one(
    data, method: str, impl: str, steps: int, batch_size: int, seed: int, device: str, overrides: list[str] = ()
) -> dict:
    started = time.perf_counter()
    torch.manual_seed(seed)
    net = data.net()
    init_hash = tensor_hash(*net.state_dict().values()).hex()[:16]
    torch.manual_seed(seed + 1)
    side = build_ours(method, seed, overrides) if impl == OURS else build_reference(method)
    net.to(device), side.module.to(device)
    params = [p for p in [*net.parameters(), *side.module.parameters()] if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=LR)
    order = torch.Generator().manual_seed(seed + 2)
    torch.manual_seed(seed + 3)
    net.train(), side.module.train()
    data_hash, perm, cursor = hashlib.sha256(), torch.randperm(data.train_size, generator=order), 0
    train_seconds, first_step_seconds, recon_tail, aux_tail, status = 0.0, None, [], [], "ok"
    for step in range(steps):
        if cursor + batch_size > data.train_size:  # a new epoch: a fresh order, the last partial batch dropped
            perm, cursor = torch.randperm(data.train_size, generator=order), 0
        x, mask = data.train_batch(perm[cursor : cursor + batch_size])
        cursor += batch_size
        data_hash.update(tensor_hash(x, mask))
        x, mask = x.to(device), None if mask is None else mask.to(device)
        sync(device)
        tick = time.perf_counter()
        recon, aux, *_ = forward(net, side, x, mask)
        loss = recon + aux
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync(device)
        if step == 0:
            first_step_seconds = time.perf_counter() - tick
        else:
            train_seconds += time.perf_counter() - tick
        if not math.isfinite(float(loss.detach())):
            status = f"non-finite loss at step {step}"
            break
        if step >= steps - 20:
            (
                recon_tail.append(float(recon.detach())),
                aux_tail.append(float(aux.detach()) if torch.is_tensor(aux) else float(aux)),
            )
    steps_done = step + 1 if steps else 0

    net.eval(), side.module.eval()
    squared, count, codes = 0.0, 0, []
    with torch.no_grad():
        for x, mask in data.test_batches():
            x, mask = x.to(device), None if mask is None else mask.to(device)
            _, _, indices, latent_mask, x_hat = forward(net, side, x, mask)
            err = (x_hat - x).pow(2)
            if mask is None:
                squared, count = squared + float(err.sum()), count + err.numel()
            else:
                squared, count = squared + float((err * mask.unsqueeze(1)).sum()), count + int(mask.sum())
            flat = indices.reshape(-1, indices.shape[-1])
            codes.append((flat if latent_mask is None else flat[latent_mask.reshape(-1)]).cpu())
    codes = torch.cat(codes)
    if bool((codes < 0).any()):
        status = "index -1 at a real position" if status == "ok" else status
        codes = codes.clamp_min(0)
    record = {
        "data": data.name,
        "method": method,
        "impl": impl,
        "status": status,
        "steps": steps_done,
        "batch_size": batch_size,
        "seed": seed,
        "quantizer": side.description,
        "test_mse": float(squared / max(count, 1)),
        "test_items": data.test_size,
        "test_positions": len(codes),
        **code_stats(codes, side.sizes),
        "train_recon_last20": float(np.mean(recon_tail)) if recon_tail else None,
        "aux_loss_last20": float(np.mean(aux_tail)) if aux_tail else None,
        "steps_per_s": (steps_done - 1) / train_seconds if train_seconds else None,
        "first_step_seconds": None if first_step_seconds is None else round(first_step_seconds, 3),
        "train_seconds": round(train_seconds + (first_step_seconds or 0), 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "data_hash": data_hash.hexdigest()[:16],
        "init_hash": init_hash,
        "reference_masked": (METHODS[method].reference_takes_mask if impl == REFERENCE else True)
        if data.name == "fsdd"
        else None,
    }
    if side.config is not None:
        record["config"] = side.config
    return record


# --- the subcommand ---------------------------------------------------------------


def add_parser(sub, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "quality",
        parents=[common],
        help="train every quantizer beside the reference on real data; test MSE, usage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", default="mnist", choices=["mnist", "fsdd"])
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
        help=f"quantizer configs to run (default all: {' '.join(METHODS)})",
    )
    p.add_argument("--steps", type=int, nargs="+", help="training steps of each budget (default 200 600)")
    p.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        help="batch size of each budget, paired with --steps (default mnist 64 128, fsdd 16 16)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ours-override",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for our side only, e.g. quantizer.commitment_weight=0 (default: the shipped configs)",
    )
    p.add_argument(
        "--no-reference", action="store_true", help=f"ours only (also what happens when {REFERENCE} is not installed)"
    )
    p.add_argument(
        "--root",
        type=Path,
        default=DATA,
        help="folder holding MNIST/raw and fsdd/recordings (default <repo>/../shared/data)",
    )
    p.add_argument("--train-limit", type=int, help="use only the first N training items (checks; default all)")
    p.add_argument("--test-limit", type=int, help="score only the first N test items (checks; default all)")


def budgets(args) -> list[tuple[int, int]]:
    steps, sizes = args.steps, args.batch_size
    if args.quick and steps is None and sizes is None:
        steps, sizes = [5], [16]
    if steps is None and sizes is None:
        steps, sizes = DEFAULT_BUDGETS[args.data]
    steps = steps or [DEFAULT_BUDGETS[args.data][0][0]]
    sizes = sizes or [DEFAULT_BUDGETS[args.data][1][0]]
    if len(steps) == 1:
        steps = steps * len(sizes)
    if len(sizes) == 1:
        sizes = sizes * len(steps)
    if len(steps) != len(sizes):
        raise SystemExit(f"--steps ({len(steps)} values) and --batch-size ({len(sizes)}) must pair up")
    return list(zip(steps, sizes))


def reference_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        import vector_quantize_pytorch  # noqa: F401

        return version(REFERENCE)
    except (ImportError, PackageNotFoundError):
        return None


def fmt_levels(values: list, spec: str) -> str:
    return "/".join(format(v, spec) for v in values)


def markdown(rows: list[dict]) -> str:
    headers = [
        "data",
        "budget",
        "method",
        "impl",
        "test MSE",
        "utilization",
        "perplexity",
        "dead codes",
        "steps/s",
        "wall s",
        "status",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 6 + ["---"]) + "|"]
    for r in rows:
        cells = [
            r["data"],
            f"{r['steps']}x{r['batch_size']}",
            r["method"],
            "ours" if r["impl"] == OURS else "reference",
            f"{r['test_mse']:.5f}",
            fmt_levels(r["utilization"], ".3f"),
            fmt_levels(r["perplexity"], ".0f"),
            fmt_levels(r["dead_codes"], "d"),
            f"{r['steps_per_s']:.1f}" if r["steps_per_s"] else "",
            f"{r['wall_seconds']:.1f}",
            r["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    if not (args.root / ("MNIST/raw" if args.data == "mnist" else "fsdd/recordings")).is_dir():
        raise SystemExit(
            f"quality: no {args.data} data under {args.root} (expected ../shared/data next to the repository)"
        )
    version = None if args.no_reference else reference_version()
    if not args.no_reference and version is None:
        print(f"quality: {REFERENCE} is not installed: ours only", file=sys.stderr)
    impls = [OURS] + ([REFERENCE] if version else [])
    if args.quick:  # checks that everything runs; measures nothing useful
        args.train_limit, args.test_limit = args.train_limit or 256, args.test_limit or 64
    loaded = time.perf_counter()
    data = (MNIST if args.data == "mnist" else FSDD)(args.root, args.train_limit, args.test_limit)
    print(
        f"{args.data}: {data.train_size} training, {data.test_size} test items (loaded in {time.perf_counter() - loaded:.1f} s)",
        flush=True,
    )
    rows, pairs = [], []
    for steps, batch_size in budgets(args):
        for method in args.methods:
            got = {}
            for impl in impls:
                if impl == REFERENCE and METHODS[method].build_reference is None:
                    continue
                record = run_one(data, method, impl, steps, batch_size, args.seed, args.device, args.ours_override)
                rows.append(record)
                got[impl] = record
                print(
                    f"  {args.data} {steps}x{batch_size} {method:9s} {impl:24s} mse {record['test_mse']:.5f}  "
                    f"util {fmt_levels(record['utilization'], '.3f')}  {record['steps_per_s'] or 0:.1f} steps/s  "
                    f"{record['wall_seconds']:.1f} s  {record['status']}",
                    flush=True,
                )
            if len(got) == 2:
                ours, ref = got[OURS], got[REFERENCE]
                same = (
                    ours["data_hash"] == ref["data_hash"]
                    and ours["init_hash"] == ref["init_hash"]
                    and ours["steps"] == ref["steps"]
                )
                pairs.append(
                    {
                        "data": args.data,
                        "steps": steps,
                        "batch_size": batch_size,
                        "method": method,
                        "same_batches_and_init": same,
                        "mse_ratio_ours_over_reference": ours["test_mse"] / ref["test_mse"]
                        if ref["test_mse"]
                        else None,
                    }
                )
                if not same:
                    print(
                        f"  WARNING: {method} {steps}x{batch_size}: ours and the reference did not see the same batches or init",
                        flush=True,
                    )
    print("\n" + markdown(rows))
    return {
        "settings": {
            "data": args.data,
            "methods": args.methods,
            "budgets": budgets(args),
            "seed": args.seed,
            "ours_overrides": args.ours_override,
            "lr": LR,
            "optimizer": "Adam",
            "latent": "7x7x64" if args.data == "mnist" else f"64-d per {FSDD_STRIDE} samples",
            "inputs": "pixels in [0, 1]"
            if args.data == "mnist"
            else f"8 kHz audio, each clip at {FSDD_RMS_DB} dBFS RMS",
            "train_items": data.train_size,
            "test_items": data.test_size,
            "test_variance": data.test_var,
            "train_limit": args.train_limit,
            "test_limit": args.test_limit,
            "reference": REFERENCE,
            "reference_version": version,
            "reference_constructors": {m: METHODS[m].reference for m in args.methods},
        },
        "rows": rows,
        "pairs": pairs,
        "table": markdown(rows),
    }
