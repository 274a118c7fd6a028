"""TextReID's CUHK-PEDES layout: annotations/{train,val,test}.json, one record per caption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tbps.data.datasets import load_dataset
from tbps.errors import TBPSError


def _caption(path: str, pid: int, image_id: int, sentence: str) -> dict:
    return {"file_path": path, "sentence": sentence, "onehot": [320, 1125, 269], "id": pid, "image_id": image_id}


def write_layout(root: Path, splits: dict[str, list[dict]]) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "imgs").mkdir()
    for split, records in splits.items():
        (root / "annotations" / f"{split}.json").write_text(json.dumps({"annotations": records}))
    return root


def tiny_layout(root: Path) -> Path:
    train = [_caption("train_query/p7_s1.jpg", 7, 0, "a man in black"),
             _caption("train_query/p7_s1.jpg", 7, 0, "he wears a black coat"),
             _caption("train_query/p7_s2.jpg", 7, 1, "a man walking"),
             _caption("CUHK01/0001.png", 3, 2, "a woman with a bag"),
             _caption("CUHK01/0001.png", 3, 2, "she carries a red bag")]
    val = [_caption("test_query/p100_s1.jpg", 100, 0, "a child"),
           _caption("test_query/p100_s1.jpg", 100, 0, "a small child in white")]
    test = [_caption("test_query/p200_s1.jpg", 200, 0, "an old man"),
            _caption("test_query/p201_s1.jpg", 201, 1, "a cyclist"),
            _caption("test_query/p201_s1.jpg", 201, 1, "someone on a bike"),
            _caption("test_query/p201_s2.jpg", 201, 2, "a person riding")]
    return write_layout(root, {"train": train, "val": val, "test": test})


def test_textreid_layout_parses_to_the_right_counts(tmp_path):
    root = tiny_layout(tmp_path / "cuhkpedes")
    (root / "clip_vocab_vit.npy").write_bytes(b"")  # sits beside, as in their README; not read here
    dataset = load_dataset("cuhk-pedes", root)
    assert dataset.statistics() == {"train": {"ids": 2, "images": 3, "captions": 5},
                                    "val": {"ids": 1, "images": 1, "captions": 2},
                                    "test": {"ids": 2, "images": 3, "captions": 4}}
    first = dataset.train[0]
    assert first.captions == ["a man in black", "he wears a black coat"]
    assert first.image_path == str(root.resolve() / "imgs" / "train_query/p7_s1.jpg")
    assert (first.pid, first.raw_pid) == (1, 7)  # train ids remapped 0..N-1 (3 -> 0, 7 -> 1)
    assert [r.pid for r in dataset.test] == [200, 201, 201]
    assert [r.image_id for r in dataset.test] == [0, 1, 2]


def test_reid_raw_json_wins_when_both_are_present(tmp_path):
    root = tiny_layout(tmp_path / "both")
    (root / "reid_raw.json").write_text(json.dumps([
        {"id": 1, "file_path": "a.jpg", "captions": ["x y"], "split": "test"}]))
    assert load_dataset("cuhk-pedes", root).statistics()["test"]["captions"] == 1


@pytest.mark.parametrize("record, message", [
    ({"file_path": "a.jpg", "onehot": [1], "id": 1, "image_id": 0}, "record 1: missing 'sentence'"),
    ({"file_path": "a.jpg", "sentence": "x", "onehot": [1], "id": "7", "image_id": 0},
     "record 1: 'id' must be an integer, found '7'"),
    ({"file_path": "", "sentence": "x", "onehot": [1], "id": 1, "image_id": 0},
     "record 1: 'file_path' must be a non-empty string"),
    ({"file_path": "a.jpg", "sentence": "  ", "onehot": [1], "id": 1, "image_id": 0},
     "record 1: 'sentence' must be a non-empty string"),
    ({"file_path": "a.jpg", "sentence": "x", "onehot": "1 2", "id": 1, "image_id": 0},
     "record 1: 'onehot' must be a list of integers"),
    ({"file_path": "a.jpg", "sentence": "x", "onehot": [1], "id": 2, "image_id": 0},
     "record 1: image 'a.jpg' has id 2, but an earlier record gives it id 1"),
    ([1, 2], "record 1: expected a JSON object, found a JSON list"),
])
def test_bad_records_are_one_line_errors(tmp_path, record, message):
    good = _caption("a.jpg", 1, 0, "a man")
    root = write_layout(tmp_path / "bad", {"test": [good, record]})
    with pytest.raises(TBPSError) as info:
        load_dataset("cuhk-pedes", root)
    text = str(info.value)
    assert "\n" not in text and message in text and "test.json" in text


def test_bad_files_are_one_line_errors(tmp_path):
    root = write_layout(tmp_path / "nolist", {"test": []})
    (root / "annotations" / "test.json").write_text(json.dumps([_caption("a.jpg", 1, 0, "x")]))
    with pytest.raises(TBPSError, match=r'expected \{"annotations": \[\.\.\.\]\}'):
        load_dataset("cuhk-pedes", root)
    (root / "annotations" / "test.json").write_text("{not json")
    with pytest.raises(TBPSError, match="not valid JSON"):
        load_dataset("cuhk-pedes", root)
    (root / "annotations" / "test.json").unlink()
    with pytest.raises(TBPSError, match="no test.json"):
        load_dataset("cuhk-pedes", root)
    (root / "annotations" / "test.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(TBPSError, match="the test split is empty"):
        load_dataset("cuhk-pedes", root)
