"""Peak host memory per process when a checkpoint is read straight into its shards (issue 19).

A generated fp32 model is written as a params dir (orbax), a Meta directory and a Hugging Face
directory; then 1, 2 and 4 processes sharing 8 CPU devices (mesh fsdp=8, jax.distributed on localhost)
each load it with `llama_jax.convert.sharded_read.read_sharded`. Each process reports its peak RSS
growth while loading (VmHWM, reset just before, after the readers' libraries are imported); the table
shows the largest per process next to the bound the tests hold every format to, 1.2 × (the
process's 1/N share + the largest checkpoint tensor). The worker is tests/test_sharded_read.py's.

    python bench/load.py [--layers 6] [--workdir /tmp/llama_jax_load_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from quiet import monitor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "test_sharded_read.py"


def write_checkpoints(workdir: Path, layers: int) -> tuple[dict[str, Path], int, int]:
    """The three formats of one random model; (paths, model bytes, largest tensor bytes)."""
    import numpy as np

    from llama_jax.convert import convert
    from llama_jax.checkpoint.params import save_params
    from llama_jax.model import api
    from llama_jax.model.config import ModelConfig

    sys.path.insert(0, str(WORKER.parent))
    from test_sharded_read import MODEL

    cfg = ModelConfig(**{**MODEL, "n_layers": layers})
    save_params(workdir / "orbax", api.init_params(cfg, seed=0), cfg)
    for fmt in ("meta", "hf"):
        convert(workdir / "orbax", workdir / fmt, to=fmt, progress=False)
    shapes = api.flat_param_shapes(cfg)
    model = 4 * sum(int(np.prod(s)) for s in shapes.values())
    largest = 4 * max(int(np.prod(s[1:] if p[0] == "layers" else s)) for p, s in shapes.items())
    return {fmt: workdir / fmt for fmt in ("orbax", "meta", "hf")}, model, largest


def peak_growth(path: Path, processes: int, out: Path) -> list[int]:
    """Peak RSS growth of each of `processes` processes loading `path` (8 CPU devices among them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(processes), str(path), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for i in range(processes)]
    growth = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=1200)
        if proc.returncode:
            raise SystemExit(stderr[-3000:])
        growth.append(next(json.loads(line) for line in stdout.splitlines() if line.startswith("{"))["growth"])
    return growth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=6, help="transformer layers (6: a 207 MB model)")
    parser.add_argument("--workdir", default="/tmp/llama_jax_load_bench")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    try:
        paths, model, largest = write_checkpoints(workdir, args.layers)
        print(f"model {model / 1e6:.0f} MB fp32, largest tensor {largest / 1e6:.1f} MB")
        print("format  processes  peak growth per process (max), MB   bound 1.2 × (share + largest), MB")
        for fmt, path in paths.items():
            for processes in (1, 2, 4):
                growth = max(peak_growth(path, processes, workdir / "logits.npy"))
                bound = 1.2 * (model / processes + largest)
                print(f"{fmt:6}  {processes:9}  {growth / 1e6:36.0f}   {bound / 1e6:.0f}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    with monitor():
        main()
