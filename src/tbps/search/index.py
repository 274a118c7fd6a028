"""The persistent gallery index: embed a folder or list of images once, search it many times.

An index is a folder::

    manifest.json                  format, model fingerprint, checkpoint, config, feature shapes, shards,
                                   image_root (the gallery folder)
    shards/shard-000000.paths.json image paths of the shard's rows, in row order: relative to
                                   image_root when inside it (absolute otherwise)
    shards/shard-000000.<key>.npy  (rows, ...) for every tensor ``embed_images`` returns (float32;
                                   a bool or integer tensor keeps its type)
    ann.faiss, ann.json            the FAISS first stage, when one is used (see ``tbps.search.ann``)

Images are embedded in shards of ``shard_size`` rows. Each shard's files are written atomically
(temp + rename, ``tbps.io``) and only then is the shard added to the manifest (also atomically), so a
killed run leaves a consistent index and the next run embeds only what no completed shard holds.
The same mechanism appends: images already in the index are never embedded again. Shards are
immutable and opened with ``np.load(mmap_mode="r")`` (as clip-retrieval does), so a gallery larger
than memory can be searched.

Paths inside the gallery folder are stored relative to it, so a gallery that moves (another disk,
another machine) is searched with ``image_root`` pointed at its new place (``tbps search/serve
--image-root``) instead of being indexed again.

The index records the model's fingerprint: a SHA-256 of every weight (names, shapes, dtypes, bytes)
and of the preprocessing that shapes the embeddings (image size, tokenizer, text length). It is
computed from the weights, not the checkpoint path, so a retrained ``best.pt`` at the same path is
refused, and a copied checkpoint is accepted.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from tbps import __version__
from tbps.data.images import IMAGE_EXTENSIONS, ImagePathDataset, collate_images
from tbps.errors import TBPSError
from tbps.inference import Embedder
from tbps.io import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

FORMAT = "tbps-index"
FORMAT_VERSION = 2  # 2: paths relative to the manifest's image_root
MANIFEST = "manifest.json"
SHARDS = "shards"
DEFAULT_SHARD_SIZE = 2048


# ----------------------------------------------------------------------------- gallery listing

def list_images(images: str | os.PathLike) -> list[str]:
    """Absolute paths of a gallery: a folder (recursive, image extensions, sorted) or a list file.

    A list file has one path per line; blank lines and lines starting with ``#`` are ignored and
    relative paths are resolved against the list's folder. Duplicates keep their first position.
    Listed files that are missing are kept here and skipped (with a warning) when decoded.
    """
    source = Path(images).expanduser()
    if source.is_dir():
        found = [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
        paths = sorted(str(p.resolve()) for p in found)
    elif source.is_file():
        if source.suffix.lower() in IMAGE_EXTENSIONS:
            raise TBPSError(f"{source}: an image, not a folder or a list of image paths")
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise TBPSError(f"{source}: not a text file listing image paths (one per line)") from None
        base = source.resolve().parent
        paths = []
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line).expanduser()
                paths.append(str((path if path.is_absolute() else base / path).resolve()))
    else:
        raise TBPSError(f"{source}: no such folder or image list")
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise TBPSError(f"{source}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return paths


# ----------------------------------------------------------------------------- fingerprint

def model_fingerprint(model: torch.nn.Module, cfg: Any) -> str:
    """SHA-256 over every weight and the preprocessing: two models share it only if they embed alike.

    ``clip-legacy`` enters as ``clip``, the name tbps wrote for that layout before ``<|mask|>`` took
    id 49405, so indexes built then still match their checkpoints; the 49,409-row token table in the
    weights already tells the two layouts apart.
    """
    from tbps.data.tokenizers import CLIP_LEGACY_NAME

    digest = hashlib.sha256()
    tokenizer = str(cfg.data.tokenizer)
    preprocessing = {"method": cfg.model.name, "image_size": [int(v) for v in cfg.data.image_size],
                     "tokenizer": "clip" if tokenizer == CLIP_LEGACY_NAME else tokenizer,
                     "text_length": int(cfg.data.text_length)}
    digest.update(json.dumps(preprocessing, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading

def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``index_dir``; a one-line error when it is not a tbps index."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise TBPSError(f"{index_dir}: not a tbps index (no {MANIFEST}; build one with tbps index)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TBPSError(f"{path}: unreadable index manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TBPSError(f"{path}: not a tbps index manifest")
    if int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise TBPSError(f"{path}: index format {manifest.get('version')} is newer than this tbps reads "
                        f"({FORMAT_VERSION}); upgrade tbps")
    return manifest


def gallery_root(images: str | os.PathLike, listed: Sequence[str]) -> str:
    """The folder an index stores its paths relative to: the gallery folder itself, or for a list
    file the deepest folder holding every listed image."""
    images = Path(images)
    if images.is_dir():
        return str(images.resolve())
    return os.path.commonpath([os.path.dirname(p) for p in listed])


def relative_to_root(path: str, root: str) -> str:
    """``path`` relative to ``root`` when it lies inside it, else unchanged (absolute)."""
    relative = os.path.relpath(path, root)
    return path if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


class GalleryIndex:
    """Read side of an index folder: paths, per-shard memory-mapped features, rows by gallery index.

    ``paths`` are absolute: the stored relative ones joined to ``image_root``, which is the gallery
    folder recorded at indexing time unless ``image_root`` is given (the gallery has moved).
    Needs no model; ``Searcher`` adds the model and the two search stages.
    """

    def __init__(self, index_dir: str | os.PathLike, image_root: str | os.PathLike | None = None) -> None:
        self.root = Path(index_dir)
        self.manifest = read_manifest(self.root)
        recorded = self.manifest.get("image_root")  # absent in version 1: every stored path is absolute
        if image_root is not None and not Path(image_root).is_dir():
            raise TBPSError(f"{image_root}: image root is not a folder")
        self.image_root = Path(image_root).resolve() if image_root is not None else Path(recorded or os.sep)
        self.fingerprint: str = self.manifest["fingerprint"]
        self.feature_shapes: dict[str, list[int]] = {k: list(v["shape"]) for k, v in self.manifest["features"].items()}
        self.feature_dtypes: dict[str, np.dtype] = {k: np.dtype(v.get("dtype", "float32"))
                                                    for k, v in self.manifest["features"].items()}
        self.paths: list[str] = []
        self.metadata: list[dict[str, Any] | None] = []  # footage rows: camera, time, box, frame, track
        self._blocks: dict[str, list[np.ndarray]] = {key: [] for key in self.feature_shapes}
        for shard in self.manifest["shards"]:
            rows = int(shard["rows"])
            shard_paths = json.loads((self.root / SHARDS / f"{shard['name']}.paths.json").read_text(encoding="utf-8"))
            if len(shard_paths) != rows:
                raise TBPSError(f"{self.root}: shard {shard['name']} lists {len(shard_paths)} paths for {rows} rows")
            self.paths.extend(str(self.image_root / p) for p in shard_paths)
            meta_path = self.root / SHARDS / f"{shard['name']}.meta.json"
            self.metadata.extend(json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file()
                                 else [None] * rows)
            for key, shape in self.feature_shapes.items():
                array = np.load(self.root / SHARDS / f"{shard['name']}.{key}.npy", mmap_mode="r")
                if list(array.shape) != [rows, *shape]:
                    raise TBPSError(f"{self.root}: shard {shard['name']} feature {key!r} has shape "
                                    f"{list(array.shape)}, expected {[rows, *shape]}")
                self._blocks[key].append(array)
        self.size = len(self.paths)
        self._offsets = np.cumsum([0] + [len(b) for b in self._blocks.get("global", [])], dtype=np.int64)

    @property
    def feature_keys(self) -> list[str]:
        return list(self.feature_shapes)

    def blocks(self, key: str = "global") -> list[np.ndarray]:
        """The memory-mapped ``(rows, ...)`` arrays of feature ``key``, one per shard, in row order."""
        return self._blocks[key]

    def matrix(self, key: str = "global") -> np.ndarray:
        """Feature ``key`` of the whole gallery in memory (for building a FAISS index)."""
        blocks = self._blocks[key]
        if not blocks:
            return np.zeros((0, *self.feature_shapes[key]), dtype=self.feature_dtypes[key])
        return np.ascontiguousarray(np.concatenate(blocks, axis=0))

    def gather(self, key: str, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Feature ``key`` of the given gallery rows, in the given order (reads only those rows)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.feature_shapes[key]), dtype=self.feature_dtypes[key])
        if len(rows) and (rows.min() < 0 or rows.max() >= self.size):
            raise IndexError(f"gallery rows out of range 0..{self.size - 1}")
        shard_of = np.searchsorted(self._offsets, rows, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            out[where] = self._blocks[key][shard][rows[where] - self._offsets[shard]]
        return out


# ----------------------------------------------------------------------------- writing

def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")


def _write_shard(root: Path, name: str, paths: list[str], features: dict[str, np.ndarray]) -> None:
    """Every file of one shard, each atomically; the manifest is updated only after this returns."""
    for key, array in features.items():
        _save_npy_atomic(root / SHARDS / f"{name}.{key}.npy", array)
    _write_json_atomic(root / SHARDS / f"{name}.paths.json", paths)


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_index(checkpoint: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                batch_size: int = 64, device: str = "auto", num_workers: int | None = None,
                progress: bool = True, backend: str = "auto", shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
    """Embed the gallery ``images`` (folder or list file) into the index folder ``out``.

    Creates ``out``, or appends to it when it holds an index of the same model (refused, one line,
    when the fingerprint differs). Images already indexed are not embedded again, which is also how
    a killed run resumes after its last complete shard. Unreadable files are skipped with a warning.
    ``backend`` (auto | exact | faiss-hnsw | faiss-ivf) is saved in the index; a FAISS first stage is
    built here when it resolves to one. Returns ``{"added", "skipped", "already_indexed", "total",
    "skipped_paths", "backend"}``.
    """
    from tbps.search.ann import BACKENDS

    if batch_size < 1:
        raise TBPSError(f"batch size must be at least 1, got {batch_size}")
    if shard_size < 1:
        raise TBPSError(f"shard size must be at least 1, got {shard_size}")
    if backend not in BACKENDS:
        raise TBPSError(f"backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise TBPSError(f"{root}: exists and is not a folder")
    existing = (root / MANIFEST).is_file()
    if root.is_dir() and not existing and any(not p.name.startswith(".") for p in root.iterdir()):
        raise TBPSError(f"{root}: folder is not empty and holds no tbps index (choose a new --out)")
    listed = list_images(images)
    if not Path(checkpoint).is_file():  # before the index folder is created
        raise TBPSError(f"{checkpoint}: checkpoint not found")
    with _writer_lock(root):
        return _build_locked(checkpoint, listed, gallery_root(images, listed), root, existing,
                             batch_size=batch_size, device=device, num_workers=num_workers, progress=progress,
                             backend=backend, shard_size=shard_size)


@contextlib.contextmanager
def _writer_lock(root: Path) -> Iterator[None]:
    """One writer per index folder: a second ``tbps index`` into it fails at once instead of
    interleaving shards; temporary files a killed writer left behind are removed."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TBPSError(f"{root}: another tbps index is writing to this index; wait for it to finish") from None
        for leftover in [*root.glob(".*.tmp"), *(root / SHARDS).glob(".*.tmp")]:
            leftover.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_locked(checkpoint: str | os.PathLike, listed: list[str], image_root: str, root: Path, existing: bool, *,
                  batch_size: int, device: str, num_workers: int | None, progress: bool, backend: str,
                  shard_size: int, metadata: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    from tbps.data.transforms import build_image_transform
    from tbps.engine.checkpoint import load_model_from_checkpoint
    from tbps.engine.distributed import resolve_device
    from tbps.search.ann import ensure_ann, resolve_backend

    dev = resolve_device(device)
    model, cfg, _ = load_model_from_checkpoint(checkpoint, dev)
    fingerprint = model_fingerprint(model, cfg)
    if existing:
        manifest = read_manifest(root)
        if manifest["fingerprint"] != fingerprint:
            raise TBPSError(f"{root}: built by another model (fingerprint {manifest['fingerprint'][:12]}, "
                            f"{checkpoint} has {fingerprint[:12]}); index into a new folder")
        if "image_root" not in manifest:  # format 1 stored absolute paths: they stay valid under "/"
            manifest.update(version=FORMAT_VERSION, image_root=os.sep)
        done = set(GalleryIndex(root).paths)
        manifest["checkpoint"] = str(Path(checkpoint).resolve())  # the same weights, maybe moved: search finds them
        if backend != "auto" or "backend" not in manifest:
            manifest["backend"] = backend
    else:
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint,
                    "model": cfg.model.name, "checkpoint": str(Path(checkpoint).resolve()),
                    "config": cfg.to_dict(), "image_root": image_root, "features": {}, "shards": [], "size": 0,
                    "backend": backend,
                    "created": _now(), "tbps_version": __version__}
        if metadata is not None:
            manifest["footage"] = True
        done = set()
        (root / SHARDS).mkdir(parents=True, exist_ok=True)
        _write_json_atomic(root / MANIFEST, manifest)
    todo = [path for path in listed if path not in done]

    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    transform = build_image_transform(cfg.data.image_size, train=False)
    skipped: list[str] = []
    added = 0
    bar = tqdm(total=len(todo), desc="indexing images", unit="img", disable=not progress)
    model.eval()
    embedder = Embedder(model, device=dev, batch_size=batch_size)
    # one DataLoader per shard keeps every shard's rows in one place and the loop resumable
    for shard_paths in _chunks(todo, shard_size):
        loader = DataLoader(ImagePathDataset(shard_paths, transform), batch_size=batch_size, shuffle=False,
                            num_workers=workers, collate_fn=collate_images, pin_memory=dev.type == "cuda")
        kept: list[str] = []
        outputs: dict[str, list[np.ndarray]] = {}
        for positions, batch, bad in loader:
            for position, error in bad:
                log.warning("skipped unreadable image: %s", error)
                skipped.append(shard_paths[position])
            if batch is not None:
                feats = embedder.image_batch(batch)  # float features as float32; masks and ids keep their type
                for key, value in feats.items():
                    outputs.setdefault(key, []).append(value.cpu().numpy())
                kept.extend(shard_paths[p] for p in positions)
            bar.update(len(positions) + len(bad))
        if not kept:
            continue
        features = {key: np.ascontiguousarray(np.concatenate(parts)) for key, parts in outputs.items()}
        shapes = {key: {"shape": list(array.shape[1:]), "dtype": str(array.dtype)} for key, array in features.items()}
        if manifest["features"] and manifest["features"] != shapes:
            raise TBPSError(f"{root}: the model returned features {shapes}, the index holds {manifest['features']}")
        name = f"shard-{len(manifest['shards']):06d}"
        if metadata is not None:  # footage: camera, time, box, frame, track of each row
            _write_json_atomic(root / SHARDS / f"{name}.meta.json", [metadata[p] for p in kept])
        _write_shard(root, name, [relative_to_root(p, manifest["image_root"]) for p in kept], features)
        manifest["features"] = shapes
        manifest["shards"].append({"name": name, "rows": len(kept)})
        manifest["size"] = int(manifest["size"]) + len(kept)
        manifest["updated"] = _now()
        _write_json_atomic(root / MANIFEST, manifest)
        added += len(kept)
    bar.close()
    if skipped:
        log.warning("%d unreadable image(s) skipped (first: %s)", len(skipped), skipped[0])
    _write_json_atomic(root / MANIFEST, manifest)  # the backend choice, also when nothing was added
    total = int(manifest["size"])
    resolved = resolve_backend(manifest["backend"], total)
    if resolved != "exact" and total:
        ensure_ann(GalleryIndex(root), resolved, progress=progress)
    return {"added": added, "skipped": len(skipped), "already_indexed": len(listed) - len(todo), "total": total,
            "skipped_paths": skipped, "backend": resolved}
