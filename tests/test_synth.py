"""SynthPEDES: determinism, identity splits, the CUHK layout, captions, and the synth CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tbps.cli import main
from tbps.data.datasets import check_images, load_dataset
from tbps.data.synth import (
    VIEWS,
    caption_matches,
    draw_identities,
    generate_synthpedes,
    make_caption,
    save_sample_grid,
)
from tbps.errors import TBPSError

TINY = dict(num_ids=12, images_per_id=3, captions_per_image=2, height=64, width=32, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate_synthpedes(out, seed=0, **TINY)
    return out


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(root).as_posix(): np.asarray(Image.open(p))
            for p in sorted((root / "imgs").rglob("*.png"))}


def test_same_seed_same_bytes_and_pixels(tiny, tmp_path):
    again = tmp_path / "b"
    summary = generate_synthpedes(again, seed=0, **TINY)
    assert summary == {"ids": 12, "images": 36, "captions": 72}
    assert (tiny / "reid_raw.json").read_bytes() == (again / "reid_raw.json").read_bytes()
    first, second = _pixels(tiny), _pixels(again)
    assert first.keys() == second.keys() and len(first) == 36
    for key in first:
        assert np.array_equal(first[key], second[key]), key


def test_different_seed_differs(tiny, tmp_path):
    other = tmp_path / "c"
    generate_synthpedes(other, seed=1, **TINY)
    assert (tiny / "reid_raw.json").read_bytes() != (other / "reid_raw.json").read_bytes()
    a, b = _pixels(tiny), _pixels(other)
    assert any(not np.array_equal(a[k], b[k]) for k in a.keys() & b.keys())


def test_records_follow_the_cuhk_layout(tiny):
    records = json.loads((tiny / "reid_raw.json").read_text())
    assert len(records) == 36
    for rec in records:
        assert list(rec) == ["split", "captions", "file_path", "processed_tokens", "id"]
        assert rec["split"] in ("train", "val", "test")
        assert re.fullmatch(rf"{rec['split']}_query/p{rec['id']:05d}_s\d{{6}}\.png", rec["file_path"])
        assert (tiny / "imgs" / rec["file_path"]).is_file()
        assert len(rec["captions"]) == 2 and all(c.strip() for c in rec["captions"])
        assert len(rec["processed_tokens"]) == 2
        assert rec["processed_tokens"][0] == re.findall(r"[a-z0-9]+(?:-[a-z0-9]+)*", rec["captions"][0].lower())
    assert sorted({r["id"] for r in records}) == list(range(1, 13))
    with Image.open(tiny / "imgs" / records[0]["file_path"]) as img:
        assert img.size == (32, 64) and img.mode == "RGB"


def test_splits_are_disjoint_by_identity(tiny):
    records = json.loads((tiny / "reid_raw.json").read_text())
    ids = {s: {r["id"] for r in records if r["split"] == s} for s in ("train", "val", "test")}
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    # 12 ids: round(12 * 0.2) = 2 test, round(12 * 0.1) = 1 val, 9 train
    assert (len(ids["train"]), len(ids["val"]), len(ids["test"])) == (9, 1, 2)


def test_cuhk_parser_reads_it_consistently(tiny):
    ds = load_dataset("synth", tiny)
    stats = ds.statistics()
    assert stats == {"train": {"ids": 9, "images": 27, "captions": 54},
                     "val": {"ids": 1, "images": 3, "captions": 6},
                     "test": {"ids": 2, "images": 6, "captions": 12}}
    assert load_dataset("cuhk-pedes", tiny).statistics() == stats
    assert sorted({r.pid for r in ds.train}) == list(range(9))
    assert check_images(ds, decode=True, progress=False).ok


def test_cli_synth_then_stats(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", "--out", str(out), "--ids", "12", "--images-per-id", "2", "--height", "64",
                 "--width", "32", "--seed", "3", "--quiet"]) == 0
    assert "wrote 24 images and 48 captions of 12 identities" in capsys.readouterr().out
    assert main(["data", "stats", "--dataset", "synth", "--root", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert sum(s["ids"] for s in stats.values()) == 12
    assert sum(s["images"] for s in stats.values()) == 24
    assert sum(s["captions"] for s in stats.values()) == 48
    assert stats["test"]["ids"] == 2 and stats["val"]["ids"] == 1


def test_cli_synth_bad_arguments(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--ids", "1", "--quiet"]) == 1
    assert "tbps: error: --ids 1" in capsys.readouterr().err
    with pytest.raises(TBPSError, match="val \\+ test < 1"):
        generate_synthpedes(tmp_path / "y", num_ids=10, val_fraction=0.5, test_fraction=0.5, progress=False)


def test_identities_have_hard_negatives_and_are_distinct():
    people = draw_identities(300, np.random.default_rng(0))
    assert len(set(people)) == 300
    fields = list(people[0].__dataclass_fields__)
    nearest = [min(sum(getattr(a, f) != getattr(b, f) for f in fields) for b in people if b is not a)
               for a in people[:100]]
    close = sum(d <= 2 for d in nearest)
    assert close >= 25, close  # families: many people differ from another in one or two details


def test_captions_state_only_true_attributes_and_mostly_identify():
    rng = np.random.default_rng(5)
    people = draw_identities(60, np.random.default_rng(1))
    unique = 0
    total = 0
    for person in people:
        for view in VIEWS:
            text, mentions = make_caption(person, view, rng)
            assert text[0].isupper() and text.endswith(".") and "  " not in text
            assert caption_matches(mentions, person)
            if view == "back":
                assert "logo" not in mentions  # not visible from behind
            unique += sum(caption_matches(mentions, other) for other in people) == 1
            total += 1
    assert unique / total > 0.7


def test_sample_grid(tiny, tmp_path):
    out = save_sample_grid(tiny, tmp_path / "grid.png", n=4)
    with Image.open(out) as img:
        assert img.width > 4 * 32 and img.height > 64


def test_generated_set_is_unchanged(tmp_path):
    """A digest of a small set (annotation bytes, every image's pixels), fixed before data/synth.py was
    split into a package: refactoring the generator must not change one caption or one pixel."""
    import hashlib

    root = tmp_path / "fixed"
    generate_synthpedes(root, seed=3, num_ids=6, images_per_id=3, captions_per_image=2, height=64, width=32,
                        progress=False)
    assert hashlib.sha256((root / "reid_raw.json").read_bytes()).hexdigest() == (
        "6012323dbd7b6f2dafec3867eae5c6ce524d54fbe4584f654b23b69693a55253")
    pixels = hashlib.sha256()
    for path in sorted((root / "imgs").rglob("*.png")):
        pixels.update(path.relative_to(root).as_posix().encode())
        pixels.update(np.asarray(Image.open(path)).tobytes())
    assert pixels.hexdigest() == "afe33f95b1452cb66ccfa485fa5b633d8b0b4e91cb8808d4c7734e9d335a5049"
