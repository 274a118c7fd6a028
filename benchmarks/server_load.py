"""Latency and throughput of ``tbps serve`` under concurrent load (benchmarks/README.md, "Server").

Starts ``tbps serve`` on a loopback port in a subprocess (model and index loaded once), then, from a
second process, C clients (threads, one keep-alive HTTP connection each) send ``GET /api/search``
back to back (closed loop) for C = 1, 4, 16. Reports requests/s and the p50/p95/p99 latency seen by
the clients (request sent to JSON parsed). The queries cycle through varied CUHK-PEDES-style
descriptions, so no two consecutive requests are the same. ``--max-batch 32,1`` compares the
server's batching of concurrent queries with one-at-a-time search.

    tbps index --checkpoint runs/demo/train/best.pt --images runs/demo/data/imgs --out runs/demo/index
    python benchmarks/server_load.py --index runs/demo/index --slot

Memory: before the load levels, the server's resident set size (RSS, from ``/proc``) is read after
a warm-up, then again after ``--distinct`` (default 1,000) queries that are all different; a server
that kept per-query state (a cache without bound) grows here, while a fixed set of queries would
hide it. The row ``"bench": "server_memory"`` holds both figures and the growth per query.

``--threads`` (default 1) sets the server's torch/BLAS threads; ``--slot`` first waits for a
comparison slot of benchmarks/compare_methods.py so the measurement and the training runs do not
share a core. Rows are appended to benchmarks/results/server_load.jsonl and printed as a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "server_load.jsonl"
QUERIES = [
    "A woman with long black hair wearing a red coat, black trousers and white shoes, carrying a bag.",
    "The man wears a grey hoodie, blue jeans and black sneakers. He has a red backpack.",
    "A young man in a white T-shirt and khaki shorts holding a phone.",
    "She is wearing a yellow dress with a brown belt and sandals, and has a small handbag.",
    "A person in a dark green jacket over a striped shirt, grey pants and brown boots.",
    "This lady has short blond hair and wears a pink top with blue jeans.",
    "A man with a black cap, a navy blue jacket and light trousers, walking with an umbrella.",
    "The pedestrian wears a purple sweater, a black skirt and black tights.",
    "A boy in an orange t-shirt and dark shorts carrying a blue backpack.",
    "A woman in a long beige coat with a white scarf and black heels.",
    "The man has glasses and wears a checked shirt, dark jeans and white trainers.",
    "A girl with a ponytail in a red and white striped shirt and denim shorts.",
    "An older man in a brown suit jacket and grey trousers carrying a briefcase.",
    "Someone in a black leather jacket, black pants and a green shoulder bag.",
    "A woman wearing a blue blouse, white trousers and a straw hat.",
    "The man is dressed in a light blue shirt and black shorts with a yellow backpack.",
]


# ----------------------------------------------------------------------------- the client process

def run_clients(url: str, concurrency: int, requests_per_client: int, warmup: int, k: int) -> dict:
    """C closed-loop clients; returns latencies (s) of the timed requests and the wall time."""
    import httpx

    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)

    def client(slot: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            for i in range(warmup):
                http.get("/api/search", params={"q": QUERIES[(slot + i) % len(QUERIES)], "k": k})
            barrier.wait()
            for i in range(requests_per_client):
                query = QUERIES[(slot * 7 + i) % len(QUERIES)]
                start = time.perf_counter()
                response = http.get("/api/search", params={"q": query, "k": k})
                body = response.json()
                latencies[slot].append(time.perf_counter() - start)
                if response.status_code != 200 or len(body.get("results", [])) != k:
                    errors[slot] += 1
            barrier.wait()

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    barrier.wait()
    wall = time.perf_counter() - start
    for thread in threads:
        thread.join()
    return {"latencies": [x for row in latencies for x in row], "wall": wall, "errors": sum(errors)}


COLOURS = ["red", "blue", "green", "black", "white", "grey", "yellow", "pink", "purple", "orange", "brown",
           "beige", "navy", "khaki", "maroon", "teal"]
GARMENTS = ["coat", "jacket", "hoodie", "shirt", "dress", "sweater", "T-shirt", "blouse", "vest", "raincoat"]
EXTRAS = ["a backpack", "a handbag", "an umbrella", "a phone", "glasses", "a cap", "a scarf", "a suitcase",
          "headphones", "a bicycle"]


def distinct_queries(count: int) -> list[str]:
    """``count`` different descriptions (colour x garment x item, then a number): no two share tokens."""
    out = []
    for i in range(count):
        colour, garment = COLOURS[i % len(COLOURS)], GARMENTS[(i // len(COLOURS)) % len(GARMENTS)]
        extra = EXTRAS[(i // (len(COLOURS) * len(GARMENTS))) % len(EXTRAS)]
        out.append(f"a person in a {colour} {garment} with {extra}, seen at gate {i}")
    return out


def rss_mb(pid: int) -> float | None:
    """Resident set size of process ``pid`` in MiB (Linux ``/proc``; None elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory_probe(url: str, pid: int, count: int, k: int) -> dict:
    """RSS of the server after a warm-up and after ``count`` distinct queries (one client)."""
    import httpx

    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(3):  # the allocator's steady state for the usual query lengths
            for query in QUERIES:
                http.get("/api/search", params={"q": query, "k": k})
        before = rss_mb(pid)
        started = time.perf_counter()
        errors = sum(http.get("/api/search", params={"q": q, "k": k}).status_code != 200
                     for q in distinct_queries(count))
        wall = time.perf_counter() - started
        after = rss_mb(pid)
    row = {"bench": "server_memory", "distinct_queries": count, "errors": errors,
           "rss_before_mb": None if before is None else round(before, 1),
           "rss_after_mb": None if after is None else round(after, 1), "wall_s": round(wall, 1)}
    if before is not None and after is not None:
        row["rss_growth_kb_per_query"] = round(1024 * (after - before) / max(1, count), 2)
    return row


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


# ----------------------------------------------------------------------------- the driver

def start_server(index: str, port: int, threads: str, max_batch: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    command = [sys.executable, "-m", "tbps", "serve", "--index", index, "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--log-level", "warning", "--max-batch", str(max_batch)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 300) -> dict:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"tbps serve exited with {process.returncode}: {process.stdout.read()[-2000:]}")
        try:
            return httpx.get(f"{url}/healthz", timeout=2).json()
        except httpx.TransportError:
            time.sleep(0.3)
    raise SystemExit(f"tbps serve did not answer within {timeout:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(args: argparse.Namespace) -> list[dict]:
    rows = []
    for max_batch in args.max_batch:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args.index, port, args.threads, max_batch)
        try:
            health = wait_ready(server, url)
            if args.distinct > 0:
                row = {**memory_probe(url, server.pid, args.distinct, args.k), "max_batch": max_batch,
                       "gallery_size": health["gallery_size"], "model": health["model"],
                       "time": datetime.datetime.now().isoformat(timespec="seconds")}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for concurrency in args.clients:
                requests_per_client = max(args.min_requests_per_client, args.requests // concurrency)
                # the clients run in a second process, as a real client would
                result = subprocess.run(
                    [sys.executable, __file__, "_client", "--url", url, "--concurrency", str(concurrency),
                     "--requests-per-client", str(requests_per_client), "--warmup", str(args.warmup),
                     "--k", str(args.k)], check=True, capture_output=True, text=True)
                measured = json.loads(result.stdout)
                latencies = measured["latencies"]
                row = {
                    "bench": "server_load", "max_batch": max_batch, "clients": concurrency,
                    "requests": len(latencies), "errors": measured["errors"], "k": args.k,
                    "requests_per_s": round(len(latencies) / measured["wall"], 2),
                    "p50_ms": round(1000 * percentile(latencies, 50), 1),
                    "p95_ms": round(1000 * percentile(latencies, 95), 1),
                    "p99_ms": round(1000 * percentile(latencies, 99), 1),
                    "mean_ms": round(1000 * statistics.fmean(latencies), 1),
                    "gallery_size": health["gallery_size"], "model": health["model"],
                    "server_threads": int(args.threads), "cores": os.cpu_count(),
                    "cpu": platform.processor() or platform.machine(),
                    "load_average": round(os.getloadavg()[0], 2),
                    "time": datetime.datetime.now().isoformat(timespec="seconds"),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| server | clients | requests | requests/s | p50 (ms) | p95 (ms) | p99 (ms) | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    memory = [r for r in rows if r.get("bench") == "server_memory"]
    rows = [r for r in rows if r.get("bench") != "server_memory"]
    for r in rows:
        server = "batching (max 32)" if r["max_batch"] > 1 else "one query at a time"
        if r["max_batch"] not in (1, 32):
            server = f"batching (max {r['max_batch']})"
        lines.append(f"| {server} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.1f} | {r['p50_ms']:.1f} "
                     f"| {r['p95_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} |")
    for r in memory:
        lines.append(f"\nserver RSS {r['rss_before_mb']} MiB after warm-up, {r['rss_after_mb']} MiB after "
                     f"{r['distinct_queries']:,} distinct queries ({r.get('rss_growth_kb_per_query')} KiB per query)")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        p = argparse.ArgumentParser(prog="server_load.py _client")
        p.add_argument("_client")
        p.add_argument("--url", required=True)
        p.add_argument("--concurrency", type=int, required=True)
        p.add_argument("--requests-per-client", type=int, required=True)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--k", type=int, default=10)
        a = p.parse_args()
        print(json.dumps(run_clients(a.url, a.concurrency, a.requests_per_client, a.warmup, a.k)))
        return

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", required=True, help="an index folder written by tbps index")
    parser.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16],
                        help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=400, help="timed requests per level (all clients)")
    parser.add_argument("--min-requests-per-client", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="untimed requests per client first")
    parser.add_argument("--k", type=int, default=10, help="results per search")
    parser.add_argument("--max-batch", type=lambda s: [int(v) for v in s.split(",")], default=[32, 1],
                        help="server settings to compare (tbps serve --max-batch), comma-separated")
    parser.add_argument("--threads", default="1", help="the server's torch / BLAS threads")
    parser.add_argument("--distinct", type=int, default=1000,
                        help="distinct queries between the two RSS readings of the server (0: no memory probe)")
    parser.add_argument("--slot", action="store_true", help="wait for a compare_methods.py CPU slot first")
    parser.add_argument("--out", default=str(RESULTS), help="JSON lines appended here")
    args = parser.parse_args()
    if not (Path(args.index) / "manifest.json").is_file():
        raise SystemExit(f"{args.index}: not an index folder (build one with tbps index)")

    if args.slot:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from compare_methods import cpu_slot

        with cpu_slot("server_load"):
            rows = measure(args)
    else:
        rows = measure(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
