"""Context parallelism's two attention forms against each other, on simulated CPU devices.

All-gather (K/V gathered, each device's queries masked by true position: the form the `xla` reference
takes) against all-to-all (heads <-> sequence, a whole-sequence attention per share of the heads: the
form the Pallas kernels take), both with the `xla` reference as their local attention so that only the
form differs (`llama_jax.model.context_attention`). Each is first checked against one device's
reference attention (outputs and q/k/v gradients, 1e-5 relative; exit 1 otherwise). Printed per form:
the best forward+backward time of the jitted attention gradient, and XLA's temporary bytes per device;
then the ratio all-gather / all-to-all.

On simulated CPU devices a collective is a memory copy and the devices share the host's cores: the
times compare the forms' total compute and copying, not an accelerator's links. The temporary bytes
are per device, as on an accelerator.

    python bench/context_parallel.py [--length 2048] [--context 4] [--reps 3]
    python bench/context_parallel.py --smoke       # length 256: that it runs
"""
from __future__ import annotations

import argparse

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from llama_jax.model.attention import masked_attention, xla_attention  # noqa: E402
from llama_jax.model.context_attention import context_parallel_attention  # noqa: E402
from llama_jax.parallel.context import from_balanced, to_balanced  # noqa: E402
from llama_jax.parallel.mesh import MeshConfig, make_mesh, under  # noqa: E402
from llama_jax.parallel.rules import rules_for  # noqa: E402
from timer import best_seconds, check, machine_line  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
FORMS = {"all-gather": None, "all-to-all": xla_attention}


def inputs(length: int):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, length, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(1, length, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray((np.arange(length) >= length // 3) + 1, jnp.int32)[None]  # two documents
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    return (q, k, v, segment_ids), cotangent


def gradient_program(attend):
    """(out, dq, dk, dv) of `attend(q, k, v, segment_ids)` against a fixed cotangent."""
    def run(q, k, v, segment_ids, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, segment_ids), q, k, v)
        return (out, *vjp(cotangent))
    return run


def context_form(kernel, shards: int):
    """Attention over the natural-order inputs through the context-parallel form (balanced layout)."""
    def attend(q, k, v, segment_ids):
        balanced = [to_balanced(x, shards) for x in (q, k, v, segment_ids)]
        out = context_parallel_attention(*balanced, ("context",), masked=masked_attention, kernel=kernel)
        return from_balanced(out, shards)
    return attend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.length, args.reps = 256, 1
    print(machine_line())
    mesh = make_mesh(MeshConfig(fsdp=1, context=args.context), devices=jax.devices()[:args.context])
    rules = rules_for("fsdp")
    (q, k, v, segment_ids), cotangent = inputs(args.length)
    reference = jax.jit(gradient_program(xla_attention))(q, k, v, segment_ids, cotangent)
    split = NamedSharding(mesh, P(None, "context"))
    placed = [jax.device_put(x, split) for x in (q, k, v, segment_ids, cotangent)]
    figures = {}
    for form, kernel in FORMS.items():
        jitted = jax.jit(gradient_program(context_form(kernel, args.context)))
        program = under(mesh, rules, lambda *a, jitted=jitted: jitted.lower(*a).compile())(*placed)
        for name, ours, want in zip(("out", "dq", "dk", "dv"), program(*placed), reference):
            check(f"context {form} {name}", ours, want, 1e-5)
        seconds = best_seconds(lambda program=program: jax.block_until_ready(program(*placed)), args.reps)
        temp = program.memory_analysis().temp_size_in_bytes
        figures[form] = (seconds, temp)
        print(f"context {form} T={args.length} C={args.context} heads {HEADS}/{KV_HEADS}: "
              f"{seconds * 1e3:,.1f} ms fwd+bwd, {temp / 2**20:,.1f} MiB temporaries per device")
    (t_gather, m_gather), (t_a2a, m_a2a) = figures["all-gather"], figures["all-to-all"]
    print(f"ratio all-gather / all-to-all: time {t_gather / t_a2a:.2f}x, temporaries {m_gather / m_a2a:.2f}x")


if __name__ == "__main__":
    main()
