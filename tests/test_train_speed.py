"""benchmarks/train_speed.py --methods: each method's paper recipe resolves at the issue-17 size."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tbps.config import load_config

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train_speed", REPO / "benchmarks" / "train_speed.py")
speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(speed)


def test_method_setups_are_the_six_paper_recipes_at_384x128_with_a_bert_base_config(tmp_path):
    from transformers import AutoConfig

    bert = speed.bert_base_folder(tmp_path)
    config = AutoConfig.from_pretrained(str(bert), local_files_only=True)
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (768, 12, 30522)
    assert (bert / "vocab.txt").is_file()
    names = set()
    for recipe, overrides, _ in speed.METHOD_SETUPS.values():
        cfg = load_config(REPO / recipe, [o.replace(speed.BERT, str(bert)) for o in overrides])
        names.add(cfg.model.name)
        assert tuple(cfg.data.image_size) == (384, 128) and cfg.model.pretrained == ""
        if cfg.model.text_backbone == "hf":
            assert cfg.model.text_pretrained == str(bert) == cfg.data.tokenizer
    assert names == {"irra", "fcsa", "cffa", "acsa", "pcc", "textreid"}
