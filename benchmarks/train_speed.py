"""Training throughput (image-caption pairs per second) and peak memory of a recipe.

Each measurement runs in a fresh subprocess so that peak memory (ru_maxrss on the CPU,
torch.cuda.max_memory_allocated on a GPU) belongs to that configuration alone. The batches are
random tensors of the recipe's shapes: throughput of the model and optimiser step, not of image
decoding. Weights are random-initialised (same cost as pretrained ones).

    python benchmarks/train_speed.py                       # demo recipe and ViT-B/16, CPU (+ GPU if any)
    python benchmarks/train_speed.py --only vitb16 --device cuda --batch-size 64 --amp bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SETUPS = {
    # name: (recipe, overrides, description)
    "demo": ("configs/demo_cpu.yaml", [], "demo recipe: tiny CLIP ResNet 128x64 + MiniLM (4 of 6 layers frozen), SDM+ID"),
    "vitb16": ("configs/base.yaml", ["model.pretrained="], "IRRA: CLIP ViT-B/16 384x128, SDM+ID+IRR"),
}


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
            "peak_mib": peak, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU x{torch.get_num_threads()}",
            "amp": str(dtype).replace("torch.", "") if dtype else "fp32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SETUPS), help="measure one setup")
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
    rows = []
    for name in [args.only] if args.only else list(SETUPS):
        recipe, overrides, description = SETUPS[name]
        for device in devices:
            batch = args.batch_size or (64 if name == "demo" or device == "cuda" else 8)
            spec = {"recipe": recipe, "overrides": overrides, "device": device, "batch_size": batch,
                    "steps": args.steps, "warmup": args.warmup, "amp": args.amp}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"measurement {name} on {device} failed")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append((description, batch, result))
            print(f"{description} | batch {batch} | {result['device']} {result['amp']} | "
                  f"{result['pairs_per_s']:.1f} pairs/s | {result['s_per_step']:.3f} s/step | "
                  f"peak {result['peak_mib']:.0f} MiB | {result['params_m']:.1f}M params", flush=True)
    print("\n| setup | batch | device | precision | pairs/s | s/step | peak memory (MiB) | params (M) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for description, batch, r in rows:
        print(f"| {description} | {batch} | {r['device']} | {r['amp']} | {r['pairs_per_s']:.1f} | "
              f"{r['s_per_step']:.3f} | {r['peak_mib']:.0f} | {r['params_m']:.1f} |")


if __name__ == "__main__":
    main()
