"""``polytrain report RUN_DIR``: a run's curves as a PNG, and an HTML page with the PNG and a summary.

Reads only what the run wrote: ``metrics.jsonl`` (every logged metric), ``eval.json`` (the final
evaluation, once the run has finished) and ``config.yaml``, so it works on a finished run, a run in
progress and a copy of a run directory alike.  Panels: the training loss (all tasks and each task), the
learning rate, one panel per evaluation metric (a line per task), then gradient norm, throughput, MFU
and memory where they were logged.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from polytrain import atomic
from polytrain.errors import DataError
from polytrain.platform.observe.run_dir import RunDir
from polytrain.platform.observe.tracking import START, read_metrics

COLUMNS = 2
PANEL_INCHES = (6.0, 3.2)
"""Width and height of one panel."""
DPI = 100
"""Pixels per inch of the PNG: a panel is 600 x 320 pixels."""
TOTAL_LOSS_STYLE = {"color": "black", "linewidth": 2.0}
"""The weighted sum of the task losses; each task's loss is a thinner colored line."""
PLAIN_NUMBERS = FuncFormatter(lambda value, _: f"{value:g}")
"""Log-scale tick labels as 0.1, 1, 10 rather than powers of ten."""
TWOS_AND_FIVES = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")
"""Labels of the log scale's minor ticks: only 0.2, 0.5, 2, 5, ... (all nine a decade would overlap)."""


@dataclass
class RunLog:
    """What a run directory holds about the run, as written by the trainer and the tracker."""

    run_dir: Path
    rows: list[dict]
    """Metric lines of metrics.jsonl, in order."""
    starts: list[dict]
    """Its start events (one per start or resume)."""
    results: dict[str, dict[str, float]] | None
    """eval.json, or None before the run has finished."""
    steps: int | None
    """train.steps of config.yaml, or None without one."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` over the lines that logged it."""
        points = [(row["step"], row[key]) for row in self.rows if isinstance(row.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    def keys(self) -> list[str]:
        """Every metric name logged, in the order first seen."""
        return list(dict.fromkeys(key for row in self.rows for key in row if key not in ("step", "time")))

    def last(self, key: str) -> float | None:
        values = self.series(key)[1]
        return values[-1] if values else None


def load_run(run_dir: Path) -> RunLog:
    """The logs of ``run_dir``; a folder that is not a run directory is a ``DataError`` naming it."""
    files = RunDir(run_dir)
    metrics = files.metrics
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    if not metrics.is_file():
        raise DataError(f"{run_dir}: not a run directory (no {metrics.name}; pass the folder `polytrain train` "
                        "printed as its run directory)")
    rows, starts = [], []
    for row in read_metrics(metrics):
        (starts if row.get("event") == START else rows).append(row)
    if not rows:
        raise DataError(f"{metrics}: no metrics logged yet")
    results = json.loads(files.eval.read_text()) if files.eval.is_file() else None
    config_file = files.config
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    return RunLog(run_dir, rows, starts, results, (config.get("train") or {}).get("steps"))


def panels(run: RunLog) -> list[tuple[str, list[str]]]:
    """(title, metric keys) of every panel with data, in drawing order."""
    keys = run.keys()
    eval_metrics = list(dict.fromkeys(key.rsplit("/", 1)[1] for key in keys if key.startswith("eval/")))
    candidates = [("training loss", ["loss", *sorted(k for k in keys if k.startswith("loss/"))]),
                  ("learning rate", ["lr"]),
                  *[(f"eval {metric}", [k for k in keys if k.startswith("eval/") and k.endswith(f"/{metric}")])
                    for metric in eval_metrics],
                  ("gradient norm", ["grad_norm"]),
                  ("throughput (input tokens/s)", ["tokens_per_s"]),
                  ("MFU (%)", ["mfu"]),
                  ("memory (GiB, largest rank)", sorted(k for k in keys if k.startswith("memory/")))]
    return [(title, [k for k in group if k in keys]) for title, group in candidates if any(k in keys for k in group)]


def render(run: RunLog) -> Figure:
    """The curves, ``COLUMNS`` panels a row, each ``PANEL_INCHES`` at ``DPI``."""
    layout = panels(run)
    rows = math.ceil(len(layout) / COLUMNS)
    fig = Figure(figsize=(PANEL_INCHES[0] * COLUMNS, PANEL_INCHES[1] * rows), dpi=DPI)
    FigureCanvasAgg(fig)
    grid = fig.subplots(rows, COLUMNS, squeeze=False).flatten()
    first, last = min(row["step"] for row in run.rows), max(row["step"] for row in run.rows)
    margin = max(1.0, 0.03 * (last - first))
    for ax, (title, keys) in zip(grid, layout):
        for key in keys:
            steps, values = run.series(key)
            values = [100 * v for v in values] if key == "mfu" else values
            style = TOTAL_LOSS_STYLE if key == "loss" else {"linewidth": 1.2}
            few = len(steps) <= 20  # sparse series (evaluations) get markers so single points show
            ax.plot(steps, values, label=label(key), marker="o" if few else None, markersize=4, **style)
        if title == "training loss" and min(v for key in keys for v in run.series(key)[1]) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(PLAIN_NUMBERS)
            ax.yaxis.set_minor_formatter(TWOS_AND_FIVES)
        ax.set_xlim(first - margin, last + margin)  # one step axis for every panel, evaluations included
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in grid[len(layout):]:  # an odd panel count leaves the last cell empty
        ax.set_axis_off()
    fig.suptitle(run.run_dir.name)
    fig.tight_layout()
    return fig


def label(key: str) -> str:
    """A line's legend: the task for an evaluation metric (the panel names the metric), else the key."""
    return key.split("/")[1] if key.startswith("eval/") else key


def summary(run: RunLog) -> list[tuple[str, str]]:
    """(what, value) rows of the page's summary table."""
    start = run.starts[-1] if run.starts else {}
    system = start.get("system", {})
    last_step = max(row["step"] for row in run.rows)
    times = [row["time"] for row in run.rows]
    rows = [("run directory", str(run.run_dir)), ("config", start.get("config_name", "?")),
            ("steps", f"{last_step}" + (f" of {run.steps}" if run.steps else "")),
            ("starts", f"{len(run.starts)} (resumed {max(len(run.starts) - 1, 0)} times)"),
            ("logged", f"{datetime.fromtimestamp(min(times)):%Y-%m-%d %H:%M:%S} to "
                       f"{datetime.fromtimestamp(max(times)):%Y-%m-%d %H:%M:%S}")]
    for key, label, fmt in (("loss", "final training loss", "{:.4f}"), ("tokens_per_s", "input tokens/s", "{:,.0f}"),
                            ("samples_per_s", "samples/s", "{:,.1f}"), ("mfu", "MFU", "{:.3g}%")):
        value = run.last(key)
        if value is not None:
            rows.append((label, fmt.format(100 * value if key == "mfu" else value)))
    if system:
        rows.append(("machine", f"{system.get('hostname')}: {', '.join(system.get('devices', []))}; world size "
                                f"{system.get('world_size')}"))
        rows.append(("versions", ", ".join(f"{name} {system.get(name)}" for name in ("torch", "deepspeed", "wandb"))))
    return rows


def table(header: tuple[str, ...] | None, rows: list[tuple[str, ...]]) -> str:
    """An HTML table; a None ``header`` makes a key-value table whose first column is the header cells."""
    cells = lambda tags, row: "".join(f"<{t}>{html.escape(str(c))}</{t}>" for t, c in zip(tags, row))  # noqa: E731
    head = "" if header is None else f"<tr>{cells(['th'] * len(header), header)}</tr>"
    tags = ["th", "td"] if header is None else ["td"] * len(header)
    return "<table>" + head + "".join(f"<tr>{cells(tags, r)}</tr>" for r in rows) + "</table>"


def page(run: RunLog, png: bytes) -> str:
    """The HTML page: summary, final evaluation, the PNG (embedded, so the page is one file), every metric."""
    if run.results:
        final = table(("task", "metric", "value"), [(task, metric, f"{value:.4f}") for task, metrics in
                                                    run.results.items() for metric, value in metrics.items()])
    else:
        final = f"<p>No {RunDir(run.run_dir).eval.name} yet: the run has not finished.</p>"
    metrics = table(("metric", "last value", "at step"),
                    [(key, f"{run.last(key):.6g}", str(run.series(key)[0][-1])) for key in run.keys()
                     if run.series(key)[0]])
    image = base64.b64encode(png).decode("ascii")
    name = html.escape(run.run_dir.name)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>polytrain report: {name}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}} img{{max-width:100%}}</style></head>
<body><h1>{name}</h1>
{table(None, summary(run))}
<h2>Final evaluation</h2>
{final}
<h2>Curves</h2>
<img src="data:image/png;base64,{image}" alt="training curves of {name}">
<h2>Logged metrics</h2>
{metrics}
</body></html>
"""


def write_report(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``report.png`` and ``report.html`` for ``run_dir`` into ``out_dir`` (default: the run directory)."""
    run = load_run(Path(run_dir))
    out = RunDir(Path(out_dir) if out_dir is not None else run.run_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    png, page_file = out.report_png, out.report_html
    atomic.write(png, lambda tmp: render(run).savefig(tmp, dpi=DPI, format="png"))
    atomic.write_text(page_file, page(run, png.read_bytes()))
    return png, page_file
