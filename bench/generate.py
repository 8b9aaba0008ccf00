"""Greedy decoding speed: llama_jax's jitted decode loop against transformers' `generate`, same device.

Same weights (a random LLaMA: the training benchmark's config S = `tiny` or M = `small`, or any model
preset by name, e.g. `llama3.2-1b`), same prompts (random tokens), EOS disabled. Defaults: fp32 both,
prompt 16, 128 new tokens, batch 1 and 8, on the CPU. With a GPU (jax's backend is `gpu`) transformers
runs on CUDA too, in `--hf-dtype` (issue 22: `--configs llama3.2-1b --batches 1,32 --prompt 128 --new 256
--dtype bf16 --hf-dtype bf16`). The two implementations alternate within one run (`--repeats` rounds
each). The ratio is of the best new tokens/s of each (on a shared 2-core machine the best round is the
one least disturbed by other processes); the medians are printed too. Compilation is timed separately
and excluded, as transformers has none. One line per case:

    ratio S b1: llama_jax 812 tok/s, transformers 305 tok/s -> 2.66x (medians 790 / 301; compile 2.1 s)

    python bench/generate.py [--configs S,M] [--batches 1,8] [--repeats 3] [--dtype fp32|bf16]
                             [--hf-dtype fp32|bf16] [--prompt 16] [--new 128]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time


import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from llama_jax.model.config import load_model_config  # noqa: E402
from llama_jax.evaluation.generate import Generator, SamplingConfig  # noqa: E402
from llama_jax.evaluation.loading import place_model  # noqa: E402
from llama_jax.utils.host_memory import tune_host_allocator  # noqa: E402
from llama_jax.model.external_config import hf_config_dict  # noqa: E402
from llama_jax.model.params import params_from_torch  # noqa: E402
from quiet import monitor  # noqa: E402

PRESETS = {"S": "tiny", "M": "small"}  # anything else is a model preset's own name
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_model(cfg, device: str) -> transformers.LlamaForCausalLM:
    """Random fp32 weights, initialised on `device` (a 1B model's CPU init alone takes tens of seconds)."""
    torch.manual_seed(0)
    with torch.device(device):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg))).float().eval()


def hf_rate(hf, prompts: np.ndarray, new: int) -> float:
    tokens = torch.as_tensor(prompts, dtype=torch.long, device=hf.device)
    sync = torch.cuda.synchronize if hf.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False, max_new_tokens=new,
                          min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    sync()
    seconds = time.perf_counter() - start
    assert out.shape == (len(prompts), prompts.shape[1] + new)
    return len(prompts) * new / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="S,M")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="llama_jax's dtype")
    parser.add_argument("--hf-dtype", default="fp32", choices=tuple(TORCH_DTYPES), help="transformers' dtype")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    args = parser.parse_args(argv)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, {jax.devices()[0].device_kind}; jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__} on {device}; llama_jax {args.dtype}, transformers {args.hf_dtype}; prompt "
          f"{args.prompt}, {args.new} new tokens; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    for name in args.configs.split(","):
        cfg = load_model_config(PRESETS.get(name, name), ["dtype=float32", "attention_impl=xla"])
        hf = hf_model(cfg, device)
        state = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}
        model = place_model(cfg, params_from_torch(state.__getitem__, cfg, "hf"), dtype=args.dtype)
        del state
        hf = hf.to(TORCH_DTYPES[args.hf_dtype])
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = np.random.default_rng(batch).integers(3, cfg.vocab_size, (batch, args.prompt))
            gen = Generator(model, SamplingConfig(max_new_tokens=args.new, stop_at_eos=False), pad_id=0)
            first = gen(prompts.tolist())
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(gen(prompts.tolist()).tokens_per_second)
                theirs.append(hf_rate(hf, prompts, args.new))
            a, b = max(ours), max(theirs)
            print(f"ratio {name} b{batch}: llama_jax {a:,.0f} tok/s, transformers {b:,.0f} tok/s -> {a / b:.2f}x "
                  f"(medians {statistics.median(ours):,.0f} / {statistics.median(theirs):,.0f}; compile "
                  f"{first.compile_seconds:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    tune_host_allocator()  # as eval.py does (llama_jax/host_memory.py); it applies to both frameworks here
    with monitor():
        sys.exit(main())
