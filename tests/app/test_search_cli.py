"""`clipsearch search`: an index queried from the terminal gives the exact top matches, filtered
as asked, as a ranked list or the API's JSON; bad requests end in one line, before the model loads
where they can."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.search_cli import parse_condition
from indexer.artifacts import load_index
from indexer.reader import open_source
from indexer.runner import IndexConfig, run_index
from models import load_encoder

from ..conftest import make_shapes_folder


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("searchcli")
    data = make_shapes_folder(root / "data", per_class=3)
    run_index(open_source(data), load_encoder(device="cpu"), IndexConfig(out_dir=root / "index", progress=False))
    return data, root / "index"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(["search", *argv])
    return code, capsys.readouterr().out


def test_a_text_query_gives_the_exact_top_k(indexed, capsys) -> None:
    data, index_dir = indexed
    code, out = _run(capsys, "a red circle", "--index", str(index_dir), "-k", "4", "--json")
    assert code == 0
    results = json.loads(out)["results"]
    index = load_index(index_dir)
    scores = np.asarray(index.embeddings) @ load_encoder(device="cpu").encode_texts(["a red circle"])[0]
    assert [r["id"] for r in results] == np.argsort(-scores)[:4].tolist()
    np.testing.assert_allclose([r["score"] for r in results], np.sort(scores)[::-1][:4], atol=1e-5)
    assert all((data / r["source"]).is_file() for r in results)

    code, out = _run(capsys, "a red circle", "--index", str(index_dir), "-k", "4")
    lines = out.splitlines()
    assert [line.split()[2] for line in lines] == [r["source"] for r in results]
    assert lines[0].startswith("  1. ") and lines[0].endswith(f"({results[0]['caption']})")


def test_filters_and_the_text_side(indexed, capsys) -> None:
    _, index_dir = indexed
    code, out = _run(capsys, "a red circle", "--index", str(index_dir), "--json", "-k", "20",
                     "--prefix", "source=blue_square/", "--where", "width=48")
    found = json.loads(out)["results"]
    assert code == 0 and len(found) == 3  # the three blue squares, all 48 px wide
    assert all(r["source"].startswith("blue_square/") and r["width"] == 48 for r in found)
    code, out = _run(capsys, "x", "--index", str(index_dir), "--where", "width=5")
    assert code == 0 and out == "no results (none match the filters)\n"
    image = next((indexed[0] / "green_circle").glob("*.png"))
    code, out = _run(capsys, "--image", str(image), "--index", str(index_dir), "--target", "texts", "-k", "1")
    assert code == 0 and out.startswith("  1. ") and "a green circle  (items " in out


@pytest.mark.parametrize(("argv", "message"), [
    ((), "give a query text or --image PATH (one of them)"),
    (("a", "--image", "x.png"), "give a query text or --image PATH (one of them)"),
    (("  ",), "the query text is blank"),
    (("a", "-k", "0"), "-k must be at least 1, got 0"),
    (("a", "--where", "width"), "--where takes FIELD=VALUE, got 'width'"),
    (("a", "--target", "texts", "--prefix", "source=a"), "--where and --prefix apply to image searches only"),
    (("--image", "missing.png"), "missing.png: cannot read file"),
])
def test_bad_requests_end_in_one_line(indexed, caplog, argv, message) -> None:
    caplog.set_level(logging.ERROR)
    assert main(["search", "--index", str(indexed[1]), *argv]) == 2
    assert message in caplog.text


def test_an_index_of_another_model_is_refused(indexed, caplog) -> None:
    from tests.conftest import TINY

    caplog.set_level(logging.ERROR)
    assert main(["search", "a", "--index", str(indexed[1]), "--model", TINY, "--device", "cpu"]) == 2
    assert "was made with model clipsearch-minilm-cnn/" in caplog.text
    assert "but the loaded model is clipsearch-tiny/" in caplog.text


def test_condition_values_read_as_json_when_they_are_numbers_or_booleans() -> None:
    assert parse_condition("width=48", "--where") == ("width", 48)
    assert parse_condition("ratio=0.5", "--where") == ("ratio", 0.5)
    assert parse_condition("public=true", "--where") == ("public", True)
    assert parse_condition("album=summer 2019", "--where") == ("album", "summer 2019")
    assert parse_condition('tags=["a"]', "--where") == ("tags", '["a"]')
    assert parse_condition("note=a=b", "--where") == ("note", "a=b")
