"""`clipsearch demo` (what `make demo` runs): indexes the gallery, serves it, and answers the
README's example queries with the table the README shows."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from app.demo import EXAMPLE_QUERIES, STAMPS_ROOT, run_demo
from app.lbtest import free_port_block

README = Path(__file__).resolve().parents[2] / "README.md"
# A row of the example table: | query | 0.77 `file.png`: caption<br>0.76 `other.png`: caption |
RESULT = re.compile(r"(\d\.\d\d) `([^`]+)`")
# The text tower's embeddings differ by ~1e-4 from one CPU to another: scores as printed (two
# decimals) may then round the other way, and results whose scores differ by less than that may
# swap places (the README's top 3 for "a piece of fruit" are within 0.003 of each other).
SCORE_SLACK = 0.011


def example_table(text: str) -> dict[str, list[tuple[float, str]]]:
    """query -> [(score, file)] of every example-table row in `text`."""
    rows: dict[str, list[tuple[float, str]]] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] in EXAMPLE_QUERIES:
            rows[cells[0]] = [(float(score), name) for score, name in RESULT.findall(cells[1])]
    return rows


@pytest.mark.slow
def test_demo_answers_the_readme_example_queries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole demo, as `make demo` runs it without a terminal, in its Markdown form: the README's
    example table is this output."""
    assert STAMPS_ROOT.is_dir(), "the stamps gallery is missing: run `make install` (Debian tuxpaint-stamps-default)"
    run_demo("default", STAMPS_ROOT, tmp_path / "index", "127.0.0.1", free_port_block(1), EXAMPLE_QUERIES, k=3,
             markdown=True, serve=False)
    printed = example_table(capsys.readouterr().out)
    stated = example_table(README.read_text())
    assert set(printed) == set(EXAMPLE_QUERIES) and set(stated) == set(EXAMPLE_QUERIES)
    for query in EXAMPLE_QUERIES:
        assert len(printed[query]) == 3
        assert sorted(n for _, n in printed[query]) == sorted(n for _, n in stated[query]), (query, printed[query])
        scores = {name: score for score, name in printed[query]}
        for score, name in stated[query]:
            assert abs(score - scores[name]) <= SCORE_SLACK, (query, name)


def test_demo_prints_the_curl_commands_it_ran(shapes_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The terminal form: the index summary, each query as a curl command a user can paste with
    its ranked answers, and an image -> text example; a second run reuses the index."""
    port = free_port_block(1)
    args = ("default", shapes_folder, tmp_path / "index", "127.0.0.1", port, ["a red circle"])
    assert run_demo(*args, k=2, markdown=False, serve=False) == 0
    first = capsys.readouterr().out
    images = len(list(shapes_folder.rglob("*.png")))
    assert f"(embedded {images}, reused 0)" in first
    assert "check      inputs == indexed + duplicates + rejected" in first
    commands = [line[2:] for line in first.splitlines() if line.startswith("$ curl")]
    assert len(commands) == 2, first
    search = shlex.split(commands[0])
    assert search[:3] == ["curl", "-s", f"http://127.0.0.1:{port}/v1/search/text"]
    assert search[-2:] == ["-d", '{"query": "a red circle", "k": 2}']
    answers = re.findall(r"^  ([12])\. (\d\.\d{3})  (\S+)  \((.*)\)$", first, re.MULTILINE)
    assert [a[0] for a in answers[:2]] == ["1", "2"] and float(answers[0][1]) >= float(answers[1][1])
    assert all((shapes_folder / source).is_file() and re.fullmatch(r"a \w+ \w+", caption)
               for _, _, source, caption in answers[:2]), answers
    assert "image -> text: captions nearest to the image of item 0" in first
    assert re.search(r"^  1\. \d\.\d{3}  a (red|green|blue|yellow) (circle|square)$", first, re.MULTILINE)

    assert run_demo(*args, k=2, markdown=False, serve=False) == 0
    second = capsys.readouterr().out
    assert f"(embedded 0, reused {images})" in second and "nothing changed" in second


def test_demo_on_a_gallery_without_captions_skips_image_to_text(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--gallery` of photos without captions: the text queries run, image -> text is said skipped
    (the server's 409 `empty_index`), not a failed demo."""
    gallery = tmp_path / "photos"
    gallery.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 32), color).save(gallery / f"{i}.png")
    args = ("default", gallery, tmp_path / "index", "127.0.0.1", free_port_block(1), ["a red circle"])
    assert run_demo(*args, k=2, markdown=False, serve=False) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^  [12]\. \d\.\d{3}  \d\.png  \(no caption\)$", out, re.MULTILINE)) == 2, out
    assert out.rstrip().endswith("image -> text: skipped, the gallery's images came without captions")


def test_demo_refuses_a_k_below_one_before_indexing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from app.cli import main

    assert main(["demo", "--no-serve", "--out", str(tmp_path / "index"), "-k", "0"]) == 2
    assert "-k must be at least 1, got 0" in caplog.text
    assert not (tmp_path / "index").exists()


def test_demo_passes_on_the_servers_refusal(shapes_folder: Path, tmp_path: Path) -> None:
    """A k above the server's limit ended in KeyError 'results', printed as "ERROR clipsearch: 'results'"."""
    args = ("default", shapes_folder, tmp_path / "index", "127.0.0.1", free_port_block(1), ["a red circle"])
    with pytest.raises(ValueError, match=r"the server refused /v1/search/text .*: 422 k: Input should be less "
                                         r"than or equal to 1000"):
        run_demo(*args, k=5000, markdown=False, serve=False)



def test_demo_on_a_taken_port_fails_at_once(shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture, taken_port: int) -> None:
    """A `make serve` left running on the port: the demo indexed the gallery, its own server then
    failed to bind, and it waited two minutes on the other server before a misleading error."""
    import models.encoder
    from app.cli import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a demo that had to be refused")

    monkeypatch.setattr(models.encoder, "load_encoder", no_load)
    code = main(["demo", "--no-serve", "--gallery", str(shapes_folder), "--out", str(tmp_path / "index"),
                 "--port", str(taken_port)])
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{taken_port}: Address already in use; another server is listening there" \
        in caplog.text
    assert not (tmp_path / "index").exists()


def test_a_demo_server_that_dies_is_noticed_at_once(tmp_path: Path) -> None:
    """The wait for /readyz ends as soon as the server's thread has ended, not after its timeout
    (which would say "did not answer 200 within 60 s")."""
    import threading

    from app.lbtest import wait_http

    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    with pytest.raises(RuntimeError, match="the server stopped before .* answered 200"):
        wait_http(f"http://127.0.0.1:{free_port_block(1)}/readyz", 60, thread=ended)
