"""Text -> person in footage, end to end, on synthetic scenes: detection AP@0.5 of the offline
detector, and R@k of captions against the crops it indexes, beside the same with ground-truth boxes.

    python benchmarks/footage.py --checkpoint runs/bench21/train/best.pt --out runs/footage-bench

The scenes show the test identities of the SynthPEDES set the checkpoint was trained on (same
``--ids`` and ``--seed``), so no person in the footage was seen in training. Every caption of every
person in the footage is a query; it scores at k when a crop of that person (IoU >= 0.5 with the
person's true box in that frame) is among the top k. Rows land in ``--results`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="runs/footage-bench")
    parser.add_argument("--ids", type=int, default=200, help="--ids of the SynthPEDES set the model trained on")
    parser.add_argument("--seed", type=int, default=0, help="--seed of that set")
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--frames", type=int, default=24)
    parser.add_argument("--people-per-frame", type=int, default=3)
    parser.add_argument("--sample-fps", type=float, default=None, help="default: every frame of the 4 fps videos")
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[1, 2],
                        help="seeds of the scenes the HOG detector is trained on (not --seed)")
    parser.add_argument("--results", default="benchmarks/results/footage.jsonl")
    args = parser.parse_args()

    import torch

    from tbps.footage.detect import BoxesDetector, HOGDetector
    from tbps.footage.hog_train import load_trained_hog, train_hog_detector
    from tbps.footage.evaluate import detector_ap, footage_recall
    from tbps.footage.ingest import build_footage_index
    from tbps.footage.scenes import generate_scenes
    from tbps.search.searcher import Searcher

    torch.set_num_threads(1)
    out = Path(args.out)
    scenes = out / "scenes"
    made = generate_scenes(scenes, num_ids=args.ids, seed=args.seed, cameras=args.cameras,
                           frames_per_camera=args.frames, people_per_frame=args.people_per_frame, progress=False)
    print(f"scenes: {made}")
    # the trained HOG learns from other scenes: other seeds, so other people and other backgrounds
    training = []
    for seed in args.train_seeds:
        folder = out / f"train-scenes-{seed}"
        generate_scenes(folder, num_ids=500, seed=seed, cameras=3, frames_per_camera=20, videos=False, progress=False)
        training.append(folder)
    started = time.perf_counter()
    print("trained HOG:", train_hog_detector(training, out / "detector_hog.npz"),
          f"{time.perf_counter() - started:.1f} s")
    detectors = {"ground-truth boxes": BoxesDetector(scenes / "annotations.json"),
                 "OpenCV HOG (INRIA)": HOGDetector(), "HOG trained on scenes": load_trained_hog(out / "detector_hog.npz")}
    detection = {}
    for name in list(detectors)[1:]:
        started = time.perf_counter()
        detection[name] = detector_ap(detectors[name], scenes)
        detection[name]["seconds_per_frame"] = (time.perf_counter() - started) / detection[name]["frames"]
        print(f"{name} on held-out scenes: {detection[name]}")
    rows = []
    for name, detector in detectors.items():
        index = out / ("index-" + "".join(c for c in name.lower() if c.isalnum()))
        if index.exists():
            shutil.rmtree(index)
        build_footage_index(args.checkpoint, scenes / "videos", index, detector, sample_fps=args.sample_fps,
                            progress=False, device="cpu", num_workers=0)
        searcher = Searcher(index, device="cpu")
        for grouped in (False, True):
            recall = footage_recall(searcher, scenes, group_tracks=grouped)
            row = {"boxes": name, "group_tracks": grouped, **{k: round(v, 2) for k, v in recall.items()},
                   "checkpoint": str(args.checkpoint), "scenes": made, "sample_fps": args.sample_fps}
            if name in detection:
                row["detection"] = {k: round(v, 3) for k, v in detection[name].items()}
            rows.append(row)
            print(json.dumps(row))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print("\n| boxes | AP@0.5 | one hit per track | R@1 | R@5 | R@10 | crops (false) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        ap = f"{row['detection']['AP50']:.1f}" if "detection" in row else "-"
        print(f"| {row['boxes']} | {ap} | {'yes' if row['group_tracks'] else 'no'} | {row['R1']:.1f} | "
              f"{row['R5']:.1f} | {row['R10']:.1f} | {int(row['crops'])} ({int(row['false_crops'])}) |")


if __name__ == "__main__":
    main()
