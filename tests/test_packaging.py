"""The package works outside its checkout: packaged recipes by name, `tbps configs`, package data."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
