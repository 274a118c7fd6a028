"""Noun phrases of pedestrian captions, found offline from the token ids the models receive.

ACSA (Ji et al., TMM 2022) aligns image scales with the noun phrases of a caption. The authors
parse captions with an NLP toolkit and its downloaded models; tbps must work offline and the trainer,
evaluator and search index hand a model token ids only. So phrases are recovered from the ids:

1. ``caption_words``: the tokenizer's pieces are mapped back to words with their token spans
   (WordPiece ``##`` continuations, CLIP BPE ``</w>`` word ends, ``Ġ``/``▁`` word starts);
2. ``chunk_noun_phrases``: a rule-based chunker over a closed-class word list. Pedestrian captions
   are short and formulaic ("A woman wearing a black jacket and blue jeans, carrying a red bag"):
   determiners, pronouns, prepositions, conjunctions, auxiliaries, the usual verbs (wearing,
   carrying, holding, ...), -ing verbs and -ly adverbs and punctuation end a phrase; every maximal
   run of the remaining words (adjectives, colours, nouns, numbers) is a phrase. Hyphens and
   apostrophes inside a run are kept ("t - shirt", "woman ' s");
3. ``PhraseExtractor``: at most ``max_phrases`` token spans per caption, cached per caption
   (keyed by its token-id row), so an epoch re-reads the cache instead of re-chunking.

Why no tagger package: PyPI's taggers either download their models at run time (NLTK, spaCy,
stanza) or are unofficial mirrors of them; a closed-class list covers this domain.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PhraseExtractor", "caption_words", "chunk_noun_phrases", "noun_phrases", "piece_style", "token_pieces"]

_DETERMINERS = """a an the this that these those his her hers its their theirs my your our some any each every
    both either neither another other such no one two three four five several many much few more most
    all half""".split()
_PRONOUNS = """he she it they him them who whom whose which what someone somebody person's i you we
    himself herself itself themselves there here""".split()
_PREPOSITIONS = """in on at of with without by from to into onto over under above below behind beside
    besides between near around across along through toward towards up down off out inside outside
    upon about against like as than for per via underneath beneath among while during after before
    until""".split()
_CONJUNCTIONS = """and or but nor so yet also plus then because although though if when where whereas
    not""".split()
_VERBS = """is are was were be been being am has have had having does do did can could may might will
    would shall should must wears wear wore worn wearing carries carry carried carrying holds hold
    held holding has walks walk walked walking stands stand stood standing looks look looked looking
    appears appear seems seem sits sit sat sitting rides ride riding runs run running goes go going
    dressed dressing pulling pushing pulls pushes talking using uses seen seems tucked tied paired
    featuring features contains contain containing includes include including slung hanging hangs
    rolled getting""".split()
_ADVERBS = """also very quite rather too just only really mostly partly slightly somewhat fairly pretty
    probably possibly maybe either well almost nearly""".split()
# -ing words that are nouns in this domain, not verbs
_ING_NOUNS = """clothing earring earrings stocking stockings legging leggings string strings ring rings
    sling building ceiling lining padding bedding sibling siblings wedding painting drawing
    handbag""".split()
_BREAK_WORDS = frozenset(_DETERMINERS + _PRONOUNS + _PREPOSITIONS + _CONJUNCTIONS + _VERBS + _ADVERBS)
_ING_NOUN_SET = frozenset(_ING_NOUNS)
_JOINERS = frozenset({"-", "'", "’", "/"})
_WORD_RE = re.compile(r"[\w'’/-]+|[^\w\s]", re.UNICODE)


def _is_break(word: str) -> bool:
    """True when ``word`` cannot be part of a noun phrase (closed class, verb, adverb, punctuation)."""
    if word in _JOINERS:
        return False
    if not any(ch.isalnum() for ch in word):
        return True  # punctuation
    if word in _BREAK_WORDS:
        return True
    if len(word) > 4 and word.endswith("ing") and word not in _ING_NOUN_SET:
        return True  # gerund / participle: "walking", "wearing"
    if len(word) > 4 and word.endswith("ly") and word not in {"belly", "jelly", "family", "holly"}:
        return True  # adverb: "loosely", "mostly"
    return False


def chunk_noun_phrases(words: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, end)`` word-index spans of the noun phrases of ``words`` (lower-cased, in order).

    A phrase is a maximal run of words that are not closed-class, verbs, adverbs or punctuation;
    joiners (``-``, ``'``) stay inside a run but never start or end one.
    """
    spans: list[tuple[int, int]] = []
    start = None
    for i, word in enumerate(list(words) + ["."]):  # a sentinel closes the last run
        if _is_break(word.lower()):
            if start is not None:
                end = i
                while end > start and words[end - 1] in _JOINERS:
                    end -= 1
                if end > start:
                    spans.append((start, end))
            start = None
        elif start is None and word not in _JOINERS:
            start = i
    return spans


def noun_phrases(caption: str) -> list[str]:
    """The noun phrases of a plain-text caption (for inspection and tests)."""
    words = _WORD_RE.findall(caption.lower())
    return [" ".join(words[s:e]) for s, e in chunk_noun_phrases(words)]


# ----------------------------------------------------------------------------- token ids -> words

def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The tokenizer's piece string for each id (``##ing`` for WordPiece, ``shirt</w>`` for CLIP)."""
    hf = getattr(tokenizer, "_tok", None)
    if hf is not None:
        return list(hf.convert_ids_to_tokens(list(ids)))
    bpe = getattr(tokenizer, "_bpe", None)
    if bpe is not None:
        return [bpe.decoder.get(int(i), "[MASK]</w>") for i in ids]
    raise TypeError(f"{type(tokenizer).__name__}: cannot map token ids back to words")


def piece_style(tokenizer: Any) -> str:
    """How a tokenizer marks words: ``"wordpiece"`` (BERT ``##``), ``"clip"`` (``</w>``) or ``"marker"``."""
    hf = getattr(tokenizer, "_tok", None)
    if hf is not None:
        return "wordpiece" if "##s" in hf.get_vocab() else "marker"
    if getattr(tokenizer, "_bpe", None) is not None:
        return "clip"
    raise TypeError(f"{type(tokenizer).__name__}: cannot map token ids back to words")


def caption_words(pieces: Sequence[str], style: str = "wordpiece", offset: int = 0) -> list[tuple[str, int, int]]:
    """Group tokenizer pieces into words: ``(word, first token, last token + 1)``, ``offset`` added.

    ``style`` "wordpiece": a ``##`` piece continues the previous word; "clip": a word runs until its
    ``</w>`` piece; "marker": a ``Ġ``/``▁`` piece starts a new word (byte-level BPE, SentencePiece).
    """
    if style not in ("wordpiece", "clip", "marker"):
        raise ValueError(f"unknown piece style {style!r}")
    words: list[tuple[str, int, int]] = []
    word_open = False
    for i, piece in enumerate(pieces):
        pos = offset + i
        if style == "wordpiece":
            joins, text = piece.startswith("##"), piece[2:] if piece.startswith("##") else piece
        elif style == "clip":
            joins, text = word_open, piece[:-4] if piece.endswith("</w>") else piece
            word_open = not piece.endswith("</w>")
        else:
            joins, text = not piece.startswith(("Ġ", "▁")), piece.lstrip("Ġ▁")
        if joins and words:
            word, start, _ = words[-1]
            words[-1] = (word + text, start, pos + 1)
        else:
            words.append((text, pos, pos + 1))
    return [(w.lower(), s, e) for w, s, e in words if w]


class PhraseExtractor:
    """Token spans of up to ``max_phrases`` noun phrases per caption, cached per token-id row.

    ``spans(token_ids)`` -> ``(spans, valid)``: ``spans`` (B, P, 2) long ``[start, end)`` token
    positions in the row, ``valid`` (B, P) bool. A caption without any phrase gets one phrase over
    all its words (or over the start token when it has none), so every row has a valid phrase.
    """

    def __init__(self, tokenizer: Any, max_phrases: int = 10, cache_size: int = 1_000_000) -> None:
        if max_phrases < 1:
            raise ValueError(f"max_phrases must be >= 1, got {max_phrases}")
        self.tokenizer = tokenizer
        self.max_phrases = int(max_phrases)
        self.cache_size = int(cache_size)
        self.sot_id, self.eot_id, self.pad_id = int(tokenizer.sot_id), int(tokenizer.eot_id), int(tokenizer.pad_id)
        self.style = piece_style(tokenizer)
        self._cache: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.hits = 0
        self.misses = 0

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers / deepcopy: no need to copy the cache
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def _body(self, row: list[int]) -> list[int]:
        """The caption's ids between the start token and the first end token."""
        start = 1 if row and row[0] == self.sot_id else 0
        if self.eot_id in row[start:]:
            return row[start:row.index(self.eot_id, start)]
        body = row[start:]  # hand-built row without an end token: drop trailing padding
        while body and body[-1] == self.pad_id:
            body.pop()
        return body

    def caption_spans(self, row: list[int]) -> list[tuple[int, int]]:
        """Token spans of one row's phrases (cached)."""
        start = 1 if row and row[0] == self.sot_id else 0
        body = self._body(row)
        key = tuple(row[:start + len(body)])
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        pieces = token_pieces(self.tokenizer, body)
        words = caption_words(pieces, self.style, offset=start)
        phrases = chunk_noun_phrases([w for w, _, _ in words])[: self.max_phrases]
        spans = [(words[s][1], words[e - 1][2]) for s, e in phrases]
        if not spans:
            spans = [(start, start + len(body))] if body else [(0, 1)]
        if len(self._cache) < self.cache_size:
            self._cache[key] = spans
        return spans

    def spans(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = token_ids.detach().cpu().tolist()
        count = self.max_phrases
        spans = torch.zeros(len(rows), count, 2, dtype=torch.long)
        valid = torch.zeros(len(rows), count, dtype=torch.bool)
        for i, row in enumerate(rows):
            for j, (s, e) in enumerate(self.caption_spans(row)):
                spans[i, j, 0], spans[i, j, 1] = s, e
                valid[i, j] = True
        return spans.to(token_ids.device), valid.to(token_ids.device)
