"""What the method tests share: CLIP-like token ids without a BPE file, random captions, and tiny
configs that build in milliseconds on the CPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tbps.config import Config

SOT, EOT, MASK, PAD = 49406, 49407, 49408, 0
LENGTH = 16


def clip_tokenizer(length: int = LENGTH) -> SimpleNamespace:
    """The attributes a model reads from a CLIP tokenizer, without loading its vocabulary."""
    return SimpleNamespace(name="clip", vocab_size=49409, pad_id=PAD, mask_id=MASK, sot_id=SOT, eot_id=EOT,
                           special_ids=[SOT, EOT, MASK, PAD], context_length=length)


TOKENIZER = clip_tokenizer()


def random_token_ids(n: int, generator: torch.Generator, length: int = LENGTH, min_words: int = 4) -> torch.Tensor:
    """``n`` captions of random word ids between SOT and EOT, padded to ``length``."""
    token_ids = torch.full((n, length), PAD, dtype=torch.long)
    for i in range(n):
        words = int(torch.randint(min_words, length - 2, (1,), generator=generator))
        token_ids[i, 0] = SOT
        token_ids[i, 1:words + 1] = torch.randint(1, 5000, (words,), generator=generator)
        token_ids[i, words + 1] = EOT
    return token_ids


def tiny_config(name: str, loss: dict | None, method: dict, *, image_backbone: str = "tiny-vit",
                text: str = "clip", length: int = LENGTH, **model) -> Config:
    """A 64x32 config for method ``name``: CLIP-like text (``text="clip"``) or MiniLM with five of its
    six layers frozen (``text="minilm"``); ``model`` sets further ``cfg.model`` keys."""
    cfg = Config()
    cfg.model.name = name
    cfg.model.image_backbone = image_backbone
    cfg.model.pretrained = ""
    if text == "minilm":
        cfg.model.text_backbone = "hf"
        cfg.model.text_pretrained = "minilm"
        cfg.model.text_frozen_layers = 5
        cfg.data.tokenizer = "minilm"
    else:
        cfg.model.text_backbone = text
    for key, value in model.items():
        if not hasattr(cfg.model, key):
            raise AttributeError(f"model.{key}: not a model option")
        setattr(cfg.model, key, value)
    cfg.data.image_size = [64, 32]
    cfg.data.text_length = length
    cfg.method = dict(method)
    if loss is not None:
        cfg.loss = dict(loss)
    return cfg


# Every registered method's tiny recipe: the losses, method options, model keys (``tiny_config``'s
# keywords) and data keys its tests start from. A method registered without a row here fails the
# contract test (tests/test_method_contract.py) until it gets one.
TINY_SWIN = {"swin_embed_dim": 16, "swin_depths": [1, 1, 1, 1], "swin_heads": [1, 1, 2, 2], "swin_window": 4}
TINY_METHODS: dict[str, dict] = {
    "irra": {"loss": None, "method": {"cross_layers": 1}},
    "fcsa": {"loss": {"id": 1.0, "cmpm": 1.0, "cmrs_image": 1.0, "cmrs_text": 1.0}, "method": {"cross_layers": 1},
             "data": {"positives": 2}},
    "cffa": {"loss": {"mal": 1.0, "id": 1.0, "irr": 1.4}, "method": {"cross_layers": 1}},
    "acsa": {"loss": {"cmpm": 1.0, "cmpc": 1.0, "cross_scale": 0.1}, "method": {**TINY_SWIN, "drop_path": 0.0},
             "model": {"image_backbone": "swin_tiny_patch4_window7_224", "text": "minilm", "length": 24,
                       "embed_dim": 32}},
    "pcc": {"loss": {"id": 1.0, "rank": 1.0, "cmr": 1.0}, "method": {"num_parts": 2, "heads": 2, "last_stride": 1},
            "model": {"image_backbone": "resnet18", "text": "minilm", "length": 16, "embed_dim": 64}},
    "textreid": {"loss": {"instance": 1.0, "align": 1.0, "moco": 1.0},
                 "method": {"gru_hidden": 8, "queue_size": 12, "momentum": 0.9},
                 "model": {"image_backbone": "tiny-rn", "length": 12, "embed_dim": 16, "resnet_last_stride": 1}},
    "clip": {"loss": {"itc": 1.0}, "method": {}},
}


def method_config(name: str, loss: dict | None = None, *, model: dict | None = None, **method) -> Config:
    """Method ``name``'s tiny config (its ``TINY_METHODS`` row); ``loss`` replaces the row's losses,
    ``method`` keywords update its options and ``model`` its ``tiny_config`` keywords."""
    row = TINY_METHODS[name]
    cfg = tiny_config(name, row["loss"] if loss is None else loss, {**row["method"], **method},
                      **{**row.get("model", {}), **(model or {})})
    for key, value in row.get("data", {}).items():
        setattr(cfg.data, key, value)
    return cfg


CAPTIONS = ("a man in a red shirt and blue jeans", "a woman with a black bag", "a girl wearing a white dress",
            "a boy carrying a green backpack", "a man in a grey coat with a cap", "a woman in a yellow skirt")


def method_tokenizer(cfg: Config):
    """The tokenizer ``cfg`` trains with: MiniLM's real one, or CLIP's ids without the BPE file."""
    if cfg.data.tokenizer == "clip":
        return clip_tokenizer(cfg.data.text_length)
    from tbps.data.tokenizers import build_tokenizer

    return build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)


def method_batch(cfg: Config, tokenizer, n_ids: int = 4, per_id: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A training batch as the loader builds it for ``cfg``: ``per_id`` pairs of each of ``n_ids``
    people, plus ``data.positives`` same-identity pairs per sample where the method asks for them."""
    g = torch.Generator().manual_seed(seed)
    n, k, length = n_ids * per_id, cfg.data.positives, cfg.data.text_length
    pids = torch.arange(n) // per_id

    def captions(count: int) -> torch.Tensor:
        if cfg.data.tokenizer == "clip":
            return random_token_ids(count, g, length, min_words=2)
        order = torch.randint(len(CAPTIONS), (count,), generator=g).tolist()
        return tokenizer([CAPTIONS[i] for i in order])

    h, w = cfg.data.image_size
    batch = {"images": torch.randn(n, 3, h, w, generator=g), "token_ids": captions(n), "pids": pids,
             "image_ids": torch.arange(n)}
    if k:
        batch["pos_images"] = torch.randn(n, k, 3, h, w, generator=g)
        batch["pos_token_ids"] = captions(n * k).view(n, k, length)
    return batch


def total_loss(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of a forward pass's ``loss_*`` terms (the trainer weights them inside the model)."""
    return sum(v for k, v in out.items() if k.startswith("loss_"))


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``, creating the file: the side effect a safe loader must
    never let happen. Save one inside a weight file to test that the file is refused."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
