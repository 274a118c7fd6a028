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


# ----------------------------------------------------------------------------- faults under kills (issue 19)

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


def all_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def demo_cfg(root: Path, out: Path, *extra: str):
    """The demo recipe (ACSA; MiniLM with the frozen-layer text cache on, MobileNetV2 with the frozen-block
    image cache on) shrunk to the tiny dataset (a 4x2 map at 64x32)."""
    return load_config(DEMO_RECIPE, [f"data.root={root}", f"train.output_dir={out}", "data.batch_size=8",
                                     "data.num_instances=2", "data.num_workers=0", "train.device=cpu",
                                     "train.log_every=1", "train.epochs=2", "eval.batch_size=32",
                                     "data.image_size=[64, 32]", *extra])


def test_demo_recipe_resume_is_bit_exact_after_a_stop_at_an_epoch_end_and_a_kill(tiny_synth_root, tmp_path):
    """The text cache on; the step budget ends on an epoch's last batch; then a run is killed after
    logging steps but before its checkpoint. The resumed losses equal the uninterrupted ones
    exactly, no step is replayed, and metrics.jsonl holds one row per step."""
    full = tmp_path / "full"
    summary = train(demo_cfg(tiny_synth_root, full))
    reference = train_rows(full)
    spe = summary["steps"] // 2

    part = tmp_path / "part"
    train(demo_cfg(tiny_synth_root, part, f"train.max_steps={spe}"))
    state = read_checkpoint(part / "last.pt")["train_state"]
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 0, spe)
    saved = (part / "last.pt").read_bytes()
    train(demo_cfg(tiny_synth_root, part, f"train.max_steps={spe + 2}"), resume=True)
    (part / "last.pt").write_bytes(saved)  # killed after logging steps spe+1, spe+2, before last.pt
    train(demo_cfg(tiny_synth_root, part), resume=True)

    rows = all_rows(part)
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), "a step is logged twice"
    resumed = train_rows(part)
    assert sorted(resumed) == sorted(reference) and max(resumed) == 2 * spe
    for step in sorted(reference):
        assert resumed[step] == reference[step], step  # bit-exact, not approximately
    final_a = read_checkpoint(full / "last.pt")["model"]
    final_b = read_checkpoint(part / "last.pt")["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def _scripted_validation(monkeypatch, scores: list[float]) -> None:
    """Validation returns the next of ``scores`` as R1 (model selection without a real evaluation)."""
    from tbps.engine.trainer import Trainer

    remaining = list(scores)

    def validate(self):
        r1 = remaining.pop(0)
        return {"R1": r1, "R5": r1, "R10": r1, "mAP": r1, "mINP": r1}

    monkeypatch.setattr(Trainer, "validate", validate)


def test_a_lost_best_pt_is_written_again_on_resume(tiny_synth_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _scripted_validation(monkeypatch, [50.0, 40.0])
    train(tiny_cfg(tiny_synth_root, out, "train.epochs=1"))
    assert read_checkpoint(out / "last.pt")["train_state"]["best_metric"] == 50.0
    (out / "best.pt").unlink()  # lost: a kill or a full disk between the two writes
    train(tiny_cfg(tiny_synth_root, out, "train.epochs=2"), resume=True)
    last = read_checkpoint(out / "last.pt")["train_state"]
    best = read_checkpoint(out / "best.pt")  # epoch 2 scored lower, yet best.pt exists again
    assert (best["best_metric"], best["epoch"]) == (last["best_metric"], last["best_epoch"]) == (40.0, 2)


def test_last_pt_never_claims_a_best_pt_that_failed_to_write(tiny_synth_root, tmp_path, monkeypatch):
    import tbps.engine.trainer as trainer_module

    out = tmp_path / "run"
    _scripted_validation(monkeypatch, [30.0, 60.0])
    real_save = trainer_module.save_checkpoint
    calls = {"best": 0}

    def failing_save(path, **kwargs):
        if Path(path).name == "best.pt":
            calls["best"] += 1
            if calls["best"] == 2:
                raise TBPSError(f"{path}: cannot write it: no space left on device")
        return real_save(path, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", failing_save)
    with pytest.raises(TBPSError, match="no space"):
        train(tiny_cfg(tiny_synth_root, out, "train.epochs=2"))
    last = read_checkpoint(out / "last.pt")["train_state"]
    best = read_checkpoint(out / "best.pt")
    assert (last["best_metric"], last["best_epoch"]) == (best["best_metric"], best["epoch"]) == (30.0, 1)


def test_a_fresh_run_refuses_an_old_run_and_cleans_temporary_files(tiny_synth_root, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(tiny_synth_root, out, "train.max_steps=1", "train.eval_split=none"))
    stale = out / ".last.pt.abcd1234.tmp"  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"\0" * 1000)
    rows = len(all_rows(out))
    with pytest.raises(TBPSError, match="--resume.*--overwrite"):
        train(tiny_cfg(tiny_synth_root, out, "train.max_steps=1", "train.eval_split=none"))
    assert len(all_rows(out)) == rows  # the old log is untouched
    assert not stale.exists()
    stale.write_bytes(b"\0" * 1000)
    train(tiny_cfg(tiny_synth_root, out, "train.max_steps=2", "train.eval_split=none"), resume=True)
    assert not stale.exists()
    train(tiny_cfg(tiny_synth_root, out, "train.max_steps=1", "train.eval_split=none"), overwrite=True)
    assert max(r["step"] for r in all_rows(out)) == 1  # the old run's rows are gone


def _mount_read_only(folder: Path) -> bool:
    import subprocess

    done = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if done.returncode != 0:
        return False
    done = subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], capture_output=True)
    if done.returncode != 0:
        subprocess.run(["umount", str(folder)], capture_output=True)
        return False
    return True


def test_eval_of_a_checkpoint_on_a_read_only_mount(tiny_synth_root, tmp_path, capsys):
    import subprocess

    from tbps.cli import main

    out = tmp_path / "run"
    train(tiny_cfg(tiny_synth_root, out, "train.max_steps=1", "train.eval_split=none"))
    if not _mount_read_only(out):
        pytest.skip("cannot mount a read-only folder here")
    try:
        with pytest.raises(OSError):
            (out / "probe").write_text("x")
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(out / "last.pt"), "--device", "cpu", "--json"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(printed) == {"R1", "R5", "R10", "mAP", "mINP"}
        assert main(["eval", "--checkpoint", str(out / "last.pt"), "--device", "cpu", "--json",
                     "--log", str(out / "eval.jsonl")]) == 1  # asked to write there: printed, then one line
        captured = capsys.readouterr()
        assert "R1" in captured.out and "read-only file system" in captured.err
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# ----------------------------------------------------------------------------- hooks and build_* methods

def test_a_user_hook_sees_every_step_epoch_and_logged_row_in_order(tiny_synth_root, tmp_path):
    from tbps.engine.train_loop import HookBase

    class Recorder(HookBase):
        def __init__(self) -> None:
            self.events: list[tuple[str, int]] = []
            self.rows: list[dict] = []

        def before_train(self) -> None:
            self.events.append(("before_train", self.trainer.state.step))

        def before_epoch(self) -> None:
            self.events.append(("before_epoch", self.trainer.epoch_index))

        def before_step(self) -> None:
            self.events.append(("before_step", self.trainer.state.step))

        def after_step(self) -> None:
            assert set(self.trainer.outputs) >= {"loss"}
            self.events.append(("after_step", self.trainer.state.step))

        def after_epoch(self) -> None:
            self.events.append(("after_epoch", self.trainer.state.epoch))

        def after_train(self) -> None:
            self.events.append(("after_train", self.trainer.state.step))

        def on_log(self, row: dict) -> None:
            self.rows.append(row)

    out = tmp_path / "run"
    recorder = Recorder()
    summary = train(tiny_cfg(tiny_synth_root, out, "train.epochs=2", "train.eval_split=val"), hooks=[recorder])
    per_epoch = summary["steps"] // 2
    expected = [("before_train", 0)]
    for epoch in range(2):
        expected.append(("before_epoch", epoch))
        for step in range(epoch * per_epoch, (epoch + 1) * per_epoch):
            expected += [("before_step", step), ("after_step", step + 1)]
        expected.append(("after_epoch", epoch + 1))
    expected.append(("after_train", summary["steps"]))
    assert recorder.events == expected
    assert recorder.rows == all_rows(out)  # the hook saw exactly what metrics.jsonl holds
    assert [r["split"] for r in recorder.rows].count("val") == 2


def test_max_steps_stops_mid_epoch_and_a_user_hook_can_stop_too(tiny_synth_root, tmp_path):
    from tbps.engine.train_loop import HookBase

    class StopAtStep(HookBase):
        def after_step(self) -> None:
            if self.trainer.state.step == 2:
                self.trainer.request_stop()

    summary = train(tiny_cfg(tiny_synth_root, tmp_path / "a", "train.max_steps=3", "train.eval_split=none"))
    assert summary["steps"] == 3
    summary = train(tiny_cfg(tiny_synth_root, tmp_path / "b", "train.eval_split=none"), hooks=[StopAtStep()])
    assert summary["steps"] == 2 and summary["epochs"] == 0
    assert read_checkpoint(tmp_path / "b" / "last.pt")["train_state"]["batch_in_epoch"] == 2


def test_a_build_method_is_overridden_without_copying_the_trainer(tiny_synth_root, tmp_path):
    from tbps.engine.trainer import Trainer

    class FrozenTrainer(Trainer):
        def build_optimizer(self, cfg, model):
            return torch.optim.SGD(model.parameters(), lr=0.0)

    trainer = FrozenTrainer(tiny_cfg(tiny_synth_root, tmp_path / "run", "train.max_steps=2", "train.eval_split=none"))
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    assert trainer.fit()["steps"] == 2
    assert all(torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


MINILM_CACHED = ["data.tokenizer=minilm", "model.text_backbone=hf", "model.text_pretrained=minilm",
                 "model.text_frozen_layers=5", "model.text_frozen_cache=true", "model.embed_dim=128",
                 "train.eval_split=none"]


@pytest.mark.parametrize("method", [
    pytest.param(["model.name=fcsa", "loss={id: 1.0, cmpm: 1.0, cmrs_image: 1.0, cmrs_text: 1.0}",
                  "data.positives=1", "method.swap_rate=0.5"], marks=pytest.mark.slow),
    ["model.name=cffa", "loss={mal: 1.0, id: 1.0, irr: 1.0}"],
], ids=["fcsa", "cffa"])
def test_resume_is_exact_with_the_text_cache_and_one_off_masked_captions(tiny_synth_root, tmp_path, method):
    """FCSA and CFFA encode masked / augmented captions outside the frozen-layer cache (one batched
    pass, tbps.models.backbones.one_off_captions) and clean ones through it: a resumed run, its cache
    empty, must still repeat the uninterrupted run bit for bit."""
    reference, part = tmp_path / "reference", tmp_path / "part"
    train(tiny_cfg(tiny_synth_root, reference, *MINILM_CACHED, *method, "train.max_steps=4"))
    train(tiny_cfg(tiny_synth_root, part, *MINILM_CACHED, *method, "train.max_steps=2"))
    train(tiny_cfg(tiny_synth_root, part, *MINILM_CACHED, *method, "train.max_steps=4"), resume=True)
    assert train_rows(part) == train_rows(reference)  # bit-exact, steps 1-4
