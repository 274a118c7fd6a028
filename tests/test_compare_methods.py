"""benchmarks/compare_methods.py: every paper ablation is a valid override of its method's recipe,
and a row's noise band is the mean and sample spread of its seeds."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml

from tbps.config import load_config
from tbps.data.tokenizers import build_tokenizer
from tbps.models import build_model

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

ROWS = [(method, name, run_args) for method in compare.SUITE for name, run_args in compare.suite_rows(method)]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("method,name,run_args", ROWS, ids=[r[1] for r in ROWS])
def test_every_suite_row_builds_its_model(method, name, run_args):
    """Each ablation is ``key=value`` overrides the config system accepts and the method builds."""
    entry = compare.SUITE[method]
    if run_args[0] == "--from":  # inference overrides on the method's own training recipe
        overrides = [*entry["authors"], *run_args[2:]]
    else:
        overrides = run_args[2:]
    cfg = load_config(REPO / entry["config"], overrides)
    tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.text_length)
    model = build_model(cfg, num_classes=8, tokenizer=tokenizer, load_pretrained=False)
    for override in overrides:  # the resolved options carry every method.* change
        key, value = override.split("=", 1)
        if key.startswith("method."):
            got = cfg.method
            for part in key.split(".")[1:]:  # nested options, e.g. method.inference_weights.fine
                got = got[part]
            want = yaml.safe_load(value)
            assert got == want or str(got).lower() == str(want).lower(), override
    assert model is not None


def test_every_method_has_ablations_and_names_are_unique():
    names = [name for _, name, _ in ROWS]
    assert len(names) == len(set(names))
    for method, entry in compare.SUITE.items():
        assert entry["ablations"], method
        assert Path(REPO / entry["config"]).is_file()


def test_plan_prints_one_command_per_row(capsys):
    args = compare.argparse.Namespace(methods=["fcsa"], overrides=["train.max_steps=2"], seeds=[0, 1],
                                      epochs=15, ids=500, results=compare.RESULTS)
    compare.plan(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + len(compare.SUITE["fcsa"]["ablations"])
    assert all("--seeds 0 1 --epochs 15 --ids 500" in line and "train.max_steps=2" in line for line in lines)


def test_seconds_per_step_and_band(tmp_path):
    (tmp_path / "config.yaml").write_text("data:\n  batch_size: 64\n")
    rows = [{"split": "train", "epoch": 0.5, "pairs_per_s": 100.0}, {"split": "train", "epoch": 1.0, "pairs_per_s": 128.0},
            {"split": "train", "epoch": 2.0, "pairs_per_s": 64.0}, {"split": "test", "epoch": 2, "R1": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # last logged rate of each epoch: 128 pairs/s in epoch 1, 64 in epoch 2 -> 0.5 s and 1.0 s a step
    assert compare.seconds_per_step(tmp_path) == pytest.approx(0.75)
    assert compare.spread([10.0, 12.0, 14.0]) == pytest.approx(statistics.stdev([10.0, 12.0, 14.0])) == 2.0
    assert compare.spread([3.0]) == 0.0
    row = {"R1": 12.0, "R1_sd": 2.0, "runs": [{}, {}, {}]}
    assert compare._band(row, "R1") == "12.00 ± 2.00"
    assert compare._band({"R1": 12.0}, "R1") == "12.00"


def test_a_training_run_uses_one_thread_no_workers_and_the_data_s_images_per_person(tmp_path, monkeypatch):
    """Every row trains alike: loader in the training process, K = min(4, images per person)."""
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"], seen["env"] = cmd, kwargs["env"]
        return compare.subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    with pytest.raises(SystemExit, match="training failed"):
        compare.train_one("x", "configs/irra_synth.yaml", ["loss.id=0"], 1, 15, tmp_path / "data", tmp_path / "x", 2)
    cmd = seen["cmd"]
    assert "data.num_workers=0" in cmd and "data.num_instances=2" in cmd and "train.seed=1" in cmd
    assert cmd.index("data.num_instances=2") < cmd.index("loss.id=0")  # a row's own change wins
    assert seen["env"]["OMP_NUM_THREADS"] == "1"


def test_keep_reuses_a_seed_trained_by_the_same_command_only(tmp_path, monkeypatch):
    def fake_run(cmd, **kwargs):
        out = Path(cmd[cmd.index("--output-dir") + 1])
        out.mkdir(parents=True)
        (out / "train_summary.json").write_text('{"steps": 3}')
        (out / "config.yaml").write_text("data:\n  batch_size: 64\n")
        (out / "metrics.jsonl").write_text(json.dumps({"split": "train", "epoch": 1.0, "pairs_per_s": 32.0}) + "\n")
        (out / "last.pt").write_bytes(b"")
        return compare.subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    monkeypatch.setattr(compare, "RUNS", tmp_path)
    args = ("x", "configs/irra_synth.yaml", ["loss.id=0"], 1, 15, tmp_path / "data", tmp_path / "x", 2)
    record = compare.train_one(*args)
    assert record["steps"] == 3 and record["seconds_per_step"] == 2.0
    assert compare.kept_record(*args) == record
    assert compare.kept_record("x", "configs/irra_synth.yaml", ["loss.id=0"], 1, 14, tmp_path / "data",
                               tmp_path / "x", 2) is None  # other epochs: retrain
    assert compare.kept_record(*args[:6], tmp_path / "y", 2) is None  # nothing there


def test_plan_passes_device_slots_and_runs_folder_on(capsys, tmp_path):
    args = compare.argparse.Namespace(methods=["irra"], overrides=["data.image_size=[384,128]"], seeds=None,
                                      epochs=None, ids=None, results=compare.RESULTS, device="cuda", slots=6,
                                      runs=tmp_path)
    compare.plan(args)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.endswith(f"--device cuda --slots 6 --runs {tmp_path}") and "'data.image_size=[384,128]'" in line


def test_merge_joins_seeds_from_several_files_and_refuses_mismatches(tmp_path):
    """Seeds trained in parallel processes (one results file each) become one row with a noise band."""
    def row(seed, r1, overrides=("loss.id=0",)):
        return {"name": "x", "config": "c.yaml", "overrides": list(overrides), "epochs": 45, "data": {"ids": 5},
                "seeds": [seed], "runs": [{"seed": seed, "dir": f"x/seed{seed}", "R1": r1, "R5": 1.0, "R10": 2.0,
                                           "mAP": r1 / 2, "mINP": 0.5, "train_seconds": 10.0 * (seed + 1),
                                           "steps": 3, "seconds_per_step": 1.0, "eval_seconds": 2.0}]}

    files = []
    for seed, r1 in ((2, 30.0), (0, 34.0)):
        files.append(tmp_path / f"x_s{seed}.jsonl")
        files[-1].write_text(json.dumps(row(seed, r1)) + "\n")
    out = tmp_path / "merged.jsonl"
    compare.merge(compare.argparse.Namespace(files=files, results=out))
    (merged,) = compare.load_rows(out)
    assert merged["seeds"] == [0, 2] and [r["seed"] for r in merged["runs"]] == [0, 2]
    assert merged["R1"] == 32.0 and merged["R1_sd"] == pytest.approx(statistics.stdev([30.0, 34.0]), abs=0.01)
    assert merged["mAP"] == 16.0 and merged["train_seconds"] == 20.0
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps(row(1, 20.0, overrides=("loss.id=1",))) + "\n")
    with pytest.raises(SystemExit, match="trained differently"):
        compare.merge(compare.argparse.Namespace(files=[files[0], other], results=tmp_path / "m2.jsonl"))
    with pytest.raises(SystemExit, match="seed repeated"):
        compare.merge(compare.argparse.Namespace(files=[files[0], files[0]], results=tmp_path / "m3.jsonl"))


def test_paired_effect_pairs_seeds_and_signs_each_kind_of_ablation(tmp_path):
    """An ablation's effect is (with - without) on the seeds both rows trained, whatever the row's form,
    and ``plot`` draws the rows it is given into a PNG."""
    def row(name, r1_by_seed):
        return {"name": name, "R1": statistics.mean(r1_by_seed.values()), "mAP": 1.0,
                "runs": [{"seed": s, "R1": v, "mAP": v / 2} for s, v in r1_by_seed.items()]}

    rows = {r["name"]: r for r in (row("m", {0: 30.0, 1: 34.0, 2: 32.0}), row("m-no_x", {0: 25.0, 2: 31.0}),
                                   row("m-with_y", {0: 29.0, 1: 36.0, 2: 32.0}),
                                   row("m-a_for_b", {1: 40.0}), row("m-other", {0: 30.0, 1: 30.0, 2: 30.0}),
                                   row("m-other_z", {0: 33.0, 2: 29.0}), row("m-other_z_w", {2: 35.0}))}
    assert compare.paired_effect(rows, "m-no_x", "R1") == ("m: x", [5.0, 1.0])  # seed 1 unpaired: left out
    assert compare.paired_effect(rows, "m-with_y", "R1") == ("m: y", [-1.0, 2.0, 0.0])
    assert compare.paired_effect(rows, "m-a_for_b", "mAP") == ("m: b (vs a)", [-3.0])
    assert compare.paired_effect(rows, "m-other", "R1") == ("m: recipe (vs other)", [0.0, 4.0, 2.0])
    # a row built on another ablation row pairs against that row (the longest name it extends)
    assert compare.paired_effect(rows, "m-other_z", "R1") == ("m: other + z", [3.0, -1.0])
    assert compare.paired_effect(rows, "m-other_z_w", "R1") == ("m: other_z + w", [6.0])
    with pytest.raises(SystemExit, match="needs rows"):
        compare.paired_effect(rows, "q-no_x", "R1")
    results = tmp_path / "rows.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    out = tmp_path / "figures" / "e.png"
    compare.plot(compare.argparse.Namespace(names=list(rows), results=results, out=out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(out.parent.glob("*.tmp.png"))
    compare.plot(compare.argparse.Namespace(names=["m"], results=results, out=tmp_path / "methods.png"))
    assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG"


def test_save_row_waits_for_the_results_lock_and_keeps_every_row(tmp_path):
    """Two runs that finish together must not drop each other's row: a writer waits for the folder
    lock, then re-reads the file, so the row written meanwhile survives."""
    import fcntl
    import os
    import subprocess
    import sys

    results = tmp_path / "rows.jsonl"
    compare.save_row({"name": "a", "R1": 1.0}, results)
    folder = os.open(tmp_path, os.O_RDONLY)  # not inherited by the writer (PEP 446)
    fcntl.flock(folder, fcntl.LOCK_EX)  # another run is writing
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m.save_row({'name': 'b', 'R1': 2.0}, m.Path(sys.argv[2]))")
    writer = subprocess.Popen([sys.executable, "-c", code, str(REPO / "benchmarks" / "compare_methods.py"),
                               str(results)])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            writer.wait(timeout=3.0)  # blocked on the lock
        results.write_text(results.read_text() + json.dumps({"name": "c", "R1": 3.0}) + "\n")  # the other run's row
    finally:
        os.close(folder)
    assert writer.wait(timeout=30) == 0
    assert [r["name"] for r in compare.load_rows(results)] == ["a", "c", "b"]
    assert not list(tmp_path.glob("*.tmp"))
