"""The public API: tbps.load_model, the Embedder (one inference path), lazy re-exports, the README block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tbps
from tbps.errors import TBPSError
from tbps.inference import Embedder, amp_dtype, check_features, load_model
from tiny_gallery import save_tiny_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a woman in a red coat", "a man with a black backpack and grey shorts", "a child in yellow"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("api") / "model.pt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(checkpoint, device="cpu")


def test_load_model_gives_an_eval_model_its_tokenizer_and_its_transform(loaded):
    model, tokenizer, transform = loaded
    assert not model.training and model.tbps_config.model.name == "irra"
    assert tokenizer(["a man"]).shape == (1, 16)
    image = transform(Image.new("RGB", (20, 40), (200, 10, 10)))
    assert image.shape == (3, 32, 16) and image.dtype == torch.float32


def test_embedder_equals_the_model_hooks_and_does_not_depend_on_the_batch_size(loaded):
    model, tokenizer, transform = loaded
    with torch.inference_mode():
        direct = model.embed_texts(tokenizer(TEXTS))["global"]
    one, many = (Embedder(model, tokenizer, transform, batch_size=b).embed_texts(TEXTS) for b in (1, 64))
    assert set(one) == {"global"} and one["global"].dtype == torch.float32
    torch.testing.assert_close(many["global"], direct, rtol=0, atol=0)
    torch.testing.assert_close(one["global"], direct, rtol=1e-5, atol=1e-6)


def test_images_as_paths_pil_images_or_a_tensor_embed_alike(loaded, tmp_path):
    model, tokenizer, transform = loaded
    paths = write_images(tmp_path / "gallery", count=5)
    embedder = Embedder(model, tokenizer, transform, batch_size=2)
    from_paths = embedder.embed_images(paths)
    from_pil = embedder.embed_images([Image.open(p) for p in paths])
    from_tensor = embedder.embed_images(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    with torch.inference_mode():
        direct = model.embed_images(torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]))
    for feats in (from_paths, from_pil, from_tensor):
        assert feats["global"].shape == (5, direct["global"].shape[1])
        torch.testing.assert_close(feats["global"], direct["global"], rtol=1e-5, atol=1e-6)
    scores = embedder.similarity(embedder.embed_texts(TEXTS[:2]), from_paths)
    torch.testing.assert_close(scores, embedder.embed_texts(TEXTS[:2])["global"] @ from_paths["global"].t())


def test_an_unreadable_image_is_one_line_naming_it(loaded, tmp_path):
    model, tokenizer, transform = loaded
    good = write_images(tmp_path / "g", count=2)
    bad = tmp_path / "g" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(TBPSError, match="broken.png") as err:
        Embedder(model, tokenizer, transform).embed_images([*good, bad])
    assert "\n" not in str(err.value)


def test_check_features_accepts_a_tensor_and_refuses_malformed_dicts():
    rows = torch.zeros(3, 4)
    assert set(check_features(rows, "embed_texts", 3)) == {"global"}
    assert set(check_features({"global": rows, "local": torch.zeros(3, 2, 4)}, "embed_images", 3)) == {"global", "local"}
    for output, message in [({"local": rows}, "'global'"), ([rows], "'global'"),
                            ({"global": rows, "bad-key": rows}, "bad-key"),
                            ({"global": rows, "extra": torch.zeros(2, 4)}, "one row per input"),
                            ({"global": torch.tensor(1.0)}, "one row per input"),
                            ({"global": rows, "n": 3}, "dict of tensors")]:
        with pytest.raises(TBPSError, match=re.escape(message)):
            check_features(output, "embed_images", 3)


def test_a_model_with_only_encode_hooks_is_embedded_by_its_normalised_encodings():
    class Encoders(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 3)

        def encode_text(self, token_ids):
            return self.proj(token_ids.float())

        def encode_image(self, images):
            return self.proj(images.flatten(1)[:, :4])

    model = Encoders()
    tokens = torch.arange(8).view(2, 4)
    feats = Embedder(model).text_batch(tokens)
    torch.testing.assert_close(feats["global"], F.normalize(model.proj(tokens.float()), dim=-1))
    images = torch.randn(2, 1, 2, 2)
    torch.testing.assert_close(Embedder(model).image_batch(images)["global"],
                               F.normalize(model.proj(images.flatten(1)), dim=-1))


def test_one_amp_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype("auto", cpu) is None and amp_dtype("bf16", cpu) is None
    assert amp_dtype("off", cuda) is None
    assert amp_dtype("bf16", cuda) is torch.bfloat16 and amp_dtype("fp16", cuda) is torch.float16
    with pytest.raises(TBPSError, match="choose auto, bf16, fp16 or off"):
        amp_dtype("fp8", cpu)
    with pytest.raises(TBPSError, match="batch size"):
        Embedder(torch.nn.Linear(2, 2), batch_size=0)


def test_the_entry_points_are_importable_from_tbps_and_import_tbps_stays_light():
    from tbps.engine.evaluator import evaluate_checkpoint
    from tbps.engine.metrics import rank_metrics
    from tbps.engine.trainer import train
    from tbps.search.searcher import Searcher

    assert (tbps.train, tbps.evaluate, tbps.rank_metrics, tbps.Searcher, tbps.Embedder, tbps.load_model) == \
        (train, evaluate_checkpoint, rank_metrics, Searcher, Embedder, load_model)
    for name in ("build_index", "load_dataset", "load_config"):
        assert callable(getattr(tbps, name))
    assert set(tbps.__all__) <= set(dir(tbps))
    with pytest.raises(AttributeError, match="no_such_thing"):
        tbps.no_such_thing  # noqa: B018
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    heavy = subprocess.run([sys.executable, "-c", "import sys, tbps; print(sorted({'torch', 'numpy', 'open_clip', "
                            "'transformers'} & set(sys.modules)))"], capture_output=True, text=True, env=env, check=True)
    assert heavy.stdout.strip() == "[]"


def _readme_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_python_api_block_runs_as_written(tiny_synth_root, tmp_path, monkeypatch, capsys):
    """The block uses the demo's paths: a tiny checkpoint stands at runs/demo/train/best.pt, trained
    (randomly initialised) on data/synth, and photos/ holds two JPEGs."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "demo" / "train").mkdir(parents=True)
    save_tiny_checkpoint(tmp_path / "runs" / "demo" / "train" / "best.pt")  # its data.root is data/synth
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synth").symlink_to(tiny_synth_root)
    (tmp_path / "photos").mkdir()
    for name, colour in (("a.jpg", (200, 20, 20)), ("b.jpg", (20, 20, 200))):
        Image.new("RGB", (32, 64), colour).save(tmp_path / "photos" / name)
    exec(compile(_readme_block(), "README.md (Python API)", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tensor([[") and len(out) == 4  # scores, two hits (two photos), the metrics
    assert (tmp_path / "runs" / "photos_index" / "manifest.json").is_file()
    assert "'R1':" in out[-1] and "'mINP':" in out[-1]
