"""Pair readers: every input row is either a pair or a counted skip, never an exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.data import caption_file, read_pairs, split_pairs
from models.evaluate import held_out_only


def test_captioned_folder(shapes_folder: Path) -> None:
    pairs = read_pairs(shapes_folder)
    assert len(pairs.pairs) == 8 * 24
    assert {p.caption for p in pairs.pairs} == {f"a {c} {s}" for c in ("red", "green", "blue", "yellow")
                                               for s in ("circle", "square")}
    assert all(p.image.is_absolute() for p in pairs.pairs)


def test_folder_counts_images_without_captions(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("   \n")
    (tmp_path / "c.jpg").write_bytes(b"x")
    (tmp_path / "c.txt").write_text("a cat\n")
    pairs = read_pairs(tmp_path)
    assert [p.caption for p in pairs.pairs] == ["a cat"]
    assert pairs.skipped == {"missing_caption": 1, "empty_caption": 1}
    assert pairs.rows == 3


def test_jsonl_manifest_bad_rows_counted(tmp_path: Path) -> None:
    lines = [
        json.dumps({"image": "x/1.png", "caption": "one", "license": "cc0"}),
        json.dumps({"image": "", "caption": "no image"}),
        json.dumps({"image": "3.png", "caption": "  "}),
        "{not json",
        json.dumps(["a", "list"]),
        "",
        json.dumps({"image": "4.png", "caption": "multi\nline"}),
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    pairs = read_pairs(tmp_path / "m.jsonl")
    assert [p.caption for p in pairs.pairs] == ["one", "multi"]
    assert pairs.pairs[0].image == (tmp_path / "x/1.png").resolve()
    assert pairs.pairs[0].extra == {"license": "cc0"}
    assert pairs.skipped == {"missing_image_path": 1, "empty_caption": 1, "invalid_row": 2}
    assert pairs.rows == 6  # the blank line is not a row


def test_csv_manifest_with_explicit_columns(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("file_name,alt,score\na.png,a dog,0.5\nb.png,,0.1\n")
    with pytest.raises(ValueError, match="no image column"):
        read_pairs(tmp_path / "m.csv")
    pairs = read_pairs(tmp_path / "m.csv", image_column="file_name", caption_column="alt")
    assert [(p.image.name, p.caption, p.extra) for p in pairs.pairs] == [("a.png", "a dog", {"score": "0.5"})]
    assert pairs.skipped == {"empty_caption": 1}
    with pytest.raises(ValueError, match="no caption column"):
        read_pairs(tmp_path / "m.csv", image_column="file_name", caption_column="nope")


def test_karpathy_json(tmp_path: Path) -> None:
    data = {"images": [
        {"filename": "1.jpg", "filepath": "", "split": "test",
         "sentences": [{"raw": "A dog runs."}, {"raw": ""}, {"tokens": ["a", "brown", "dog"]}]},
        {"filename": "2.jpg", "split": "train", "sentences": [{"raw": "A cat."}]},
    ]}
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="images-root"):
        read_pairs(tmp_path / "dataset_flickr30k.json")
    (tmp_path / "imgs").mkdir()
    test = read_pairs(tmp_path / "dataset_flickr30k.json", images_root=tmp_path / "imgs")
    assert [p.caption for p in test.pairs] == ["A dog runs.", "a brown dog"]
    assert test.pairs[0].image == (tmp_path / "imgs" / "1.jpg").resolve()
    assert test.skipped == {"empty_caption": 1}
    everything = read_pairs(tmp_path / "dataset_flickr30k.json", images_root=tmp_path, karpathy_split=None)
    assert len(everything.pairs) == 3


@pytest.mark.parametrize(("text", "message"), [
    ("not json", r"k.json is not JSON \(Expecting value"),
    ('{"images": 5}', r'k.json is not a Karpathy-split JSON: it needs an "images" list'),
    ('[1, 2]', r'k.json is not a Karpathy-split JSON'),
    ('{"images": [{"filename": "1.jpg", "split": "train", "sentences": [{"raw": "A cat."}]}]}',
     r"k.json has no image in split 'test'; its splits: train \(1\)"),
])
def test_a_karpathy_json_gone_wrong_is_named(tmp_path: Path, text: str, message: str) -> None:
    """`{"images": 5}` ended in a TypeError traceback; a set without a test split said only "no usable pairs"."""
    (tmp_path / "k.json").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_pairs(tmp_path / "k.json", images_root=tmp_path)


def test_karpathy_entries_that_are_not_entries_are_counted(tmp_path: Path) -> None:
    data = {"images": [7, {"split": "test"}, {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "A dog."}, 5]}]}
    (tmp_path / "k.json").write_text(json.dumps(data))
    pairs = read_pairs(tmp_path / "k.json", images_root=tmp_path)
    assert [p.caption for p in pairs.pairs] == ["A dog."]
    assert pairs.skipped == {"invalid_row": 3}
    with pytest.raises(FileNotFoundError, match="--images-root .*nowhere is not a folder"):
        read_pairs(tmp_path / "k.json", images_root=tmp_path / "nowhere")


def test_missing_source_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_pairs(tmp_path / "nothing.csv")
    (tmp_path / "m.xml").write_text("<x/>")
    with pytest.raises(ValueError, match="unsupported manifest"):
        read_pairs(tmp_path / "m.xml")


def test_split_is_by_image_and_deterministic(shapes_folder: Path) -> None:
    pairs = read_pairs(shapes_folder)
    train, held = split_pairs(pairs, 0.25)
    again_train, again_held = split_pairs(pairs, 0.25)
    assert held == again_held and train == again_train
    assert not {p.image for p in train} & {p.image for p in held}
    assert 0.1 < len(held) / len(pairs.pairs) < 0.4


def test_rows_pinned_to_train_are_never_held_out(tmp_path: Path) -> None:
    rows = [{"image": f"{i}.png", "caption": f"c{i}", "split": "train"} for i in range(200)]
    rows += [{"image": f"x{i}.png", "caption": f"d{i}"} for i in range(200)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held = split_pairs(read_pairs(tmp_path / "m.jsonl"), 0.5)
    assert held and all(p.image.name.startswith("x") for p in held)
    assert sum(p.image.name[0].isdigit() for p in train) == 200


def test_rows_of_one_group_share_a_side_of_the_split(tmp_path: Path) -> None:
    # Two drawings of each object: grouped, they never straddle the split (no held-out leak).
    rows = [{"image": f"{style}-{i}.png", "caption": f"object {i}", "group": f"object-{i}"}
            for i in range(100) for style in ("a", "b")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pair_set = read_pairs(tmp_path / "m.jsonl")
    train, held = split_pairs(pair_set, 0.5)
    assert held and train
    held_groups = {p.extra["group"] for p in held}
    assert not held_groups & {p.extra["group"] for p in train}
    assert len(held) == 2 * len(held_groups)
    assert {p.image for p in held_out_only(pair_set, 0.5).pairs} == {p.image for p in held}


def test_a_training_manifest_counts_urls_apart(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("image,caption\nhttp://example.com/a.png,a cat\nC://photos/b.png,a dog\n"
                                    "imgs/c.png,a bird\n")
    pairs = read_pairs(tmp_path / "m.csv")
    assert [p.caption for p in pairs.pairs] == ["a dog", "a bird"]  # "C:" is a drive letter, not a scheme
    assert pairs.skipped == {"remote_url": 1}



def test_a_caption_file_may_be_named_in_capitals(tmp_path: Path) -> None:
    """`B.png` with `B.TXT` (a dataset made on Windows) counted as "missing_caption". The indexer's
    folder reader takes its captions through the same `caption_file`."""
    from PIL import Image

    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a cat\n")
    (tmp_path / "b.TXT").write_text("a dog\n")
    assert sorted(p.caption for p in read_pairs(tmp_path).pairs) == ["a cat", "a dog"]
    assert caption_file(tmp_path / "b.png") == tmp_path / "b.TXT" and caption_file(tmp_path / "c.png") is None


def test_a_captioned_folder_leaves_hidden_files_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """macOS's `._a.png` next to each photo, a `.thumbnails/` cache: not the user's pairs (a `._`
    file counted as a missing caption, a cached thumbnail trained as a second copy of its photo)."""
    import logging

    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / ".thumbnails" / "a.png")
    (tmp_path / ".thumbnails" / "a.txt").write_text("a red square\n")
    with caplog.at_level(logging.INFO):
        pair_set = read_pairs(tmp_path)
    assert [p.image.name for p in pair_set.pairs] == ["a.png"] and not pair_set.skipped
    assert "left out 2 hidden image file(s)" in caplog.text


def test_manifests_as_other_tools_write_them(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark, which hid the image column ('\\ufeffimage');
    a Latin-1 CSV was a bare UnicodeDecodeError; JSON's lone surrogates ("\\udce9", how Python's
    json.dumps writes an undecodable file name) crashed every writer of the rows downstream."""
    from models.data import read_manifest_rows

    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfimage,caption\r\na.png,a caf\xc3\xa9\r\n")
    assert read_manifest_rows(tmp_path / "excel.csv") == [{"image": "a.png", "caption": "a café"}]
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"image": "a.png"}\n')
    assert read_manifest_rows(tmp_path / "bom.jsonl") == [{"image": "a.png"}]
    (tmp_path / "latin1.csv").write_bytes(b"image,caption\na.png,caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1.csv is not UTF-8 text \(byte 0xe9 at offset 23\); save it as UTF-8"):
        read_manifest_rows(tmp_path / "latin1.csv")
    (tmp_path / "s.jsonl").write_text('{"image": "b\\udce9.png", "caption": "caf\\udce9", "tags": ["x\\ud800", {"k": "\\udfff"}]}\n')
    (row,) = read_manifest_rows(tmp_path / "s.jsonl")
    assert row == {"image": "b\ufffd.png", "caption": "caf\ufffd", "tags": ["x\ufffd", {"k": "\ufffd"}]}
    json.dumps(row, ensure_ascii=False).encode("utf-8")  # what the writers do: no UnicodeEncodeError
