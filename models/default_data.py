"""The default model's training data, built offline from two Debian packages.

- `tuxpaint-stamps-default`: photos and drawings under /usr/share/tuxpaint/stamps, each with a
  `.txt` whose first line is an English description, sorted into category folders. Each stamp
  gets its description and a short phrase for its category folder ("a bird", "a road sign").
- `fonts-noto-color-emoji`: every single-code-point emoji rendered in colour; its Unicode name
  is the caption ("red apple").

Output: JSONL manifests in the chosen folder (`train.jsonl`: everything; `eval.jsonl`: one
description per stamp and emoji, the evaluation set; `stamps.jsonl`; `emoji.jsonl`), with rendered
emoji under `emoji/`.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from models.checkpoint import foreign_entries
from models.data import clean_caption

logger = logging.getLogger(__name__)

STAMPS_ROOT = Path("/usr/share/tuxpaint/stamps")
MANIFESTS = ("train.jsonl", "eval.jsonl", "stamps.jsonl", "emoji.jsonl")  # what `build_default_dataset` writes
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_BITMAP_SIZE = 109  # the only size the CBDT bitmap font offers

# Category folder -> caption phrase. Folders not listed ("cartoon", "us") add no phrase.
CATEGORY_PHRASES: dict[str, str] = {
    "animals": "an animal", "amphibians": "an amphibian", "birds": "a bird", "dinosaur": "a dinosaur",
    "fish": "a fish", "insects": "an insect", "lizards": "a lizard", "mammals": "a mammal",
    "apes": "an ape", "aquatic": "a sea mammal", "bears": "a bear", "bovines": "a cow",
    "camel": "a camel", "cats": "a cat", "deer": "a deer", "dogs": "a dog", "equines": "a horse",
    "rodents": "a rodent", "marsupials": "a marsupial", "shellfish": "a shellfish",
    "tux": "Tux the penguin", "clothes": "clothing", "armor": "armor", "hats": "a hat",
    "food": "food", "dessert": "a dessert", "fruit": "a piece of fruit", "nuts": "nuts",
    "spices": "a spice", "vegetables": "a vegetable", "hobbies": "a hobby",
    "music": "a musical instrument", "brass": "a brass musical instrument",
    "percussion": "a percussion musical instrument", "string": "a string musical instrument",
    "wind": "a wind musical instrument", "household": "a household object",
    "arttools": "an art tool", "dishes": "dishes", "utensils": "a kitchen utensil",
    "tools": "a tool", "medical": "a medical item", "military": "a military item",
    "ammunition": "ammunition", "naturalforces": "a force of nature", "people": "a person",
    "body_parts": "a body part", "toys": "a toy", "plants": "a plant", "flowers": "a flower",
    "mushrooms": "a mushroom", "trees": "a tree", "seasonal": "a holiday decoration",
    "christmas": "a Christmas decoration", "easter": "an Easter decoration",
    "halloween": "a Halloween decoration", "hanukkah": "a Hanukkah item",
    "newyears": "a New Year's party item", "space": "outer space", "moon": "the moon",
    "planets": "a planet", "sports": "sports equipment", "symbols": "a symbol",
    "asl": "a hand sign in American Sign Language", "alphabets": "a letter of the alphabet",
    "lowercase": "a lowercase letter", "uppercase": "an uppercase letter",
    "chess": "a chess piece", "faces": "a face", "math": "a math symbol",
    "operators": "a math operator", "money": "money", "coins": "a coin",
    "00_symbols": "a currency sign", "shapes": "a shape", "town": "a building in town",
    "flags": "a flag", "houses": "a house", "monuments": "a monument", "roadsigns": "a road sign",
    "vehicles": "a vehicle", "auto": "a car", "construction": "a construction vehicle",
    "cycle": "a bicycle", "emergency": "an emergency vehicle", "farming": "a farm vehicle",
    "flight": "an aircraft", "planes": "an airplane", "locomotive": "a train",
    "masstransit": "a bus", "race": "a race car", "ship": "a boat",
}


def stamp_caption(image: Path) -> str:
    """First line of the stamp's `.txt`; a `_mirror` copy shares its original's text."""
    for text_file in (image.with_suffix(".txt"), image.with_name(image.stem.removesuffix("_mirror") + ".txt")):
        if text_file.is_file():
            return clean_caption(text_file.read_text(encoding="utf-8", errors="replace"))
    return ""


def category_phrases(image: Path, root: Path) -> list[str]:
    """The phrases of the deepest and the top category folder ("a bird", "an animal")."""
    folders = [f for f in image.relative_to(root).parent.parts if f in CATEGORY_PHRASES]
    chosen = {folders[-1], folders[0]} if folders else set()
    return [CATEGORY_PHRASES[f] for f in folders if f in chosen]


def stamp_rows(root: Path = STAMPS_ROOT) -> tuple[list[dict[str, Any]], int]:
    """Manifest rows for every stamp with a description; also the count skipped for lacking one."""
    rows: list[dict[str, Any]] = []
    missing = 0
    for image in sorted(root.rglob("*.png")):
        caption = stamp_caption(image)
        if not caption:
            missing += 1
            continue
        category = str(image.relative_to(root).parent)
        rows.append({"image": str(image), "caption": caption, "kind": "description", "category": category})
        for phrase in category_phrases(image, root):
            rows.append({"image": str(image), "caption": phrase, "kind": "category", "category": category})
    return rows, missing


def _emoji_codepoints(font_path: Path) -> list[int]:
    from fontTools.ttLib import TTFont  # only needed to build the training set

    cmap = TTFont(str(font_path), lazy=True).getBestCmap()
    skip = set(range(0x1F1E6, 0x1F200)) | set(range(0x1F3FB, 0x1F400))  # flag letters, skin tones
    return sorted(cp for cp in cmap if cp > 0xFF and cp not in skip and unicodedata.category(chr(cp)) == "So")


def render_emoji(char: str, font: ImageFont.FreeTypeFont) -> Image.Image | None:
    """Render one emoji in colour, cropped to its glyph, on white; None if the glyph is empty."""
    canvas = Image.new("RGBA", (160, 140), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 5), char, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    glyph = canvas.crop(box)
    background = Image.new("RGB", glyph.size, (255, 255, 255))
    background.paste(glyph, mask=glyph.getchannel("A"))
    return background


def emoji_rows(out_dir: Path, font_path: Path = EMOJI_FONT) -> list[dict[str, Any]]:
    font = ImageFont.truetype(str(font_path), EMOJI_BITMAP_SIZE)
    folder = out_dir / "emoji"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for cp in _emoji_codepoints(font_path):
        name = unicodedata.name(chr(cp), "").lower()
        path = folder / f"U+{cp:05X}.png"
        if not path.is_file():
            image = render_emoji(chr(cp), font)
            if image is None:
                continue
            image.save(path)
        rows.append({"image": str(path.resolve()), "caption": name, "kind": "emoji", "category": "emoji"})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _refuse_foreign_folder(out_dir: Path) -> None:
    """The data set is written into a folder of its own: one holding anything but what this module
    writes (`--data-dir` pointed at a folder of photos, say) raises FileExistsError and is left alone,
    where its own `train.jsonl` would have been overwritten."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file: the default data set is built in a folder")
    foreign = foreign_entries(out_dir, {*MANIFESTS, "emoji"})
    if foreign:
        raise FileExistsError(f"{out_dir} holds other files ({foreign}): the default data set is built in a "
                              "folder of its own; choose an empty or new one")


def build_default_dataset(out_dir: Path, stamps_root: Path = STAMPS_ROOT, font: Path = EMOJI_FONT) -> Path:
    """Write the manifests; returns the training manifest. Raises FileNotFoundError naming the
    Debian package to install when a source is missing."""
    if not stamps_root.is_dir():
        raise FileNotFoundError(f"{stamps_root} not found: apt-get install tuxpaint-stamps-default")
    if not font.is_file():
        raise FileNotFoundError(f"{font} not found: apt-get install fonts-noto-color-emoji")
    _refuse_foreign_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamps, missing = stamp_rows(stamps_root)
    emoji = emoji_rows(out_dir, font)
    _write_jsonl(out_dir / "stamps.jsonl", [r for r in stamps if r["kind"] == "description"])
    _write_jsonl(out_dir / "emoji.jsonl", emoji)
    _write_jsonl(out_dir / "train.jsonl", stamps + emoji)
    # The evaluation set: one descriptive caption per image (no shared category phrases).
    _write_jsonl(out_dir / "eval.jsonl", [r for r in stamps if r["kind"] == "description"] + emoji)
    logger.info(
        "default data: %d stamp rows (%d stamps without a description skipped), %d emoji",
        len(stamps), missing, len(emoji),
    )
    return out_dir / "train.jsonl"
