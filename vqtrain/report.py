"""Codebook collapse report: compare quantizers and codebook sizes across runs.

Reads runs (vqtrain/runs.py) and writes utilization.png (utilization over steps,
a panel per codebook size: training windows, else validations), tradeoff.png
(final utilization and reconstruction loss against codebook size: validation,
else test, else training), summary.md and a self-contained report.html. Short
runs log no training window or validation: a figure shows what the runs have
and says so, and one no run has the numbers for is not drawn but explained.
Runs that failed midway keep a table row with what they logged; what is
missing is named in the notes.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from vqtrain.runs import Run
from vqtrain.search import Search, plot_search, summary

# table columns beside method, data and size: (header, metric whose last value is shown, format)
COLUMNS = [
    ("val utilization", "val/utilization", ".4g"),
    ("val perplexity", "val/perplexity", ".4g"),
    ("val dead codes", "val/dead_codes", ".0f"),
    ("val effective rank", "val/effective_rank", ".3g"),
    ("val recon loss", "val/recon_loss", ".4g"),
    ("test utilization", "test/utilization", ".4g"),
    ("test recon loss", "test/recon_loss", ".4g"),
]
# a run lacking one of these is named in the notes (test metrics are optional: test=false)
EXPECTED = ["train/utilization", "val/utilization", "val/recon_loss"]
DEFINITION = (
    "Utilization is the fraction of the codebook's codes used: val and test count them over a whole "
    "evaluation pass, train over a window of the last model.usage_window training steps. Effective rank "
    "is exp of the entropy of the normalised singular values of the codes used (Roy & Vetterli 2007): "
    "how many dimensions the used codes span."
)


@dataclass(frozen=True)
class Stage:
    """Utilization figures of one stage: what they count, and (a template over
    `schedule`'s keys) why runs may have none."""

    prefix: str
    name: str
    counts: str
    absent: str

    @property
    def utilization(self) -> str:
        return f"{self.prefix}/utilization"

    @property
    def recon_loss(self) -> str:
        return f"{self.prefix}/recon_loss"


TRAIN = Stage(
    "train",
    "training",
    "in the last {usage_window} training steps (model.usage_window), a point per window",
    "a training window (one ends every model.usage_window = {usage_window} steps; "
    "the longest run trained {steps} steps)",
)
VAL = Stage(
    "val",
    "validation",
    "over a whole validation pass",
    "a validation (one every trainer.val_check_interval = {val_check_interval} steps)",
)
TEST = Stage("test", "test", "over the whole test pass", "a test (none with test=false)")


class Lines:
    """Line label (the method, with the data set when runs span several) and
    color per run, the same in every figure."""

    def __init__(self, runs: list[Run]):
        self.several_datasets = len({run.dataset for run in runs}) > 1
        palette = colormaps["tab10"]
        self.colors = {name: palette(i % 10) for i, name in enumerate(sorted({self.label(run) for run in runs}))}

    def label(self, run: Run) -> str:
        return f"{run.method} ({run.dataset})" if self.several_datasets else run.method


def notes(runs: list[Run]) -> list[str]:
    """What each run is missing that others have, and so where it is left out
    (what no run has, the figure captions explain)."""
    logged = {key for key in EXPECTED if any(run.final(key) is not None for run in runs)}
    found = []
    for run in runs:
        if not run.rows:
            found.append(f"{run.name}: no metrics logged (failed before the first log?); left out of the plots")
            continue
        if missing := [key for key in EXPECTED if key in logged and run.final(key) is None]:
            found.append(f"{run.name}: no {', '.join(missing)}; left out where needed")
        if run.codebook_size is None:
            found.append(f"{run.name}: codebook size unknown; left out of the plots")
    return found


def plotted(runs: list[Run], stage: Stage) -> list[Run]:
    """The runs a figure of `stage` draws: known codebook size, some utilization logged."""
    return [run for run in runs if run.codebook_size is not None and run.final(stage.utilization) is not None]


def plot_utilization(runs: list[Run], lines: Lines, stage: Stage, path: Path) -> None:
    """Utilization over steps, a panel per codebook size; markers, since a short run has few points."""
    runs = sorted(plotted(runs, stage), key=lines.label)
    sizes = sorted({run.codebook_size for run in runs})
    figure = Figure(figsize=(4.5 * len(sizes), 3.6), layout="constrained")
    axes = figure.subplots(1, len(sizes), squeeze=False, sharey=True)[0]
    for ax, size in zip(axes, sizes):
        for run in (run for run in runs if run.codebook_size == size):
            ax.plot(
                *run.series(stage.utilization),
                marker="o",
                markersize=3,
                label=lines.label(run),
                color=lines.colors[lines.label(run)],
            )
        ax.set_title(f"K = {size}")
        ax.set_yscale("log")  # collapse spans orders of magnitude
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel(f"{stage.name} utilization")
    figure.savefig(path, dpi=100)


def plot_tradeoff(runs: list[Run], lines: Lines, stage: Stage, path: Path) -> None:
    """Final utilization and recon loss against codebook size (no recon panel where no run logged it)."""
    runs = plotted(runs, stage)
    keys = [stage.utilization] + [stage.recon_loss] * any(run.final(stage.recon_loss) is not None for run in runs)
    figure = Figure(figsize=(5 * len(keys), 3.8), layout="constrained")
    axes = figure.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        for name, color in lines.colors.items():
            points = sorted(
                (run.codebook_size, run.final(key))
                for run in runs
                if lines.label(run) == name and run.final(key) is not None
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=name, color=color)
        ax.set_xscale("log", base=2)
        if key == stage.utilization:
            ax.set_yscale("log")
        ax.set_xlabel("codebook size K")
        ax.set_title(f"final {stage.name} {key.split('/')[1].replace('_', ' ')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=100)


FIGURES = [  # file, title, the stages it can show in order of preference, how it is drawn
    ("utilization.png", "utilization over steps", (TRAIN, VAL), plot_utilization),
    ("tradeoff.png", "utilization and reconstruction against codebook size", (VAL, TEST, TRAIN), plot_tradeoff),
]


@dataclass(frozen=True)
class Shown:
    """A figure of the report: its title, one line on what it shows or why it is not drawn, its image,
    and lines set below it as code (command lines)."""

    title: str
    caption: str
    image: Path | None
    code: tuple[str, ...] = ()


def schedule(runs: list[Run]) -> dict[str, str]:
    """The settings (values over all runs) that decide when training windows and validations are logged."""

    def values(key: str) -> str:
        return (
            "/".join(map(str, sorted({run.settings[key] for run in runs if run.settings.get(key) is not None}))) or "?"
        )

    return {
        "usage_window": values("model.usage_window"),
        "val_check_interval": values("trainer.val_check_interval"),
        "steps": str(max((run.steps for run in runs if run.steps is not None), default=0)),
    }


def draw(runs: list[Run], out: Path, at_step: int | None = None) -> list[Shown]:
    """Each figure from the first of its stages that runs logged, saying which and
    why the ones before are missing, and whether its runs ended at different
    steps; where none was logged the figure is not drawn (an earlier report's
    image is removed) and the caption says why."""
    lines, context = Lines(runs), schedule(runs)
    shown = []
    for file, title, stages, plot in FIGURES:
        stage = next((stage for stage in stages if plotted(runs, stage)), None)
        skipped = stages[: stages.index(stage)] if stage else stages
        missing = " or ".join(skip.absent for skip in skipped).format(**context)
        if stage is None:
            (out / file).unlink(missing_ok=True)
            why = (
                f"no run logged {missing}"
                if any(run.codebook_size for run in runs)
                else "no run's codebook size is known"
            )
            shown.append(Shown(title.capitalize(), f"Not drawn: {why}.", None))
            continue
        plot(runs, lines, stage, out / file)
        caption = f"{stage.name.capitalize()} utilization: the fraction of the codebook used {stage.counts.format(**context)}."
        if skipped:
            caption += f" Shown since no run logged {missing}."
        caption += " " + ended(plotted(runs, stage), at_step)
        shown.append(Shown(f"{stage.name.capitalize()} {title}", caption, out / file))
    return shown


def ended(runs: list[Run], at_step: int | None) -> str:
    """When the figure's runs ended: one step, or several (final values then compare different points of training)."""
    if at_step is not None:
        return f"Every run as it was after {at_step:,} steps (--at-step): its last values logged by then."
    steps = sorted({run.steps for run in runs if run.steps is not None})
    if len(steps) <= 1:
        return f"All runs ended at step {steps[0]:,}." if steps else ""
    return (
        f"The runs ended at different steps ({', '.join(f'{step:,}' for step in steps)}): their final values "
        "compare different points of training; --at-step N draws every run at step N."
    )


def table(runs: list[Run], root: Path | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary, sorted by data, method and size; '-' where nothing was logged."""

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def name(run: Run) -> str:
        try:
            return str(Path(run.name).relative_to(root)) if root else run.name
        except ValueError:
            return run.name

    header = ["method", "data", "codebook size", *(title for title, _, _ in COLUMNS), "steps", "run"]
    ordered = sorted(runs, key=lambda run: (run.dataset, run.method, run.codebook_size or 0, run.name))
    rows = [
        [
            run.method,
            run.dataset,
            cell(run.codebook_size, "d"),
            *(cell(run.final(key), spec) for _, key, spec in COLUMNS),
            cell(run.steps, "d"),
            name(run),
        ]
        for run in ordered
    ]
    return header, rows


def markdown(header: list[str], rows: list[list[str]], found: list[str], figures: list[Shown]) -> str:
    text = [
        "# Codebook collapse report",
        "",
        f"{len(rows)} runs. Final figures are the last logged values; "
        "recon loss is the time-domain MSE (plus the STFT term where model.reconstruction.stft_weight > 0). "
        + DEFINITION,
        "",
        "## Figures",
        "",
    ]
    for figure in figures:
        text.append(f"- {figure.title}" + (f" ({figure.image.name})" if figure.image else "") + f": {figure.caption}")
        text += ["", *(f"      {line}" for line in figure.code), ""] if figure.code else []
    text += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    text += ["| " + " | ".join(row) + " |" for row in rows]
    if found:
        text += ["", "## Notes", "", *(f"- {note}" for note in found)]
    return "\n".join(text) + "\n"


def html_page(header: list[str], rows: list[list[str]], found: list[str], figures: list[Shown]) -> str:
    def tag(name: str, cells: list[str]) -> str:
        return "<tr>" + "".join(f"<{name}>{html.escape(c)}</{name}>" for c in cells) + "</tr>"

    def image(figure: Shown) -> str:
        data = base64.b64encode(figure.image.read_bytes()).decode()
        return f'<img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">'

    figures_html = "".join(
        f"<h2>{html.escape(figure.title)}</h2><p>{html.escape(figure.caption)}</p>{image(figure) if figure.image else ''}"
        + (f"<pre>{html.escape(chr(10).join(figure.code))}</pre>" if figure.code else "")
        for figure in figures
    )
    notes_html = "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in found) + "</ul>" if found else ""
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>Codebook collapse report</title>'
        "<style>body{font-family:sans-serif;margin:2em}img{max-width:100%}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}td{text-align:right}pre{white-space:pre-wrap;word-break:break-all}</style></head><body>"
        f"<h1>Codebook collapse report</h1>{figures_html}<h2>Final figures</h2><p>{html.escape(DEFINITION)}</p>"
        f"<table>{tag('th', header)}{''.join(tag('td', row) for row in rows)}</table>{notes_html}</body></html>\n"
    )


def search_figures(searches: Sequence[Search], out: Path, root: Path | None) -> list[Shown]:
    """A figure per hyperparameter search (search<N>.png), with its best trials as command lines."""
    shown = []
    for number, search in enumerate(searches):
        title, caption, code = summary(search, root)
        image = out / f"search{number}.png"
        if any(trial.values for trial in search.trials):
            plot_search(search, image)
        else:
            image.unlink(missing_ok=True)
            image, caption = None, "Not drawn: no trial ended with finite values. " + caption
        shown.append(Shown(title, caption, image, tuple(code)))
    return shown


def write_report(
    runs: list[Run],
    out: Path,
    root: Path | None = None,
    at_step: int | None = None,
    searches: Sequence[Search] = (),
) -> Path:
    """summary.md, report.html and the figures the runs have into `out`; run names in the table relative
    to `root`; with `at_step`, every run as it was after that many steps (runs that ended before are
    left out, and named); a figure per search. Returns report.html."""
    out.mkdir(parents=True, exist_ok=True)
    found = []
    if at_step is not None:
        short = [run for run in runs if (run.steps or 0) < at_step]
        found = [
            f"{run.name}: ended at step {run.steps or 0:,}, before --at-step {at_step:,}; left out" for run in short
        ]
        runs = [run.until(at_step) for run in runs if run not in short]
    figures = draw(runs, out, at_step) + search_figures(searches, out, root)
    header, rows = table(runs, root)
    found += notes(runs)
    (out / "summary.md").write_text(markdown(header, rows, found, figures))
    page = out / "report.html"
    page.write_text(html_page(header, rows, found, figures))
    return page
