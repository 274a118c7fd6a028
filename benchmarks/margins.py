"""How far each caption's own person stands above the hardest other person, in training batches and on
the test split: the diagnostic behind "why does a hinge loss (CFFA's MAL) lose to SDM here".

A hinge loss stops pulling a pair once the pair clears its margin, whereas SDM (a KL divergence
between the softmax over the batch and the identity distribution) never does. So this script
embeds the training and test splits with a checkpoint's global embeddings (cosine, as the losses see
them) and reports:

- ``mal_active``: the share of training pairs whose MAL cost (``tbps.losses.cffa.mal_loss``,
  ``reduction="none"``, margin, tau and the code's negative scale ``floor(1000/B)/1000``) is above 0,
  in identity batches of ``--batch-ids`` people x ``--per-id`` images, as the trainer draws them;
- ``train_gap`` / ``test_gap``: the median, over captions, of (best same-person image) - (best other
  person's image), in those batches for training, over the whole gallery for the test split;
- ``train_r1`` / ``test_r1``: the share of captions whose best image is their person's, over the whole
  split, on the global embedding alone (a method that fuses more scores reports its fused R1 elsewhere).

    python benchmarks/margins.py runs/compare/cffa/seed0/last.pt runs/compare/cffa-sdm_for_mal/seed0/last.pt \\
        --data runs/compare/data --json margins.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from tbps.data.datasets import load_dataset
from tbps.errors import TBPSError
from tbps.inference import Embedder, load_model
from tbps.losses.cffa import mal_loss, mal_negative_scale


def pairs(records) -> tuple[list[str], list[str], torch.Tensor]:
    """Every (caption, its image, its person) of a split, a caption each."""
    captions, images, pids = [], [], []
    for record in records:
        for caption in record.captions:
            captions.append(caption)
            images.append(record.image_path)
            pids.append(record.pid)
    return captions, images, torch.tensor(pids)


def best_gap(scores: torch.Tensor, query_pids: torch.Tensor, gallery_pids: torch.Tensor) -> torch.Tensor:
    """Per query: best same-person score - best other-person score (> 0: ranked right at 1)."""
    same = query_pids[:, None] == gallery_pids[None, :]
    positive = scores.masked_fill(~same, float("-inf")).max(dim=1).values
    negative = scores.masked_fill(same, float("-inf")).max(dim=1).values
    return positive - negative


def identity_batches(pids: torch.Tensor, batch_ids: int, per_id: int, seed: int) -> list[torch.Tensor]:
    """Row indices of batches of ``batch_ids`` people with ``per_id`` pairs each (a person with fewer
    pairs gives what it has), the people shuffled with ``seed``: the trainer's identity sampler."""
    generator = torch.Generator().manual_seed(seed)
    people = pids.unique()
    people = people[torch.randperm(len(people), generator=generator)]
    batches = []
    for start in range(0, len(people) - batch_ids + 1, batch_ids):
        rows = [torch.nonzero(pids == p).flatten()[:per_id] for p in people[start:start + batch_ids]]
        batches.append(torch.cat(rows))
    return batches


def diagnose(checkpoint: Path, data: Path, dataset: str, batch_ids: int, per_id: int, margin: float, tau: float,
             seed: int = 0) -> dict:
    model, tokenizer, transform = load_model(checkpoint, "cpu")
    embedder = Embedder(model, tokenizer, transform, batch_size=64)
    split_data = load_dataset(dataset, data)
    out: dict = {"checkpoint": str(checkpoint), "method": model.tbps_config.model.name}
    for split in ("train", "test"):
        captions, images, pids = pairs(split_data.split(split))
        text = F.normalize(embedder.embed_texts(captions)["global"], dim=-1)
        image = F.normalize(embedder.embed_image_files(images)["global"], dim=-1)
        scores = text @ image.t()
        whole = best_gap(scores, pids, pids)
        out[f"{split}_r1"] = round(100 * float((whole > 0).float().mean()), 2)
        if split == "test":
            out["test_gap"] = round(float(whole.median()), 4)
            continue
        active, gaps = [], []
        for rows in identity_batches(pids, batch_ids, per_id, seed):
            b_pids = pids[rows]
            cost = mal_loss(image[rows], text[rows], b_pids, margin=margin, tau=tau, reduction="none",
                            negative_scale=mal_negative_scale(len(rows)))
            active.append(cost > 0)
            gaps.append(best_gap(scores[rows][:, rows], b_pids, b_pids))
        out["mal_active"] = round(100 * float(torch.cat(active).float().mean()), 2)
        out["train_gap"] = round(float(torch.cat(gaps).median()), 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path, help="tbps checkpoints (last.pt) to diagnose")
    parser.add_argument("--data", type=Path, required=True, help="the dataset folder they were trained on")
    parser.add_argument("--dataset", default="synth", help="its format (default synth: SynthPEDES)")
    parser.add_argument("--batch-ids", type=int, default=32, help="people a training batch (default 32)")
    parser.add_argument("--per-id", type=int, default=2, help="pairs a person in a batch (default 2)")
    parser.add_argument("--margin", type=float, default=0.1, help="MAL's margin (default CFFA's 0.1)")
    parser.add_argument("--tau", type=float, default=0.015, help="MAL's temperature (default CFFA's 0.015)")
    parser.add_argument("--json", type=Path, help="also write one JSON line a checkpoint to this file")
    args = parser.parse_args()
    rows = []
    try:
        for checkpoint in args.checkpoints:
            if not checkpoint.is_file():
                raise TBPSError(f"{checkpoint}: no such checkpoint")
            rows.append(diagnose(checkpoint, args.data, args.dataset, args.batch_ids, args.per_id, args.margin,
                                 args.tau))
            print(json.dumps(rows[-1]), flush=True)
    except TBPSError as err:
        sys.exit(f"error: {err}")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, args.json)
    keys = ("mal_active", "train_gap", "train_r1", "test_gap", "test_r1")
    print("| checkpoint | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 1))
    for r in rows:
        print(f"| {r['checkpoint']} | " + " | ".join(str(r[k]) for k in keys) + " |")
    if len(rows) > 1:
        print("mean: " + "  ".join(f"{k} {statistics.mean(r[k] for r in rows):.4g}" for k in keys))


if __name__ == "__main__":
    main()
