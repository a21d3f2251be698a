"""The README's held-out figures for the committed default model are what `make eval-default` prints.

The README states them as a table; this test recomputes each row the way the README says it was
obtained (the recipe's evaluation set, the trainer's 20 % held-out split, the committed model with
and without its banks) and compares. A change that moves any figure (preprocessing, the banks,
the metric, the split) fails here until the README follows.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from models import load_encoder
from models.data import read_pairs
from models.default_data import build_default_dataset
from models.evaluate import EvalReport, evaluate, held_out_only

README = Path(__file__).resolve().parents[2] / "README.md"
HELD_OUT_HEADING = "**Held-out retrieval**"
# The text tower's caption embeddings differ by ~1e-4 from one CPU to another (README,
# "Reproducing it"), which can move a query across the 10th place: one query either way is allowed.
QUERY_SLACK = 1

# README row label -> (encoder settings, direction)
ROWS = {
    "text -> image": ({}, "text_to_image"),
    "image -> text": ({}, "image_to_text"),
    "image -> text without the image bank (`--no-image-bank`)": ({"image_bank": False}, "image_to_text"),
    "the image tower alone (`--no-caption-bank`), text -> image": ({"caption_bank": False}, "text_to_image"),
    "the image tower alone, image -> text": ({"caption_bank": False}, "image_to_text"),
}


def readme_held_out_table(text: str) -> dict[str, dict[int, str]]:
    """The held-out table's rows: label -> {k: the figure as written}."""
    section = text[text.index(HELD_OUT_HEADING):]
    rows: dict[str, dict[int, str]] = {}
    for line in section.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0] or cells[0].startswith("-"):
            continue
        rows[cells[0]] = {k: cell.strip("*") for k, cell in zip((1, 5, 10), cells[1:], strict=True)}
    return rows


def agrees(written: str, value: float, queries: int) -> bool:
    """`value` rounds to `written` (as many decimals as written), give or take QUERY_SLACK queries."""
    half_unit = 0.5 * 10.0 ** -len(written.split(".")[1])
    return abs(value - float(written)) <= half_unit + QUERY_SLACK / queries + 1e-12


def test_the_table_parser_reads_a_table() -> None:
    text = (f"{HELD_OUT_HEADING} (prose)\n\n| | R@1 | R@5 | R@10 |\n|---|---|---|---|\n"
            "| text -> image | 0.22 | 0.48 | **0.598** |\n| floor | 0.17 | - | 0.44 |\n\nafter\n| x | 1 | 2 | 3 |\n")
    assert readme_held_out_table(text) == {"text -> image": {1: "0.22", 5: "0.48", 10: "0.598"},
                                           "floor": {1: "0.17", 5: "-", 10: "0.44"}}
    assert agrees("0.598", 260 / 435, 435) and agrees("0.598", 261 / 435, 435)
    assert not agrees("0.598", 262 / 435, 435) and not agrees("0.22", 0.2275, 435)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("default-data")
    build_default_dataset(data_dir)  # names the Debian package to install when a source is missing
    return held_out_only(read_pairs(data_dir / "eval.jsonl"), 0.2)


@pytest.mark.slow
def test_readme_held_out_figures_are_what_the_committed_model_scores(held_out) -> None:
    table = readme_held_out_table(README.read_text())
    assert set(ROWS) <= set(table), f"the README's held-out table lost a row: {sorted(set(ROWS) - set(table))}"
    reports: dict[tuple[tuple[str, bool], ...], EvalReport] = {}
    wrong = []
    for label, (settings, direction) in ROWS.items():
        key = tuple(sorted(settings.items()))
        if key not in reports:
            reports[key] = evaluate(load_encoder(**settings), held_out, progress=False)
        report = reports[key]
        queries = report.texts if direction == "text_to_image" else report.images
        for k, written in table[label].items():
            value = report.recall[f"{direction}_R@{k}"]
            if not agrees(written, value, queries):
                wrong.append(f"{label} R@{k}: README {written}, scored {value:.4f} ({round(value * queries)} of {queries})")
    assert not wrong, "the README's held-out table is out of date:\n" + "\n".join(wrong)

    full = reports[()]
    text = README.read_text()
    assert f"{full.images} images and {full.texts} captions" in text
    hits = round(full.recall["text_to_image_R@10"] * full.texts)
    stated = re.search(r"\((\d+) of (\d+) captions find their image\)", text)
    assert stated, "the README no longer states the text -> image R@10 as a count"
    assert int(stated.group(2)) == full.texts and abs(int(stated.group(1)) - hits) <= QUERY_SLACK, stated.group(0)
