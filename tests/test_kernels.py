"""Pallas flash attention (GPU-style and TPU-style kernels, interpret mode on this CPU) vs the `xla` reference.

Oracle: `llama_jax.model.attention.xla_attention` (explicit mask, one T x T array) on the same inputs upcast to
fp32, forward and gradients (dq, dk, dv) through `jax.vjp` with a random cotangent. Tolerances: fp32 max
abs error <= 2e-5; bf16 ||err|| / ||ref|| <= 2e-2 per tensor. Inputs are fresh random normals. Both
interpret modes fill every output buffer with NaN before the kernel runs (checked below), so an output
element a kernel forgets to write fails the comparison.

The shape matrix leaves `interpret` at its default: interpret mode on this CPU, the compiled kernel on
its own accelerator. bench/gpu_check.sh runs the GPU cases of this file on a real GPU that way.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from llama_jax.model.attention import IMPLEMENTATIONS, attention, xla_attention
from llama_jax.kernels import common, flash_attention_gpu, flash_attention_tpu, gpu_flash, tpu_flash

FLASH = {"gpu": flash_attention_gpu, "tpu": flash_attention_tpu}
BACKENDS = {"gpu": (gpu_flash.BACKEND, (None, None)), "tpu": (tpu_flash.BACKEND, None)}


def segment_ids(rng: np.random.Generator, batch: int, seq: int) -> jnp.ndarray:
    """Packed documents (ids 1, 2, ...), one document blanked to padding, and a padded tail.

    With 3 rows the last is all padding: every one of its queries has no visible key.
    """
    rows = []
    for _ in range(min(batch, 2)):
        cuts = np.sort(rng.choice(np.arange(1, seq + 1), size=min(3, seq), replace=False))
        ids = 1 + np.searchsorted(cuts, np.arange(seq), side="right")
        ids[ids == rng.integers(1, ids.max() + 1)] = 0
        ids[seq - rng.integers(0, max(seq // 4, 1) + 1):] = 0
        rows.append(ids)
    rows += [np.zeros(seq, np.int64)] * (batch - len(rows))
    return jnp.asarray(np.stack(rows), jnp.int32)


def make_inputs(seed, batch, seq, heads, kv_heads, head_dim, dtype, with_segments):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)  # noqa: E731
    q, d_out = draw(batch, seq, heads, head_dim), draw(batch, seq, heads, head_dim)
    k, v = draw(batch, seq, kv_heads, head_dim), draw(batch, seq, kv_heads, head_dim)
    return q, k, v, d_out, (segment_ids(rng, batch, seq) if with_segments else None)


@functools.partial(jax.jit, static_argnums=0)
def value_and_grads(fn, q, k, v, d_out):
    """(out, dq, dk, dv) for cotangent d_out, compiled as one program (eager dispatch costs seconds here)."""
    out, vjp = jax.vjp(fn, q, k, v)
    return (out,) + vjp(d_out)


@jax.jit
def reference(q, k, v, d_out, seg):
    """The oracle: (out, dq, dk, dv) of the `xla` reference on the inputs upcast to fp32."""
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    out, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, seg), up(q), up(k), up(v))
    return (out,) + vjp(up(d_out))


def assert_matches(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all(), f"{what}: non-finite values (an unwritten or NaN element)"
    if dtype == jnp.float32:
        err = np.abs(got - want).max()
        assert err <= 2e-5, f"{what}: max abs error {err:.3g} > 2e-5"
    else:
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel <= 2e-2, f"{what}: relative error {rel:.3g} > 2e-2"


# (batch, seq, heads, kv_heads, head_dim, dtype, segments, (block_q, block_k, q_dkdv, k_dkdv, q_dq, k_dq))
# Every listed value of each dimension appears for each backend: batch 1-3, seq 1/17/128/300/1024, GQA
# ratio 1/4/8, segments on/off, fp32/bf16, head_dim 64/128, and blocks with block_q != block_k both ways.
GPU_CASES = [
    (1, 1, 4, 4, 64, jnp.float32, False, (128, 64, 32, 128, 128, 32)),
    (3, 17, 8, 2, 64, jnp.bfloat16, True, (16, 16, 16, 16, 16, 16)),
    (3, 128, 8, 1, 128, jnp.float32, True, (32, 16, 16, 32, 32, 16)),
    (2, 300, 4, 4, 128, jnp.bfloat16, True, (64, 32, 32, 64, 64, 32)),
    (1, 1024, 4, 1, 64, jnp.float32, True, (64, 64, 64, 64, 64, 64)),  # fp32 blocks are at most 64
    (1, 1024, 8, 1, 128, jnp.bfloat16, False, (128, 128, 64, 128, 128, 32)),  # the defaults
    (1, 40, 2, 1, 64, jnp.float16, True, (16, 32, 32, 16, 16, 32)),  # float16 is accepted too
]
TPU_CASES = [
    (1, 1, 4, 4, 64, jnp.float32, False, (512, 512, 256, 512, 512, 256)),
    (3, 17, 4, 1, 128, jnp.bfloat16, True, (16, 16, 16, 16, 16, 16)),
    (1, 128, 8, 1, 64, jnp.float32, True, (64, 32, 32, 64, 64, 32)),
    (2, 300, 2, 2, 128, jnp.bfloat16, False, (64, 128, 128, 64, 64, 128)),
    (1, 1024, 4, 1, 64, jnp.float32, True, (256, 256, 256, 256, 256, 256)),
]


def _case_id(case):
    b, t, h, kv, d, dtype, seg, blocks = case
    return f"B{b}-T{t}-H{h}-KV{kv}-D{d}-{jnp.dtype(dtype).name}-{'seg' if seg else 'noseg'}-bq{blocks[0]}bk{blocks[1]}"


@pytest.mark.parametrize("backend,case", [("gpu", c) for c in GPU_CASES] + [("tpu", c) for c in TPU_CASES],
                         ids=[f"gpu-{_case_id(c)}" for c in GPU_CASES] + [f"tpu-{_case_id(c)}" for c in TPU_CASES])
def test_forward_and_gradients_match_reference(backend, case):
    batch, seq, heads, kv_heads, head_dim, dtype, with_segments, blocks = case
    q, k, v, d_out, seg = make_inputs(seq * 7 + heads, batch, seq, heads, kv_heads, head_dim, dtype, with_segments)
    kwargs = dict(zip(common.BLOCK_NAMES, blocks))
    got = value_and_grads(lambda q, k, v: FLASH[backend](q, k, v, seg, **kwargs), q, k, v, d_out)
    want = reference(q, k, v, d_out, seg)
    for name, g, w, x in zip(("out", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, f"{name}: {g.dtype}{g.shape} vs {x.dtype}{x.shape}"
        assert_matches(g, w, dtype, name)
    if seg is not None:  # padding attends to nothing and is seen by nobody: exact zeros, never NaN
        pad = np.asarray(seg) == 0
        assert pad.any()
        for name, g in zip(("out", "dq", "dk", "dv"), got):
            assert not np.asarray(g, np.float32)[pad].any(), f"{name} is non-zero at padding positions"


def test_interpret_modes_poison_unwritten_outputs():
    """The premise of the NaN checks above: an output element no kernel step writes stays NaN."""
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    x = jnp.ones((8, 128), jnp.float32)
    cfg = common.KernelConfig(blocks=common.Blocks(8, 8, 8, 8, 8, 8), interpret=True)
    for interpret in (True, tpu_flash._interpret(cfg)):
        out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=interpret)(x)
        assert np.isnan(np.asarray(out)).all()


# ------------------------------------------------------------------------------- causal block skipping


def needed_pairs(n_q, n_k, bq, bk):
    """Brute force over element positions: block (i, j) is needed iff some key in j is <= some query in i."""
    return np.array([[any(kk <= qq for qq in range(i * bq, (i + 1) * bq) for kk in range(j * bk, (j + 1) * bk))
                      for j in range(n_k)] for i in range(n_q)])


# Each kernel meets block_q == block_k, block_q > block_k and block_q < block_k across the three plans.
COUNT_PLANS = [common.Blocks(16, 16, 32, 16, 16, 32), common.Blocks(32, 16, 16, 32, 16, 16),
               common.Blocks(16, 32, 16, 16, 32, 16)]


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
@pytest.mark.parametrize("plan", COUNT_PLANS, ids=["A", "B", "C"])
def test_kernels_visit_only_causal_block_pairs(backend, plan):
    """Counted interpret run: each kernel's loop/grid increments a per-program counter once per visited pair.

    Expected counts come from a brute force over element positions. A kernel that loads a block above
    the diagonal counts it; one that skips a needed block gives wrong outputs (checked as well).
    """
    kernels, compiler = BACKENDS[backend]
    batch, seq, heads, kv_heads, head_dim = 1, 64, 2, 1, 64
    q, k, v, d_out, seg = make_inputs(plan.q + plan.k, batch, seq, heads, kv_heads, head_dim, jnp.float32, True)
    (q, k, v, seg), blocks, _ = common.prepare(q, k, v, seg, plan, kernels.align)
    assert blocks == plan
    cfg = common.KernelConfig(blocks=blocks, interpret=True, compiler=compiler, count_visits=True)
    out, residual, fwd_counts = kernels.forward(q, k, v, seg, cfg)
    delta = common.output_grad_rowdot(out, d_out)
    dq, dk, dv, dkdv_counts, dq_counts = kernels.backward(q, k, v, seg, delta, residual, d_out, cfg)

    group = heads // kv_heads
    for name, counts, (bq, bk), axis, repeat in (("fwd", fwd_counts, (plan.q, plan.k), 1, 1),
                                                 ("dq", dq_counts, (plan.q_dq, plan.k_dq), 1, 1),
                                                 ("dkdv", dkdv_counts, (plan.q_dkdv, plan.k_dkdv), 0, group)):
        need = needed_pairs(seq // bq, seq // bk, bq, bk)
        expected = repeat * need.sum(axis)
        np.testing.assert_array_equal(np.asarray(counts), np.broadcast_to(expected, counts.shape), err_msg=name)
        if bq == bk:
            n = seq // bq
            assert expected.sum() == repeat * n * (n + 1) // 2 < repeat * n * n
    want = reference(q, k, v, d_out, seg)
    for name, g, w in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert_matches(g, w, jnp.float32, name)


def _pallas_call_params(jaxpr, found=None) -> dict:
    """{kernel name: params} of every pallas_call in a jaxpr, also inside custom_vjp / pjit sub-jaxprs."""
    found = {} if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found[eqn.params["name"]] = eqn.params
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _pallas_call_params(sub, found)
    return found


def _pallas_cost_estimates(fn, *args):
    calls = _pallas_call_params(jax.make_jaxpr(fn)(*args).jaxpr)
    return {name: params["cost_estimate"] for name, params in calls.items()}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_cost_estimate_counts_only_causal_pairs(backend):
    """The cost_estimate attached to each pallas_call is computed from the kernels' own causal bounds."""
    kernels, compiler = BACKENDS[backend]
    batch, seq, heads, kv_heads, head_dim, bq, bk = 2, 256, 4, 2, 64, 32, 16
    blocks = common.Blocks(bq, bk, bk, bq, bq, bk)
    cfg = common.KernelConfig(blocks=blocks, interpret=True, compiler=compiler)
    q, k, v, d_out, _ = make_inputs(0, batch, seq, heads, kv_heads, head_dim, jnp.float32, False)
    fwd = _pallas_cost_estimates(lambda q, k, v: kernels.forward(q, k, v, None, cfg), q, k, v)
    out, residual, _ = jax.eval_shape(lambda q, k, v: kernels.forward(q, k, v, None, cfg), q, k, v)
    bwd = _pallas_cost_estimates(lambda q, k, v, o, r: kernels.backward(
        q, k, v, None, common.output_grad_rowdot(o, d_out), r, d_out, cfg),
                                 q, k, v, out, residual)
    square = batch * heads * (seq // bq) * (seq // bk)
    for name, (matmuls, (bq_, bk_)) in {f"flash_fwd_{backend}": (2, (bq, bk)),
                                        f"flash_dkdv_{backend}": (4, (bk, bq)),
                                        f"flash_dq_{backend}": (3, (bq, bk))}.items():
        estimate = (fwd | bwd)[name]
        pairs = batch * heads * int(needed_pairs(seq // bq_, seq // bk_, bq_, bk_).sum())
        assert estimate.flops == 2 * matmuls * bq_ * bk_ * head_dim * pairs, name
        assert estimate.transcendentals == pairs * bq_ * bk_, name
        assert pairs < 0.6 * square


def test_gpu_default_blocks_and_fp32_cap():
    """Default blocks reach the kernels (bf16: 128-row forward, dK/dV and dQ programs); fp32 inputs get at
    most FP32_MAX_BLOCK rows per block (128-row fp32 tiles took over 2 minutes to compile on an H200)."""
    seq = 256
    for dtype, rows in ((jnp.bfloat16, 128), (jnp.float32, gpu_flash.FP32_MAX_BLOCK)):
        q, k, v, d_out, _ = make_inputs(0, 1, seq, 2, 1, 64, dtype, False)
        jaxpr = jax.make_jaxpr(value_and_grads.__wrapped__, static_argnums=0)(
            lambda q, k, v: flash_attention_gpu(q, k, v, interpret=True), q, k, v, d_out)
        grids = {name: params["grid_mapping"].grid for name, params in _pallas_call_params(jaxpr.jaxpr).items()}
        assert grids == {"flash_fwd_gpu": (seq // rows, 1, 2), "flash_dkdv_gpu": (seq // rows, 1, 1),
                         "flash_dq_gpu": (seq // rows, 1, 2)}, (jnp.dtype(dtype).name, grids)


def test_visited_pairs_formula():
    for seq, bq, bk in [(128, 16, 16), (1024, 128, 128), (256, 32, 16), (256, 16, 64)]:
        assert common.visited_pairs(seq, bq, bk) == needed_pairs(seq // bq, seq // bk, bq, bk).sum()
    assert common.visited_pairs(1024, 128, 128) == 8 * 9 // 2


# ------------------------------------------------------------------------------------ integration


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_registered_implementations_match_reference(impl):
    """`attention(..., impl=...)` with default blocks; interpret mode is chosen automatically on a CPU."""
    q, k, v, _, seg = make_inputs(3, 2, 40, 4, 2, 64, jnp.float32, True)
    kernel = {"pallas_gpu": flash_attention_gpu, "pallas_tpu": flash_attention_tpu}[impl]
    assert IMPLEMENTATIONS[impl].load().__wrapped__ is kernel
    assert_matches(attention(q, k, v, seg, impl=impl), xla_attention(q, k, v, seg), jnp.float32, "out")


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mutate,message", [
    (lambda q, k, v, s: (q[0], k, v, s), "q must be"),
    (lambda q, k, v, s: (q, k, v[:, :, :, :32], s), "k.shape"),
    (lambda q, k, v, s: (q, k[:, :8], v[:, :8], s), "q_len == kv_len"),
    (lambda q, k, v, s: (q[:, :, :3], k, v, s), "not a multiple of n_kv_heads"),
    (lambda q, k, v, s: (q, k, v, s[:, :8]), "segment_ids.shape"),
    (lambda q, k, v, s: (q, k, v, s.astype(jnp.float32)), "segment_ids.dtype"),
    (lambda q, k, v, s: (q.astype(jnp.int32), k, v, s), "q.dtype"),
    (lambda q, k, v, s: (q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), s), "dtypes differ"),
])
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_bad_inputs_are_rejected_with_a_clear_error(backend, mutate, message):
    q, k, v, _, seg = make_inputs(1, 1, 16, 4, 2, 64, jnp.float32, True)
    with pytest.raises(ValueError, match=message):
        FLASH[backend](*mutate(q, k, v, seg), interpret=True)


def test_bad_block_sizes_and_head_dims_are_rejected():
    q, k, v, _, _ = make_inputs(1, 1, 16, 2, 2, 64, jnp.float32, False)
    with pytest.raises(ValueError, match="block_k=48; Triton needs a power of two"):
        flash_attention_gpu(q, k, v, block_k=48, interpret=True)
    with pytest.raises(ValueError, match="block_q_dq=8; expected a positive multiple of 16"):
        flash_attention_gpu(q, k, v, block_q_dq=8, interpret=True)
    with pytest.raises(ValueError, match="block_q=12; expected a positive multiple of 8"):
        flash_attention_tpu(q, k, v, block_q=12, interpret=True)
    q80, k80, v80, _, _ = make_inputs(1, 1, 16, 2, 2, 80, jnp.float32, False)
    with pytest.raises(ValueError, match="head_dim=80"):
        flash_attention_gpu(q80, k80, v80, interpret=True)


def test_fit_block_shrinks_for_short_sequences_and_keeps_alignment():
    assert common.fit_block(128, 1, 16) == 16
    assert common.fit_block(128, 17, 16) == 32
    assert common.fit_block(128, 300, 16) == 128
    assert common.fit_block(384, 20, 8) == 24
    blocks, padded = common.plan_blocks(300, common.Blocks(64, 32, 32, 64, 64, 32), 16)
    assert blocks == common.Blocks(64, 32, 32, 64, 64, 32) and padded == 320
