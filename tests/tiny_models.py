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
