"""The default model's data builder: stamp descriptions and category phrases."""

from __future__ import annotations

from pathlib import Path

from models.default_data import category_phrases, stamp_caption


def test_stamp_captions_and_category_phrases(tmp_path: Path) -> None:
    folder = tmp_path / "animals" / "birds"
    folder.mkdir(parents=True)
    (folder / "owl.txt").write_text("An owl.\nSecond line is ignored.\n", encoding="utf-8")
    assert stamp_caption(folder / "owl.png") == "An owl."
    assert stamp_caption(folder / "owl_mirror.png") == "An owl."  # a mirror shares its original's text
    assert stamp_caption(folder / "crow.png") == ""  # no description: the builder skips and counts it
    assert category_phrases(folder / "owl.png", tmp_path) == ["an animal", "a bird"]


def test_unlisted_folders_add_no_phrase(tmp_path: Path) -> None:
    assert category_phrases(tmp_path / "cartoon" / "x.png", tmp_path) == []
    assert category_phrases(tmp_path / "x.png", tmp_path) == []
