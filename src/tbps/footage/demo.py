"""``tbps demo --scenes``: from raw synthetic camera footage to a text search of the people in it.

The quick demo (``tbps.demo.run_demo``) trains the model on SynthPEDES crops; then the footage path
runs on people that model never saw: ``tbps synth --scenes`` renders three cameras of the test
identities as MP4 videos, a HOG person detector trained on other synthetic scenes (other people,
other backgrounds; ``tbps train-detector``) finds the people in frames sampled from the videos,
the crops are indexed with camera, time and box (``OUT/footage_index``), and captions of people in
the footage are searched, reporting whether a crop of the described person comes first.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

SCENES = {"cameras": 3, "frames_per_camera": 16, "people_per_frame": 3, "fps": 4}
SAMPLE_FPS = 2.0


def run_footage_demo(out: str | Path = "runs/demo-scenes", device: str = "auto",
                     checkpoint: str | Path | None = None) -> dict[str, Any]:
    """Train (unless ``checkpoint`` is given), render footage, detect, index, search; returns metrics."""
    from tbps.demo import DEMO_SIZES, run_demo
    from tbps.footage.hog_train import load_trained_hog, train_hog_detector
    from tbps.footage.evaluate import crop_identities, footage_recall
    from tbps.footage.ingest import build_footage_index
    from tbps.footage.scenes import generate_scenes, load_annotations
    from tbps.io import write_text_atomic
    from tbps.search.searcher import Searcher

    out = Path(out)
    started = time.perf_counter()
    ids = DEMO_SIZES["quick"]["ids"]
    if checkpoint is None:
        print("=== the model: the quick demo (tbps demo --quick) trains it on SynthPEDES crops ===")
        run_demo(out=out, quick=True, device=device)
        checkpoint = out / "train" / "best.pt"
    scenes = out / "scenes"
    print(f"\n=== footage: {SCENES['cameras']} cameras of people the model never saw, in {scenes} ===")
    made = generate_scenes(scenes, num_ids=ids, seed=0, cameras=SCENES["cameras"],
                           frames_per_camera=SCENES["frames_per_camera"], people_per_frame=SCENES["people_per_frame"],
                           fps=SCENES["fps"], progress=False)
    print(f"rendered {made['frames']} frames ({made['boxes']} people, {made['identities']} identities) and "
          f"{made['cameras']} videos: {scenes / 'videos'}")
    print("training the HOG person detector on other synthetic scenes (seed 1: other people and places)")
    training = out / "detector_scenes"
    generate_scenes(training, num_ids=500, seed=1, cameras=3, frames_per_camera=20, videos=False, progress=False)
    detector_file = out / "detector_hog.npz"
    train_hog_detector([training], detector_file)
    index_dir = out / "footage_index"
    if index_dir.exists():
        shutil.rmtree(index_dir)  # an earlier run's index: maybe another model
    print(f"detecting people (trained HOG) in the videos at {SAMPLE_FPS:g} frames/s and indexing the crops")
    summary = build_footage_index(checkpoint, scenes / "videos", index_dir, load_trained_hog(detector_file),
                                  sample_fps=SAMPLE_FPS,
                                  progress=False, device=device)
    print(f"{summary['frames']} frames sampled, {summary['total']} person crops indexed in {index_dir}")

    searcher = Searcher(index_dir, device=device)
    data = load_annotations(scenes)
    owners = crop_identities(searcher.index.metadata, scenes)
    searches = []
    for pid in list(data["identities"])[:3]:
        caption = data["identities"][pid]["captions"][0]
        print(f'\nquery: "{caption}"')
        hits = searcher.search([caption], top_k=3, group_tracks=True)[0]
        for hit in hits:
            right = owners[hit["index"]] == int(pid)
            print(f"  {hit['rank']}. {hit['score']:+.3f} {'✓' if right else '✗'} camera {hit['camera']} "
                  f"{hit.get('time_iso', hit['time'])} box {hit['box']}")
        searches.append({"query": caption, "pid": int(pid), "results": hits})
    metrics = {"plain": footage_recall(searcher, scenes), "grouped": footage_recall(searcher, scenes, group_tracks=True)}
    write_text_atomic(out / "footage_metrics.json", json.dumps(metrics, indent=1) + "\n")
    plain, grouped = metrics["plain"], metrics["grouped"]
    print(f"\ntext -> person in footage, {int(plain['queries'])} captions of the {made['identities']} people: "
          f"R@1 {plain['R1']:.1f}%  R@10 {plain['R10']:.1f}%  (one hit per track: R@1 {grouped['R1']:.1f}%  "
          f"R@10 {grouped['R10']:.1f}%)")
    minutes = (time.perf_counter() - started) / 60
    print(f"done in {minutes:.1f} min. Search the footage yourself:")
    print(f'  tbps search --index {index_dir} --camera cam02 --group-tracks "a woman in a red coat"')
    print(f"  tbps serve --index {index_dir}        # click a hit to see its frame")
    return {"metrics": metrics, "minutes": minutes, "searches": searches}
