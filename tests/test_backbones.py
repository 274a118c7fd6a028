"""Backbones: tiny CLIP towers (shapes, attention, pooling, position embeddings), every weight format
(OpenAI TorchScript / state dict, open_clip checkpoint, Hugging Face folder), one-line errors, BERT."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbps.config import ModelConfig
from tbps.errors import TBPSError
from tbps.models import backbones as B

SOT, EOT, MASK = 49406, 49407, 49408


def clip_tokenizer(context_length: int = 77) -> types.SimpleNamespace:
    return types.SimpleNamespace(vocab_size=49409, pad_id=0, mask_id=MASK, sot_id=SOT, eot_id=EOT,
                                 context_length=context_length)


def caption_ids(length: int = 77) -> torch.Tensor:
    """Two captions; the first contains the mask id, which is larger than EOT (argmax trap)."""
    ids = torch.zeros(2, length, dtype=torch.long)
    ids[0, :7] = torch.tensor([SOT, 320, 1125, MASK, 2862, 269, EOT])
    ids[1, :4] = torch.tensor([SOT, 1929, 530, EOT])
    return ids


def cfg(arch: str = "tiny-vit", **kw) -> ModelConfig:
    return ModelConfig(image_backbone=arch, **kw)


@pytest.fixture(scope="module")
def reference_clip():
    """A tiny open_clip CLIP whose weights survive an fp16 round trip (OpenAI files are fp16)."""
    import open_clip

    B.get_arch_config("tiny-vit")  # registers models/arch with open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-vit", pretrained=None)
    state = {k: (v.half().float() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    return state


# ----------------------------------------------------------------------------- image towers

def test_vit_tokens_global_attention():
    encoder = B.build_image_encoder(cfg(), [64, 32])
    images = torch.randn(2, 3, 64, 32)
    out = encoder(images, return_attention=True)
    assert encoder.grid_size == (4, 2) and encoder.output_dim == 128
    assert out["tokens"].shape == (2, 9, 128) and out["global"].shape == (2, 128)
    assert torch.equal(out["global"], out["tokens"][:, 0])
    assert out["attention"].shape == (2, 9, 9)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 9))
    # same global feature as open_clip's own forward of the tower
    torch.testing.assert_close(out["global"], encoder.backbone(images), atol=1e-5, rtol=1e-5)
    assert "attention" not in encoder(images)
    assert all(n.startswith("backbone.") for n, _ in encoder.named_parameters())


def test_resnet_tokens_global_attention():
    encoder = B.build_image_encoder(cfg("tiny-rn"), [64, 32]).eval()
    images = torch.randn(2, 3, 64, 32)
    out = encoder(images, return_attention=True)
    assert out["tokens"].shape == (2, 1 + 2 * 1, 128) and out["global"].shape == (2, 128)
    assert out["attention"].shape == (2, 3, 3)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 3))
    torch.testing.assert_close(out["global"], encoder.backbone(images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoder(images)["global"], out["global"], atol=1e-5, rtol=1e-5)

    assert ModelConfig().resnet_last_stride == 2  # the default keeps CLIP's down-sampling
    encoder = B.build_image_encoder(cfg("tiny-rn", resnet_last_stride=1), [64, 32]).eval()
    assert encoder.grid_size == (4, 2)
    assert encoder.backbone.attnpool.positional_embedding.shape[0] == 1 + 4 * 2
    assert encoder(images)["tokens"].shape == (2, 1 + 4 * 2, 128)
    with pytest.raises(TBPSError, match="model.resnet_last_stride"):
        B.build_image_encoder(cfg("tiny-rn", resnet_last_stride=3), [64, 32])


def test_image_size_must_fit_patches():
    with pytest.raises(TBPSError, match="multiple of the patch size 16"):
        B.build_image_encoder(cfg(), [60, 32])


def test_pos_embed_interpolation_matches_f_interpolate():
    channels = 5
    grid = torch.arange(16 * channels, dtype=torch.float32).reshape(16, channels)
    cls = torch.full((1, channels), -7.0)
    resized = B.interpolate_grid_pos_embed(torch.cat([cls, grid]), (4, 4), (6, 2))
    expected = F.interpolate(grid.reshape(1, 4, 4, channels).permute(0, 3, 1, 2), size=(6, 2),
                             mode="bilinear", align_corners=False)
    assert torch.equal(resized[0], cls[0])
    torch.testing.assert_close(resized[1:], expected.permute(0, 2, 3, 1).reshape(12, channels))


def test_loading_interpolates_vit_grid(tmp_path, reference_clip):
    path = tmp_path / "tiny.pt"
    torch.save(reference_clip, path)
    encoder = B.build_image_encoder(cfg(pretrained=str(path)), [64, 32])
    pos = reference_clip["visual.positional_embedding"]  # 64x64 -> a 4x4 grid
    assert torch.equal(encoder.backbone.positional_embedding[0], pos[0])
    torch.testing.assert_close(encoder.backbone.positional_embedding.data,
                               B.interpolate_grid_pos_embed(pos, (4, 4), (4, 2)))


# ----------------------------------------------------------------------------- CLIP text tower

def test_text_eot_pooling_ignores_mask_id():
    encoder = B.build_text_encoder(cfg(), clip_tokenizer())
    ids = caption_ids()
    out = encoder(ids, return_attention=True)
    assert out["tokens"].shape == (2, 77, 128) and out["global"].shape == (2, 128)
    assert ids[0].argmax() == 3  # what argmax pooling would wrongly pick
    torch.testing.assert_close(out["global"], out["tokens"][[0, 1], [6, 3]])
    assert out["mask"].sum(1).tolist() == [7, 4]
    assert out["attention"].shape == (2, 77, 77)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 77))
    assert torch.all(out["attention"][0].triu(1) == 0)  # causal
    emb = encoder.backbone.token_embedding.weight
    assert emb.shape[0] == 49409
    torch.testing.assert_close(emb[MASK], emb[:MASK].mean(0))

    mean = B.build_text_encoder(cfg(text_pooling="mean"), clip_tokenizer())
    mean.load_state_dict(encoder.state_dict())
    out_mean = mean(ids)
    torch.testing.assert_close(out_mean["global"][1], out_mean["tokens"][1, :4].mean(0))


@pytest.mark.parametrize("length", [16, 100])
def test_text_context_lengths(tmp_path, reference_clip, length):
    path = tmp_path / "tiny.pt"
    torch.save(reference_clip, path)
    encoder = B.build_text_encoder(cfg(pretrained=str(path)), clip_tokenizer(length))
    pos = encoder.backbone.positional_embedding
    assert pos.shape == (length, 128)
    if length < 77:
        assert torch.equal(pos.data, reference_clip["positional_embedding"][:length])
    out = encoder(caption_ids(length), return_attention=True)
    assert out["tokens"].shape == (2, length, 128) and out["attention"].shape == (2, length, length)
    assert torch.isfinite(out["global"]).all()


# ----------------------------------------------------------------------------- weight formats

class _StateHolder(nn.Module):
    """Holds a state dict under its dotted names so TorchScript can archive it like OpenAI's file."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in state.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, nn.Module())
                module = module._modules[part]
            module.register_buffer(leaf, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _openai_state(reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: (v.half() if v.ndim >= 2 and "embedding" not in k else v) for k, v in reference.items()}
    state.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
                 vocab_size=torch.tensor(49408))
    return state


def _save_formats(tmp_path, reference):
    from safetensors.torch import save_file

    paths = {}
    paths["openai-jit"] = tmp_path / "openai-jit.pt"
    torch.jit.script(_StateHolder(_openai_state(reference))).save(str(paths["openai-jit"]))
    paths["openai-state"] = tmp_path / "openai-state.pt"
    torch.save(_openai_state(reference), paths["openai-state"])
    paths["open_clip"] = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in reference.items()}},
               paths["open_clip"])
    paths["safetensors"] = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.items()}, str(paths["safetensors"]))
    hub = tmp_path / "hub-repo"  # a Hugging Face Hub open_clip repository, as downloaded
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in reference.items()}, str(hub / "open_clip_model.safetensors"))
    (hub / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"quick_gelu": True}}))
    paths["open_clip-hub"] = hub
    return paths


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.script: OpenAI's format is TorchScript
def test_every_file_format_loads_same_weights(tmp_path, reference_clip):
    paths = _save_formats(tmp_path, reference_clip)
    images, ids = torch.randn(2, 3, 64, 64), caption_ids()
    outputs = {}
    for name, path in paths.items():
        state, meta = B.read_clip_weights(path)
        assert meta["format"] == ("openai" if name.startswith("openai") else "open_clip"), name
        image_encoder, text_encoder = B.build_clip(cfg(pretrained=str(path)), [64, 64], clip_tokenizer())
        for key, value in image_encoder.backbone.state_dict().items():
            assert torch.equal(value, reference_clip[f"visual.{key}"]), (name, key)
        for key, value in text_encoder.backbone.state_dict().items():
            if key == "token_embedding.weight":
                assert torch.equal(value[:MASK], reference_clip[key]), name
            elif key != "attn_mask":
                assert torch.equal(value, reference_clip[key]), (name, key)
        assert bool(image_encoder.quick_gelu) == (name.startswith("openai") or name.endswith("hub"))
        if name == "open_clip":  # same activation: the tokens must be open_clip's
            import open_clip

            model = open_clip.create_model("tiny-vit", pretrained=None)
            model.load_state_dict(reference_clip)
            plain = ids.clone()
            plain[0, 3] = 1000  # open_clip's own vocabulary has no mask token
            torch.testing.assert_close(text_encoder(plain)["global"], model.encode_text(plain),
                                       atol=1e-5, rtol=1e-5)
        for encoder in (image_encoder, text_encoder):
            encoder.set_quick_gelu(True)  # compare all formats under one activation
        outputs[name] = (image_encoder(images)["global"], text_encoder(ids)["global"])
    first = outputs.pop("openai-jit")
    for name, (image_feat, text_feat) in outputs.items():
        assert torch.equal(image_feat, first[0]) and torch.equal(text_feat, first[1]), name


def test_quick_gelu_restored_from_tbps_state_dict(tmp_path, reference_clip):
    path = tmp_path / "openai.pt"
    torch.save(_openai_state(reference_clip), path)
    trained = B.build_image_encoder(cfg(pretrained=str(path)), [64, 32])
    fresh = B.build_image_encoder(cfg(), [64, 32])  # no weight file read: GELU by default
    assert bool(trained.quick_gelu) and not bool(fresh.quick_gelu)
    fresh.load_state_dict(trained.state_dict())
    images = torch.randn(1, 3, 64, 32)
    assert torch.equal(fresh(images)["global"], trained(images)["global"])


def _tiny_hf_clip():
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4,
                  hidden_act="quick_gelu")
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=EOT, bos_token_id=SOT,
                         pad_token_id=0, **common),
        vision_config=dict(image_size=64, patch_size=16, **common),
        projection_dim=128,
    )
    torch.manual_seed(1)
    return CLIPModel(config).eval()


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_huggingface_folder_matches_transformers(tmp_path):
    hf = _tiny_hf_clip()
    folder = tmp_path / "hf-clip"
    hf.save_pretrained(folder)
    image_encoder, text_encoder = B.build_clip(cfg(pretrained=str(folder)), [64, 64], clip_tokenizer())
    assert bool(image_encoder.quick_gelu) and bool(text_encoder.quick_gelu)
    images, ids = torch.randn(2, 3, 64, 64), caption_ids()
    ids[0, 3] = 1000  # transformers' CLIP vocabulary has no mask token
    with torch.no_grad():
        expected_image = _features(hf.get_image_features(pixel_values=images))
        expected_text = _features(hf.get_text_features(input_ids=ids))
        torch.testing.assert_close(image_encoder(images)["global"], expected_image, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(text_encoder(ids)["global"], expected_text, atol=1e-4, rtol=1e-4)
    # the same folder at 64x32: the 4x4 position grid is interpolated to 4x2
    assert B.build_image_encoder(cfg(pretrained=str(folder)), [64, 32]).num_tokens == 9


# ----------------------------------------------------------------------------- errors

def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file_is_one_line(tmp_path):
    missing = tmp_path / "ViT-B-16.pt"
    with pytest.raises(TBPSError) as exc:
        B.build_image_encoder(cfg(pretrained=str(missing)), [64, 32])
    assert _one_line(exc) == f"{missing}: file not found"


def test_wrong_architecture_names_key_and_shapes(tmp_path):
    import open_clip

    B.get_arch_config("tiny-rn")
    path = tmp_path / "rn.pt"
    torch.save(open_clip.create_model("tiny-rn", pretrained=None).state_dict(), path)
    with pytest.raises(TBPSError) as exc:
        B.build_image_encoder(cfg(pretrained=str(path)), [64, 32])
    message = _one_line(exc)
    assert "'tiny-vit'" in message and "conv1.weight" in message
    assert "[8, 3, 3, 3]" in message and "[128, 3, 16, 16]" in message


def test_tokenizer_of_another_vocabulary_is_refused():
    with pytest.raises(TBPSError, match="has 30522 ids but the CLIP text tower"):
        B.build_text_encoder(cfg(), bert_tokenizer())


def test_unknown_architecture_and_non_clip_folder(tmp_path):
    with pytest.raises(TBPSError, match="unknown CLIP architecture 'ViT-Z-99'"):
        B.build_image_encoder(cfg("ViT-Z-99"), [64, 32])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(TBPSError, match="not a Hugging Face CLIP model"):
        B.build_image_encoder(cfg(pretrained=str(tmp_path)), [64, 32])


# ----------------------------------------------------------------------------- BERT family

def bert_tokenizer(vocab_size: int = 30522, context_length: int = 16) -> types.SimpleNamespace:
    return types.SimpleNamespace(vocab_size=vocab_size, pad_id=0, mask_id=103, sot_id=101, eot_id=102,
                                 context_length=context_length)


def bert_ids() -> torch.Tensor:
    ids = torch.zeros(2, 16, dtype=torch.long)
    ids[0, :6] = torch.tensor([101, 1037, 2158, 103, 2304, 102])
    ids[1, :4] = torch.tensor([101, 2611, 3756, 102])
    return ids


def test_shipped_minilm_loads():
    encoder = B.build_text_encoder(cfg(text_backbone="hf", text_pretrained="minilm", embed_dim=64),
                                   bert_tokenizer())
    assert encoder.hidden_size == 384 and encoder.output_dim == 64
    assert encoder.new_parameter_prefixes == ("proj.",)
    names = [n for n, _ in encoder.named_parameters()]
    assert all(n.startswith(("backbone.", "proj.")) for n in names) and "proj.weight" in names
    out = encoder(bert_ids(), return_attention=True)
    assert out["global"].shape == (2, 64) and out["tokens"].shape == (2, 16, 64)
    torch.testing.assert_close(out["global"], out["tokens"][:, 0])
    assert out["attention"].shape == (2, 16, 16)
    torch.testing.assert_close(out["attention"].sum(-1), torch.ones(2, 16))
    assert out["attention"][1, :, 4:].abs().max() == 0  # padding is never attended
    torch.testing.assert_close(encoder(bert_ids())["tokens"], out["tokens"], atol=1e-5, rtol=1e-5)


def test_tiny_bert_folder_loads_and_resizes_vocab(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    model_cfg = cfg(text_backbone="hf", text_pretrained=str(folder), embed_dim=48, text_pooling="mean")
    encoder = B.build_text_encoder(model_cfg, bert_tokenizer(vocab_size=30523))
    weight = encoder.backbone.get_input_embeddings().weight
    assert weight.shape[0] == 30523
    torch.testing.assert_close(weight[-1], weight[:-1].mean(0))
    out = encoder(bert_ids())
    assert out["global"].shape == (2, 48)
    torch.testing.assert_close(out["global"][1], out["tokens"][1, :4].mean(0))
    with pytest.raises(TBPSError, match="file not found"):
        B.build_text_encoder(dataclasses.replace(model_cfg, text_pretrained=str(tmp_path / "nope")),
                             bert_tokenizer())


def test_frozen_layer_cache_matches_full_forward_and_trains_the_top():
    model_cfg = cfg(text_backbone="hf", text_pretrained="minilm", embed_dim=32, text_frozen_layers=4)
    torch.manual_seed(0)
    plain = B.build_text_encoder(model_cfg, bert_tokenizer())
    cached = B.build_text_encoder(dataclasses.replace(model_cfg, text_frozen_cache=True), bert_tokenizer())
    cached.load_state_dict(plain.state_dict())  # loading clears (here: empty) cache
    plain.eval(), cached.eval()
    ids = bert_ids()
    with torch.no_grad():
        want, got = plain(ids), cached(ids)
        again = cached(ids)  # second pass: from the cache
    assert len(cached._cache) == 2
    mask = want["mask"]
    torch.testing.assert_close(got["tokens"][mask], want["tokens"][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["global"], want["global"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again["global"], got["global"])
    assert got["tokens"].shape == want["tokens"].shape and torch.equal(got["mask"], mask)

    cached.train()  # the cached part never drops out; the layers above it do train
    assert not cached.backbone.embeddings.training
    assert [layer.training for layer in cached.backbone.encoder.layer] == [False] * 4 + [True] * 2
    cached(ids)["global"].sum().backward()
    assert cached.backbone.encoder.layer[5].output.dense.weight.grad.abs().sum() > 0
    assert cached.backbone.encoder.layer[3].output.dense.weight.grad is None

    cached.load_state_dict(plain.state_dict())
    assert cached._cache == {}  # new weights: nothing stale is reused
    with pytest.raises(TBPSError, match="text_frozen_layers"):
        B.build_text_encoder(cfg(text_backbone="hf", text_pretrained="minilm", text_frozen_cache=True),
                             bert_tokenizer())


def test_frozen_layer_cache_does_not_depend_on_the_batch_a_caption_first_came_in():
    """A resumed run starts with an empty cache: it must compute exactly what the uninterrupted run
    cached earlier, whatever captions shared that batch (issue 19: exact resume with the cache)."""
    model_cfg = cfg(text_backbone="hf", text_pretrained="minilm", embed_dim=32, text_frozen_layers=4,
                    text_frozen_cache=True)
    torch.manual_seed(0)
    encoder = B.build_text_encoder(model_cfg, bert_tokenizer()).eval()
    generator = torch.Generator().manual_seed(1)
    others = torch.zeros(63, 16, dtype=torch.long)
    for row in range(63):
        n = 3 + row % 14
        others[row, 0], others[row, n - 1] = 101, 102
        others[row, 1:n - 1] = torch.randint(1000, 20000, (n - 2,), generator=generator)
    target = bert_ids()[1:]
    with torch.no_grad():
        encoder(target)
        (key, alone), = encoder._cache.items()
        encoder.clear_frozen_cache()
        encoder(torch.cat([others, target]))
    assert torch.equal(encoder._cache[key], alone)


def test_cached_encoder_returns_the_last_layers_attention_as_the_full_forward_does():
    """CFFA ranks words by the last layer's attention: the cached path (frozen layers apart, padding
    cut) must give the full forward's maps, zero in the cut columns."""
    model_cfg = cfg(text_backbone="hf", text_pretrained="minilm", embed_dim=32, text_frozen_layers=4)
    torch.manual_seed(0)
    plain = B.build_text_encoder(model_cfg, bert_tokenizer()).eval()
    cached = B.build_text_encoder(dataclasses.replace(model_cfg, text_frozen_cache=True), bert_tokenizer()).eval()
    cached.load_state_dict(plain.state_dict())
    ids = bert_ids()
    with torch.no_grad():
        want, got = plain(ids, return_attention=True), cached(ids, return_attention=True)
    mask = want["mask"]
    assert got["attention"].shape == want["attention"].shape == (2, 16, 16)
    # every caption position's row, over all keys (padding keys get ~0 in both)
    torch.testing.assert_close(got["attention"][mask], want["attention"][mask], atol=1e-5, rtol=1e-5)
    longest = int(mask.sum(dim=1).max())
    assert got["attention"][:, longest:].abs().sum() == 0 and got["attention"][:, :, longest:].abs().sum() == 0
    torch.testing.assert_close(got["global"], want["global"], atol=1e-5, rtol=1e-5)
    assert cached.backbone.config._attn_implementation == plain.backbone.config._attn_implementation  # restored


def test_one_off_captions_neither_read_nor_fill_the_cache():
    """Masked or augmented captions are never seen twice: encoding them stores nothing, and what they
    give is the batch's own one-pass computation (so a resumed run, its cache empty, repeats it)."""
    model_cfg = cfg(text_backbone="hf", text_pretrained="minilm", embed_dim=32, text_frozen_layers=4,
                    text_frozen_cache=True)
    torch.manual_seed(0)
    encoder = B.build_text_encoder(model_cfg, bert_tokenizer()).eval()
    ids = bert_ids()
    with torch.no_grad():
        with B.one_off_captions(encoder):
            one_off = encoder(ids)
        assert encoder._cache == {} and not encoder.transient
        stored = encoder(ids)
        assert len(encoder._cache) == 2
        for key in encoder._cache:  # a poisoned cache is not read inside
            encoder._cache[key] = encoder._cache[key] + 100.0
        with B.one_off_captions(encoder):
            again = encoder(ids)
        with B.one_off_captions(encoder, enable=False):
            from_cache = encoder(ids)
    torch.testing.assert_close(one_off["global"], stored["global"], atol=1e-5, rtol=1e-5)
    assert torch.equal(again["global"], one_off["global"])
    assert not torch.allclose(from_cache["global"], stored["global"])
    plain_cfg = cfg(text_backbone="hf", text_pretrained="minilm", embed_dim=32)  # no cache: nothing to skip
    plain = B.build_text_encoder(plain_cfg, bert_tokenizer()).eval()
    with torch.no_grad(), B.one_off_captions(plain):
        assert plain(ids)["global"].shape == (2, 32)


def test_inference_models_keep_no_text_cache(tmp_path):
    """1,000 distinct queries to a model loaded for serving leave no per-query state behind."""
    from tbps.data.tokenizers import build_tokenizer
    from tbps.engine.checkpoint import load_model_from_checkpoint, save_checkpoint
    from tbps.models import build_model
    from tiny_models import tiny_config

    config = tiny_config("irra", {"sdm": 1.0}, {"cross_width": 32, "cross_layers": 1, "cross_heads": 2},
                         text="minilm", text_frozen_cache=True, embed_dim=128)
    tokenizer = build_tokenizer(config.data.tokenizer, config.data.text_length)
    save_checkpoint(tmp_path / "best.pt", model=build_model(config, 4, tokenizer), cfg=config, num_classes=4)
    model, _, tokenizer = load_model_from_checkpoint(tmp_path / "best.pt", "cpu")
    queries = [f"a person number {i} in a coat" for i in range(1000)]
    with torch.no_grad():
        for start in range(0, len(queries), 250):
            model.embed_texts(tokenizer(queries[start:start + 250]))
    cached = sum(len(getattr(m, "_cache", {})) for m in model.modules() if hasattr(m, "clear_frozen_cache"))
    assert cached == 0


# ----------------------------------------------------------------------------- model.quick_gelu / model.pos_interpolation

def test_quick_gelu_key_overrides_what_the_file_says(tmp_path, reference_clip):
    """``model.quick_gelu``: auto follows the file (OpenAI: QuickGELU), on/off force the activation."""
    from tbps.config import load_config

    path = tmp_path / "openai.pt"
    torch.save(_openai_state(reference_clip), path)
    images = torch.randn(2, 3, 64, 32)
    encoders = {value: B.build_image_encoder(cfg(pretrained=str(path), quick_gelu=value), [64, 32])
                for value in ("auto", "on", "off")}
    assert bool(encoders["auto"].quick_gelu) and bool(encoders["on"].quick_gelu)
    assert not bool(encoders["off"].quick_gelu)
    with torch.no_grad():
        auto, on, off = (encoders[v](images)["global"] for v in ("auto", "on", "off"))
    assert torch.equal(auto, on) and not torch.allclose(on, off)
    assert bool(B.build_image_encoder(cfg(quick_gelu="on"), [64, 32]).quick_gelu)  # no file: forced on
    text = B.build_text_encoder(cfg(pretrained=str(path), quick_gelu="off"), clip_tokenizer())
    assert not bool(text.quick_gelu)
    assert load_config(None, ["model.quick_gelu=true"]).model.quick_gelu == "on"
    assert load_config(None, ["model.quick_gelu=false"]).model.quick_gelu == "off"
    with pytest.raises(TBPSError, match="config key model.quick_gelu: 'fast' is not one of auto, on, off"):
        load_config(None, ["model.quick_gelu=fast"])


def test_pos_interpolation_key_sets_how_the_grid_is_resized(tmp_path, reference_clip):
    """The file's 4x4 grid (64x64 input) resized to 4x2 (64x32) with the mode ``model.pos_interpolation``
    names: the tower holds exactly ``interpolate_grid_pos_embed`` of the file's table in that mode."""
    from tbps.config import load_config

    path = tmp_path / "openai.pt"
    torch.save(_openai_state(reference_clip), path)
    stored = reference_clip["visual.positional_embedding"]
    tables = {}
    for mode in ("bilinear", "bicubic", "nearest"):
        encoder = B.build_image_encoder(cfg(pretrained=str(path), pos_interpolation=mode), [64, 32])
        tables[mode] = encoder.backbone.positional_embedding.detach()
        torch.testing.assert_close(tables[mode], B.interpolate_grid_pos_embed(stored, (4, 4), (4, 2), 1, mode))
    assert not torch.equal(tables["bilinear"], tables["nearest"])
    assert not torch.equal(tables["bilinear"], tables["bicubic"])
    assert torch.equal(tables["nearest"][1:].view(4, 2, -1), stored[1:].view(4, 4, -1)[:, ::2])
    with pytest.raises(TBPSError, match="model.pos_interpolation: 'area' is not one of bilinear, bicubic, nearest"):
        load_config(None, ["model.pos_interpolation=area"])
