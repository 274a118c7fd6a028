"""Shared fixtures: fast, CPU-only, fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: on a shared CPU two spinning threads made a
    small training step many times slower. Modules opt in with ``pytestmark``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_synth_root(tmp_path_factory) -> Path:
    """A 20-identity SynthPEDES at 64x32 (2 images an identity, 2 captions an image), made once."""
    from tbps.data.synth import generate_synthpedes

    root = tmp_path_factory.mktemp("synth")
    generate_synthpedes(root, num_ids=20, images_per_id=2, captions_per_image=2, height=64, width=32,
                        seed=3, progress=False)
    return root
