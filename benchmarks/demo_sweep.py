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


def run(name: str, ids: int, threads: int, workers: int, data: Path, out: Path, overrides: list[str],
        images_per_id: int = 4, config: str = "configs/demo_cpu.yaml",
        fractions: tuple[float, float] = (0.1, 0.2)) -> dict:
    from tbps.demo import _ensure_dataset

    root = data / (f"ids{ids}" if images_per_id == 4 else f"ids{ids}x{images_per_id}")
    if fractions != (0.1, 0.2):  # the generator's default split keeps the folder names of earlier rows
        root = root.with_name(root.name + f"_v{fractions[0]:g}_t{fractions[1]:g}")
    _ensure_dataset(root, ids, images_per_id, 384, 128, 1, *fractions)
    run_dir = out / name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tbps = [sys.executable, "-m", "tbps"]
    load_start, started = _load(), time.perf_counter()
    subprocess.run([*tbps, "train", "--config", str(REPO / config), f"data.root={root}",
                    f"train.output_dir={run_dir}", f"data.num_workers={workers}", *overrides],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - started) / 60
    load_end = _load()
    test = json.loads(subprocess.run([*tbps, "eval", "--checkpoint", str(run_dir / "best.pt"), "--json"],
                                     check=True, env=env, capture_output=True, text=True).stdout)
    log = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    val = [round(r["R1"], 1) for r in log if "R1" in r and r.get("split", "val") == "val"]
    pairs = [r["pairs_per_s"] for r in log if "pairs_per_s" in r]
    row = {"name": name, **({} if config == "configs/demo_cpu.yaml" else {"config": config}),
           **({} if fractions == (0.1, 0.2) else {"val_fraction": fractions[0], "test_fraction": fractions[1]}),
           "ids": ids, "images_per_id": images_per_id, "overrides": overrides, "threads": threads, "workers": workers,
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
    print("| name | ids x images | settings | val R1 by epoch | test R1 | test mAP | train min | pairs/s | load |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        ids = f"{r['ids']}x{r.get('images_per_id', 4)}"
        print(f"| {r['name']} | {ids} | `{' '.join(r['overrides'])}` | {', '.join(map(str, r['val_R1']))} | "
              f"{r['test_R1']:.1f} | {r['test_mAP']:.1f} | {r['train_minutes']:.1f} | {r['pairs_per_s']} | "
              f"{r['load'][0]:.1f}-{r['load'][1]:.1f} |")


# ----------------------------------------------------------------------------- diagnosis

ATTRIBUTES = ("gender", "hair_length", "hair_colour", "upper_type", "upper_colour", "upper_pattern",
              "pattern_colour", "lower_type", "lower_colour", "shoe_colour", "bag_type", "bag_colour",
              "headwear", "headwear_colour", "belt", "logo")


def _people(root: Path) -> tuple[dict[int, object], dict[str, int]]:
    """Ground truth replayed from the generator: {original pid: PersonAttributes}, {image file: pid}."""
    import numpy as np

    from tbps.data import synth

    params = json.loads((root / "synth_params.json").read_text())
    people = synth.draw_identities(params["ids"], np.random.default_rng([params["seed"], 0]))
    records = json.loads((root / synth.ANNOTATION_FILE).read_text())
    return {i + 1: p for i, p in enumerate(people)}, {Path(r["file_path"]).name: int(r["id"]) for r in records}


def diagnose(checkpoint: Path, probe: bool) -> dict:
    """Where a trained demo model's test errors come from, and whether the frozen features hold each attribute.

    1. Test text-to-image: for every query whose top image is another person, which of the caption's
       stated attributes that person lacks (the attributes the model confused), how many stated
       attributes the wrong person matched, and how often it shows every stated colour on some garment
       (a bag-of-colours match); the text embedding's cosine between a caption and the same caption
       with two garments' colours swapped. 2. R1 on 100 training people (same gallery size as the
       test split): the gap to test R1 is memorisation. 3. With ``probe``: per attribute, a logistic
       regression on the frozen blocks' (cached) output and on the trained global embedding, fit on
       the training images and scored on the test images, against always guessing the majority value.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from sklearn.linear_model import LogisticRegression

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ceiling import caption_mentions

    from tbps.engine.evaluator import Evaluator, checkpoint_evaluator

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    evaluator, _, root = checkpoint_evaluator(checkpoint, split="test", device="cpu", progress=False,
                                              num_workers=0)
    root = Path(root)
    people, pid_of = _people(root)
    params = json.loads((root / "synth_params.json").read_text())
    with torch.inference_mode():
        text, image = evaluator.embed_captions(), evaluator.embed_gallery()
        sims = evaluator.similarity(text, image).float()
    gallery_pids = [pid_of[Path(p).name] for p in evaluator.image_paths]
    mentions = [m for _, _, caps in caption_mentions(params["ids"], params["images_per_id"], 2, params["seed"],
                                                          params.get("val_fraction", 0.1), params.get("test_fraction", 0.2))
                for _, m in caps]
    query_pids = [pid_of[Path(p).name] for p in evaluator.image_paths for _ in range(2)]
    top = sims.argmax(dim=1).tolist()
    confused: dict[str, int] = {}
    stated: dict[str, int] = {}
    wrong, matched, unresolvable, all_colours_shown = 0, [], 0, 0
    colour_keys = ("upper_colour", "lower_colour", "shoe_colour", "bag_colour", "hair_colour", "headwear_colour")
    for q, (pid, said) in enumerate(zip(query_pids, mentions)):
        for key in said:
            stated[key] = stated.get(key, 0) + 1
        other = gallery_pids[top[q]]
        if other == pid:
            continue
        wrong += 1
        lacks = [k for k, v in said.items() if getattr(people[other], k) != v]
        # a bag-of-colours match: every stated colour is somewhere on the wrong person
        all_colours_shown += {said[k] for k in colour_keys if k in said} <= {getattr(people[other], k)
                                                                            for k in colour_keys}
        matched.append(len(said) - len(lacks))
        unresolvable += not lacks
        for key in lacks:
            confused[key] = confused.get(key, 0) + 1
    out: dict = {"checkpoint": str(checkpoint), "test_R1": 100.0 * (1 - wrong / len(top)), "wrong": wrong,
                 "wrong_fits_caption": unresolvable, "wrong_shows_every_stated_colour": all_colours_shown,
                 "stated_attributes_the_wrong_person_matched": float(np.mean(matched)) if matched else 0.0,
                 "confused": {k: [confused[k], stated[k]] for k in sorted(confused, key=confused.get, reverse=True)}}
    # colour binding in the text embedding: a caption against its garment colours swapped, a paraphrase, another colour
    model = evaluator.model
    probes = ["A man in a red shirt, black jeans and white shoes.", "A man in a black shirt, red jeans and white shoes.",
              "A man wearing white shoes, black jeans and a red shirt.", "A man in a blue shirt, black jeans and white shoes."]
    with torch.inference_mode():
        e = F.normalize(evaluator.embedder.embed_texts(probes)["global"].float(), dim=-1)
    out["text_cosine"] = {name: round(float(e[0] @ e[i]), 3) for i, name in
                          ((1, "colours_swapped"), (2, "paraphrase"), (3, "other_shirt_colour"))}
    # memorisation: R1 on the first 100 training people (their captions were trained on)
    train_all, _, _ = checkpoint_evaluator(checkpoint, split="train", device="cpu", progress=False, num_workers=0)
    keep = set(sorted({r.pid for r in train_all.records})[:100])
    train100 = Evaluator(train_all.model, [r for r in train_all.records if r.pid in keep], train_all.tokenizer,
                         train_all.image_transform, train_all.cfg, "cpu", progress=False)
    out["train100_R1"] = train100.evaluate()["R1"]
    if probe:
        trunk = evaluator.model.image_encoder.backbone

        def features(ev) -> tuple[np.ndarray, np.ndarray]:
            frozen, emb = [], []
            with torch.inference_mode():
                for start in range(0, len(ev.image_paths), 128):
                    batch = torch.stack([ev.image_transform(Image.open(p).convert("RGB"))
                                         for p in ev.image_paths[start:start + 128]])
                    x = batch * trunk.input_scale + trunk.input_shift
                    for block in trunk.blocks()[:max(trunk.frozen_blocks, 1)]:
                        x = block(x)
                    frozen.append(x.flatten(1).numpy())
                    emb.append(ev.embedder.image_batch(batch)["global"].numpy())
            return np.concatenate(frozen), np.concatenate(emb)

        train_pids = [pid_of[Path(p).name] for p in train_all.image_paths]
        (f_tr, e_tr), (f_te, e_te) = features(train_all), features(evaluator)
        probes = {}
        for key in ATTRIBUTES:
            y_tr = np.array([getattr(people[p], key) for p in train_pids])
            y_te = np.array([getattr(people[p], key) for p in gallery_pids])
            if len(set(y_tr)) < 2:
                continue
            values, counts = np.unique(y_tr, return_counts=True)
            row = {"majority": round(100.0 * float(np.mean(y_te == values[counts.argmax()])), 1)}
            for name, (a, b) in {"frozen": (f_tr, f_te), "embedding": (e_tr, e_te)}.items():
                mean, std = a.mean(0), a.std(0) + 1e-6
                clf = LogisticRegression(max_iter=300, C=0.1).fit((a - mean) / std, y_tr)
                row[name] = round(100.0 * float(clf.score((b - mean) / std, y_te)), 1)
            probes[key] = row
        out["probe_test_accuracy"] = probes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="train + evaluate one setting and append its row")
    one.add_argument("name")
    one.add_argument("overrides", nargs="*", help="key=value changes to configs/demo_cpu.yaml")
    one.add_argument("--ids", type=int, default=500, help="identities (tbps demo: 500, --quick: 200)")
    one.add_argument("--images-per-id", type=int, default=4, help="images of each identity (tbps demo: 4)")
    one.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs")
    one.add_argument("--workers", type=int, default=1, help="data.num_workers")
    one.add_argument("--data", type=Path, default=Path("runs/demo_sweep/data"))
    one.add_argument("--out", type=Path, default=Path("runs/demo_sweep"))
    one.add_argument("--val-fraction", type=float, default=0.1, help="share of identities in val (tbps synth)")
    one.add_argument("--test-fraction", type=float, default=0.2, help="share of identities in test (tbps synth)")
    one.add_argument("--config", default="configs/demo_cpu.yaml",
                     help="recipe to train instead of the demo's (another method on the demo's data)")
    sub.add_parser("table", help="print the rows as a Markdown table")
    diag = sub.add_parser("diagnose", help="which attributes a trained model confuses; memorisation; probes")
    diag.add_argument("checkpoint", type=Path)
    diag.add_argument("--probe", action="store_true", help="also fit per-attribute linear probes")
    args, extra = parser.parse_known_args()  # key=value overrides may follow the options
    if args.command != "run" and extra or any("=" not in e for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "table":
        table()
    elif args.command == "diagnose":
        print(json.dumps(diagnose(args.checkpoint, args.probe), indent=1))
    else:
        overrides = [*args.overrides, *extra]
        print(json.dumps(run(args.name, args.ids, args.threads, args.workers, args.data, args.out, overrides,
                             args.images_per_id, args.config, (args.val_fraction, args.test_fraction))))


if __name__ == "__main__":
    main()
