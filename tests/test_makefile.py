"""The Makefile's targets: listed by `make help`, and user paths handed to the CLI as one argument.

`make -n` prints the commands a target would run without running them, so these tests read the
exact argv each target gives `clipsearch`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(*args: str) -> list[list[str]]:
    """The `clipsearch` command lines `make -n ARGS` would run, split as the shell splits them."""
    done = subprocess.run(
        ["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    return [
        shlex.split(line)
        for line in done.stdout.splitlines()
        if line.split(" ", 1)[0].endswith("/clipsearch")
    ]


def test_help_lists_every_phony_target() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())  # type: ignore[union-attr]
    listed = subprocess.run(
        ["make", "help"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    names = {re.sub(r"\x1b\[[0-9;]*m", "", line).split()[0] for line in listed.splitlines() if line.strip()}
    assert phony <= names, f"targets without a '## ' help text: {sorted(phony - names)}"


@pytest.mark.parametrize(
    ("target", "variables", "expected"),
    [
        ("index", {"DATA": "/tmp/my photos", "OUT": "/tmp/an index"},
         ["index", "/tmp/my photos", "--out", "/tmp/an index", "--model", "default"]),
        ("train", {"DATA": "/tmp/my pairs.csv", "OUT": "/tmp/a run", "MODEL": "/tmp/a model"},
         ["train", "/tmp/my pairs.csv", "--out", "/tmp/a run", "--model", "/tmp/a model"]),
        ("eval", {"DATA": "/tmp/my pairs.csv", "MODEL": "/tmp/a model"},
         ["eval", "/tmp/my pairs.csv", "--model", "/tmp/a model"]),
        ("serve", {"INDEX": "/tmp/an index", "PORT": "8123"},
         ["serve", "--index", "/tmp/an index", "--model", "default", "--port", "8123"]),
        ("demo", {"MODEL": "/tmp/a model", "PORT": "8124"}, ["demo", "--model", "/tmp/a model", "--port", "8124"]),
    ],
)
def test_paths_with_spaces_reach_the_cli_whole(target: str, variables: dict[str, str], expected: list[str]) -> None:
    # `make index DATA="my photos"` once ran `clipsearch index my photos`: "unrecognized arguments"
    commands = _dry_run(target, *(f"{key}={value}" for key, value in variables.items()))
    assert len(commands) == 1, commands
    assert commands[0][1:] == expected


def test_train_maps_the_default_model_to_the_trainable_architecture() -> None:
    (command,) = _dry_run("train", "DATA=pairs.csv")
    assert command[1:] == ["train", "pairs.csv", "--out", "runs/train", "--model", "clipsearch-tiny"]
