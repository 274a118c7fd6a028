"""PCC: its losses against direct loops, the stripes, the torchvision ResNet loader, the model's
training step and retrieval hooks, and the attention figure."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision

from tbps.config import Config
from tbps.errors import TBPSError
from tbps.losses.pcc import CMR_COMMONALITY, cmr_loss, cmr_margins, cmr_pair_margins, part_similarities, ranking_loss
from tbps.models import METHODS, build_model
from tbps.models.methods.pcc import PCC, PartClassifier, PCCOptions, pool_stripes, stripe_bounds
from tbps.models.backbones.resnet import build_resnet, load_resnet_weights, resnet_grid
from tiny_models import method_config
from tiny_models import tiny_config as base_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- losses

def direct_ranking(sim: torch.Tensor, pids: list[int], margin, negatives: str = "hardest") -> float:
    """The ranking loss by explicit loops over positive pairs and negatives; ``margin`` a number or a
    matrix indexed [image, caption] of the negative pair."""
    n = len(pids)

    def m(a: int, b: int) -> float:
        return float(margin) if isinstance(margin, (int, float)) else float(margin[a][b])

    total, count = 0.0, 0
    for i, j in itertools.product(range(n), range(n)):
        if pids[i] != pids[j]:
            continue
        count += 1
        pos = float(sim[i, j])
        hinges_text = [max(0.0, m(i, l) - pos + float(sim[i, l])) for l in range(n) if pids[l] != pids[i]]
        hinges_image = [max(0.0, m(l, j) - pos + float(sim[l, j])) for l in range(n) if pids[l] != pids[j]]
        for hinges in (hinges_text, hinges_image):
            if hinges:
                total += max(hinges) if negatives == "hardest" else sum(hinges) / len(hinges)
    return total / (2 * count)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


def direct_cmr(image_parts: torch.Tensor, text_parts: torch.Tensor, pids: list[int], m0: float,
               adaptive: bool, negatives: str = "hardest", commonality: str = "batch") -> tuple[float, list]:
    """CMR written out: cosines by hand; commonality the mean over different-identity pairs ("batch")
    or, per pair, the mean of the two within-modality part cosines ("pair")."""
    n, parts, _ = image_parts.shape
    losses, margins = [], []
    for k in range(parts):
        sim = torch.zeros(n, n, dtype=torch.float64)
        for i, j in itertools.product(range(n), range(n)):
            sim[i, j] = _cos(image_parts[i, k], text_parts[j, k])
        if not adaptive:
            margin = m0
        elif commonality == "batch":
            cross = [float(sim[i, j]) for i, j in itertools.product(range(n), range(n)) if pids[i] != pids[j]]
            margin = m0 * (1 - min(1.0, max(0.0, sum(cross) / len(cross))))
        else:
            margin = [[m0 * (1 - min(1.0, max(0.0, (_cos(image_parts[a, k], image_parts[b, k])
                                                    + _cos(text_parts[a, k], text_parts[b, k])) / 2)))
                       for b in range(n)] for a in range(n)]
        margins.append(margin)
        losses.append(direct_ranking(sim, pids, margin, negatives))
    return sum(losses) / parts, margins


@pytest.mark.parametrize("negatives", ["hardest", "all"])
def test_ranking_loss_matches_direct_loops(negatives):
    g = torch.Generator().manual_seed(1)
    sim = torch.rand(7, 7, generator=g, dtype=torch.float64) * 2 - 1
    pids = [0, 0, 1, 1, 1, 2, 3]
    got = ranking_loss(sim, torch.tensor(pids), 0.3, negatives)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(direct_ranking(sim, pids, 0.3, negatives), abs=1e-12)


def test_ranking_loss_without_negatives_is_zero_and_finite():
    sim = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    loss = ranking_loss(sim, torch.zeros(4, dtype=torch.long), 0.2)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.isfinite(sim.grad).all()


@pytest.mark.parametrize("negatives", ["hardest", "all"])
def test_ranking_loss_with_a_margin_per_negative_pair_matches_direct_loops(negatives):
    g = torch.Generator().manual_seed(4)
    sim = torch.rand(7, 7, generator=g, dtype=torch.float64) * 2 - 1
    margin = torch.rand(7, 7, generator=g, dtype=torch.float64) * 0.5
    pids = [0, 0, 1, 1, 1, 2, 3]
    got = ranking_loss(sim, torch.tensor(pids), margin, negatives)
    assert float(got) == pytest.approx(direct_ranking(sim, pids, margin.tolist(), negatives), abs=1e-12)
    uniform = ranking_loss(sim, torch.tensor(pids), torch.full((7, 7), 0.3, dtype=torch.float64), negatives)
    assert float(uniform) == pytest.approx(float(ranking_loss(sim, torch.tensor(pids), 0.3, negatives)), abs=1e-12)


@pytest.mark.parametrize("adaptive, negatives, commonality", [
    (True, "hardest", "batch"), (False, "hardest", "batch"), (True, "all", "batch"),
    (True, "hardest", "pair"), (True, "all", "pair")])
def test_cmr_matches_direct_computation(adaptive, negatives, commonality):
    g = torch.Generator().manual_seed(2)
    pids = [0, 0, 1, 1, 2, 2, 3, 3]
    image_parts = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    text_parts = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    # part 1 alike across people (a shared offset): its commonality is clearly above zero
    shared = torch.randn(5, generator=g, dtype=torch.float64) * 3
    image_parts[:, 1] += shared
    text_parts[:, 1] += shared
    expected, margins = direct_cmr(image_parts, text_parts, pids, 0.4, adaptive, negatives, commonality)
    got = cmr_loss(image_parts, text_parts, torch.tensor(pids), 0.4, adaptive=adaptive, negatives=negatives,
                   commonality=commonality)
    assert float(got) == pytest.approx(expected, abs=1e-12)
    if commonality == "pair":
        got_margins = cmr_pair_margins(image_parts, text_parts, 0.4)
        assert torch.allclose(got_margins, torch.tensor(margins, dtype=torch.float64), atol=1e-12, rtol=0)
        return
    got_margins = cmr_margins(part_similarities(image_parts, text_parts), torch.tensor(pids), 0.4)
    if adaptive:
        assert got_margins.tolist() == pytest.approx(margins, abs=1e-12)
        assert margins[1] < 0.4 * 0.5  # the common part's margin has shrunk well below m0


def test_cmr_margin_shrinks_as_cross_identity_similarity_grows():
    """Mix a common vector into part 0 of everyone: the more alike people are there, the smaller its margin,
    while part 1 (left alone) keeps its margin."""
    g = torch.Generator().manual_seed(3)
    pids = torch.arange(12) // 3
    image_parts = torch.randn(12, 2, 16, generator=g, dtype=torch.float64)
    text_parts = torch.randn(12, 2, 16, generator=g, dtype=torch.float64)
    common = torch.randn(16, generator=g, dtype=torch.float64)
    previous = None
    for alpha in (0.0, 0.5, 1.0, 2.0, 4.0):
        image, text = image_parts.clone(), text_parts.clone()
        image[:, 0] += alpha * common
        text[:, 0] += alpha * common
        margins = cmr_margins(part_similarities(image, text), pids, 0.3)
        if previous is not None:
            assert margins[0] < previous[0] or previous[0] == 0
            assert margins[1] == pytest.approx(previous[1])
        previous = margins
    assert previous[0] < 0.1 * 0.3 and previous[1] > 0.25


def test_pair_margin_shrinks_only_for_the_people_who_share_the_part():
    """Give persons 0 and 1 the same part 0 (in their images and captions): the margin of their negative
    pairs shrinks at part 0 only, every other pair and part keeps m0 or near it."""
    g = torch.Generator().manual_seed(5)
    image = torch.randn(6, 2, 32, generator=g, dtype=torch.float64)
    text = torch.randn(6, 2, 32, generator=g, dtype=torch.float64)
    before = cmr_pair_margins(image, text, 0.3)
    shared = torch.randn(32, generator=g, dtype=torch.float64) * 4
    image[[0, 1], 0] += shared
    text[[0, 1], 0] += shared
    after = cmr_pair_margins(image, text, 0.3)
    assert after[0, 0, 1] < 0.1 * 0.3 and after[0, 1, 0] == after[0, 0, 1]  # alike in both modalities
    assert after[0, 0, 1] < before[0, 0, 1]
    untouched = torch.ones(2, 6, 6, dtype=torch.bool)
    untouched[0, 0, 1] = untouched[0, 1, 0] = False
    untouched[0, [0, 1]] = untouched[0, :, [0, 1]] = False  # rows / columns of the shifted vectors move a bit
    assert torch.equal(after[untouched], before[untouched])
    assert (after <= 0.3).all() and (after >= 0).all()


def test_cmr_gradients_reach_both_modalities():
    image = torch.randn(8, 3, 6, requires_grad=True)
    text = torch.randn(8, 3, 6, requires_grad=True)
    for commonality in CMR_COMMONALITY:
        image.grad = text.grad = None
        cmr_loss(image, text, torch.arange(8) // 2, 0.5, commonality=commonality).backward()
        assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- stripes

@pytest.mark.parametrize("rows, parts", [(24, 6), (8, 4), (7, 3), (5, 5), (13, 4)])
def test_stripes_partition_the_feature_map(rows, parts):
    bounds = stripe_bounds(rows, parts)
    assert len(bounds) == parts
    covered = [r for start, end in bounds for r in range(start, end)]
    assert covered == list(range(rows))  # every row exactly once, in order
    sizes = [end - start for start, end in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_pool_stripes_pools_each_stripe_only():
    feature_map = torch.randn(2, 3, 7, 4)
    pooled = pool_stripes(feature_map, 3, "max")
    for k, (start, end) in enumerate(stripe_bounds(7, 3)):
        assert torch.equal(pooled[:, k], feature_map[:, :, start:end].amax(dim=(2, 3)))
    averaged = pool_stripes(feature_map, 3, "avg")
    assert torch.allclose(averaged[:, 0], feature_map[:, :, 0:2].mean(dim=(2, 3)))


def test_more_parts_than_rows_is_an_error():
    with pytest.raises(TBPSError, match="num_parts=5"):
        stripe_bounds(4, 5)


# ----------------------------------------------------------------------------- torchvision ResNet

def test_resnet_feature_map_and_last_stride():
    images = torch.randn(1, 3, 64, 32)
    assert build_resnet("resnet18")(images).shape == (1, 512, 2, 1) and resnet_grid((64, 32), 2) == (2, 1)
    assert build_resnet("resnet18", last_stride=1)(images).shape == (1, 512, 4, 2) and resnet_grid((64, 32), 1) == (4, 2)
    assert resnet_grid((384, 128), 1) == (24, 8)
    with pytest.raises(TBPSError, match="resnet18"):
        build_resnet("resnet7")


def test_resnet_loads_a_torchvision_state_dict(tmp_path):
    source = torchvision.models.resnet18(weights=None)  # a random model saved as users save theirs
    with torch.no_grad():
        source.layer1[0].conv1.weight.normal_()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    encoder = build_resnet("resnet18", path, last_stride=1)
    assert torch.equal(encoder.backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert torch.equal(encoder.backbone.bn1.running_var, source.bn1.running_var)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "wrapped.pth")
    wrapped = build_resnet("resnet18", tmp_path / "wrapped.pth")
    assert torch.equal(wrapped.backbone.conv1.weight, source.conv1.weight)


def test_resnet_weight_errors_are_one_line(tmp_path):
    with pytest.raises(TBPSError, match="file not found") as missing:
        build_resnet("resnet18", tmp_path / "nope.pth")
    assert "\n" not in str(missing.value)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(TBPSError, match="shape") as shapes:
        load_resnet_weights(build_resnet("resnet50"), tmp_path / "r18.pth")
    assert "\n" not in str(shapes.value)
    partial = {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if "layer4" not in k}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(TBPSError, match="missing"):
        build_resnet("resnet18", tmp_path / "partial.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(TBPSError, match="cannot read"):
        build_resnet("resnet18", tmp_path / "text.pth")


# ----------------------------------------------------------------------------- the model

LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer():
    from tbps.data.tokenizers import build_tokenizer

    return build_tokenizer("minilm", LENGTH)


def tiny_config(loss: dict | None = None, **method) -> Config:
    return method_config("pcc", loss, **method)


CAPTIONS = ["a man in a red shirt", "a woman with a blue skirt", "a child in green shorts", "a man with a black bag"]


def batch(tokenizer, n_ids: int = 4, per_id: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = n_ids * per_id
    pids = torch.arange(n) // per_id
    return {"images": torch.randn(n, 3, 64, 32, generator=g),
            "token_ids": tokenizer([CAPTIONS[int(p) % len(CAPTIONS)] for p in pids]),
            "pids": pids, "image_ids": torch.arange(n)}


def test_forward_losses_and_gradients(tokenizer):
    model = build_model(tiny_config(), num_classes=4, tokenizer=tokenizer)
    assert isinstance(model, PCC) and "pcc" in METHODS
    out = model(batch(tokenizer))
    expected = {"loss_id_global", "loss_rank_global", "loss_id_coarse", "loss_rank_coarse", "loss_id_fine", "loss_cmr"}
    assert expected <= set(out)
    total = sum(v for k, v in out.items() if k.startswith("loss_"))
    assert torch.isfinite(total)
    total.backward()
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name in ("part_tokens", "text_part_tokens", "image_pos", "image_encoder.backbone.conv1.weight",
                 "text_encoder.proj.weight", "classifier_fine.weight"):
        param = dict(model.named_parameters())[name]
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert 0 < float(out["cmr_margin_min"]) <= float(out["cmr_margin_max"]) <= 0.2 + 1e-6


def test_ablations_build_only_their_branches(tokenizer):
    no_coarse = build_model(tiny_config(coarse=False), num_classes=4, tokenizer=tokenizer)
    out = no_coarse(batch(tokenizer))
    assert no_coarse.part_tokens is None and not any("coarse" in k for k in out)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    unused = [n for n, p in no_coarse.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused  # DDP needs every trainable parameter in the graph
    no_fine = build_model(tiny_config(loss={"id": 1.0, "rank": 1.0}, fine=False), num_classes=4, tokenizer=tokenizer)
    out = no_fine(batch(tokenizer))
    assert no_fine.text_part_tokens is None and "loss_cmr" not in out and "loss_id_fine" not in out
    with pytest.raises(TBPSError, match="loss.cmr"):
        build_model(tiny_config(fine=False), num_classes=4, tokenizer=tokenizer)
    fixed = build_model(tiny_config(cmr_adaptive=False), num_classes=4, tokenizer=tokenizer)
    assert "loss_cmr" in fixed(batch(tokenizer)) and "cmr_margin_min" not in fixed(batch(tokenizer))
    pair = build_model(tiny_config(cmr_commonality="pair"), num_classes=4, tokenizer=tokenizer)
    out = pair(batch(tokenizer))
    assert torch.isfinite(out["loss_cmr"])
    assert 0 <= float(out["cmr_margin_min"]) <= float(out["cmr_margin_mean"]) <= float(out["cmr_margin_max"]) <= 0.2 + 1e-6
    with pytest.raises(TBPSError, match="cmr_commonality"):
        PCCOptions(cmr_commonality="global")


def test_per_part_classifiers_classify_each_part_with_its_own_weights(tokenizer):
    g = torch.Generator().manual_seed(6)
    head = PartClassifier(3, 8, 5)
    with torch.no_grad():
        head.weight.copy_(torch.randn(3, 5, 8, generator=g))
        head.bias.copy_(torch.randn(3, 5, generator=g))
    x = torch.randn(4, 3, 8, generator=g)
    expected = torch.stack([x[:, k] @ head.weight[k].t() + head.bias[k] for k in range(3)], dim=1)
    assert torch.allclose(head(x), expected, atol=1e-6)
    model = build_model(tiny_config(part_classifier="per_part"), num_classes=4, tokenizer=tokenizer)
    assert isinstance(model.classifier_fine, PartClassifier) and isinstance(model.classifier_coarse, PartClassifier)
    assert isinstance(model.classifier_global, torch.nn.Linear)
    out = model(batch(tokenizer))
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert model.classifier_fine.weight.grad[1].abs().sum() > 0  # every part's classifier learns
    assert float(out["loss_id_fine"].detach()) == pytest.approx(math.log(4), abs=0.05)  # near-zero init: chance
    with pytest.raises(TBPSError, match="part_classifier"):
        PCCOptions(part_classifier="pcb")


def test_batchnorm_neck_spreads_embeddings(tokenizer):
    model = build_model(tiny_config(), num_classes=4, tokenizer=tokenizer).train()
    feats = model.image_features(batch(tokenizer)["images"])
    assert set(model.necks) == {f"{lvl}_{side}" for lvl in ("global", "coarse", "fine") for side in ("image", "text")}
    assert torch.allclose(feats["global"].mean(dim=0), torch.zeros(64), atol=1e-5)  # batch-normalised
    plain = build_model(tiny_config(embedding_norm="none"), num_classes=4, tokenizer=tokenizer)
    assert len(plain.necks) == 0
    with pytest.raises(TBPSError, match="embedding_norm"):
        PCCOptions(embedding_norm="ln")


def test_retrieval_hooks_work_on_any_rows(tokenizer):
    model = build_model(tiny_config(), num_classes=4, tokenizer=tokenizer).eval()
    data = batch(tokenizer)
    with torch.no_grad():
        images, texts = model.embed_images(data["images"]), model.embed_texts(data["token_ids"])
        assert images["global"].shape == (8, 64) and images["coarse"].shape == (8, 2, 64)
        assert texts["fine"].shape == (8, 2, 64)
        full = model.similarity(texts, images)
        rows, cols = torch.tensor([5, 1]), torch.tensor([7, 0, 3])
        part = model.similarity({k: v[rows] for k, v in texts.items()}, {k: v[cols] for k, v in images.items()})
        assert torch.allclose(part, full[rows][:, cols], atol=1e-6)
        # the fused score written out: (global cosine + mean coarse cosine + mean fine cosine) / 3
        t, i = 2, 6
        by_hand = (texts["global"][t] @ images["global"][i]
                   + (texts["coarse"][t] * images["coarse"][i]).sum(-1).mean()
                   + (texts["fine"][t] * images["fine"][i]).sum(-1).mean()) / 3
        assert float(full[t, i]) == pytest.approx(float(by_hand), abs=1e-5)


def test_inference_weights_select_branches(tokenizer):
    model = build_model(tiny_config(inference_weights={"global": 1.0, "fine": 0.0, "coarse": 0.0}),
                        num_classes=4, tokenizer=tokenizer).eval()
    data = batch(tokenizer)
    with torch.no_grad():
        images, texts = model.embed_images(data["images"]), model.embed_texts(data["token_ids"])
        assert set(images) == {"global"}
        assert torch.allclose(model.similarity(texts, images), texts["global"] @ images["global"].t())
    with pytest.raises(TBPSError, match="inference_weights.local"):
        PCCOptions(inference_weights={"local": 1.0})
    with pytest.raises(TBPSError, match="branch is off"):
        PCCOptions(coarse=False, inference_weights={"coarse": 1.0})
    with pytest.raises(TBPSError, match="at least one"):
        PCCOptions(inference_weights={"global": 0.0, "coarse": 0, "fine": 0}).resolved_inference_weights()
    # an override names only what changes: the other trained branches keep weight 1
    assert PCCOptions(inference_weights={"fine": 0}).resolved_inference_weights() == {
        "global": 1.0, "coarse": 1.0, "fine": 0.0}
    assert PCCOptions(fine=False).resolved_inference_weights() == {"global": 1.0, "coarse": 1.0, "fine": 0.0}
    with pytest.raises(TBPSError, match="image_backbone"):
        build_model(_with_backbone("tiny-rn"), num_classes=4, tokenizer=tokenizer)


def _with_backbone(name: str) -> Config:
    cfg = tiny_config()
    cfg.model.image_backbone = name
    return cfg


def test_training_steps_lower_the_loss(tokenizer):
    torch.manual_seed(0)
    model = build_model(tiny_config(), num_classes=4, tokenizer=tokenizer)
    data = batch(tokenizer)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        out = model(data)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_part_attention_and_figure(tokenizer, tmp_path):
    from tbps.models.pcc_attention import main, render_pair

    model = build_model(tiny_config(), num_classes=4, tokenizer=tokenizer).eval()
    data = batch(tokenizer)
    maps = model.part_attention(data["images"][:2], data["token_ids"][:2])
    assert maps["image"].shape == (2, 2, 4, 2)  # (B, K, h, w) over the 4x2 map
    assert torch.allclose(maps["image"].sum(dim=(2, 3)), torch.ones(2, 2), atol=1e-5)
    real = maps["mask"].unsqueeze(1).expand_as(maps["text"])
    assert torch.all(maps["text"][~real] == 0)  # padding is never attended to
    assert torch.allclose(maps["text"].sum(-1), torch.ones(2, 2), atol=1e-5)
    path = render_pair(model, tokenizer, data["images"][0], CAPTIONS[0], tmp_path / "att.png", title="test")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["--help"])


def test_clip_vit_variant_uses_the_patch_grid_as_the_feature_map():
    """The paper's second backbone: a CLIP ViT (its patch grid is the map the stripes cut) with
    CLIP's text tower; the global embedding is the max over the projected patch tokens."""
    from tiny_models import TOKENIZER, random_token_ids

    cfg = base_config("pcc", {"id": 1.0, "rank": 1.0, "cmr": 1.0}, {"num_parts": 2, "heads": 2},
                      image_backbone="tiny-vit", text="clip", embed_dim=128)
    model = build_model(cfg, num_classes=4, tokenizer=TOKENIZER)
    assert model.vit and model.grid == (4, 2) and model.stripes == [(0, 2), (2, 4)]
    g = torch.Generator().manual_seed(0)
    data = {"images": torch.randn(8, 3, 64, 32, generator=g), "token_ids": random_token_ids(8, g),
            "pids": torch.arange(8) // 2}
    out = model(data)
    sum(v for k, v in out.items() if k.startswith("loss_")).backward()
    assert model.image_encoder.backbone.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        feats = model.image_features(data["images"])
        patches = model.image_proj(model.image_encoder(data["images"])["tokens"][:, 1:])
        want = model.necks["global_image"](patches.amax(dim=1))
        torch.testing.assert_close(feats["global"], want)
        stripe0 = patches.view(8, 4, 2, 128)[:, 0:2].flatten(1, 2).amax(dim=1)
        torch.testing.assert_close(feats["fine"][:, 0], model.necks["fine_image"](stripe0))
    cfg.model.image_backbone = "resnet18"  # CLIP's text tower only beside a CLIP ViT
    with pytest.raises(TBPSError, match="text_backbone"):
        build_model(cfg, num_classes=4, tokenizer=TOKENIZER)
