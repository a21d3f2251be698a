"""Publishing a model directory: readers see the old one or the new one, never a half-written one."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.checkpoint import publish_dir


def _write(files: dict[str, str]):
    def build(staging: Path) -> None:
        staging.mkdir()
        for name, text in files.items():
            (staging / name).write_text(text)

    return build


def test_publish_replaces_the_target_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    publish_dir(target, _write({"a.txt": "old", "only-in-old.txt": "x"}))
    assert publish_dir(target, _write({"a.txt": "new"})) == target
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folder left


def test_a_failing_build_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "model"
    publish_dir(target, _write({"a.txt": "old"}))

    def half_then_fail(staging: Path) -> None:
        _write({"a.txt": "half"})(staging)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(target, half_then_fail)
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_a_killed_publish_are_cleared(tmp_path: Path) -> None:
    target = tmp_path / "model"
    for stale in ("model.tmp", "model.old"):  # what a kill mid-publish can leave
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "junk.txt").write_text("junk")
    publish_dir(target, _write({"a.txt": "new"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
