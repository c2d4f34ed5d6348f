"""The discrete autoencoder trained as a GAN generator (VQGAN, Esser et al. 2021,
arXiv:2012.09841): reconstruction + perceptual + adaptively weighted adversarial
loss + the quantizer's terms, against a discriminator trained beside it, with an
EMA of the autoencoder's weights for validation, test and inference. For audio
codecs (DAC, EnCodec) a mel term and feature matching join, with fixed weights.

Step counting. Lightning's manual optimisation counts every `optimizer.step()`
in `global_step`, so two optimisers would run `max_steps`, the schedule,
logging and checkpoints at twice the rate of batches. Here only the generator's
step counts: the discriminator's optimizer is stepped with Lightning's step
counting hooks switched off (the workaround of Lightning issue #17958, as in
SimVQ's trainer). So `global_step` is the number of generator steps (batches
trained on), and `trainer.max_steps`, `discriminator_start`, `model.scheduler`
(one schedule for both optimisers, stepped once a batch), `log_every_n_steps`,
`val_check_interval` and the usage windows all count batches. A batch with a
non-finite loss counts as a step but updates nothing (`model.nonfinite`, see
`model.py`): both optimisers step with their updates masked on the device, and
the EMA of the weights stays where it was.

Logged beside the base model's terms: `perceptual_loss`, `adversarial_loss`
(the generator's, unweighted), `adaptive_weight` (training: 0 before
`discriminator_start`), `discriminator_loss`, and with a mel loss and feature
matching `mel_loss` and `feature_matching_loss` (unweighted). `{stage}/loss` is the objective
without the adversarial term in validation and test (its weight is adaptive and
the discriminator keeps changing), so that checkpoints compare like with like.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vqtrain.data.batch import Batch
from vqtrain.discriminators import Judgement
from vqtrain.ema import WeightEMA
from vqtrain.losses import check_kind, discriminator_loss, feature_matching_loss, generator_adversarial_loss
from vqtrain.model import NONFINITE, DiscreteAutoencoder, ModelOutput, StepResult
from vqtrain.utils import exists

log = logging.getLogger(__name__)

ADAPTIVE_WEIGHT_MAX = 1e4  # taming's clamp of the ratio


def uncounted(optimizer: Any) -> Any:
    """The LightningOptimizer with Lightning's step counting off for its next step."""
    optimizer._on_before_step = optimizer._on_after_step = lambda: None
    return optimizer


class AdversarialAutoencoder(DiscreteAutoencoder):
    """`DiscreteAutoencoder` plus a discriminator, an optional perceptual distance
    (`perceptual(x_hat, x) -> (B,)`, a fixed network), an optional mel distance
    (`mel(x_hat, x, lengths)`, as `losses.MultiScaleMelLoss`) and an EMA of the weights.

    Generator loss = reconstruction + perceptual_weight * perceptual + mel_weight * mel
                     + disc_weight * adaptive_weight * adversarial
                     + feature_matching_weight * feature_matching + quantizer terms,
    with the adversarial term and the discriminator's updates from batch
    `discriminator_start` on. adaptive_weight = ||grad_L nll|| / (||grad_L adv|| + 1e-4),
    clamped to [0, 1e4] and detached, L the decoder's last layer and nll the
    reconstruction + perceptual + mel terms (taming's `calculate_adaptive_weight`);
    1 with `adaptive_weight=false` (a fixed `disc_weight`, as SimVQ's recipe and
    DAC's). Feature matching (MelGAN's L1 between the discriminator's features of
    real and reconstructed signals) runs with the adversarial term, when its weight
    is > 0; it costs a discriminator pass over the real batch in the generator step."""

    def __init__(
        self,
        *args: Any,
        discriminator: nn.Module,
        discriminator_optimizer: Callable[..., torch.optim.Optimizer],
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        mel: nn.Module | None = None,
        mel_weight: float = 15.0,
        feature_matching_weight: float = 0.0,
        disc_weight: float = 0.8,
        adaptive_weight: bool = True,
        discriminator_start: int = 0,
        generator_loss: str = "hinge",
        discriminator_loss: str = "hinge",
        ema_decay: float | None = 0.9999,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        check_kind(generator_loss)
        check_kind(discriminator_loss)
        weights = {
            "perceptual_weight": perceptual_weight,
            "mel_weight": mel_weight,
            "disc_weight": disc_weight,
            "feature_matching_weight": feature_matching_weight,
        }
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"model.{', model.'.join(weights)} must be >= 0, got {weights}")
        if discriminator_start < 0:
            raise ValueError(f"model.discriminator_start must be >= 0, got {discriminator_start}")
        if adaptive_weight and not hasattr(self.decoder, "last_layer"):
            raise ValueError(
                f"model.adaptive_weight=true needs a decoder with `last_layer`; {type(self.decoder).__name__} has none"
            )
        self.automatic_optimization = False
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.perceptual = perceptual.requires_grad_(False).eval() if exists(perceptual) else None
        self.perceptual_weight, self.disc_weight = perceptual_weight, disc_weight
        self.mel, self.mel_weight = mel, mel_weight
        self.feature_matching_weight = feature_matching_weight
        self.adaptive = adaptive_weight
        self.discriminator_start = discriminator_start
        self.generator_loss, self.discriminator_loss = generator_loss, discriminator_loss
        # the EMA covers the trained weights of the autoencoder, named as in the state dict
        named = [
            (f"{prefix}.{name}", param)
            for prefix in ("encoder", "quantizer", "decoder")
            for name, param in getattr(self, prefix).named_parameters()
            if param.requires_grad
        ]
        self.ema_keys = [name for name, _ in named]
        self.ema = WeightEMA([param for _, param in named], ema_decay) if exists(ema_decay) else None
        self.inference_weights = False  # True once use_inference_weights() put the EMA in place for good

    # -- the objective ---------------------------------------------------------
    def discriminator_active(self) -> bool:
        return self.global_step >= self.discriminator_start

    def objective(self, batch: Batch, output: ModelOutput) -> tuple[Tensor, dict[str, Tensor]]:
        loss, terms = super().objective(batch, output)
        nll = terms["recon_loss"]
        if exists(self.perceptual):
            perceptual = self.perceptual(output.x_hat, batch.x).float().mean()
            terms["perceptual_loss"] = perceptual
            nll = nll + self.perceptual_weight * perceptual
            loss = loss + self.perceptual_weight * perceptual
        if exists(self.mel):
            mel = self.mel(output.x_hat, batch.x, batch.lengths)
            terms["mel_loss"] = mel
            nll = nll + self.mel_weight * mel
            loss = loss + self.mel_weight * mel
        if not self.training:  # validation, test: the adversarial terms are figures, not objectives
            fake, real = self.judge(output, batch, real=True)
            terms["adversarial_loss"] = generator_adversarial_loss(fake, self.generator_loss)
            terms["discriminator_loss"] = discriminator_loss(real, fake, self.discriminator_loss)
            if self.feature_matching_weight:
                terms["feature_matching_loss"] = feature_matching_loss(real, fake)
            return loss, terms
        if not self.discriminator_active():  # the discriminator is not even run
            terms["adaptive_weight"] = torch.zeros((), device=loss.device)
            return loss, terms
        fake, real = self.judge(output, batch, real=bool(self.feature_matching_weight))
        adversarial = generator_adversarial_loss(fake, self.generator_loss)
        weight = self.adaptive_weight(nll, adversarial) if self.adaptive else torch.ones((), device=loss.device)
        terms |= {"adversarial_loss": adversarial, "adaptive_weight": weight}
        loss = loss + self.disc_weight * weight * adversarial
        if self.feature_matching_weight:
            terms["feature_matching_loss"] = feature_matching_loss(real, fake)
            loss = loss + self.feature_matching_weight * terms["feature_matching_loss"]
        return loss, terms

    def judge(self, output: ModelOutput, batch: Batch, real: bool) -> tuple[list[Judgement], list[Judgement] | None]:
        """The discriminator's judgements of the reconstruction, and of the real batch if asked."""
        fake = self.discriminator(output.x_hat, batch.lengths)
        return fake, self.discriminator(batch.x, batch.lengths) if real else None

    def adaptive_weight(self, nll: Tensor, adversarial: Tensor) -> Tensor:
        """||grad nll|| / (||grad adversarial|| + 1e-4) at the decoder's last layer, in [0, 1e4], detached."""
        last = self.decoder.last_layer
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        adversarial_grad = torch.autograd.grad(adversarial, last, retain_graph=True)[0]
        ratio = nll_grad.float().norm() / (adversarial_grad.float().norm() + 1e-4)
        return ratio.clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()

    # -- a training step: the generator, then the discriminator --------------------
    def training_step(self, batch: Batch, batch_idx: int) -> None:
        generator_opt, discriminator_opt = self.optimizers()
        active = self.discriminator_active()  # read before the generator's step moves global_step on
        self.toggle_optimizer(generator_opt)  # no gradient reaches the discriminator's weights
        try:
            result = self.shared_step(batch, "train")
            self.training_bookkeeping(result)
            if result is None:  # no readable item: neither optimiser steps, the batch does not count
                return
            generator_opt.zero_grad(set_to_none=True)
            if self.mask_update(generator_opt, result.finite):
                self.manual_backward(result.loss)
            generator_opt.step()  # counts the batch; no update when masked or without gradients
        finally:
            self.untoggle_optimizer(generator_opt)
        if exists(self.ema):
            self.ema.update(result.finite)
        if active:
            self.discriminator_step(batch, result, discriminator_opt)
        self.step_schedules()

    def discriminator_step(self, batch: Batch, generator: StepResult, optimizer: Any) -> None:
        self.toggle_optimizer(optimizer)
        try:
            real = self.discriminator(batch.x, batch.lengths)
            fake = self.discriminator(generator.output.x_hat.detach(), batch.lengths)
            loss = discriminator_loss(real, fake, self.discriminator_loss)
            finite = self.finite_on_all_ranks(loss, batch, NONFINITE.index("discriminator loss"), generator.finite)
            optimizer.zero_grad(set_to_none=True)
            if self.mask_update(optimizer, finite):
                self.manual_backward(loss)
            uncounted(optimizer).step()
        finally:
            self.untoggle_optimizer(optimizer)
        if self.logging_step("train"):
            self.log("train/discriminator_loss", loss.detach(), on_step=True, batch_size=len(batch))

    def step_schedules(self) -> None:
        """Both schedules once a batch: at batch t both rates are the schedule's at t."""
        schedules = self.lr_schedulers()
        for schedule in schedules if isinstance(schedules, list) else [schedules] if schedules else []:
            with warnings.catch_warnings():  # the discriminator's schedule runs ahead of its first step
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                schedule.step()

    def configure_optimizers(self) -> Any:
        return (
            self.optimizer_config(self.optimizer_factory, self.autoencoder_parameters()),
            self.optimizer_config(self.discriminator_optimizer, list(self.discriminator.parameters())),
        )

    # -- the EMA weights: validation, test, inference --------------------------------
    def swap_ema(self, wanted: bool) -> None:
        """Put the EMA weights in the model (wanted) or the trained ones back."""
        if exists(self.ema) and not self.inference_weights and self.ema.swapped != wanted:
            self.ema.swap()

    def use_inference_weights(self) -> None:
        """For good: the EMA weights, what the tokenizer and evaluation use."""
        self.swap_ema(True)
        self.inference_weights = True

    def on_validation_epoch_start(self) -> None:
        self.swap_ema(True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.swap_ema(False)

    def on_test_epoch_start(self) -> None:
        self.swap_ema(True)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self.swap_ema(False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A checkpoint saved while the EMA weights are in the model (a stop signal
        during validation) still holds the trained weights as weights."""
        super().on_save_checkpoint(checkpoint)
        if exists(self.ema) and self.ema.swapped:
            state = checkpoint["state_dict"]
            for key, shadow in zip(self.ema_keys, self.ema.shadow_keys("ema.")):
                state[key], state[shadow] = state[shadow], state[key]
