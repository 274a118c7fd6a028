"""Compare methods on SynthPEDES with one data set, one seed and one budget.

Every row trains a recipe (``configs/<method>_synth.yaml`` plus ``key=value`` changes for an
ablation) on the same synthetic data for the same number of epochs with the same seed, then scores
its last checkpoint on the test split. ``--from`` re-scores another row's checkpoint with changed
inference options (no training), for ablations that only change how scores are computed.

Runs queue for one of two slots (one CPU thread each), so several people (or shells) can queue
runs on one machine without oversubscribing it: timings are of one thread, next to one other run.

    python benchmarks/compare_methods.py run irra --config configs/irra_synth.yaml
    python benchmarks/compare_methods.py run cffa_global --from cffa method.inference=global
    python benchmarks/compare_methods.py table
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "compare"
RESULTS = REPO / "benchmarks" / "results" / "synth_methods.jsonl"
# the comparison data and budget: change them and every row must be re-run
DATA = {"ids": 300, "images_per_id": 4, "captions_per_image": 2, "height": 384, "width": 128, "seed": 0}
EPOCHS = 5
SEED = 0
METRICS = ("R1", "R5", "R10", "mAP", "mINP")


SLOTS = 2  # runs at a time, one CPU thread each (see THREADS_ENV)
# One thread per run: two single-threaded runs use two cores better than one run with two threads,
# and a busy machine does not stall a run's threads on each other.
THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@contextlib.contextmanager
def cpu_slot(name: str):
    """Wait for one of ``SLOTS`` comparison slots on this machine, hold it while the body runs."""
    RUNS.mkdir(parents=True, exist_ok=True)
    handles = [open(RUNS / f".slot{i}", "w") for i in range(SLOTS)]
    held = None
    try:
        announced = False
        while held is None:
            for handle in handles:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = handle
                    break
                except BlockingIOError:
                    continue
            if held is None:
                if not announced:
                    print(f"[{name}] waiting for a free comparison slot ({SLOTS} runs at a time)", flush=True)
                    announced = True
                time.sleep(5)
        yield
    finally:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
        for handle in handles:
            handle.close()


@contextlib.contextmanager
def data_lock():
    RUNS.mkdir(parents=True, exist_ok=True)
    with open(RUNS / ".data_lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_data() -> Path:
    """The shared SynthPEDES comparison set, written once (call under the lock)."""
    root = RUNS / "data"
    stamp = root / "synth_params.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == DATA and (root / "reid_raw.json").is_file():
        return root
    from tbps.data.synth import generate_synthpedes

    generate_synthpedes(root, num_ids=DATA["ids"], images_per_id=DATA["images_per_id"],
                        captions_per_image=DATA["captions_per_image"], height=DATA["height"],
                        width=DATA["width"], seed=DATA["seed"], progress=True)
    stamp.write_text(json.dumps(DATA))
    return root


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def evaluate(checkpoint: Path, overrides: list[str]) -> dict:
    """Test-split metrics of a checkpoint in a fresh process (clean memory, comparable timing)."""
    cmd = [sys.executable, "-m", "tbps", "eval", "--checkpoint", str(checkpoint), "--split", "test",
           "--device", "cpu", "--json", *overrides]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **THREADS_ENV})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"evaluation failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    metrics = json.loads(proc.stdout.strip().splitlines()[-1])
    # the evaluator's own timing (embedding + scoring + ranking), from the row it appended
    rows = [json.loads(line) for line in (checkpoint.parent / "metrics.jsonl").read_text().splitlines() if line]
    evals = [r for r in rows if r.get("event") == "eval" and r.get("split") == "test"]
    metrics["eval_seconds"] = float(evals[-1]["seconds"]) if evals else round(seconds, 2)
    return metrics


def count_params(checkpoint: Path) -> float:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    return round(sum(v.numel() for v in state.values() if v.is_floating_point()) / 1e6, 2)


def save_row(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if RESULTS.is_file():
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["name"] != row["name"]] + [row]
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, RESULTS)


def run(args: argparse.Namespace) -> None:
    name = args.name
    if bool(args.config) == bool(args.source):
        raise SystemExit("give exactly one of --config (train a row) or --from (re-score a row's checkpoint)")
    with data_lock():
        data_root = ensure_data()
    with cpu_slot(name):
        out = RUNS / name
        epochs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("train.epochs=")]
        row = {"name": name, "overrides": list(args.overrides), "epochs": int(epochs[-1]) if epochs else EPOCHS,
               "seed": SEED, "data": DATA,
               "commit": _git_commit(), "date": datetime.date.today().isoformat()}
        if args.config:
            if out.exists():
                shutil.rmtree(out)
            cmd = [sys.executable, "-m", "tbps", "train", "--config", args.config, "--output-dir", str(out),
                   f"data.root={data_root}", f"train.epochs={EPOCHS}", f"train.seed={SEED}",
                   "train.eval_split=none", "train.device=cpu", *args.overrides]
            print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **THREADS_ENV})
            if proc.returncode != 0:
                raise SystemExit(f"[{name}] training failed (exit {proc.returncode})")
            row["train_seconds"] = round(time.perf_counter() - started, 1)
            summary = json.loads((out / "train_summary.json").read_text())
            row.update(config=args.config, steps=summary["steps"])
            checkpoint, eval_overrides = out / "last.pt", []
        else:
            source = RUNS / args.source
            checkpoint, eval_overrides = source / "last.pt", list(args.overrides)
            if not checkpoint.is_file():
                raise SystemExit(f"{checkpoint}: no checkpoint; run `{Path(__file__).name} run {args.source} "
                                 f"--config ...` first")
            previous = {r["name"]: r for r in load_rows()}.get(args.source, {})
            row.update(source=args.source, config=previous.get("config", ""),
                       overrides=previous.get("overrides", []) + list(args.overrides),
                       eval_overrides=list(args.overrides), steps=previous.get("steps"),
                       train_seconds=previous.get("train_seconds"))
        print(f"[{name}] evaluating {checkpoint} on the test split", flush=True)
        metrics = evaluate(checkpoint, eval_overrides)
        row.update({k: round(float(metrics[k]), 2) for k in METRICS})
        row["eval_seconds"] = round(float(metrics["eval_seconds"]), 2)
        row["params_m"] = count_params(checkpoint)
        save_row(row)
    print(f"[{name}] " + "  ".join(f"{k} {row[k]:.2f}" for k in METRICS)
          + f"  train {row.get('train_seconds')} s  eval {row['eval_seconds']} s")


def load_rows() -> list[dict]:
    if not RESULTS.is_file():
        return []
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]


def table(args: argparse.Namespace) -> None:
    rows = load_rows()
    if args.names:
        order = {n: i for i, n in enumerate(args.names)}
        rows = sorted((r for r in rows if r["name"] in order), key=lambda r: order[r["name"]])
    print("| run | recipe and changes | R1 | R5 | R10 | mAP | mINP | train (min) | eval (s) | params (M) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        changes = " ".join(f"`{o}`" for o in r.get("overrides", []))
        recipe = f"`{Path(r.get('config') or '?').name}`" + (f" {changes}" if changes else "")
        if r.get("source"):
            recipe += f" (checkpoint of `{r['source']}`, re-scored)"
        train_min = f"{r['train_seconds'] / 60:.1f}" if r.get("train_seconds") else "-"
        print(f"| {r['name']} | {recipe} | " + " | ".join(f"{r[k]:.2f}" for k in METRICS)
              + f" | {train_min} | {r['eval_seconds']:.1f} | {r.get('params_m', '-')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="train (or re-score) one row and record it")
    p.add_argument("name", help="row name, e.g. fcsa or fcsa_no_sgmm; also the run folder under runs/compare/")
    p.add_argument("--config", help="recipe to train, e.g. configs/fcsa_synth.yaml")
    p.add_argument("--from", dest="source", help="re-score this row's last.pt instead of training")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="with --config: training changes; with --from: inference-time changes")
    p.set_defaults(func=run)
    p = sub.add_parser("table", help="print the recorded rows as a markdown table")
    p.add_argument("names", nargs="*", help="rows to print, in this order (default: all)")
    p.set_defaults(func=table)
    args, extra = parser.parse_known_args()
    # key=value changes may stand anywhere on a `run` line, also after --config / --from
    if extra and (args.command != "run" or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    args.func(args)


if __name__ == "__main__":
    main()
