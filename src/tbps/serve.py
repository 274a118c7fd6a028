"""``tbps serve``: the HTTP API and search page for a gallery index (FastAPI + uvicorn).

Routes (the HTTP contract of ``interface.md``):

- ``GET /``: the search page (``tbps/search/static/index.html``, one file, no external assets);
- ``GET /api/search?q=TEXT&k=K&rerank=on|off`` -> ``{"query", "k", "rerank", "results":
  [{"rank", "path", "score", "url"}]}``;
- ``GET /images/<id>``: gallery image ``id`` (its row in the index). Only images in the index are
  served: the id is a row number looked up in the index, never a path taken from the request;
- ``GET /healthz`` -> ``{"status": "ok", "gallery_size", "model", "rerank", "limits"}`` (and
  ``cameras`` for an index of footage);
- footage indexes (``tbps index --footage``): ``/api/search`` also takes ``camera`` (repeatable),
  ``from`` and ``to`` (seconds or ISO 8601) and ``group=on`` (one hit per track); each result adds
  ``camera``, ``time``, ``box`` and ``frame_url``; ``GET /frames/<id>`` is the frame crop ``id`` was
  cut from, its box drawn in red.

Every parameter is validated (query length, k range, integer syntax, on/off, no unknown or repeated
parameters); a bad request gets a 4xx JSON ``{"error": "..."}``, as does every other error.

The model and index are loaded once, in :func:`serve`, before the port opens. Searches run on one
worker thread (:class:`QueryBatcher`) that takes every query waiting at that moment and searches
them as one batch: concurrent clients share a text-encoder forward pass instead of competing for the
CPU, so throughput grows with load while a lone client sees no added latency (numbers in
``benchmarks/README.md``, "Server").
"""

from __future__ import annotations

import base64
import hashlib
import logging
import mimetypes
import os
import re
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tbps.errors import TBPSError

log = logging.getLogger("tbps.serve")

MAX_QUERY_CHARS = 500     # a long CUHK-PEDES caption is ~100 words; text encoders truncate at 48-77 tokens
MAX_K = 100
DEFAULT_K = 10
MAX_BATCH = 32
PARAMETERS = ("q", "k", "rerank", "camera", "from", "to", "group")
MAX_TIME_CHARS = 40
_IMAGE_ID = re.compile(r"[0-9]{1,12}")
_INTEGER = re.compile(r"[+]?[0-9]{1,9}")


# ----------------------------------------------------------------------------- batching

@dataclass
class _Request:
    query: str
    k: int
    rerank: bool
    filters: dict[str, Any] = field(default_factory=dict)  # footage: cameras, time_from, time_to, group_tracks
    done: threading.Event = field(default_factory=threading.Event)
    result: list[dict[str, Any]] | None = None
    error: BaseException | None = None


class QueryBatcher:
    """Runs ``searcher.search`` on one worker thread, coalescing the queries waiting at each turn.

    A request waits only for the batch in progress (if any) and then its own. Results are the same
    as one-by-one searches: a batch asks for the largest k of its requests (the shortlist does not
    depend on k up to the searcher's default of 100), and each request keeps its own first k.
    ``max_batch=1`` searches one query at a time (the load benchmark's comparison row).
    """

    def __init__(self, searcher: Any, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise TBPSError(f"max batch must be at least 1, got {max_batch}")
        self.searcher = searcher
        self.max_batch = max_batch
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._worker: threading.Thread | None = None

    def search(self, query: str, k: int, rerank: bool, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        request = _Request(query, k, rerank, dict(filters or {}))
        with self._cond:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._run, name="tbps-search", daemon=True)
                self._worker.start()
            self._queue.append(request)
            self._cond.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch))]
            kinds = list(dict.fromkeys((r.rerank, repr(sorted(r.filters.items()))) for r in batch))
            for rerank, filters in kinds:
                group = [r for r in batch if (r.rerank, repr(sorted(r.filters.items()))) == (rerank, filters)]
                self._search_group(group, rerank)

    def _search_group(self, group: list[_Request], rerank: bool) -> None:
        try:
            results = self.searcher.search([r.query for r in group], top_k=max(r.k for r in group), rerank=rerank,
                                           **group[0].filters)
            for request, rows in zip(group, results):
                request.result = rows[:request.k]
        except BaseException as exc:  # handed to the waiting request threads, which raise it
            for request in group:
                request.error = exc
        finally:
            for request in group:
                request.done.set()


# ----------------------------------------------------------------------------- validation

class BadRequest(Exception):
    """A request the client can fix: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _single(params: Any, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise BadRequest(f"parameter {name!r} is given {len(values)} times; give it once")
    return values[0] if values else None


def parse_search_params(params: Any, max_query_chars: int = MAX_QUERY_CHARS,
                        max_k: int = MAX_K) -> tuple[str, int, bool]:
    """``(query, k, rerank)`` from a request's query parameters, or :class:`BadRequest`."""
    unknown = sorted({key for key in params.keys() if key not in PARAMETERS})
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; the search takes q, k, rerank, camera, from, to "
                         "and group")
    q = _single(params, "q")
    if q is None:
        raise BadRequest("missing parameter 'q': the description to search for, e.g. q=a man in a red coat")
    query = " ".join(q.split())
    if not query:
        raise BadRequest("parameter 'q' is empty: give a description to search for")
    if len(query) > max_query_chars:
        raise BadRequest(f"parameter 'q' is {len(query)} characters long; at most {max_query_chars} are accepted")
    if any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in query):
        raise BadRequest("parameter 'q' contains control characters")
    k_text = _single(params, "k")
    if k_text is None:
        k = min(DEFAULT_K, max_k)
    else:
        if not _INTEGER.fullmatch(k_text.strip()):
            raise BadRequest(f"parameter 'k' must be an integer between 1 and {max_k}, got {k_text[:20]!r}")
        k = int(k_text)
        if not 1 <= k <= max_k:
            raise BadRequest(f"parameter 'k' must be between 1 and {max_k}, got {k}")
    rerank_text = _single(params, "rerank")
    if rerank_text is None or rerank_text == "on":
        rerank = True
    elif rerank_text == "off":
        rerank = False
    else:
        raise BadRequest(f"parameter 'rerank' must be 'on' or 'off', got {rerank_text[:20]!r}")
    return query, k, rerank


def parse_footage_params(params: Any) -> dict[str, Any]:
    """``Searcher.search`` keyword arguments from ``camera`` (repeatable), ``from``, ``to``, ``group``.

    Syntax is checked here (times parse, the range is not inverted, on/off); whether the index has
    footage and the camera exists is checked by the searcher, whose one-line errors become 400s.
    """
    from tbps.footage.ingest import parse_time

    filters: dict[str, Any] = {}
    cameras = [c.strip() for c in params.getlist("camera")]
    if any(not c or len(c) > 100 for c in cameras):
        raise BadRequest("parameter 'camera' must be a camera id of 1 to 100 characters")
    if cameras:
        filters["cameras"] = cameras
    for name, key in (("from", "time_from"), ("to", "time_to")):
        text = _single(params, name)
        if text is not None:
            if not text.strip() or len(text) > MAX_TIME_CHARS:
                raise BadRequest(f"parameter {name!r} must be a time: seconds or ISO 8601, e.g. 2026-01-05T08:00:00")
            try:
                filters[key] = parse_time(text, f"parameter {name!r}")
            except TBPSError as exc:
                raise BadRequest(str(exc)) from None
    if filters.get("time_from", -float("inf")) > filters.get("time_to", float("inf")):
        raise BadRequest(f"inverted time range: 'from' {_single(params, 'from')} is after 'to' {_single(params, 'to')}")
    group = _single(params, "group")
    if group not in (None, "on", "off"):
        raise BadRequest(f"parameter 'group' must be 'on' or 'off', got {group[:20]!r}")
    if group == "on":
        filters["group_tracks"] = True
    return filters


# ----------------------------------------------------------------------------- the app

class _SecurityHeaders:
    """Pure ASGI middleware: ``nosniff`` and ``no-referrer`` on every response (cheaper than
    ``BaseHTTPMiddleware``, and it leaves streamed image responses alone)."""

    HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _page_and_policy() -> tuple[bytes, str]:
    """The search page, and a Content-Security-Policy that allows exactly its inline script and style."""
    page = resources.files("tbps").joinpath("search/static/index.html").read_bytes()

    def hashes(tag: str) -> str:
        bodies = re.findall(rb"<" + tag.encode() + rb">(.*?)</" + tag.encode() + rb">", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in bodies)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    return page, policy


def create_app(searcher: Any, *, max_query_chars: int = MAX_QUERY_CHARS, max_k: int = MAX_K,
               max_batch: int = MAX_BATCH):
    """The FastAPI app for a loaded ``tbps.search.Searcher`` (or anything with its surface:
    ``size``, ``model_name``, ``has_rerank``, ``search(queries, top_k, rerank)``, ``image_path(i)``)."""
    if max_query_chars < 1 or max_k < 1:
        raise TBPSError("the query length and k limits must be at least 1")
    batcher = QueryBatcher(searcher, max_batch=max_batch)
    page, policy = _page_and_policy()
    metadata = getattr(getattr(searcher, "index", None), "metadata", None) or []
    cameras = sorted({m["camera"] for m in metadata if m})
    app = FastAPI(title="tbps", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.searcher = searcher
    app.state.batcher = batcher

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, f"not found: {request.url.path[:200]}")
        if exc.status_code == 405:
            return error(405, f"method {request.method} is not allowed here; use GET")
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error(422, f"invalid request: {where} {first.get('msg', '')}".strip())

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("error while answering %s", request.url.path)
        return error(500, "internal error while searching (see the server log)")

    app.add_middleware(_SecurityHeaders)

    @app.get("/")
    def index_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)  # browsers ask for one; no 404 in their console

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        health = {"status": "ok", "gallery_size": int(searcher.size), "model": searcher.model_name,
                  "rerank": bool(searcher.has_rerank), "limits": {"max_query_chars": max_query_chars, "max_k": max_k}}
        if cameras:
            health["cameras"] = cameras
        return health

    @app.get("/api/search")
    def api_search(request: Request) -> dict[str, Any]:
        query, k, rerank = parse_search_params(request.query_params, max_query_chars, max_k)
        filters = parse_footage_params(request.query_params)
        try:
            rows = batcher.search(query, k, rerank, filters)
        except TBPSError as exc:
            raise BadRequest(str(exc)) from None
        return {"query": query, "k": k, "rerank": rerank and bool(searcher.has_rerank),
                "results": [{"rank": int(r["rank"]), "path": str(r["path"]), "score": round(float(r["score"]), 6),
                             "url": f"/images/{int(r['index'])}", **_footage_result(r)} for r in rows]}

    @app.get("/frames/{image_id}")
    def frame(image_id: str) -> Response:
        if not _IMAGE_ID.fullmatch(image_id) or int(image_id) >= int(searcher.size):
            raise BadRequest(f"no image {image_id[:30]!r} in the index: ids are gallery rows 0..{int(searcher.size) - 1}",
                             status=404)
        try:
            return Response(frame_with_box(searcher, int(image_id)), media_type="image/jpeg",
                            headers={"Cache-Control": "public, max-age=3600"})
        except TBPSError as exc:
            raise BadRequest(str(exc), status=404) from None

    @app.get("/images/{image_id}")
    def image(image_id: str) -> Response:
        if not _IMAGE_ID.fullmatch(image_id) or int(image_id) >= int(searcher.size):
            raise BadRequest(f"no image {image_id[:30]!r} in the index: ids are gallery rows 0..{int(searcher.size) - 1}",
                             status=404)
        path = searcher.image_path(int(image_id))
        if not os.path.isfile(path):
            raise BadRequest(f"image {image_id} is in the index but its file is gone", status=404)
        media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return FileResponse(path, media_type=media_type, headers={"Cache-Control": "public, max-age=3600"})

    return app


def _footage_result(row: dict[str, Any]) -> dict[str, Any]:
    if "camera" not in row:
        return {}
    extra = {key: row[key] for key in ("camera", "time", "time_iso", "box", "track") if key in row}
    return {**extra, "frame_url": f"/frames/{int(row['index'])}"}


def frame_with_box(searcher: Any, index: int) -> bytes:
    """JPEG bytes of the frame footage crop ``index`` was cut from, with its box drawn in red."""
    import io

    from PIL import ImageDraw

    from tbps.data.images import load_image

    path = searcher.frame_path(index)
    box = searcher.footage_fields(index)["box"]
    image = load_image(path)
    width = max(2, round(min(image.size) / 150))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 0, 0), width=width)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ----------------------------------------------------------------------------- serve

def _check_port(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the address cannot be listened on."""
    if not 0 <= port <= 65535:
        raise TBPSError(f"port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise TBPSError(f"cannot listen on {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise TBPSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          checkpoint: str | os.PathLike | None = None, device: str = "auto",
          max_query_chars: int = MAX_QUERY_CHARS, max_k: int = MAX_K, max_batch: int = MAX_BATCH,
          log_level: str = "info", image_root: str | os.PathLike | None = None) -> None:
    """Load the index and its model once, then serve the API and page until interrupted."""
    import uvicorn

    from tbps.search import Searcher

    _check_port(host, port)
    searcher = Searcher(index_dir, checkpoint=checkpoint, device=device, image_root=image_root)
    if searcher.size:
        searcher.search(["a person"], top_k=1)  # warm-up: the first request is not the slow one
    app = create_app(searcher, max_query_chars=max_query_chars, max_k=max_k, max_batch=max_batch)
    shown = f"[{host}]" if ":" in host else host
    print(f"tbps: serving {searcher.size:,} images ({searcher.model_name}) from {index_dir} "
          f"at http://{shown}:{port}  (Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
