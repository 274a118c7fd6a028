"""``tbps serve``: the HTTP API and search page for a gallery index (FastAPI + uvicorn).

Routes (the HTTP contract of ``interface.md``):

- ``GET /``: the search page (``tbps/search/static/index.html``, one file, no external assets);
- ``GET /api/search?q=TEXT&k=K&rerank=on|off`` -> ``{"query", "k", "rerank", "results":
  [{"rank", "path", "score", "url"}]}``;
- ``GET /images/<id>``: gallery image ``id`` (its row in the index). Only images in the index are
  served: the id is a row number looked up in the index, never a path taken from the request;
- ``GET /healthz`` -> ``{"status": "ok", "gallery_size", "model", "rerank", "limits", "auth"}`` (and
  ``cameras`` for an index of footage);
- footage indexes (``tbps index --footage``): ``/api/search`` also takes ``camera`` (repeatable),
  ``from`` and ``to`` (seconds or ISO 8601) and ``group=on`` (one hit per track); each result adds
  ``camera``, ``time``, ``box`` and ``frame_url``; ``GET /frames/<id>`` is the frame crop ``id`` was
  cut from, its box drawn in red (a regular file, symlinks resolved, as for images).

Result paths are relative to the gallery folder (no server paths leak); an image is served only if
its file, symlinks resolved, is a regular file inside the indexed gallery. Requests whose ``Host``
is not an allowed name (loopback names by default) are refused, against DNS rebinding. With a token
(``--token`` / ``TBPS_TOKEN``) every request but the page itself needs ``Authorization: Bearer
TOKEN`` (compared in constant time); the page asks for it once. ``--audit-log`` appends one JSON line
per request (time, client, path, query, k, result count, status), never the token. Connections
that send their request head too slowly are closed (``HEADER_TIMEOUT``), idle ones after the
keep-alive timeout.

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
import datetime
import hashlib
import hmac
import json
import logging
import mimetypes
import os
import re
import socket
import stat
import threading
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from tbps.errors import TBPSError
from tbps.extras import available, missing_extra

if not (available("fastapi") and available("uvicorn")):
    raise missing_extra("serve", "tbps serve")

from fastapi import FastAPI, Request  # noqa: E402  (after the check: one line instead of a traceback)
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse, Response  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

log = logging.getLogger("tbps.serve")

MAX_QUERY_CHARS = 500     # a long CUHK-PEDES caption is ~100 words; text encoders truncate at 48-77 tokens
MAX_K = 100
DEFAULT_K = 10
MAX_BATCH = 32
PARAMETERS = ("q", "k", "rerank", "camera", "from", "to", "group")
MAX_TIME_CHARS = 40
_IMAGE_ID = re.compile(r"[0-9]{1,12}")
_INTEGER = re.compile(r"[+]?[0-9]{1,9}")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
PUBLIC_PATHS = ("/", "/favicon.ico")  # the page holds no data; it asks for the token itself
HEADER_TIMEOUT = 10.0   # seconds a client has to send a complete request head
KEEP_ALIVE_TIMEOUT = 5.0  # seconds an idle keep-alive connection stays open
TOKEN_ENV = "TBPS_TOKEN"


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


def host_name(header: str) -> str:
    """The name of a ``Host`` header without its port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    header = header.strip().lower()
    if header.startswith("["):
        end = header.find("]")
        return header[1:end] if end > 0 else ""
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AuditLog:
    """One JSON line per request, appended with one ``write`` on an ``O_APPEND`` descriptor (whole
    lines even with several writers); the token, if any, is masked wherever it would appear."""

    def __init__(self, path: str | os.PathLike, token: str | None = None) -> None:
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise TBPSError(f"{path}: cannot open the audit log ({exc.strerror})") from None
        self.path = str(path)
        self.token = token
        self._lock = threading.Lock()

    def write(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False)
        if self.token:
            line = line.replace(self.token, "[token]")
        with self._lock:
            os.write(self.fd, (line + "\n").encode("utf-8"))

    def close(self) -> None:
        os.close(self.fd)


async def _json_reply(send: Any, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class _Guard:
    """Pure ASGI middleware in front of every route: the ``Host`` check, the bearer token, and
    the audit line written once the response is done."""

    def __init__(self, app: Any, allowed_hosts: tuple[str, ...], token: str | None,
                 audit: AuditLog | None) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.token = token.encode("utf-8") if token else None
        self.audit = audit

    def _authorised(self, scope: dict) -> bool:
        if self.token is None or scope["path"] in PUBLIC_PATHS:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)
        return False

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0}

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), "")
        try:
            if not self.any_host and host_name(host) not in self.allowed_hosts:
                allowed = ", ".join(sorted(self.allowed_hosts))
                await _json_reply(send_and_note, 400, f"host {host[:100]!r} is not served here (allowed: "
                                  f"{allowed}; see tbps serve --allowed-host)")
            elif not self._authorised(scope):
                await _json_reply(send_and_note, 401, "a token is needed: send Authorization: Bearer TOKEN",
                                  [(b"www-authenticate", b"Bearer realm=\"tbps\"")])
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            if self.audit is not None:
                self._audit(scope, status["code"])

    def _audit(self, scope: dict, status: int) -> None:
        noted = scope.get("state", {}).get("audit", {})
        client = scope.get("client")
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        self.audit.write({"time": now, "client": client[0] if client else None, "method": scope.get("method"),
                          "path": scope.get("path"), "query": noted.get("query"), "k": noted.get("k"),
                          "results": noted.get("results"), "status": status})


def gallery_file(path: str, root: str | os.PathLike | None) -> str | None:
    """``path`` resolved, if it is a regular file inside the gallery ``root`` (symlinks resolved on
    both sides); else None. A gallery file replaced by a link to ``/etc/...`` is not served."""
    real = os.path.realpath(path)
    if root is not None:
        real_root = os.path.realpath(root)
        if os.path.commonpath([real, real_root]) != real_root:
            return None
    try:
        return real if stat.S_ISREG(os.stat(real).st_mode) else None
    except OSError:
        return None


def relative_path(path: str, root: str | os.PathLike | None) -> str:
    """A result's path as the API shows it: relative to the gallery folder (no server paths)."""
    if root is None:
        return os.path.basename(path)
    relative = os.path.relpath(path, root)
    return os.path.basename(path) if relative.startswith(os.pardir) else relative.replace(os.sep, "/")


def _page_and_policy() -> tuple[bytes, str]:
    """The search page, and a Content-Security-Policy that allows exactly its inline script and style."""
    page = resources.files("tbps").joinpath("search/static/index.html").read_bytes()

    def hashes(tag: str) -> str:
        bodies = re.findall(rb"<" + tag.encode() + rb">(.*?)</" + tag.encode() + rb">", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'" for b in bodies)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    return page, policy


def create_app(searcher: Any, *, max_query_chars: int = MAX_QUERY_CHARS, max_k: int = MAX_K,
               max_batch: int = MAX_BATCH, allowed_hosts: tuple[str, ...] | list[str] | None = None,
               token: str | None = None, audit_log: str | os.PathLike | None = None):
    """The FastAPI app for a loaded ``tbps.search.Searcher`` (or anything with its surface:
    ``size``, ``model_name``, ``has_rerank``, ``search(queries, top_k, rerank)``, ``image_path(i)``
    and, for relative paths and the gallery check, ``index.image_root``).

    ``allowed_hosts``: ``Host`` names served (default: loopback names; ``"*"``: any); ``token``: the
    bearer token every request but the page needs; ``audit_log``: a file for one JSON line per request."""
    if max_query_chars < 1 or max_k < 1:
        raise TBPSError("the query length and k limits must be at least 1")
    if token is not None and (len(token) < 8 or not token.isprintable() or " " in token):
        raise TBPSError("the token must be at least 8 printable characters without spaces")
    hosts = tuple(allowed_hosts) if allowed_hosts else LOOPBACK_HOSTS
    root = getattr(getattr(searcher, "index", None), "image_root", None)
    audit = AuditLog(audit_log, token) if audit_log is not None else None
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

    app.add_middleware(_Guard, allowed_hosts=hosts, token=token, audit=audit)
    app.add_middleware(_SecurityHeaders)
    app.state.audit = audit

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
                  "rerank": bool(searcher.has_rerank), "limits": {"max_query_chars": max_query_chars, "max_k": max_k},
                  "auth": token is not None}
        if cameras:
            health["cameras"] = cameras
        return health

    @app.get("/api/search")
    def api_search(request: Request) -> dict[str, Any]:
        noted: dict[str, Any] = {"query": request.query_params.get("q", "")[:max_query_chars]}
        request.state.audit = noted
        query, k, rerank = parse_search_params(request.query_params, max_query_chars, max_k)
        noted.update(query=query, k=k)
        filters = parse_footage_params(request.query_params)
        try:
            rows = batcher.search(query, k, rerank, filters)
        except TBPSError as exc:
            raise BadRequest(str(exc)) from None
        noted["results"] = len(rows)
        return {"query": query, "k": k, "rerank": rerank and bool(searcher.has_rerank),
                "results": [{"rank": int(r["rank"]), "path": relative_path(str(r["path"]), root),
                             "score": round(float(r["score"]), 6), "url": f"/images/{int(r['index'])}",
                             **_footage_result(r)}
                            for r in rows]}

    @app.get("/frames/{image_id}")
    def frame(image_id: str) -> Response:
        if not _IMAGE_ID.fullmatch(image_id) or int(image_id) >= int(searcher.size):
            raise BadRequest(f"no image {image_id[:30]!r} in the index: ids are gallery rows 0..{int(searcher.size) - 1}",
                             status=404)
        cache = "private, max-age=3600" if token is not None else "public, max-age=3600"
        try:
            return Response(frame_with_box(searcher, int(image_id)), media_type="image/jpeg",
                            headers={"Cache-Control": cache})
        except TBPSError as exc:
            raise BadRequest(str(exc), status=404) from None

    @app.get("/images/{image_id}")
    def image(image_id: str) -> Response:
        if not _IMAGE_ID.fullmatch(image_id) or int(image_id) >= int(searcher.size):
            raise BadRequest(f"no image {image_id[:30]!r} in the index: ids are gallery rows 0..{int(searcher.size) - 1}",
                             status=404)
        path = searcher.image_path(int(image_id))
        if not os.path.lexists(path):
            raise BadRequest(f"image {image_id} is in the index but its file is gone", status=404)
        served = gallery_file(path, root)
        if served is None:
            raise BadRequest(f"image {image_id} is not a regular file inside the gallery", status=404)
        media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        cache = "private, max-age=3600" if token is not None else "public, max-age=3600"
        return FileResponse(served, media_type=media_type, headers={"Cache-Control": cache})

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
    meta = searcher.index.metadata[int(index)]
    # a regular file inside where it was indexed from (the index's own frames/ for videos, the frame
    # folder for folders), symlinks resolved: a frame swapped for a link elsewhere is refused
    allowed = searcher.index.root if not os.path.isabs(meta["frame"]) else meta["source"]
    served = gallery_file(path, allowed)
    if served is None:
        raise TBPSError(f"the frame of image {index} is not a regular file inside its footage folder")
    image = load_image(served)
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


def header_timeout_protocol(timeout: float = HEADER_TIMEOUT) -> type:
    """uvicorn's h11 protocol, plus a deadline for each request head.

    uvicorn closes idle keep-alive connections, but any byte resets that timer, and a connection
    that has not yet sent a whole request head has no timer at all: a client trickling header bytes
    holds the connection forever (slowloris). Here every connection, and every keep-alive turn,
    must deliver a complete request head within ``timeout`` seconds, or it is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            deadline = getattr(self, "_head_deadline", None)
            if deadline is not None:
                deadline.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            previous = getattr(self, "_head_deadline", None)
            if previous is not None:
                previous.cancel()
            self._head_deadline = self.loop.call_later(timeout, self._head_deadline_passed)

        def _head_deadline_passed(self) -> None:
            self._head_deadline = None
            waiting_for_head = self.conn.their_state is h11.IDLE and (
                self.cycle is None or self.cycle.response_complete)
            if waiting_for_head and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


def serve(index_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *,
          checkpoint: str | os.PathLike | None = None, device: str = "auto",
          max_query_chars: int = MAX_QUERY_CHARS, max_k: int = MAX_K, max_batch: int = MAX_BATCH,
          log_level: str = "info", image_root: str | os.PathLike | None = None,
          allowed_hosts: list[str] | None = None, token: str | None = None,
          audit_log: str | os.PathLike | None = None, header_timeout: float = HEADER_TIMEOUT,
          keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT) -> None:
    """Load the index and its model once, then serve the API and page until interrupted.

    ``allowed_hosts`` adds ``Host`` names to the loopback ones (and the listening address);
    ``token`` defaults to the ``TBPS_TOKEN`` environment variable."""
    import uvicorn

    from tbps.search import Searcher

    if header_timeout <= 0 or keep_alive_timeout <= 0:
        raise TBPSError("the header and keep-alive timeouts must be positive")
    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    hosts = list(LOOPBACK_HOSTS) + list(allowed_hosts or [])
    if host not in ("0.0.0.0", "::", ""):
        hosts.append(host)
    _check_port(host, port)
    searcher = Searcher(index_dir, checkpoint=checkpoint, device=device, image_root=image_root)
    if searcher.size:
        searcher.search(["a person"], top_k=1)  # warm-up: the first request is not the slow one
    app = create_app(searcher, max_query_chars=max_query_chars, max_k=max_k, max_batch=max_batch,
                     allowed_hosts=hosts, token=token, audit_log=audit_log)
    shown = f"[{host}]" if ":" in host else host
    guard = "token required" if token else "no token"
    print(f"tbps: serving {searcher.size:,} images ({searcher.model_name}) from {index_dir} "
          f"at http://{shown}:{port}  ({guard}; Ctrl+C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=header_timeout_protocol(header_timeout),
                timeout_keep_alive=int(max(1, round(keep_alive_timeout))), server_header=False)
