"""Time and peak memory of ``rank_metrics`` against a naive full-sort evaluation, in the same run.

The naive implementation is what the reference code (IRRA) does: argsort the whole
(queries x gallery) matrix at once, gather the gallery ids in that order, and compute the metrics
from cumulative sums over full-size int64 matrices (the arithmetic is vectorised here, so its time
is if anything flattering). ``rank_metrics`` works on chunks of queries and never sorts.

Similarities are random but realistically structured: captions and images of the same person share
a random identity vector plus noise (cosine similarities of 64-d embeddings), with the person-id
structure of the test splits: CUHK-PEDES 6,156 captions x 3,074 images of 1,000 people, ICFG-PEDES
19,848 x 19,848 of 1,000 people, and with ``--large`` 100,000 x 100,000 of 5,000 people, scored
through the streaming form (``rank_metrics_from_scores``) since the full matrix alone is 40 GB.

Every measurement runs in a fresh subprocess. Peak memory is the growth of the resident set while
the metric runs: the peak-RSS counter (VmHWM) is reset through /proc/self/clear_refs once the input
is ready, and read afterwards (GPU: torch.cuda.max_memory_allocated). The input matrix itself is
reported separately. The naive method is skipped where its estimated peak would not fit in the
memory available now (``--naive-max-gb``).

    python benchmarks/eval_speed.py                          # CUHK + ICFG scale, CPU
    python benchmarks/eval_speed.py --large --out benchmarks/eval_speed.md
    python benchmarks/eval_speed.py --scales cuhk --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCALES = {
    # name: (queries, gallery images, identities, description)
    "cuhk": (6156, 3074, 1000, "CUHK-PEDES test"),
    "icfg": (19848, 19848, 1000, "ICFG-PEDES test"),
    "large": (100_000, 100_000, 5000, "100k x 100k"),
}
# bytes per (query, gallery) pair held at the naive method's peak: argsort indices, gathered ids
# (int64 each), the match mask, its int64 cumulative sum and float32 precision terms
NAIVE_BYTES_PER_SCORE = 34
EMBED_DIM = 64
NOISE = 1.25  # per-sample noise around the identity vector: R1 lands near published numbers


# ----------------------------------------------------------------------------- the naive reference

def naive_rank_metrics(similarity, query_pids, gallery_pids, ks=(1, 5, 10)) -> dict[str, float]:
    """Full descending argsort of the whole matrix at once, then cumulative sums (reference style)."""
    import torch

    order = torch.argsort(similarity, dim=1, descending=True)
    matches = gallery_pids[order] == query_pids[:, None]  # (Q, G) bool
    del order
    hits = matches.cumsum(1)  # number of matches seen up to each position, int64 (Q, G)
    positions = torch.arange(1, similarity.shape[1] + 1, dtype=torch.float32)
    precision = hits / positions  # precision at every position, float32 (Q, G)
    num_matches = matches.sum(1)
    average_precision = (precision * matches).sum(1) / num_matches
    last = similarity.shape[1] - torch.argmax(matches.flip(1).to(torch.uint8), dim=1)  # rank of the last match
    inp = num_matches / last
    out = {f"R{k}": float((hits[:, k - 1] > 0).float().mean() * 100) for k in ks}
    out["mAP"] = float(average_precision.mean() * 100)
    out["mINP"] = float(inp.mean() * 100)
    return out


# ----------------------------------------------------------------------------- child process

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make_inputs(queries: int, gallery: int, ids: int, seed: int, device):
    """Identity-structured embeddings: cosine similarity of (identity vector + noise) pairs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    gallery_pids = torch.randperm(gallery, generator=gen) % ids
    query_pids = gallery_pids[torch.arange(queries) % gallery]  # each image described 1-2 times
    centres = torch.randn(ids, EMBED_DIM, generator=gen)

    def embed(pids):
        feats = centres[pids] + NOISE * torch.randn(len(pids), EMBED_DIM, generator=gen)
        return torch.nn.functional.normalize(feats, dim=1).to(device)

    return embed(query_pids), embed(gallery_pids), query_pids, gallery_pids


def child(spec: dict) -> dict:
    import gc

    import torch

    from tbps.engine.metrics import default_chunk_size, rank_metrics, rank_metrics_from_scores

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    text, image, query_pids, gallery_pids = _make_inputs(spec["queries"], spec["gallery"], spec["ids"],
                                                         spec["seed"], device)
    method = spec["method"]
    similarity = None
    if method not in ("stream", "score-only"):
        similarity = text @ image.T
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") * 1024
        reset = _reset_peak_rss()

    start = time.perf_counter()
    if method == "naive":
        metrics = naive_rank_metrics(similarity, query_pids.to(device), gallery_pids.to(device))
    elif method == "stream":
        metrics = rank_metrics_from_scores(lambda s, e: text[s:e] @ image.T, len(query_pids), query_pids,
                                           gallery_pids)
    elif method == "score-only":  # the cost of producing the similarity rows of the streaming form
        chunk = default_chunk_size(len(gallery_pids))
        for s in range(0, len(query_pids), chunk):
            (text[s:s + chunk] @ image.T).max()
        metrics = {}
    else:
        metrics = rank_metrics(similarity, query_pids, gallery_pids, algorithm=spec["algorithm"])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kib("VmHWM") * 1024 - base if reset else -1
    matrix = similarity.numel() * similarity.element_size() if similarity is not None else 0
    return {"seconds": seconds, "peak_bytes": peak, "matrix_bytes": matrix, "metrics": metrics}


# ----------------------------------------------------------------------------- parent

def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time and peak memory of tbps.evaluation.rank_metrics against a naive full-sort "
        "evaluation (the reference code's approach), on random similarities with the person-id structure "
        "of the CUHK-PEDES and ICFG-PEDES test splits. Prints a markdown table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scales", nargs="+", default=["cuhk", "icfg"], choices=["cuhk", "icfg"],
                        help="split sizes to measure")
    parser.add_argument("--large", action="store_true",
                        help="also 100,000 x 100,000 (5,000 ids) through the streaming form (minutes on a CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement; the fastest is kept")
    parser.add_argument("--naive-max-gb", type=float, default=20.0,
                        help="skip the naive method where its estimated peak exceeds this or the memory available")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the similarities")
    parser.add_argument("--out", default=None, help="also write the markdown table to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    plan = []
    for scale in args.scales:
        plan += [(scale, "naive", "naive: full argsort at once"),
                 (scale, "sort", "rank_metrics, algorithm=sort (chunked stable sort)"),
                 (scale, "count", "rank_metrics, algorithm=count (chunked, no sort)"),
                 (scale, "auto", "rank_metrics, default (threshold or count per chunk)")]
    if args.large:
        plan += [("large", "score-only", "scoring only (text @ image.T per chunk), no ranking"),
                 ("large", "stream", "rank_metrics_from_scores (scoring + ranking)")]

    rows = []
    reference: dict[str, dict] = {}
    for scale, method, label in plan:
        queries, gallery, ids, desc = SCALES[scale]
        spec = {"queries": queries, "gallery": gallery, "ids": ids, "seed": args.seed, "device": args.device,
                "threads": args.threads, "method": method if method in ("naive", "stream", "score-only") else "rank",
                "algorithm": method}
        if method == "naive":
            need = NAIVE_BYTES_PER_SCORE * queries * gallery
            limit = min(args.naive_max_gb * 2**30, _mem_available() - 3 * 2**30)
            if args.device == "cpu" and need > limit:
                rows.append((desc, queries, gallery, label, None, None, None,
                             f"skipped: needs about {_gib(need)}, {_gib(max(limit, 0))} allowed"))
                continue
        best = None
        for _ in range(args.repeats):
            result = _run_child(spec, args.timeout)
            if "error" in result:
                best = result
                break
            if best is None or result["seconds"] < best["seconds"]:
                best = result
        print(f"{desc:18s} {label:55s} {json.dumps(best)}", file=sys.stderr, flush=True)
        if "error" in best:
            rows.append((desc, queries, gallery, label, None, None, None, f"failed: {best['error'][:80]}"))
            continue
        metrics = best["metrics"]
        note = ""
        if metrics and scale in reference:
            diff = max(abs(metrics[k] - reference[scale][k]) for k in reference[scale])
            note = f"max difference from the first row: {diff:.1e}"
        elif metrics:
            reference[scale] = metrics
        rows.append((desc, queries, gallery, label, best["seconds"], best["peak_bytes"], metrics, note))

    lines = [
        f"Machine: {_cpu_name()}, {os.cpu_count()} cores, torch {_torch_version()}, {args.threads} threads, "
        f"device {args.device}.",
        "",
        "| split scale | queries x gallery | implementation | time (s) | peak memory added | R1 | mAP | mINP | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for desc, queries, gallery, label, seconds, peak, metrics, note in rows:
        cells = [f"{seconds:.2f}" if seconds is not None else "-",
                 _gib(peak) if peak is not None and peak >= 0 else "-"]
        cells += [f"{metrics[k]:.3f}" if metrics else "-" for k in ("R1", "mAP", "mINP")]
        lines.append(f"| {desc} | {queries:,} x {gallery:,} | {label} | " + " | ".join(cells) + f" | {note} |")
    sizes = sorted({(SCALES[s][0], SCALES[s][1]) for s in args.scales})
    lines.append("")
    lines.append("The float32 similarity matrix itself (not counted above): " + ", ".join(
        f"{q:,} x {g:,} = {_gib(4 * q * g)}" for q, g in sizes) + "." + (
        " The 100k x 100k run never holds it (it would be 37 GiB)." if args.large else ""))
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    raise SystemExit(main())
