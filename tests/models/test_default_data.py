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


def test_the_data_set_is_never_built_into_a_folder_of_something_else(tmp_path: Path) -> None:
    """`clipsearch model --data-dir PHOTOS` wrote its manifests and emoji into the photos' folder,
    over a train.jsonl of the user's own had there been one."""
    import pytest

    from models.default_data import build_default_dataset

    stamps, font = tmp_path / "stamps", tmp_path / "font.ttf"  # stand-ins: the refusal comes first
    stamps.mkdir()
    font.write_bytes(b"")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "train.jsonl").write_text("mine\n")
    (photos / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"photos holds other files \(holiday.jpg\): the default data set"):
        build_default_dataset(photos, stamps, font)
    assert (photos / "train.jsonl").read_text() == "mine\n"
    assert sorted(p.name for p in photos.iterdir()) == ["holiday.jpg", "train.jsonl"]
    with pytest.raises(FileExistsError, match="is a file: the default data set is built in a folder"):
        build_default_dataset(photos / "holiday.jpg", stamps, font)
