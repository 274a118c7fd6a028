"""The gallery index and Searcher: build, resume, append, fingerprint, FAISS, re-ranking, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tbps.engine.checkpoint as checkpoint_module
import tbps.search.index as index_module
from tbps.cli import main
from tbps.config import load_config
from tbps.data.tokenizers import build_tokenizer
from tbps.data.transforms import build_image_transform
from tbps.engine.checkpoint import save_checkpoint
from tbps.errors import TBPSError
from tbps.models import build_model
from tbps.search.ann import FaissIndex, ensure_ann, exact_topk, resolve_backend
from tbps.search.index import GalleryIndex, build_index, list_images
from tbps.search.rerank import has_fine_similarity
from tbps.search.searcher import Searcher

TINY = [
    "data.dataset=synth", "data.image_size=[32, 16]", "data.text_length=16", "data.tokenizer=clip",
    "model.image_backbone=tiny-vit", "model.text_backbone=clip", "model.pretrained=",
    "method.cross_width=32", "method.cross_layers=1", "method.cross_heads=2",
]
QUERIES = ["a man in a red shirt", "a woman with a blue bag", "green trousers and white shoes"]
NUM_IMAGES = 11


def _save_tiny_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    cfg = load_config(None, TINY)
    model = build_model(cfg, 4, build_tokenizer(cfg.data.tokenizer, cfg.data.text_length), load_pretrained=False)
    save_checkpoint(path, model=model, cfg=cfg, num_classes=4)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt", seed=1)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    """NUM_IMAGES random images in two sub-folders, plus one file that is not an image."""
    root = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, size=(40, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    (root / "a" / "broken.jpg").write_bytes(b"not an image at all")
    (root / "notes.txt").write_text("ignored: not an image extension")
    return root


def _build(ckpt: Path, images: Path, out: Path, **kwargs):
    kwargs = {"batch_size": 4, "device": "cpu", "num_workers": 0, "progress": False, "shard_size": 4, **kwargs}
    return build_index(ckpt, images, out, **kwargs)


@pytest.fixture(scope="module")
def built(ckpt, gallery, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built") / "idx"
    _build(ckpt, gallery, out)
    return out


def _features_equal(a: Path, b: Path) -> None:
    ia, ib = GalleryIndex(a), GalleryIndex(b)
    assert ia.paths == ib.paths
    for key in ia.feature_keys:
        np.testing.assert_allclose(ia.matrix(key), ib.matrix(key), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- building

def test_build_stores_model_features_in_path_order_and_skips_unreadable(ckpt, gallery, tmp_path, caplog):
    summary = _build(ckpt, gallery, tmp_path / "idx")
    assert summary["added"] == NUM_IMAGES and summary["total"] == NUM_IMAGES
    assert summary["skipped"] == 1 and summary["skipped_paths"][0].endswith("broken.jpg")
    assert "broken.jpg" in caplog.text
    index = GalleryIndex(tmp_path / "idx")
    assert index.size == NUM_IMAGES and len(index.manifest["shards"]) == 3  # shards of 4, 4, 3
    assert index.paths == [p for p in list_images(gallery) if not p.endswith("broken.jpg")]
    stored = np.load(tmp_path / "idx" / "shards" / "shard-000000.global.npy", mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.float32

    model, cfg, _ = checkpoint_module.load_model_from_checkpoint(ckpt, "cpu")
    transform = build_image_transform(cfg.data.image_size, train=False)
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in index.paths])
    with torch.inference_mode():
        expected = model.embed_images(images)["global"].numpy()
    np.testing.assert_allclose(index.matrix("global"), expected, atol=1e-5)
    np.testing.assert_allclose(index.gather("global", [7, 0, 5]), expected[[7, 0, 5]], atol=1e-5)


def test_list_file_resolves_relative_paths_and_append_embeds_only_new_images(ckpt, gallery, tmp_path):
    every = list_images(gallery)
    listing = tmp_path / "lists" / "some.txt"
    listing.parent.mkdir()
    first = [p for p in every if "/a/" in p and not p.endswith("broken.jpg")]
    rel = [str(Path("..") / Path(p).relative_to(gallery.parent)) for p in first]
    shutil.copytree(gallery, tmp_path / gallery.name)  # the relative paths point beside the list's folder
    listing.write_text("# my gallery\n\n" + "\n".join(rel) + "\n")
    summary = _build(ckpt, listing, tmp_path / "idx")
    assert summary["added"] == len(first) and summary["skipped"] == 0
    assert GalleryIndex(tmp_path / "idx").paths == [str((tmp_path / Path(p).relative_to(gallery.parent))) for p in first]

    summary = _build(ckpt, tmp_path / gallery.name, tmp_path / "idx")
    assert summary["already_indexed"] == len(first)
    assert summary["added"] == NUM_IMAGES - len(first) and summary["total"] == NUM_IMAGES
    assert len(set(GalleryIndex(tmp_path / "idx").paths)) == NUM_IMAGES


def test_a_moved_gallery_is_searched_with_its_new_image_root(ckpt, gallery, tmp_path, capsys, caplog):
    shutil.copytree(gallery, tmp_path / "old")
    _build(ckpt, tmp_path / "old", tmp_path / "idx")
    stored = json.loads((tmp_path / "idx" / "shards" / "shard-000000.paths.json").read_text())
    assert stored[0] in ("a/img01.png", "b/img00.png") and not Path(stored[0]).is_absolute()
    assert GalleryIndex(tmp_path / "idx").manifest["image_root"] == str((tmp_path / "old").resolve())
    before = Searcher(tmp_path / "idx", device="cpu").search(QUERIES[:1], top_k=3)[0]

    (tmp_path / "old").rename(tmp_path / "new")
    caplog.clear()
    Searcher(tmp_path / "idx", device="cpu")
    assert "--image-root" in caplog.text  # the old place is gone: the log says what to do
    moved = Searcher(tmp_path / "idx", device="cpu", image_root=tmp_path / "new")
    after = moved.search(QUERIES[:1], top_k=3)[0]
    assert [r["path"] for r in after] == [r["path"].replace("/old/", "/new/") for r in before]
    assert all(Path(r["path"]).is_file() for r in after)
    assert main(["search", "--index", str(tmp_path / "idx"), "--image-root", str(tmp_path / "new"), QUERIES[0],
                 "--json", "--top-k", "3", "--device", "cpu"]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [r["path"] for r in after]
    with pytest.raises(TBPSError, match="image root is not a folder"):
        GalleryIndex(tmp_path / "idx", image_root=tmp_path / "nowhere")


def test_a_format_1_index_of_absolute_paths_is_read_and_appended(ckpt, gallery, tmp_path):
    out = tmp_path / "idx"
    _build(ckpt, gallery, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for shard in manifest["shards"]:  # rewrite it as tbps wrote format 1: absolute paths, no image_root
        paths_file = out / "shards" / f"{shard['name']}.paths.json"
        paths_file.write_text(json.dumps([str(gallery.resolve() / p) for p in json.loads(paths_file.read_text())]))
    del manifest["image_root"]
    manifest["version"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    old = GalleryIndex(out)
    assert old.paths == [p for p in list_images(gallery) if not p.endswith("broken.jpg")]
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (20, 40), (200, 10, 10)).save(extra / "red.png")
    assert _build(ckpt, extra, out)["added"] == 1
    upgraded = GalleryIndex(out)
    assert upgraded.manifest["version"] == 2 and upgraded.paths == old.paths + [str((extra / "red.png").resolve())]


def test_a_killed_run_resumes_after_its_last_complete_shard(ckpt, gallery, built, tmp_path, monkeypatch):
    real_write = index_module._write_shard
    written: list[str] = []

    def write_then_die(root, name, paths, features):
        if written:
            real_write(root, name, paths, {k: v[:1] for k, v in features.items()})  # half a shard on disk
            raise KeyboardInterrupt
        real_write(root, name, paths, features)
        written.extend(paths)

    monkeypatch.setattr(index_module, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        _build(ckpt, gallery, tmp_path / "idx")
    # only the complete shard counts (its paths are stored relative to the gallery folder)
    assert GalleryIndex(tmp_path / "idx").paths == [str(gallery.resolve() / p) for p in written]
    monkeypatch.setattr(index_module, "_write_shard", real_write)

    embedded: list[int] = []
    real_load = checkpoint_module.load_model_from_checkpoint

    def counting_load(path, device):
        model, cfg, tok = real_load(path, device)
        original = model.embed_images
        model.embed_images = lambda images: (embedded.append(len(images)), original(images))[1]
        return model, cfg, tok

    monkeypatch.setattr(checkpoint_module, "load_model_from_checkpoint", counting_load)
    summary = _build(ckpt, gallery, tmp_path / "idx")
    assert summary["already_indexed"] == len(written) == 3  # the first shard: 4 files, one unreadable
    assert sum(embedded) == NUM_IMAGES - 3  # nothing embedded twice (the broken file never decodes)
    _features_equal(tmp_path / "idx", built)  # the same index as one uninterrupted run


def test_an_index_refuses_another_model(ckpt, gallery, tmp_path):
    _build(ckpt, gallery, tmp_path / "idx")
    other = _save_tiny_checkpoint(tmp_path / "other.pt", seed=2)
    with pytest.raises(TBPSError, match="another model"):
        _build(other, gallery, tmp_path / "idx")
    with pytest.raises(TBPSError, match="not the model this index was built with"):
        Searcher(tmp_path / "idx", checkpoint=other, device="cpu")
    # the fingerprint is the weights, not the path: a copy of the checkpoint is the same model
    copy = tmp_path / "copy.pt"
    shutil.copy(ckpt, copy)
    assert Searcher(tmp_path / "idx", checkpoint=copy, device="cpu").size == NUM_IMAGES


def test_bad_inputs_are_one_line_errors(ckpt, gallery, tmp_path):
    with pytest.raises(TBPSError, match="no such folder"):
        _build(ckpt, tmp_path / "missing", tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TBPSError, match="no images found"):
        _build(ckpt, tmp_path / "empty", tmp_path / "idx")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(TBPSError, match="holds no tbps index"):
        _build(ckpt, gallery, tmp_path / "busy")
    with pytest.raises(TBPSError, match="not a tbps index"):
        Searcher(tmp_path / "busy", device="cpu")


def test_one_writer_at_a_time(ckpt, gallery, tmp_path):
    import fcntl

    out = tmp_path / "idx"
    out.mkdir()
    (out / ".shard.npy.123.tmp").write_bytes(b"left by a killed writer")
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(TBPSError, match="another tbps index is writing"):
            _build(ckpt, gallery, out)
    assert _build(ckpt, gallery / "b", out)["added"] == NUM_IMAGES // 2 + 1  # b/ holds the even images
    assert not list(out.glob(".*.tmp"))


# ----------------------------------------------------------------------------- searching

def test_exact_search_equals_a_brute_force_argsort(built):
    searcher = Searcher(built, device="cpu")
    assert searcher.backend == "exact" and not searcher.has_rerank and searcher.model_name == "irra"
    results = searcher.search(QUERIES, top_k=5)
    text = searcher.embed_queries(QUERIES)["global"].numpy()
    scores = text @ GalleryIndex(built).matrix("global").T
    for query_scores, ranked in zip(scores, results):
        expected = np.argsort(-query_scores, kind="stable")[:5]
        assert [r["index"] for r in ranked] == expected.tolist()
        assert [r["rank"] for r in ranked] == [1, 2, 3, 4, 5]
        np.testing.assert_allclose([r["score"] for r in ranked], query_scores[expected], atol=1e-5)
        assert all(r["path"] == searcher.image_path(r["index"]) == searcher.paths[r["index"]] for r in ranked)
    assert len(searcher.search(["a man"], top_k=100)[0]) == NUM_IMAGES
    with pytest.raises(TBPSError, match="not in the index"):
        searcher.image_path(NUM_IMAGES)
    with pytest.raises(TBPSError, match="not in the index"):
        searcher.image_path(-1)
    with pytest.raises(TBPSError, match="empty"):
        searcher.search(["  "])


def test_exact_topk_over_blocks_matches_argsort():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((1000, 16)).astype(np.float32)
    queries = rng.standard_normal((7, 16)).astype(np.float32)
    scores, rows = exact_topk(queries, [gallery[:300], gallery[300:301], gallery[301:]], k=10, chunk_rows=128)
    brute = queries @ gallery.T
    np.testing.assert_array_equal(rows, np.argsort(-brute, axis=1)[:, :10])
    np.testing.assert_allclose(scores, np.sort(brute, axis=1)[:, ::-1][:, :10], rtol=1e-6)


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 20, dim))
    vectors = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["faiss-hnsw", "faiss-ivf"])
def test_faiss_recall_at_10_against_exact_search(kind, tmp_path):
    vectors = _clustered(4000, 32, seed=0)
    queries = _clustered(200, 32, seed=1)
    _, truth = exact_topk(queries, [vectors], k=10)
    ann = FaissIndex.build(vectors, kind)
    _, found = ann.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert recall >= 0.9, recall
    ann.save(tmp_path / "ann.faiss")
    again = FaissIndex.load(tmp_path / "ann.faiss", kind, ann.params)
    np.testing.assert_array_equal(again.search(queries, 10)[1], found)


def test_auto_backend_by_size_and_a_stale_faiss_index_is_updated(ckpt, gallery, built, tmp_path, monkeypatch):
    assert resolve_backend("auto", 10) == "exact" and resolve_backend("auto", 10**6) == "faiss-hnsw"
    with pytest.raises(TBPSError, match="choose one of"):
        resolve_backend("annoy", 10)
    out = tmp_path / "idx"
    summary = _build(ckpt, gallery / "a", out, backend="faiss-hnsw")
    assert summary["backend"] == "faiss-hnsw" and (out / "ann.faiss").is_file()
    assert json.loads((out / "ann.json").read_text())["rows"] == summary["total"]
    real_build = FaissIndex.build

    def no_rebuild(*args, **kwargs):
        raise AssertionError("appending must add the new rows, not rebuild")

    monkeypatch.setattr(FaissIndex, "build", no_rebuild)
    summary = _build(ckpt, gallery, out)  # appends: the new rows are added to the saved HNSW graph
    assert json.loads((out / "ann.json").read_text())["rows"] == summary["total"] == NUM_IMAGES
    monkeypatch.setattr(FaissIndex, "build", real_build)
    assert ensure_ann(GalleryIndex(out), "faiss-ivf").kind == "faiss-ivf"  # another kind: rebuilt
    assert ensure_ann(GalleryIndex(out), "faiss-hnsw").size == NUM_IMAGES
    searcher = Searcher(out, device="cpu")
    assert searcher.backend == "faiss-hnsw"
    exact = Searcher(built, device="cpu").search(QUERIES, top_k=5)
    approx = searcher.search(QUERIES, top_k=5)  # a tiny gallery: HNSW is exact here
    assert [[r["path"] for r in q] for q in approx] == [[r["path"] for r in q] for q in exact]


def _with_fine_similarity(monkeypatch, calls: list[int]) -> None:
    """Every loaded model becomes a method with a local feature and its own similarity."""
    real_load = checkpoint_module.load_model_from_checkpoint

    def load(path, device):
        model, cfg, tok = real_load(path, device)
        base = type(model)

        class FineGrained(base):
            def embed_images(self, images):
                flipped = F.normalize(self.encode_image(images.flip(-1)), dim=-1)
                feats = base.embed_images(self, images)
                return {**feats, "local": torch.stack([feats["global"], flipped], dim=1)}  # (B, 2, D)

            def similarity(self, text_feats, image_feats):
                calls.append(len(image_feats["local"]))
                return text_feats["global"] @ image_feats["local"][:, 1].t()

        model.__class__ = FineGrained
        return model, cfg, tok

    monkeypatch.setattr(checkpoint_module, "load_model_from_checkpoint", load)


def test_rerank_scores_the_shortlist_with_the_methods_similarity(ckpt, gallery, tmp_path, monkeypatch):
    calls: list[int] = []
    _with_fine_similarity(monkeypatch, calls)
    _build(ckpt, gallery, tmp_path / "idx")
    index = GalleryIndex(tmp_path / "idx")
    assert index.feature_shapes["local"][0] == 2 and index.matrix("local").shape[:2] == (NUM_IMAGES, 2)
    searcher = Searcher(tmp_path / "idx", device="cpu")
    assert searcher.has_rerank and has_fine_similarity(searcher.model)
    text = searcher.embed_queries(QUERIES)["global"].numpy()
    first = text @ index.matrix("global").T
    fine = text @ index.matrix("local")[:, 1].T

    off = searcher.search(QUERIES, top_k=3, rerank=False)
    assert not calls
    for q, ranked in enumerate(off):
        assert [r["index"] for r in ranked] == np.argsort(-first[q], kind="stable")[:3].tolist()

    on = searcher.search(QUERIES, top_k=3, shortlist=6)
    assert calls == [6, 6, 6]  # only the shortlisted rows reach the similarity
    for q, ranked in enumerate(on):
        shortlist = np.argsort(-first[q], kind="stable")[:6]
        expected = shortlist[np.argsort(-fine[q, shortlist], kind="stable")][:3]
        assert [r["index"] for r in ranked] == expected.tolist()
        np.testing.assert_allclose([r["score"] for r in ranked], fine[q, expected], atol=1e-5)

    full = searcher.search(QUERIES, top_k=4, shortlist=NUM_IMAGES)  # whole gallery: the evaluator's ranking
    for q, ranked in enumerate(full):
        assert [r["index"] for r in ranked] == np.argsort(-fine[q], kind="stable")[:4].tolist()


# ----------------------------------------------------------------------------- command line

def test_cli_index_and_search_from_a_query_file(ckpt, gallery, tmp_path, capsys):
    out = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(ckpt), "--images", str(gallery), "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--workers", "0", "--quiet"]) == 0
    assert f"indexed {NUM_IMAGES} new images" in capsys.readouterr().out
    queries = tmp_path / "queries.txt"
    queries.write_text("\n".join(QUERIES[:2]) + "\n\n")
    assert main(["search", "--index", str(out), "--queries", str(queries), "--top-k", "3", "--json",
                 "--device", "cpu"]) == 0
    batch = json.loads(capsys.readouterr().out)
    assert len(batch) == 2 and all(len(q) == 3 for q in batch)
    assert set(batch[0][0]) == {"rank", "path", "score"}
    assert main(["search", "--index", str(out), QUERIES[0], "--json", "--top-k", "2", "--device", "cpu"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in single] == [r["path"] for r in batch[0][:2]]
    np.testing.assert_allclose([r["score"] for r in single], [r["score"] for r in batch[0][:2]], atol=1e-5)
    assert main(["search", "--index", str(out), QUERIES[0], "--top-k", "2", "--device", "cpu"]) == 0
    assert "    1. " in capsys.readouterr().out
    assert main(["search", "--index", str(out), "--device", "cpu"]) == 1
    assert "tbps: error: no query" in capsys.readouterr().err


def test_a_checkpoint_whose_saved_config_this_version_does_not_know_names_the_file(tmp_path):
    """A saved option this tbps does not have (a newer or older version's) is one line naming the file;
    a typo in the caller's own overrides still reads as the caller's."""
    from tbps.engine.checkpoint import load_model_from_checkpoint, read_checkpoint
    from tbps.errors import TBPSError

    path = _save_tiny_checkpoint(tmp_path / "model.pt", seed=0)
    ckpt = read_checkpoint(path)
    ckpt["config"]["data"]["similar_group"] = 4  # an option that existed in another version
    torch.save(ckpt, tmp_path / "other_version.pt")
    with pytest.raises(TBPSError, match=r"other_version\.pt: its saved config does not fit this version of tbps "
                                        r"\(unknown config key data\.similar_group"):
        load_model_from_checkpoint(tmp_path / "other_version.pt")
    with pytest.raises(TBPSError) as err:
        load_model_from_checkpoint(path, overrides=["method.no_such_option=1"])
    assert "does not fit this version" not in str(err.value)
    assert load_model_from_checkpoint(path)[1].data.tokenizer  # the file itself loads
