"""The one place where vqtrain silences output known to be harmless, so that a run
starts with its resolved choices (vqtrain.train logs them) and the progress bar.

Each entry matches one exact message from one module; every other warning, of
any category, still shows. Add an entry only with the reason it is harmless."""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, category, module that warns, why it is harmless)
HARMLESS_WARNINGS = [
    (
        re.escape("`isinstance(treespec, LeafSpec)` is deprecated"),
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
        "torch 2.11 deprecates a class Lightning 2.6 builds; nothing a user can change",
    ),
    (
        "Checkpoint directory .* exists and is not empty",
        UserWarning,
        r"lightning\.",
        "checkpoints go into the run directory, which Hydra has already written .hydra/ and the log into",
    ),
    (
        "The '.*' does not have many workers",
        UserWarning,  # Lightning's PossibleUserWarning is a UserWarning
        r"lightning\.",  # rank_zero_warn's stack level attributes it to a caller inside Lightning
        "every data config sets data.num_workers deliberately (its comment says when to raise it)",
    ),
    (
        "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
        UserWarning,
        r"lightning\.",
        "vqtrain's DataModule resumes mid-epoch itself (its state_dict: the batches done), exactly, where Lightning "
        "looks for a stateful dataloader only",
    ),
    (
        r"It is recommended to use `self.log\('(val|test)/",
        UserWarning,
        r"lightning\.",
        "under DDP, validation and test figures are logged summed over ranks already: losses with sync_dist, "
        "usage from all-reduced counts, quality from torchmetrics' synced compute",
    ),
    (
        r"(?s)Grad strides do not match bucket view strides.*grad\.sizes\(\) = \[\d+, \d+, 1, 1\]",
        UserWarning,
        r"torch\.",
        "DDP on a 1x1 convolution's weight: its gradient's strides differ only along dimensions of size 1, "
        "so its memory layout is the bucket's",
    ),
]

# (logger, message prefix, why): Lightning's start-up notes that vqtrain's start line replaces or that say nothing
HARMLESS_LOG_LINES = [
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:", "an advertisement for a cloud logger"),
    ("lightning.pytorch.utilities.rank_zero", "GPU available:", "the start line names the device"),
    ("lightning.pytorch.utilities.rank_zero", "TPU available:", "the start line names the device"),
    ("lightning.pytorch.utilities.rank_zero", "HPU available:", "the start line names the device"),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer(limit_val_batches=1.0)` was configured", "the default"),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer(limit_test_batches=1.0)` was configured", "the default"),
    ("lightning.fabric.utilities.seed", "Seed set to", "the start line names the seed"),
]


class _DropLines(logging.Filter):
    def __init__(self, prefixes: list[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefixes)


def quiet_start() -> None:
    """Filter HARMLESS_WARNINGS and HARMLESS_LOG_LINES in this process (idempotent)."""
    for message, category, module, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    prefixes: dict[str, list[str]] = {}
    for name, prefix, _ in HARMLESS_LOG_LINES:
        prefixes.setdefault(name, []).append(prefix)
    for name, names_prefixes in prefixes.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, _DropLines)]
        logger.addFilter(_DropLines(names_prefixes))
