"""Annotation parsers for the text-based person search benchmarks, and an image check.

CUHK-PEDES, ICFG-PEDES and RSTPReid all ship one JSON list of records, one record per image, with
``id``, ``captions``, ``split`` and an image path relative to ``imgs/``. One parser handles all
three; each dataset only names its annotation file(s) and path field. A record's ``split`` must be
exactly "train", "val" or "test" (the IRRA reference code counts any other string, "dev" or "Test",
as val without a word; here it is an error naming the record). An image listed twice in the test
split is an error (it would count twice in the metrics); elsewhere a warning with the count. Train person ids are remapped to 0..N-1 for the identity classifier; val/test ids are kept,
because evaluation only compares them for equality.

Every problem a user can fix (a missing or malformed file, a bad record) is a one-line
:class:`~tbps.errors.TBPSError` naming the file and the record index.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tbps.errors import TBPSError
from tbps.registry import Registry

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)

DATASETS: Registry = Registry("dataset")


@dataclass
class ImageRecord:
    """One annotated image: what the loaders, the evaluator and the demo consume."""

    pid: int  # train: remapped 0..N-1; val/test: the original id (only compared for equality)
    image_path: str  # absolute path of the image file
    captions: list[str]
    image_id: int  # index of this record within its split (0..len(split)-1)
    raw_pid: int  # the id as written in the annotation file


class PersonSearchDataset:
    """The three splits of a dataset, already validated and with train ids remapped."""

    def __init__(self, name: str, root: str | Path, annotation_file: str | Path,
                 train: list[ImageRecord], val: list[ImageRecord], test: list[ImageRecord]) -> None:
        self.name = name
        self.root = Path(root)
        self.annotation_file = Path(annotation_file)
        self.train = train
        self.val = val
        self.test = test
        self.num_train_ids = len({r.pid for r in train})

    def split(self, name: str) -> list[ImageRecord]:
        """The records of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise TBPSError(f"unknown split {name!r} (use train, val or test)")
        return getattr(self, name)

    def statistics(self) -> dict:
        """Identities, images and captions per split; val is present (zeros) when there is none."""
        return {
            split: {
                "ids": len({r.pid for r in records}),
                "images": len(records),
                "captions": sum(len(r.captions) for r in records),
            }
            for split, records in ((s, self.split(s)) for s in SPLITS)
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self.split(s))}" for s in SPLITS)
        return f"PersonSearchDataset({self.name!r}, root={str(self.root)!r}, {sizes})"


# ----------------------------------------------------------------------------- parsing

def _read_annotation_list(path: Path) -> list:
    """The JSON list in ``path``, or a one-line error saying why it is not one."""
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise TBPSError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise TBPSError(f"{path}: is a folder, expected the JSON annotation file") from None
    except json.JSONDecodeError as exc:
        raise TBPSError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise TBPSError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason})") from None
    if not isinstance(data, list):
        raise TBPSError(f"{path}: expected a JSON list of records, found a JSON {_json_type(data)}")
    return data


def _json_type(value: object) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _record_problem(rec: object, path_field: str) -> str:
    """Why a record is malformed (the slow, precise path, taken only once a record fails)."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, found a JSON {_json_type(rec)}"
    for key in ("id", "captions", path_field, "split"):
        if key not in rec:
            return f"missing {key!r}"
    raw_pid, captions, rel_path, split = rec["id"], rec["captions"], rec[path_field], rec["split"]
    if type(raw_pid) is not int:
        return f"'id' must be an integer, found {raw_pid!r}"
    if not isinstance(split, str):
        return f"'split' must be a string, found {split!r}"
    if not isinstance(rel_path, str) or not rel_path.strip():
        return f"{path_field!r} must be a non-empty string, found {rel_path!r}"
    if not isinstance(captions, list) or not captions:
        what = "an empty list" if isinstance(captions, list) else repr(captions)
        return f"'captions' must be a non-empty list of strings, found {what}"
    for c_index, caption in enumerate(captions):
        if not isinstance(caption, str):
            return f"caption {c_index} is not a string ({caption!r})"
        if not caption.strip():
            return f"caption {c_index} is empty"
    return "malformed record"


def parse_records(records: list, annotation_file: Path, image_dir: Path, path_field: str
                  ) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """Validate the raw records and build (train, val, test) with train ids remapped 0..N-1.

    One tight loop with a cheap validity test per record, because CUHK-PEDES has 40k records and
    the CLI parses it on every call; a failing record is then diagnosed precisely.
    """
    entries: list[tuple[str, int, str, list[str]]] = []  # (split, raw id, absolute path, captions)
    prefix = str(image_dir) + os.sep
    for index, rec in enumerate(records):
        try:
            raw_pid, captions, rel_path, split = rec["id"], rec["captions"], rec[path_field], rec["split"]
            valid = (type(raw_pid) is int and type(split) is str and type(rel_path) is str
                     and type(captions) is list and bool(captions) and bool(rel_path.strip())
                     and all(type(c) is str and c.strip() for c in captions))
        except (KeyError, TypeError):
            valid = False
        if not valid:
            raise TBPSError(f"{annotation_file}: record {index}: {_record_problem(rec, path_field)}")
        if split not in SPLITS:
            raise TBPSError(f"{annotation_file}: record {index}: unknown split {split!r} (use train, val or test)")
        path = rel_path if os.path.isabs(rel_path) else prefix + rel_path
        entries.append((split, raw_pid, path, captions))
    _check_duplicate_paths(entries, annotation_file)

    train_ids = sorted({raw for split, raw, _, _ in entries if split == "train"})
    remap = {raw: new for new, raw in enumerate(train_ids)}
    splits: dict[str, list[ImageRecord]] = {"train": [], "val": [], "test": []}
    for split, raw_pid, path, captions in entries:
        key = split
        target = splits[key]
        pid = remap[raw_pid] if key == "train" else raw_pid
        target.append(ImageRecord(pid, path, list(captions), len(target), raw_pid))
    if not splits["test"]:
        raise TBPSError(f"{annotation_file}: the test split is empty (no record has \"split\": \"test\")")
    return splits["train"], splits["val"], splits["test"]


def _check_duplicate_paths(entries: list[tuple[str, int, str, list[str]]], annotation_file: Path) -> None:
    """The same image twice in the test split is an error (it counts twice in R@K and mAP); in
    train or val, a warning with the count (its captions are merely weighted twice)."""
    first: dict[tuple[str, str], int] = {}
    repeats: dict[str, int] = {}
    for index, (split, _, path, _) in enumerate(entries):
        seen = first.setdefault((split, path), index)
        if seen == index:
            continue
        if split == "test":
            raise TBPSError(f"{annotation_file}: record {index}: image {path} is already test record {seen}; "
                            "merge their captions into one record")
        repeats[split] = repeats.get(split, 0) + 1
    for split, count in repeats.items():
        log.warning("%s: %d %s records repeat an image path listed earlier in the split", annotation_file,
                    count, split)


@contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class JsonAnnotationDataset(PersonSearchDataset):
    """A dataset in the CUHK-PEDES family layout: ``root/<annotation>.json`` and ``root/imgs/``.

    Subclass it, set the class attributes and register it (``@DATASETS.register("my-people")`` or
    :func:`register_dataset`) to add another dataset in the same layout; the registry sets ``name``.
    """

    name: str = "json"  # replaced by the registered name
    annotation_names: tuple[str, ...] = ("reid_raw.json",)  # first one found wins
    path_field: str = "file_path"
    image_dir: str = "imgs"

    def __init__(self, root: str | Path) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            raise TBPSError(f"{root}: dataset folder not found")
        if not root.is_dir():
            raise TBPSError(f"{root}: not a folder (--root must be the folder holding the annotation file and imgs/)")
        annotation = self.find_annotation(root)
        root = root.resolve()
        annotation = root / annotation.name
        with _gc_paused():  # 80k records x several objects: the cyclic GC would rescan them repeatedly
            records = _read_annotation_list(annotation)
            train, val, test = parse_records(records, annotation, root / self.image_dir, self.path_field)
        super().__init__(self.name, root, annotation, train, val, test)

    @classmethod
    def find_annotation(cls, root: Path) -> Path:
        for name in cls.annotation_names:
            if (root / name).is_file():
                return root / name
        names = " or ".join(cls.annotation_names)
        raise TBPSError(f"{root}: no {names} here (--root must be the {cls.name} folder "
                        f"holding the annotation file and {cls.image_dir}/)")


@DATASETS.register("cuhk-pedes")
class CUHKPEDES(JsonAnnotationDataset):
    """CUHK-PEDES: ``reid_raw.json``, ``file_path`` (e.g. ``CUHK01/0363004.png``), two captions per image.

    Without ``reid_raw.json``, TextReID's layout is read instead (``annotations/{train,val,test}.json``,
    one record per caption; see :func:`parse_textreid_layout`).
    """

    annotation_names = ("reid_raw.json",)
    path_field = "file_path"

    def __init__(self, root: str | Path) -> None:
        folder = Path(root).expanduser()
        if (folder.is_dir() and not any((folder / name).is_file() for name in self.annotation_names)
                and (folder / TEXTREID_ANNOTATIONS).is_dir()):
            folder = folder.resolve()
            with _gc_paused():
                train, val, test = parse_textreid_layout(folder, self.image_dir)
            PersonSearchDataset.__init__(self, self.name, folder, folder / TEXTREID_ANNOTATIONS,
                                         train, val, test)
            return
        super().__init__(root)


# ----------------------------------------------------------------------------- TextReID's layout

TEXTREID_ANNOTATIONS = "annotations"
_TEXTREID_FIELDS = ("file_path", "sentence", "id", "image_id")


def _textreid_record_problem(rec: object) -> str | None:
    """Why a TextReID caption record is malformed, or None."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, found a JSON {_json_type(rec)}"
    for key in _TEXTREID_FIELDS:
        if key not in rec:
            return f"missing {key!r}"
    if type(rec["id"]) is not int:
        return f"'id' must be an integer, found {rec['id']!r}"
    if type(rec["image_id"]) is not int:
        return f"'image_id' must be an integer, found {rec['image_id']!r}"
    if not isinstance(rec["file_path"], str) or not rec["file_path"].strip():
        return f"'file_path' must be a non-empty string, found {rec['file_path']!r}"
    if not isinstance(rec["sentence"], str) or not rec["sentence"].strip():
        return f"'sentence' must be a non-empty string, found {rec['sentence']!r}"
    onehot = rec.get("onehot", [])
    if not isinstance(onehot, list) or not all(type(t) is int for t in onehot):
        return "'onehot' must be a list of integers"
    return None


def _read_textreid_split(path: Path) -> list:
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise TBPSError(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise TBPSError(f"{path}: not valid JSON (not UTF-8 text: {exc.reason})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        found = (f"a JSON {_json_type(data)}" if not isinstance(data, dict)
                 else "an object without an 'annotations' list")
        raise TBPSError(f"{path}: expected {{\"annotations\": [...]}} (TextReID's layout), found {found}")
    return data["annotations"]


def parse_textreid_layout(root: Path, image_dir: str = "imgs"
                          ) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """(train, val, test) from TextReID's CUHK-PEDES layout (BrandonHanx/TextReID
    ``lib/data/datasets/cuhkpedes.py``): ``annotations/{train,val,test}.json``, each
    ``{"annotations": [...]}`` with one record per caption (``file_path``, ``sentence``, ``onehot``,
    ``id``, ``image_id``), images under ``imgs/``.

    Captions are grouped by image (``file_path``), in order of first appearance; one image with two
    person ids is an error. ``onehot`` (their pre-tokenised ids) is checked but not used: tbps
    tokenises ``sentence`` itself. Train ids are remapped to 0..N-1 as for the other formats.
    """
    folder = root / TEXTREID_ANNOTATIONS
    splits: dict[str, list[ImageRecord]] = {}
    prefix = str(root / image_dir) + os.sep
    for split in SPLITS:
        path = folder / f"{split}.json"
        if not path.is_file():
            if split == "test":
                raise TBPSError(f"{folder}: no test.json here (TextReID's layout needs annotations/test.json)")
            splits[split] = []
            continue
        images: dict[str, tuple[int, list[str]]] = {}
        for index, rec in enumerate(_read_textreid_split(path)):
            problem = _textreid_record_problem(rec)
            if problem:
                raise TBPSError(f"{path}: record {index}: {problem}")
            rel_path, raw_pid = rec["file_path"], rec["id"]
            entry = images.setdefault(rel_path, (raw_pid, []))
            if entry[0] != raw_pid:
                raise TBPSError(f"{path}: record {index}: image {rel_path!r} has id {raw_pid}, but an earlier "
                                f"record gives it id {entry[0]}")
            entry[1].append(rec["sentence"])
        if split == "train":
            remap = {raw: new for new, raw in enumerate(sorted({pid for pid, _ in images.values()}))}
        records: list[ImageRecord] = []
        for rel_path, (raw_pid, captions) in images.items():
            pid = remap[raw_pid] if split == "train" else raw_pid
            image_path = rel_path if os.path.isabs(rel_path) else prefix + rel_path
            records.append(ImageRecord(pid, image_path, captions, len(records), raw_pid))
        splits[split] = records
    if not splits["test"]:
        raise TBPSError(f"{folder / 'test.json'}: the test split is empty")
    return splits["train"], splits["val"], splits["test"]


@DATASETS.register("icfg-pedes")
class ICFGPEDES(JsonAnnotationDataset):
    """ICFG-PEDES: ``ICFG_PEDES.json`` (some copies say ``ICFG-PEDES.json``), no val split."""

    annotation_names = ("ICFG_PEDES.json", "ICFG-PEDES.json")
    path_field = "file_path"


@DATASETS.register("rstpreid")
class RSTPReid(JsonAnnotationDataset):
    """RSTPReid: ``data_captions.json`` with the image path in ``img_path``."""

    annotation_names = ("data_captions.json",)
    path_field = "img_path"


@DATASETS.register("synth")
class SynthPEDES(CUHKPEDES):
    """A folder written by ``tbps synth``: the CUHK-PEDES layout, read by the CUHK-PEDES parser."""


def register_dataset(name: str, cls: Callable[[Path], PersonSearchDataset]) -> None:
    """Make ``load_dataset(name, root)`` and ``--dataset name`` use ``cls(root)``.

    ``cls`` is any callable taking the root folder and returning a :class:`PersonSearchDataset`,
    typically a :class:`JsonAnnotationDataset` subclass with its own file name and path field.
    """
    DATASETS.register(name, cls)


def load_dataset(name: str, root: str | Path) -> PersonSearchDataset:
    """Parse the dataset registered as ``name`` from its folder ``root`` (annotation file + imgs/)."""
    dataset = DATASETS.get(name)(Path(root))
    if not isinstance(dataset, PersonSearchDataset):
        raise TBPSError(f"dataset {name!r}: its constructor returned {type(dataset).__name__}, "
                        "expected a PersonSearchDataset")
    return dataset


# ----------------------------------------------------------------------------- image check

@dataclass
class ImageCheckReport:
    """What ``check_images`` found: every path listed, so a user can fetch exactly what is missing."""

    total: int
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    decoded: bool = True
    root: str = ""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt

    def summary(self, limit: int = 10) -> str:
        """A count, then the first ``limit`` missing and corrupt paths."""
        checked = "present and decodable" if self.decoded else "present"
        where = f" under {self.root}" if self.root else ""
        if self.ok:
            return f"all {self.total:,} images{where} are {checked}"
        lines = [f"{len(self.missing) + len(self.corrupt):,} of {self.total:,} images{where} are not usable: "
                 f"{len(self.missing):,} missing, {len(self.corrupt):,} corrupt"]
        for label, paths in (("missing", self.missing), ("corrupt", self.corrupt)):
            if not paths:
                continue
            shown = paths[:max(0, limit)]
            lines.extend(f"  {label}: {p}" for p in shown)
            if len(paths) > len(shown):
                lines.append(f"  ... and {len(paths) - len(shown):,} more {label}")
        return "\n".join(lines)


def _image_status(path: str) -> str:
    """'ok', 'missing' or 'corrupt' after fully decoding the image (truncated files fail here)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return "ok"
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return "missing"
    except Exception:  # any decoder failure means the trainer would crash on this file
        return "corrupt"


def check_images(dataset: PersonSearchDataset, decode: bool = True, splits: Sequence[str] = SPLITS,
                 progress: bool = True) -> ImageCheckReport:
    """Verify every image of ``splits`` exists (and, with ``decode``, decodes) before training.

    CUHK-PEDES often arrives incomplete; finding that out here, with the paths, beats a crash
    mid-epoch. ``decode=False`` is the fast existence-only check the trainer runs by default.
    """
    paths: list[str] = list(dict.fromkeys(r.image_path for s in splits for r in dataset.split(s)))
    report = ImageCheckReport(total=len(paths), decoded=decode, root=str(dataset.root))
    if not decode:
        isfile = os.path.isfile
        report.missing = [p for p in _progress(paths, progress, "checking images") if not isfile(p)]
        return report
    workers = min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        statuses = list(_progress(pool.map(_image_status, paths, chunksize=64), progress,
                                  "decoding images", total=len(paths)))
    report.missing = [p for p, s in zip(paths, statuses) if s == "missing"]
    report.corrupt = [p for p, s in zip(paths, statuses) if s == "corrupt"]
    return report


def _progress(items: Iterable, enabled: bool, desc: str, total: int | None = None) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, total=total, unit="img", dynamic_ncols=True)
