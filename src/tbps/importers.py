"""Published models as tbps checkpoints: IRRA-family ``best.pth``, TextReID, and plain CLIP weights.

``tbps import --from irra|textreid|clip FILE [--config THEIR_CONFIG] --out MODEL.pt`` maps another
project's weights onto a tbps method (IRRA's ``base_model`` CLIP + heads -> ``irra``; TextReID's
ResNet + BiGRU + projections -> ``textreid``; a CLIP model -> the zero-shot ``clip`` method) and
writes an ordinary tbps checkpoint, which ``eval``, ``index``, ``search``, ``serve`` and
``visualize`` then take like any other.

What is read, and how:

- The file goes through :func:`tbps.safe_load.load_torch_file`: weights-only unpickling, so the
  optimiser, scheduler and argument entries these files carry are read as plain data, and a file
  that needs any other Python object is refused. The reference projects' config files are read
  with ``yaml`` safe loading (plus tuples).
- The architecture comes from the tensors' shapes (ViT or ModifiedResNet widths, depths and patch
  size, matched against open_clip's architecture configs), the image size from the position
  embedding's grid or from their config (``img_size``, ``stride_size``; TextReID's
  ``INPUT.HEIGHT``/``WIDTH``), the text length from the text position embedding, and the number of
  identities from the classifier.
- Every key of the file must find its place: missing and unexpected keys are one line naming
  both. The exceptions are named: heads that IRRA-family methods (CFFA, FCSA, RDE, ...) add
  beyond IRRA's are dropped and listed, since the imported ``irra`` model keeps what retrieval
  needs (the CLIP towers) plus IRRA's own heads; TextReID head entries tbps has no place for
  (``embed_model.v_fc_*`` of ``MOCO.FC``, unused at retrieval) likewise; and TextReID's duplicate
  ``v_encoder_q`` / ``t_encoder_q`` entries (the same modules as ``visual_model`` / ``textual_model``) must equal
  their originals.
- IRRA saves its weights in fp16 (``convert_weights``); they are stored as fp32. The tokenizer is
  CLIP's with ``<|mask|>`` at IRRA's id 49405, so IRRA's 49,408-row token table and MLM head fit.

:func:`export_irra` and :func:`export_textreid` write the reverse mapping (tbps -> the reference
layout); the tests use them for the round trip.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tbps.config import Config, config_from_dict
from tbps.errors import TBPSError
from tbps.models.backbones.weights import strip_module_prefix

log = logging.getLogger(__name__)

IMPORT_FORMATS = ("irra", "textreid", "clip")
IRRA_DEFAULT_IMAGE_SIZE = (384, 128)  # IRRA's and TextReID's default input (height, width)

# ----------------------------------------------------------------------------- architecture

def _block_indices(state: dict[str, Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pattern.match(k)] if m})


def clip_signature(state: dict[str, Tensor], text: bool = True) -> tuple:
    """What fixes a CLIP architecture, read from open_clip-named weights (``visual.*`` + text)."""
    if "visual.conv1.weight" in state and "visual.proj" in state:
        conv = state["visual.conv1.weight"]
        vision = ("vit", int(conv.shape[0]), len(_block_indices(state, "visual.transformer.resblocks.")),
                  int(conv.shape[-1]), int(state["visual.proj"].shape[1]))
    elif "visual.layer1.0.conv1.weight" in state and "visual.attnpool.c_proj.weight" in state:
        layers = tuple(len(_block_indices(state, f"visual.layer{i}.")) for i in range(1, 5))
        vision = ("rn", int(state["visual.layer1.0.conv1.weight"].shape[0]), layers, None,
                  int(state["visual.attnpool.c_proj.weight"].shape[0]))
    else:
        raise TBPSError("no CLIP image tower in these weights (neither a ViT 'visual.conv1.weight' + "
                        "'visual.proj' nor a ModifiedResNet 'visual.layer1...' + 'visual.attnpool...')")
    if not text:
        return vision
    if "ln_final.weight" not in state or "text_projection" not in state:
        raise TBPSError("no CLIP text tower in these weights ('ln_final.weight', 'text_projection')")
    return vision + (int(state["ln_final.weight"].shape[0]), len(_block_indices(state, "transformer.resblocks.")))


def _config_signature(cfg: dict[str, Any], text: bool) -> tuple | None:
    vision, text_cfg = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if vision.get("timm_model_name") or text_cfg.get("hf_model_name"):
        return None
    layers = vision.get("layers")
    if isinstance(layers, (list, tuple)):
        sig: tuple = ("rn", int(vision.get("width", 64)), tuple(int(x) for x in layers), None, int(cfg["embed_dim"]))
    elif isinstance(layers, int):
        sig = ("vit", int(vision.get("width", 768)), layers, int(vision.get("patch_size", 16)), int(cfg["embed_dim"]))
    else:
        return None
    if text:
        sig += (int(text_cfg.get("width", 512)), int(text_cfg.get("layers", 12)))
    return sig


def infer_clip_arch(state: dict[str, Tensor], text: bool = True, native_size: int | None = None) -> str:
    """The open_clip (or tbps tiny) architecture name whose shapes these weights have.

    Among several matches (``ViT-B-16`` and ``ViT-B-16-quickgelu`` share shapes) the one whose
    image size is ``native_size`` wins, then the shortest name; the activation is recorded
    separately (the towers' ``quick_gelu`` buffer).
    """
    from tbps.models.backbones.architectures import get_arch_config, open_clip_module

    want = clip_signature(state, text)
    open_clip = open_clip_module()
    matches = []
    for name in ["tiny-vit", "tiny-rn", *open_clip.list_models()]:
        try:
            cfg = get_arch_config(name)
        except TBPSError:
            continue
        if _config_signature(cfg, text) == want:
            size = cfg["vision_cfg"].get("image_size", 224)
            matches.append((native_size is not None and size != native_size, len(name), name))
    if not matches:
        raise TBPSError(f"no CLIP architecture known to open_clip has these shapes ({want}); "
                        f"pass --arch NAME or a model-config .json")
    return min(matches)[2]


def _grid_image_size(positions: int, cell: int, where: str, default: tuple[int, int] = IRRA_DEFAULT_IMAGE_SIZE
                     ) -> tuple[int, int]:
    """(height, width) of a position grid of ``positions`` cells of ``cell`` pixels: the person-crop
    default (384x128) when it fits, else a square grid; else the user must say (``--config``)."""
    if (default[0] // cell) * (default[1] // cell) == positions and not (default[0] % cell or default[1] % cell):
        return default
    side = int(round(positions ** 0.5))
    if side * side == positions:
        return side * cell, side * cell
    if (positions % 3 == 0) and int(round((positions // 3) ** 0.5)) ** 2 * 3 == positions:
        w = int(round((positions // 3) ** 0.5))
        return 3 * w * cell, w * cell
    raise TBPSError(f"{where}: cannot tell the image size from a grid of {positions} positions; "
                    f"pass --config with the run's image size")


# ----------------------------------------------------------------------------- shared helpers

def _split_keys(state: dict[str, Tensor], mapping: Callable[[str], str | None]) -> tuple[dict[str, Tensor], list[str]]:
    """Apply ``mapping`` to every key; keys it maps to None are returned as unplaced."""
    out, unplaced = {}, []
    for key, value in state.items():
        new = mapping(key)
        if new is None:
            unplaced.append(key)
        else:
            out[new] = value
    return out, unplaced


def _fit_error(path: Path, kind: str, missing: list[str], unexpected: list[str]) -> TBPSError:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                     f"{', ...' if len(unexpected) > 3 else ''})")
    return TBPSError(f"{path}: does not fit a {kind} checkpoint: keys {'; '.join(parts)}")


def _check_against_model(model: torch.nn.Module, state: dict[str, Tensor], path: Path, kind: str,
                         to_reference: Callable[[str], str]) -> None:
    """Missing / unexpected / mis-shaped keys, named as the reference names them, in one line."""
    own = model.state_dict()
    missing = [to_reference(k) for k in own if k not in state]
    unexpected = [to_reference(k) for k in state if k not in own]
    if missing or unexpected:
        raise _fit_error(path, kind, missing, unexpected)
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise TBPSError(f"{path}: does not fit a {kind} checkpoint: {to_reference(key)} has shape "
                            f"{list(value.shape)} but the architecture read from the file needs "
                            f"{list(own[key].shape)}")


def _model_state(obj: Any, path: Path, kind: str) -> dict[str, Tensor]:
    if isinstance(obj, dict) and "config" in obj and "num_classes" in obj and "model" in obj:
        raise TBPSError(f"{path}: this is already a tbps checkpoint; use it directly")
    state = obj.get("model", obj.get("state_dict")) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, Tensor) for v in state.values()):
        raise TBPSError(f"{path}: not a {kind} checkpoint (expected a dict with a 'model' state dict)")
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            key = strip_module_prefix(key)
            out[key] = value.float() if value.is_floating_point() else value
    return out


def _set(node: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


# ----------------------------------------------------------------------------- IRRA

IRRA_TEXT_ROOTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_IRRA_HEADS = {  # IRRA top-level module -> tbps IRRA module
    "classifier.": "classifier.",
    "cross_attn.": "cross_modal.cross_attn.",
    "ln_pre_t.": "cross_modal.ln_query.",
    "ln_pre_i.": "cross_modal.ln_memory.",
    "ln_post.": "cross_modal.ln_post.",
    "mlm_head.": "mlm_head.",
}
_IRRA_BLOCK = {"attn.": "self_attn.", "ln_1.": "norm1.", "ln_2.": "norm2.", "mlp.c_fc.": "linear1.",
               "mlp.c_proj.": "linear2."}
_IRRA_BLOCK_PATTERN = re.compile(r"cross_modal_transformer\.resblocks\.(\d+)\.(.+)")


def irra_to_tbps_key(key: str) -> str | None:
    """IRRA's ``model`` key -> tbps ``irra`` key; None for a key outside IRRA's own modules."""
    if key.startswith("base_model.visual."):
        return "image_encoder.backbone." + key[len("base_model.visual."):]
    if key.startswith("base_model."):
        rest = key[len("base_model."):]
        return "text_encoder.backbone." + rest if rest.startswith(IRRA_TEXT_ROOTS) else "text_encoder.?" + rest
    for old, new in _IRRA_HEADS.items():
        if key.startswith(old):
            return new + key[len(old):]
    match = _IRRA_BLOCK_PATTERN.match(key)
    if match:
        index, rest = match.groups()
        for old, new in _IRRA_BLOCK.items():
            if rest.startswith(old):
                return f"cross_modal.blocks.{index}.{new}{rest[len(old):]}"
        return f"cross_modal.blocks.{index}.?{rest}"
    return None


def tbps_to_irra_key(key: str) -> str:
    """The reverse of :func:`irra_to_tbps_key` (used for error messages and :func:`export_irra`)."""
    if key.startswith("image_encoder.backbone."):
        return "base_model.visual." + key[len("image_encoder.backbone."):]
    if key.startswith("text_encoder.backbone."):
        return "base_model." + key[len("text_encoder.backbone."):]
    for old, new in _IRRA_HEADS.items():
        if key.startswith(new):
            return old + key[len(new):]
    match = re.match(r"cross_modal\.blocks\.(\d+)\.(.+)", key)
    if match:
        index, rest = match.groups()
        for old, new in _IRRA_BLOCK.items():
            if rest.startswith(new):
                return f"cross_modal_transformer.resblocks.{index}.{old}{rest[len(new):]}"
    return key


_IRRA_DATASETS = {"cuhk-pedes": "cuhk-pedes", "icfg-pedes": "icfg-pedes", "rstpreid": "rstpreid"}
_IRRA_LOSSES = {"sdm": "sdm", "itc": "itc", "cmpm": "cmpm", "id": "id", "mlm": "irr"}


def _irra_config(args: dict[str, Any], heads: dict[str, bool], arch: str, image_size: tuple[int, int],
                 text_length: int, cross_layers: int) -> dict[str, Any]:
    """A tbps config dict from IRRA's ``configs.yaml`` (``args``, may be empty) and the file's shapes."""
    cfg = Config().to_dict()
    _set(cfg, "model.name", "irra")
    _set(cfg, "model.image_backbone", arch)
    _set(cfg, "model.text_backbone", "clip")
    _set(cfg, "model.pretrained", "")
    _set(cfg, "data.image_size", list(image_size))
    _set(cfg, "data.text_length", int(text_length))
    _set(cfg, "data.tokenizer", "clip")
    loss_names = [n.strip() for n in str(args.get("loss_names", "sdm+id+mlm")).split("+") if n.strip()]
    weights = {"id": float(args.get("id_loss_weight", 1.0)), "mlm": float(args.get("mlm_loss_weight", 1.0))}
    loss = {_IRRA_LOSSES[n]: weights.get(n, 1.0) for n in loss_names if n in _IRRA_LOSSES}
    if not heads["classifier"]:
        loss.pop("id", None)
    if not heads["irr"]:
        loss.pop("irr", None)
    if not any(k in loss for k in ("sdm", "itc", "cmpm")):
        loss["sdm"] = 1.0
    cfg["loss"] = loss
    cfg["method"] = {"cross_layers": int(cross_layers)} if heads["irr"] else {}
    dataset = str(args.get("dataset_name", "")).lower()
    if dataset in _IRRA_DATASETS:
        _set(cfg, "data.dataset", _IRRA_DATASETS[dataset])
        root = args.get("root_dir")
        if isinstance(root, str) and root:
            _set(cfg, "data.root", str(Path(root) / str(args["dataset_name"])))
    simple = {  # IRRA argument -> tbps key, for the settings that mean the same thing
        "temperature": "model.temperature", "batch_size": "data.batch_size", "num_instance": "data.num_instances",
        "lr": "optim.lr", "lr_factor": "optim.new_lr_factor", "bias_lr_factor": "optim.bias_lr_factor",
        "weight_decay": "optim.weight_decay", "weight_decay_bias": "optim.weight_decay_bias",
        "momentum": "optim.momentum", "warmup_epochs": "optim.warmup_epochs", "warmup_factor": "optim.warmup_factor",
        "gamma": "optim.gamma", "target_lr": "optim.min_lr", "num_epoch": "train.epochs",
    }
    for name, key in simple.items():
        if isinstance(args.get(name), (int, float)) and not isinstance(args.get(name), bool):
            _set(cfg, key, args[name])
    if isinstance(args.get("optimizer"), str) and args["optimizer"].lower() in ("adam", "adamw", "sgd"):
        _set(cfg, "optim.optimizer", args["optimizer"].lower())
    if isinstance(args.get("lrscheduler"), str) and args["lrscheduler"].lower() in ("cosine", "step"):
        _set(cfg, "optim.scheduler", args["lrscheduler"].lower())
    if isinstance(args.get("milestones"), list):
        _set(cfg, "optim.milestones", [int(m) for m in args["milestones"]])
    if isinstance(args.get("alpha"), float) and isinstance(args.get("beta"), float):
        _set(cfg, "optim.betas", [args["alpha"], args["beta"]])
    if isinstance(args.get("sampler"), str):
        _set(cfg, "data.sampler", "random" if args["sampler"].lower() == "random" else "identity")
    return cfg


def _read_their_config(path: str | Path | None) -> dict[str, Any]:
    if not path:
        return {}
    from tbps.safe_yaml import load_yaml

    data = load_yaml(path, "IRRA config")
    if not isinstance(data, dict):
        raise TBPSError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def import_irra(path: str | Path, config: str | Path | None = None, arch: str | None = None
                ) -> tuple[dict[str, Tensor], dict[str, Any], int, list[str]]:
    """(tbps state dict, tbps config dict, num_classes, dropped keys) from an IRRA-family ``best.pth``."""
    from tbps.safe_load import load_torch_file

    path = Path(path)
    raw = _model_state(load_torch_file(path, "IRRA checkpoint"), path, "IRRA")
    args = _read_their_config(config)
    if not any(k.startswith("base_model.") for k in raw):
        raise _fit_error(path, "IRRA", ["base_model.visual.conv1.weight", "base_model.token_embedding.weight"],
                         sorted(raw)[:3])
    state, unplaced = _split_keys(raw, irra_to_tbps_key)
    clip_state = {k[len("base_model."):]: v for k, v in raw.items() if k.startswith("base_model.")}
    vit = "visual.conv1.weight" in clip_state and "visual.attnpool.positional_embedding" not in clip_state
    if arch is None and isinstance(args.get("pretrain_choice"), str):
        arch = args["pretrain_choice"].replace("/", "-")
    if arch is None:
        try:
            arch = infer_clip_arch(clip_state)
        except TBPSError as exc:
            raise TBPSError(f"{path}: does not fit an IRRA checkpoint: {exc}") from None
    pos = clip_state.get("visual.positional_embedding" if vit else "visual.attnpool.positional_embedding")
    if pos is None or pos.ndim != 2:
        raise _fit_error(path, "IRRA", ["base_model.visual.positional_embedding"], [])
    patch = int(clip_state["visual.conv1.weight"].shape[-1]) if vit else 32
    if "img_size" in args:
        size = tuple(int(s) for s in args["img_size"])
        if len(size) != 2:
            raise TBPSError(f"{config}: img_size must be [height, width], got {args['img_size']}")
    else:
        size = _grid_image_size(pos.shape[0] - 1, patch, str(path))
    if vit and int(args.get("stride_size", patch)) != patch:
        raise TBPSError(f"{config}: stride_size {args['stride_size']} differs from the patch size {patch} "
                        f"(overlapping patches); tbps's ViT uses stride = patch size and cannot run this model")
    text_pos = clip_state.get("positional_embedding")
    text_length = int(text_pos.shape[0]) if text_pos is not None else int(args.get("text_length", 77))
    heads = {"classifier": "classifier.weight" in raw,
             "irr": any(k.startswith(("cross_attn.", "mlm_head.", "cross_modal_transformer.")) for k in raw)}
    cross_layers = len(_block_indices(raw, "cross_modal_transformer.resblocks."))
    cfg = _irra_config(args, heads, arch, size, text_length, cross_layers)
    num_classes = int(raw["classifier.weight"].shape[0]) if heads["classifier"] else 0
    # the towers of IRRA's CLIP use OpenAI's QuickGELU
    state["image_encoder.quick_gelu"] = torch.tensor(True)
    state["text_encoder.quick_gelu"] = torch.tensor(True)
    if not vit:
        state.pop("image_encoder.quick_gelu")
    return state, cfg, num_classes, unplaced


def export_irra(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A tbps ``irra`` state dict in IRRA's layout (``best.pth``'s ``model``), fp32."""
    return {tbps_to_irra_key(k): v for k, v in state.items() if not k.endswith("quick_gelu")}


# ----------------------------------------------------------------------------- TextReID

def textreid_to_tbps_key(key: str) -> str | None:
    """TextReID ``model`` key -> tbps ``textreid`` key; "" for an entry that duplicates another
    (the MoCo head's ``*_encoder_q`` are the same modules as ``visual_model`` / ``textual_model``)."""
    table = [
        ("visual_model.", "image_encoder.backbone."),
        ("textual_model.", "text_encoder."),
        ("embed_model.v_encoder_q.", ""),
        ("embed_model.t_encoder_q.", ""),
        ("embed_model.v_encoder_k.", "image_encoder_k.backbone."),
        ("embed_model.t_encoder_k.", "text_encoder_k."),
        ("embed_model.v_embed_layer.", "image_proj."),
        ("embed_model.t_embed_layer.", "text_proj."),
        ("embed_model.visual_embed_layer.", "image_proj."),
        ("embed_model.textual_embed_layer.", "text_proj."),
    ]
    for old, new in table:
        if key.startswith(old):
            return new + key[len(old):] if new else ""
    single = {"embed_model.loss_evaluator.projection": "id_projection", "embed_model.t_queue": "text_queue",
              "embed_model.v_queue": "image_queue", "embed_model.id_queue": "queue_pids",
              "embed_model.queue_ptr": "queue_ptr"}
    return single.get(key)


def tbps_to_textreid_key(key: str, moco: bool) -> str:
    pairs = [
        ("image_encoder.backbone.", "visual_model."), ("text_encoder.", "textual_model."),
        ("image_encoder_k.backbone.", "embed_model.v_encoder_k."), ("text_encoder_k.", "embed_model.t_encoder_k."),
        ("image_proj.", "embed_model.v_embed_layer." if moco else "embed_model.visual_embed_layer."),
        ("text_proj.", "embed_model.t_embed_layer." if moco else "embed_model.textual_embed_layer."),
    ]
    for new, old in pairs:
        if key.startswith(new):
            return old + key[len(new):]
    single = {"id_projection": "embed_model.loss_evaluator.projection", "text_queue": "embed_model.t_queue",
              "image_queue": "embed_model.v_queue", "queue_pids": "embed_model.id_queue",
              "queue_ptr": "embed_model.queue_ptr"}
    return single.get(key, key)


def _textreid_args(data: dict[str, Any]) -> dict[str, Any]:
    """The settings tbps needs from a TextReID (yacs) config; absent ones stay None."""
    model = data.get("MODEL", {}) if isinstance(data.get("MODEL"), dict) else {}
    inp = data.get("INPUT", {}) if isinstance(data.get("INPUT"), dict) else {}
    gru = model.get("GRU", {}) if isinstance(model.get("GRU"), dict) else {}
    embedding = model.get("EMBEDDING", {}) if isinstance(model.get("EMBEDDING"), dict) else {}
    return {"height": inp.get("HEIGHT"), "width": inp.get("WIDTH"), "onehot": gru.get("ONEHOT"),
            "epsilon": embedding.get("EPSILON"), "visual": model.get("VISUAL_MODEL")}


def import_textreid(path: str | Path, config: str | Path | None = None, vocab: str | Path | None = None
                    ) -> tuple[dict[str, Tensor], dict[str, Any], int, list[str]]:
    """(tbps state dict, tbps config dict, num_classes, dropped keys) from a TextReID ``best.pth``.

    ``vocab`` is the frozen word table the GRU reads, which their checkpoint does not hold: their
    ``clip_vocab_vit.npy`` (or CLIP ViT weights, whose token table it is).
    """
    from tbps.models.methods.textreid import read_word_table
    from tbps.safe_load import load_torch_file

    path = Path(path)
    raw = _model_state(load_torch_file(path, "TextReID checkpoint"), path, "TextReID")
    if not any(k.startswith("visual_model.") for k in raw) or not any(k.startswith("textual_model.") for k in raw):
        raise _fit_error(path, "TextReID", ["visual_model.conv1.weight", "textual_model.gru.weight_ih_l0"],
                         sorted(raw)[:3])
    if vocab is None:
        raise TBPSError(f"{path}: a TextReID checkpoint does not hold the GRU's frozen word table; pass "
                        f"--vocab clip_vocab_vit.npy (shipped with their CUHK-PEDES captions) or CLIP ViT weights")
    args = _textreid_args(_read_their_config(config))
    state, unplaced = _split_keys(raw, textreid_to_tbps_key)
    foreign = [k for k in unplaced if not k.startswith("embed_model.")]
    if foreign:  # only head entries (e.g. MOCO.FC's v_fc_q/k, unused at retrieval) may be dropped
        raise _fit_error(path, "TextReID", [], foreign)
    for key, value in raw.items():  # duplicates must be the modules they alias
        if textreid_to_tbps_key(key) == "":
            original = ("visual_model." + key[len("embed_model.v_encoder_q."):] if key.startswith("embed_model.v_")
                        else "textual_model." + key[len("embed_model.t_encoder_q."):])
            if original not in raw or not torch.equal(raw[original], value):
                raise TBPSError(f"{path}: {key} differs from {original} (expected the same module)")
    state.pop("", None)
    moco = "text_queue" in state
    if moco:  # (D, K) queues and (1, K) ids -> tbps's (K, D) and (K,)
        state["text_queue"] = state["text_queue"].t().contiguous()
        state["image_queue"] = state["image_queue"].t().contiguous()
        state["queue_pids"] = state["queue_pids"].reshape(-1).long()
        state["queue_ptr"] = state["queue_ptr"].reshape(()).long()
    visual = {"visual." + k[len("image_encoder.backbone."):]: v for k, v in state.items()
              if k.startswith("image_encoder.backbone.")}
    try:
        arch = infer_clip_arch(visual, text=False)
    except TBPSError as exc:
        raise TBPSError(f"{path}: does not fit a TextReID checkpoint: {exc}") from None
    pos = visual.get("visual.attnpool.positional_embedding")
    if pos is None:
        raise _fit_error(path, "TextReID", ["visual_model.attnpool.positional_embedding"], [])
    positions = int(pos.shape[0]) - 1
    if args["height"] and args["width"]:
        size = (int(args["height"]), int(args["width"]))
        stride = 1 if (size[0] // 16) * (size[1] // 16) == positions else 2
    else:
        size = _grid_image_size(positions, 16, str(path))  # TextReID's stage-5 stride 1: 1/16 maps
        stride = 1
    if "image_proj.weight" not in state or "text_encoder.gru.weight_hh_l0" not in state:
        raise _fit_error(path, "TextReID", ["embed_model.v_embed_layer.weight", "textual_model.gru.weight_hh_l0"], [])
    table = read_word_table(str(vocab))
    gru_in = int(state["text_encoder.gru.weight_ih_l0"].shape[1])
    if table.shape[1] != gru_in:
        raise TBPSError(f"{vocab}: the word table is {table.shape[1]}-d but the checkpoint's GRU reads "
                        f"{gru_in}-d words (another table, e.g. clip_vocab_rn50x4.npy?)")
    state["word_embedding.weight"] = table
    hidden = int(state["text_encoder.gru.weight_hh_l0"].shape[1])
    layers = len({k.split("_l")[-1].split("_")[0] for k in state if k.startswith("text_encoder.gru.weight_ih_l")})
    dim = int(state["image_proj.weight"].shape[0])
    num_classes = int(state["id_projection"].shape[1]) if "id_projection" in state else 0
    cfg = Config().to_dict()
    _set(cfg, "model.name", "textreid")
    _set(cfg, "model.image_backbone", arch)
    _set(cfg, "model.text_backbone", "clip")
    _set(cfg, "model.pretrained", "")
    _set(cfg, "model.embed_dim", dim)
    _set(cfg, "model.resnet_last_stride", stride)
    _set(cfg, "data.image_size", list(size))
    _set(cfg, "data.tokenizer", "clip")
    loss = {"align": 1.0}
    if num_classes:
        loss["instance"] = 1.0
    if moco:
        loss["moco"] = 1.0
    cfg["loss"] = loss
    method: dict[str, Any] = {"gru_hidden": hidden, "gru_layers": layers, "word_embeddings": str(vocab)}
    if moco:
        method["queue_size"] = int(state["text_queue"].shape[0])
    if isinstance(args["epsilon"], (int, float)):
        method["id_smoothing"] = float(args["epsilon"])
    cfg["method"] = method
    return state, cfg, num_classes, unplaced


def export_textreid(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A tbps ``textreid`` state dict in TextReID's layout (``best.pth``'s ``model``, MoCo head when
    the model has queues), including the ``*_encoder_q`` aliases; the word table is not part of it."""
    moco = "text_queue" in state
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "word_embedding.weight":
            continue
        if key in ("text_queue", "image_queue"):
            value = value.t().contiguous()
        elif key == "queue_pids":
            value = value.reshape(1, -1)
        elif key == "queue_ptr":
            value = value.reshape(1)
        out[tbps_to_textreid_key(key, moco)] = value
        if moco and key.startswith("image_encoder.backbone."):
            out["embed_model.v_encoder_q." + key[len("image_encoder.backbone."):]] = value
        if moco and key.startswith("text_encoder."):
            out["embed_model.t_encoder_q." + key[len("text_encoder."):]] = value
    return out


# ----------------------------------------------------------------------------- CLIP (zero-shot)

def clip_config(path: str | Path, arch: str | None = None, image_size: tuple[int, int] | None = None,
                text_length: int = 77) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tbps config dict for the zero-shot ``clip`` method, weight-file meta) for CLIP weights at
    ``path``; the image size defaults to the weights' own (224x224 for ViT-B/16)."""
    from tbps.models.backbones import get_arch_config, read_clip_weights

    state, meta = read_clip_weights(path)
    if arch is None:
        pos = state.get("visual.positional_embedding", state.get("visual.attnpool.positional_embedding"))
        native = None
        if pos is not None:
            side = int(round((pos.shape[0] - 1) ** 0.5))
            cell = int(state["visual.conv1.weight"].shape[-1]) if "visual.proj" in state else 32
            native = side * cell
        try:
            arch = infer_clip_arch(state, native_size=native)
        except TBPSError as exc:
            raise TBPSError(f"{path}: {exc}") from None
    arch_cfg = get_arch_config(arch)
    if image_size is None:
        native = arch_cfg["vision_cfg"].get("image_size", 224)
        grid = meta.get("grid")
        if "visual.positional_embedding" in state and "visual.conv1.weight" in state:
            cell = int(state["visual.conv1.weight"].shape[-1])
            side = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
            native = side * cell
        elif grid:
            native = grid[0] * arch_cfg["vision_cfg"].get("patch_size", 32)
        image_size = (int(native), int(native)) if isinstance(native, int) else tuple(native)
    cfg = Config().to_dict()
    _set(cfg, "model.name", "clip")
    _set(cfg, "model.image_backbone", arch)
    _set(cfg, "model.text_backbone", "clip")
    _set(cfg, "model.pretrained", str(Path(path).expanduser().resolve()))
    _set(cfg, "model.temperature", 0.01)
    _set(cfg, "data.image_size", [int(s) for s in image_size])
    _set(cfg, "data.text_length", int(text_length))
    _set(cfg, "data.tokenizer", "clip")
    cfg["loss"] = {"itc": 1.0}
    cfg["method"] = {}
    return cfg, meta


# ----------------------------------------------------------------------------- entry point

def import_checkpoint(source: str, path: str | Path, out: str | Path, config: str | Path | None = None,
                      vocab: str | Path | None = None, arch: str | None = None,
                      image_size: tuple[int, int] | None = None) -> dict[str, Any]:
    """Write a tbps checkpoint at ``out`` from another project's file; returns a summary dict.

    ``source``: ``irra`` (IRRA-family ``best.pth``; ``config`` = their ``configs.yaml``),
    ``textreid`` (their ``best.pth``; ``vocab`` = ``clip_vocab_vit.npy``; ``config`` = their yaml) or
    ``clip`` (CLIP weights: OpenAI ``.pt``, open_clip file, Hugging Face folder).
    """
    from tbps.data.tokenizers import build_tokenizer
    from tbps.engine.checkpoint import load_model_weights, save_checkpoint
    from tbps.models import build_model

    source = source.lower()
    if source not in IMPORT_FORMATS:
        raise TBPSError(f"--from {source!r}: expected one of {', '.join(IMPORT_FORMATS)}")
    path = Path(path).expanduser()
    if not path.exists():
        raise TBPSError(f"{path}: file not found")
    dropped: list[str] = []
    if source == "clip":
        cfg_dict, meta = clip_config(path, arch, image_size)
        cfg = config_from_dict(cfg_dict)
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
        model = build_model(cfg, 0, tokenizer, load_pretrained=True)
        num_classes = 0
        details = {"format": str(meta.get("format"))}
    else:
        if source == "irra":
            state, cfg_dict, num_classes, dropped = import_irra(path, config, arch)
            to_reference = tbps_to_irra_key
        else:
            state, cfg_dict, num_classes, dropped = import_textreid(path, config, vocab)
            moco = "text_queue" in state
            to_reference = lambda k: tbps_to_textreid_key(k, moco)  # noqa: E731
        if image_size is not None:
            raise TBPSError("--image-size applies to --from clip; an imported model keeps its training size")
        bad = [tbps for tbps in state if "?" in tbps]
        if bad:
            raise _fit_error(path, source, [], [to_reference(k).replace("?", "") for k in bad])
        cfg = config_from_dict(cfg_dict)
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
        model = build_model(cfg, num_classes, tokenizer, load_pretrained=False)
        _check_against_model(model, state, path, "IRRA" if source == "irra" else "TextReID", to_reference)
        load_model_weights(model, state, source=str(path))
        details = {}
    if dropped:
        prefixes = sorted({k.split(".")[0] + "." for k in dropped})
        log.warning("%s: kept what retrieval needs; dropped %d keys of heads tbps's %s has no place for (%s)",
                    path, len(dropped), cfg.model.name, ", ".join(prefixes))
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    imported = {"format": source, "file": str(path.resolve()), "config": str(config or ""),
                "dropped_keys": len(dropped), **details}
    save_checkpoint(out, model=model, cfg=cfg, num_classes=num_classes, imported_from=imported)
    return {"out": str(out), "method": cfg.model.name, "arch": cfg.model.image_backbone,
            "image_size": list(cfg.data.image_size), "text_length": cfg.data.text_length,
            "num_classes": num_classes, "dropped": dropped,
            "parameters": sum(p.numel() for p in model.parameters())}


__all__ = ["IMPORT_FORMATS", "export_irra", "export_textreid", "import_checkpoint", "import_irra",
           "import_textreid", "infer_clip_arch"]
