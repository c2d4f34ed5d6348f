"""The discrete autoencoder: encoder -> quantizer -> decoder, as one LightningModule.

loss = reconstruction + the quantizer's weighted terms (codebook, commitment,
anything method-specific). Every stage logs `{stage}/loss`, `recon_loss`, and
each quantizer term as `<name>_loss` (`codebook_loss`, `commitment_loss`;
residual levels `codebook/level0_loss`...), then `utilization`, `perplexity`,
`dead_codes`. Training logs only on Lightning's logging steps
(`trainer.log_every_n_steps`), usage figures every `usage_window` steps.
Training usage figures cover the last `usage_window` steps; validation and test
figures cover the whole epoch. A dead code went unused for `dead_code_window`
training steps (in validation and test: over the whole epoch).

A training step never waits on the device (no host-device sync outside logging
steps): whether its loss is finite is decided on the device, and a non-finite
step updates nothing. Its optimizer update is masked through the fused
optimizer's `found_inf` (as `GradScaler` skips steps), its codes are not
counted, and it is recorded; at the next logging step (or the end of training)
`model.nonfinite=raise` raises naming the first such step and the tensor, and
`skip` logs how many were skipped. An optimizer without `found_inf` (not fused)
is told on the host instead: one sync a step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import lightning as L
import torch
from einops import rearrange
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from vqtrain.checkpoints import CONFIG_KEY, MODALITY_KEY, check_same_nets
from vqtrain.config import InvalidConfig
from vqtrain.data.batch import Batch
from vqtrain.distributed import all_reduce_max, all_reduce_min, all_reduce_sum, is_distributed, rank
from vqtrain.losses import ReconstructionLoss
from vqtrain.metrics import CodebookUsage, LastUse, code_vectors, count_codes, usage_summary, used_codes_effective_rank
from vqtrain.quantizers import Quantizer, QuantizerOutput
from vqtrain.utils import (
    all_finite,
    ceil_div,
    channel_mask,
    default,
    exists,
    lengths_to_mask,
    mask_to_lengths,
    rng_states,
    set_rng_states,
)

log = logging.getLogger(__name__)

STAGES = ("train", "val", "test")
# what went non-finite, by the code a training step records on the device
NONFINITE = ("train loss", "input batch.x", "discriminator loss")


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup, then cosine decay to `min_lr_ratio` at `total_steps`.

    A run continued from a checkpoint with the same `total_steps` follows the
    schedule of a run never stopped. With another one (a larger `max_steps`)
    the rate does not jump: the decay still ahead runs on along the same cosine
    from the step reached, stretched to end at the new total."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.decay_from = (warmup_steps, 0.0)  # (step, cosine progress there): the decay ahead starts there
        super().__init__(optimizer)

    def progress(self, step: int) -> float:
        start, done = self.decay_from
        return min(1.0, done + (1 - done) * (step - start) / max(1, self.total_steps - start))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def get_lr(self) -> list[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The step and the decay so far are the checkpoint's, the settings this run's."""
        settings = {
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }
        super().load_state_dict(state_dict)
        if self.total_steps != settings["total_steps"]:
            step = max(self.last_epoch, self.warmup_steps)
            self.decay_from = (step, self.progress(step))
        self.__dict__.update(settings)


class ModelOutput(NamedTuple):
    """What the autoencoder's forward gives: the reconstruction (in the input's
    layout) and the quantizer's output (codes, indices, loss terms)."""

    x_hat: Tensor
    quantizer: QuantizerOutput


class StepResult(NamedTuple):
    """A step's loss and output, and whether the loss is finite on every rank (bool, on the device)."""

    loss: Tensor
    output: ModelOutput
    finite: Tensor


class DiscreteAutoencoder(L.LightningModule):
    def __init__(
        self,
        encoder: nn.Module,
        quantizer: Quantizer,
        decoder: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        latent_dim: int,
        scheduler: dict | None = None,
        reconstruction: nn.Module | None = None,
        usage_window: int = 100,
        dead_code_window: int = 1000,
        compile: bool = False,
        nonfinite: str = "raise",
    ):
        super().__init__()
        dims = {
            "encoder.out_channels": encoder.out_channels,
            "quantizer.dim": quantizer.dim,
            "decoder.in_channels": decoder.in_channels,
        }
        if any(d != latent_dim for d in dims.values()):
            raise ValueError(f"latent dims must all equal model.latent_dim={latent_dim}, got {dims}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"model.nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if usage_window < 1:
            raise ValueError(f"model.usage_window must be >= 1, got {usage_window}")
        self.encoder, self.quantizer, self.decoder = encoder, quantizer, decoder
        self.optimizer_factory = optimizer
        self.scheduler = scheduler
        self.reconstruction = default(reconstruction, ReconstructionLoss())
        self.usage_window = usage_window
        self.compile_model = compile
        self.nonfinite = nonfinite

        sizes = quantizer.codebook_sizes
        for stage in STAGES:  # train usage is kept in checkpoints: a resumed window continues
            setattr(self, f"{stage}_usage", CodebookUsage(sizes, persistent=stage == "train"))
        self.last_use = LastUse(sizes, dead_code_window)
        self.register_buffer("skipped_items", torch.zeros((), dtype=torch.long))
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))
        # the first non-finite training step not yet reported, and what went non-finite (NONFINITE)
        self.register_buffer("nonfinite_step", torch.full((), -1, dtype=torch.long), persistent=False)
        self.register_buffer("nonfinite_what", torch.zeros((), dtype=torch.long), persistent=False)
        self.reported_skips = 0  # skipped steps already logged as a warning
        self.latest_usage: dict[str, dict[str, Tensor]] = {}
        self.run_config: dict | None = None  # the resolved run config, saved in checkpoints
        self.resumed_rng_states: dict | None = None  # from the checkpoint resumed, until training starts

    # -- the model ---------------------------------------------------------
    @property
    def modality(self) -> str:
        """ "image" or "audio": what the encoder takes (nets declare it)."""
        return self.encoder.modality

    def encode(
        self, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """x -> channel-last latents (B, ..., D), latent mask, sample lengths.

        Audio: `lengths` (as the collate gives them) or else `mask` (checked to be
        a prefix) says which samples are real; without either every sample is,
        and the decoder still cuts the tail it upsamples past the clip."""
        if self.modality == "audio" and not exists(lengths):
            lengths = mask_to_lengths(mask) if exists(mask) else torch.full((x.shape[0],), x.shape[-1], device=x.device)
        z = self.encoder(x, lengths)
        latent_mask = lengths_to_mask(ceil_div(lengths, self.encoder.stride), z.shape[-1]) if exists(lengths) else None
        return rearrange(z, "b d ... -> b ... d"), latent_mask, lengths

    def decode(self, quantized: Tensor, lengths: Tensor | None = None, size: int | None = None) -> Tensor:
        """Channel-last codes (B, ..., D) -> signal; audio is cut to `size` and masked by `lengths`."""
        return self.decoder(rearrange(quantized, "b ... d -> b d ..."), lengths, size)

    def forward(self, x: Tensor, mask: Tensor | None = None, lengths: Tensor | None = None) -> ModelOutput:
        z, latent_mask, lengths = self.encode(x, mask, lengths)
        if is_distributed() and not self.quantizer.updating:  # the quantizer raises outside training:
            self.check_finite("encoder output", z, latent_mask)  # all ranks at once, or some would wait
        out = self.quantizer(z, latent_mask)
        return ModelOutput(self.decode(out.quantized, lengths, x.shape[-1]), out)

    def objective(self, batch: Batch, output: ModelOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss and its terms by logged name: reconstruction, then the
        quantizer's terms under their own names (`codebook`, `commitment/level0`...)."""
        recon = self.reconstruction(output.x_hat, batch.x, batch.mask, batch.lengths)
        terms = {"recon_loss": recon} | {f"{name}_loss": value for name, value in output.quantizer.losses.items()}
        return recon + output.quantizer.loss, terms

    def use_inference_weights(self) -> None:
        """Put in place the weights that inference uses (the tokenizer, evaluation):
        here the trained ones; a model that keeps an EMA of its weights swaps it in."""

    # -- steps -------------------------------------------------------------
    def check_finite(self, name: str, tensor: Tensor, mask: Tensor | None = None) -> None:
        """Raise if any real value is NaN/Inf on any rank: ranks decide together,
        so a skipped step never leaves the others waiting in a collective. A host
        read: for validation and test; training steps use `finite_on_all_ranks`."""
        values = tensor if not exists(mask) else torch.where(mask[..., None], tensor, 0.0)
        finite = all_reduce_min(all_finite(values).to(torch.int32))
        if not bool(finite):
            raise FloatingPointError(f"non-finite {name} at step {self.global_step}")

    def blame(self, batch: Batch, error: FloatingPointError) -> FloatingPointError:
        """The input, when it is what went non-finite; looked at only once a step has failed."""
        if bool(self.input_finite(batch)):
            return error
        return FloatingPointError(f"non-finite input batch.x at step {self.global_step}")

    @staticmethod
    def input_finite(batch: Batch) -> Tensor:
        real = batch.x if batch.mask is None else torch.where(channel_mask(batch.mask, batch.x), batch.x, 0.0)
        return all_finite(real)

    def finite_on_all_ranks(self, loss: Tensor, batch: Batch, what: int = 0, known: Tensor | None = None) -> Tensor:
        """Whether `loss` is finite on every rank (bool, on the device). A non-finite one is
        counted as skipped and, if it is the first since the last report, recorded with what
        went non-finite (`NONFINITE[what]`, or the input if that is what is) for `report_nonfinite`.
        `known`: False when this batch was already counted as skipped (the GAN's second loss)."""
        finite = all_finite(loss)
        if is_distributed():
            finite = all_reduce_min(finite.to(torch.int32)).bool()
        new = ~finite
        if known is not None:
            new, finite = new & known, finite & known
        first = new & (self.nonfinite_step < 0)
        self.nonfinite_step.masked_fill_(first, self.global_step)
        self.nonfinite_what.masked_fill_(first, what)
        self.nonfinite_what.masked_fill_(first & ~self.input_finite(batch), NONFINITE.index("input batch.x"))
        self.skipped_steps += new
        return finite

    def report_nonfinite(self) -> None:
        """On logging steps and at the end of training (host reads): raise for the first
        non-finite step recorded (`model.nonfinite=raise`), or warn of the steps skipped."""
        if self.nonfinite == "raise":
            step = int(self.nonfinite_step)
            if step >= 0:
                what = NONFINITE[int(self.nonfinite_what)]
                raise FloatingPointError(
                    f"non-finite {what} at step {step} (model.nonfinite=skip skips such steps instead)"
                )
            return
        skipped, step = int(self.skipped_steps), int(self.nonfinite_step)
        if skipped > self.reported_skips and step >= 0:  # (validation's skips warn when they happen)
            what = NONFINITE[int(self.nonfinite_what)]
            log.warning("non-finite %s at step %d: step skipped (%d so far)", what, step, skipped)
        self.reported_skips = skipped
        self.nonfinite_step.fill_(-1)

    def mask_update(self, optimizer: Any, finite: Tensor) -> bool:
        """Let `optimizer`'s next step update only if `finite`, decided on the device: a fused
        optimizer takes `found_inf` (as from `GradScaler`), and skips on the device. Another one
        is told on the host (a sync): returns False when its step must not run."""
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.found_inf = (~finite).float()
            return True
        return bool(finite)

    def logging_step(self, stage: str) -> bool:
        """Whether Lightning writes this step's logs. Training values logged on other
        steps would be dropped, but each would cost a host-device sync to fetch.

        Lightning's own decision is private (`_logger_connector.should_update_logs`, as its
        own callbacks read it): it counts batches, and no public counter does. A rule on
        `global_step` agrees under automatic optimisation, but not in `gan.py`: a batch
        without a readable item steps neither optimiser, and the discriminator's figures are
        logged after the generator's step has moved `global_step` on. test_train.py and test_gan.py check
        this against what Lightning writes, so that an upgrade that changes it fails there."""
        if stage != "train":
            return True
        trainer = self._trainer
        return trainer is not None and (trainer._logger_connector.should_update_logs or bool(trainer.fast_dev_run))

    def shared_step(self, batch: Batch, stage: str) -> StepResult | None:
        self.skipped_items += batch.skipped
        if batch.x is None:  # every item unreadable
            return None
        try:
            output = self(batch.x, batch.mask, batch.lengths)
            loss, terms = self.objective(batch, output)
            if stage == "train":  # decided on the device: see the module's docstring
                finite = self.finite_on_all_ranks(loss, batch)
            else:  # validation and test may read the device: the step's one check, NaN input or latents too
                self.check_finite(f"{stage} loss", loss)
                finite = torch.ones((), dtype=torch.bool, device=loss.device)
        except FloatingPointError as failure:  # raised outside training only (quantizers, check_finite)
            error = self.blame(batch, failure)
            if self.nonfinite == "raise":
                raise FloatingPointError(f"{error} (model.nonfinite=skip skips such steps instead)") from error
            self.skipped_steps += 1
            log.warning("%s: step skipped (%d so far)", error, int(self.skipped_steps))
            return None

        counts = count_codes(output.quantizer.indices, self.quantizer.codebook_sizes) * finite
        self.usage(stage).update(counts)
        if stage == "train":
            self.last_use.update(counts, self.global_step)
        if self.logging_step(stage) and bool(finite):  # a host read, on logging steps only: a skipped step logs nothing
            training = stage == "train"
            options = dict(on_step=training, on_epoch=not training, sync_dist=not training, batch_size=len(batch))
            self.log_dict({f"{stage}/{name}": value.detach() for name, value in terms.items()}, **options)
            # not Lightning's progress-bar figure in training: Lightning reads those back at every
            # batch (a sync each); callbacks.ProgressBar shows it, read on logging steps only
            self.log(f"{stage}/loss", loss.detach(), prog_bar=not training, **options)
        return StepResult(loss, output, finite)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        result = self.shared_step(batch, "train")
        self.training_bookkeeping(result)
        if result is None or not self.mask_update(self.optimizers(), result.finite):
            return None  # no backward, no update
        return result.loss

    def training_bookkeeping(self, result: StepResult | None) -> None:
        """Non-finite steps and skip counts on logging steps; the usage window's figures at its last step."""
        if self.logging_step("train"):
            self.report_nonfinite()
            self.log_dict(
                {"data/skipped_items": self.skipped_items.float(), "train/skipped_steps": self.skipped_steps.float()},
                on_step=True,
            )
        if result is not None and (self.global_step + 1) % self.usage_window == 0:
            self.log_usage("train", dead_codes=self.last_use.dead_codes(self.global_step))

    def on_train_end(self) -> None:
        self.report_nonfinite()  # a non-finite step after the last logging step

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self.shared_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self.log_usage("val")
        if not self.latest_usage["val"]["counts"].any():  # (summed over ranks: every rank raises alike)
            raise FloatingPointError(
                f"validation at step {self.global_step}: no batch gave a loss, every one was non-finite "
                "(skipped: model.nonfinite=skip; the model has diverged) or unreadable (data/skipped_items), "
                "so nothing scores the model or chooses a best checkpoint"
            )

    def on_test_epoch_end(self) -> None:
        self.log_usage("test")

    def usage(self, stage: str) -> CodebookUsage:
        return getattr(self, f"{stage}_usage")

    def log_usage(self, stage: str, dead_codes: Tensor | None = None) -> None:
        usage = self.usage(stage)
        with usage.sync_context():  # counts summed over ranks (compute() would leave only this rank's behind)
            summary = usage_summary(usage.counts, usage.codebook_sizes)
            summary["counts"] = usage.counts.clone()
        usage.reset()
        self.latest_usage[stage] = summary
        figures = {name: summary[name] for name in ("utilization", "entropy_utilization", "perplexity", "dead_codes")}
        # collapse that counts cannot see: codes all used, but spanning few dimensions
        figures["effective_rank"] = used_codes_effective_rank(code_vectors(self.quantizer), summary["counts"]).mean()
        if exists(dead_codes):
            figures["dead_codes"] = dead_codes
        if len(self.quantizer.codebook_sizes) > 1:
            for name, values in summary["per_codebook"].items():
                figures.update({f"{name}/codebook{i}": v for i, v in enumerate(values)})
        self.log_dict(
            {f"{stage}/{k}": v.float() for k, v in figures.items()}, on_step=stage == "train", on_epoch=stage != "train"
        )

    # -- optimisation --------------------------------------------------------
    def configure_model(self) -> None:
        """`model.compile`: the nets compiled in place (their state-dict keys unchanged), and
        the quantizer's codebook bookkeeping: on a GPU a few fused kernels, not dozens of launches."""
        if self.compile_model:
            self.encoder.compile()
            self.decoder.compile()
            self.quantizer.compile_bookkeeping()

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """What the autoencoder's optimizer trains: the encoder, decoder and quantizer."""
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quantizer.parameters()]

    def configure_optimizers(self) -> Any:
        return self.optimizer_config(self.optimizer_factory, self.autoencoder_parameters())

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        """Lightning's, except under bf16-mixed: Lightning refuses to clip a fused optimizer
        under any mixed precision, because with 16-mixed's scaler its gradients are still
        scaled; bf16-mixed has no scaler, so they are clipped as in 32-true."""
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            Precision.clip_gradients(
                plugin, optimizer, gradient_clip_val or 0.0, GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            )
        else:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_config(self, factory: Callable[..., torch.optim.Optimizer], params: list[nn.Parameter]) -> Any:
        """The optimizer over `params`, with the run's schedule (`model.scheduler`) if any."""
        quantizer_params = {id(p) for p in self.quantizer.parameters()}
        # a quantizer module may set its own parameters' rate factor and decoupled weight decay
        # (`param_options`: name -> {"lr_scale": ..., "weight_decay": ...})
        options = {
            id(getattr(m, name)): (opts.get("lr_scale", 1.0), opts.get("weight_decay", 0.0))
            for m in self.quantizer.modules()
            for name, opts in getattr(m, "param_options", {}).items()
        }
        by_options: dict[tuple[float, float], list[nn.Parameter]] = {}
        for p in params:
            if id(p) in quantizer_params:
                by_options.setdefault(options.get(id(p), (1.0, 0.0)), []).append(p)
        groups = [{"params": [p for p in params if id(p) not in quantizer_params]}]
        # codebooks decay only where their module asks: frozen codes stay put, unused codes keep their place
        groups += [
            {"params": ps, "lr_scale": scale, "weight_decay": decay}
            | ({"decoupled_weight_decay": True} if decay else {})
            for (scale, decay), ps in sorted(by_options.items())
        ]
        optimizer = factory([g for g in groups if g["params"]])
        if any(g.get("decoupled_weight_decay") for g in groups) and "decoupled_weight_decay" not in optimizer.defaults:
            raise InvalidConfig(
                f"optimizer: {type(optimizer).__name__} has no decoupled weight decay, which the quantizer's "
                "transform_weight_decay asks for (it would decay W as an L2 term): use optimizer=adam or "
                "adamw, or quantizer.transform_weight_decay=0"
            )
        for group in optimizer.param_groups:  # before the scheduler reads the base rates
            group["lr"] *= group.pop("lr_scale", 1.0)
        if not self.scheduler:
            return optimizer
        total_steps = self.scheduler.get("total_steps")
        scheduler = WarmupCosine(
            optimizer,
            warmup_steps=self.scheduler.get("warmup_steps", 0),
            total_steps=self.trainer.estimated_stepping_batches if total_steps is None else total_steps,
            min_lr_ratio=self.scheduler.get("min_lr_ratio", 0.1),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints -------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.run_config
        checkpoint[MODALITY_KEY] = self.modality
        checkpoint["rng_states"] = rng_states()  # ranks draw alike: rank 0's states serve them all
        # Every rank runs this hook and rank 0 writes the file: its usage state must be the run's,
        # not its own (the usage window is a sum over ranks, the last use a max).
        state = checkpoint["state_dict"]
        state["train_usage.counts"] = all_reduce_sum(self.train_usage.counts.clone())
        state["last_use.last_step"] = all_reduce_max(self.last_use.last_step.clone())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:
            check_same_nets(checkpoint, self.run_config)
        self.resumed_rng_states = checkpoint.get("rng_states")
        if rank() != 0:  # the window's counts of all ranks: one rank carries them on
            counts = checkpoint["state_dict"]["train_usage.counts"]
            checkpoint["state_dict"]["train_usage.counts"] = torch.zeros_like(counts)

    def on_train_start(self) -> None:
        """A resumed run continues the random streams where its checkpoint left
        them: here, after the sanity check and data set-up that a run never
        stopped would not have repeated, before the first training batch."""
        if exists(self.resumed_rng_states):
            set_rng_states(self.resumed_rng_states)
            self.resumed_rng_states = None
