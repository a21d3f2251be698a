"""One writer per run folder: a second `clipsearch train` or `clipsearch model` into a folder a live
run is writing is refused at once (it would resume from that run's checkpoints and interleave its
own with them); a killed holder leaves no stale lock; a recipe's trainer shares its recipe's hold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.cli import main
from models.folder_lock import FolderBusy, ensure_not_busy, folder_lock

from ..conftest import TINY

HOLDER = """
import sys, time
from pathlib import Path
from models.folder_lock import folder_lock
with folder_lock(Path(sys.argv[1]), "test writer"):
    print("held", flush=True)
    time.sleep(600)
"""


@contextmanager
def held_by_another_process(folder: Path) -> Iterator[int]:
    """A separate process holding `folder`'s lock until the block ends (then killed with SIGKILL)."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        yield process.pid
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def test_another_process_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with held_by_another_process(folder) as pid:
        with pytest.raises(FolderBusy, match=rf"another trainer \(pid {pid}\); wait for it to finish"):
            with folder_lock(folder, "trainer", reentrant=True):
                pass
        with pytest.raises(FolderBusy):
            ensure_not_busy(folder, "trainer")
    with folder_lock(folder, "trainer"):  # killed with SIGKILL: the kernel dropped its lock
        assert (folder / ".lock").read_text() == str(os.getpid())
    ensure_not_busy(folder, "trainer")


def test_reentrant_holds_share_and_plain_ones_do_not(tmp_path: Path) -> None:
    with folder_lock(tmp_path, "recipe", reentrant=True):
        with folder_lock(tmp_path, "trainer", reentrant=True):
            ensure_not_busy(tmp_path, "trainer", reentrant=True)
        # the inner hold's end did not release the outer one
        with pytest.raises(FolderBusy, match=f"another indexer \\(pid {os.getpid()}\\)"):
            with folder_lock(tmp_path, "indexer"):
                pass
    with folder_lock(tmp_path, "indexer"):
        pass


def test_train_and_model_into_a_busy_run_folder_are_refused_before_any_work(
        shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    with held_by_another_process(run) as pid:
        code = main(["train", str(shapes_folder), "--out", str(run), "--model", TINY, "--epochs", "1",
                     "--quiet", "--device", "cpu"])
        assert code == 2
        assert f"another training run is writing this run folder (pid {pid})" in caplog.text
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # no rejects.json, no checkpoint
        caplog.clear()
        data = tmp_path / "data"
        code = main(["model", "--run-dir", str(run), "--data-dir", str(data), "--epochs", "1",
                     "--restart-epochs", "0", "--no-export", "--quiet"])
        assert code == 2
        assert f"another clipsearch model is training the recipe in this run folder (pid {pid})" in caplog.text
        assert not data.exists()  # refused before the data set was built
    assert main(["train", str(shapes_folder), "--out", str(run), "--model", TINY, "--epochs", "1",
                 "--quiet", "--device", "cpu"]) == 0
    assert (run / "model").is_dir()
