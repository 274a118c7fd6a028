"""Search speed and accuracy of the gallery index (benchmarks/README.md, "Search speed").

``synthetic``: queries per second, latency percentiles (p50/p95/p99, one query at a time), build
time, memory, and FAISS recall@10 against exact search, for galleries of 10^3 to 10^6 L2-normalised
vectors at the demo's width (128) and ViT-B/16's (512). The vectors are clustered like a person
gallery (a few images per identity around an identity centre; a query lies near one centre), which
is kinder to approximate search than uniform noise and closer to real embeddings.

``gallery``: a trained checkpoint on a dataset split (SynthPEDES by default): indexes the split's
images with ``build_index``, searches every caption through ``Searcher`` and reports R1/R5/R10/mAP
of the index's search with and without re-ranking next to the evaluator's own numbers, with
per-query latency.

    python benchmarks/search_speed.py synthetic --sizes 1e3,1e4,1e5,1e6 --dims 128,512
    python benchmarks/search_speed.py gallery --checkpoint runs/demo/train/best.pt
    python benchmarks/search_speed.py table

Rows are appended to benchmarks/results/search_speed.jsonl. ``--threads`` (default 1) sets the
BLAS/OpenMP threads; ``--slot`` waits for a comparison slot of benchmarks/compare_methods.py so the
measurement neither disturbs nor is disturbed by the method comparison runs.
"""

from __future__ import annotations

import os
import sys


def _early_threads() -> str:
    """BLAS reads its thread count at import: set it from --threads before numpy is imported."""
    threads = "1"
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            threads = sys.argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = threads
    return threads


_early_threads()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "search_speed.jsonl"
sys.path.insert(0, str(REPO / "src"))

from tbps.search.ann import FaissIndex, exact_topk  # noqa: E402
from tbps.search.index import DEFAULT_SHARD_SIZE  # noqa: E402


def rss_mb() -> float:
    """Resident memory of this process now (Linux /proc), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def maybe_slot(enabled: bool, name: str):
    if not enabled:
        yield
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from compare_methods import cpu_slot

    with cpu_slot(name):
        yield


def environment(threads: str) -> dict:
    return {"threads": int(threads), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "time": datetime.datetime.now().isoformat(timespec="seconds")}


# ----------------------------------------------------------------------------- synthetic galleries

def clustered_vectors(size: int, dim: int, seed: int, per_identity: int = 4, noise: float = 0.6,
                      centres: np.ndarray | None = None, attributes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``size`` unit vectors around ``size / per_identity`` identity centres (or the given ones).

    With ``attributes``, identity centres gather around ``identities / 100`` attribute centres
    (people who share clothing colours and bags), so a query's neighbours beyond its own identity
    are similar people. Without, identity centres are uniform on the sphere: beyond the 4 images of
    its identity a query's top 10 are near-ties, the hard case for approximate search.
    """
    rng = np.random.default_rng(seed)

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    if centres is None and not attributes:
        centres = unit(rng.standard_normal((max(1, size // per_identity), dim), dtype=np.float32))
    if centres is None:
        identities = max(1, size // per_identity)
        attributes = unit(rng.standard_normal((max(8, identities // 100), dim), dtype=np.float32))
        centres = unit(attributes[rng.integers(0, len(attributes), identities)]
                       + rng.standard_normal((identities, dim), dtype=np.float32) / np.sqrt(dim))
    owner = rng.integers(0, len(centres), size)
    vectors = np.empty((size, dim), dtype=np.float32)
    for start in range(0, size, 65536):  # in chunks: bounded temporary memory at 10^6 x 512
        end = min(size, start + 65536)
        vectors[start:end] = unit(centres[owner[start:end]] + (noise / np.sqrt(dim))
                                  * rng.standard_normal((end - start, dim), dtype=np.float32))
    return vectors, centres


def time_searches(search, queries: np.ndarray, k: int, latency_queries: int) -> dict:
    """Latency of one query at a time, and throughput of one batch of all queries."""
    search(queries[:1], k)  # warm-up
    latencies = []
    for i in range(min(latency_queries, len(queries))):
        start = time.perf_counter()
        search(queries[i:i + 1], k)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    search(queries, k)
    batch_seconds = time.perf_counter() - start
    return {**percentiles(latencies), "qps_single": round(len(latencies) / sum(latencies), 1),
            "qps_batch": round(len(queries) / batch_seconds, 1), "batch": len(queries)}


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def run_synthetic(args: argparse.Namespace) -> None:
    import faiss

    faiss.omp_set_num_threads(int(args.threads))
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    backends = args.backends.split(",")
    env = environment(args.threads)
    for dim in dims:
        for size in sizes:
            base_rss = rss_mb()
            gallery, centres = clustered_vectors(size, dim, seed=0, attributes=not args.uniform_identities)
            queries, _ = clustered_vectors(args.queries, dim, seed=1, centres=centres)
            # the index stores shards of DEFAULT_SHARD_SIZE rows; exact search walks them the same way
            blocks = [gallery[s:s + DEFAULT_SHARD_SIZE] for s in range(0, size, DEFAULT_SHARD_SIZE)]
            truth = None
            for backend in backends:
                row = {"bench": "synthetic", "data": "uniform-identities" if args.uniform_identities else "attributes",
                       "size": size, "dim": dim, "backend": backend, "k": args.k, **env}
                if backend == "exact":
                    start = time.perf_counter()
                    scores, truth = exact_topk(queries, blocks, args.k)
                    row.update(build_s=0.0, index_mb=round(gallery.nbytes / 2**20, 1), recall_at_10=1.0)
                    row.update(time_searches(lambda q, k: exact_topk(q, blocks, k), queries, args.k,
                                             args.latency_queries))
                else:
                    if truth is None:
                        _, truth = exact_topk(queries, blocks, args.k)
                    if backend == "faiss-hnsw" and size > args.max_hnsw:
                        print(f"skip {backend} at {size} x {dim}: over --max-hnsw {args.max_hnsw}", flush=True)
                        continue
                    before = rss_mb()
                    start = time.perf_counter()
                    ann = FaissIndex.build(gallery, backend)
                    build_s = time.perf_counter() - start
                    with tempfile.TemporaryDirectory() as tmp:
                        ann.save(Path(tmp) / "ann.faiss")
                        index_mb = (Path(tmp) / "ann.faiss").stat().st_size / 2**20
                    _, found = ann.search(queries, args.k)
                    row.update(build_s=round(build_s, 2), index_mb=round(index_mb, 1),
                               rss_growth_mb=round(rss_mb() - before, 1), recall_at_10=round(recall_at(found, truth), 4),
                               params={**ann.params, **({"nprobe": int(ann.index.nprobe)} if backend == "faiss-ivf"
                                                        else {"ef_search": int(ann.index.hnsw.efSearch)})})
                    row.update(time_searches(lambda q, k: ann.search(q, k), queries, args.k, args.latency_queries))
                    del ann
                row.update(gallery_rss_mb=round(rss_mb() - base_rss, 1), peak_rss_mb=round(peak_rss_mb(), 1))
                print(json.dumps(row), flush=True)
                append_row(Path(args.out), row)
            del gallery, blocks


# ----------------------------------------------------------------------------- a real gallery

def run_gallery(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(int(args.threads))
    from tbps.data.datasets import load_dataset
    from tbps.data.transforms import build_image_transform
    from tbps.engine.evaluator import Evaluator
    from tbps.engine.metrics import rank_metrics
    from tbps.search.index import build_index
    from tbps.search.rerank import rerank
    from tbps.search.searcher import Searcher

    env = environment(args.threads)
    out = Path(args.index_dir or tempfile.mkdtemp(prefix="tbps_index_"))
    start = time.perf_counter()
    from tbps.config import config_from_dict
    from tbps.engine.checkpoint import read_checkpoint

    cfg = config_from_dict(read_checkpoint(args.checkpoint)["config"])
    dataset_name = args.dataset or cfg.data.dataset
    root = args.root or cfg.data.root
    records = load_dataset(dataset_name, root).split(args.split)
    listing = out.parent / f"{out.name}.images.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join(str(Path(r.image_path).resolve()) for r in records) + "\n")
    summary = build_index(args.checkpoint, listing, out, batch_size=64, device="cpu", num_workers=0, progress=False,
                          backend="exact")
    index_s = time.perf_counter() - start
    searcher = Searcher(out, device="cpu")
    assert searcher.paths == [str(Path(r.image_path).resolve()) for r in records], "index rows != split order"
    captions = [c for r in records for c in r.captions]
    query_pids = [r.pid for r in records for _ in r.captions]
    gallery_pids = [r.pid for r in records]

    # the evaluator's own numbers for the same model and split (full similarity, no shortlist)
    transform = build_image_transform(searcher.cfg.data.image_size, train=False)
    evaluator = Evaluator(searcher.model, records, searcher.tokenizer, transform, searcher.cfg.eval, searcher.device,
                          progress=False)
    reference = evaluator.evaluate()

    with torch.inference_mode():
        text = searcher.embed_queries(captions)
        scores, rows = searcher.shortlist(text["global"].numpy(), searcher.size)  # the full global ranking
    size = searcher.size

    def as_similarity(orderings: list[np.ndarray]) -> np.ndarray:
        """A (Q, G) matrix that ranks each query's gallery in the given order (for rank_metrics)."""
        sim = np.empty((len(orderings), size), dtype=np.float32)
        for q, order in enumerate(orderings):
            sim[q, order] = -np.arange(size, dtype=np.float32)
        return sim

    configs = [("off", 0)] + ([("on", s) for s in args.shortlists] if searcher.has_rerank else [])
    for mode, shortlist in configs:
        orderings = [r for r in rows]
        if mode == "on":
            with torch.inference_mode():
                heads = rerank(searcher.model, text, searcher.index.gather, searcher.index.feature_keys,
                               [r[:shortlist] for r in rows], searcher.device)
            orderings = [np.concatenate([head_rows, r[shortlist:]]) for (_, head_rows), r in zip(heads, rows)]
        metrics = rank_metrics(torch.from_numpy(as_similarity(orderings)), query_pids, gallery_pids)
        # the public API must rank as computed here
        check = searcher.search(captions[:20], top_k=10, rerank=mode == "on", shortlist=max(shortlist, 1))
        assert all([r["index"] for r in c] == o[:10].tolist() for c, o in zip(check, orderings[:20])), mode
        latencies, stages = [], {"embed": [], "shortlist": [], "rerank": []}
        for caption in captions[:args.latency_queries]:
            t0 = time.perf_counter()
            searcher.search([caption], top_k=10, rerank=mode == "on", shortlist=max(shortlist, 1))
            latencies.append(time.perf_counter() - t0)
            for key in stages:
                stages[key].append(searcher.last_timing[key])
        t0 = time.perf_counter()
        searcher.search(captions[:256], top_k=10, rerank=mode == "on", shortlist=max(shortlist, 1))
        batch_qps = min(256, len(captions)) / (time.perf_counter() - t0)
        row = {"bench": "gallery", "checkpoint": str(args.checkpoint), "model": searcher.model_name,
               "dataset": dataset_name, "split": args.split, "gallery": size, "queries": len(captions),
               "rerank": mode, "shortlist": shortlist if mode == "on" else None, "has_rerank": searcher.has_rerank,
               **{k: round(float(metrics[k]), 3) for k in ("R1", "R5", "R10", "mAP", "mINP")},
               "evaluator": {k: round(float(reference[k]), 3) for k in ("R1", "R5", "R10", "mAP", "mINP")},
               **percentiles(latencies), "qps_single": round(len(latencies) / sum(latencies), 1),
               "qps_batch256": round(batch_qps, 1),
               "stage_ms_p50": {k: round(float(np.median(v)) * 1000, 3) for k, v in stages.items()},
               "index_seconds": round(index_s, 1), "indexed": summary["total"], **env}
        print(json.dumps(row), flush=True)
        append_row(Path(args.out), row)


def print_tables(args: argparse.Namespace) -> None:
    """Markdown tables of the latest row per configuration in ``--out``."""
    rows: dict[tuple, dict] = {}
    for line in Path(args.out).read_text().splitlines():
        row = json.loads(line)
        if row["bench"] == "synthetic":
            rows[("synthetic", row.get("data", "attributes"), row["dim"], row["size"], row["backend"])] = row
        else:
            rows[("gallery", row["checkpoint"], row["rerank"], row["shortlist"])] = row
    print("| data | dim | gallery | backend | build (s) | index (MiB) | recall@10 | p50 (ms) | p95 (ms) "
          "| p99 (ms) | QPS, 1 query | QPS, batch 256 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    order = {"exact": 0, "faiss-hnsw": 1, "faiss-ivf": 2}
    for key in sorted((k for k in rows if k[0] == "synthetic"), key=lambda k: (k[1], k[2], k[3], order[k[4]])):
        r = rows[key]
        backend = r["backend"] + (f" (nprobe {r['params']['nprobe']}/{r['params']['nlist']})"
                                  if r["backend"] == "faiss-ivf" else "")
        print(f"| {key[1]} | {r['dim']} | {r['size']:,} | {backend} | {r['build_s']:g} | {r['index_mb']:g} "
              f"| {r['recall_at_10']:.3f} | {r['p50_ms']:g} | {r['p95_ms']:g} | {r['p99_ms']:g} "
              f"| {r['qps_single']:g} | {r['qps_batch']:g} |")
    print()
    print("| checkpoint | model | gallery x queries | re-rank | R1 | R5 | R10 | mAP | mINP | evaluator R1 / mAP "
          "| p50 (ms) | p95 (ms) | embed / shortlist / re-rank p50 (ms) | QPS, batch 256 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in sorted((k for k in rows if k[0] == "gallery"), key=lambda k: (k[1], k[2], k[3] or 0)):
        r = rows[key]
        mode = f"on, shortlist {r['shortlist']}" if r["rerank"] == "on" else "off"
        st = r["stage_ms_p50"]
        print(f"| {r['checkpoint']} | {r['model']} | {r['gallery']} x {r['queries']} | {mode} | {r['R1']:.2f} "
              f"| {r['R5']:.2f} | {r['R10']:.2f} | {r['mAP']:.2f} | {r['mINP']:.2f} "
              f"| {r['evaluator']['R1']:.2f} / {r['evaluator']['mAP']:.2f} | {r['p50_ms']:g} | {r['p95_ms']:g} "
              f"| {st['embed']:g} / {st['shortlist']:g} / {st['rerank']:g} | {r['qps_batch256']:g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("synthetic", help="exact and FAISS on synthetic normalised vectors")
    p.add_argument("--sizes", default="1e3,1e4,1e5,1e6", help="gallery sizes, comma-separated")
    p.add_argument("--dims", default="128,512", help="embedding widths (128: the demo, 512: ViT-B/16)")
    p.add_argument("--backends", default="exact,faiss-hnsw,faiss-ivf")
    p.add_argument("--queries", type=int, default=256, help="queries (the batch for throughput)")
    p.add_argument("--latency-queries", type=int, default=100, help="queries timed one at a time")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-hnsw", type=float, default=1e6, help="largest gallery to build HNSW for")
    p.add_argument("--uniform-identities", action="store_true",
                   help="identity centres uniform on the sphere (the hard case for approximate search)")
    p = sub.add_parser("gallery", help="accuracy and latency of index search on a dataset split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--root", default=None, help="default: the checkpoint's")
    p.add_argument("--split", default="test")
    p.add_argument("--shortlists", type=lambda s: [int(v) for v in s.split(",")], default=[100],
                   help="shortlist sizes to re-rank, comma-separated")
    p.add_argument("--latency-queries", type=int, default=200)
    p.add_argument("--index-dir", default=None, help="where to build the index (default: a temporary folder)")
    for q in sub.choices.values():
        q.add_argument("--threads", default="1", help="BLAS / OpenMP / torch threads")
        q.add_argument("--slot", action="store_true", help="wait for a compare_methods.py CPU slot first")
        q.add_argument("--out", default=str(RESULTS), help="JSON lines appended here")
    p = sub.add_parser("table", help="print the results as markdown tables")
    p.add_argument("--out", default=str(RESULTS), help="the JSON lines file to read")
    args = parser.parse_args()
    if args.bench == "table":
        print_tables(args)
        return
    with maybe_slot(args.slot, f"search_speed {args.bench}"):
        run_synthetic(args) if args.bench == "synthetic" else run_gallery(args)


if __name__ == "__main__":
    main()
