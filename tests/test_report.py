"""scripts/collapse_report.py on a real (tiny) multirun sweep: the files, one table
row per run with its method and size, and numbers that are those of metrics.csv."""

from __future__ import annotations

import base64
import csv
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from matplotlib.figure import Figure

from vqtrain.report import write_report
from vqtrain.runs import describe, find_run_dirs, load_run

REPO = Path(__file__).resolve().parents[1]
# Usage windows of 2 steps, logged every 2 steps: one row per window (steps 1, 3, 5), as Lightning
# repeats a window's figures on every later logging step of its epoch
TINY = ["debug=tiny_image", "model.usage_window=2", "trainer.log_every_n_steps=2"]
RUNS = {("fsq", 256), ("fsq", 1024), ("vq", 256), ("vq", 1024)}
# summary.md column -> metric whose last logged value it shows
METRICS = {
    "val utilization": "val/utilization",
    "val perplexity": "val/perplexity",
    "val dead codes": "val/dead_codes",
    "val recon loss": "val/recon_loss",
    "test recon loss": "test/recon_loss",
}
FILES = ["utilization.png", "tradeoff.png", "summary.md", "report.html"]


def environment(root: Path) -> dict[str, str]:
    env = {**os.environ, "WANDB_MODE": "offline", "VQTRAIN_ROOT": str(root)}
    env.pop("VQTRAIN_RUN_ID", None)
    return env


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 6-step runs (debug=tiny_image): vq and fsq at two codebook sizes, as `train.py -m` lays them out."""
    root = tmp_path_factory.mktemp("sweep")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "-m",
            "quantizer=vq,fsq",
            "quantizer.codebook_size=256,1024",
            *TINY,
            f"hydra.sweep.dir={root / 'multirun'}",
        ],
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "multirun"


def report(*args: str | Path, root: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "collapse_report.py"), *map(str, args)],
        cwd=root,
        env=environment(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def read_table(summary: Path) -> list[dict[str, str]]:
    lines = [line for line in summary.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def last_logged(metrics_csv: Path, key: str) -> float | None:
    with metrics_csv.open() as file:
        values = [float(row[key]) for row in csv.DictReader(file) if row.get(key)]
    return values[-1] if values else None


def test_report_has_a_row_per_run_with_the_logged_numbers(sweep: Path):
    assert "4 runs" in report(sweep, root=sweep.parent)
    out = sweep / "report"
    assert all((out / name).stat().st_size > 0 for name in FILES)
    rows = read_table(out / "summary.md")
    assert {(row["method"], int(row["codebook size"])) for row in rows} == RUNS and len(rows) == 4
    for row in rows:
        run_dir = sweep / row["run"]
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"quantizer={row['method']}" in overrides and f"codebook_size={row['codebook size']}" in overrides
        assert row["data"] == "shapes" and row["steps"] == "6"
        for column, key in METRICS.items():
            expected = last_logged(run_dir / "metrics.csv", key)
            assert expected is not None and math.isclose(float(row[column]), expected, rel_tol=1e-3, abs_tol=1e-6), (
                column,
                row,
            )


def test_html_embeds_both_plots_and_the_table(sweep: Path):
    report(sweep, "--out", sweep.parent / "html", root=sweep.parent)
    page = (sweep.parent / "html" / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert page.count("<tr>") == 1 + 4


def test_training_utilization_series_is_the_logged_one(sweep: Path):
    run_dirs = find_run_dirs([sweep])
    assert len(run_dirs) == 4
    for run_dir in run_dirs:
        steps, values = load_run(run_dir).series("train/utilization")
        with (run_dir / "metrics.csv").open() as file:
            logged = [
                (int(row["step"]), float(row["train/utilization"]))
                for row in csv.DictReader(file)
                if row["train/utilization"]
            ]
        assert list(zip(steps, values)) == logged and steps == [1, 3, 5]  # every usage window of 2 steps


def test_failed_runs_keep_a_row_and_are_named_in_the_notes(sweep: Path, tmp_path: Path):
    broken = tmp_path / "broken"
    for name, keep_lines in [("early", 2), ("empty", 0)]:  # early: header and the first training row only
        shutil.copytree(sweep / "0", broken / name)
        metrics = broken / name / "metrics.csv"
        metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:keep_lines]))
    out = tmp_path / "report"
    assert "6 runs" in report(sweep, broken, "--out", out, root=tmp_path)
    assert all((out / name).stat().st_size > 0 for name in FILES)
    rows = read_table(out / "summary.md")
    assert len(rows) == 6
    early, empty = (next(row for row in rows if row["run"].endswith(f"broken/{name}")) for name in ("early", "empty"))
    assert early["val utilization"] == early["test recon loss"] == "-" and early["steps"] == "2"
    assert all(empty[column] == "-" for column in [*METRICS, "steps"])
    notes = (out / "summary.md").read_text().split("## Notes")[1]
    assert re.search(r"broken/early: no val/utilization, val/recon_loss", notes)
    assert re.search(r"broken/empty: no metrics logged", notes)


def test_method_and_size_come_from_the_config_choices_and_overrides():
    fsq = {
        "quantizer": {"_target_": "vqtrain.quantizers.FSQ", "codebook_size": None, "levels": [8, 5, 5, 5]},
        "data": {},
    }
    assert describe(fsq, {"quantizer": "fsq", "data": "mnist"}, []) == ("fsq", 1000, "mnist")
    vq = {
        "quantizer": {"_target_": "vqtrain.quantizers.VectorQuantizer", "codebook_size": 512},
        "data": {"_target_": "x.Shapes"},
    }
    overrides = ["quantizer=vq", "quantizer.codebook_size=512", "quantizer.learning=gradient", "trainer.max_steps=5"]
    assert describe(vq, {}, overrides) == ("vq learning=gradient", 512, "Shapes")
    assert describe(vq, {}, []) == ("VectorQuantizer", 512, "Shapes")


def fake_run(folder: Path, quantizer: str, size: int, val_check_interval: int, rows: list[dict[str, float]]) -> None:
    """A run directory as train.py lays it out: the default training windows (every 100 steps), given rows."""
    (folder / ".hydra").mkdir(parents=True)
    config = {
        "quantizer": {"_target_": "vqtrain.quantizers.Q", "codebook_size": size},
        "data": {"_target_": "x.Shapes"},
        "model": {"usage_window": 100},
        "trainer": {"val_check_interval": val_check_interval},
    }
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": {"quantizer": quantizer, "data": "shapes"}}}})
    )
    with (folder / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, sorted({key for row in rows for key in row}))
        writer.writeheader()
        writer.writerows(rows)


def evaluation(stage: str, step: int, utilization: float) -> dict[str, float]:
    return {"step": step, f"{stage}/utilization": utilization, f"{stage}/recon_loss": 1 - utilization}


SHORT = {  # 15-step runs: test figures only (validation every 200 steps), or validations every 5 steps too
    "test only": (
        200,
        lambda u: [evaluation("test", 15, u)],
        [
            "Utilization over steps: Not drawn: no run logged a training window (one ends every model.usage_window"
            " = 100 steps; the longest run trained 15 steps) or a validation (one every trainer.val_check_interval"
            " = 200 steps).",
            "Test utilization and reconstruction against codebook size (tradeoff.png): Test utilization: the "
            "fraction of the codebook used over the whole test pass. Shown since no run logged a validation",
        ],
    ),
    "validations": (
        5,
        lambda u: [evaluation("val", step, u * step / 15) for step in (5, 10, 15)] + [evaluation("test", 15, u)],
        [
            "Validation utilization over steps (utilization.png): Validation utilization: the fraction of the "
            "codebook used over a whole validation pass. Shown since no run logged a training window",
            "Validation utilization and reconstruction against codebook size (tradeoff.png): Validation "
            "utilization: the fraction of the codebook used over a whole validation pass. All runs ended at step 15.\n",
        ],
    ),  # no "Shown since"
}


@pytest.mark.parametrize("case", SHORT)
def test_short_runs_report_the_figures_they_have_and_never_empty_axes(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Training windows end every model.usage_window=100 steps: 15-step runs have none. The report
    shows what they logged, says which, and explains a figure it cannot draw instead of drawing it empty."""
    val_check_interval, evaluations, captions = SHORT[case]
    utilization = {"vq": 0.004, "fsq": 0.25}
    for number, (quantizer, used) in enumerate(utilization.items()):
        rows = [{"step": 9, "train/loss": 0.9, "train/recon_loss": 0.9}, *evaluations(used)]
        fake_run(tmp_path / "multirun" / str(number), quantizer, 1024, val_check_interval, rows)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "utilization.png").write_bytes(b"an earlier report's figure")
    saved, savefig = [], Figure.savefig

    def save(figure: Figure, *args, **kwargs) -> None:
        saved.append([ax.has_data() for ax in figure.axes])
        savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", save)
    page = write_report([load_run(path) for path in find_run_dirs([tmp_path / "multirun"])], tmp_path / "out")
    assert saved and all(all(axes) for axes in saved)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert all(caption in summary for caption in captions), summary
    assert (tmp_path / "out" / "utilization.png").exists() == (case == "validations")
    assert len(re.findall(r'src="data:image/png;base64,', page.read_text())) == len(saved)
    rows = {row["method"]: row for row in read_table(tmp_path / "out" / "summary.md")}
    assert {method: float(row["test utilization"]) for method, row in rows.items()} == utilization
    assert all(row["steps"] == "15" for row in rows.values())


def unequal_runs(root: Path) -> Path:
    """vq validated at steps 500, 1000 and 1500; fsq ended after its validation at step 500."""
    fake_run(root / "0", "vq", 1024, 500, [evaluation("val", step, step / 10_000) for step in (500, 1000, 1500)])
    fake_run(root / "1", "fsq", 1024, 500, [evaluation("val", 500, 0.5)])
    return root


def test_figures_say_when_their_runs_ended_at_different_steps(tmp_path: Path):
    runs = unequal_runs(tmp_path / "multirun")
    write_report([load_run(path) for path in find_run_dirs([runs])], tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    note = "The runs ended at different steps (500, 1,500): their final values compare different points of training"
    assert summary.count(note) == 2  # beside each figure
    rows = {row["method"]: row for row in read_table(tmp_path / "out" / "summary.md")}
    assert (rows["vq"]["val utilization"], rows["vq"]["steps"]) == ("0.15", "1500")


def test_at_step_draws_every_run_as_it_was_after_that_step(tmp_path: Path):
    runs = unequal_runs(tmp_path / "multirun")
    report(runs, "--at-step", 500, "--out", tmp_path / "at500", root=tmp_path)
    summary = (tmp_path / "at500" / "summary.md").read_text()
    assert "different steps" not in summary and summary.count("as it was after 500 steps (--at-step)") == 2
    rows = {row["method"]: row for row in read_table(tmp_path / "at500" / "summary.md")}
    assert {method: (row["val utilization"], row["steps"]) for method, row in rows.items()} == {
        "vq": ("0.05", "500"),
        "fsq": ("0.5", "500"),
    }
    report(runs, "--at-step", 1000, "--out", tmp_path / "at1000", root=tmp_path)
    summary = (tmp_path / "at1000" / "summary.md").read_text()
    assert [row["method"] for row in read_table(tmp_path / "at1000" / "summary.md")] == ["vq"]
    assert f"{runs / '1'}: ended at step 500, before --at-step 1,000; left out" in summary
