"""Find host-device synchronisations without a GPU.

On CUDA a few aten ops make the host wait until the device has finished all
queued work: reading a value (`.item()`, `bool(t)`, `int(t)`:
`aten._local_scalar_dense`) and every op whose output size depends on the data
(`nonzero`, `unique`, `masked_select`, boolean-mask indexing, `bincount`,
`repeat_interleave` without `output_size`). A training step with none of them
lets the host run ahead and keep the GPU fed. On a CPU nothing waits, but the
same ops are dispatched: `SyncRecorder`, a `TorchDispatchMode`, sees every aten
op a block of code dispatches (forward and backward), counts them (a stand-in
for kernel launches) and records the syncing ones with the source line that
asked for them. `python scripts/bench.py syncs --device cuda` counts the real
ones with `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch.utils._python_dispatch import TorchDispatchMode

CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")

aten = torch.ops.aten

# ops that sync on CUDA whatever their arguments
ALWAYS_SYNC = {
    aten._local_scalar_dense,
    aten.is_nonzero,
    aten.equal,
    aten.nonzero,
    aten.argwhere,
    aten.masked_select,
    aten.bincount,
    aten.histc,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.unique_dim_consecutive,
}
# ops that sync when one of their indices is a boolean mask (it is turned into positions by `nonzero`)
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# ops whose CUDA kernel reads a 0-dim tensor value on the host (`value.item()` inside the kernel,
# unseen here: a dispatch mode sees only the op), where a Python number would not
TENSOR_VALUE_READ = {
    aten.masked_fill.Tensor,
    aten.masked_fill_.Tensor,
    aten.index_fill.int_Tensor,
    aten.index_fill_.int_Tensor,
}

TORCH_ROOT = Path(torch.__file__).resolve().parent
HERE = Path(__file__).resolve()
# ops dispatched under these run in a data loader's collate, on the host's own tensors
DATA_LOADING = str(TORCH_ROOT / "utils" / "data")


def synchronises(func, args, kwargs) -> bool:
    """Whether this aten call makes the host wait for a CUDA device."""
    packet = func.overloadpacket
    if packet in ALWAYS_SYNC or func in TENSOR_VALUE_READ:
        return True
    if packet in MASK_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if func in (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor):
        return kwargs.get("output_size") is None  # tensor repeats size the output from the data
    return False


def caller() -> str:
    """`file:line in function` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path != HERE and TORCH_ROOT not in path.parents:
            return f"{path.name}:{frame.lineno} in {frame.name}"
    return "?"


def loading_data() -> bool:
    """Whether the op comes from a DataLoader (a collate on host tensors, not the step)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(DATA_LOADING):
            return True
        frame = frame.f_back
    return False


class SyncRecorder(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (`ops`) and records those that would
    synchronise on CUDA (`syncs`: (op name, source line) -> count).

    Enter and leave it around a block (`with SyncRecorder() as r:`), or across
    hooks with `start()` / `stop()`."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not loading_data():
            self.ops += 1
            if synchronises(func, args, kwargs):
                self.syncs[(str(func.overloadpacket.__name__), caller())] += 1
        return func(*args, **kwargs)

    def start(self) -> SyncRecorder:
        self.__enter__()
        return self

    def stop(self) -> None:
        self.__exit__(None, None, None)


def cuda_syncs(caught: list[warnings.WarningMessage]) -> list[str]:
    """The syncs `torch.cuda.set_sync_debug_mode("warn")` reported, one each, with the
    line that made it; not the mode's own notice that it is a prototype."""
    return [f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in caught if CUDA_SYNC_WARNING in str(w.message)]


class SyncWatch(Callback):
    """Records `count` whole training iterations from batch number `first` on (the
    step, backward, optimizer, Lightning's own bookkeeping; not the DataLoader) and
    writes what it saw to `syncs.json` in the run directory: ops per batch and the
    syncing ops with their source lines; on a CUDA device also the real syncs that
    `torch.cuda.set_sync_debug_mode` reports. Choose batches that are not logging steps.

    python train.py +callbacks.syncs._target_=vqtrain.hostsync.SyncWatch trainer.log_every_n_steps=1000"""

    def __init__(self, first: int = 2, count: int = 3):
        self.first, self.count = first, count
        self.batches = 0
        self.recorder: SyncRecorder | None = None
        self.cuda_warnings: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.batches == self.first:
            if pl_module.device.type == "cuda":
                self.cuda_warnings = warnings.catch_warnings(record=True)
                self.caught = self.cuda_warnings.__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.recorder = SyncRecorder().start()
        elif self.batches == self.first + self.count:
            self.finish(trainer)
        self.batches += 1

    def on_train_end(self, trainer, pl_module) -> None:
        if self.recorder is not None:
            self.finish(trainer)

    def finish(self, trainer) -> None:
        recorder, self.recorder = self.recorder, None
        recorder.stop()
        batches = min(self.count, self.batches - self.first)
        record = {
            "batches": batches,
            "ops_per_batch": recorder.ops / max(batches, 1),
            "syncs": [{"op": op, "where": where, "count": n} for (op, where), n in recorder.syncs.most_common()],
        }
        if self.cuda_warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self.cuda_warnings.__exit__(None, None, None)
            messages = cuda_syncs(self.caught)
            record.update(cuda_syncs=len(messages), cuda_sync_messages=sorted(set(messages))[:20])
            self.cuda_warnings = None
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "syncs.json").write_text(json.dumps(record, indent=1))
