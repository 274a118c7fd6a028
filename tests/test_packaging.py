"""The package works outside its checkout: packaged recipes by name, `tbps configs`, package data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tbps import cli
from tbps.config import PACKAGED_CONFIGS, find_recipe, list_recipes, load_config
from tbps.errors import TBPSError

REPO = Path(__file__).resolve().parents[1]


def test_repository_configs_is_the_packaged_folder():
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == PACKAGED_CONFIGS
    assert (PACKAGED_CONFIGS / "irra_cuhk.yaml").is_file() and (PACKAGED_CONFIGS / "demo_cpu.yaml").is_file()


@pytest.mark.parametrize("name", ["irra_cuhk", "irra_cuhk.yaml", "configs/irra_cuhk.yaml"])
def test_a_packaged_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert find_recipe(name) == PACKAGED_CONFIGS / "irra_cuhk.yaml"
    cfg = load_config(name)  # its _base_ (base.yaml) resolves inside the package
    assert cfg == load_config(PACKAGED_CONFIGS / "irra_cuhk.yaml")
    assert cfg.data.dataset == "cuhk-pedes" and cfg.data.image_size == [384, 128]


def test_a_path_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "irra_cuhk.yaml").write_text("optim: {lr: 0.5}\n")
    assert find_recipe("configs/irra_cuhk.yaml") == Path("configs/irra_cuhk.yaml")
    assert load_config("configs/irra_cuhk.yaml").optim.lr == 0.5


def test_a_user_recipe_inherits_a_packaged_base(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: irra_synth.yaml\noptim: {lr: 0.25}\n")
    cfg = load_config(tmp_path / "mine.yaml")
    packaged = load_config("irra_synth")
    assert cfg.optim.lr == 0.25 and cfg.data == packaged.data and cfg.model == packaged.model


def test_a_base_beside_the_recipe_wins_over_the_packaged_one(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.125}\n")
    (tmp_path / "mine.yaml").write_text("_base_: base.yaml\n")
    assert load_config(tmp_path / "mine.yaml").optim.lr == 0.125


@pytest.mark.parametrize("name", ["no_such_recipe", "other/irra_cuhk.yaml", "/nowhere/irra_cuhk.yaml"])
def test_an_unknown_recipe_is_one_line(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TBPSError, match="config file not found") as err:
        load_config(name)
    assert "\n" not in str(err.value) and str(err.value).startswith(name)


def test_tbps_configs_lists_every_recipe_with_its_first_comment(capsys):
    assert cli.main(["configs"]) == 0
    out = capsys.readouterr().out
    files = sorted(PACKAGED_CONFIGS.glob("*.yaml"))
    assert [name for name, _ in list_recipes()] == [p.stem for p in files]
    for path in files:
        first = path.read_text().splitlines()[0].lstrip("# ").strip()
        assert any(line.split()[0] == path.stem and first in line for line in out.splitlines() if line.strip())
    assert f"{len(files)} recipes" in out


def test_the_recipes_are_package_data():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "configs/*.yaml" in project["tool"]["setuptools"]["package-data"]["tbps"]


def test_the_demo_recipe_is_the_packaged_one():
    from tbps.demo import demo_config_path

    assert demo_config_path() == PACKAGED_CONFIGS / "demo_cpu.yaml"


# ----------------------------------------------------------------------------- optional extras

def _tbps_without(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``tbps ARGV`` in a fresh interpreter where ``modules`` cannot be imported (as without the extra)."""
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in modules)
    code = f"import sys; {blocked}; from tbps.cli import main; sys.exit(main({argv!r}))"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


@pytest.mark.parametrize("modules, argv, extra, what", [
    (["fastapi"], ["serve", "--index", "nowhere"], "serve", "tbps serve"),
    (["uvicorn"], ["serve", "--index", "nowhere"], "serve", "tbps serve"),
    (["matplotlib"], ["visualize", "--index", "nowhere", "--out", "x.png", "a man"], "plots", "tbps visualize"),
])
def test_a_command_without_its_extra_is_one_line_naming_it(tmp_path, modules, argv, extra, what):
    done = _tbps_without(modules, argv, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == f"tbps: error: {what} needs the '{extra}' extra: pip install 'tbps[{extra}]'"


def test_without_faiss_auto_stays_exact_and_a_faiss_backend_names_the_extra(monkeypatch, caplog):
    from tbps.extras import MissingExtra
    from tbps.search import ann

    monkeypatch.setitem(sys.modules, "faiss", None)
    ann._warn_no_faiss.cache_clear()
    assert ann.resolve_backend("auto", 10) == "exact"
    assert ann.resolve_backend("auto", ann.AUTO_FAISS_MIN) == "exact"
    assert "FAISS is not installed" in caplog.text and "tbps[faiss]" in caplog.text
    assert ann.resolve_backend("faiss-hnsw", 10) == "faiss-hnsw"
    with pytest.raises(MissingExtra, match=re.escape("pip install 'tbps[faiss]'")) as err:
        ann.FaissIndex.build(np.eye(4, dtype=np.float32), "faiss-hnsw")
    assert isinstance(err.value, ImportError) and isinstance(err.value, TBPSError)


def test_the_extras_are_declared_and_make_installs_them_all():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = " ".join(project["dependencies"])
    for name, package in (("serve", "fastapi"), ("serve", "uvicorn"), ("faiss", "faiss-cpu"),
                          ("plots", "matplotlib"), ("footage", "av")):
        assert any(spec.startswith(package) for spec in extras[name]) and package not in core
    assert "tbps[serve,faiss,plots,footage]" in extras["all"] and "tbps[all]" in extras["dev"]
    assert "'.[dev]'" in (REPO / "Makefile").read_text()
    for spec in project["dependencies"]:  # ranges, not pins: the pins live in constraints.txt
        assert "==" not in spec, spec
    pins = {line.split("==")[0].lower() for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    for spec in project["dependencies"] + [s for specs in extras.values() for s in specs if not s.startswith("tbps")]:
        assert re.split(r"[<>=\[ ]", spec)[0].lower() in pins, spec
