"""benchmarks/margins.py: the gaps and the active-MAL share it reports are what they say, and its test
R1 on the global embedding is the evaluator's R1 for a model that scores by the global cosine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tbps.config import load_config
from tbps.losses.cffa import mal_loss

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("margins", REPO / "benchmarks" / "margins.py")
margins = importlib.util.module_from_spec(spec)
spec.loader.exec_module(margins)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_best_gap_is_best_own_person_minus_best_other_person():
    scores = torch.tensor([[0.9, 0.2, 0.5, 0.95], [0.1, 0.3, 0.8, 0.0]])
    query = torch.tensor([7, 8])
    gallery = torch.tensor([7, 7, 8, 9])
    assert margins.best_gap(scores, query, gallery).tolist() == pytest.approx([0.9 - 0.95, 0.8 - 0.3])


def test_identity_batches_hold_whole_people_and_every_person_once():
    pids = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4])
    batches = margins.identity_batches(pids, batch_ids=2, per_id=2, seed=0)
    assert len(batches) == 2  # 5 people, 2 a batch: the fifth is left out as a short last batch
    people = [p for rows in batches for p in pids[rows].unique().tolist()]
    assert len(people) == 4 == len(set(people))
    total = torch.bincount(pids)
    for rows in batches:
        for person, count in zip(*pids[rows].unique(return_counts=True)):
            assert count == min(2, total[person])  # person 1's third image is not drawn, person 4 has one


def test_diagnose_matches_the_evaluator_and_mal(tiny_synth_root, tmp_path):
    from tbps.engine.evaluator import evaluate_checkpoint
    from tbps.engine.trainer import train

    out = tmp_path / "irra"
    cfg = load_config(None, [
        "model.name=irra", "data.dataset=synth", f"data.root={tiny_synth_root}", "data.image_size=[64, 32]",
        "data.text_length=16", "data.tokenizer=clip", "data.batch_size=8", "data.sampler=identity",
        "data.num_instances=2", "data.num_workers=0", "model.image_backbone=tiny-vit", "model.text_backbone=clip",
        "model.pretrained=", "method={cross_layers: 1}", "train.amp=off", "train.device=cpu",
        "train.eval_split=none", "train.epochs=1", "train.max_steps=2", f"train.output_dir={out}"])
    train(cfg)
    row = margins.diagnose(out / "last.pt", tiny_synth_root, "synth", batch_ids=4, per_id=2, margin=0.1, tau=0.015)
    metrics = evaluate_checkpoint(out / "last.pt", split="test", device="cpu", progress=False)
    assert row["test_r1"] == pytest.approx(metrics["R1"], abs=0.01)
    assert 0.0 <= row["mal_active"] <= 100.0 and -2.0 <= row["train_gap"] <= 2.0
    # an untrained-looking model: far from every pair clearing MAL's margin
    assert row["mal_active"] > 50.0
    assert row["method"] == "irra"
    # the active share is mal_loss's own per-pair cost: a margin no pair can clear makes every pair active
    wide = margins.diagnose(out / "last.pt", tiny_synth_root, "synth", batch_ids=4, per_id=2, margin=3.0, tau=0.015)
    assert wide["mal_active"] == 100.0
    assert mal_loss(torch.eye(4), torch.eye(4), torch.arange(4), margin=0.1, reduction="none").tolist() == [0.0] * 4
