from pathlib import Path

import pytest
import yaml

from tbps.config import Config, load_config, save_config
from tbps.errors import TBPSError

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_irra_recipe():
    cfg = Config()
    assert cfg.data.image_size == [384, 128] and cfg.data.text_length == 77
    assert cfg.optim.lr == 1e-5 and cfg.optim.new_lr_factor == 5 and cfg.train.epochs == 60
    assert cfg.loss == {"sdm": 1.0, "id": 1.0, "irr": 1.0}


def test_bases_then_file_then_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.1, eps: 0.5}\ndata: {batch_size: 8}\n")
    (tmp_path / "recipe.yaml").write_text("_base_: base.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "recipe.yaml", ["data.batch_size=16", "data.image_size=[96, 32]",
                                                 "method.mask_ratio=0.3", "train.amp=off"])
    assert cfg.optim.lr == 0.2 and cfg.optim.eps == 0.5
    assert cfg.data.batch_size == 16 and cfg.data.image_size == [96, 32]
    assert cfg.method == {"mask_ratio": 0.3} and cfg.train.amp == "off"


def test_loss_section_is_replaced_not_merged(tmp_path):
    (tmp_path / "r.yaml").write_text("loss: {sdm: 1.0, id: 0.5}\n")
    assert load_config(tmp_path / "r.yaml").loss == {"sdm": 1.0, "id": 0.5}


def test_replace_marker_drops_the_inherited_section(tmp_path):
    (tmp_path / "base.yaml").write_text("method: {cross_width: 128, mlm_prob: 0.15}\noptim: {lr: 0.1}\n")
    (tmp_path / "merged.yaml").write_text("_base_: base.yaml\nmethod: {num_parts: 4}\n")
    (tmp_path / "replaced.yaml").write_text("_base_: base.yaml\nmethod: {_replace_: true, num_parts: 4}\n"
                                            "optim: {_replace_: false, eps: 0.5}\n")
    assert load_config(tmp_path / "merged.yaml").method == {"cross_width": 128, "mlm_prob": 0.15, "num_parts": 4}
    cfg = load_config(tmp_path / "replaced.yaml", ["method.fine=false"])
    assert cfg.method == {"num_parts": 4, "fine": False}
    assert cfg.optim.lr == 0.1 and cfg.optim.eps == 0.5  # _replace_: false merges as before


@pytest.mark.parametrize("override, words", [
    ("optim.lrr=1", "optim.lrr"),
    ("data.batch_size=abc", "data.batch_size"),
    ("train.tensorboard=3", "train.tensorboard"),
    ("nokey", "key=value"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(TBPSError, match=words.replace(".", r"\.")):
        load_config(None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(TBPSError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(TBPSError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_base_loop_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(TBPSError, match="loops"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "model.name=irra"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_recipe_loads(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    assert cfg.model.name
    assert yaml.safe_load((REPO / "configs" / recipe).read_text()) is not None


# ----------------------------------------------------------------------------- nonsense refused at load (issue 19)

@pytest.mark.parametrize("override, words", [
    ("optim.scheduler=cosin", "optim.scheduler.*cosine, step, constant"),
    ("data.check=bogus", "data.check.*exists, decode, off"),
    ("data.sampler=pk", "data.sampler"),
    ("train.eval_split=Test", "train.eval_split"),
    ("train.amp=fp8", "train.amp"),
    ("optim.optimizer=lamb", "optim.optimizer"),
    ("model.text_pooling=max", "model.text_pooling"),
    ("train.epochs=0", "train.epochs: must be between 1"),
    ("train.epochs=-3", "train.epochs"),
    ("train.max_steps=-1", "train.max_steps: must be at least 0"),
    ("train.log_every=0", "train.log_every: must be at least 1"),
    ("train.seed=18446744073709551617", "train.seed"),
    ("train.seed=-1", "train.seed"),
    ("train.device=gpu", "train.device"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.image_size=[64]", "data.image_size"),
    ("optim.lr=.nan", "optim.lr: expected a finite number"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
])
def test_nonsense_values_are_refused_when_the_config_loads(override, words):
    with pytest.raises(TBPSError, match=words):
        load_config(None, [override])


def test_base_entries_must_be_file_names(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("_base_: [x.yaml, 5]\n")
    with pytest.raises(TBPSError, match="_base_ must be a file name"):
        load_config(recipe)


def test_deeply_nested_yaml_is_one_line(tmp_path):
    recipe = tmp_path / "deep.yaml"
    recipe.write_text("method: {a: " + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(TBPSError, match="deep"):
        load_config(recipe)
    with pytest.raises(TBPSError, match="nested"):
        load_config(None, ["method.x=" + "[" * 40 + "]" * 40])


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("method:\n" + "\n".join("  " + line for line in lines) + "\n")  # 10^9 values
    started = time.perf_counter()
    with pytest.raises(TBPSError, match="expands to more than"):
        load_config(recipe)
    assert time.perf_counter() - started < 5
