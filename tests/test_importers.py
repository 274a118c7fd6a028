"""Importing published checkpoints (IRRA, TextReID, CLIP) and the safe loader they go through.

The reference files are built here from the layout of the authors' code (anosorae/IRRA
``model/build.py`` + ``model/clip_model.py`` + ``utils/checkpoint.py``; BrandonHanx/TextReID
``lib/models``): module names, nesting, fp16 conversion, and the optimiser, scheduler and
argument entries their checkpointers save next to ``model``.
"""

from __future__ import annotations

import argparse
import copy
from collections import OrderedDict
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from tbps.data.tokenizers import build_tokenizer
from tbps.engine.checkpoint import load_model_from_checkpoint, read_checkpoint
from tbps.errors import TBPSError
from tbps.importers import export_irra, export_textreid, import_checkpoint
from tbps.models.backbones import get_arch_config
from tbps.safe_load import load_torch_file
from tiny_models import RunsCode

CAPTIONS = ["a woman in a red coat carrying a black bag", "a man with a grey hoodie and jeans"]


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------- IRRA's layout

class _IRRABlock(nn.Module):
    """IRRA's ResidualAttentionBlock names: attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, width // 64)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)


class _IRRATransformer(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[_IRRABlock(width) for _ in range(layers)])


class IRRALike(nn.Module):
    """IRRA(args) with sdm+id+mlm: base_model (CLIP), classifier, cross_attn, cross_modal_transformer,
    ln_pre_t, ln_pre_i, ln_post, mlm_head(dense, gelu, ln, fc)."""

    def __init__(self, image_size: tuple[int, int], num_classes: int, cmt_depth: int = 1) -> None:
        super().__init__()
        arch = copy.deepcopy(get_arch_config("tiny-vit"))
        arch["vision_cfg"]["image_size"] = list(image_size)
        self.base_model = open_clip.model.CLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"],
                                               quick_gelu=True)
        dim = arch["embed_dim"]
        self.classifier = nn.Linear(dim, num_classes)
        self.cross_attn = nn.MultiheadAttention(dim, dim // 64, batch_first=True)
        self.cross_modal_transformer = _IRRATransformer(dim, cmt_depth)
        self.ln_pre_t, self.ln_pre_i, self.ln_post = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlm_head = nn.Sequential(OrderedDict([("dense", nn.Linear(dim, dim)), ("gelu", _QuickGELU()),
                                                   ("ln", nn.LayerNorm(dim)), ("fc", nn.Linear(dim, 49408))]))
        for p in self.parameters():  # LayerNorms away from 1/0 so a mix-up shows
            nn.init.normal_(p, std=0.05) if p.ndim == 1 else None


def _to_fp16_as_irra(model: nn.Module) -> None:
    """IRRA's convert_weights: conv/linear/attention weights and the projections in fp16; LayerNorms,
    embeddings (token, class, position) stay fp32."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.weight.data = module.weight.data.half()
            if module.bias is not None:
                module.bias.data = module.bias.data.half()
        if isinstance(module, nn.MultiheadAttention):
            module.in_proj_weight.data = module.in_proj_weight.data.half()
            module.in_proj_bias.data = module.in_proj_bias.data.half()
        for name in ("text_projection", "proj"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter):
                param.data = param.data.half()


def _adam_state(model: nn.Module) -> dict:
    params = [p for p in model.parameters() if p.dtype == torch.float32][:3]
    optimizer = torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.999))
    sum(p.float().sum() for p in params).backward()
    optimizer.step()
    return optimizer.state_dict()


def save_irra_checkpoint(folder: Path, image_size=(96, 32), num_classes: int = 5, seed: int = 0,
                         with_config: bool = True) -> tuple[Path, Path | None, IRRALike]:
    """``best.pth`` as IRRA's Checkpointer writes it, plus ``configs.yaml`` as save_train_configs does."""
    torch.manual_seed(seed)
    model = IRRALike(image_size, num_classes)
    _to_fp16_as_irra(model)
    state = model.state_dict()
    state.pop("base_model.logit_scale")  # IRRA's CLIP has no logit_scale (commented out)
    scheduler = {"milestones": (20, 50), "gamma": 0.1, "warmup_factor": 0.1, "warmup_epochs": 5,
                 "warmup_method": "linear", "total_epochs": 60, "target_lr": 0, "power": 0.9, "mode": "cosine",
                 "base_lrs": [1e-5, 5e-5], "last_epoch": 37, "_step_count": 38, "verbose": False,
                 "_get_lr_called_within_step": False, "_last_lr": [4e-6, 2e-5]}
    arguments = {"num_epoch": 60, "iteration": 0, "epoch": 37}  # do_train's `arguments`, saved as **kwargs
    path = folder / "best.pth"
    torch.save({"model": state, "optimizer": _adam_state(model), "scheduler": scheduler, **arguments}, path)
    config = None
    if with_config:
        args = argparse.Namespace(
            name="iira", output_dir="logs/CUHK-PEDES/iira", log_period=100, eval_period=1, val_dataset="test",
            resume=False, resume_ckpt_file="", pretrain_choice="tiny-vit", temperature=0.02, img_aug=True,
            cmt_depth=1, masked_token_rate=0.8, masked_token_unchanged_rate=0.1, lr_factor=5.0, MLM=True,
            loss_names="sdm+mlm+id", mlm_loss_weight=1.0, id_loss_weight=1.0, img_size=tuple(image_size),
            stride_size=16, text_length=77, vocab_size=49408, optimizer="Adam", lr=1e-5, bias_lr_factor=2.0,
            momentum=0.9, weight_decay=4e-5, weight_decay_bias=0.0, alpha=0.9, beta=0.999, num_epoch=60,
            milestones=(20, 50), gamma=0.1, warmup_factor=0.1, warmup_epochs=5, warmup_method="linear",
            lrscheduler="cosine", target_lr=0, power=0.9, dataset_name="CUHK-PEDES", sampler="random",
            num_instance=4, root_dir="/data", batch_size=64, test_batch_size=512, num_workers=8, training=True,
            local_rank=0, distributed=False)
        config = folder / "configs.yaml"
        config.write_text(yaml.dump(vars(args), default_flow_style=False))
        assert "!!python/tuple" in config.read_text()  # what IRRA's configs.yaml really holds
    return path, config, model


def _clip_reference(model: nn.Module, images: torch.Tensor, token_ids: torch.Tensor):
    """CLIP's own encode_image / encode_text (CLS / EOT-at-argmax), normalised, in fp32."""
    clip = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        return (F.normalize(clip.encode_image(images), dim=-1), F.normalize(clip.encode_text(token_ids), dim=-1))


def _tbps_embeddings(checkpoint: Path, images: torch.Tensor, captions=CAPTIONS):
    model, cfg, tokenizer = load_model_from_checkpoint(checkpoint)
    with torch.no_grad():
        return model.embed_images(images)["global"], model.embed_texts(tokenizer(captions))["global"], cfg


def test_irra_checkpoint_imports_and_embeds_as_irra(tmp_path):
    path, config, reference = save_irra_checkpoint(tmp_path)
    out = tmp_path / "irra_tbps.pt"
    summary = import_checkpoint("irra", path, out, config=config)
    assert summary["arch"] == "tiny-vit" and summary["image_size"] == [96, 32] and summary["num_classes"] == 5
    assert summary["dropped"] == []
    images = torch.randn(3, 3, 96, 32)
    image_feats, text_feats, cfg = _tbps_embeddings(out, images)
    assert cfg.model.name == "irra" and cfg.data.dataset == "cuhk-pedes" and cfg.data.root == "/data/CUHK-PEDES"
    assert cfg.loss == {"sdm": 1.0, "irr": 1.0, "id": 1.0} and cfg.method["cross_layers"] == 1
    tokens = build_tokenizer("clip", 77)(CAPTIONS)
    want_images, want_texts = _clip_reference(reference.base_model, images, tokens)
    torch.testing.assert_close(image_feats, want_images, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(text_feats, want_texts, atol=2e-5, rtol=1e-4)


def test_irra_heads_land_in_the_tbps_modules(tmp_path):
    path, config, reference = save_irra_checkpoint(tmp_path)
    out = tmp_path / "irra_tbps.pt"
    import_checkpoint("irra", path, out, config=config)
    model, _, _ = load_model_from_checkpoint(out)
    torch.testing.assert_close(model.mlm_head.fc.weight, reference.mlm_head.fc.weight.float())
    torch.testing.assert_close(model.classifier.bias, reference.classifier.bias.float())
    block = model.cross_modal.blocks[0]
    reference_block = reference.cross_modal_transformer.resblocks[0]
    torch.testing.assert_close(block.linear1.weight, reference_block.mlp.c_fc.weight.float())
    torch.testing.assert_close(block.norm2.bias, reference.cross_modal_transformer.resblocks[0].ln_2.bias.float())
    torch.testing.assert_close(model.cross_modal.ln_memory.weight, reference.ln_pre_i.weight.float())
    # the IRR branch runs on the imported heads: same cross-attention output as IRRA's cross_former
    text = torch.randn(2, 5, 128)
    image = torch.randn(2, 13, 128)
    with torch.no_grad():
        got = model.cross_modal(text, image)
        ref = copy.deepcopy(reference).float()
        x = ref.cross_attn(ref.ln_pre_t(text), ref.ln_pre_i(image), ref.ln_pre_i(image), need_weights=False)[0]
        for blk in ref.cross_modal_transformer.resblocks:
            h = blk.ln_1(x).transpose(0, 1)
            x = x + blk.attn(h, h, h, need_weights=False)[0].transpose(0, 1)
            x = x + blk.mlp(blk.ln_2(x))
        want = ref.ln_post(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_irra_without_config_reads_the_architecture_from_the_shapes(tmp_path):
    path, _, _ = save_irra_checkpoint(tmp_path, with_config=False)
    summary = import_checkpoint("irra", path, tmp_path / "m.pt")
    assert (summary["arch"], summary["image_size"], summary["text_length"]) == ("tiny-vit", [96, 32], 77)


def test_irra_round_trip_is_exact(tmp_path):
    path, config, _ = save_irra_checkpoint(tmp_path)
    first = tmp_path / "first.pt"
    import_checkpoint("irra", path, first, config=config)
    state = read_checkpoint(first)["model"]
    again = tmp_path / "again"
    again.mkdir()
    torch.save({"model": export_irra(state), "num_epoch": 1}, again / "best.pth")
    import_checkpoint("irra", again / "best.pth", tmp_path / "second.pt", config=config)
    second = read_checkpoint(tmp_path / "second.pt")["model"]
    assert second.keys() == state.keys()
    assert all(torch.equal(second[k], state[k]) for k in state)


def test_irra_family_extra_heads_are_dropped_and_named(tmp_path, caplog):
    path, config, _ = save_irra_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["local_proj.weight"] = torch.randn(4, 4)  # e.g. a CFFA head tbps's irra has no place for
    torch.save(ckpt, path)
    with caplog.at_level("WARNING"):
        summary = import_checkpoint("irra", path, tmp_path / "m.pt", config=config)
    assert summary["dropped"] == ["local_proj.weight"]
    assert "local_proj." in caplog.text


def test_irra_key_that_does_not_fit_is_one_line_naming_it(tmp_path):
    path, config, _ = save_irra_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["model"]["base_model.ln_final.weight"]
    ckpt["model"]["base_model.visual.extra_token"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(TBPSError) as info:
        import_checkpoint("irra", path, tmp_path / "m.pt", config=config)
    message = str(info.value)
    assert "\n" not in message and "best.pth" in message
    assert "base_model.visual.extra_token" in message
    del ckpt["model"]["base_model.visual.extra_token"]
    torch.save(ckpt, path)
    with pytest.raises(TBPSError, match=r"missing \(base_model\.ln_final\.weight\)"):
        import_checkpoint("irra", path, tmp_path / "m.pt", config=config)


def test_overlapping_patch_stride_is_refused(tmp_path):
    path, config, _ = save_irra_checkpoint(tmp_path)
    config.write_text(config.read_text().replace("stride_size: 16", "stride_size: 12"))
    with pytest.raises(TBPSError, match="stride_size 12"):
        import_checkpoint("irra", path, tmp_path / "m.pt", config=config)


@pytest.mark.parametrize("source", ["irra", "textreid"])
def test_foreign_file_is_one_line(tmp_path, source):
    foreign = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}}, foreign)
    with pytest.raises(TBPSError) as info:
        import_checkpoint(source, foreign, tmp_path / "m.pt", vocab=tmp_path / "v.npy")
    assert "\n" not in str(info.value) and "missing" in str(info.value) and "conv1.weight" in str(info.value)
    not_torch = tmp_path / "notes.pth"
    not_torch.write_text("not a checkpoint")
    with pytest.raises(TBPSError) as info:
        import_checkpoint(source, not_torch, tmp_path / "m.pt")
    assert "\n" not in str(info.value) and "notes.pth" in str(info.value)



@pytest.mark.parametrize("source", ["irra", "textreid", "clip"])
def test_file_whose_unpickling_would_run_code_is_refused_and_nothing_runs(tmp_path, source):
    path, _, _ = save_irra_checkpoint(tmp_path, with_config=False)
    ckpt = torch.load(path, weights_only=True)
    marker = tmp_path / "code_ran"
    ckpt["arguments"] = RunsCode(marker)
    torch.save(ckpt, path)
    with pytest.raises(TBPSError) as info:
        import_checkpoint(source, path, tmp_path / "m.pt", vocab=tmp_path / "v.npy")
    message = str(info.value)
    assert not marker.exists(), "unpickling ran code from the file"
    # builtins.open pickles as io.open
    assert "\n" not in message and "io.open" in message and "could run code" in message
    assert "tbps will not load it" in message and "weights_only" not in message
    assert not (tmp_path / "m.pt").exists()


def test_safe_loader_is_the_one_every_reader_uses(tmp_path):
    """A tbps checkpoint and a weights file with the same payload are refused the same way."""
    marker = tmp_path / "code_ran"
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "config": {}, "num_classes": 1, "x": RunsCode(marker)}, bad)
    torch.save({"x": RunsCode(marker)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    from tbps.models.backbones import read_clip_weights

    for reader in (read_checkpoint, read_clip_weights, load_torch_file):
        for file in (bad, tmp_path / "legacy.pt"):
            with pytest.raises(TBPSError, match="could run code"):
                reader(file)
    assert not marker.exists()
    ok = tmp_path / "ok.pt"
    torch.save({"args": argparse.Namespace(lr=1e-5, img_size=(384, 128)), "best": np.float64(73.38),
                "w": torch.ones(2)}, ok)
    loaded = load_torch_file(ok)
    assert loaded["args"].img_size == (384, 128) and float(loaded["best"]) == 73.38


def test_their_yaml_with_other_python_tags_is_refused(tmp_path):
    path, config, _ = save_irra_checkpoint(tmp_path)
    config.write_text(config.read_text() + "evil: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(TBPSError, match="refused"):
        import_checkpoint("irra", path, tmp_path / "m.pt", config=config)


def test_tbps_checkpoint_given_to_import_is_named(tmp_path):
    path, config, _ = save_irra_checkpoint(tmp_path)
    import_checkpoint("irra", path, tmp_path / "m.pt", config=config)
    with pytest.raises(TBPSError, match="already a tbps checkpoint"):
        import_checkpoint("irra", tmp_path / "m.pt", tmp_path / "n.pt")


# ----------------------------------------------------------------------------- TextReID's layout

class _GRUText(nn.Module):
    """TextReID's GRU backbone with a word table (ONEHOT clip_vit, VOCABULARY_SIZE == EMBEDDING_SIZE):
    ``embed`` is None and the table is a plain tensor attribute, so only ``gru`` is saved."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.embed = None
        self.gru = nn.GRU(width, hidden, num_layers=1, bidirectional=True, bias=False, batch_first=True)


class _Loss(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.projection = nn.Parameter(torch.randn(dim, num_classes))


class _MoCoHead(nn.Module):
    def __init__(self, visual, textual, dim: int, queue: int, num_classes: int, image_dim: int) -> None:
        super().__init__()
        self.v_encoder_q, self.t_encoder_q = visual, textual  # the same modules, saved twice
        self.v_encoder_k, self.t_encoder_k = copy.deepcopy(visual), copy.deepcopy(textual)
        self.v_embed_layer = nn.Linear(image_dim, dim)
        self.t_embed_layer = nn.Linear(2 * textual.gru.hidden_size, dim)
        self.register_buffer("t_queue", F.normalize(torch.rand(dim, queue), dim=0))
        self.register_buffer("v_queue", F.normalize(torch.rand(dim, queue), dim=0))
        ids = torch.full((1, queue), -1, dtype=torch.long)
        ids[0, :3] = torch.tensor([4, 1, 2])
        self.register_buffer("id_queue", ids)
        self.register_buffer("queue_ptr", torch.tensor([3]))
        self.loss_evaluator = _Loss(dim, num_classes)


class TextReIDLike(nn.Module):
    def __init__(self, image_size=(96, 32), dim=16, hidden=24, width=32, queue=8, num_classes=6) -> None:
        super().__init__()
        from open_clip.modified_resnet import Bottleneck, ModifiedResNet

        arch = get_arch_config("tiny-rn")
        vision = arch["vision_cfg"]
        heads = vision["width"] * 32 // vision["head_width"]
        visual = ModifiedResNet(vision["layers"], arch["embed_dim"], heads, image_size=64, width=vision["width"])
        planes = vision["width"] * 8
        visual.layer4[0] = Bottleneck(planes * 2, planes, stride=1)  # RES5_STRIDE 1 (TextReID)
        grid = (image_size[0] // 16) * (image_size[1] // 16)
        visual.attnpool.positional_embedding = nn.Parameter(torch.randn(grid + 1, planes * 4) * 0.1)
        for module in visual.modules():  # non-trivial BatchNorm statistics
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
        self.visual_model = visual
        self.textual_model = _GRUText(width, hidden)
        self.embed_model = _MoCoHead(visual, self.textual_model, dim, queue, num_classes, arch["embed_dim"])


def save_textreid_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, Path, TextReIDLike]:
    torch.manual_seed(seed)
    model = TextReIDLike()
    path = folder / "best.pth"
    arguments = {"max_epoch": 80, "epoch": 52, "iteration": 1234, "distributed": False}
    scheduler = {"milestones": (40, 70), "gamma": 0.1, "warmup_factor": 0.1, "warmup_epochs": 5,
                 "warmup_method": "linear", "base_lrs": [1e-4], "last_epoch": 52, "_step_count": 53}
    torch.save({"model": model.state_dict(), "optimizer": _adam_state(model), "scheduler": scheduler, **arguments},
               path)
    vocab = folder / "clip_vocab_vit.npy"
    np.save(vocab, np.random.default_rng(seed).normal(0, 0.02, (49408, 32)).astype(np.float32))
    return path, vocab, model


def test_textreid_checkpoint_imports_and_embeds_as_the_tbps_model_of_the_same_weights(tmp_path):
    from tbps.config import config_from_dict
    from tbps.models import build_model

    path, vocab, reference = save_textreid_checkpoint(tmp_path)
    out = tmp_path / "textreid_tbps.pt"
    summary = import_checkpoint("textreid", path, out, vocab=vocab)
    assert (summary["method"], summary["arch"], summary["image_size"], summary["num_classes"]) == \
        ("textreid", "tiny-rn", [96, 32], 6)
    images = torch.randn(2, 3, 96, 32)
    image_feats, text_feats, cfg = _tbps_embeddings(out, images)
    assert cfg.model.resnet_last_stride == 1 and cfg.method["queue_size"] == 8 and cfg.model.embed_dim == 16

    # the same weights put into a tbps TextReID module by module
    direct = build_model(config_from_dict(cfg.to_dict()), 6, build_tokenizer("clip", 77), load_pretrained=False)
    direct.image_encoder.backbone.load_state_dict(reference.visual_model.state_dict())
    direct.text_encoder.gru.load_state_dict(reference.textual_model.gru.state_dict())
    direct.image_proj.load_state_dict(reference.embed_model.v_embed_layer.state_dict())
    direct.text_proj.load_state_dict(reference.embed_model.t_embed_layer.state_dict())
    direct.word_embedding.weight.data.copy_(torch.from_numpy(np.load(vocab)))
    direct.eval()
    with torch.no_grad():
        torch.testing.assert_close(image_feats, direct.embed_images(images)["global"])
        tokens = build_tokenizer("clip", 77)(CAPTIONS)
        torch.testing.assert_close(text_feats, direct.embed_texts(tokens)["global"])
        # the image path against open_clip's ModifiedResNet forward (TextReID's visual_model)
        want = F.normalize(reference.embed_model.v_embed_layer(reference.eval().visual_model(images)), dim=-1)
    torch.testing.assert_close(image_feats, want, atol=1e-5, rtol=1e-4)
    model, _, _ = load_model_from_checkpoint(out)
    torch.testing.assert_close(model.text_queue, reference.embed_model.t_queue.t())
    assert model.queue_pids[:3].tolist() == [4, 1, 2] and int(model.queue_ptr) == 3
    torch.testing.assert_close(model.id_projection, reference.embed_model.loss_evaluator.projection)


def test_textreid_round_trip_is_exact(tmp_path):
    path, vocab, _ = save_textreid_checkpoint(tmp_path)
    import_checkpoint("textreid", path, tmp_path / "first.pt", vocab=vocab)
    state = read_checkpoint(tmp_path / "first.pt")["model"]
    again = tmp_path / "again"
    again.mkdir()
    torch.save({"model": export_textreid(state)}, again / "best.pth")
    import_checkpoint("textreid", again / "best.pth", tmp_path / "second.pt", vocab=vocab)
    second = read_checkpoint(tmp_path / "second.pt")["model"]
    assert second.keys() == state.keys() and all(torch.equal(second[k], state[k]) for k in state)


def test_textreid_config_gives_the_image_size_and_needs_the_word_table(tmp_path):
    path, vocab, _ = save_textreid_checkpoint(tmp_path)
    their = tmp_path / "moco_gru_cliprn50_ls_bs128_2048.yaml"
    their.write_text("MODEL:\n  GRU:\n    ONEHOT: clip_vit\n  RESNET:\n    RES5_STRIDE: 1\n  EMBEDDING:\n"
                     "    EMBED_HEAD: moco\n    FEATURE_SIZE: 16\n    EPSILON: 0.2\nINPUT:\n  HEIGHT: 96\n"
                     "  WIDTH: 32\nSOLVER:\n  STEPS: (40, 70)\n")
    summary = import_checkpoint("textreid", path, tmp_path / "m.pt", config=their, vocab=vocab)
    assert summary["image_size"] == [96, 32]
    assert read_checkpoint(tmp_path / "m.pt")["config"]["method"]["id_smoothing"] == 0.2
    with pytest.raises(TBPSError, match="--vocab clip_vocab_vit.npy"):
        import_checkpoint("textreid", path, tmp_path / "m.pt")
    np.save(tmp_path / "narrow.npy", np.zeros((49408, 8), dtype=np.float32))
    with pytest.raises(TBPSError, match="8-d"):
        import_checkpoint("textreid", path, tmp_path / "m.pt", vocab=tmp_path / "narrow.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(TBPSError, match="could run code"):
        import_checkpoint("textreid", path, tmp_path / "m.pt", vocab=tmp_path / "objects.npy")


def test_textreid_reads_clip_vocab_vit_npy_as_its_frozen_table(tmp_path):
    """The authors' table is CLIP ViT's even with a ResNet image tower: method.word_embeddings
    takes their clip_vocab_vit.npy as it is."""
    from tiny_models import tiny_config

    from tbps.models import build_model

    table = np.random.default_rng(1).normal(size=(49408, 32)).astype(np.float32)
    np.save(tmp_path / "clip_vocab_vit.npy", table)
    cfg = tiny_config("textreid", {"instance": 1.0, "align": 1.0},
                      {"gru_hidden": 8, "word_embeddings": str(tmp_path / "clip_vocab_vit.npy")},
                      image_backbone="tiny-rn", length=12, embed_dim=16, resnet_last_stride=1)
    model = build_model(cfg, 4, build_tokenizer("clip", 12))
    assert torch.equal(model.word_embedding.weight, torch.from_numpy(table))
    assert not model.word_embedding.weight.requires_grad and model.text_encoder.gru.input_size == 32
    # a checkpoint load builds the same shapes without reading the table again
    rebuilt = build_model(cfg, 4, build_tokenizer("clip", 12), load_pretrained=False)
    assert rebuilt.word_embedding.weight.shape == (49408, 32)


# ----------------------------------------------------------------------------- zero-shot CLIP

def test_zero_shot_clip_embeds_as_clip(tmp_path):
    torch.manual_seed(0)
    arch = get_arch_config("tiny-vit")
    clip = open_clip.model.CLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"]).eval()
    weights = tmp_path / "open_clip_tiny.pt"
    torch.save({"state_dict": clip.state_dict(), "epoch": 3}, weights)
    out = tmp_path / "zeroshot.pt"
    summary = import_checkpoint("clip", weights, out)
    assert (summary["method"], summary["arch"], summary["image_size"], summary["num_classes"]) == \
        ("clip", "tiny-vit", [64, 64], 0)
    images = torch.randn(2, 3, 64, 64)
    image_feats, text_feats, cfg = _tbps_embeddings(out, images)
    tokens = build_tokenizer("clip", 77)(CAPTIONS)
    want_images, want_texts = _clip_reference(clip, images, tokens)
    torch.testing.assert_close(image_feats, want_images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_feats, want_texts, atol=1e-5, rtol=1e-4)
    # person-shaped input: the position grid is interpolated, the model still runs
    summary = import_checkpoint("clip", weights, tmp_path / "tall.pt", image_size=(96, 32))
    feats, _, _ = _tbps_embeddings(tmp_path / "tall.pt", torch.randn(1, 3, 96, 32))
    assert feats.shape == (1, 128) and torch.isfinite(feats).all()


def test_zero_shot_clip_forward_is_clip_contrastive_loss(tmp_path):
    from tbps.losses import itc_loss

    torch.manual_seed(0)
    arch = get_arch_config("tiny-vit")
    clip = open_clip.model.CLIP(arch["embed_dim"], arch["vision_cfg"], arch["text_cfg"])
    torch.save(clip.state_dict(), tmp_path / "w.pt")
    import_checkpoint("clip", tmp_path / "w.pt", tmp_path / "z.pt")
    model, _, tokenizer = load_model_from_checkpoint(tmp_path / "z.pt")
    batch = {"images": torch.randn(2, 3, 64, 64), "token_ids": tokenizer(CAPTIONS), "pids": torch.tensor([0, 1])}
    out = model(batch)
    want = itc_loss(model.encode_image(batch["images"]), model.encode_text(batch["token_ids"]), 100.0)
    torch.testing.assert_close(out["loss_itc"], want)


# ----------------------------------------------------------------------------- command line

def test_cli_import_then_index_and_search(tmp_path, capsys):
    """tbps import writes a checkpoint the other commands take like any other."""
    import json

    from PIL import Image

    from tbps.cli import main

    path, config, _ = save_irra_checkpoint(tmp_path)
    out = tmp_path / "models" / "irra.pt"
    assert main(["import", "--from", "irra", str(path), "--config", str(config), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "irra" and summary["dropped"] == 0 and out.is_file()
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 96), colour).save(gallery / f"{i}.jpg")
    assert main(["index", "--checkpoint", str(out), "--images", str(gallery), "--out", str(tmp_path / "index"),
                 "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(tmp_path / "index"), "--json", "--top-k", "2", "a person in red"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and {r["rank"] for r in results} == {1, 2}


def test_cli_import_errors_are_one_line(tmp_path, capsys):
    from tbps.cli import main

    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, foreign)
    assert main(["import", "--from", "irra", str(foreign), "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbps: error: ") and "\n" not in err and "resnet.pth" in err


# ----------------------------------------------------------------------------- the CLIP mask id

def _tiny_irra(tokenizer_name: str):
    from tiny_models import tiny_config

    from tbps.models import build_model

    cfg = tiny_config("irra", {"sdm": 1.0, "irr": 1.0, "id": 1.0}, {}, length=16)
    cfg.data.tokenizer = tokenizer_name
    torch.manual_seed(0)
    return cfg, build_model(cfg, 3, build_tokenizer(tokenizer_name, 16)).eval()


def test_new_checkpoints_have_irras_vocabulary():
    _, model = _tiny_irra("clip")
    assert model.text_encoder.backbone.token_embedding.weight.shape[0] == 49408
    assert model.mlm_head.fc.out_features == 49408 and model.mask_id == 49405


def test_old_checkpoint_with_49409_rows_still_loads_and_embeds_the_same(tmp_path):
    """Checkpoints saved before the mask took id 49405 say ``tokenizer: clip`` but have 49,409 rows."""
    from tbps.engine.checkpoint import save_checkpoint

    cfg, old = _tiny_irra("clip-legacy")
    assert old.text_encoder.backbone.token_embedding.weight.shape[0] == 49409
    cfg.data.tokenizer = "clip"  # what an old checkpoint's config holds
    save_checkpoint(tmp_path / "old.pt", model=old, cfg=cfg, num_classes=3)
    model, loaded_cfg, tokenizer = load_model_from_checkpoint(tmp_path / "old.pt")
    assert (tokenizer.name, tokenizer.mask_id, tokenizer.vocab_size) == ("clip-legacy", 49408, 49409)
    assert loaded_cfg.data.tokenizer == "clip-legacy"
    ids = tokenizer(CAPTIONS)
    with torch.no_grad():
        torch.testing.assert_close(model.embed_texts(ids)["global"], old.embed_texts(ids)["global"])
    # a new checkpoint is left alone
    cfg_new, new = _tiny_irra("clip")
    save_checkpoint(tmp_path / "new.pt", model=new, cfg=cfg_new, num_classes=3)
    assert load_model_from_checkpoint(tmp_path / "new.pt")[2].name == "clip"


def test_old_checkpoint_keeps_the_fingerprint_of_its_old_index(tmp_path):
    """An index built by tbps before the mask moved recorded ``tokenizer: clip`` in its fingerprint;
    the same weights, now read as ``clip-legacy``, must still match it (search, adding images)."""
    from tbps.engine.checkpoint import save_checkpoint
    from tbps.search.index import model_fingerprint

    cfg, old = _tiny_irra("clip-legacy")
    cfg.data.tokenizer = "clip"
    save_checkpoint(tmp_path / "old.pt", model=old, cfg=cfg, num_classes=3)
    before = model_fingerprint(old, cfg)  # what the old tbps wrote into the index manifest
    model, loaded_cfg, _ = load_model_from_checkpoint(tmp_path / "old.pt")
    assert loaded_cfg.data.tokenizer == "clip-legacy"
    assert model_fingerprint(model, loaded_cfg) == before
    cfg_new, new = _tiny_irra("clip")
    assert model_fingerprint(new, cfg_new) != model_fingerprint(old, cfg)


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-L-14-336", "RN50", "RN101"])
def test_published_clip_architectures_are_recognised_from_shapes(name):
    """Shapes only (meta tensors): IRRA's ViT-B/16, TextReID's RN50/RN101, the usual CLIPs."""
    from tbps.importers import infer_clip_arch

    cfg = get_arch_config(name)
    with torch.device("meta"):
        state = open_clip.model.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"]).state_dict()
    vit = "visual.proj" in state
    pos = state["visual.positional_embedding" if vit else "visual.attnpool.positional_embedding"]
    native = int(round((pos.shape[0] - 1) ** 0.5)) * (int(state["visual.conv1.weight"].shape[-1]) if vit else 32)
    assert infer_clip_arch(state, native_size=native) == name
    if not vit:  # TextReID's files hold the image tower only
        assert infer_clip_arch({k: v for k, v in state.items() if k.startswith("visual.")}, text=False) == name


def test_zero_shot_clip_from_a_hugging_face_folder(tmp_path):
    """The same import from a Hugging Face CLIP folder (QuickGELU, keys renamed) embeds as transformers."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4, num_hidden_layers=4,
                  hidden_act="quick_gelu")
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=49407,
                                         bos_token_id=49406, pad_token_id=0, **common),
                        vision_config=dict(image_size=64, patch_size=16, **common), projection_dim=128)
    torch.manual_seed(1)
    hf = CLIPModel(config).eval()
    hf.save_pretrained(tmp_path / "hf-clip")
    summary = import_checkpoint("clip", tmp_path / "hf-clip", tmp_path / "z.pt")
    assert (summary["arch"], summary["image_size"]) == ("tiny-vit", [64, 64])
    images = torch.randn(2, 3, 64, 64)
    image_feats, text_feats, _ = _tbps_embeddings(tmp_path / "z.pt", images)
    ids = build_tokenizer("clip", 77)(CAPTIONS)
    with torch.no_grad():
        want_image, want_text = hf.get_image_features(pixel_values=images), hf.get_text_features(input_ids=ids)
    want_image = want_image if isinstance(want_image, torch.Tensor) else want_image.pooler_output
    want_text = want_text if isinstance(want_text, torch.Tensor) else want_text.pooler_output
    torch.testing.assert_close(image_feats, F.normalize(want_image, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_feats, F.normalize(want_text, dim=-1), atol=1e-5, rtol=1e-4)


class _ScriptedWithSetstate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)
        self.flag = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.flag, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.flag = state[0]
        self.training = state[1]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; OpenAI still ships it
def test_torchscript_archive_with_load_time_code_is_refused(tmp_path):
    """torch.jit.load runs a scripted class's __setstate__ (code from the file) while loading."""
    from tbps.models.backbones import read_clip_weights

    torch.jit.save(torch.jit.script(_ScriptedWithSetstate()), str(tmp_path / "ViT-B-16.pt"))
    with pytest.raises(TBPSError) as info:
        read_clip_weights(tmp_path / "ViT-B-16.pt")
    assert "\n" not in str(info.value) and "__setstate__" in str(info.value) and "will not load it" in str(info.value)
    with pytest.raises(TBPSError, match="__setstate__"):
        import_checkpoint("clip", tmp_path / "ViT-B-16.pt", tmp_path / "z.pt")


def test_textreid_keys_outside_its_modules_are_refused(tmp_path):
    path, vocab, _ = save_textreid_checkpoint(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["textual_model.embed.weight"] = torch.zeros(32, 512)  # VOCABULARY_SIZE != EMBEDDING_SIZE
    torch.save(ckpt, path)
    with pytest.raises(TBPSError, match=r"unexpected \(textual_model\.embed\.weight\)"):
        import_checkpoint("textreid", path, tmp_path / "m.pt", vocab=vocab)
    del ckpt["model"]["textual_model.embed.weight"]
    ckpt["model"]["bnneck.weight"] = torch.zeros(3)
    torch.save(ckpt, path)
    with pytest.raises(TBPSError, match=r"unexpected \(bnneck\.weight\)"):
        import_checkpoint("textreid", path, tmp_path / "m.pt", vocab=vocab)
    del ckpt["model"]["bnneck.weight"]
    ckpt["model"]["embed_model.v_fc_q.0.weight"] = torch.zeros(3)  # MOCO.FC head: unused at retrieval
    torch.save(ckpt, path)
    assert import_checkpoint("textreid", path, tmp_path / "m.pt", vocab=vocab)["dropped"] == \
        ["embed_model.v_fc_q.0.weight"]


@pytest.mark.parametrize("body, words", [
    ("img_size: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n"
     + "".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 9)), "expands to more than"),
])
def test_cli_import_bounds_their_yaml_like_a_tbps_config(tmp_path, capsys, body, words):
    """Deep nesting and an alias bomb (10^9 values) in IRRA's configs.yaml: one line, quickly."""
    import time

    from tbps.cli import main

    path, config, _ = save_irra_checkpoint(tmp_path)
    config.write_text(config.read_text() + body)
    started = time.perf_counter()
    assert main(["import", "--from", "irra", str(path), "--config", str(config), "--out", str(tmp_path / "m.pt")]) == 1
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbps: error: ") and "\n" not in err and "configs.yaml" in err and words in err
    assert not (tmp_path / "m.pt").exists()
