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
    parser.add_argument("--results", default="benchmarks/results/footage.jsonl")
    args = parser.parse_args()

    import torch

    from tbps.footage.detect import BoxesDetector, HOGDetector
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
    started = time.perf_counter()
    detection = detector_ap(HOGDetector(), scenes)
    detection["seconds_per_frame"] = (time.perf_counter() - started) / detection["frames"]
    print(f"HOG on held-out scenes: {detection}")
    rows = []
    for name, detector in (("ground-truth boxes", BoxesDetector(scenes / "annotations.json")), ("HOG", HOGDetector())):
        index = out / ("index-gt" if name.startswith("ground") else "index-hog")
        if index.exists():
            shutil.rmtree(index)
        build_footage_index(args.checkpoint, scenes / "videos", index, detector, sample_fps=args.sample_fps,
                            progress=False, device="cpu", num_workers=0)
        searcher = Searcher(index, device="cpu")
        for grouped in (False, True):
            recall = footage_recall(searcher, scenes, group_tracks=grouped)
            row = {"boxes": name, "group_tracks": grouped, **{k: round(v, 2) for k, v in recall.items()},
                   "checkpoint": str(args.checkpoint), "scenes": made, "sample_fps": args.sample_fps}
            if name == "HOG":
                row["detection"] = {k: round(v, 3) for k, v in detection.items()}
            rows.append(row)
            print(json.dumps(row))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    print("\n| boxes | one hit per track | R@1 | R@5 | R@10 | crops (false) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['boxes']} | {'yes' if row['group_tracks'] else 'no'} | {row['R1']:.1f} | {row['R5']:.1f} | "
              f"{row['R10']:.1f} | {int(row['crops'])} ({int(row['false_crops'])}) |")


if __name__ == "__main__":
    main()
