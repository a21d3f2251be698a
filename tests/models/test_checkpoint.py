"""Publishing a model directory: readers see the old one or the new one, never a half-written one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from models import checkpoint
from models.checkpoint import exchange_dirs, publish_dir


def _write(files: dict[str, str]):
    def build(staging: Path) -> None:
        staging.mkdir()
        for name, text in files.items():
            (staging / name).write_text(text)

    return build


def test_publish_replaces_the_target_whole(tmp_path: Path) -> None:
    target = tmp_path / "model"
    publish_dir(target, _write({"a.txt": "old", "only-in-old.txt": "x"}), marker="a.txt")
    assert publish_dir(target, _write({"a.txt": "new"}), marker="a.txt") == target
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or retired folder left


def test_a_failing_build_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "model"
    publish_dir(target, _write({"a.txt": "old"}), marker="a.txt")

    def half_then_fail(staging: Path) -> None:
        _write({"a.txt": "half"})(staging)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(target, half_then_fail, marker="a.txt")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_leftovers_of_a_killed_publish_are_cleared(tmp_path: Path) -> None:
    target = tmp_path / "model"
    for stale in ("model.tmp", "model.old"):  # what a kill mid-publish can leave
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "junk.txt").write_text("junk")
    publish_dir(target, _write({"a.txt": "new"}), marker="a.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_swaps_two_directories_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write({"from-a.txt": "a"})(a)
    _write({"from-b.txt": "b"})(b)
    assert exchange_dirs(a, b)  # tmpfs and ext4 both support it
    assert [p.name for p in a.iterdir()] == ["from-b.txt"]
    assert [p.name for p in b.iterdir()] == ["from-a.txt"]
    with pytest.raises(FileNotFoundError):
        exchange_dirs(a, tmp_path / "missing")


def test_publish_without_an_atomic_exchange_falls_back_to_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint, "exchange_dirs", lambda a, b: False)
    target = tmp_path / "model"
    publish_dir(target, _write({"a.txt": "old"}), marker="a.txt")
    publish_dir(target, _write({"a.txt": "new"}), marker="a.txt")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_replacing_a_directory_is_one_exchange_not_two_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model"
    publish_dir(target, _write({"a.txt": "old"}), marker="a.txt")
    renamed: list[str] = []
    real_rename = Path.rename

    def watched_rename(self: Path, to: Path):  # the two-rename swap, where `target` goes missing
        renamed.append(self.name)
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", watched_rename)
    publish_dir(target, _write({"a.txt": "new"}), marker="a.txt")
    assert renamed == []
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_only_a_directory_of_the_same_kind_is_replaced(tmp_path: Path) -> None:
    """`clipsearch model --pack PATH` put a pack in the place of whatever PATH was: a file was moved
    to PATH.tmp (and the next run then failed on it), a folder of photos would have been deleted."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    for target in (photos, a_file):
        with pytest.raises(FileExistsError, match=f"{target} exists and is not what this writes"):
            publish_dir(target, _write({"a.txt": "new"}), marker="a.txt")
    assert (photos / "holiday.jpg").read_bytes() == b"precious" and a_file.read_text() == "mine"
    assert not (tmp_path / "photos.tmp").exists() and not (tmp_path / "notes.txt.tmp").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (publish_dir(empty, _write({"a.txt": "new"}), marker="a.txt") / "a.txt").read_text() == "new"
    (tmp_path / "out.tmp").write_text("in the way")
    with pytest.raises(FileExistsError, match="out.tmp is a file where a working folder goes"):
        publish_dir(tmp_path / "out", _write({"a.txt": "new"}), marker="a.txt")
    assert (tmp_path / "out.tmp").read_text() == "in the way"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("rows", [0, 1, 1000])
def test_an_npy_written_in_chunks_is_the_file_np_save_writes(tmp_path: Path, dtype: str, rows: int) -> None:
    import numpy as np

    array = np.random.default_rng(rows).standard_normal((rows, 24)).astype(np.float32)
    chunks = [array[i:i + 333] for i in range(0, rows, 333)]
    checkpoint.write_npy_rows(tmp_path / "chunked.npy", (rows, 24), dtype, iter(chunks))
    np.save(tmp_path / "whole.npy", array.astype(dtype))
    assert (tmp_path / "chunked.npy").read_bytes() == (tmp_path / "whole.npy").read_bytes()
    np.testing.assert_array_equal(np.load(tmp_path / "chunked.npy"), array.astype(dtype))


def test_chunks_that_do_not_fill_the_shape_leave_no_file(tmp_path: Path) -> None:
    import numpy as np

    target = tmp_path / "v.npy"
    with pytest.raises(ValueError, match="3 rows written for an array of 4"):
        checkpoint.write_npy_rows(target, (4, 2), np.float32, [np.zeros((3, 2))])
    with pytest.raises(ValueError, match="a chunk of shape"):
        checkpoint.write_npy_rows(target, (4, 2), np.float32, [np.zeros((4, 3))])
    assert list(tmp_path.iterdir()) == []
