"""tbps serve: the HTTP API over a real tiny index (FastAPI's test client, and a real uvicorn socket)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from tbps.cli import main
from tbps.errors import TBPSError
from tbps.search import Searcher
from tbps.serve import MAX_K, QueryBatcher, _check_port, create_app
from tiny_gallery import NUM_IMAGES, build_tiny_index, free_port

QUERY = "a man in a red shirt with a black backpack"


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    return build_tiny_index(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def searcher(index_dir) -> Searcher:
    return Searcher(index_dir, device="cpu")


@pytest.fixture(scope="module")
def client(searcher) -> TestClient:
    return TestClient(create_app(searcher, max_query_chars=80, max_k=20), base_url="http://127.0.0.1:8000")


def gallery_relative(searcher, path: str) -> str:
    return os.path.relpath(path, searcher.index.image_root)


# ----------------------------------------------------------------------------- good requests

def test_search_returns_the_searchers_ranking(client, searcher):
    response = client.get("/api/search", params={"q": QUERY, "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["query"] == QUERY and body["k"] == 5
    expected = searcher.search([QUERY], top_k=5)[0]
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert [set(r) for r in body["results"]] == [{"rank", "path", "score", "url"}] * 5
    assert [r["path"] for r in body["results"]] == [gallery_relative(searcher, e["path"]) for e in expected]
    assert not any(os.path.isabs(r["path"]) for r in body["results"])  # no server paths leak
    assert [r["url"] for r in body["results"]] == [f"/images/{e['index']}" for e in expected]
    assert [r["score"] for r in body["results"]] == pytest.approx([e["score"] for e in expected], abs=1e-6)
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_defaults_k_beyond_the_gallery_and_rerank_off(client, searcher):
    body = client.get("/api/search", params={"q": "  a woman \t in blue  "}).json()
    assert body["query"] == "a woman in blue" and body["k"] == 10 and len(body["results"]) == 10
    assert len(client.get("/api/search", params={"q": "a woman", "k": 20}).json()["results"]) == NUM_IMAGES
    off = client.get("/api/search", params={"q": "a woman", "k": "3", "rerank": "off"}).json()
    assert off["rerank"] is False
    assert [r["path"] for r in off["results"]] == [gallery_relative(searcher, e["path"])
                                                   for e in searcher.search(["a woman"], 3, rerank=False)[0]]


def test_result_urls_serve_the_indexed_files(client, searcher):
    results = client.get("/api/search", params={"q": QUERY, "k": 3}).json()["results"]
    for result in results:
        image = client.get(result["url"])
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert image.headers["x-content-type-options"] == "nosniff"
        assert image.content == (searcher.index.image_root / result["path"]).read_bytes()


def test_healthz(client):
    assert client.get("/healthz").json() == {
        "status": "ok", "gallery_size": NUM_IMAGES, "model": "irra", "rerank": False,
        "limits": {"max_query_chars": 80, "max_k": 20}, "auth": False}


def test_page_has_the_search_box_and_a_policy_that_allows_exactly_its_script(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'id="q"' in page and 'id="results"' in page and "/api/search" in page
    script = re.search(r"<script>(.*?)</script>", page, flags=re.S).group(1).encode()
    digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
    policy = response.headers["content-security-policy"]
    assert f"script-src 'sha256-{digest}'" in policy and "default-src 'none'" in policy


# ----------------------------------------------------------------------------- bad requests

@pytest.mark.parametrize("params, needle", [
    ({}, "missing parameter 'q'"),
    ({"q": ""}, "'q' is empty"),
    ({"q": "   "}, "'q' is empty"),
    ({"q": "x" * 81}, "at most 80"),
    ({"q": "a\x00b"}, "control characters"),
    ({"q": "a", "k": "0"}, "between 1 and 20"),
    ({"q": "a", "k": "21"}, "between 1 and 20"),
    ({"q": "a", "k": "-3"}, "integer between 1 and 20"),
    ({"q": "a", "k": "ten"}, "integer"),
    ({"q": "a", "k": "2.5"}, "integer"),
    ({"q": "a", "k": "1e1"}, "integer"),
    ({"q": "a", "k": ""}, "integer"),
    ({"q": "a", "k": "99999999999999999999"}, "integer"),
    ({"q": "a", "rerank": "yes"}, "'on' or 'off'"),
    ({"q": "a", "limit": "5"}, "unknown parameter 'limit'"),
    ([("q", "a"), ("q", "b")], "given 2 times"),
    ([("q", "a"), ("k", "1"), ("k", "2")], "given 2 times"),
])
def test_bad_parameters_are_a_400_json_error(client, params, needle):
    response = client.get("/api/search", params=params)
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()) == {"error"} and needle in response.json()["error"]


def test_a_query_of_exactly_the_limit_is_accepted(client):
    assert client.get("/api/search", params={"q": "y" * 80, "k": "20"}).status_code == 200


def test_other_methods_and_routes_are_json_errors(client):
    assert client.post("/api/search", params={"q": "a"}).status_code == 405
    assert "error" in client.post("/api/search").json()
    missing = client.get("/api/nothing")
    assert missing.status_code == 404 and missing.json()["error"].startswith("not found")


# ----------------------------------------------------------------------------- images: only the index's

@pytest.fixture(scope="module")
def secret(index_dir) -> bytes:
    """A file beside the gallery that no request may read."""
    content = b"SECRET-NOT-IN-THE-INDEX"
    (index_dir.parent / "secret.txt").write_bytes(content)
    (index_dir.parent / "gallery" / "secret.png").write_bytes(content)  # in the folder, not in the index
    return content


@pytest.mark.parametrize("path", [
    f"/images/{NUM_IMAGES}", "/images/-1", "/images/1.0", "/images/0x1", "/images/%201", "/images/1%20",
    "/images/+1", "/images/99999999999999999999999", "/images/", "/images",
    "/images/..%2Fsecret.txt", "/images/..%2F..%2Fsecret.txt", "/images/%2e%2e%2fsecret.txt",
    "/images/%2Fetc%2Fpasswd", "/images/secret.png", "/images/gallery%2Fsecret.png",
    "/images/0%2F..%2F..%2Fsecret.txt", "/images/0/../../secret.txt", "/images/..%5csecret.txt",
])
def test_only_indexed_images_are_served(client, secret, path):
    response = client.get(path)
    assert response.status_code == 404, path
    assert "error" in response.json()
    assert secret not in response.content


def test_an_indexed_image_whose_file_is_gone_is_a_404(client, searcher):
    path = Path(searcher.image_path(0))
    moved = path.with_suffix(".moved")
    path.rename(moved)
    try:
        response = client.get("/images/0")
        assert response.status_code == 404 and "file is gone" in response.json()["error"]
    finally:
        moved.rename(path)
    assert client.get("/images/0").status_code == 200


@contextmanager
def running(config: uvicorn.Config):
    """A real uvicorn server for ``config`` in a thread, for socket-level tests; stopped on exit."""
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_raw_traversal_over_a_real_socket(searcher, secret):
    """No client-side URL normalisation here: the request line goes to uvicorn as written."""
    port = free_port()
    with running(uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning")):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json()["gallery_size"] == NUM_IMAGES
        for target in ["/images/../secret.txt", "/images/../../secret.txt", "/images/0/../../secret.txt",
                       "/images/..\\secret.txt", "/../secret.txt"]:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                reply = b""
                while chunk := conn.recv(65536):
                    reply += chunk
            assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.1 404 Not Found", b"HTTP/1.1 400 Bad Request"), target
            assert secret not in reply


# ----------------------------------------------------------------------------- batching

class _GatedSearcher:
    """The real searcher, with a gate that holds the first call so that others queue behind it."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher = searcher
        self.calls: list[tuple[list[str], int, bool]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def search(self, queries, top_k=10, rerank=True):
        self.calls.append((list(queries), top_k, rerank))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(20)
        return self.searcher.search(queries, top_k=top_k, rerank=rerank)


def test_concurrent_queries_are_searched_as_one_batch_with_the_same_results(searcher):
    gated = _GatedSearcher(searcher)
    batcher = QueryBatcher(gated, max_batch=32)
    queries = [(f"person number {i} in a coat", 1 + i % 5) for i in range(8)]
    answers: dict[int, list[dict]] = {}

    def ask(i: int, query: str, k: int) -> None:
        answers[i] = batcher.search(query, k, True)

    first = threading.Thread(target=ask, args=(-1, "the first query", 3))
    first.start()
    assert gated.entered.wait(20)
    threads = [threading.Thread(target=ask, args=(i, q, k)) for i, (q, k) in enumerate(queries)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(batcher._queue) < len(queries):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gated.release.set()
    for thread in [first, *threads]:
        thread.join(20)
    assert [len(call[0]) for call in gated.calls] == [1, len(queries)]
    assert gated.calls[1][1] == 5  # the batch asks for its largest k
    for i, (query, k) in enumerate(queries):
        alone = searcher.search([query], top_k=k)[0]
        assert [r["index"] for r in answers[i]] == [r["index"] for r in alone]
        assert [r["score"] for r in answers[i]] == pytest.approx([r["score"] for r in alone], abs=1e-5)


def test_max_batch_one_searches_one_query_at_a_time(searcher):
    gated = _GatedSearcher(searcher)
    gated.release.set()
    batcher = QueryBatcher(gated, max_batch=1)
    threads = [threading.Thread(target=batcher.search, args=(f"query {i}", 2, False)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert [len(call[0]) for call in gated.calls] == [1, 1, 1, 1]


def test_a_searcher_error_reaches_the_client_as_json(searcher):
    class Failing:
        size, model_name, has_rerank = searcher.size, searcher.model_name, False

        def search(self, queries, top_k=10, rerank=True):
            raise TBPSError("the index went away")

        def image_path(self, index):
            return searcher.image_path(index)

    client = TestClient(create_app(Failing()), raise_server_exceptions=False, base_url="http://localhost")
    response = client.get("/api/search", params={"q": "a"})
    assert response.status_code == 400 and response.json() == {"error": "the index went away"}


# ----------------------------------------------------------------------------- the command

def test_serve_command_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "no-index"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tbps: error:") and err.count("\n") == 1


def test_a_busy_port_is_refused_before_loading_anything():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TBPSError, match=f"cannot listen on 127.0.0.1:{port}"):
            _check_port("127.0.0.1", port)
    with pytest.raises(TBPSError, match="between 0 and 65535"):
        _check_port("127.0.0.1", 70000)


def test_limits_must_be_positive(searcher):
    with pytest.raises(TBPSError):
        create_app(searcher, max_k=0)
    assert MAX_K >= 10


# ----------------------------------------------------------------------------- exposure (issue 19)

@pytest.mark.parametrize("base_url, status", [
    ("http://127.0.0.1:8000", 200), ("http://localhost", 200), ("http://[::1]:8000", 200),
    ("http://LOCALHOST:9", 200), ("http://rebind.attacker.example", 400), ("http://127.0.0.1.nip.io:8000", 400),
    ("http://search.example.org", 200),
])
def test_only_allowed_host_names_are_served(searcher, base_url, status):
    app = create_app(searcher, allowed_hosts=["localhost", "127.0.0.1", "::1", "search.example.org"])
    response = TestClient(app, base_url=base_url).get("/api/search", params={"q": "a man"})
    assert response.status_code == status, base_url
    if status == 400:
        assert "is not served here" in response.json()["error"]
    default = TestClient(create_app(searcher), base_url="http://rebind.attacker.example")
    assert default.get("/healthz").status_code == 400  # loopback names only by default


def test_a_gallery_file_replaced_by_a_symlink_is_not_served(client, searcher, secret, index_dir):
    path = Path(searcher.image_path(1))
    kept = path.with_suffix(".kept")
    path.rename(kept)
    try:
        path.symlink_to(index_dir.parent / "secret.txt")  # outside the gallery
        response = client.get("/images/1")
        assert response.status_code == 404 and secret not in response.content
        path.unlink()
        path.symlink_to(kept)  # inside the gallery: a regular file there
        assert client.get("/images/1").content == kept.read_bytes()
        path.unlink()
        path.mkdir()  # not a regular file
        assert client.get("/images/1").status_code == 404
        path.rmdir()
    finally:
        if path.is_symlink() or path.is_file():
            path.unlink()
        kept.rename(path)


TOKEN = "s3cret-Token-0123456789"


def test_a_token_guards_every_request_but_the_page(searcher, tmp_path):
    audit = tmp_path / "audit.jsonl"
    client = TestClient(create_app(searcher, token=TOKEN, audit_log=audit), base_url="http://localhost")
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert client.get("/").status_code == 200  # the page itself holds no data
    for path in ["/api/search?q=a+man", "/images/0", "/healthz"]:
        refused = client.get(path)
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer"), path
        assert client.get(path, headers={"Authorization": f"Bearer {TOKEN[:-1]}x"}).status_code == 401
        assert client.get(path, headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        assert client.get(path, headers=good).status_code == 200, path
    assert client.get("/healthz", headers=good).json()["auth"] is True
    client.get("/api/search", params={"q": f"a man {TOKEN}", "k": 3}, headers=good)
    client.get("/api/search", params={"q": "a man", "k": "many"}, headers=good)

    lines = audit.read_text(encoding="utf-8").splitlines()
    assert TOKEN not in audit.read_text(encoding="utf-8")
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 1 + 4 * 3 + 1 + 2  # one line per request
    assert all({"time", "client", "path", "query", "k", "results", "status"} <= set(e) for e in entries)
    searched = [e for e in entries if e["path"] == "/api/search" and e["status"] == 200]
    assert searched[0]["query"] == "a man" and searched[0]["k"] == 10 and searched[0]["results"] == 10
    assert searched[1]["query"] == "a man [token]" and searched[1]["results"] == 3
    assert entries[-1]["status"] == 400 and entries[-1]["query"] == "a man" and entries[-1]["k"] is None
    assert [e["status"] for e in entries if e["path"] == "/images/0"] == [401, 401, 401, 200]


def test_serve_reads_the_token_from_the_environment_and_sets_timeouts(index_dir, monkeypatch, tmp_path):
    import uvicorn as uvicorn_module

    from tbps.serve import serve

    seen = {}
    monkeypatch.setattr(uvicorn_module, "run", lambda app, **kwargs: seen.update(app=app, **kwargs))
    monkeypatch.setenv("TBPS_TOKEN", TOKEN)
    serve(index_dir, host="127.0.0.1", port=free_port(), device="cpu", log_level="warning",
          allowed_hosts=["search.example.org"], audit_log=tmp_path / "audit.jsonl")
    client = TestClient(seen["app"], base_url="http://search.example.org")
    assert client.get("/healthz").status_code == 401
    assert client.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert seen["timeout_keep_alive"] <= 5 and seen["http"] is not None


def test_a_client_that_sends_its_headers_slowly_is_disconnected(searcher):
    from tbps.serve import header_timeout_protocol

    port = free_port()
    config = uvicorn.Config(create_app(searcher), host="127.0.0.1", port=port, log_level="warning",
                            http=header_timeout_protocol(0.5), timeout_keep_alive=1)
    with running(config):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            started = time.monotonic()
            closed = False
            for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 40:  # bounded
                try:
                    conn.sendall(bytes([byte]))
                    conn.settimeout(0.1)
                    if conn.recv(1024) == b"":
                        closed = True
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed and time.monotonic() - started < 3, "a slow request head kept its connection"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:  # a normal client still works
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply, started = b"", time.monotonic()
            conn.settimeout(3)
            while chunk := conn.recv(65536):  # the reply, then the close of an idle connection
                reply += chunk
                assert time.monotonic() - started < 3, "an idle keep-alive connection stayed open"
            assert reply.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in reply
