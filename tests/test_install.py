"""`pip install .` gives a working package: console scripts, shipped configs, nothing read from the checkout.

The clean venv gets its third-party packages (jax, torch, ...) from the test's own environment through a
`.pth` line, so nothing is downloaded; llama_jax itself is built as a wheel and installed into it.
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv") / "clean"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (Path(purelib.stdout.strip()) / "deps.pth").write_text("\n".join(deps) + "\n")
    # pip from the test environment, installing into the clean interpreter (no build isolation: no download)
    proc = run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                "--no-build-isolation", "--no-index", "--quiet", str(ROOT)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_console_scripts_run_from_the_installed_package(clean_venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LLAMA_JAX_MALLOC_TUNING"] = "0"
    where = run([str(clean_venv / "bin" / "python"), "-c", "import llama_jax; print(llama_jax.__file__)"],
                cwd=tmp_path, env=env)
    assert str(clean_venv) in where.stdout, where.stdout + where.stderr  # not the checkout's copy
    for script, expected in (("llama-jax-train", "Train a LLaMA"), ("llama-jax-eval", "usage: llama-jax-eval"),
                             ("llama-jax-convert", "usage: llama-jax-convert"),
                             ("llama-jax-curate", "usage: llama-jax-curate")):
        proc = run([str(clean_venv / "bin" / script), "--help"], cwd=tmp_path, env=env)
        assert proc.returncode == 0 and expected in proc.stdout, (script, proc.stdout[-2000:], proc.stderr[-2000:])
    # the model presets and training configs are package data: `plan` reads both, no checkout around
    proc = run([str(clean_venv / "bin" / "llama-jax-train"), "plan", "model=llama1-7b", "devices=8"],
               cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "plan: 6.74 B parameters" in proc.stdout, proc.stdout + proc.stderr
