"""Atomic writes: a full disk is one line naming the file, and the previous file survives."""

from __future__ import annotations

import subprocess

import pytest
import torch

from tbps.errors import TBPSError
from tbps.io import remove_stale_temp_files, torch_save_atomic, write_text_atomic


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    yield disk
    subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tiny_disk):
    target = tiny_disk / "last.pt"
    torch_save_atomic({"w": torch.arange(10.0)}, target)
    with pytest.raises(TBPSError, match=r"last\.pt: cannot write it: no space left on device"):
        torch_save_atomic({"w": torch.zeros(1_000_000)}, target)  # 4 MB
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.arange(10.0))
    assert [p.name for p in tiny_disk.iterdir()] == ["last.pt"]  # no temporary file left
    with pytest.raises(TBPSError, match=r"config\.yaml: cannot write it: no space left on device"):
        write_text_atomic(tiny_disk / "config.yaml", "x" * 2_000_000)


def test_stale_temporary_files_are_removed(tmp_path):
    (tmp_path / ".last.pt.k2j_8xq1.tmp").write_bytes(b"\0" * 100)
    (tmp_path / ".config.yaml.aaaaaaaa.tmp").write_bytes(b"\0" * 10)
    (tmp_path / "last.pt").write_bytes(b"keep")
    (tmp_path / "notes.tmp").write_bytes(b"keep")
    assert remove_stale_temp_files(tmp_path) == 110
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
