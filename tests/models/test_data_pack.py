"""Data packs: a run on the pack trains exactly as a run on the original files, holds out the same
images, and bad input is reported, not lost."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from models.config import AugmentConfig, TrainConfig
from models.data import read_manifest, split_pairs
from models.data_pack import PACK_MARKER, is_pack, read_pack_record, write_pack
from models.encoder import create_model
from models.train import Trainer
from models.train_data import cache_side

from ..conftest import TINY


def _manifest(shapes_folder: Path, root: Path) -> Path:
    """A manifest in its own folder: large and small images (the large ones shrink in the pack), a
    `_mirror` copy (split with its original), a row with a group of its own, an image that does not
    decode and a row without a caption."""
    images = root / "images"
    images.mkdir(parents=True)
    rows = []
    for number, png in enumerate(sorted(shapes_folder.rglob("*.png"))[::2]):
        image = Image.open(png).convert("RGB")
        if number % 2:  # larger than the trainer keeps: the pack stores the shrunk copy
            image = image.resize((150, 110), Image.Resampling.BICUBIC)
        target = images / f"{png.parent.name}-{png.stem}.png"
        image.save(target)
        caption = png.with_suffix(".txt").read_text().splitlines()[0]
        rows.append({"image": f"images/{target.name}", "caption": caption, "kind": "shape"})
    image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(images / f"{target.stem}_mirror.png")
    rows.append({"image": f"images/{target.stem}_mirror.png", "caption": caption, "kind": "mirror"})
    rows[0]["group"] = "chosen-group"
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows.append({"image": "images/broken.png", "caption": "a broken picture"})
    rows.append({"image": rows[1]["image"], "caption": ""})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return manifest


def _config(out: Path) -> TrainConfig:
    return TrainConfig(
        output_dir=out, epochs=2, batch_size=16, lr=2e-3, warmup_steps=2, val_fraction=0.25,
        checkpoint_every=100, lock_text=True,
        augment=AugmentConfig(scale=(0.5, 1.0), trivial_augment=True), device="cpu", progress=False, seed=3,
    )


def _trained(manifest: Path, out: Path) -> Trainer:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    trainer = Trainer(loaded, open_clip.get_tokenizer(loaded.registered_name), read_manifest(manifest), _config(out))
    trainer.run()
    return trainer


def test_a_pack_trains_exactly_as_its_source(shapes_folder: Path, tmp_path: Path) -> None:
    source = _manifest(shapes_folder, tmp_path / "source")
    side = cache_side(create_model(TINY).preprocess_config)
    record = write_pack([source], tmp_path / "pack", side, progress=False)

    assert is_pack(tmp_path / "pack") and read_pack_record(tmp_path / "pack") == record
    assert record["side"] == side == 64 and record["images"] == len(list((tmp_path / "pack/images").iterdir()))
    assert list(record["rejected"]) == [str(tmp_path / "source/images/broken.png")]
    assert record["rows_skipped"] == {"bad_image": 1, "empty_caption": 1}  # every row accounted for
    assert all(max(Image.open(p).size) <= side for p in (tmp_path / "pack/images").iterdir())

    original, packed = read_manifest(source), read_manifest(tmp_path / "pack/train.jsonl")
    usable = [p for p in original.pairs if p.image.name != "broken.png"]
    assert [(p.caption, p.extra["kind"]) for p in packed.pairs] == [(p.caption, p.extra.get("kind")) for p in usable]
    assert packed.pairs[0].extra["group"] == "chosen-group"
    # the same images held out, though every path changed (a packed file is named NNNNN-STEM.png)
    held = [[p.image.stem for p in split_pairs(original, 0.25, 3)[1]],
            [p.image.stem.split("-", 1)[1] for p in split_pairs(packed, 0.25, 3)[1]]]
    assert held[0] and held[0] == held[1] and len(set(held[0])) > 1

    reference = _trained(source, tmp_path / "run-source")
    from_pack = _trained(tmp_path / "pack/train.jsonl", tmp_path / "run-pack")
    assert reference.progress.step == from_pack.progress.step > 0
    want, got = reference.model.state_dict(), from_pack.model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # bit for bit: the same pixels, the same run

    def timeless(metrics: list[dict]) -> list[dict]:
        return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in metrics]

    assert timeless(reference.metrics) == timeless(from_pack.metrics)  # its monitor too


def test_a_pack_is_published_whole(shapes_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack that fails half-way leaves no folder that looks complete, and an older pack stands."""
    import models.data_pack as data_pack

    source = _manifest(shapes_folder, tmp_path / "source")
    write_pack([source], tmp_path / "pack", 64, progress=False)
    before = read_pack_record(tmp_path / "pack")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(data_pack, "small_copy", fail)
    with pytest.raises(OSError, match="disk full"):
        write_pack([source], tmp_path / "pack", 32, progress=False)
    assert read_pack_record(tmp_path / "pack") == before
    with pytest.raises(FileNotFoundError, match=f"{PACK_MARKER} is missing"):
        read_pack_record(tmp_path)
    with pytest.raises(ValueError, match="distinct file names"):
        write_pack([source, source], tmp_path / "other", 64, progress=False)


def test_a_pack_takes_any_manifest_format_and_writes_jsonl(shapes_folder: Path, tmp_path: Path) -> None:
    source = _manifest(shapes_folder, tmp_path / "source")
    rows = [json.loads(line) for line in source.read_text().splitlines()][:3]
    csv_manifest = tmp_path / "source" / "extra.csv"
    csv_manifest.write_text("path,text\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    record = write_pack([source, csv_manifest], tmp_path / "pack", 64, progress=False)
    assert record["manifests"] == ["train.jsonl", "extra.jsonl"]
    packed = read_manifest(tmp_path / "pack" / "extra.jsonl")
    assert [p.caption for p in packed.pairs] == [r["caption"] for r in rows]
    assert all(p.image.is_file() and p.image.parent == tmp_path / "pack" / "images" for p in packed.pairs)


def test_the_recipe_trains_from_a_pack_without_building_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    import models.default_model as recipe

    def no_build(data_dir: Path) -> Path:
        raise AssertionError("the recipe rebuilt its data from the Debian packages")

    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / PACK_MARKER).write_text(json.dumps({"format": 1, "side": recipe.recipe_cache_side()}))
    monkeypatch.setattr(recipe, "build_default_dataset", no_build)
    assert recipe.recipe_manifest(pack) == pack / "train.jsonl"
    assert not caplog.records

    (pack / PACK_MARKER).write_text(json.dumps({"format": 1, "side": 96}))
    assert recipe.recipe_manifest(pack) == pack / "train.jsonl"
    assert "stores images at 96 px, the recipe keeps 128 px copies" in caplog.text
    built: list[Path] = []
    monkeypatch.setattr(recipe, "build_default_dataset", lambda data_dir: built.append(data_dir) or data_dir / "x")
    assert recipe.recipe_manifest(tmp_path / "plain") == tmp_path / "plain" / "x" and built == [tmp_path / "plain"]


def test_model_pack_writes_the_recipe_data_as_a_pack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`clipsearch model --pack DIR` builds the data set, packs every manifest of it at the
    recipe's side, and trains nothing."""
    import models.default_model as recipe
    from models.cli import main

    calls: list[tuple[list[str], Path, int]] = []

    def record(manifests: list[Path], out_dir: Path, side: int, progress: bool = True) -> dict:
        calls.append(([m.name for m in manifests], out_dir, side))
        return {"format": 1, "side": side, "images": 3, "rejected": {"x.png": "truncated: ..."}}

    monkeypatch.setattr(recipe, "build_default_dataset", lambda data_dir: data_dir / "train.jsonl")
    monkeypatch.setattr(recipe, "write_pack", record)
    monkeypatch.setattr(recipe, "train_default_model", lambda *a, **k: pytest.fail("--pack trained"))
    assert main(["model", "--pack", str(tmp_path / "pack"), "--data-dir", str(tmp_path / "d"), "--quiet"]) == 0
    assert calls == [(["train.jsonl", "eval.jsonl", "stamps.jsonl", "emoji.jsonl"], tmp_path / "pack", 128)]
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 3 and printed["rejected"] == 1 and printed["pack"] == str(tmp_path / "pack")


def test_recipe_side_follows_its_architecture() -> None:
    import models.default_model as recipe

    assert recipe.recipe_cache_side() == 2 * 64
    assert recipe.default_train_config(Path("x"), workers=4).num_workers == 4
