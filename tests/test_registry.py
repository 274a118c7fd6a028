"""The registry: one name per thing (set on the class), bare decorator use, and ``imports:`` plugins."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tbps.config import load_config
from tbps.data.datasets import DATASETS, load_dataset
from tbps.errors import TBPSError
from tbps.models import METHODS
from tbps.registry import Registry


def test_register_sets_the_name_on_the_class():
    things = Registry("thing")

    @things.register("big-thing")
    class Big:
        pass

    assert things.get("BIG-THING") is Big and Big.name == "big-thing"


def test_bare_decorator_registers_the_class_under_its_own_name():
    things = Registry("thing")

    @things.register
    class Plain:
        pass

    assert isinstance(Plain, type), "bare use must return the class, not the inner function"
    assert "plain" in things and things.get("plain") is Plain and Plain.name == "plain"


def test_one_name_per_thing():
    things = Registry("thing")

    class One:
        pass

    things.register("one", One)
    things.register("one", One)  # the same registration again is harmless
    with pytest.raises(TBPSError, match="'one' is registered again as 'two'"):
        things.register("two", One)
    with pytest.raises(TBPSError, match="'one' is already registered"):
        things.register("one", type("Other", (), {}))

    @things.register("one-child")
    class Child(One):
        pass

    assert Child.name == "one-child" and One.name == "one"  # a subclass takes its own name


def test_every_registered_method_and_dataset_carries_its_name():
    for registry in (METHODS, DATASETS):
        for name in registry.names():
            assert registry.get(name).name == name


PLUGIN = textwrap.dedent('''
    from tbps.data.datasets import DATASETS, JsonAnnotationDataset

    @DATASETS.register("plugin-people")
    class PluginPeople(JsonAnnotationDataset):
        annotation_names = ("people.json",)
        path_field = "image"
''')


def test_recipe_imports_register_a_users_dataset(tmp_path, monkeypatch):
    import json

    package = tmp_path / "site" / "tbps_test_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "data.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    data = tmp_path / "people"
    (data / "imgs").mkdir(parents=True)
    records = [{"id": 1, "split": "train", "image": "a.jpg", "captions": ["a man."]},
               {"id": 2, "split": "test", "image": "b.jpg", "captions": ["a woman."]}]
    (data / "people.json").write_text(json.dumps(records))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"imports: [tbps_test_plugin.data]\ndata:\n  dataset: plugin-people\n  root: {data}\n")
    try:
        assert "plugin-people" not in DATASETS
        cfg = load_config(recipe)
        dataset = load_dataset(cfg.data.dataset, cfg.data.root)
        assert dataset.name == "plugin-people" and len(dataset.train) == 1 and len(dataset.test) == 1
        assert cfg.to_dict()["imports"] == ["tbps_test_plugin.data"]  # kept in config.yaml / checkpoints
    finally:
        DATASETS._items.pop("plugin-people", None)
        for name in ("tbps_test_plugin.data", "tbps_test_plugin"):
            sys.modules.pop(name, None)


def test_a_failing_import_is_one_line_naming_the_recipe_and_module(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("imports: [tbps_no_such_module_here]\n")
    with pytest.raises(TBPSError, match=r"bad\.yaml: imports: cannot import 'tbps_no_such_module_here' "
                                        r"\(ModuleNotFoundError") as info:
        load_config(recipe)
    assert "\n" not in str(info.value)
    recipe.write_text("imports: ['os; rm']\n")
    with pytest.raises(TBPSError, match="is not a Python module name"):
        load_config(recipe)
