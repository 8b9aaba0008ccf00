"""The Pallas kernels under a device mesh: shard_map over batch and heads, same result as one device.

Runs in a subprocess with 8 simulated CPU devices (the flag must be set before JAX initialises, and
this pytest process keeps its single device). Oracle: the `xla` reference on one device, unsharded.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocesses with several (simulated) devices or processes

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    from llama_jax.model.attention import attention, xla_attention
    import llama_jax.kernels  # noqa: F401  (registers pallas_gpu / pallas_tpu)

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    B, T, H, KV, D = 4, 32, 8, 4, 64
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(s, np.float32))
                      for s in ((B, T, H, D), (B, T, KV, D), (B, T, KV, D), (B, T, H, D)))
    seg = jnp.asarray(np.repeat([[1, 1, 2, 0]], T // 4, axis=1)[:, :T].repeat(B, 0), jnp.int32)

    def value_and_grads(impl, q, k, v, seg):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, seg, impl=impl), q, k, v)
        return (out,) + vjp(d_out)

    want = jax.jit(value_and_grads, static_argnums=0)("xla", q, k, v, seg)  # one device, no mesh
    # The project's mesh (Auto axes, all three names) and a partial one with Explicit axes.
    meshes = {"pallas_gpu": (("data", "fsdp", "tensor"), (2, 2, 2), AxisType.Auto),
              "pallas_tpu": (("data", "tensor"), (2, 4), AxisType.Explicit)}
    for impl, (names, sizes, axis_type) in meshes.items():
        mesh = jax.make_mesh(sizes, names, axis_types=(axis_type,) * len(names))
        batch_axes = tuple(a for a in names if a != "tensor")
        with jax.set_mesh(mesh):
            heads = NamedSharding(mesh, P(batch_axes, None, "tensor", None))
            rows = NamedSharding(mesh, P(batch_axes))
            args = [jax.device_put(x, heads) for x in (q, k, v)] + [jax.device_put(seg, rows)]
            fn = jax.jit(value_and_grads, static_argnums=0)
            jaxpr = str(jax.make_jaxpr(fn, static_argnums=0)(impl, *args))
            assert "shard_map" in jaxpr and "pallas_call" in jaxpr, impl
            got = fn(impl, *args)
            assert got[0].sharding.spec == P(batch_axes, None, "tensor", None), got[0].sharding
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                err = float(jnp.max(jnp.abs(g - w)))
                assert err <= 2e-5, (impl, name, err)
            kv1 = jax.device_put(k[:, :, :1], rows)
            try:
                attention(args[0], kv1, kv1, impl=impl)
                raise AssertionError("n_kv_heads=1 over tensor axis must be rejected")
            except ValueError as e:
                assert "n_kv_heads=1 is not divisible by mesh axis 'tensor'" in str(e), e
        print("ok", impl)
""")


def test_sharded_kernels_match_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["ok", "pallas_gpu", "ok", "pallas_tpu"]
