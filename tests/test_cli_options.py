"""One definition per option: eval's and convert's options are dataclasses built by the config loader.

A flag and its `key=value` setting give the same dataclass; a value outside an option's choices is one
line naming the option, the value and the accepted values, exit status 2, before anything is read;
every option the docs' tables name reaches the field they name; dtype names are one vocabulary, the
same in configs and on command lines. The argument reader takes arbitrary argument lists (fuzzed):
options or one ConfigError, never another exception.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import strategies as st

from fuzzing import fast_and_slow
from llama_jax.cli import convert as convert_cli
from llama_jax.cli import eval as eval_cli
from llama_jax.cli.options import parse_command
from llama_jax.convert.options import ConvertOptions, parse_size
from llama_jax.evaluation.options import COMMANDS, GenerateOptions, PerplexityOptions
from llama_jax.parallel.distributed import DistributedConfig
from llama_jax.parallel.mesh import MeshConfig
from llama_jax.utils import dtypes
from llama_jax.utils.config_io import ConfigError

REPO = Path(__file__).resolve().parent.parent
PPL = ["perplexity", "ckpt", "--data", "docs.txt"]
CONVERT = ["src", "dst", "--to", "orbax"]


def eval_options(argv):
    return eval_cli.parse(argv)[1]


def convert_options(argv):
    return parse_command(convert_cli.build_parser(), argv, ConvertOptions)[1]


def test_flags_and_overrides_give_the_same_options():
    """Every kind of option (mesh and distributed sections, a choice, a switch, a repeatable flag, a
    dtype alias): flags, `key=value` settings and the dataclass built by hand are equal."""
    expected = PerplexityOptions(checkpoint="ckpt", data=["a.txt", "b.jsonl"], dtype="float32", bos=False,
                                 batch_size=4, mesh=MeshConfig(data=2, fsdp=3, strategy="dp"),
                                 distributed=DistributedConfig(mode="off", initialization_timeout_s=60))
    flags = ["perplexity", "ckpt", "--data", "a.txt", "--data", "b.jsonl", "--dtype", "fp32", "--no-bos",
             "--batch-size", "4", "--data-parallel", "2", "--fsdp", "3", "--strategy", "dp", "--distributed", "off",
             "--initialization-timeout-s", "60"]
    overrides = ["perplexity", "ckpt", "data=[a.txt, b.jsonl]", "dtype=float32", "bos=false", "batch_size=4",
                 "mesh.data=2", "mesh.fsdp=3", "mesh.strategy=dp", "distributed.mode=off",
                 "distributed.initialization_timeout_s=60"]
    assert eval_options(flags) == eval_options(overrides) == expected
    mixed = eval_options(["perplexity", "ckpt", "--data", "a.txt", "--fsdp", "3", "mesh.fsdp=5"])
    assert mixed.mesh.fsdp == 5  # overrides apply after the flags

    generate = GenerateOptions(checkpoint="c", prompt=["x"], ignore_eos=True, chat="llama3", max_new_tokens=7)
    assert eval_options(["generate", "c", "--prompt", "x", "--ignore-eos", "--chat", "llama3", "--max-new-tokens",
                         "7"]) == eval_options(["generate", "c", "prompt=[x]", "ignore_eos=true", "chat=llama3",
                                                "max_new_tokens=7"]) == generate

    converted = ConvertOptions(src="src", dst="dst", to="hf", src_format="meta", dtype="bfloat16",
                               max_shard_size=500 * 2**20, progress=False)
    assert convert_options(["--from", "meta", "--to", "hf", "src", "dst", "--dtype", "bf16", "--max-shard-size",
                            "500MiB", "--no-progress"]) == converted
    assert convert_options(["--to", "orbax", "src", "dst", "to=hf", "src_format=meta", "dtype=bfloat16",
                            "max_shard_size=500MiB", "progress=false"]) == converted


def test_the_old_underscore_spellings_still_work():
    assert eval_options(["generate", "c", "--max_new_tokens", "7", "--no_bos", "--data_parallel", "2"]) == \
        eval_options(["generate", "c", "--max-new-tokens", "7", "--no-bos", "--data-parallel", "2"])


@pytest.mark.parametrize("argv, message", [
    ([*PPL, "--strategy", "tp"],
     "llama-jax-eval perplexity: argument --strategy: invalid choice: 'tp' (choose from 'dp', 'fsdp', 'fsdp+tp')"),
    ([*PPL, "mesh.strategy=tp"], "mesh.strategy='tp'; expected one of ['dp', 'fsdp', 'fsdp+tp']"),
    ([*PPL, "--dtype", "fp16"], "llama-jax-eval perplexity: argument --dtype: invalid choice: 'fp16' "
                                "(choose from 'bfloat16', 'float32', 'bf16', 'fp32')"),
    ([*PPL, "dtype=half"], "dtype='half'; expected one of bfloat16, float32 (or bf16, fp32)"),
    ([*PPL, "--distributed", "maybe"], "llama-jax-eval perplexity: argument --distributed: invalid choice: "
                                       "'maybe' (choose from 'auto', 'on', 'off')"),
    ([*PPL, "format=safetensors"], "format='safetensors'; expected one of meta, hf, orbax"),
    (["generate", "ckpt", "--prompt", "x", "chat=vicuna"], "chat='vicuna'; expected one of llama2, llama3, llama3.1, "
                                                            "alpaca, tokenizer"),
    ([*PPL, "batch_sise=4"], "unknown key batch_sise (valid keys: batch_size, bos, checkpoint, context_len, data, "
                             "data_dir, distributed, dtype, format, mesh, output, split, stride, text_field, "
                             "tokenizer)"),
    ([*PPL, "--fsdp", "two"], "llama-jax-eval perplexity: argument --fsdp: invalid int value: 'two'"),
    ([*PPL, "--bogus"], "llama-jax-eval perplexity: unrecognized argument '--bogus' (see --help; settings may "
                        "also be given as key=value)"),
    (["perplexity", "ckpt"], "missing --data (or data=...)"),
])
def test_a_bad_option_is_one_line_and_exit_2(argv, message, capsys):
    """Checked when the command line is read: the data file and checkpoint do not even exist."""
    assert eval_cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


@pytest.mark.parametrize("argv, message", [
    ([*CONVERT, "--dtype", "fp64"], "llama-jax-convert: argument --dtype: invalid choice: 'fp64' (choose from "
                                    "'float32', 'bfloat16', 'float16', 'fp32', 'bf16', 'fp16')"),
    ([*CONVERT, "dtype=fp64"], "dtype='fp64'; expected one of float32, bfloat16, float16 (or fp32, bf16, fp16)"),
    (["src", "dst", "--to", "gguf"], "llama-jax-convert: argument --to: invalid choice: 'gguf' (choose from "
                                     "'meta', 'hf', 'orbax')"),
    ([*CONVERT, "--max-shard-size", "5XB"], "max_shard_size='5XB': not a size (e.g. 5GB, 500MiB, 1000000)"),
    (["src", "dst"], "missing --to (or to=...)"),
])
def test_a_bad_convert_option_is_one_line_and_exit_2(argv, message, capsys):
    assert convert_cli.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_the_program_exits_2_with_one_line():
    """The real program (`python eval.py`), in its own process: status 2, one line, nothing on stdout."""
    done = subprocess.run([sys.executable, str(REPO / "eval.py"), *PPL, "--strategy", "tp"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300, cwd=REPO)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("error: llama-jax-eval perplexity: argument --strategy: invalid choice: 'tp' "
                           "(choose from 'dp', 'fsdp', 'fsdp+tp')\n")


def documented_options(doc: str) -> list[tuple[str, str | None, str]]:
    """(flag, its value or None, key) of every row of the options tables in docs/`doc`."""
    rows = re.findall(r"^\| `(--[a-z-]+)(?: ([^`]+))?` \| `([a-z_.]+)` \|", (REPO / "docs" / doc).read_text(),
                      re.MULTILINE)
    return [(flag, value.split("\\|")[0] if value else None, key) for flag, value, key in rows]


def _value_for_override(flag: str, value: str | None) -> str:
    return value if value is not None else "false" if flag.startswith("--no-") else "true"


@pytest.mark.parametrize("doc, base, parse", [("evaluation.md", PPL, eval_options),
                                               ("conversion.md", CONVERT, convert_options)])
def test_every_documented_option_sets_the_key_the_docs_name(doc, base, parse):
    rows = documented_options(doc)
    assert len(rows) >= 8, rows
    default = parse(base)
    for flag, value, key in rows:
        by_flag = parse([*base, flag, *([value] if value is not None else [])])
        by_key = parse([*base, f"{key}={_value_for_override(flag, value)}"])
        assert by_flag == by_key != default, (flag, key)


def test_the_documented_example_lines_are_the_same_options():
    text = (REPO / "docs" / "evaluation.md").read_text()
    lines = [line.split("#")[0] for line in text.splitlines() if line.startswith("python eval.py perplexity CHECK")]
    flags, overrides = (shlex.split(line)[2:] for line in lines[:2])
    assert "--fsdp" in flags and "mesh.fsdp=2" in overrides
    assert eval_options(flags) == eval_options(overrides)


def test_one_dtype_vocabulary():
    """Canonical names and aliases mean the same everywhere: configs store the canonical name, and an
    unknown name lists every accepted spelling."""
    from llama_jax.model.config import ModelConfig
    from llama_jax.model.lora import LoraConfig
    from llama_jax.training.config import load_train_config

    for name, (numpy_dtype, alias) in dtypes.TABLE.items():
        assert dtypes.canonical(alias) == dtypes.canonical(name) == name
        assert dtypes.numpy_dtype(alias) == numpy_dtype and dtypes.config_name(numpy_dtype) == name
        assert ModelConfig(dtype=alias, param_dtype=alias) == ModelConfig(dtype=name, param_dtype=name)
    assert load_train_config(None, ["model.dtype=bf16", "model.param_dtype=fp32"]).model.dtype == "bfloat16"
    assert LoraConfig(base_dtype="bf16").base_dtype == "bfloat16"
    assert eval_options([*PPL, "--dtype", "bf16"]).dtype == "bfloat16"
    assert convert_options([*CONVERT, "dtype=fp16"]).dtype == "float16"
    with pytest.raises(ConfigError, match=re.escape("param_dtype='f32'; expected one of float32, bfloat16, "
                                                    "float16 (or fp32, bf16, fp16)")):
        ModelConfig(param_dtype="f32")
    with pytest.raises(ConfigError, match=re.escape("lora.base_dtype='float16'; expected one of bfloat16 (or bf16)")):
        LoraConfig(base_dtype="float16")


# ------------------------------------------------------------------------------------------- fuzzing

def _every_flag(parser) -> list[str]:
    found = []
    for action in parser._actions:
        found += [s for s in action.option_strings if s not in ("-h", "--help")]
        if isinstance(action.choices, dict):  # the subcommands' parsers
            found += [flag for sub in action.choices.values() for flag in _every_flag(sub)]
    return found


def _not_help(token: str) -> bool:
    """-h, --help and its abbreviations print the help and exit 0: not what the fuzzing is about."""
    return not (token.startswith("-h") or (len(token) > 2 and "--help".startswith(token.split("=")[0])))


FLAGS = sorted(set(_every_flag(eval_cli._parser()) + _every_flag(convert_cli.build_parser())))
KEYS = ["batch_size", "mesh", "mesh.fsdp", "mesh.strategy", "distributed.mode", "dtype", "data", "prompt", "bos",
        "checkpoint", "max_shard_size", "to", "progress", "code_timeout", "samples", "temperature", "tasks", "x"]
TOKENS = (st.sampled_from(FLAGS) | st.sampled_from([*COMMANDS, "ckpt", "-1", "0", "2", "nan", "inf", "1e999", "fp32",
                                                    "--", "-", "=", "[", "{"])
          | st.builds("{}={}".format, st.sampled_from(KEYS), st.text(max_size=12))
          | st.text(max_size=12).filter(_not_help))


def _reads_or_refuses(parse, argv):
    try:
        parse(argv)
    except ConfigError as e:
        assert "\n" not in str(e)


def _eval_argv(argv):
    _reads_or_refuses(eval_options, argv)


def _convert_argv(argv):
    _reads_or_refuses(convert_options, argv)


def _size_text(text):
    try:
        assert parse_size(text) >= 0
    except ConfigError:
        pass


test_eval_arguments_fuzzed, test_eval_arguments_fuzzed_thorough = fast_and_slow(
    _eval_argv, argv=st.tuples(st.sampled_from(list(COMMANDS)), st.lists(TOKENS, max_size=8)).map(
        lambda t: [t[0], *t[1]]))
test_convert_arguments_fuzzed, test_convert_arguments_fuzzed_thorough = fast_and_slow(
    _convert_argv, argv=st.lists(TOKENS, max_size=10))
test_sizes_fuzzed, test_sizes_fuzzed_thorough = fast_and_slow(
    _size_text, text=st.text(alphabet="0123456789. kKmMgGiIbB", max_size=30) | st.text(max_size=20))
