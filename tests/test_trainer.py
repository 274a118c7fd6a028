"""The trainer: exact resume, DDP on gloo with 2 processes, image check, classifier skipping."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from tbps.config import load_config
from tbps.data.synth import generate_synthpedes
from tbps.engine.checkpoint import read_checkpoint
from tbps.engine.trainer import train
from tbps.errors import TBPSError
from tbps.io import torch_save_atomic

TINY = [
    "data.dataset=synth", "data.image_size=[64, 32]", "data.text_length=24", "data.tokenizer=clip",
    "data.batch_size=8", "data.sampler=identity", "data.num_instances=2", "data.num_workers=0",
    "model.image_backbone=tiny-vit", "model.text_backbone=clip", "model.pretrained=",
    "method.cross_width=64", "method.cross_layers=1", "method.cross_heads=2",
    "optim.lr=1e-3", "optim.warmup_epochs=1", "optim.eps=1e-8", "train.amp=off", "train.log_every=1",
    "train.device=cpu", "eval.batch_size=32",
]


def tiny_cfg(root: Path, out: Path, *extra: str):
    return load_config(None, TINY + [f"data.root={root}", f"train.output_dir={out}", *extra])


def train_rows(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def test_train_writes_outputs_and_resume_is_exact(tiny_synth_root, tmp_path):
    full = tmp_path / "full"
    summary = train(tiny_cfg(tiny_synth_root, full, "train.epochs=2"))
    for name in ("config.yaml", "last.pt", "best.pt", "metrics.jsonl"):
        assert (full / name).is_file(), name
    reference = train_rows(full)
    steps_per_epoch = summary["steps"] // 2
    assert steps_per_epoch >= 2

    # a run that stops mid-way through epoch 2 (as a kill after a checkpoint would), then resumes
    cut = steps_per_epoch + 1
    part = tmp_path / "part"
    train(tiny_cfg(tiny_synth_root, part, "train.epochs=2", f"train.max_steps={cut}"))
    assert read_checkpoint(part / "last.pt")["train_state"]["step"] == cut
    train(tiny_cfg(tiny_synth_root, part, "train.epochs=2"), resume=True)
    resumed = train_rows(part)
    assert sorted(resumed) == sorted(reference)
    for step in range(cut + 1, summary["steps"] + 1):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    final_a = read_checkpoint(full / "last.pt")["model"]
    final_b = read_checkpoint(part / "last.pt")["model"]
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-4, atol=1e-5)


def test_resume_without_checkpoint_is_a_clear_error(tiny_synth_root, tmp_path):
    with pytest.raises(TBPSError, match="nothing to resume"):
        train(tiny_cfg(tiny_synth_root, tmp_path / "none"), resume=True)


def test_missing_images_are_reported_before_training(tmp_path):
    root = tmp_path / "broken"
    generate_synthpedes(root, num_ids=10, images_per_id=2, captions_per_image=1, height=64, width=32,
                        seed=1, progress=False)
    victims = sorted((root / "imgs").rglob("*.png"))[:3]
    for path in victims:
        path.unlink()
    with pytest.raises(TBPSError, match="3") as info:
        train(tiny_cfg(root, tmp_path / "out", "train.epochs=1"))
    assert victims[0].name in str(info.value)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_fine_tuning_skips_a_classifier_of_another_size(tiny_synth_root, tmp_path):
    first = tmp_path / "first"
    train(tiny_cfg(tiny_synth_root, first, "train.max_steps=1", "train.eval_split=none"))
    other = tmp_path / "other"
    generate_synthpedes(other, num_ids=14, images_per_id=2, captions_per_image=1, height=64, width=32,
                        seed=9, progress=False)
    out = tmp_path / "ft"
    train(tiny_cfg(other, out, "train.max_steps=1", "train.eval_split=none",
                   f"train.init_checkpoint={first / 'last.pt'}"))
    a = read_checkpoint(first / "last.pt")
    b = read_checkpoint(out / "last.pt")
    assert a["num_classes"] != b["num_classes"]


def _old_run(root: Path, out: Path, *extra: str) -> None:
    """A run as tbps wrote it before ``<|mask|>`` took id 49405: trained with the 49,409-id CLIP
    layout (``clip-legacy`` today), its config.yaml and checkpoints saying ``tokenizer: clip``."""
    train(tiny_cfg(root, out, "data.tokenizer=clip-legacy", *extra))
    for path in out.glob("*.pt"):
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["model"]["text_encoder.backbone.token_embedding.weight"].shape[0] == 49409
        ckpt["config"]["data"]["tokenizer"] = "clip"
        torch_save_atomic(ckpt, path)
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["data"]["tokenizer"] = "clip"
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def test_an_old_run_resumes_exactly_with_its_old_tokenizer(tiny_synth_root, tmp_path):
    """IRR draws its mask id and random ids from the tokenizer: only the old layout continues the run."""
    reference = tmp_path / "reference"
    train(tiny_cfg(tiny_synth_root, reference, "data.tokenizer=clip-legacy", "train.max_steps=4",
                   "train.eval_split=none"))
    old = tmp_path / "old"
    _old_run(tiny_synth_root, old, "train.max_steps=2", "train.eval_split=none")
    # tbps train --config OLD/config.yaml --output-dir OLD --resume --max-steps 4
    train(load_config(old / "config.yaml", ["train.max_steps=4"]), output_dir=old, resume=True)
    assert train_rows(old) == train_rows(reference)  # bit-exact, steps 1-4
    final_a = read_checkpoint(reference / "last.pt")
    final_b = read_checkpoint(old / "last.pt")
    assert final_b["config"]["data"]["tokenizer"] == "clip-legacy"
    for key, value in final_a["model"].items():
        assert torch.equal(value, final_b["model"][key]), key


def test_fine_tuning_from_an_old_checkpoint_keeps_its_tokenizer(tiny_synth_root, tmp_path):
    """``train.init_checkpoint`` of an old run with a recipe saying ``tokenizer: clip``."""
    from tbps.engine.trainer import Trainer

    old = tmp_path / "old"
    _old_run(tiny_synth_root, old, "train.max_steps=1", "train.eval_split=none")
    cfg = tiny_cfg(tiny_synth_root, tmp_path / "ft", "train.eval_split=none",
                   f"train.init_checkpoint={old / 'last.pt'}")
    trainer = Trainer(cfg)
    assert (trainer.tokenizer.name, trainer.tokenizer.mask_id) == ("clip-legacy", 49408)
    assert trainer.cfg.data.tokenizer == "clip-legacy" and cfg.data.tokenizer == "clip"
    own = trainer.model.state_dict()
    for key, value in read_checkpoint(old / "last.pt")["model"].items():
        assert torch.equal(own[key], value), key
    # a new checkpoint keeps the recipe's tokenizer
    new = tmp_path / "new"
    train(tiny_cfg(tiny_synth_root, new, "train.max_steps=1", "train.eval_split=none"))
    cfg = tiny_cfg(tiny_synth_root, tmp_path / "ft2", "train.eval_split=none",
                   f"train.init_checkpoint={new / 'last.pt'}")
    assert Trainer(cfg).tokenizer.name == "clip"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, root: str, out: str, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = train(tiny_cfg(Path(root), Path(out), "train.epochs=1", "data.batch_size=8"))
    Path(result_dir, f"rank{rank}.json").write_text(json.dumps(summary))


def test_two_process_gloo_run_finishes_and_ranks_agree(tiny_synth_root, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tiny_synth_root), str(tmp_path / "ddp"), str(results)),
             nprocs=2, join=True)
    r0 = json.loads((results / "rank0.json").read_text())
    r1 = json.loads((results / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["steps"] == r1["steps"] > 0
    assert r0["param_checksum"] == pytest.approx(r1["param_checksum"], rel=1e-6)
    assert (tmp_path / "ddp" / "last.pt").is_file()
