"""Training throughput (image-caption pairs per second) and peak memory of a recipe.

Each measurement runs in a fresh subprocess so that peak memory (ru_maxrss on the CPU,
torch.cuda.max_memory_allocated on a GPU) belongs to that configuration alone. The batches are
random tensors of the recipe's shapes: throughput of the model and optimiser step, not of image
decoding. Weights are random-initialised (same cost as pretrained ones).

    python benchmarks/train_speed.py                       # demo recipe and ViT-B/16, CPU (+ GPU if any)
    python benchmarks/train_speed.py --only vitb16 --device cuda --batch-size 64 --amp bf16
    python benchmarks/train_speed.py --methods --device cuda --amp bf16   # the six methods at paper size

``--methods`` measures each method's paper recipe (``configs/<method>_base.yaml``: its own backbone)
at 384x128 with batch 64, the issue-17 size. BERT-base towers (ACSA, PCC) are built from a BERT-base
config written here with MiniLM's uncased vocabulary (the same 30,522 word pieces), since nothing is
downloaded and random weights cost the same. FLOPs per step are counted once by
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention; element-wise
work is not counted), so "achieved TFLOP/s" is a floor on the arithmetic the step did per second.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETUPS = {
    # name: (recipe, overrides, description)
    "demo": ("configs/demo_cpu.yaml", [], "demo recipe: tiny CLIP ResNet 128x64 + MiniLM (4 of 6 layers frozen), SDM+ID"),
    "vitb16": ("configs/base.yaml", ["model.pretrained="], "IRRA: CLIP ViT-B/16 384x128, SDM+ID+IRR"),
}
BERT = "<bert-base>"  # replaced by the folder written by bert_base_folder()
PAPER = ["model.pretrained=", "data.image_size=[384,128]"]
METHOD_SETUPS = {
    "irra": ("configs/base.yaml", PAPER, "IRRA: CLIP ViT-B/16, SDM+ID+IRR"),
    "fcsa": ("configs/fcsa_base.yaml", PAPER, "FCSA: CLIP ViT-B/16, ID+CMPM+CMRS x2, masked captions"),
    "cffa": ("configs/cffa_base.yaml", PAPER, "CFFA: CLIP ViT-B/16, MAL+ID+IRR, FLFR heads"),
    "acsa": ("configs/acsa_base.yaml", PAPER + [f"model.text_pretrained={BERT}", f"data.tokenizer={BERT}"],
             "ACSA: Swin-T + BERT-base (frozen), CMPM+CMPC+cross-scale"),
    "pcc": ("configs/pcc_base.yaml", PAPER + [f"model.text_pretrained={BERT}", f"data.tokenizer={BERT}"],
            "PCC: ResNet-50 + BERT-base, 3 levels, CMR"),
    "pcc_vit": ("configs/pcc_vit_base.yaml", PAPER, "PCC: CLIP ViT-B/16, 3 levels, CMR"),
    "textreid": ("configs/textreid_base.yaml", PAPER, "TextReID: CLIP RN101 + CLIP text, align+instance+MoCo"),
}

# BERT-base (uncased) architecture, as its published config.json
BERT_BASE = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
             "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
             "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "vocab_size": 30522,
             "pad_token_id": 0}


def bert_base_folder(root: Path) -> Path:
    """A BERT-base config folder (no weights) with MiniLM's tokenizer files: random-init speed runs only."""
    from tbps.data.tokenizers import _minilm_folder

    folder = root / "bert-base-config"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BERT_BASE))
    source = _minilm_folder()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    return folder


def measure(recipe: str, overrides: list[str], device: str, batch_size: int, steps: int, warmup: int,
            amp: str) -> dict:
    import torch

    from tbps.config import load_config
    from tbps.data.tokenizers import build_tokenizer
    from tbps.engine.optim import build_optimizer
    from tbps.inference import amp_dtype
    from tbps.models import build_model

    cfg = load_config(REPO / recipe, overrides + [f"data.batch_size={batch_size}", f"train.amp={amp}"])
    torch.manual_seed(0)
    dev = torch.device(device)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
    num_classes = 1000
    model = build_model(cfg, num_classes, tokenizer, load_pretrained=False).to(dev).train()
    optimizer = build_optimizer(model, cfg.optim)
    dtype = amp_dtype(cfg.train.amp, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    h, w = cfg.data.image_size
    captions = ["a woman in a red coat and black trousers carrying a white handbag"] * batch_size
    batch = {
        "images": torch.randn(batch_size, 3, h, w, device=dev),
        "token_ids": tokenizer(captions).to(dev),
        "pids": (torch.arange(batch_size, device=dev) // 4) % num_classes,
        "image_ids": torch.arange(batch_size, device=dev),
    }
    k = int(getattr(cfg.data, "positives", 0) or 0)
    if k:  # FCSA's hard-positive swap candidates, as the loader attaches them
        batch["pos_images"] = torch.randn(batch_size, k, 3, h, w, device=dev)
        batch["pos_token_ids"] = batch["token_ids"][:, None].repeat(1, k, 1)
        batch["pos_image_ids"] = batch_size + torch.arange(batch_size * k, device=dev).view(batch_size, k)

    def step() -> None:
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            out = model(batch)
        loss = sum(v for k, v in out.items() if k.startswith("loss_"))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:  # one counted step (after warm-up: lazily built state does not count)
        step()
    flops = counter.get_total_flops()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"pairs_per_s": batch_size * steps / seconds, "s_per_step": seconds / steps,
            "gflop_per_step": flops / 1e9, "tflops": flops / (seconds / steps) / 1e12,
            "peak_mib": peak, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()}",
            "amp": str(dtype).replace("torch.", "") if dtype else "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SETUPS) + sorted(METHOD_SETUPS), help="measure one setup")
    parser.add_argument("--methods", action="store_true",
                        help="measure the six methods' paper recipes at 384x128 (default batch 64) instead")
    parser.add_argument("--json", type=Path, help="also append each row to this jsonl file")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cpu, plus cuda if available)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (demo), 8 on CPU / 64 on GPU (ViT-B/16)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--amp", default="auto", help="auto, bf16, fp16 or off (GPU only)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return

    import torch

    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    setups = {**SETUPS, **METHOD_SETUPS}
    names = [args.only] if args.only else list(METHOD_SETUPS if args.methods else SETUPS)
    scratch = Path(tempfile.mkdtemp(prefix="tbps_speed_"))
    rows, failed = [], []
    for name in names:
        recipe, overrides, description = setups[name]
        if any(BERT in o for o in overrides):
            bert = str(bert_base_folder(scratch))
            overrides = [o.replace(BERT, bert) for o in overrides]
        for device in devices:
            paper = name in METHOD_SETUPS
            batch = args.batch_size or (64 if name == "demo" or paper or device == "cuda" else 8)
            spec = {"recipe": recipe, "overrides": overrides, "device": device, "batch_size": batch,
                    "steps": args.steps, "warmup": args.warmup, "amp": args.amp}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:  # report it and go on: one broken setup must not cost the others
                print(proc.stderr[-2000:], file=sys.stderr)
                print(f"measurement {name} on {device} failed", file=sys.stderr, flush=True)
                failed.append(f"{name}/{device}")
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((description, batch, result))
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps({"setup": name, "description": description, "batch": batch,
                                             "recipe": recipe, "overrides": overrides, **result}) + "\n")
            print(f"{description} | batch {batch} | {result['device']} {result['amp']} | "
                  f"{result['pairs_per_s']:.1f} pairs/s | {result['s_per_step']:.3f} s/step | "
                  f"peak {result['peak_mib']:.0f} MiB | {result['params_m']:.1f}M params | "
                  f"{result['gflop_per_step']:.0f} GFLOP/step, {result['tflops']:.1f} TFLOP/s", flush=True)
    print("\n| setup | batch | device | precision | pairs/s | s/step | peak memory (MiB) | params (M) "
          "| GFLOP/step | TFLOP/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for description, batch, r in rows:
        print(f"| {description} | {batch} | {r['device']} | {r['amp']} | {r['pairs_per_s']:.1f} | "
              f"{r['s_per_step']:.3f} | {r['peak_mib']:.0f} | {r['params_m']:.1f} | "
              f"{r['gflop_per_step']:.0f} | {r['tflops']:.2f} |")
    shutil.rmtree(scratch, ignore_errors=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
