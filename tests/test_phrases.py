"""The offline noun-phrase chunker and its recovery of phrases from token ids."""

from __future__ import annotations

import pytest

from tbps.data.phrases import PhraseExtractor, caption_words, chunk_noun_phrases, noun_phrases
from tbps.data.tokenizers import build_tokenizer

CAPTIONS = {
    "A woman wearing a black jacket and blue jeans, carrying a red bag.":
        ["woman", "black jacket", "blue jeans", "red bag"],
    "The man has short black hair and is wearing a white t-shirt, grey shorts and black sneakers.":
        ["man", "short black hair", "white t-shirt", "grey shorts", "black sneakers"],
    "A young girl with long brown hair walking down the street in a pink dress holding her mother's hand":
        ["young girl", "long brown hair", "street", "pink dress", "mother's hand"],
    "He is wearing glasses": ["glasses"],
    "This person is walking slowly with a backpack on his back and earrings in her ears.":
        ["person", "backpack", "back", "earrings", "ears"],
}


@pytest.mark.parametrize("caption,expected", list(CAPTIONS.items()))
def test_chunker_on_typical_captions(caption, expected):
    assert noun_phrases(caption) == expected


def test_joiners_never_start_or_end_a_phrase_and_punctuation_splits():
    words = ["-", "red", "-", ",", "blue", "bag", "'"]
    assert chunk_noun_phrases(words) == [(1, 2), (4, 6)]
    assert chunk_noun_phrases([]) == []
    assert chunk_noun_phrases(["the", "and", "."]) == []


def test_word_pieces_grouped_into_words_with_token_spans():
    assert caption_words(["a", "back", "##pack", ",", "t", "-", "shirt"], "wordpiece", offset=1) == [
        ("a", 1, 2), ("backpack", 2, 4), (",", 4, 5), ("t", 5, 6), ("-", 6, 7), ("shirt", 7, 8)]
    assert caption_words(["back", "pack</w>", "red</w>"], "clip") == [("backpack", 0, 2), ("red", 2, 3)]
    assert caption_words(["▁back", "pack", "▁red"], "marker") == [("backpack", 0, 2), ("red", 2, 3)]


@pytest.mark.parametrize("name", ["minilm", "clip"])
def test_phrases_recovered_from_token_ids(name):
    tokenizer = build_tokenizer(name, 40)
    captions = list(CAPTIONS)
    ids = tokenizer(captions)
    extractor = PhraseExtractor(tokenizer, max_phrases=10)
    spans, valid = extractor.spans(ids)
    assert spans.shape == (len(captions), 10, 2) and valid.shape == (len(captions), 10)
    for row, expected in enumerate(CAPTIONS.values()):
        got = [tokenizer.decode(ids[row, s:e]).replace(" ", "")
               for (s, e), ok in zip(spans[row].tolist(), valid[row].tolist()) if ok]
        assert got == [p.replace(" ", "") for p in expected]
        assert not valid[row, len(expected):].any()
    # the second pass reads the cache, keyed by the token-id row
    assert extractor.misses == len(captions) and extractor.hits == 0
    extractor.spans(ids)
    assert extractor.misses == len(captions) and extractor.hits == len(captions)


def test_max_phrases_and_fallback_for_captions_without_phrases():
    tokenizer = build_tokenizer("minilm", 40)
    ids = tokenizer(["a red hat, a blue coat, a green bag", "he is wearing", ""])
    spans, valid = PhraseExtractor(tokenizer, max_phrases=2).spans(ids)
    assert valid[0].tolist() == [True, True]
    assert tokenizer.decode(ids[0, spans[0, 1, 0]:spans[0, 1, 1]]) == "blue coat"
    # no noun phrase: one phrase over the whole caption; empty caption: the start token
    assert valid[1].tolist() == [True, False]
    assert tokenizer.decode(ids[1, spans[1, 0, 0]:spans[1, 0, 1]]) == "he is wearing"
    assert valid[2].tolist() == [True, False] and spans[2, 0].tolist() == [0, 1]
