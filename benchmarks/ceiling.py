"""How high text-to-image R1 can go on a SynthPEDES set: an oracle that knows every caption's attributes.

A caption states some attributes (``make_caption``'s ``mentions``); when two test people both fit
everything a caption states, no model can tell which one it means. The oracle scores each gallery
image by how many of the caption's stated attributes its person has (the true person has all), and
takes the expected rank among ties: R1 = (true images in the tied top group) / (size of that group).
It does not see images, so it ignores what a caption says about the view (a caption of the back
never mentions a belt), and it is a ceiling for models that read captions as attribute lists.

The captions and their mentions are regenerated from the generator's seeds (the same random
streams as ``generate_synthpedes``), and checked against the dataset's JSON when ``--root`` is given.

    python benchmarks/ceiling.py --ids 500 --seed 1                 # the demo's data (tbps demo)
    python benchmarks/ceiling.py --ids 200 --seed 1                 # tbps demo --quick
    python benchmarks/ceiling.py --ids 500 --seed 1 --root runs/demo/data   # and check the captions
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tbps.data import synth


def caption_mentions(num_ids: int, images_per_id: int, captions_per_image: int, seed: int,
                     val_fraction: float = 0.1, test_fraction: float = 0.2):
    """Per test image: (pid, person, [(caption, mentions)]), replaying the generator's random streams."""
    people = synth.draw_identities(num_ids, np.random.default_rng([seed, 0]))
    n_train, n_val, n_test = synth.split_sizes(num_ids, val_fraction, test_fraction)
    rows = []
    for index in range(n_train + n_val, num_ids):
        pid, person = index + 1, people[index]
        start = int(np.random.default_rng([seed, 3, pid]).integers(3))
        for k in range(images_per_id):
            view = synth.VIEWS[(start + k) % 3]
            rng = np.random.default_rng([seed, 5, pid, k])
            captions: list[tuple[str, dict]] = []
            for _ in range(captions_per_image):  # as synth.captions_for
                for _attempt in range(5):
                    text, mentions = synth.make_caption(person, view, rng)
                    if text not in [c for c, _ in captions]:
                        break
                captions.append((text, mentions))
            rows.append((pid, person, captions))
    return rows


def oracle_metrics(rows) -> dict[str, float]:
    """Expected R1 of the attribute oracle, and how many test people fit a caption on average."""
    gallery = [(pid, person) for pid, person, _ in rows]
    r1, fits, mentioned = [], [], []
    for pid, _person, captions in rows:
        for _text, mentions in captions:
            scores = np.array([sum(getattr(p, k) == v for k, v in mentions.items()) for _, p in gallery])
            top = scores == scores.max()
            true = np.array([g == pid for g, _ in gallery])
            r1.append((top & true).sum() / top.sum())
            fits.append(len({g for (g, _), t in zip(gallery, top) if t}))
            mentioned.append(len(mentions))
    return {"R1": 100.0 * float(np.mean(r1)), "people_fitting": float(np.mean(fits)),
            "attributes_per_caption": float(np.mean(mentioned)), "queries": len(r1),
            "gallery": len(gallery)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ids", type=int, default=500, help="identities (tbps demo: 500, --quick: 200)")
    parser.add_argument("--images-per-id", type=int, default=4)
    parser.add_argument("--captions-per-image", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1, help="generator seed (tbps demo uses train.seed, 1)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as tbps synth")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="as tbps synth")
    parser.add_argument("--root", default="", help="a generated dataset to check the replayed captions against")
    args = parser.parse_args()
    rows = caption_mentions(args.ids, args.images_per_id, args.captions_per_image, args.seed,
                            args.val_fraction, args.test_fraction)
    if args.root:
        records = json.loads((Path(args.root) / synth.ANNOTATION_FILE).read_text())
        stored = [r["captions"] for r in records if r["split"] == "test"]
        replayed = [[c for c, _ in caps] for _, _, caps in rows]
        if stored != replayed:
            raise SystemExit(f"{args.root}: the replayed captions differ from the dataset's (other parameters?)")
    print(json.dumps({"ids": args.ids, "seed": args.seed, **oracle_metrics(rows)}))


if __name__ == "__main__":
    main()
