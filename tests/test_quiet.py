"""vqtrain.quiet drops the known-harmless start-up output, and only that."""

from __future__ import annotations

import logging
import warnings

import pytest

from vqtrain.quiet import HARMLESS_LOG_LINES, quiet_start

LIGHTNING_LOGGERS = sorted({name for name, _, _ in HARMLESS_LOG_LINES})


@pytest.fixture
def quiet(monkeypatch):
    for name in LIGHTNING_LOGGERS:  # leave the loggers as they were after the test
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_start()
        quiet_start()  # idempotent
        yield caught


def warn(message: str, category: type[Warning], module: str) -> None:
    warnings.warn_explicit(message, category, filename=module.replace(".", "/") + ".py", lineno=1, module=module)


def test_harmless_warnings_are_dropped_by_exact_message_and_module(quiet):
    warn(
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`",
        FutureWarning,
        "lightning.pytorch.utilities._pytree",
    )
    warn(
        "The 'train_dataloader' does not have many workers which may be a bottleneck.",
        UserWarning,
        "lightning.pytorch.trainer.connectors.data_connector",
    )
    warn(
        "You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable."
        " This can cause unreliable results if further training is done.",
        UserWarning,
        "lightning.pytorch.loops.training_epoch_loop",
    )
    warn(
        "It is recommended to use `self.log('val/perplexity', ..., sync_dist=True)` when logging on epoch level",
        UserWarning,
        "lightning.pytorch.trainer.connectors.logger_connector.result",
    )
    warn(GRAD_STRIDES.format(kernel="1, 1"), UserWarning, "torch.autograd.graph")
    assert quiet == []


GRAD_STRIDES = (
    "Grad strides do not match bucket view strides. This may indicate grad was not created according to the"
    " gradient layout contract, or that the param's strides changed since DDP was constructed.  This is not an"
    " error, but may impair performance.\ngrad.sizes() = [8, 8, {kernel}], strides() = [8, 1, 8, 8]"
)


@pytest.mark.parametrize(
    "message, category, module",
    [
        ("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "vqtrain.model"),  # another module
        ("something else is deprecated", FutureWarning, "lightning.pytorch.utilities._pytree"),  # another message
        ("The 'val_dataloader' does not have many workers", DeprecationWarning, "lightning.pytorch"),  # category
        (GRAD_STRIDES.format(kernel="3, 3"), UserWarning, "torch.autograd.graph"),  # a layout that may cost time
        ("It is recommended to use `self.log('train/x', ..., sync_dist=True)`", UserWarning, "lightning.pytorch"),
    ],
)
def test_real_warnings_still_show(quiet, message, category, module):
    warn(message, category, module)
    assert [str(w.message) for w in quiet] == [message]


def test_lightning_start_up_notes_are_dropped_and_its_other_lines_kept(quiet, caplog):
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("`Trainer.fit` stopped: `max_steps=5` reached.")
        rank_zero.info("`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.")
    assert caplog.messages == [
        "`Trainer.fit` stopped: `max_steps=5` reached.",
        "`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.",
    ]
