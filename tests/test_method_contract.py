"""The contract every registered method keeps, tested for each one the day it is registered (as timm's
``tests/test_models.py`` parametrises over every model): finite losses, gradients into both encoders,
a ``"global"`` embedding, a ``similarity`` that scores any subset of gallery rows as the full matrix
does (what search's re-ranking relies on), and the same scores after a checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from tbps.engine.checkpoint import load_model_from_checkpoint, save_checkpoint
from tbps.models import METHODS, build_model
from tiny_models import TINY_METHODS, method_batch, method_config, method_tokenizer, total_loss

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 4


@pytest.fixture(scope="module", params=METHODS.names())
def built(request):
    """(name, cfg, tokenizer, model, batch) for one registered method, seeded."""
    name = request.param
    assert name in TINY_METHODS, f"method {name!r} is registered but has no tiny recipe in tests/tiny_models.py"
    cfg = method_config(name)
    tokenizer = method_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=NUM_CLASSES, tokenizer=tokenizer)
    return name, cfg, tokenizer, model, method_batch(cfg, tokenizer)


def _scores(model, batch) -> tuple[dict, dict, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        text = model.embed_texts(batch["token_ids"])
        image = model.embed_images(batch["images"])
        return text, image, model.similarity(text, image)


def test_losses_are_finite_and_gradients_reach_both_encoders(built):
    name, _, _, model, batch = built
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(batch)
    losses = {k: v for k, v in out.items() if k.startswith("loss_")}
    assert losses, f"{name}: forward returned no loss_* entry"
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), f"{name}: {key} = {value}"
    total_loss(out).backward()
    for encoder in ("image_encoder", "text_encoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(encoder + ".") and p.grad is not None]
        assert any(bool(g.abs().sum() > 0) for g in grads), f"{name}: no gradient reaches {encoder}"
        assert all(bool(torch.isfinite(g).all()) for g in grads), f"{name}: non-finite gradient in {encoder}"


def test_embeddings_carry_a_global_feature_per_row(built):
    name, _, _, model, batch = built
    text, image, scores = _scores(model, batch)
    n = batch["images"].shape[0]
    for feats in (text, image):
        assert "global" in feats and feats["global"].shape[0] == n and feats["global"].dim() == 2, name
        assert all(v.shape[0] == n for v in feats.values()), f"{name}: every feature's first dimension is the row"
    assert scores.shape == (n, n) and torch.isfinite(scores).all()


def test_similarity_on_a_subset_of_rows_equals_those_columns(built):
    """Search re-ranks a shortlist: ``similarity(queries, rows)`` must equal the full matrix there."""
    name, _, _, model, batch = built
    text, image, full = _scores(model, batch)
    rows = torch.tensor([6, 1, 3])
    queries = torch.tensor([2, 7])
    with torch.no_grad():
        part = model.similarity({k: v[queries] for k, v in text.items()}, {k: v[rows] for k, v in image.items()})
    torch.testing.assert_close(part, full[queries][:, rows], rtol=1e-5, atol=1e-5, msg=name)


def test_scores_survive_a_checkpoint_round_trip(built, tmp_path):
    name, cfg, _, model, batch = built
    _, _, before = _scores(model, batch)
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, cfg=cfg, num_classes=NUM_CLASSES)
    restored, restored_cfg, _ = load_model_from_checkpoint(path, device="cpu")
    assert type(restored) is type(model) and restored_cfg.model.name == name == restored.name
    _, _, after = _scores(restored, batch)
    torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)
