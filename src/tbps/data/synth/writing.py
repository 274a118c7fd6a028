"""Writing a SynthPEDES folder (``imgs/`` and ``reid_raw.json``, identity splits as CUHK-PEDES) and
the README's sample grid."""

from __future__ import annotations

import json
import math
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tbps.data.synth.attributes import VIEWS, draw_identities, draw_looks
from tbps.data.synth.captions import caption_tokens, captions_for
from tbps.data.synth.rendering import make_backgrounds, render_image
from tbps.errors import TBPSError
from tbps.io import write_text_atomic

ANNOTATION_FILE = "reid_raw.json"


def split_sizes(num_ids: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    n_test = max(1, int(round(num_ids * test_fraction)))
    n_val = max(1, int(round(num_ids * val_fraction))) if val_fraction > 0 else 0
    n_train = num_ids - n_val - n_test
    if n_train < 1:
        raise TBPSError(f"--ids {num_ids} is too few: {n_test} test and {n_val} val identities leave none "
                        "to train on (use more identities or smaller fractions)")
    return n_train, n_val, n_test


def _check_arguments(num_ids, images_per_id, captions_per_image, height, width, val_fraction, test_fraction):
    if num_ids < 2:
        raise TBPSError(f"--ids {num_ids}: need at least 2 identities (one to train on, one to test)")
    if images_per_id < 1 or captions_per_image < 1:
        raise TBPSError("--images-per-id and --captions-per-image must be at least 1")
    if height < 32 or width < 16:
        raise TBPSError(f"--height {height} --width {width}: images must be at least 32x16 pixels")
    if not (0.0 <= val_fraction < 1.0 and 0.0 < test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise TBPSError(f"--val-fraction {val_fraction} --test-fraction {test_fraction}: need 0 <= val < 1, "
                        "0 < test < 1 and val + test < 1")


def generate_synthpedes(out: str | Path, num_ids: int = 1000, images_per_id: int = 4, captions_per_image: int = 2,
                        height: int = 384, width: int = 128, seed: int = 0, val_fraction: float = 0.1,
                        test_fraction: float = 0.2, progress: bool = True) -> dict:
    """Write SynthPEDES to ``out`` (``imgs/`` and ``reid_raw.json``); returns ids/images/captions counts.

    Identities are split train/val/test (no identity in two splits), ids start at 1 and run through
    train, then val, then test, as in CUHK-PEDES. The annotation file is written last and atomically,
    after removing any old one, so an interrupted run never leaves a JSON that points at missing or
    half-written images.
    """
    _check_arguments(num_ids, images_per_id, captions_per_image, height, width, val_fraction, test_fraction)
    n_train, n_val, n_test = split_sizes(num_ids, val_fraction, test_fraction)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TBPSError(f"{out}: cannot create the output folder ({exc.strerror})") from None
    annotation = out / ANNOTATION_FILE
    if annotation.exists():
        annotation.unlink()

    people = draw_identities(num_ids, np.random.default_rng([seed, 0]))
    backgrounds = make_backgrounds(np.random.default_rng([seed, 1]), height, width, count=24)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    folders = {"train": "train_query", "val": "val_query", "test": "test_query"}
    for folder in folders.values():
        (out / "imgs" / folder).mkdir(parents=True, exist_ok=True)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=num_ids * images_per_id, desc="synthesising", unit="img", dynamic_ncols=True)
    records = []
    sample = 0
    for index, (person, split) in enumerate(zip(people, splits)):
        pid = index + 1
        looks = draw_looks(np.random.default_rng([seed, 2, pid]))
        start = int(np.random.default_rng([seed, 3, pid]).integers(3))
        for k in range(images_per_id):
            view = VIEWS[(start + k) % 3]
            rng = np.random.default_rng([seed, 4, pid, k])
            img = render_image(person, looks, view, rng, height, width, backgrounds)
            rel = f"{folders[split]}/p{pid:05d}_s{sample:06d}.png"
            path = out / "imgs" / rel
            img.save(path, format="PNG", compress_level=1)  # no JSON exists until all images do
            captions = captions_for(person, view, np.random.default_rng([seed, 5, pid, k]), captions_per_image)
            records.append({"split": split, "captions": captions, "file_path": rel,
                            "processed_tokens": [caption_tokens(c) for c in captions], "id": pid})
            sample += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    write_text_atomic(annotation, json.dumps(records))
    return {"ids": num_ids, "images": len(records), "captions": sum(len(r["captions"]) for r in records)}


# ----------------------------------------------------------------------------- README figure

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def save_sample_grid(root: str | Path, out_png: str | Path, n: int = 8, columns: int = 4,
                     image_width: int = 128) -> Path:
    """A PNG of ``n`` images of different identities with their first caption wrapped below them.

    Used for the README, so a reader sees what the data and the captions look like.
    """
    root = Path(root)
    annotation = root / ANNOTATION_FILE
    try:
        records = json.loads(annotation.read_text())
    except FileNotFoundError:
        raise TBPSError(f"{annotation}: not found (write the dataset with tbps synth first)") from None
    seen: set[int] = set()
    picks = []
    for rec in records:
        if rec["id"] not in seen:
            seen.add(rec["id"])
            picks.append(rec)
        if len(picks) == n:
            break
    if not picks:
        raise TBPSError(f"{annotation}: no records to show")
    font = _font(12)
    pad, cell_w = 8, image_width + 56
    chars = max(10, int(cell_w / max(1.0, font.getlength("abcdefghij") / 10)))
    images, texts = [], []
    for rec in picks:
        with Image.open(root / "imgs" / rec["file_path"]) as im:
            im = im.convert("RGB")
            images.append(im.resize((image_width, int(im.height * image_width / im.width)), Image.BILINEAR))
        texts.append(textwrap.wrap(rec["captions"][0], width=chars))
    line_h = int(font.getbbox("Ag")[3]) + 3
    img_h = max(i.height for i in images)
    text_h = max(len(t) for t in texts) * line_h
    rows = math.ceil(len(picks) / columns)
    cols = min(columns, len(picks))
    cell_h = img_h + pad + text_h + pad
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, lines) in enumerate(zip(images, texts)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * cell_h
        grid.paste(im, (x + (cell_w - im.width) // 2, y))
        for j, line in enumerate(lines):
            draw.text((x, y + img_h + pad // 2 + j * line_h), line, fill=(20, 20, 20), font=font)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp")
    grid.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, out_png)
    return out_png
