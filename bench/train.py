"""Training throughput: our train step against Hugging Face transformers + torch, same shapes, same CPU.

Ours is exactly what `train.py` runs: `llama_jax.training.step.jit_train_step` (forward, backward, global-norm
clipping, AdamW with the LLaMA schedule) on a one-device mesh. The competitor is `LlamaForCausalLM`
(eager, SDPA attention) with `torch.nn.utils.clip_grad_norm_` and `torch.optim.AdamW`, same
hyper-parameters. Both see the same random token batches (causal attention, no packing).

Each framework runs in its own worker process, both started by this one run and alternating in rounds
(one works while the other waits), so a busy machine slows both alike. A round is one untimed step,
then `--steps` timed steps; the median round is reported (compilation and `--steps` warm-up steps, in
which the process's heap grows to its steady size, happen before the first round).
Why both: on the development VM, memory one framework freed cost the other page faults on its next
step (our M step's kernel time 0.45 s -> 1.9 s, 25% fewer tokens/s, after a torch round in the same
process). Separate processes keep the heaps apart; the untimed step absorbs what remains (the VM's
balloon hands freed memory back to the host), for both frameworks alike, which no real training
process sees.

Torch runs twice, as two workers: with the malloc tunables `train.py` sets for itself
(`llama_jax/host_memory.py`; they speed torch up even more than us: this is the headline `ratio`), and
with glibc's stock allocator, as a torch program runs unless its user tunes it (how torch's figures
quoted when this benchmark was specified were measured; printed as `ratio ... ours/torch(stock malloc)`).
`--no-torch_stock` skips the second.

Precision pairs compared: our fp32 against torch fp32; our bf16 compute (fp32 master weights, fp32
loss) against torch fp32 weights under `torch.autocast(bfloat16)`.

MFU is `train.py`'s own (`llama_jax.training.peak.job_peak`): on a CPU against the best 2048² matmul
rate measured in this process, re-measured when an MFU would exceed 1 and never below a rate the step
itself reached, so it is at most 100% (a peak measured while the machine was busy once gave 104-112%);
FLOPs per token from `ModelConfig.flops_per_token` (6·N + 12·L·d·T). The machine's load
before and after and the verdict (quiet, or loaded: ratio not valid) are printed by `bench/quiet.py`.

    python bench/train.py                      # configs S and M, fp32 and bf16
    python bench/train.py --configs S --precisions bf16 --rounds 5 --steps 4
    python bench/train.py --smoke              # config S at seq 64, fp32, one round of one step: that it runs
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time


import jax  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax.parallel.mesh import MeshConfig, make_global_batch, make_mesh  # noqa: E402
from llama_jax.parallel.rules import rules_for  # noqa: E402
from llama_jax.training.step import (OptimizerConfig, create_train_state, jit_train_step,  # noqa: E402
                                     lr_schedule, make_optimizer)
from llama_jax.model.config import ModelConfig  # noqa: E402
from llama_jax.utils.host_memory import tune_host_allocator, wanted_tunables  # noqa: E402
from llama_jax.training.peak import Peak, job_peak  # noqa: E402
from quiet import monitor  # noqa: E402

CONFIGS = {  # vocab, dim, layers, heads, ffn, seq, batch
    "S": dict(vocab_size=8000, dim=256, n_layers=4, n_heads=4, ffn_hidden_dim=768, seq=256, batch=8),
    "M": dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_hidden_dim=1536, seq=512, batch=4),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
OPT = OptimizerConfig(peak_lr=3e-4, warmup_steps=10)
TOTAL_STEPS = 1000


def model_config(shape: dict, precision: str, scan_layers: bool) -> ModelConfig:
    return ModelConfig(vocab_size=shape["vocab_size"], dim=shape["dim"], n_layers=shape["n_layers"],
                       n_heads=shape["n_heads"], ffn_hidden_dim=shape["ffn_hidden_dim"], max_seq_len=shape["seq"],
                       dtype=DTYPES[precision], attention_impl="xla", scan_layers=scan_layers)


class Ours:
    """`train.py`'s jitted step on a one-device mesh (also timed on a GPU by `bench/train_gpu.py`)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        mesh = make_mesh(MeshConfig())
        rules = rules_for("fsdp")
        optimizer = make_optimizer(OPT, TOTAL_STEPS)
        self.state = create_train_state(self.cfg, optimizer, mesh, rules, seed=0)
        self.step = jit_train_step(self.cfg, optimizer, mesh, rules, schedule=lr_schedule(OPT, TOTAL_STEPS))
        self.mesh, self.rules = mesh, rules

    def run(self, batches) -> float:
        for tokens in batches:
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                     "loss_mask": np.ones(tokens[:, 1:].shape, np.float32)}
            self.state, metrics = self.step(self.state, make_global_batch(batch, self.mesh, self.rules))
        return float(metrics["loss"])


class Torch:
    def __init__(self, shape: dict, precision: str):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["dim"],
                             intermediate_size=shape["ffn_hidden_dim"], num_hidden_layers=shape["n_layers"],
                             num_attention_heads=shape["n_heads"], max_position_embeddings=shape["seq"],
                             rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")
        self.torch = torch
        self.model = LlamaForCausalLM(config).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=OPT.peak_lr, betas=(OPT.b1, OPT.b2), eps=OPT.eps,
                                     weight_decay=OPT.weight_decay)
        self.autocast = precision == "bf16"

    def run(self, batches) -> float:
        torch = self.torch
        for tokens in batches:
            tokens = torch.from_numpy(tokens).long()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(input_ids=tokens[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPT.clip_norm)
            self.opt.step()
        return loss.item()


def _worker(conn, framework: str, shape: dict, precision: str, scan_layers: bool, steps: int) -> None:
    """One framework in its own process: warm up, then time `steps` steps whenever the parent asks."""
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, shape["vocab_size"], (shape["batch"], shape["seq"] + 1), dtype=np.int32)
               for _ in range(steps)]
    runner = Ours(model_config(shape, precision, scan_layers)) if framework == "ours" else Torch(shape, precision)
    t = time.perf_counter()
    runner.run(batches[:1])
    conn.send(time.perf_counter() - t)
    runner.run(batches)  # warm-up: the process's heap grows to its steady size (seconds of page faults)
    while conn.recv() == "round":
        runner.run(batches[:1])  # untimed: settles this process's memory after the other one's round
        t = time.perf_counter()
        runner.run(batches)
        conn.send(time.perf_counter() - t)


def _stock_allocator_env() -> dict[str, str]:
    """This process's environment without the malloc tunables `tune_host_allocator` added."""
    ours = set(wanted_tunables())
    kept = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and t.split("=", 1)[0] not in ours]
    env = dict(os.environ, GLIBC_TUNABLES=":".join(kept))
    return env if kept else {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}


def _start_worker(context, framework: str, name: str, precision: str, args, env: dict[str, str] | None):
    """A worker process; `env` replaces this process's environment while it starts (a spawned child
    reads GLIBC_TUNABLES once, at its start)."""
    conn, child = context.Pipe()
    process = context.Process(target=_worker, args=(child, framework, args.shapes[name], precision, args.scan_layers,
                                                     args.steps), daemon=True)
    saved = dict(os.environ)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        process.start()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return conn, process, conn.recv()


def compare(name: str, precision: str, args, peak: Peak) -> None:
    shape = args.shapes[name]
    tokens_per_round = args.steps * shape["batch"] * shape["seq"]
    context = multiprocessing.get_context("spawn")
    runners = {"ours": ("ours", None), "torch": ("torch", None)}
    if args.torch_stock:
        runners["torch(stock malloc)"] = ("torch", _stock_allocator_env())
    workers = {}
    for label, (framework, env) in runners.items():  # one after the other: warm-ups do not overlap
        workers[label] = _start_worker(context, framework, name, precision, args, env)
    rates = {label: [] for label in workers}
    for _ in range(args.rounds):
        for label, (conn, _, _) in workers.items():
            conn.send("round")
            rates[label].append(tokens_per_round / conn.recv())
    for conn, process, _ in workers.values():
        conn.send("stop")
        process.join()
    median = {label: statistics.median(r) for label, r in rates.items()}
    mfu = peak.mfu(model_config(shape, precision, args.scan_layers).flops_per_token(shape["seq"]) * median["ours"])
    print(f"{name} {precision}: ours {median['ours']:,.0f} tokens/s ({peak.key} {mfu:.1%} of "
          f"{peak.per_device / 1e9:.0f} GFLOP/s, "
          f"first step {workers['ours'][2]:.1f} s) | "
          + " | ".join(f"{label} {median[label]:,.0f} tokens/s" for label in workers if label != "ours")
          + " (rounds " + ", ".join(f"{label} {[round(r) for r in rates[label]]}" for label in workers) + ")")
    for label in workers:
        if label != "ours":
            print(f"ratio {name} {precision} ours/{label} = {median['ours'] / median[label]:.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="S,M", help="comma-separated: S, M")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per framework")
    parser.add_argument("--steps", type=int, default=3, help="train steps per timed round")
    parser.add_argument("--scan_layers", action=argparse.BooleanOptionalAction, default=False,
                        help="scan over layers (constant compile time) instead of unrolling them")
    parser.add_argument("--torch_stock", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch with glibc's stock allocator (a third worker)")
    parser.add_argument("--smoke", action="store_true", help="config S at seq 64, fp32, one round of one step")
    args = parser.parse_args(argv)
    args.shapes = CONFIGS
    if args.smoke:
        args.shapes = {"S": dict(CONFIGS["S"], seq=64, batch=2)}
        args.configs, args.precisions, args.rounds, args.steps, args.torch_stock = "S", "fp32", 1, 1, False
    configs, precisions = args.configs.split(","), args.precisions.split(",")
    for value, valid in ((configs, CONFIGS), (precisions, DTYPES)):
        unknown = [v for v in value if v not in valid]
        if unknown:
            parser.error(f"unknown {unknown}; choose from {sorted(valid)}")
    peaks = {p: job_peak(jax.devices()[0], 1, DTYPES[p]) for p in precisions}
    print("matmul peak (2048², jitted, best of 7): " + ", ".join(f"{p} {v.per_device / 1e9:.0f} GFLOP/s"
                                                               for p, v in peaks.items()))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    for name in configs:
        for precision in precisions:
            compare(name, precision, args, peaks[precision])


if __name__ == "__main__":
    tune_host_allocator()  # as train.py does (llama_jax/host_memory.py); the stock-malloc torch worker drops it
    with monitor():
        main()
