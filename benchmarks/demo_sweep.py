"""Sweep the demo recipe: train ``configs/demo_cpu.yaml`` with overrides on one SynthPEDES set, score the
test split, and append a row (settings, val curve, test R1/mAP, minutes, pairs/s, machine load).

Each row is a fresh ``tbps train`` + ``tbps eval`` subprocess, so rows are independent. The data is
made once per ``--ids`` in ``--data`` exactly as ``tbps demo`` makes it (seed = train.seed = 1), so
the rows score the demo's own test split. Timings depend on the load of a shared machine: each row
records the 1-minute load average at start and end; compare rows measured under similar load.

    python benchmarks/demo_sweep.py run NAME [--ids 500] [--threads 1] key=value ...
    python benchmarks/demo_sweep.py table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "demo_sweep.jsonl"


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def run(name: str, ids: int, threads: int, workers: int, data: Path, out: Path, overrides: list[str]) -> dict:
    from tbps.demo import _ensure_dataset

    root = data / f"ids{ids}"
    _ensure_dataset(root, ids, 4, 384, 128, 1)
    run_dir = out / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tbps = [sys.executable, "-m", "tbps"]
    load_start, started = _load(), time.perf_counter()
    subprocess.run([*tbps, "train", "--config", str(REPO / "configs" / "demo_cpu.yaml"), f"data.root={root}",
                    f"train.output_dir={run_dir}", f"data.num_workers={workers}", *overrides],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - started) / 60
    load_end = _load()
    test = json.loads(subprocess.run([*tbps, "eval", "--checkpoint", str(run_dir / "best.pt"), "--json"],
                                     check=True, env=env, capture_output=True, text=True).stdout)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [round(r["R1"], 1) for r in log if "R1" in r and r.get("split", "val") == "val"]
    pairs = [r["pairs_per_s"] for r in log if "pairs_per_s" in r]
    row = {"name": name, "ids": ids, "overrides": overrides, "threads": threads, "workers": workers,
           "test_R1": test["R1"], "test_mAP": test["mAP"], "val_R1": val, "train_minutes": round(minutes, 2),
           "pairs_per_s": round(sum(pairs) / len(pairs), 1) if pairs else None,
           "load": [load_start, load_end], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table() -> None:
    if not RESULTS.is_file():
        raise SystemExit(f"{RESULTS}: no rows yet (run one with: demo_sweep.py run NAME key=value ...)")
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    print("| name | settings | val R1 by epoch | test R1 | test mAP | train min | pairs/s | load |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['name']} | `{' '.join(r['overrides'])}` | {', '.join(map(str, r['val_R1']))} | "
              f"{r['test_R1']:.1f} | {r['test_mAP']:.1f} | {r['train_minutes']:.1f} | {r['pairs_per_s']} | "
              f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="train + evaluate one setting and append its row")
    one.add_argument("name")
    one.add_argument("overrides", nargs="*", help="key=value changes to configs/demo_cpu.yaml")
    one.add_argument("--ids", type=int, default=500, help="identities (tbps demo: 500, --quick: 200)")
    one.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    one.add_argument("--workers", type=int, default=1, help="data.num_workers")
    one.add_argument("--data", type=Path, default=Path("runs/demo_sweep/data"))
    one.add_argument("--out", type=Path, default=Path("runs/demo_sweep"))
    sub.add_parser("table", help="print the rows as a Markdown table")
    args, extra = parser.parse_known_args()  # key=value overrides may follow the options
    if args.command != "run" and extra or any("=" not in e for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "table":
        table()
    else:
        overrides = [*args.overrides, *extra]
        print(json.dumps(run(args.name, args.ids, args.threads, args.workers, args.data, args.out, overrides)))


if __name__ == "__main__":
    main()
