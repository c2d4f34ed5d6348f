"""The VQGAN recipe (model=vqgan): the adversarial losses against hand-computed values,
the adaptive weight against its definition, the discriminator idle before its start,
step counting, stop-and-continue with two optimisers, the EMA weights where the
model is used, every quantizer. LPIPS is replaced by `helpers.RandomPerceptual`
(random weights: nothing is downloaded)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from helpers import QUANTIZERS, REPO, check_logging_decisions, column, read_metrics, run_cli
from vqtrain.config import InvalidConfig, compose
from vqtrain.data.batch import Batch
from vqtrain.discriminators import Judgement, PatchGAN
from vqtrain.evaluation import evaluate
from vqtrain.losses import discriminator_loss, feature_matching_loss, generator_adversarial_loss
from vqtrain.tokenizer import load_tokenizer
from vqtrain.train import train

PERCEPTUAL = "model.perceptual._target_=helpers.RandomPerceptual"
TINY = [
    "experiment=vqgan_tiny",
    PERCEPTUAL,
    "model.latent_dim=8",
    "model.encoder.channels=8",
    "model.encoder.ch_mult=[1,2]",
    "model.encoder.norm_groups=4",
    "model.discriminator.channels=8",
    "model.usage_window=3",
    "data.num_train=32",
    "data.num_val=8",
    "data.num_test=8",
    "data.batch_size=8",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.reconstructions=null",
]
TERMS = ["loss", "recon_loss", "perceptual_loss", "adversarial_loss", "discriminator_loss", "commitment_loss"]


@pytest.fixture(autouse=True)
def restore_determinism() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(enabled)


def judgement(logits: list[float], mask: list[bool] | None = None, features: list[list[float]] = ()) -> Judgement:
    as_map = lambda values: torch.tensor(values).view(1, 1, -1)  # (B=1, C=1, T)
    return Judgement(as_map(logits), [as_map(f) for f in features], None if mask is None else torch.tensor([mask]))


# --- the losses -------------------------------------------------------------------


def test_adversarial_losses_equal_hand_computed_values_over_real_positions():
    """Logits at padded positions (mask False) are 100: any that leaked in would show."""
    real = [judgement([2.0, 0.5, 100.0], [True, True, False]), judgement([-1.0])]
    fake = [judgement([-3.0, 0.0, 100.0], [True, True, False]), judgement([1.0])]
    # hinge: sub 0: relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; relu(1-3)=0, relu(1+0)=1 -> 0.5; 0.5 (0.25 + 0.5) = 0.375
    #        sub 1: relu(1+1)=2; relu(1+1)=2; 0.5 (2 + 2) = 2;  mean 1.1875
    assert discriminator_loss(real, fake, "hinge").item() == pytest.approx(1.1875)
    sp = lambda v: torch.nn.functional.softplus(torch.tensor(v)).item()
    expected = (0.5 * ((sp(-2.0) + sp(-0.5)) / 2 + (sp(-3.0) + sp(0.0)) / 2) + 0.5 * (sp(1.0) + sp(1.0))) / 2
    assert discriminator_loss(real, fake, "non_saturating").item() == pytest.approx(expected)
    # generator, hinge: -mean fake: sub 0: 1.5, sub 1: -1 -> 0.25; non-saturating: softplus(-fake)
    assert generator_adversarial_loss(fake, "hinge").item() == pytest.approx(0.25)
    expected = ((sp(3.0) + sp(0.0)) / 2 + sp(-1.0)) / 2
    assert generator_adversarial_loss(fake, "non_saturating").item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="hinge"):
        generator_adversarial_loss(fake, "wasserstein")


def test_feature_matching_is_l1_over_real_positions_mean_over_layers_then_subs_with_real_detached():
    real_feature = torch.tensor([[[1.0, 2.0, 50.0]]], requires_grad=True)
    real = [
        Judgement(
            torch.zeros(1, 1, 3), [real_feature, torch.tensor([[[0.0, 0.0, 9.0]]])], torch.tensor([[1, 1, 0]]).bool()
        ),
        judgement([0.0], features=[[4.0]]),
    ]
    fake = [
        judgement([0.0, 0.0, 0.0], [True, True, False], [[0.0, 0.0, -7.0], [1.0, 3.0, 5.0]]),
        judgement([0.0], features=[[1.0]]),
    ]
    # sub 0: layer 0: (1 + 2) / 2 = 1.5, layer 1: (1 + 3) / 2 = 2 -> 1.75; sub 1: 3; mean 2.375
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx(2.375)
    with pytest.raises(RuntimeError):  # nothing reaches the real features
        torch.autograd.grad(loss, real_feature)


def test_patchgan_gives_one_judgement_of_patch_logits_and_its_features():
    (verdict,) = PatchGAN(in_channels=3, channels=8, num_layers=3)(torch.randn(2, 3, 64, 64))
    assert verdict.mask is None and verdict.logits.shape == (2, 1, 6, 6)  # taming's 30 x 30 at 256 px, scaled
    assert [f.shape[1] for f in verdict.features] == [8, 16, 32, 64]
    with pytest.raises(ValueError, match="model.discriminator.norm"):
        PatchGAN(norm="layer")


# --- the model ----------------------------------------------------------------------


def tiny_model(tmp_path: Path, *overrides: str):
    cfg = compose([*TINY, *overrides], tmp_path)
    torch.manual_seed(0)
    return instantiate(cfg.model), cfg


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_decoders_last_layer(tmp_path: Path):
    model, _ = tiny_model(tmp_path, "quantizer=fsq", "model.discriminator_start=0", "model.perceptual_weight=0.5")
    model.train()
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    batch = Batch(x=x, index=torch.arange(4), skipped=torch.zeros((), dtype=torch.long))
    loss, terms = model.objective(batch, model(x))

    # by hand, from fresh forward passes (same weights; train-mode BatchNorm on the same batch)
    last = model.decoder.conv_out.weight
    x_hat = model(x).x_hat
    nll = (x_hat - x).abs().mean() + 0.5 * model.perceptual(x_hat, x).mean()
    (nll_grad,) = torch.autograd.grad(nll, last)
    x_hat = model(x).x_hat
    (adversarial_grad,) = torch.autograd.grad(-model.discriminator(x_hat)[0].logits.mean(), last)
    expected = nll_grad.norm() / (adversarial_grad.norm() + 1e-4)
    assert terms["adaptive_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert not terms["adaptive_weight"].requires_grad
    expected_loss = (
        terms["recon_loss"] + 0.5 * terms["perceptual_loss"] + model.disc_weight * expected * terms["adversarial_loss"]
    )
    expected_loss = expected_loss + model.quantizer(model.encode(x)[0]).loss
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_discriminator_untouched_before_its_start_step(tmp_path: Path):
    """Three steps with the start at step 3: weights, BatchNorm statistics and optimizer
    state of the discriminator are as initialised; the adaptive weight logged 0."""
    model, _ = tiny_model(tmp_path / "init", "model.discriminator_start=3")
    initial = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    train(compose([*TINY, "model.discriminator_start=3", "trainer.max_steps=3", "test=false"], tmp_path / "run"))
    checkpoint = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 3
    state = {
        k.removeprefix("discriminator."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("discriminator.")
    }
    assert state.keys() == initial.keys() and all(torch.equal(state[k], initial[k]) for k in initial)
    assert checkpoint["optimizer_states"][1]["state"] == {}
    assert checkpoint["optimizer_states"][0]["state"]  # the generator did step
    rows = read_metrics(tmp_path / "run")
    assert column(rows, "train/adaptive_weight") == [0.0, 0.0, 0.0]
    assert not column(rows, "train/discriminator_loss")


def test_clipping_and_accumulation_are_refused_before_anything_runs(tmp_path: Path):
    """Lightning refused them from inside fit, a traceback; now one InvalidConfig naming both keys."""
    overrides = ["trainer.gradient_clip_val=1.0", "+trainer.accumulate_grad_batches=2"]
    with pytest.raises(
        InvalidConfig, match=r"^trainer.gradient_clip_val=1.0, trainer.accumulate_grad_batches=2: .*manual optimization"
    ):
        train(compose([*TINY, *overrides], tmp_path))
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.csv"))


def test_vqgan_tiny_trains_from_the_cli_logging_every_term_and_counting_generator_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    result = run_cli(
        *TINY, "model.discriminator_start=2", "trainer.max_steps=6", "trainer.val_check_interval=3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    rows = read_metrics(run_dir)
    for stage in ("train", "val", "test"):
        for term in TERMS:
            assert column(rows, f"{stage}/{term}"), f"{stage}/{term}"
    assert len(column(rows, "train/discriminator_loss")) == 4  # steps 2-5
    assert (
        column(rows, "train/adaptive_weight")[:2] == [0.0, 0.0] and min(column(rows, "train/adaptive_weight")[2:]) > 0
    )
    checkpoint = torch.load(run_dir / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6  # generator steps: the discriminator's 4 do not count
    assert [int(s["state"][0]["step"]) for s in checkpoint["optimizer_states"]] == [6, 4]


def fit(run_dir: Path, steps: int, *overrides: str) -> None:
    train(
        compose([*TINY, "trainer.deterministic=true", "test=false", f"trainer.max_steps={steps}", *overrides], run_dir)
    )


def test_stop_and_continue_with_two_optimisers_equals_the_run_never_stopped(tmp_path: Path):
    """Stopped mid-epoch (4 batches an epoch) after the discriminator started and a
    validation, continued to 10: weights of both nets, BatchNorm statistics, the EMA,
    both optimizer states and both schedules equal the uninterrupted run's, bitwise."""
    overrides = [
        "model.discriminator_start=3",
        "model.scheduler.warmup_steps=2",
        "model.scheduler.min_lr_ratio=0.1",
        "model.scheduler.total_steps=10",
        "trainer.val_check_interval=6",
    ]
    fit(tmp_path / "whole", 10, *overrides)
    fit(tmp_path / "first", 6, *overrides)
    fit(tmp_path / "second", 10, *overrides, f"ckpt_path={tmp_path / 'first' / 'last.ckpt'}")
    whole, resumed = (torch.load(tmp_path / run / "last.ckpt", weights_only=True) for run in ("whole", "second"))
    assert whole["global_step"] == resumed["global_step"] == 10
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    for key in ("discriminator.blocks.1.1.running_mean", "ema.shadow0", "ema.num_updates", "decoder.conv_out.weight"):
        assert key in whole["state_dict"], key
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    assert whole["lr_schedulers"] == resumed["lr_schedulers"] and len(whole["lr_schedulers"]) == 2
    assert len(whole["optimizer_states"]) == 2
    for a, b in zip(whole["optimizer_states"], resumed["optimizer_states"]):
        assert a["param_groups"] == b["param_groups"]
        for x, y in zip(a["state"].values(), b["state"].values()):
            assert all(torch.equal(x[k], y[k]) for k in x)
    rows = lambda run: [
        (r["step"], r["train/loss"], r["train/discriminator_loss"])
        for r in read_metrics(tmp_path / run)
        if r["train/loss"] and int(r["step"]) >= 6
    ]
    assert rows("second") == rows("whole") and len(rows("whole")) == 4


def test_validation_test_tokenizer_and_evaluation_use_the_ema_weights(tmp_path: Path):
    fit(tmp_path / "run", 4, "model.discriminator_start=2", "model.ema_decay=0.5", "trainer.val_check_interval=4")
    checkpoint = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    tokenizer = load_tokenizer(tmp_path / "run" / "last.ckpt")
    model = tokenizer.model
    for i, key in enumerate(model.ema_keys):  # the tokenizer's weights are the EMA's, not the trained ones
        assert torch.equal(model.state_dict()[key], state[f"ema.shadow{i}"]), key
    assert not torch.equal(state["decoder.conv_out.weight"], model.decoder.conv_out.weight)

    cfg = compose([*TINY], tmp_path / "probe")
    ema_figures = evaluate(tokenizer, cfg, "val")  # scripts/eval.py's path
    trained, _ = tiny_model(tmp_path / "trained")
    trained.load_state_dict(state)  # trained weights in place: the test loop must swap the EMA in
    tokenizer.model = trained
    assert evaluate(tokenizer, cfg, "val")["recon_loss"] == ema_figures["recon_loss"]
    trained.ema = None  # no EMA: the trained weights themselves score otherwise
    assert evaluate(tokenizer, cfg, "val")["recon_loss"] != ema_figures["recon_loss"]
    # validation during training logged the EMA's figure (the last one, at step 4, on the same batch)
    assert column(read_metrics(tmp_path / "run"), "val/recon_loss")[-1] == pytest.approx(
        ema_figures["recon_loss"], rel=1e-6
    )


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_every_quantizer_trains_in_the_vqgan_recipe(quantizer: str, tmp_path: Path):
    train(
        compose(
            [
                *TINY,
                f"quantizer={quantizer}",
                "model.discriminator_start=1",
                "trainer.max_steps=2",
                "trainer.limit_val_batches=0",
                "test=false",
            ],
            tmp_path,
        )
    )
    rows = read_metrics(tmp_path)
    assert len(column(rows, "train/discriminator_loss")) == 1
    assert len(losses := column(rows, "train/loss")) == 2 and all(map(math.isfinite, losses))


def test_simvq_imagenet_composes_to_simvqs_published_recipe(tmp_path: Path):
    """The values of SimVQ's configs/imagenet_simvq_128_B.yaml (see the config's comments)."""
    cfg = compose(["experiment=simvq_imagenet", "data.root=/data/imagenet"], tmp_path)
    model, encoder = cfg.model, cfg.model.encoder
    assert (cfg.data.image_size, cfg.data.batch_size, model.latent_dim, encoder.channels) == (128, 64, 128, 128)
    assert (list(encoder.ch_mult), encoder.num_res_blocks, encoder.attention) == ([1, 2, 2, 4], 2, False)
    assert model.decoder.upsample == "depth_to_space" and model.reconstruction.distance == "l1"
    assert (cfg.quantizer._target_, cfg.quantizer.codebook_size, cfg.quantizer.commitment_weight) == (
        "vqtrain.quantizers.SimVQ",
        1024,
        0.25,
    )
    assert (model.generator_loss, model.discriminator_loss, model.adaptive_weight, model.disc_weight) == (
        "non_saturating",
        "hinge",
        False,
        0.1,
    )
    for optimizer in (cfg.optimizer, model.discriminator_optimizer):
        assert (optimizer.lr, list(optimizer.betas)) == (1e-4, [0.5, 0.9])
    assert (model.discriminator_start, model.ema_decay, cfg.trainer.precision) == (0, 0.9999, "16-mixed")
    assert cfg.trainer.strategy.find_unused_parameters
    model_cfg = compose(["experiment=simvq_imagenet", "data.root=/data/imagenet", PERCEPTUAL], tmp_path)
    net = instantiate(model_cfg.model.encoder)
    assert net.stride == 8  # 128 px -> 16 x 16 tokens


def test_logging_steps_are_the_ones_lightning_writes(tmp_path: Path):
    """As for the base model (test_train.py), with two optimisers stepped by hand and the
    discriminator's figures logged after the generator's step has moved global_step on."""
    decisions = ["+callbacks.decisions._target_=helpers.LoggingDecisions", "+callbacks.decisions.nonfinite=3"]
    overrides = ["model.discriminator_start=1", "trainer.max_steps=6", "trainer.log_every_n_steps=2", "test=false"]
    train(compose([*TINY, *overrides, "model.nonfinite=skip", *decisions], tmp_path))
    # the skipped batch steps both optimisers with their updates masked on the device: it counts
    assert check_logging_decisions(tmp_path, every=2) == (6, 6)
