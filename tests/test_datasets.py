"""Dataset parsers, statistics, malformed annotations, the image check and the data CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tbps.cli import main
from tbps.data import load_dataset
from tbps.data.datasets import (
    DATASETS,
    JsonAnnotationDataset,
    PersonSearchDataset,
    check_images,
    register_dataset,
)
from tbps.errors import TBPSError


def _record(pid: int, split: str, path: str, captions=("a man in a red shirt.",), path_field="file_path",
            tokens: bool = True) -> dict:
    rec = {"split": split, "captions": list(captions), path_field: path, "id": pid}
    if tokens:
        rec["processed_tokens"] = [c.split() for c in captions]
    return rec


# raw train ids 7, 3, 7, 12: remapped by sorted raw id -> 3:0, 7:1, 12:2
CUHK_RECORDS = [
    _record(7, "train", "CUHK01/0007001.png", ("The man wears a red shirt.", "A man in red.")),
    _record(3, "train", "CUHK03/3_1.png", ("A woman with a black bag.", "She has long hair.")),
    _record(7, "train", "CUHK01/0007002.png", ("Red shirt, blue jeans.", "A man walking.")),
    _record(12, "train", "train_query/p12_s1.png", ("A person in white.", "White shoes.", "A third one.")),
    _record(501, "val", "test_query/p501_s1.png", ("A girl in a pink dress.", "Pink dress.")),
    _record(900, "test", "test_query/p900_s1.png", ("A man on a bike.", "He rides a bike.")),
    _record(900, "test", "test_query/p900_s2.png", ("Same man.", "The bike is black.")),
    _record(901, "test", "test_query/p901_s1.png", ("A child.", "Small person.")),
]


def write_dataset(root: Path, records, name: str = "reid_raw.json", images: bool = False,
                  path_field: str = "file_path") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(records) if not isinstance(records, str) else records)
    if images:
        for rec in records:
            path = root / "imgs" / rec[path_field]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 16), (200, 10, 10)).save(path)
    return root


# ----------------------------------------------------------------------------- parsing


def test_cuhk_splits_remapping_and_paths(tmp_path):
    root = write_dataset(tmp_path / "CUHK-PEDES", CUHK_RECORDS)
    ds = load_dataset("cuhk-pedes", root)
    assert isinstance(ds, PersonSearchDataset)
    assert ds.name == "cuhk-pedes" and ds.annotation_file == root.resolve() / "reid_raw.json"
    assert [r.pid for r in ds.train] == [1, 0, 1, 2]
    assert [r.raw_pid for r in ds.train] == [7, 3, 7, 12]
    assert ds.num_train_ids == 3
    assert [r.pid for r in ds.val] == [501]
    assert [r.pid for r in ds.test] == [900, 900, 901]  # val/test keep the raw ids
    for split in ("train", "val", "test"):
        assert [r.image_id for r in ds.split(split)] == list(range(len(ds.split(split))))
    first = ds.train[0]
    assert Path(first.image_path).is_absolute()
    assert first.image_path == str(root.resolve() / "imgs" / "CUHK01" / "0007001.png")
    assert first.captions == ["The man wears a red shirt.", "A man in red."]
    assert ds.statistics() == {
        "train": {"ids": 3, "images": 4, "captions": 9},
        "val": {"ids": 1, "images": 1, "captions": 2},
        "test": {"ids": 2, "images": 3, "captions": 6},
    }
    with pytest.raises(TBPSError, match="unknown split"):
        ds.split("validation")


def test_remapping_is_independent_of_file_order(tmp_path):
    a = load_dataset("cuhk-pedes", write_dataset(tmp_path / "a", CUHK_RECORDS))
    b = load_dataset("cuhk-pedes", write_dataset(tmp_path / "b", CUHK_RECORDS[::-1]))
    mapping_a = {r.raw_pid: r.pid for r in a.train}
    mapping_b = {r.raw_pid: r.pid for r in b.train}
    assert mapping_a == mapping_b == {3: 0, 7: 1, 12: 2}


@pytest.mark.parametrize("filename", ["ICFG_PEDES.json", "ICFG-PEDES.json"])
def test_icfg_both_file_names_and_no_val(tmp_path, filename):
    records = [
        _record(10, "train", "train/0010/0010_001.jpg", ("One caption only.",)),
        _record(11, "train", "train/0011/0011_001.jpg", ("Another caption.",)),
        _record(4000, "test", "test/4000/4000_001.jpg", ("A test caption.",)),
    ]
    root = write_dataset(tmp_path / "ICFG", records, name=filename)
    ds = load_dataset("icfg-pedes", root)
    assert ds.annotation_file.name == filename
    stats = ds.statistics()
    assert stats["val"] == {"ids": 0, "images": 0, "captions": 0}
    assert stats["train"] == {"ids": 2, "images": 2, "captions": 2}
    assert ds.train[0].image_path.endswith("imgs/train/0010/0010_001.jpg")


def test_icfg_without_annotation_names_both_files(tmp_path):
    (tmp_path / "ICFG").mkdir()
    with pytest.raises(TBPSError, match="ICFG_PEDES.json or ICFG-PEDES.json"):
        load_dataset("icfg-pedes", tmp_path / "ICFG")


def test_rstpreid_img_path(tmp_path):
    records = [
        _record(0, "train", "0000_c14_0031.jpg", ("a", "b"), path_field="img_path", tokens=False),
        _record(1, "val", "0001_c1_0001.jpg", ("c", "d"), path_field="img_path", tokens=False),
        _record(4, "test", "0004_c1_0001.jpg", ("i", "j"), path_field="img_path", tokens=False),
    ]
    root = write_dataset(tmp_path / "RSTPReid", records, name="data_captions.json")
    ds = load_dataset("rstpreid", root)
    assert [r.raw_pid for r in ds.val] == [1]
    assert [r.raw_pid for r in ds.test] == [4]
    assert ds.train[0].image_path.endswith("imgs/0000_c14_0031.jpg")


@pytest.mark.parametrize("split", ["dev", "Test", "validation", "train "])
def test_an_unknown_split_value_names_the_record(tmp_path, split):
    records = [*CUHK_RECORDS[:2], _record(7, split, "train_query/p7.png"), *CUHK_RECORDS[2:]]
    root = write_dataset(tmp_path / "CUHK-PEDES", records)
    with pytest.raises(TBPSError, match=f"record 2: unknown split {split!r}"):
        load_dataset("cuhk-pedes", root)


def test_duplicate_image_paths(tmp_path, caplog):
    train_twice = [*CUHK_RECORDS, _record(CUHK_RECORDS[0]["id"], "train", CUHK_RECORDS[0]["file_path"])]
    with caplog.at_level("WARNING"):
        ds = load_dataset("cuhk-pedes", write_dataset(tmp_path / "a", train_twice))
    assert len(ds.train) == sum(r["split"] == "train" for r in train_twice)
    assert "1 train records repeat an image path" in caplog.text
    test_rec = next(i for i, r in enumerate(CUHK_RECORDS) if r["split"] == "test")
    test_twice = [*CUHK_RECORDS, dict(CUHK_RECORDS[test_rec])]
    with pytest.raises(TBPSError, match=f"record {len(CUHK_RECORDS)}: image .* is already test record {test_rec}"):
        load_dataset("cuhk-pedes", write_dataset(tmp_path / "b", test_twice))


def test_synth_name_reads_the_cuhk_layout(tmp_path):
    root = write_dataset(tmp_path / "synth", CUHK_RECORDS)
    assert load_dataset("synth", root).statistics() == load_dataset("cuhk-pedes", root).statistics()
    assert load_dataset("SYNTH", root).name == "synth"


def test_register_dataset_for_user_data(tmp_path):
    class MyPeople(JsonAnnotationDataset):
        annotation_names = ("people.json",)
        path_field = "image"
        image_dir = "photos"

    register_dataset("my-people-test", MyPeople)
    try:
        records = [_record(5, "train", "a.jpg", path_field="image"), _record(6, "test", "b.jpg", path_field="image")]
        root = write_dataset(tmp_path / "mine", records, name="people.json")
        ds = load_dataset("my-people-test", root)
        assert ds.train[0].image_path.endswith("photos/a.jpg")
        assert "my-people-test" in DATASETS.names()
        assert ds.name == MyPeople.name == "my-people-test"  # one name: the registered one
    finally:
        DATASETS._items.pop("my-people-test", None)


def test_unknown_dataset_and_missing_root(tmp_path):
    with pytest.raises(TBPSError, match="unknown dataset 'nope'.*cuhk-pedes"):
        load_dataset("nope", tmp_path)
    with pytest.raises(TBPSError, match="dataset folder not found"):
        load_dataset("cuhk-pedes", tmp_path / "missing")
    with pytest.raises(TBPSError, match=r"no reid_raw.json"):
        load_dataset("cuhk-pedes", tmp_path)


# ----------------------------------------------------------------------------- malformed annotations

GOOD = _record(1, "train", "a.png")
TEST = _record(2, "test", "b.png")


@pytest.mark.parametrize("bad, expected", [
    ("not a record", "expected a JSON object, found a JSON string"),
    ({k: v for k, v in GOOD.items() if k != "id"}, "missing 'id'"),
    ({k: v for k, v in GOOD.items() if k != "captions"}, "missing 'captions'"),
    ({k: v for k, v in GOOD.items() if k != "file_path"}, "missing 'file_path'"),
    ({k: v for k, v in GOOD.items() if k != "split"}, "missing 'split'"),
    ({**GOOD, "id": "1"}, "'id' must be an integer"),
    ({**GOOD, "id": True}, "'id' must be an integer"),
    ({**GOOD, "split": 0}, "'split' must be a string"),
    ({**GOOD, "file_path": ""}, "'file_path' must be a non-empty string"),
    ({**GOOD, "captions": "a man"}, "'captions' must be a non-empty list of strings"),
    ({**GOOD, "captions": []}, "found an empty list"),
    ({**GOOD, "captions": ["fine", 3]}, "caption 1 is not a string"),
    ({**GOOD, "captions": ["fine", "   "]}, "caption 1 is empty"),
])
def test_malformed_record_names_file_and_index(tmp_path, bad, expected):
    root = write_dataset(tmp_path / "d", [GOOD, TEST, bad])
    with pytest.raises(TBPSError) as info:
        load_dataset("cuhk-pedes", root)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(root.resolve() / "reid_raw.json") + ": record 2: ")
    assert expected in message


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON (line 1 column 2"),
    ('{"records": []}', "expected a JSON list of records, found a JSON object"),
    ("[]", "the test split is empty"),
    (json.dumps([GOOD]), "the test split is empty"),
])
def test_malformed_file_names_file(tmp_path, content, expected):
    root = write_dataset(tmp_path / "d", content)
    with pytest.raises(TBPSError) as info:
        load_dataset("cuhk-pedes", root)
    assert str(info.value).startswith(str(root.resolve() / "reid_raw.json") + ": ")
    assert expected in str(info.value)


def test_annotation_not_utf8(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "reid_raw.json").write_bytes(b"\xff\xfe\x00[")
    with pytest.raises(TBPSError, match="reid_raw.json: not valid JSON"):
        load_dataset("cuhk-pedes", root)


# ----------------------------------------------------------------------------- image check


def _broken_dataset(tmp_path: Path) -> tuple[Path, Path, Path]:
    root = write_dataset(tmp_path / "CUHK", CUHK_RECORDS, images=True)
    missing = root / "imgs" / "CUHK03" / "3_1.png"
    missing.unlink()
    corrupt = root / "imgs" / "test_query" / "p900_s2.png"
    corrupt.write_bytes(corrupt.read_bytes()[:40])  # truncated PNG
    return root, missing, corrupt


def test_check_images_decode_finds_missing_and_corrupt(tmp_path):
    root, missing, corrupt = _broken_dataset(tmp_path)
    report = check_images(load_dataset("cuhk-pedes", root), decode=True, progress=False)
    assert report.total == len(CUHK_RECORDS)
    assert report.missing == [str(missing.resolve())]
    assert report.corrupt == [str(corrupt.resolve())]
    assert not report.ok
    text = report.summary(limit=5)
    assert "2 of 8 images" in text and "1 missing, 1 corrupt" in text
    assert str(missing.resolve()) in text and str(corrupt.resolve()) in text


def test_check_images_exists_only_and_splits(tmp_path):
    root, missing, _ = _broken_dataset(tmp_path)
    ds = load_dataset("cuhk-pedes", root)
    fast = check_images(ds, decode=False, progress=False)
    assert fast.missing == [str(missing.resolve())] and fast.corrupt == []
    only_test = check_images(ds, decode=False, splits=("test",), progress=False)
    assert only_test.ok and only_test.total == 3
    assert "all 3 images" in only_test.summary()


def test_check_summary_limit(tmp_path):
    root = write_dataset(tmp_path / "CUHK", CUHK_RECORDS)  # no images at all
    report = check_images(load_dataset("cuhk-pedes", root), decode=True, progress=False)
    assert len(report.missing) == 8
    text = report.summary(limit=2)
    assert text.count("missing: ") == 2 and "... and 6 more missing" in text


# ----------------------------------------------------------------------------- CLI


def test_cli_data_stats_json(tmp_path, capsys):
    root = write_dataset(tmp_path / "CUHK", CUHK_RECORDS)
    assert main(["data", "stats", "--dataset", "cuhk-pedes", "--root", str(root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats == load_dataset("cuhk-pedes", root).statistics()
    assert main(["data", "stats", "--dataset", "cuhk-pedes", "--root", str(root)]) == 0
    table = capsys.readouterr().out
    assert "train" in table and "val" in table and "test" in table


def test_cli_data_stats_bad_annotation_is_one_line(tmp_path, capsys):
    root = write_dataset(tmp_path / "CUHK", [GOOD, TEST, {**GOOD, "captions": [""]}])
    assert main(["data", "stats", "--dataset", "cuhk-pedes", "--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("tbps: error: ") and "reid_raw.json: record 2: caption 0 is empty" in err
    assert "\n" not in err


def test_cli_data_check_exit_code_and_listing(tmp_path, capsys):
    root, missing, corrupt = _broken_dataset(tmp_path)
    assert main(["data", "check", "--dataset", "cuhk-pedes", "--root", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert str(missing.resolve()) in out and str(corrupt.resolve()) in out
    assert main(["data", "check", "--dataset", "cuhk-pedes", "--root", str(root), "--quiet",
                 "--exists-only"]) == 1
    out = capsys.readouterr().out
    assert str(missing.resolve()) in out and str(corrupt.resolve()) not in out
    good = write_dataset(tmp_path / "good", CUHK_RECORDS, images=True)
    assert main(["data", "check", "--dataset", "cuhk-pedes", "--root", str(good), "--quiet"]) == 0
