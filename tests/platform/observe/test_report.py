"""``polytrain report`` on hand-written run directories: the PNG against the data, the page, bad input."""

import json
import math
from html.parser import HTMLParser

import pytest
from PIL import Image

from polytrain.cli import main
from polytrain.platform.observe.report import DPI, PANEL_INCHES, load_run, render

STEPS = 100


class Rows(HTMLParser):
    """The text cells of every table row of a page."""

    def __init__(self, page: str):
        super().__init__()
        self.rows, self.row = [], None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.row = []
            self.rows.append(self.row)

    def handle_endtag(self, tag):
        if tag == "tr":
            self.row = None

    def handle_data(self, data):
        if self.row is not None and data.strip():
            self.row.append(data.strip())


def drawn_at(image: Image.Image, ax, x: float, y: float, ink) -> bool:
    """Whether a pixel within one of where ``ax`` puts data point (x, y) satisfies ``ink``."""
    column, row = ax.transData.transform((x, y))
    column, row = round(column), image.height - round(row)
    return any(ink(image.getpixel((column + dx, row + dy))) for dx in (-1, 0, 1) for dy in (-1, 0, 1))


def black(rgb) -> bool:
    return sum(rgb) < 150


def colored(rgb) -> bool:
    return max(rgb) - min(rgb) > 60


def check_png(png, run_dir) -> tuple[Image.Image, dict]:
    """The PNG is the report's figure at its documented size; returns it (RGB) and its panels by title."""
    image = Image.open(png)
    assert image.format == "PNG"
    fig = render(load_run(run_dir))  # the same drawing, to ask its axes where each point is
    axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    rows = math.ceil(len(axes) / 2)
    assert image.size == (round(2 * PANEL_INCHES[0] * DPI), round(rows * PANEL_INCHES[1] * DPI))
    return image.convert("RGB"), axes


def write_run(folder, finished: bool = True, restarts: int = 0):
    """A run directory as the trainer leaves it: loss 8/sqrt(step) (tasks a and b share it 3:1), lr, evals."""
    folder.mkdir()
    lines = [{"step": 0, "time": 1e9, "event": "start", "config_name": "toy", "system": {"hostname": "box"}}]
    lines += [{"step": 50, "time": 1e9 + 50, "event": "start", "config_name": "toy"}] * restarts
    for step in range(10, STEPS + 1, 10):
        loss = 8 / math.sqrt(step)
        lines.append({"step": step, "time": 1e9 + step, "loss": loss, "loss/a": 0.75 * loss, "loss/b": 0.25 * loss,
                      "lr": 1e-3 * (1 - step / 200), "tokens_per_s": 1000.0 + step})
        if step % 50 == 0:
            lines.append({"step": step, "time": 1e9 + step, "eval/a/val_loss": loss, "eval/a/exact_match": step / 200})
    lines.sort(key=lambda line: line["step"])
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (folder / "config.yaml").write_text(f"train:\n  steps: {STEPS}\n")
    if finished:
        (folder / "eval.json").write_text(json.dumps({"a": {"val_loss": 8 / math.sqrt(STEPS), "exact_match": 0.5}}))
    return folder


def test_every_point_is_drawn_where_the_axes_put_it(tmp_path):
    run_dir = write_run(tmp_path / "toy")
    assert main(["report", str(run_dir)]) == 0
    image, axes = check_png(run_dir / "report.png", run_dir)
    assert list(axes) == ["training loss", "learning rate", "eval val_loss", "eval exact_match",
                          "throughput (input tokens/s)"]
    for step in range(10, STEPS + 1, 10):
        loss = 8 / math.sqrt(step)
        assert drawn_at(image, axes["training loss"], step, loss, black), step
        assert drawn_at(image, axes["training loss"], step, 0.25 * loss, colored), step
        assert drawn_at(image, axes["learning rate"], step, 1e-3 * (1 - step / 200), colored), step
        assert not drawn_at(image, axes["learning rate"], step, 1e-3 * (1 - step / 200) + 2e-4, colored), step
    for step in (50, 100):
        assert drawn_at(image, axes["eval exact_match"], step, step / 200, colored)


def test_the_page_summarizes_the_run_and_holds_the_final_evaluation(tmp_path, capsys):
    run_dir = write_run(tmp_path / "toy", restarts=1)
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "report.png"),
                                               str(tmp_path / "out" / "report.html")]
    page = (tmp_path / "out" / "report.html").read_text()
    rows = Rows(page).rows
    assert ["config", "toy"] in rows and ["steps", f"{STEPS} of {STEPS}"] in rows
    assert ["starts", "2 (resumed 1 times)"] in rows
    assert ["a", "val_loss", f"{8 / math.sqrt(STEPS):.4f}"] in rows and ["a", "exact_match", "0.5000"] in rows
    assert {"loss", "loss/a", "loss/b", "lr", "tokens_per_s", "eval/a/val_loss"} <= {row[0] for row in rows}
    assert 'src="data:image/png;base64,' in page


def test_a_run_in_progress_is_drawn_without_a_final_evaluation(tmp_path):
    run_dir = write_run(tmp_path / "toy", finished=False)
    assert main(["report", str(run_dir)]) == 0
    assert "has not finished" in (run_dir / "report.html").read_text()
    image, axes = check_png(run_dir / "report.png", run_dir)
    assert drawn_at(image, axes["eval val_loss"], 50, 8 / math.sqrt(50), colored)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no such run directory"),
    (lambda d: d.mkdir(), "not a run directory (no metrics.jsonl"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("")), "no metrics logged yet"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2,\n')),
     "metrics.jsonl:2: not valid JSON"),
])
def test_a_folder_that_is_not_a_run_is_one_error_line_naming_it(tmp_path, capsys, make, message):
    folder = tmp_path / "not-a-run"
    make(folder)
    assert main(["report", str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"polytrain: error: {folder}") and message in err[0], err
