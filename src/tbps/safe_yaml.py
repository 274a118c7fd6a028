"""Reading YAML files users hand to tbps: plain values only, bounded in size, depth and expansion.

One reader serves tbps recipes (:mod:`tbps.config`) and other projects' configs (IRRA's
``configs.yaml``, read by :mod:`tbps.importers`). ``yaml.SafeLoader`` never builds a Python object;
for other projects' files ``!!python/tuple`` is also read, as a list, because ``yaml.dump(vars(args))``
writes it for tuple-valued arguments. Kept free of PyTorch so that loading a config stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tbps.errors import TBPSError

#: Bounds on what a YAML file may expand to. YAML aliases share nodes, so a file of a few hundred
#: bytes can stand for 10^9 values (an "alias bomb") once anything copies or walks it; a config or
#: an IRRA ``configs.yaml`` holds a few hundred values, a few levels deep.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 32


class _TupleSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``!!python/tuple`` (as a list): ``yaml.dump(vars(args))``
    writes it for tuple defaults such as IRRA's ``img_size``; no other Python tag is accepted."""


_TupleSafeLoader.add_constructor(
    "tag:yaml.org,2002:python/tuple",
    lambda loader, node: loader.construct_sequence(node, deep=True),
)


def check_yaml_size(data: Any, where: str) -> None:
    """Refuse a value that expands to more than ``MAX_YAML_NODES`` values or nests deeper than
    ``MAX_YAML_DEPTH``. The walk follows shared (aliased) nodes each time they are reached, as a
    copy or merge would, so a bomb is cut after ``MAX_YAML_NODES`` steps instead of expanding."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise TBPSError(f"{where}: expands to more than {MAX_YAML_NODES:,} values (YAML aliases?); "
                            "a config is a few hundred")
        if depth > MAX_YAML_DEPTH:
            raise TBPSError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            count += len(node)
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def parse_yaml(text: str, where: str, tuples: bool = False) -> Any:
    """Plain values from YAML ``text``, bounded by :func:`check_yaml_size`; ``where`` names the source
    in errors. ``tuples`` also reads ``!!python/tuple`` (as a list); every other Python tag is refused."""
    loader = _TupleSafeLoader if tuples else yaml.SafeLoader
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 (SafeLoader or a SafeLoader subclass)
    except yaml.constructor.ConstructorError as exc:
        tag = getattr(exc, "problem", "") or str(exc)
        raise TBPSError(f"{where}: refused: {tag.strip()} (only plain YAML values are read)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise TBPSError(f"{where}:{line} not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (RecursionError, MemoryError):
        raise TBPSError(f"{where}: nested too deeply or too large to read as YAML") from None
    check_yaml_size(data, where)
    return data


def load_yaml(path: str | Path, what: str = "YAML file", tuples: bool = True) -> Any:
    """A YAML file of plain values (and, with ``tuples``, Python tuples), read by :func:`parse_yaml`
    after a size check; ``what`` names the expected content in errors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TBPSError(f"{path}: {what} not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise TBPSError(f"{path}: {size:,} bytes is too large for a {what} ({MAX_YAML_BYTES >> 20} MiB at most)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TBPSError(f"{path}: not a UTF-8 text file") from None
    return parse_yaml(text, str(path), tuples=tuples)
