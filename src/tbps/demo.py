"""``tbps demo``: the whole pipeline on SynthPEDES, on the CPU, in minutes.

Synthesise a dataset, train a small IRRA model (tiny CLIP ResNet + the pretrained MiniLM text encoder that
ships offline), evaluate on the test split, and print three searches with the right person marked.
The recipe is ``configs/demo_cpu.yaml``; ``--quick`` shrinks data and budget.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from tbps.config import load_config
from tbps.errors import TBPSError

log = logging.getLogger("tbps.demo")

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (identities, images per identity, epochs) for the full demo and --quick
DEMO_SIZES = {"full": {"ids": 500, "images_per_id": 4, "epochs": 6},
              "quick": {"ids": 200, "images_per_id": 4, "epochs": 4}}


def demo_config_path() -> Path:
    path = REPO_CONFIGS / "demo_cpu.yaml"
    if not path.is_file():
        raise TBPSError(f"{path}: the demo recipe is missing (run tbps demo from a tbps checkout)")
    return path


def _ensure_dataset(root: Path, ids: int, images_per_id: int, height: int, width: int, seed: int) -> None:
    from tbps.data.synth import generate_synthpedes

    stamp = root / "synth_params.json"
    params = {"ids": ids, "images_per_id": images_per_id, "height": height, "width": width, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == params and (root / "reid_raw.json").is_file():
        log.info("reusing the synthetic dataset in %s", root)
        return
    generate_synthpedes(root, num_ids=ids, images_per_id=images_per_id, height=height, width=width,
                        seed=seed, progress=True)
    stamp.write_text(json.dumps(params))


def print_searches(evaluator, records, num_queries: int = 3, top_k: int = 5, seed: int = 0) -> list[dict]:
    """Rank the test gallery for a few test captions; print top-k paths and whether each is a match.

    Uses the evaluator's own gallery embedding and scoring hook, so the searches rank exactly as
    the reported metrics do.
    """
    with torch.inference_mode():
        image_feats = evaluator.embed_gallery()
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randperm(len(records), generator=generator)[:num_queries].tolist()
        searches = []
        for idx in picks:
            record = records[idx]
            caption = record.captions[0]
            text_feats = evaluator.model.embed_texts(evaluator.tokenizer([caption]).to(evaluator.device))
            scores = evaluator.similarity(text_feats, image_feats)[0]
            top = torch.topk(scores, k=min(top_k, len(records)))
            print(f'\nquery: "{caption}"')
            results = []
            for rank, (score, gi) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
                match = records[gi].pid == record.pid
                mark = "right person" if match else "other person"
                print(f"  {rank}. {score:+.3f}  {'✓' if match else '✗'} {mark:<12}  {records[gi].image_path}")
                results.append({"rank": rank, "path": records[gi].image_path, "score": score, "match": match})
            searches.append({"query": caption, "results": results})
    return searches


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device: str = "auto") -> dict:
    from tbps.data.datasets import load_dataset
    from tbps.data.transforms import build_image_transform
    from tbps.engine.checkpoint import load_model_from_checkpoint
    from tbps.engine.evaluator import Evaluator, format_metrics_table
    from tbps.engine.trainer import train

    out = Path(out)
    size = DEMO_SIZES["quick" if quick else "full"]
    started = time.perf_counter()
    cfg = load_config(demo_config_path(), [f"data.root={out / 'data'}", f"train.output_dir={out / 'train'}",
                                           f"train.epochs={size['epochs']}", f"train.device={device}"])
    print(f"[1/4] synthesising SynthPEDES ({size['ids']} identities) in {out / 'data'}")
    _ensure_dataset(out / "data", size["ids"], size["images_per_id"], 384, 128, cfg.train.seed)

    print(f"[2/4] training {cfg.model.name} ({cfg.model.image_backbone} + {cfg.model.text_pretrained or 'CLIP'} "
          f"text encoder) for {cfg.train.epochs} epochs on the CPU")
    train(cfg, output_dir=out / "train")
    checkpoint = out / "train" / "best.pt"

    print("[3/4] evaluating on the test split")
    model, cfg, tokenizer = load_model_from_checkpoint(checkpoint, device)
    dataset = load_dataset(cfg.data.dataset, cfg.data.root)
    transform = build_image_transform(cfg.data.image_size, train=False)
    evaluator = Evaluator(model, dataset.test, tokenizer, transform, cfg.eval, next(model.parameters()).device,
                          progress=True)
    metrics = evaluator.evaluate()
    test_metrics = {k: round(float(metrics[k]), 3) for k in ("R1", "R5", "R10", "mAP", "mINP")}
    (out / "test_metrics.json").write_text(json.dumps(test_metrics) + "\n")
    print(format_metrics_table(metrics))
    chance = 100.0 * 4 / max(1, len(dataset.test))
    print(f"(chance R1 is about {chance:.1f}%: {len(dataset.test)} gallery images of "
          f"{len({r.pid for r in dataset.test})} people)")

    print("[4/4] three searches of the test gallery (✓ = the described person)")
    searches = print_searches(evaluator, dataset.test)
    (out / "searches.json").write_text(json.dumps(searches, indent=2))

    minutes = (time.perf_counter() - started) / 60
    print(f"\ndone in {minutes:.1f} min. Outputs in {out}/:")
    print(f"  {out / 'train' / 'best.pt'}   the checkpoint      {out / 'train' / 'metrics.jsonl'}   training log")
    print(f"  {out / 'test_metrics.json'}   test metrics        {out / 'data'}   the synthetic dataset")
    print("Same on CUHK-PEDES (your copy, with imgs/ and reid_raw.json; CLIP ViT-B/16 weights as a local file):")
    print("  tbps data check --dataset cuhk-pedes --root /data/CUHK-PEDES")
    print("  tbps train --config configs/irra_cuhk.yaml data.root=/data/CUHK-PEDES model.pretrained=/weights/ViT-B-16.pt")
    print("  tbps eval --checkpoint runs/irra_cuhk/best.pt")
    return {"metrics": test_metrics, "minutes": minutes, "searches": searches}
