"""The Evaluator on a toy model: colour images, colour-word captions, and the one similarity hook."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tbps.config import Config, EvalConfig
from tbps.engine.evaluator import Evaluator, append_metrics_jsonl, evaluate_checkpoint, format_metrics_table
from tbps.errors import TBPSError

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
WORDS = {word: i + 1 for i, word in enumerate(COLOURS)}  # token 0 is padding


@dataclass
class Record:
    pid: int
    image_path: str
    captions: list[str]


def tokenize(texts: list[str]) -> torch.Tensor:
    """Colour words -> ids, padded to 4 tokens."""
    ids = torch.zeros(len(texts), 4, dtype=torch.long)
    for row, text in enumerate(texts):
        words = [WORDS[w] for w in text.split() if w in WORDS][:4]
        ids[row, : len(words)] = torch.tensor(words, dtype=torch.long)
    return ids


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


class ColourModel(torch.nn.Module):
    """Image embedding = mean colour; text embedding = sum of the colour words' RGB vectors."""

    def __init__(self) -> None:
        super().__init__()
        table = torch.zeros(len(WORDS) + 1, 3)
        table[1:] = torch.tensor(list(COLOURS.values()))
        self.words = torch.nn.Embedding.from_pretrained(table)
        self.modes_seen: list[bool] = []
        self.similarity_calls: list[tuple[int, int]] = []

    def embed_images(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        self.modes_seen.append(self.training)
        return {"global": F.normalize(images.mean(dim=(2, 3)), dim=-1)}

    def embed_texts(self, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        self.modes_seen.append(self.training)
        return {"global": F.normalize(self.words(token_ids).sum(1), dim=-1)}

    def similarity(self, text_feats: dict, image_feats: dict) -> torch.Tensor:
        self.similarity_calls.append((len(text_feats["global"]), len(image_feats["global"])))
        return text_feats["global"] @ image_feats["global"].t()


class ReversedModel(ColourModel):
    """A method with its own scoring: it ranks the least similar image first."""

    def similarity(self, text_feats: dict, image_feats: dict) -> torch.Tensor:
        return -super().similarity(text_feats, image_feats)


@pytest.fixture
def records(tmp_path) -> list[Record]:
    """Two shades of each colour (two images per person), two captions per image."""
    out = []
    for pid, (word, rgb) in enumerate(COLOURS.items()):
        for shade in (1.0, 0.8):
            path = tmp_path / f"{word}_{shade}.png"
            pixels = np.zeros((8, 4, 3), dtype=np.uint8)
            pixels[:] = (np.array(rgb) * 255 * shade).astype(np.uint8)
            pixels[0, 0] = 40  # not quite uniform
            Image.fromarray(pixels).save(path)
            out.append(Record(pid=100 + pid, image_path=str(path),
                              captions=[f"a person in {word}", f"{word} clothes"]))
    return out


def evaluate(model, records, **cfg) -> dict:
    eval_cfg = EvalConfig(**{"batch_size": 3, "query_chunk": 5, **cfg})
    return Evaluator(model, records, tokenize, to_tensor, eval_cfg, "cpu", progress=False).evaluate()


def test_perfect_model_scores_100(records):
    metrics = evaluate(ColourModel(), records, i2t=True)
    for key in ("R1", "R5", "R10", "mAP", "mINP", "i2t_R1", "i2t_mAP"):
        assert metrics[key] == pytest.approx(100.0), key
    assert metrics["num_queries"] == 16 and metrics["num_gallery"] == 8
    assert metrics["seconds"] >= 0


def test_the_similarity_hook_is_what_ranks(records):
    model = ColourModel()
    evaluate(model, records)
    # 16 captions scored against all 8 images, 5 queries at a time
    assert model.similarity_calls == [(5, 8), (5, 8), (5, 8), (1, 8)]
    reversed_metrics = evaluate(ReversedModel(), records)
    assert reversed_metrics["R1"] == 0.0  # the hook, not a built-in cosine, decided the ranking
    # both matches come last, at ranks 7 and 8 of 8
    assert reversed_metrics["mAP"] == pytest.approx(100 * (1 / 7 + 2 / 8) / 2)
    assert reversed_metrics["mINP"] == pytest.approx(25.0)


def test_local_features_reach_the_hook(records):
    class LocalModel(ColourModel):
        def embed_images(self, images):
            feats = super().embed_images(images)
            return {**feats, "local": torch.stack([feats["global"], -feats["global"]], dim=1)}

        def similarity(self, text_feats, image_feats):
            assert image_feats["local"].shape == (8, 2, 3)
            return torch.einsum("qd,gd->qg", text_feats["global"], image_feats["local"][:, 1])

    assert evaluate(LocalModel(), records)["R1"] == 0.0


def test_eval_mode_during_embedding_and_mode_restored(records):
    model = ColourModel().train()
    evaluate(model, records)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training


def test_model_without_hooks_uses_global_cosine(records):
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ColourModel()

        def encode_image(self, images):
            return 3.0 * images.mean(dim=(2, 3))

        def encode_text(self, token_ids):
            return self.inner.words(token_ids).sum(1)

    assert evaluate(Plain(), records)["R1"] == pytest.approx(100.0)


def test_bad_hook_output_is_a_clear_error(records):
    class Broken(ColourModel):
        def embed_texts(self, token_ids):
            return [1, 2]

    with pytest.raises(TBPSError, match="embed_texts must return a dict"):
        evaluate(Broken(), records)


def test_format_metrics_table():
    metrics = {"R1": 73.38, "R5": 89.9254, "R10": 93.7, "mAP": 66.13, "mINP": 50.24, "num_queries": 6156,
               "num_gallery": 3074, "seconds": 12.3, "i2t_R1": 80.0, "i2t_R5": 90.0, "i2t_R10": 95.0,
               "i2t_mAP": 60.0, "i2t_mINP": 20.0}
    table = format_metrics_table(metrics)
    lines = table.splitlines()
    assert len({len(line) for line in lines[:6]}) == 1  # aligned
    assert "73.380" in table and "89.925" in table and "50.240" in table
    assert "image-to-text" in table and "6,156 queries x 3,074 gallery images" in table
    assert [cell.strip() for cell in lines[1].split("|")[1:-1]] == ["task", "R1", "R5", "R10", "mAP", "mINP"]


def test_append_metrics_jsonl(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    append_metrics_jsonl(path, {"split": "val", "R1": np.float64(1.5), "step": torch.tensor(3)})
    append_metrics_jsonl(path, {"split": "test", "R1": 2.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"split": "val", "R1": 1.5, "step": 3}, {"split": "test", "R1": 2.0}]


def test_evaluate_checkpoint_writes_only_where_asked(records, tmp_path, monkeypatch):
    import tbps.data.datasets as datasets
    import tbps.data.transforms as transforms
    import tbps.engine.checkpoint as checkpoint

    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.num_workers = "toy", str(tmp_path), 0
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    seen_overrides = []

    def fake_load(path, device, overrides=None):
        seen_overrides.append(overrides)
        return ColourModel(), cfg, tokenize

    monkeypatch.setattr(checkpoint, "load_model_from_checkpoint", fake_load)
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, root: SimpleNamespace(split=lambda s: records if s == "test" else []))
    monkeypatch.setattr(transforms, "build_image_transform", lambda size, train: to_tensor)

    metrics = evaluate_checkpoint(ckpt, device="cpu", batch_size=4, i2t=True, progress=False)
    assert metrics["R1"] == pytest.approx(100.0) and "i2t_R1" in metrics
    assert list(ckpt.parent.iterdir()) == []  # evaluation writes nothing beside the checkpoint
    log_file = tmp_path / "logs" / "eval.jsonl"
    evaluate_checkpoint(ckpt, device="cpu", batch_size=4, progress=False, log_to=log_file)
    row = json.loads(log_file.read_text())
    assert row["split"] == "test" and row["dataset"] == "toy" and row["R1"] == pytest.approx(100.0)
    evaluate_checkpoint(ckpt, device="cpu", progress=False, overrides=["method.fuse_weight=1.0"], log_to=log_file)
    assert seen_overrides[-1] == ["method.fuse_weight=1.0"]  # inference-time changes reach the model build
    assert json.loads(log_file.read_text().splitlines()[-1])["overrides"] == ["method.fuse_weight=1.0"]
    with pytest.raises(TBPSError, match="val split is empty"):
        evaluate_checkpoint(ckpt, split="val", device="cpu", progress=False)
    with pytest.raises(TBPSError, match="give --root"):
        evaluate_checkpoint(ckpt, dataset="cuhk-pedes", device="cpu", progress=False)


def test_missing_images_are_one_line_before_evaluation(records, tmp_path, monkeypatch):
    import tbps.data.datasets as datasets
    import tbps.engine.checkpoint as checkpoint

    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.num_workers = "toy", str(tmp_path), 0
    monkeypatch.setattr(checkpoint, "load_model_from_checkpoint", lambda path, device, overrides=None:
                        (ColourModel(), cfg, tokenize))
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, root: SimpleNamespace(split=lambda s: records))
    Path(records[1].image_path).unlink()
    with pytest.raises(TBPSError) as info:
        evaluate_checkpoint(tmp_path / "best.pt", device="cpu", progress=False)
    message = str(info.value)
    assert "1 of the" in message and Path(records[1].image_path).name in message and "\n" not in message


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_is_one_line_naming_the_file(records, tmp_path, monkeypatch, workers):
    """The protocol scores every test image, so a present but undecodable one stops the evaluation with
    one line naming it (not a DataLoader worker's traceback), in the main process or a worker."""
    import tbps.data.datasets as datasets
    import tbps.data.transforms as transforms
    import tbps.engine.checkpoint as checkpoint

    cfg = Config()
    cfg.data.dataset, cfg.data.root, cfg.data.num_workers = "toy", str(tmp_path), workers
    monkeypatch.setattr(checkpoint, "load_model_from_checkpoint", lambda path, device, overrides=None:
                        (ColourModel(), cfg, tokenize))
    monkeypatch.setattr(datasets, "load_dataset", lambda name, root: SimpleNamespace(split=lambda s: records))
    monkeypatch.setattr(transforms, "build_image_transform", lambda size, train: to_tensor)
    corrupt = Path(records[5].image_path)
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # a truncated file: it opens, then fails to decode
    with pytest.raises(TBPSError) as info:
        evaluate_checkpoint(tmp_path / "best.pt", device="cpu", batch_size=3, progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(corrupt)) and "cannot decode" in message
    assert "every" in message and "Traceback" not in message and "worker" not in message
