"""ACSA: its losses and cross-attention score against direct computations, the Swin builder, the model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tbps.config import Config
from tbps.data.tokenizers import build_tokenizer
from tbps.errors import TBPSError
from tbps.losses.acsa import cmpc_loss, cross_scale_loss
from tbps.models import build_model
from tbps.models.methods.acsa import ACSA, blocked_cross_scale_similarity, cross_scale_similarity
from tbps.models.backbones.swin import build_swin
from tiny_models import TINY_SWIN, method_config



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- losses

def test_cmpc_loss_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    pids = torch.tensor([0, 1, 1, 2, 0])
    total = 0.0
    for side, other in ((v, t), (t, v)):
        for i in range(5):
            unit = other[i] / math.sqrt(sum(float(x) ** 2 for x in other[i]))
            proj = sum(float(a * b) for a, b in zip(side[i], unit)) * unit
            logits = [float((proj * w[c] / w[c].norm()).sum()) for c in range(3)]
            log_z = math.log(sum(math.exp(z) for z in logits))
            total += (log_z - logits[int(pids[i])]) / 5
    assert cmpc_loss(v, t, pids, w).item() == pytest.approx(total, rel=1e-10)


@pytest.mark.parametrize("label_norm", ["l1", "l2"])
def test_cross_scale_loss_matches_a_direct_computation(label_norm):
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(4, 4, generator=g, dtype=torch.float64) * 2 - 1
    pids = torch.tensor([0, 0, 1, 2])
    scale, eps = 20.0, 1e-8
    same = [[float(pids[i] == pids[j]) for j in range(4)] for i in range(4)]
    total = 0.0
    for matrix in (sim, sim.t()):
        for i in range(4):
            norm = sum(same[i]) if label_norm == "l1" else math.sqrt(sum(same[i]))
            z = sum(math.exp(scale * float(matrix[i, j])) for j in range(4))
            for j in range(4):
                p = math.exp(scale * float(matrix[i, j])) / z
                total += p * (math.log(p) - math.log(same[i][j] / norm + eps)) / 4
    assert cross_scale_loss(sim, pids, scale, label_norm).item() == pytest.approx(total, rel=1e-9)


# ----------------------------------------------------------------------------- cross-attention score

def _direct_score(keys, values, mask, queries, scale_values, lam, slope, directions):
    """Loops over every caption/image pair: SCAN-style attention, explicit contexts and cosines."""
    def cos(a, b):
        return float((a * b).sum() / (a.norm() * b.norm()))

    def leaky(x):
        return x if x >= 0 else slope * x

    out = torch.zeros(keys.shape[0], queries.shape[0], dtype=torch.float64)
    for t in range(keys.shape[0]):
        phrases = [p for p in range(keys.shape[1]) if mask[t, p] > 0]
        for g in range(queries.shape[0]):
            scales = range(queries.shape[1])
            a = {(s, p): leaky(cos(queries[g, s], keys[t, p])) for s in scales for p in phrases}
            i2t = []
            for s in scales:  # image scale s attends over the phrases; normalised over scales
                z = [lam * a[s, p] / math.sqrt(sum(a[r, p] ** 2 for r in scales) + 1e-8) for p in phrases]
                w = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
                context = sum(wi * values[t, p] for wi, p in zip(w, phrases))
                i2t.append(cos(scale_values[g, s], context))
            t2i = []
            for p in phrases:  # phrase p attends over the scales; normalised over real phrases
                z = [lam * a[s, p] / math.sqrt(sum(a[s, q] ** 2 for q in phrases) + 1e-8) for s in scales]
                w = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
                context = sum(wi * scale_values[g, s] for wi, s in zip(w, scales))
                t2i.append(cos(values[t, p], context))
            r_i2t, r_t2i = sum(i2t) / len(i2t), sum(t2i) / len(t2i)
            out[t, g] = {"both": (r_i2t + r_t2i) / 2, "i2t": r_i2t, "t2i": r_t2i}[directions]
    return out


def _random_feats(seed=0, t=3, g=4, p=5, s=3, d=6):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    mask = torch.ones(t, p, dtype=torch.float64)
    mask[0, 3:] = 0  # caption 0 has 3 phrases, caption 2 only one
    mask[2, 1:] = 0
    return rand(t, p, d), rand(t, p, d), mask, rand(g, s, d), rand(g, s, d)


@pytest.mark.parametrize("directions", ["both", "i2t", "t2i"])
def test_cross_attention_score_matches_a_direct_computation(directions):
    keys, values, mask, queries, scale_values = _random_feats()
    got = cross_scale_similarity(keys, values, mask, queries, scale_values, 20.0, 0.1, directions)
    expected = _direct_score(keys, values, mask, queries, scale_values, 20.0, 0.1, directions)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_padded_phrases_change_nothing():
    keys, values, mask, queries, scale_values = _random_feats(seed=3)
    base = cross_scale_similarity(keys, values, mask, queries, scale_values)
    keys2, values2 = keys.clone(), values.clone()
    keys2[mask == 0] = 100.0
    values2[mask == 0] = -7.0
    torch.testing.assert_close(cross_scale_similarity(keys2, values2, mask, queries, scale_values), base)


def test_blocked_score_equals_the_whole_matrix_and_any_row_subset():
    keys, values, mask, queries, scale_values = _random_feats(seed=2, t=7, g=9)
    text = {"phrase_key": keys, "phrase_value": values, "phrase_mask": mask}
    image = {"scale_query": queries, "scale_value": scale_values}
    whole = cross_scale_similarity(keys, values, mask, queries, scale_values)
    for block in (1, 15, 16, 100, 10**6):  # block counts (query, image, scale, phrase) entries
        torch.testing.assert_close(blocked_cross_scale_similarity(text, image, block), whole)
    rows, cols = torch.tensor([5, 0, 3]), torch.tensor([8, 2])
    sub = blocked_cross_scale_similarity({k: v[rows] for k, v in text.items()},
                                         {k: v[cols] for k, v in image.items()}, 30)
    torch.testing.assert_close(sub, whole[rows][:, cols])


# ----------------------------------------------------------------------------- Swin

@pytest.mark.parametrize("size", [(128, 64), (384, 128)])
def test_swin_stage_maps_at_person_sizes(size):
    swin = build_swin("swin_tiny_patch4_window7_224", size, embed_dim=8, depths=(1, 1, 1, 1),
                      num_heads=(1, 1, 1, 1), window_size=7)
    out = swin(torch.randn(1, 3, *size))
    shapes = [tuple(m.shape) for m in out["stages"]]
    h, w = size
    assert shapes == [(1, 8, h // 4, w // 4), (1, 16, h // 8, w // 8), (1, 32, h // 16, w // 16),
                      (1, 64, h // 32, w // 32)]
    assert tuple(out["last"].shape) == shapes[-1] and swin.stage_dims == [8, 16, 32, 64]


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors", "hf_folder"])
def test_swin_user_weights_load_in_every_format(tmp_path, fmt):
    kwargs = {"embed_dim": 8, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1), "window_size": 4}
    source = build_swin("swin_tiny_patch4_window7_224", (64, 32), **kwargs)
    state = {k: v.clone() for k, v in source.backbone.state_dict().items()}
    state["head.fc.weight"] = torch.zeros(10, 64)  # a classifier in the file is ignored
    if fmt == "pth":
        path = tmp_path / "swin.pth"
        torch.save(state, path)
    elif fmt == "wrapped":
        path = tmp_path / "swin.pth"
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / ("swin.safetensors" if fmt == "safetensors" else "folder")
        if fmt == "hf_folder":
            path.mkdir()
            (path / "config.json").write_text('{"architecture": "swin_tiny_patch4_window7_224"}')
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(path if fmt == "safetensors" else path / "model.safetensors"))
    loaded = build_swin("swin_tiny_patch4_window7_224", (64, 32), str(path), **kwargs)
    source.eval(), loaded.eval()
    images = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(loaded(images)["last"], source(images)["last"])


def test_swin_weight_errors_are_one_line(tmp_path):
    with pytest.raises(TBPSError, match="file not found"):
        build_swin("swin_tiny_patch4_window7_224", (64, 32), str(tmp_path / "nope.pth"))
    small = build_swin("swin_tiny_patch4_window7_224", (64, 32), embed_dim=8, depths=(1, 1, 1, 1),
                       num_heads=(1, 1, 1, 1), window_size=4)
    torch.save(small.backbone.state_dict(), tmp_path / "small.pth")
    with pytest.raises(TBPSError, match=r"does not fit Swin .*patch_embed.proj.weight has shape \[8, 3, 4, 4\]") as err:
        build_swin("swin_tiny_patch4_window7_224", (64, 32), str(tmp_path / "small.pth"), embed_dim=16,
                   depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=4)
    assert "\n" not in str(err.value)
    with pytest.raises(TBPSError, match="unknown Swin"):
        build_swin("swin_nonexistent", (64, 32))


# ----------------------------------------------------------------------------- the model

def acsa_config(**method) -> Config:
    return method_config("acsa", **method)


CAPTIONS = ["a man in a red shirt and blue jeans", "a woman with a black bag", "a girl wearing a white dress",
            "a boy carrying a green backpack"]


def _batch(tokenizer):
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randn(4, 3, 64, 32, generator=g), "token_ids": tokenizer(CAPTIONS),
            "pids": torch.tensor([0, 0, 1, 1]), "image_ids": torch.arange(4)}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("minilm", 24)


def test_forward_losses_gradients_and_retrieval_features(tokenizer):
    model = build_model(acsa_config(), 2, tokenizer)
    assert isinstance(model, ACSA)
    out = model(_batch(tokenizer))
    assert {"loss_cmpm", "loss_cmpc", "loss_cross_scale"} <= set(out)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    for name in ("image_encoder.backbone.backbone.patch_embed.proj.weight", "image_query.weight",
                 "text_key.0.weight", "text_encoder.proj.weight", "classifier.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        images = model.embed_images(_batch(tokenizer)["images"])
        texts = model.embed_texts(tokenizer(CAPTIONS))
    assert images["scale_query"].shape == (4, 1 + 4 + 4, 32) and texts["phrase_key"].shape == (4, 10, 32)
    assert texts["phrase_mask"].dtype == torch.float32 and texts["phrase_mask"].sum(1).tolist() == [3, 2, 2, 2]
    # any subset of rows of either side gives the matching block of the full matrix
    full = model.similarity(texts, images)
    sub = model.similarity({k: v[[2, 0]] for k, v in texts.items()}, {k: v[[3, 1]] for k, v in images.items()})
    torch.testing.assert_close(sub, full[[2, 0]][:, [3, 1]])
    cross = model.cross_scale(texts, images)
    torch.testing.assert_close(full, 0.9 * (texts["global"] @ images["global"].t()) + 0.1 * cross)
    # the retrieval globals are the bottlenecked encode_* features
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(model.encode_image(_batch(tokenizer)["images"]), dim=-1),
                                   images["global"])
        torch.testing.assert_close(F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1), texts["global"])


def test_without_bottleneck(tokenizer):
    model = build_model(acsa_config(bottleneck=False), 2, tokenizer)
    assert model.image_bottleneck is None
    out = model(_batch(tokenizer))
    assert torch.isfinite(sum(v for k, v in out.items() if k.startswith("loss_")))


def test_fuse_weight_one_and_no_cross_attention_score_global_only(tokenizer):
    model = build_model(acsa_config(fuse_weight=1.0), 2, tokenizer).eval()
    with torch.no_grad():
        images, texts = model.embed_images(_batch(tokenizer)["images"]), model.embed_texts(tokenizer(CAPTIONS))
    torch.testing.assert_close(model.similarity(texts, images), texts["global"] @ images["global"].t())
    plain = build_model(acsa_config(cross_attention=False), 2, tokenizer)
    out = plain(_batch(tokenizer))
    assert "loss_cross_scale" not in out and not hasattr(plain, "image_query")
    with torch.no_grad():
        assert set(plain.eval().embed_texts(tokenizer(CAPTIONS))) == {"global"}


def test_encoded_phrases_and_checkpoint_round_trip(tokenizer):
    model = build_model(acsa_config(phrase_features="encode"), 2, tokenizer).eval()
    rebuilt = build_model(acsa_config(phrase_features="encode"), 2, tokenizer, load_pretrained=False).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        a, b = model.embed_texts(tokenizer(CAPTIONS)), rebuilt.embed_texts(tokenizer(CAPTIONS))
        # an encoded phrase is the text encoder's global feature of "[CLS] phrase [SEP]"
        alone = model.text_encoder(tokenizer(["red shirt"]))["global"]
        spans, _ = model.phrases.spans(tokenizer(CAPTIONS[:1]))
        assert tokenizer.decode(tokenizer(CAPTIONS[:1])[0, spans[0, 1, 0]:spans[0, 1, 1]]) == "red shirt"
    torch.testing.assert_close(a["phrase_key"], b["phrase_key"])
    torch.testing.assert_close(F.normalize(model.text_key(alone), dim=-1)[0], a["phrase_key"][0, 1])


def test_clip_vit_with_intermediate_layer_windows():
    tokenizer = build_tokenizer("clip", 16)
    cfg = acsa_config(clip_window_layer=2)
    cfg.model.image_backbone, cfg.model.text_backbone, cfg.data.tokenizer = "tiny-vit", "clip", "clip"
    cfg.data.text_length = 16
    model = build_model(cfg, 2, tokenizer)
    batch = {"images": torch.randn(4, 3, 64, 32), "token_ids": tokenizer(CAPTIONS), "pids": torch.tensor([0, 0, 1, 1])}
    out = model(batch)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert model.image_encoder.window_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        feats = model.eval().embed_images(batch["images"])
    assert feats["scale_query"].shape == (4, 9, 128)


def test_options_are_checked_with_one_line_errors(tokenizer):
    for method, match in [({"fuse_weight": 1.5}, "fuse_weight"), ({"phrase_features": "parse"}, "phrase_features"),
                          ({"window_grid": [2]}, "window_grid"), ({"unknown_key": 1}, "unknown config key")]:
        with pytest.raises(TBPSError, match=match):
            build_model(acsa_config(**method), 2, tokenizer)
    cfg = acsa_config()
    cfg.model.text_backbone = "clip"
    with pytest.raises(TBPSError, match="needs text_backbone=hf"):
        build_model(cfg, 2, tokenizer)
    cfg = acsa_config()
    cfg.loss = {"sdm": 1.0}
    with pytest.raises(TBPSError, match="unknown loss"):
        build_model(cfg, 2, tokenizer)


# ----------------------------------------------------------------------------- the authors' recipe

def test_cmpm_is_gated_below_half_as_the_authors_code(tokenizer, monkeypatch):
    """utils/metric.py Loss.forward: total = 4 CMPC + 0.1 cont, plus CMPM only while CMPM >= 0.5."""
    import tbps.models.methods.acsa as acsa_module

    model = build_model(acsa_config(), 2, tokenizer)
    model.loss_weights = {"cmpm": 1.0, "cmpc": 4.0, "cross_scale": 0.1}
    for value, active in ((0.3, 0.0), (0.5, 1.0), (2.0, 1.0)):
        monkeypatch.setattr(acsa_module, "cmpm_loss", lambda *a, v=value, **k: torch.tensor(v, requires_grad=True))
        out = model(_batch(tokenizer))
        assert out["loss_cmpm"].item() == pytest.approx(value * active)
        assert out["cmpm"].item() == pytest.approx(value) and out["cmpm_active"].item() == active
    model.options.cmpm_gate = 0.0
    out = model(_batch(tokenizer))
    assert out["cmpm_active"].item() == 1.0


def test_channel_regions_are_the_authors_chunks_of_the_global_vector(tokenizer):
    """models/model.py: residual block on the global vector, six chunks, head = 1-2, upper = 2-3,
    lower = 4-5, feet = 6, each Linear + ReLU (+ dropout) to D; they take the region slots."""
    from tbps.models.methods.acsa import ChannelRegions

    torch.manual_seed(0)
    regions = ChannelRegions(12).eval()
    x = torch.randn(3, 12)
    lin1, bn1, _, lin2, bn2 = regions.block
    r = F.relu(x + bn2(lin2(F.relu(bn1(lin1(x))))))
    chunks = r.view(3, 6, 2)
    for k, (a, b) in enumerate(((0, 2), (1, 3), (3, 5), (5, 6))):
        linear = regions.heads[k][0]
        want = F.relu(chunks[:, a:b].reshape(3, -1) @ linear.weight.t() + linear.bias)
        torch.testing.assert_close(regions(x)[:, k], want)
    assert ChannelRegions(32).spans == [(0, 10), (5, 16), (16, 26), (26, 32)]  # bounds floor(k * 32 / 6)
    model = build_model(acsa_config(regions="channel"), 2, tokenizer)
    assert model.image_encoder.region_proj is None
    out = model(_batch(tokenizer))
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert model.channel_regions.heads[0][0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert model.eval().embed_images(_batch(tokenizer)["images"])["scale_query"].shape == (4, 1 + 4 + 4, 32)
    with pytest.raises(TBPSError, match="num_regions=4"):
        build_model(acsa_config(regions="channel", num_regions=3), 2, tokenizer)


def test_fuse_directions_score_the_image_to_text_term_alone(tokenizer):
    model = build_model(acsa_config(fuse_directions="i2t"), 2, tokenizer).eval()
    with torch.no_grad():
        images, texts = model.embed_images(_batch(tokenizer)["images"]), model.embed_texts(tokenizer(CAPTIONS))
        i2t = blocked_cross_scale_similarity(texts, images, 1 << 20, attn_lambda=20.0, leaky_slope=0.1,
                                             directions="i2t")
    torch.testing.assert_close(model.similarity(texts, images),
                               0.9 * (texts["global"] @ images["global"].t()) + 0.1 * i2t)


def test_recipe_and_step_schedule_are_the_authors(tokenizer):
    """config.py: AdamW lr 8e-5, weight decay 0.05, MultiStepLR([8, 15, 20], 0.1) stepped per epoch."""
    from tbps.config import load_config
    from tbps.engine.optim import lr_factor
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "acsa_base.yaml")
    assert cfg.loss == {"cmpm": 1.0, "cmpc": 4.0, "cross_scale": 0.1}
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 8e-5, 0.05)
    assert cfg.method["fuse_directions"] == "i2t" and cfg.method["cmpm_gate"] == 0.5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.optim.milestones, cfg.optim.gamma)
    for epoch in range(cfg.train.epochs):
        for step in range(epoch * 3, epoch * 3 + 3):
            assert lr_factor(step, cfg.optim, 3, 60, 1.0) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_cross_scale_image_rows_loss_matches_a_direct_computation():
    """utils/metric.py contrastive_loss: per image i, softmax over captions j of each direction's
    score, KL to the L2-normalised labels, mean over images, summed over the two directions."""
    from tbps.losses.acsa import cross_scale_image_rows_loss

    g = torch.Generator().manual_seed(4)
    i2t, t2i = torch.rand(6, 6, generator=g, dtype=torch.float64), torch.rand(6, 6, generator=g, dtype=torch.float64)
    pids = [0, 0, 1, 2, 2, 2]
    for norm in ("l2", "l1"):
        total = 0.0
        for matrix in (i2t, t2i):  # given (caption, image): row i of the code's matrix is column i here
            for i in range(6):
                logits = [20.0 * float(matrix[j, i]) for j in range(6)]
                z = math.log(sum(math.exp(v) for v in logits))
                count = sum(p == pids[i] for p in pids)
                denom = math.sqrt(count) if norm == "l2" else count
                for j in range(6):
                    p = math.exp(logits[j] - z)
                    q = (1.0 / denom) if pids[j] == pids[i] else 0.0
                    total += p * (logits[j] - z - math.log(q + 1e-8)) / 6
        got = cross_scale_image_rows_loss(i2t, t2i, torch.tensor(pids), 20.0, norm)
        assert got.item() == pytest.approx(total, rel=1e-9)


def test_code_cross_loss_and_mean_global_scale(tokenizer):
    model = build_model(acsa_config(scale_global="mean"), 2, tokenizer)
    assert model.options.cross_loss == "image_rows"
    out = model(_batch(tokenizer))
    assert torch.isfinite(out["loss_cross_scale"])
    with torch.no_grad():
        model.eval()
        scales = model.image_encoder(_batch(tokenizer)["images"])["scales"]
        want = model.image_query(torch.cat([scales[:, 1:].mean(1, keepdim=True), scales[:, 1:]], dim=1))
        torch.testing.assert_close(model.embed_images(_batch(tokenizer)["images"])["scale_query"],
                                   F.normalize(want, dim=-1))
    mean = build_model(acsa_config(cross_loss="mean"), 2, tokenizer)
    assert torch.isfinite(mean(_batch(tokenizer))["loss_cross_scale"])


def test_mobilenet_scales_are_the_same_with_the_frozen_block_cache():
    """ACSA reads stage maps (forward_stages): with the cache on, the windows come from the cached
    output of the frozen blocks 0-13 (stage end 13) and every scale equals the uncached pass."""
    from tbps.models.methods.acsa import ACSAOptions, SwinScales
    from tbps.models.backbones.torchvision_encoder import TrunkStages, build_trunk

    torch.manual_seed(0)
    trunk = build_trunk("mobilenet_v2", "", 1, 14).eval()
    scales = SwinScales(TrunkStages(trunk), 16, ACSAOptions(window_grid=[2, 2])).eval()
    images = torch.randn(3, 3, 64, 32)
    plain = scales(images)
    trunk.enable_frozen_cache()
    scales(images[:2])
    cached = scales(images)
    assert len(trunk._cache) == 3
    for key in ("global", "scales"):
        torch.testing.assert_close(cached[key], plain[key])
    early = SwinScales(TrunkStages(trunk), 16, ACSAOptions(window_stage=-3, window_grid=[2, 2]))
    with pytest.raises(TBPSError, match="inside the cached frozen blocks"):
        early(images)
