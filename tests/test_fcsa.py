"""FCSA: saliency selection, exact pixel masking, the CMRS triplet loss, gradients through the
masked re-encoding, the hard-positive swap, and IRRA's inference path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tbps.config import Config, build_dataclass, load_config
from tbps.errors import TBPSError
from tbps.losses.fcsa import cmrs_triplet_loss
from tbps.models import METHODS, build_model
from tbps.models.base import TBPSModel
from tbps.models.methods.fcsa import (FCSA, FCSAOptions, patch_pixel_mask, ratio_counts, select_by_saliency)

from tiny_models import EOT, LENGTH, MASK, PAD, SOT, TOKENIZER, random_token_ids, total_loss
from tiny_models import method_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(backbone: str = "tiny-vit", loss: dict | None = None, positives: int = 2, **method) -> Config:
    cfg = method_config("fcsa", loss, model={"image_backbone": backbone}, **method)
    cfg.data.positives = positives
    return cfg


def batch_of(n_ids: int = 4, per_id: int = 2, k: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = n_ids * per_id
    token_ids = random_token_ids(n * (k + 1), g)
    return {"images": torch.randn(n, 3, 64, 32, generator=g), "token_ids": token_ids[:n],
            "pids": torch.arange(n) // per_id, "image_ids": torch.arange(n),
            "pos_images": torch.randn(n, k, 3, 64, 32, generator=g),
            "pos_token_ids": token_ids[n:].view(n, k, LENGTH)}


# ----------------------------------------------------------------------------- saliency selection

def test_select_by_saliency_least_most_random_and_eligible():
    saliency = torch.tensor([[0.9, -0.5, 0.1, 0.3, -0.2],
                             [0.0, 0.8, -0.9, 0.7, 0.5]])
    counts = torch.tensor([2, 1])
    least = select_by_saliency(saliency, counts, "least")
    assert least.tolist() == [[False, True, False, False, True], [False, False, True, False, False]]
    most = select_by_saliency(saliency, counts, "most")
    assert most.tolist() == [[True, False, False, True, False], [False, True, False, False, False]]
    eligible = torch.tensor([[True, False, True, True, True], [True, True, False, True, True]])
    least_eligible = select_by_saliency(saliency, counts, "least", eligible)
    assert least_eligible.tolist() == [[False, False, True, False, True], [True, False, False, False, False]]
    random = select_by_saliency(saliency, torch.tensor([3, 3]), "random", eligible)
    assert random.sum(dim=1).tolist() == [3, 3] and not (random & ~eligible).any()
    assert ratio_counts(torch.tensor([8, 10, 1, 0]), 0.3).tolist() == [2, 3, 1, 0]


@pytest.mark.parametrize("backbone,grid", [("tiny-vit", (4, 2)), ("tiny-rn", (2, 1))])
def test_image_saliency_and_masked_pixels_are_exactly_the_chosen_patches(backbone, grid):
    model = build_model(tiny_config(backbone, image_mask_ratio=0.25), num_classes=4, tokenizer=TOKENIZER)
    encoder = model.image_encoder
    assert tuple(encoder.grid_size) == grid
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        tokens = encoder(images)["tokens"]
    n = grid[0] * grid[1]
    assert tokens.shape[1] == 1 + n  # pooled/CLS token, then the grid row-major
    # constructed patch tokens (c_p, 1, 0, ...): the cosine to the caption's e_0 rises with c_p;
    # sample 0's patches grow less similar along the grid, sample 1's more similar
    c = torch.linspace(1.0, -1.0, n)
    patch_tokens = torch.zeros(2, n, 8)
    patch_tokens[0, :, 0], patch_tokens[1, :, 0], patch_tokens[:, :, 1] = c, c.flip(0), 1.0
    text_global = torch.eye(8)[0].repeat(2, 1)
    masked, chosen = model.mask_patches(images, patch_tokens, text_global)
    m = max(1, round(0.25 * n))  # 2 of 8 ViT patches, 1 of 2 ResNet cells
    expected = torch.zeros(2, n, dtype=torch.bool)
    expected[0, n - m:] = True  # the last m patches of sample 0, the first m of sample 1
    expected[1, :m] = True
    assert torch.equal(chosen, expected)
    changed = (masked != images).any(dim=1)  # (B, H, W)
    bh, bw = 64 // grid[0], 32 // grid[1]
    cells = expected.view(2, *grid).repeat_interleave(bh, 1).repeat_interleave(bw, 2)
    assert torch.equal(changed, cells)
    assert torch.equal(patch_pixel_mask(expected, grid, (64, 32)), cells)

    model.options.saliency = "most"
    _, chosen_most = model.mask_patches(images, patch_tokens, text_global)
    assert torch.equal(chosen_most, expected.flip(1))


def test_text_saliency_masks_least_similar_real_tokens_only():
    model = build_model(tiny_config(text_mask_ratio=0.3), num_classes=4, tokenizer=TOKENIZER)
    token_ids = torch.tensor([[SOT, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, EOT] + [PAD] * 4,
                              [SOT, 21, 22, 23, EOT] + [PAD] * 11])
    d = model.embed_dim
    image_global = torch.zeros(2, d)
    image_global[:, 0] = 1
    text_tokens = torch.zeros(2, LENGTH, d)
    text_tokens[:, :, 0] = torch.linspace(1.0, 0.1, LENGTH)  # later tokens less similar...
    text_tokens[:, :, 1] = 1.0
    text_tokens[:, 0, 0] = text_tokens[:, LENGTH - 1, 0] = -5.0  # ...start and padding least of all
    text_tokens[0, 11, 0] = -5.0  # the end token too: never eligible anyway
    corrupted, chosen, valid = model.mask_caption_tokens(token_ids, text_tokens, image_global)
    # row 0: 10 real words -> 3 masked, the last three words; row 1: 3 words -> 1, the last word
    assert chosen[0].nonzero().squeeze(1).tolist() == [8, 9, 10]
    assert chosen[1].nonzero().squeeze(1).tolist() == [3]
    assert torch.equal(corrupted[chosen], torch.full((4,), MASK))
    assert torch.equal(corrupted[~chosen], token_ids[~chosen])
    assert valid[0, 11] and not valid[0, 12]


# ----------------------------------------------------------------------------- the triplet loss

def _triplet_reference(pred, target, pred_neg, pids, margin, valid):
    p = F.normalize(pred.double(), dim=-1)
    t = F.normalize(target.double(), dim=-1)
    pn = F.normalize(pred_neg.double(), dim=-1)
    total = 0.0
    for i in range(len(p)):
        d_pos = torch.dist(p[i], t[i]).item()
        if valid[i]:
            total += max(0.0, margin + d_pos - torch.dist(pn[i], t[i]).item())
        negatives = [torch.dist(p[i], t[j]).item() for j in range(len(p)) if pids[j] != pids[i]]
        if negatives:
            total += max(0.0, margin + d_pos - min(negatives))
    return total / len(p)


def test_cmrs_triplet_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    pred, target, pred_neg = (torch.randn(6, 5, generator=g) for _ in range(3))
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    valid = torch.tensor([True, True, False, True, True, True])
    for margin in (0.0, 0.5, 2.0):
        got = cmrs_triplet_loss(pred, target, pred_neg, pids, margin, valid)
        want = _triplet_reference(pred, target, pred_neg, pids, margin, valid)
        assert got.item() == pytest.approx(want, abs=1e-5)
    # one identity only: no negative image, no term
    same = torch.zeros(6, dtype=torch.long)
    got = cmrs_triplet_loss(pred, target, pred_neg, same, 0.5, torch.zeros(6, dtype=torch.bool))
    assert got.item() == 0.0


def test_cmrs_triplet_loss_with_a_given_negative_image_matches_a_direct_computation():
    """FCSA's code: the negative image of row i is named (by global text-to-image cosine), not the
    hardest reconstruction: L_img_i = [m + d(p_i, t_i) - d(p_i, t_{n_i})]_+ where y_{n_i} != y_i."""
    g = torch.Generator().manual_seed(2)
    pred, target, pred_neg = (torch.randn(6, 5, generator=g) for _ in range(3))
    pids = torch.tensor([0, 0, 1, 1, 2, 2])
    negative_image = torch.tensor([2, 5, 0, 1, 3, 4])  # row 5's pick (4) is its own identity: no term
    p, t = F.normalize(pred.double(), dim=-1), F.normalize(target.double(), dim=-1)
    pn = F.normalize(pred_neg.double(), dim=-1)
    for margin in (0.0, 0.5, 2.0):
        want = 0.0
        for i in range(6):
            d_pos = torch.dist(p[i], t[i]).item()
            want += max(0.0, margin + d_pos - torch.dist(pn[i], t[i]).item())
            j = int(negative_image[i])
            if pids[j] != pids[i]:
                want += max(0.0, margin + d_pos - torch.dist(p[i], t[j]).item())
        got = cmrs_triplet_loss(pred, target, pred_neg, pids, margin, negative_image=negative_image)
        assert got.item() == pytest.approx(want / 6, abs=1e-5)


def test_global_captions_are_bert_masked_and_the_text_branch_sees_the_clean_copy(monkeypatch):
    """The authors' loader masks the captions ID/CMPM see (p = 0.35, 80/10/10); SGMM's text branch
    masks the clean caption. ``global_mask_prob=0`` keeps every caption clean (the paper's reading)."""
    batch = batch_of()
    for prob in (0.35, 0.0):
        model = build_model(tiny_config(swap_rate=0.0, global_mask_prob=prob), num_classes=4, tokenizer=TOKENIZER)
        assert model.options.cmpm_label_norm == "l2"
        calls: list[torch.Tensor] = []
        encode, text_cmrs = model.text_encoder.forward, model.text_cmrs
        monkeypatch.setattr(model.text_encoder, "forward",
                            lambda ids, *a, _f=encode, **k: calls.append(ids) or _f(ids, *a, **k))
        sgmm: list[torch.Tensor] = []
        monkeypatch.setattr(model, "text_cmrs", lambda ids, *a, _f=text_cmrs: sgmm.append(ids) or _f(ids, *a))
        torch.manual_seed(0)
        model(batch)
        global_ids = calls[0]  # the first text pass feeds ID and CMPM
        assert torch.equal(sgmm[0], batch["token_ids"])
        if prob == 0.0:
            assert torch.equal(global_ids, batch["token_ids"])
        else:
            changed = global_ids != batch["token_ids"]
            assert changed.any() and (global_ids[changed] == MASK).float().mean() > 0.5


def test_cmrs_triplet_terms_are_zero_when_the_margin_is_met():
    target = torch.eye(4)  # four identities, orthogonal targets: other targets at distance sqrt(2)
    pred = target + 0.01 * torch.randn(4, 4)  # each prediction next to its own target
    pred_neg = -target  # the wrong caption reconstructs the opposite: distance 2
    pids = torch.arange(4)
    loss = cmrs_triplet_loss(pred, target, pred_neg, pids, margin=0.5)
    assert loss.item() == 0.0
    assert cmrs_triplet_loss(pred, target, pred_neg, pids, margin=1.9).item() > 0  # not met any more
    assert cmrs_triplet_loss(target, target, target.roll(1, 0), pids, margin=0.5).item() == 0.0


# ----------------------------------------------------------------------------- gradients

def test_gradients_reach_the_encoders_through_the_masked_reencoding():
    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER)
    batch = batch_of()
    with torch.no_grad():  # the unmasked pass carries no gradient: only the re-encodings can
        image_out = model.image_encoder(batch["images"])
        text_out = model.text_encoder(batch["token_ids"])
    model.image_cmrs(batch["images"], image_out, text_out, batch["pids"]).backward()
    grads = [p.grad for p in model.image_encoder.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.text_encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_reconstructor.parameters())

    model.zero_grad(set_to_none=True)
    loss, _ = model.text_cmrs(batch["token_ids"], image_out, text_out["tokens"])
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_encoder.parameters())
    assert all(p.grad is None for p in model.image_encoder.parameters())


def test_training_step_losses_finite_and_gradients_everywhere():
    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER)
    batch = batch_of()
    original = {k: v.clone() for k, v in batch.items()}
    out = model(batch)
    assert {"loss_id", "loss_cmpm", "loss_cmrs_image", "loss_cmrs_text", "acc_mlm"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values())
    assert all(torch.equal(batch[k], original[k]) for k in batch), "the batch was modified in place"
    total_loss(out).backward()
    for prefix in ("image_encoder.", "text_encoder.", "classifier.", "image_reconstructor.",
                   "cross_modal.", "mlm_head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix


# ----------------------------------------------------------------------------- hard-positive swap

def test_swap_takes_the_least_similar_candidate_in_disjoint_rows():
    model = build_model(tiny_config(swap_rate=0.5, swap_rows="disjoint"), num_classes=4, tokenizer=TOKENIZER)
    batch = batch_of(k=3)
    torch.manual_seed(5)
    clean, pos_clean = batch["token_ids"] + 1, batch["pos_token_ids"] + 1  # stand-ins for the unmasked copies
    images, token_ids, image_rows, text_rows, clean_ids = model.swap_hard_positives(
        batch["images"], batch["token_ids"], batch["pos_images"], batch["pos_token_ids"], clean, pos_clean)
    assert model.training and model.image_encoder.training  # the choice ran in eval mode, then restored
    assert image_rows.numel() + text_rows.numel() == 8  # rate 0.5 twice: every row, each once
    assert not set(image_rows.tolist()) & set(text_rows.tolist())
    model.eval()
    with torch.no_grad():
        for row in image_rows.tolist():
            t = F.normalize(model.encode_text(batch["token_ids"][row:row + 1]), dim=-1)
            v = F.normalize(model.encode_image(batch["pos_images"][row]), dim=-1)
            assert torch.equal(images[row], batch["pos_images"][row, (v @ t.t()).argmin()])
            assert torch.equal(token_ids[row], batch["token_ids"][row])
        for row in text_rows.tolist():
            v = F.normalize(model.encode_image(batch["images"][row:row + 1]), dim=-1)
            t = F.normalize(model.encode_text(batch["pos_token_ids"][row]), dim=-1)
            pick = (t @ v.t()).argmin()
            assert torch.equal(token_ids[row], batch["pos_token_ids"][row, pick])
            assert torch.equal(clean_ids[row], pos_clean[row, pick])  # the clean copy follows the same swap
            assert torch.equal(images[row], batch["images"][row])
        for row in image_rows.tolist():
            assert torch.equal(clean_ids[row], clean[row])


def test_exact_swap_rows_are_the_codes_counts_and_read_the_original_pairs():
    """The code: int(0.1 B) rows per swap from two independent permutations (overlap allowed); the
    caption choice of a row whose image was swapped reads its original image."""
    model = build_model(tiny_config(swap_rate=0.5), num_classes=4, tokenizer=TOKENIZER)
    assert model.options.swap_rows == "exact"
    batch = batch_of(k=3)
    for seed in range(4):
        torch.manual_seed(seed)
        images, token_ids, image_rows, text_rows, _ = model.swap_hard_positives(
            batch["images"], batch["token_ids"], batch["pos_images"], batch["pos_token_ids"])
        assert image_rows.numel() == text_rows.numel() == 4
        model.eval()
        with torch.no_grad():
            for row in text_rows.tolist():
                v = F.normalize(model.encode_image(batch["images"][row:row + 1]), dim=-1)
                t = F.normalize(model.encode_text(batch["pos_token_ids"][row]), dim=-1)
                assert torch.equal(token_ids[row], batch["pos_token_ids"][row, (t @ v.t()).argmin()])
        model.train()
    with pytest.raises(TBPSError, match="swap_rate"):
        build_model(tiny_config(swap_rate=0.6, swap_rows="disjoint"), num_classes=4, tokenizer=TOKENIZER)


def test_swap_needs_positives():
    with pytest.raises(TBPSError, match="data.positives"):
        build_model(tiny_config(positives=0), num_classes=4, tokenizer=TOKENIZER)
    model = build_model(tiny_config(positives=0, swap_rate=0.0), num_classes=4, tokenizer=TOKENIZER)
    batch = {k: v for k, v in batch_of().items() if not k.startswith("pos_")}
    assert "swapped_images" not in model(batch)
    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER)
    with pytest.raises(TBPSError, match="no positives"):
        model(batch)


# ----------------------------------------------------------------------------- inference = IRRA's

def test_inference_uses_global_features_at_irra_cost():
    assert "fcsa" in METHODS
    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER).eval()
    assert isinstance(model, FCSA)
    for name in ("embed_images", "embed_texts", "similarity"):
        assert getattr(FCSA, name) is getattr(TBPSModel, name)
    calls = []
    model.image_encoder.register_forward_hook(lambda *a: calls.append("image"))
    model.text_encoder.register_forward_hook(lambda *a: calls.append("text"))
    batch = batch_of()
    with torch.no_grad():
        out = model(batch)
    assert calls == ["image", "text"]  # no swap, no masked re-encoding outside training
    assert not any(k.startswith("loss_cmrs") for k in out)


def test_options_and_losses_validated():
    with pytest.raises(TBPSError, match="method.saliency"):
        FCSAOptions(saliency="middle")
    with pytest.raises(TBPSError, match="image_mask_ratio"):
        FCSAOptions(image_mask_ratio=1.0)
    with pytest.raises(TBPSError, match="swap_rate"):
        FCSAOptions(swap_rate=1.1)
    with pytest.raises(TBPSError, match="margin"):
        FCSAOptions(margin=-1)
    with pytest.raises(TBPSError, match="mlm_prob=0.3: IRRA's MLM option does not apply"):
        FCSAOptions(mlm_prob=0.3)
    assert FCSAOptions(mlm_prob=0.15, mlm_activation="gelu").mlm_activation == "gelu"  # defaults and used keys pass
    with pytest.raises(TBPSError, match="unknown config key method.mask_ratio"):
        build_dataclass(FCSAOptions, {"mask_ratio": 0.3}, "method")
    with pytest.raises(TBPSError, match="global features"):
        build_model(tiny_config(loss={"cmrs_image": 1.0}), num_classes=4, tokenizer=TOKENIZER)
    with pytest.raises(TBPSError, match=r"loss\.irr: unknown loss"):
        build_model(tiny_config(loss={"id": 1.0, "irr": 1.0}), num_classes=4, tokenizer=TOKENIZER)
    model = build_model(tiny_config(loss={"sdm": 1.0, "cmrs_text": 0.0}), num_classes=4, tokenizer=TOKENIZER)
    assert model.image_reconstructor is None and model.mlm_head is None and model.classifier is None
    assert set(k for k in model(batch_of()) if k.startswith("loss_")) == {"loss_sdm"}


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp", "synth"])
def test_recipes_load_with_paper_defaults(name):
    cfg = load_config(CONFIGS / f"fcsa_{name}.yaml")
    # 4 candidates as the authors; the synth comparison's people have 2 images, so 1 other pair
    assert cfg.model.name == "fcsa" and cfg.data.positives == (1 if name == "synth" else 4)
    assert cfg.loss == {"id": 1.0, "cmpm": 1.0, "cmrs_image": 1.0, "cmrs_text": 1.0}
    options = build_dataclass(FCSAOptions, cfg.method, "method")
    assert (options.saliency, options.swap_rate, options.margin) == ("least", 0.1, 0.5)
    if name == "synth":
        irra = load_config(CONFIGS / "irra_synth.yaml")
        assert (cfg.data.image_size, cfg.model.image_backbone, cfg.data.batch_size, cfg.optim, cfg.train.epochs) \
            == (irra.data.image_size, irra.model.image_backbone, irra.data.batch_size, irra.optim, irra.train.epochs)
    else:
        assert cfg.model.image_backbone == "ViT-B-16" and cfg.data.image_size == [384, 128]
        assert options.cross_layers == 2 and cfg.train.epochs == 60
