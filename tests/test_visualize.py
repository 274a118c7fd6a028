"""tbps visualize: rankings from a dataset split and from an index, and the PNG grid they draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tbps.cli import main
from tbps.data.datasets import load_dataset
from tbps.data.synth import generate_synthpedes
from tbps.data.transforms import build_image_transform
from tbps.engine.checkpoint import load_model_from_checkpoint
from tbps.errors import TBPSError
from tbps.search import Searcher
from tbps.visualize import (MATCH_COLOUR, OTHER_COLOUR, UNKNOWN_COLOUR, Hit, RankedQuery, rank_dataset_queries,
                            rank_index_queries, render_grid)
from tiny_gallery import build_tiny_index, save_tiny_checkpoint, write_images


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset root, checkpoint whose config names that dataset)."""
    root = tmp_path_factory.mktemp("vis")
    data = root / "data"
    generate_synthpedes(data, num_ids=10, images_per_id=2, captions_per_image=2, height=64, width=32,
                        seed=1, test_fraction=0.5, val_fraction=0.1, progress=False)
    return data, save_tiny_checkpoint(root / "model.pt", overrides=[f"data.root={data}"])


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp("vis-index"))


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def _count(png: Path, hex_colour: str) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return int((pixels == np.array(_rgb(hex_colour))).all(axis=1).sum())


def test_dataset_rankings_match_a_direct_computation(synth):
    data, checkpoint = synth
    ranked = rank_dataset_queries(checkpoint, num_queries=3, top_k=4, seed=5, device="cpu", progress=False)
    assert len(ranked) == 3
    # the same ranking, computed here from the model directly
    model, cfg, tokenizer = load_model_from_checkpoint(checkpoint, "cpu")
    records = load_dataset("synth", data).test
    transform = build_image_transform(cfg.data.image_size, train=False)
    with torch.inference_mode():
        images = torch.stack([transform(Image.open(r.image_path).convert("RGB")) for r in records])
        image_feats = model.embed_images(images)
        text_feats = model.embed_texts(tokenizer([q.text for q in ranked]))
        scores = model.similarity(text_feats, image_feats)
    caption_pid = {c: r.pid for r in records for c in r.captions}
    for query, row in zip(ranked, scores):
        order = torch.argsort(row, descending=True, stable=True)
        assert [h.rank for h in query.hits] == [1, 2, 3, 4]
        assert [h.path for h in query.hits] == [records[i].image_path for i in order[:4].tolist()]
        assert [h.score for h in query.hits] == pytest.approx(row[order[:4]].tolist(), abs=1e-5)
        pid = caption_pid[query.text]
        assert [h.match for h in query.hits] == [records[i].pid == pid for i in order[:4].tolist()]
        first = next(rank for rank, i in enumerate(order.tolist(), start=1) if records[i].pid == pid)
        assert query.first_match_rank == first


def test_typed_queries_know_the_person_only_for_a_caption_of_the_split(synth):
    data, checkpoint = synth
    caption = load_dataset("synth", data).test[0].captions[0]
    ranked = rank_dataset_queries(checkpoint, dataset="synth", root=data, queries=[caption, "a purple robot"],
                                  top_k=3, device="cpu", progress=False)
    assert all(h.match is not None for h in ranked[0].hits) and ranked[0].first_match_rank >= 1
    assert all(h.match is None for h in ranked[1].hits) and ranked[1].first_match_rank is None


def test_index_rankings_are_the_searchers(index_dir):
    ranked = rank_index_queries(index_dir, ["a man in black", "a girl with a red bag"], top_k=3, device="cpu")
    expected = Searcher(index_dir, device="cpu").search(["a man in black", "a girl with a red bag"], top_k=3)
    for query, rows in zip(ranked, expected):
        assert [(h.rank, h.path) for h in query.hits] == [(r["rank"], r["path"]) for r in rows]
        assert all(h.match is None for h in query.hits)


def test_frames_are_green_for_matches_red_for_others_grey_when_unknown(tmp_path):
    # plain blue images, so frame colours cannot come from the pictures themselves
    paths = []
    for i in range(3):
        path = tmp_path / f"blue{i}.png"
        Image.new("RGB", (32, 64), (30, 60, 200)).save(path)
        paths.append(str(path))
    known = [RankedQuery("a woman in a blue dress", [Hit(1, paths[0], 0.9, True), Hit(2, paths[1], 0.8, False),
                                                      Hit(3, paths[2], 0.7, False)], first_match_rank=1)]
    unknown = [RankedQuery("a woman in a blue dress", [Hit(1, paths[0], 0.9), Hit(2, paths[1], 0.8)])]
    render_grid(known, tmp_path / "known.png")
    render_grid(unknown, tmp_path / "unknown.png")
    green, red = _count(tmp_path / "known.png", MATCH_COLOUR), _count(tmp_path / "known.png", OTHER_COLOUR)
    assert green > 300 and red > 2 * 300  # two red frames, one green
    assert _count(tmp_path / "known.png", UNKNOWN_COLOUR) < 50
    assert _count(tmp_path / "unknown.png", MATCH_COLOUR) == 0 == _count(tmp_path / "unknown.png", OTHER_COLOUR)
    assert _count(tmp_path / "unknown.png", UNKNOWN_COLOUR) > 2 * 300
    width, height = Image.open(tmp_path / "known.png").size
    assert width > height  # one row: the text panel and three images side by side


def test_the_grid_has_one_row_per_query(tmp_path):
    paths = [str(p) for p in write_images(tmp_path / "imgs", count=2)]
    one = [RankedQuery("q", [Hit(1, paths[0], 0.5), Hit(2, paths[1], 0.4)])]
    render_grid(one, tmp_path / "one.png")
    render_grid(one * 3, tmp_path / "three.png")
    h1, h3 = Image.open(tmp_path / "one.png").size[1], Image.open(tmp_path / "three.png").size[1]
    assert h3 > 2.5 * h1 - 100


def test_bad_requests_are_clear_errors(tmp_path, synth):
    _, checkpoint = synth
    with pytest.raises(TBPSError, match="PNG"):
        render_grid([RankedQuery("q", [])], tmp_path / "grid.jpg")
    with pytest.raises(TBPSError, match="top-k"):
        rank_dataset_queries(checkpoint, top_k=0, device="cpu")
    with pytest.raises(TBPSError, match="empty"):
        rank_dataset_queries(checkpoint, queries=["  "], device="cpu")


def test_cli_dataset_and_index_modes(tmp_path, synth, index_dir, capsys):
    data, checkpoint = synth
    out = tmp_path / "ranks.png"
    assert main(["visualize", "--checkpoint", str(checkpoint), "--dataset", "synth", "--root", str(data),
                 "--num-queries", "2", "--top-k", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG" and "first true match at rank" in capsys.readouterr().out
    out2 = tmp_path / "index.png"
    assert main(["visualize", "--index", str(index_dir), "--out", str(out2), "--device", "cpu", "--rerank", "off",
                 "a man in a grey hoodie"]) == 0
    assert Image.open(out2).format == "PNG"
    capsys.readouterr()
    assert main(["visualize", "--index", str(index_dir), "--out", str(out2)]) == 1
    assert "needs the queries" in capsys.readouterr().err
