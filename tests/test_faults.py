"""Bad configs, bad data, non-finite numbers, kills and stop signals: each ends in
a clear error, a counted skip or a run that can continue, never a silent wrong result."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from helpers import column, global_step, read_metrics, run_cli
from vqtrain.callbacks import forward_sigusr1
from vqtrain.checkpoints import CONFIG_KEY, AtomicCheckpointIO, resumable, resume_path
from vqtrain.config import InvalidConfig, MissingPath, compose
from vqtrain.data.audio import AudioFolder
from vqtrain.data.batch import Batch
from vqtrain.data.images import TensorImages
from vqtrain.train import train

REPO = Path(__file__).resolve().parents[1]
FAST = ["debug=tiny", "trainer.max_steps=4", "trainer.val_check_interval=2", "test=false", "quantizer.codebook_size=64"]
SHAPES = ["data.num_train=32", "data.num_val=16", "data.num_test=16", "data.batch_size=16"]


# --- configs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["quantizer=fsq", "quantizer.codebook_size=null", "quantizer.levels=[1,4]"],
            "FSQ levels must be a non-empty list of integers >= 2",
        ),
        (
            ["quantizer=fsq", "quantizer.codebook_size=null", "quantizer.levels=[]"],
            "FSQ levels must be a non-empty list of integers >= 2",
        ),
        (["quantizer.codebook_size=0"], "codebook_size must be an integer >= 1, got 0"),
        (["quantizer.decay=1.0"], "decay must lie in the open interval (0, 1), got 1.0"),
        (["quantizer=rvq", "quantizer.quantizer.decay=0"], "decay must lie in the open interval (0, 1), got 0"),
        (["quantizer.commitment_weight=-0.5"], "commitment_weight must be a finite number >= 0, got -0.5"),
        (["model.latent_dim=32", "model.encoder.out_channels=16"], "latent dims must all equal model.latent_dim=32"),
        (
            ["data=fsdd", "data.root={tmp}", "model.latent_dim=32", "quantizer.dim=8"],
            "latent dims must all equal model.latent_dim=32",
        ),
    ],
)
def test_invalid_model_settings_fail_at_start_naming_the_key(overrides: list[str], message: str, tmp_path: Path):
    overrides = [o.format(tmp=tmp_path) for o in overrides]  # an existing data folder: the model is what is wrong
    with pytest.raises(Exception, match=re.escape(message)) as error:
        train(compose([*FAST, *overrides], tmp_path / "run"))
    assert "full_key: model" in str(error.value)  # Hydra adds where in the config the failing object lives
    assert not (tmp_path / "run").exists()  # nothing was trained or written


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.lr=0", "optimizer.lr=0 (must be a finite number > 0)"),
        ("model.scheduler.min_lr_ratio=-0.5", "model.scheduler.min_lr_ratio=-0.5 (must be a number in [0, 1])"),
        ("model.scheduler.warmup_steps=-1", "model.scheduler.warmup_steps=-1 (must be an integer >= 0)"),
        ("trainer.max_steps=0", "trainer.max_steps=0 (must be -1 (no limit) or an integer >= 1)"),
        ("trainer.max_steps=2.5", "trainer.max_steps=2.5 (must be -1 (no limit) or an integer >= 1)"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1 (must be null or a finite number >= 0)"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 (must be an integer >= 1"),
        ("trainer.val_check_interval=0.5", "val_check_interval=0.5 (a fraction of an epoch needs trainer.check_val_"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0 (must be an integer >= 1)"),
        ("seed=-1", "seed=-1 (must be null or an integer in [0, 2^32))"),
        ("data.image_size=30", "data.image_size=30 (must be divisible by 2^model.encoder.num_downsamples = 4)"),
        # trains, then fails at its first validation, before any checkpoint
        ("data.image_size=8", "data.image_size=8 (callbacks.signal_quality.metrics: ssim needs images of at least 11"),
    ],
)
def test_settings_that_would_silently_misbehave_are_refused(override: str, message: str, tmp_path: Path):
    """Lightning and torch accept these: lr 0 or a negative clip value trains nothing or backwards."""
    with pytest.raises(ValueError, match=re.escape(message)):
        train(compose([*FAST, override], tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_optimizer_without_decoupled_weight_decay_is_refused_for_simvqs_decayed_map(tmp_path: Path):
    """Adagrad would take the quantizer's decoupled decay of W as an L2 term, a
    different update: refused before the first step, not trained differently."""
    with pytest.raises(ValueError, match="optimizer: Adagrad has no decoupled weight decay"):
        train(compose([*FAST, "quantizer=simvq_audio", "optimizer=adagrad"], tmp_path / "run"))
    assert not list((tmp_path / "run").glob("*.ckpt"))


def test_every_offending_key_is_named_at_once(tmp_path: Path):
    with pytest.raises(ValueError, match=r"optimizer\.lr=-1 .*; trainer\.max_steps='many'"):
        train(compose([*FAST, "optimizer.lr=-1", "trainer.max_steps=many"], tmp_path))


def test_cli_refuses_a_bad_config_naming_the_key(tmp_path: Path):
    env = {**os.environ, "WANDB_MODE": "offline", "VQTRAIN_ROOT": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "quantizer.codebook_size=0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # one line, as the scripts (encode, decode, eval) print it too: the constructor's message and where it lives
    assert (
        result.stderr.splitlines()[-1]
        == "error: codebook_size must be an integer >= 1, got 0 (full_key: model.quantizer)"
    )
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("full_error", [False, True])
def test_cli_prints_a_missing_data_folder_as_one_line(full_error: bool, tmp_path: Path):
    """`error: <key>: ...` and a non-zero exit, no traceback; HYDRA_FULL_ERROR=1 still shows it."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "VQTRAIN_ROOT": str(tmp_path),
        "HYDRA_FULL_ERROR": "1" if full_error else "0",
    }
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "data=image_folder", f"data.root={missing}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = f"data.root: no folder {missing} (expected a folder tree of images)"
    assert result.returncode == 1
    if full_error:
        assert (
            "Traceback" in result.stderr and result.stderr.splitlines()[-1] == f"vqtrain.config.MissingPath: {message}"
        )
    else:
        assert result.stderr.splitlines()[-1] == f"error: {message}"
        assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr


# --- data -----------------------------------------------------------------------

RATE = 8000
BAD_FILES = ["bad/empty.wav", "bad/random.wav", "bad/text.flac", "bad/truncated.wav"]


@pytest.fixture
def audio_root(tmp_path: Path) -> Path:
    """Eight 50 ms clips (clip0 lands in train, clip1 in val with val_fraction=0.3) and four unusable files."""
    root = tmp_path / "audio"
    (root / "bad").mkdir(parents=True)
    t = np.arange(RATE // 20) / RATE
    for i in range(8):
        sf.write(root / f"clip{i}.wav", (0.5 * np.sin(2 * np.pi * 220 * (i + 1) * t)).astype(np.float32), RATE)
    (root / "bad" / "empty.wav").write_bytes(b"")
    (root / "bad" / "random.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "bad" / "text.flac").write_text("not audio")
    whole = (root / "clip1.wav").read_bytes()
    (root / "bad" / "truncated.wav").write_bytes(whole[: len(whole) // 2])
    (root / "notes.txt").write_text("ignored: not an audio extension")
    return root


def audio_run(root: Path, cache: Path, *overrides: str) -> list[str]:
    return [
        "data=audio_folder",
        f"data.root={root}",
        f"data.cache_dir={cache}",
        f"data.sample_rate={RATE}",
        "data.max_length=0.05",
        "data.batch_size=8",
        "data.split.val_fraction=0.3",
        *FAST,
        *overrides,
    ]


def break_keeping_size_and_mtime(path: Path) -> None:
    """Unreadable now, yet unchanged for the header cache: it fails at load time, not at the scan."""
    stat = path.stat()
    path.write_bytes(bytes(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_bad_audio_is_skipped_counted_and_logged(audio_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cache = tmp_path / "cache"
    AudioFolder(audio_root, RATE, cache_dir=cache)  # the scan, cached
    break_keeping_size_and_mtime(audio_root / "clip0.wav")
    run_dir = tmp_path / "run"
    train(compose(audio_run(audio_root, cache), run_dir))
    rows = read_metrics(run_dir)
    assert column(rows, "data/skipped_files") == [len(BAD_FILES)]  # left out at the scan
    assert column(rows, "data/skipped_items")[-1] == 4  # clip0 is in the one training batch of each of the 4 steps
    assert all(np.isfinite(column(rows, "train/loss")))
    for name in BAD_FILES + ["clip0.wav"]:
        assert name in caplog.text


def test_strict_data_turns_a_skip_into_an_error_naming_the_file(audio_root: Path, tmp_path: Path):
    with pytest.raises(RuntimeError, match=r"data\.strict=true and 3 audio files are unusable: .*bad/empty\.wav"):
        train(compose(audio_run(audio_root, tmp_path / "cache", "data.strict=true"), tmp_path / "run"))


@pytest.mark.parametrize(
    "data, message",
    [
        (
            "audio_folder",
            r"no folder {root} \(expected a folder tree of \.wav/\.flac/\.ogg/\.opus/\.mp3/\.aiff/\.aif files",
        ),
        ("image_folder", r"no folder {root} \(expected a folder tree of images\)"),
    ],
)
@pytest.mark.parametrize("empty", [False, True])
def test_missing_or_empty_data_folder_names_the_path_and_what_was_expected(
    data: str, message: str, empty: bool, tmp_path: Path
):
    root = tmp_path / "data"
    if empty:
        root.mkdir()
        (root / "readme.txt").write_text("nothing usable here")
        message = {
            "audio_folder": r"no audio files under {root} \(expected a folder tree of \.wav",
            "image_folder": r"no images with extensions .* under {root}",
        }[data]
    overrides = [*FAST, f"data={data}", f"data.root={root}"] + (
        [f"data.cache_dir={tmp_path}"] if data == "audio_folder" else []
    )
    with pytest.raises(MissingPath, match="^data.root: " + message.format(root=re.escape(str(root)))):
        train(compose(overrides, tmp_path / "run"))  # a StartupError: one line from the CLI, not a traceback


MNIST_LABEL_FILES = ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data=image_folder", "data.root={missing}"],
            "data.root: no folder {missing} (expected a folder tree of images)",
        ),
        (
            ["data=audio_folder", "data.root={missing}"],
            "data.root: no folder {missing} (expected a folder tree of .wav/",
        ),
        (
            ["data=mnist", "data.root={missing}"],
            "data.root: no folder {missing}/MNIST/raw (expected the IDX image files",
        ),
        (
            ["data=mnist", "data.root={labels_only}"],
            "data.root: no file {labels_only}/MNIST/raw/train-images-idx3-ubyte (expected",
        ),
        (
            ["data=cifar10", "data.root={missing}"],
            "data.root: no folder {missing}/cifar-10-batches-py (expected the extracted",
        ),
        (
            ["ckpt_path={missing}/last.ckpt"],
            "ckpt_path: no file {missing}/last.ckpt (expected a checkpoint to resume from)",
        ),
    ],
)
def test_missing_paths_are_refused_before_the_model_or_trainer_exist(
    overrides: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Found at start-up, not in `fit` after the model and trainer were built; labels_only:
    MNIST's label files without its image files."""
    paths = {"missing": tmp_path / "missing", "labels_only": tmp_path / "labels_only"}
    (paths["labels_only"] / "MNIST" / "raw").mkdir(parents=True)
    for name in MNIST_LABEL_FILES:
        (paths["labels_only"] / "MNIST" / "raw" / f"{name}.gz").write_bytes(b"")
    cfg = compose([*FAST, *(override.format(**paths) for override in overrides)], tmp_path / "run")
    built = []
    monkeypatch.setattr(
        "vqtrain.train.instantiate", lambda node, **kwargs: built.append(node._target_) or instantiate(node, **kwargs)
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message.format(**paths))):
        train(cfg)
    assert built == [cfg.data._target_]


# --- numerics ---------------------------------------------------------------------


@pytest.fixture
def poisoned_training_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training image 0 (of the 32) holds a NaN pixel."""
    original = TensorImages.__getitem__

    def getitem(self: TensorImages, index: int) -> dict:
        item = original(self, index)
        if index == 0 and len(self) == 32:
            item["x"] = item["x"].clone()
            item["x"][0, 0, 0] = float("nan")
        return item

    monkeypatch.setattr(TensorImages, "__getitem__", getitem)


def test_nonfinite_input_stops_the_run_naming_the_step_and_the_tensor(poisoned_training_image, tmp_path: Path):
    with pytest.raises(FloatingPointError, match=r"non-finite input batch\.x at step [01] \(model\.nonfinite=skip"):
        train(compose([*FAST, *SHAPES], tmp_path))


def test_nonfinite_input_is_skipped_and_counted_with_policy_skip(poisoned_training_image, tmp_path: Path):
    train(compose([*FAST, *SHAPES, "model.nonfinite=skip"], tmp_path))
    rows = read_metrics(tmp_path)
    assert column(rows, "train/skipped_steps")[-1] == 2  # two epochs of two batches, one poisoned batch each
    assert all(np.isfinite(column(rows, "train/loss") + column(rows, "val/loss")))
    model = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in model.values() if v.is_floating_point())


def test_a_validation_with_every_batch_skipped_says_the_model_diverged(tmp_path: Path):
    """A diverged model (lr 1e30) under nonfinite=skip: its first validation has no
    finite batch, no loss to log and no best checkpoint to choose; it says so."""
    overrides = ["optimizer.lr=1e30", "quantizer=fsq", "quantizer.codebook_size=256", "model.nonfinite=skip"]
    with pytest.raises(
        FloatingPointError, match=r"validation at step 2: no batch gave a loss, every one was non-finite"
    ):
        train(compose([*FAST, *SHAPES, *overrides], tmp_path))


class NaNLoss(nn.Module):
    def forward(self, x_hat: torch.Tensor, x: torch.Tensor, *masks: torch.Tensor | None) -> torch.Tensor:
        return (x_hat - x).mean() * float("nan")


def test_nonfinite_loss_names_the_step_or_is_skipped(tmp_path: Path):
    """Decided on the device, reported on the host at the next logging step: the first
    non-finite step is raised naming the step and the tensor, or counted and logged."""
    model = instantiate(compose([*FAST], tmp_path).model).train()
    model.reconstruction = NaNLoss()
    batch = Batch(x=torch.randn(2, 1, 32, 32), index=torch.arange(2), skipped=torch.tensor(0))
    assert not bool(model.shared_step(batch, "train").finite)
    with pytest.raises(FloatingPointError, match=r"non-finite train loss at step 0 \(model\.nonfinite=skip"):
        model.report_nonfinite()
    model.nonfinite = "skip"
    model.report_nonfinite()
    assert int(model.skipped_steps) == 1 and int(model.nonfinite_step) == -1  # reported: the record is cleared
    assert model.train_usage.counts.sum() == 0  # a non-finite step's codes are not counted


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_a_masked_update_changes_nothing(optimizer: str, tmp_path: Path):
    """`mask_update` skips a fused optimizer's step on the device: parameters and state stay bitwise."""
    model = instantiate(compose([*FAST, f"optimizer={optimizer}"], tmp_path).model).train()
    opt = model.optimizer_factory(list(model.parameters()))
    batch = Batch(x=torch.randn(2, 1, 32, 32), index=torch.arange(2), skipped=torch.tensor(0))
    for finite in (True, False):
        before = [p.detach().clone() for p in model.parameters()]
        state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()}
        result = model.shared_step(batch, "train")
        opt.zero_grad()
        assert model.mask_update(opt, torch.tensor(finite))
        (result.loss * (1.0 if finite else float("nan"))).backward()
        opt.step()
        changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
        assert any(changed) if finite else not any(changed)
        if not finite:
            assert all(torch.equal(state[k][n], t) for k, v in opt.state.items() for n, t in v.items())


def test_an_optimizer_without_found_inf_is_told_on_the_host(tmp_path: Path):
    model = instantiate(compose([*FAST, "optimizer=adagrad"], tmp_path).model).train()
    opt = model.optimizer_factory(list(model.parameters()))
    assert model.mask_update(opt, torch.tensor(True)) and not model.mask_update(opt, torch.tensor(False))


def audio_model(tmp_path: Path, *overrides: str):
    return instantiate(compose(["data=fsdd", "quantizer=vq_tricks", *FAST, *overrides], tmp_path).model).train()


def test_all_padding_batch_gives_zero_losses_and_leaves_the_codebook_alone(tmp_path: Path):
    model = audio_model(tmp_path)
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    batch = Batch(
        x=torch.zeros(2, 1, 400),
        index=torch.arange(2),
        skipped=torch.tensor(0),
        mask=torch.zeros(2, 400, dtype=torch.bool),
        lengths=torch.zeros(2, dtype=torch.long),
    )
    loss = model.shared_step(batch, "train").loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
    after = model.quantizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no EMA step, k-means init or restart
    assert not bool(model.quantizer.initted) and model.train_usage.counts.sum() == 0


def test_kmeans_init_with_fewer_real_vectors_than_codes(tmp_path: Path):
    """5 real latent positions for 64 codes: each real vector becomes one code, the
    other 59 keep their initial values, and no two codes are identical (search.kmeans)."""
    model = audio_model(tmp_path)
    lengths = torch.tensor([64, 96])  # latents at stride 32: 2 + 3 real positions
    mask = torch.arange(96) < lengths[:, None]
    batch = Batch(
        x=torch.randn(2, 1, 96) * mask[:, None],
        index=torch.arange(2),
        skipped=torch.tensor(0),
        mask=mask,
        lengths=lengths,
    )
    with torch.no_grad():
        z, latent_mask, _ = model.encode(batch.x, mask)
    real = z[latent_mask]
    assert len(real) == 5
    start = model.quantizer.embed[0].clone()
    loss = model.shared_step(batch, "train").loss
    codes = model.quantizer.embed[0]
    assert bool(model.quantizer.initted) and torch.isfinite(loss)
    on_real = (codes[:, None] - real[None]).norm(dim=-1) < 1e-4  # EMA smoothing may shift a code by rounding
    assert on_real.sum(0).tolist() == [1] * 5, "every real vector has its own code"
    # the surplus codes keep their init (moved only by the EMA's Laplace smoothing)
    torch.testing.assert_close(codes[~on_real.any(1)], start[~on_real.any(1)], rtol=1e-2, atol=1e-6)
    assert codes.unique(dim=0).shape[0] == codes.shape[0]


# --- runs: atomic checkpoints, signals, resume --------------------------------------


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    checkpoint_io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 1, "weights": torch.ones(10_000)}, path)
    save = torch.save

    def killed_mid_write(obj, file) -> None:
        buffer = io.BytesIO()
        save(obj, buffer)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
        assert Path(file.name).parent == tmp_path and Path(file.name) != path
        assert checkpoint_io.load_checkpoint(path)["global_step"] == 1  # meanwhile, the old one is whole
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_io.save_checkpoint({"global_step": 2, "weights": torch.zeros(10_000)}, path)
    assert checkpoint_io.load_checkpoint(path)["global_step"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no half-written file left behind
    monkeypatch.setattr(torch, "save", save)
    checkpoint_io.save_checkpoint({"global_step": 3}, path)
    assert checkpoint_io.load_checkpoint(path)["global_step"] == 3


def test_checkpoints_are_atomic_by_default(tmp_path: Path):
    trainer = instantiate(compose(FAST, tmp_path).trainer)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_resume_auto_tries_the_newest_checkpoint_first(tmp_path: Path):
    """Those written to continue from first, newest first; then the best validation's."""
    cfg = OmegaConf.create({"ckpt_path": None, "resume": "auto", "paths": {"output_dir": str(tmp_path)}})
    assert resume_path(cfg) is None
    for age, name in enumerate(["step0000009.ckpt", "hpc_ckpt_2.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt"]):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, ns=(0, 10**9 * (10 - age)))
    order = ["hpc_ckpt_2.ckpt", "last.ckpt", "hpc_ckpt_1.ckpt", "step0000009.ckpt"]  # hpc: SLURM's requeue signal
    assert [path.name for path in resumable(tmp_path)] == order
    os.utime(tmp_path / "last.ckpt", ns=(0, 10**9 * 11))
    assert [path.name for path in resumable(tmp_path)][:2] == ["last.ckpt", "hpc_ckpt_2.ckpt"]
    with pytest.raises(InvalidConfig, match=r"resume=never: .* holds checkpoints \(last.ckpt, hpc_ckpt_2.ckpt, "):
        resume_path(OmegaConf.merge(cfg, {"resume": "never"}))  # a fresh run would save over them
    elsewhere = {"resume": "never", "paths": {"output_dir": str(tmp_path / "new")}}
    assert resume_path(OmegaConf.merge(cfg, elsewhere)) is None
    with pytest.raises(ValueError, match="resume must be 'auto' or 'never', got 'yes'"):
        resume_path(OmegaConf.merge(cfg, {"resume": "yes"}))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """A CLI run on the shapes data sent SIGTERM once its first checkpoint (step 2) is on disk."""
    root = tmp_path_factory.mktemp("stopped")
    run_dir = root / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "VQTRAIN_ROOT": str(root)}
    command = [
        sys.executable,
        str(REPO / "train.py"),
        f"hydra.run.dir={run_dir}",
        *FAST,
        *SHAPES,
        "trainer.max_steps=100000",
    ]
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not list(run_dir.glob("step*.ckpt")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, output), run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def test_sigterm_saves_last_checkpoint_and_exits_cleanly(stopped_run):
    result, run_dir = stopped_run
    assert result.returncode == 0, result.stdout[-3000:]
    step = global_step(run_dir / "last.ckpt")
    assert step >= 2
    assert f"saved {run_dir / 'last.ckpt'} at step {step}" in result.stdout
    assert not list(run_dir.glob(".*.tmp"))


def test_resume_auto_continues_from_the_saved_step_and_keeps_the_metrics(stopped_run, tmp_path: Path):
    """In a moved copy of the run directory, as the same directory would be resumed."""
    run_dir = copy_of(stopped_run[1], tmp_path)
    step = global_step(run_dir / "last.ckpt")
    logged = read_metrics(run_dir)
    cfg = compose([*FAST, *SHAPES, f"trainer.max_steps={step + 2}"], run_dir)
    train(cfg)
    assert global_step(Path(resume_path(cfg))) > step  # (ModelCheckpoint saves at validations, every 2 steps)
    rows = read_metrics(run_dir)
    assert rows[: len(logged)] == [
        {k: r.get(k, "") for k in rows[0]} for r in logged
    ]  # the stopped run's history is kept
    before = [int(r["step"]) for r in logged if r["train/loss"]]
    after = [int(r["step"]) for r in rows[len(logged) :] if r["train/loss"]]
    assert before and after and min(after) > max(before)  # more steps, not a restart at 0


def test_a_checkpoint_of_another_quantizer_or_net_config_is_refused_at_start_up(stopped_run, tmp_path: Path):
    """Resumed from the run directory or given as ckpt_path: one line naming the
    checkpoint and the keys, before anything is built (it was a traceback from inside fit)."""
    run_dir = copy_of(stopped_run[1], tmp_path)
    before = (run_dir / "last.ckpt").read_bytes()
    changed = [*FAST, *SHAPES, "quantizer.codebook_size=32", "trainer.max_steps=100"]
    keys = r"another model or quantizer config; differing keys \(checkpoint, now\): \{'quantizer.codebook_size': \(64, 32\)\}"
    with pytest.raises(InvalidConfig, match=keys):
        resume_path(compose(changed, run_dir))
    with pytest.raises(InvalidConfig, match=keys):
        resume_path(compose([*changed, f"ckpt_path={run_dir / 'last.ckpt'}"], tmp_path / "fresh"))
    with pytest.raises(InvalidConfig, match=r"\{'model.encoder.hidden_channels': \(8, 16\)\}"):
        resume_path(compose([*FAST, *SHAPES, "model.encoder.hidden_channels=16"], run_dir))
    result = run_cli(f"hydra.run.dir={run_dir}", *changed, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(
        f"error: {re.escape(str(run_dir / 'last.ckpt'))} was trained with {keys}: .*", result.stderr.splitlines()[-1]
    )
    assert (run_dir / "last.ckpt").read_bytes() == before


def test_a_checkpoint_from_before_a_quantizer_setting_existed_resumes_at_its_default(tmp_path: Path):
    """A key added to a quantizer since the checkpoint was written is no difference while it
    holds the class's default (the run trained that way); any other value is refused."""
    cfg = compose(["quantizer=simvq"], tmp_path)
    model = instantiate(cfg.model)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    saved = {k: v for k, v in model.run_config["quantizer"].items() if k != "transform_weight_decay"}
    model.on_load_checkpoint({CONFIG_KEY: {"quantizer": saved}})
    model.run_config["quantizer"]["transform_weight_decay"] = 0.5
    with pytest.raises(
        ValueError, match=r"differing keys \(checkpoint, now\): \{'quantizer.transform_weight_decay': \(None, 0.5\)\}"
    ):
        model.on_load_checkpoint({CONFIG_KEY: {"quantizer": saved}})


class RaiseSignal(L.Callback):
    """Sends `signum` to this process after training step `step`."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            signal.raise_signal(self.signum)


def test_sigusr1_saves_last_checkpoint_and_stops_like_sigterm(tmp_path: Path):
    overrides = [
        *FAST,
        *SHAPES,
        "trainer.max_steps=100",
        f"+callbacks.signal._target_={__name__}.RaiseSignal",
        f"+callbacks.signal.signum={int(signal.SIGUSR1)}",
        "+callbacks.signal.step=3",
    ]
    with pytest.raises(SystemExit) as stop:
        train(compose(overrides, tmp_path))
    assert stop.value.code is None  # exit status 0
    assert global_step(tmp_path / "last.ckpt") == 3
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # restored when fit ended


def test_sigusr1_is_left_to_a_handler_already_installed():
    """Under SLURM with auto-requeue Lightning owns SIGUSR1 (hpc checkpoint, then requeue)."""
    requeue = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGUSR1, requeue)
    try:
        forward_sigusr1()
        assert signal.getsignal(signal.SIGUSR1) is requeue
    finally:
        signal.signal(signal.SIGUSR1, previous)
