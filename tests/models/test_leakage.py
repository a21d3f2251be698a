"""Byte-identical copies across the train / held-out split: found, reported by train and eval, and
the remedy (one `group` for the copies) removes them."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest

from app.cli import main
from models.data import is_held_out, pair_split_key, read_pairs
from models.leakage import copies_across_split

from ..conftest import TINY, draw_shape


def _png(path: Path, seed: int, color: str = "red") -> Path:
    draw_shape(color, "circle", random.Random(seed)).save(path)
    return path


def test_copies_are_found_by_bytes_not_by_name_or_size(tmp_path: Path) -> None:
    train = [_png(tmp_path / f"t{i}.png", i) for i in range(4)]
    copy = tmp_path / "held_copy.png"
    shutil.copyfile(train[2], copy)
    same_size = tmp_path / "held_same_size.png"  # same length as a training file, other bytes
    data = bytearray(train[1].read_bytes())
    data[-20] ^= 0xFF
    same_size.write_bytes(bytes(data))
    other = _png(tmp_path / "held_other.png", 99, "blue")
    gone = tmp_path / "held_gone.png"  # deleted since decoding: no copy, no crash
    assert copies_across_split(train, [other, same_size, copy, gone]) == [(copy, train[2])]
    # the same file on both sides is one file, not a copy; no candidates at all: nothing read
    assert copies_across_split(train, [train[0]]) == []
    assert copies_across_split([], [copy]) == []


def _manifest_with_a_straddling_copy(root: Path) -> tuple[Path, Path, Path]:
    """A manifest of 40 generated images plus a copy of one under a name the split puts on the
    other side of it."""
    images = [_png(root / f"img{i:02d}.png", i, ["red", "blue", "green", "yellow"][i % 4]) for i in range(40)]
    rows = [{"image": image.name, "caption": f"shape number {i}"} for i, image in enumerate(images)]
    held = [image for image in images if is_held_out(image.stem, 0.25)]
    trained = [image for image in images if not is_held_out(image.stem, 0.25)]
    assert held and trained
    # a copy of a training image whose own name falls on the held-out side
    name = next(f"copy{i}" for i in range(1000) if is_held_out(f"copy{i}", 0.25))
    copy = root / f"{name}.png"
    shutil.copyfile(trained[0], copy)
    rows.append({"image": copy.name, "caption": "a copy"})
    manifest = root / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest, copy, trained[0]


def test_train_and_eval_report_held_out_copies(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    manifest, copy, original = _manifest_with_a_straddling_copy(data)
    common = ["--model", TINY, "--quiet", "--device", "cpu"]
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(manifest), "--out", str(tmp_path / "run"), "--epochs", "1",
                     "--val-fraction", "0.25", *common]) == 0
    assert "1 of" in caplog.text and "byte-for-byte copies of training images" in caplog.text
    assert f"{copy} = {original}" in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["held_out_copies"] == [[str(copy), str(original)]]

    caplog.clear()
    capsys.readouterr()
    assert main(["eval", str(manifest), "--held-out", "0.25", *common]) == 0
    assert json.loads(capsys.readouterr().out)["held_out_copies"] == 1
    assert "byte-for-byte copies" in caplog.text

    # the remedy the warning names: the copies share a group, so they fall on one side together
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["group"] = original.name if row["image"] in (copy.name, original.name) else row["image"]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pair_set = read_pairs(manifest)
    sides = {is_held_out(pair_split_key(p, pair_set.root), 0.25) for p in pair_set.pairs
             if p.image.name in (copy.name, original.name)}
    assert len(sides) == 1
    caplog.clear()
    capsys.readouterr()
    assert main(["eval", str(manifest), "--held-out", "0.25", *common]) == 0
    assert json.loads(capsys.readouterr().out)["held_out_copies"] == 0
    assert "byte-for-byte" not in caplog.text
