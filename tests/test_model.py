"""The model against Hugging Face's LlamaForCausalLM, and its own modes against each other."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.model.config import ModelConfig, RopeScaling
from llama_jax.model.transformer import KVCache
from llama_jax.model.transformer import build
from oracle import hf_logits, hf_model, ours_from_hf

BASE = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=96, dtype="float32",
            attention_impl="xla", norm_eps=1e-5, max_seq_len=64)
CONFIGS = {
    "mha": ModelConfig(**BASE),
    "gqa": ModelConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 2, "rope_theta": 500000.0}),
    "tied": ModelConfig(**{**BASE, "tie_embeddings": True, "n_kv_heads": 2}),
    "rope_scaling": ModelConfig(**{**BASE, "n_kv_heads": 2, "rope_theta": 500000.0, "max_seq_len": 256,
                                   "rope_scaling": RopeScaling(factor=8.0, original_max_position_embeddings=16)}),
    "rule_ffn": ModelConfig(**{**BASE, "ffn_hidden_dim": None, "multiple_of": 32, "ffn_dim_multiplier": 1.3,
                               "scan_layers": False}),
}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, **kwargs):
    return nnx.merge(graphdef, state)(tokens, **kwargs)


def run(model, tokens, **kwargs):
    """The model's forward pass, jitted (eager NNX calls are ~10× slower to run on CPU)."""
    return _forward(*nnx.split(model), jnp.asarray(tokens), **kwargs)


def random_tokens(cfg, batch, length, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("length", [1, 7, 33])
def test_logits_match_transformers(name, length):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=1)
    ours = ours_from_hf(hf, cfg)
    tokens = random_tokens(cfg, 2, length if name != "rope_scaling" else length * 6)
    expected = hf_logits(hf, tokens)
    got, _ = run(ours, tokens)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=0)


def test_rule_ffn_size_is_rounded_up_to_multiple_of():
    # int(2·4·64/3) = 170; ×1.3 → 221; rounded up to a multiple of 32 → 224.
    assert CONFIGS["rule_ffn"].hidden_dim == 224
    assert ModelConfig(dim=4096, multiple_of=256).hidden_dim == 11008


def test_scan_and_unrolled_layers_agree():
    cfg = CONFIGS["gqa"]
    scanned = build(cfg, seed=3)
    unrolled = build(cfg.replace(scan_layers=False), seed=3)
    tokens = jnp.asarray(random_tokens(cfg, 2, 19))
    a, _ = run(scanned, tokens)
    b, _ = run(unrolled, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _grads(cfg, tokens):
    model = build(cfg, seed=5)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policies_give_identical_gradients(scan):
    tokens = jnp.asarray(random_tokens(CONFIGS["gqa"], 2, 16))
    ref_loss, ref_grads = _grads(CONFIGS["gqa"].replace(remat="none", scan_layers=scan), tokens)
    for policy in ("full", "save_matmuls"):
        loss, grads = _grads(CONFIGS["gqa"].replace(remat=policy, scan_layers=scan), tokens)
        assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            scale = float(jnp.max(jnp.abs(r)))
            assert float(jnp.max(jnp.abs(g - r))) <= 1e-6 * scale, policy


@pytest.mark.parametrize("name", ["mha", "gqa", "rope_scaling"])
def test_kv_cache_decoding_matches_full_forward(name):
    cfg = CONFIGS[name].replace(scan_layers=name != "mha")
    model = build(cfg, seed=7)
    tokens = jnp.asarray(random_tokens(cfg, 2, 12))
    full, _ = run(model, tokens)
    cache = KVCache.create(cfg, batch=2, max_len=16)
    prefill, cache = run(model, tokens[:, :5], cache=cache)
    steps = [prefill]
    for t in range(5, 12):
        logits, cache = run(model, tokens[:, t:t + 1], cache=cache)
        steps.append(logits)
    assert int(cache.index) == 12
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=1e-5, rtol=0)


def test_left_padded_batch_decodes_like_each_prompt_alone():
    """Prompts of different lengths, left-padded (segment id 0), decode as if each ran alone."""
    cfg = CONFIGS["gqa"]
    model = build(cfg, seed=8)
    long, short = random_tokens(cfg, 1, 9, seed=1)[0], random_tokens(cfg, 1, 4, seed=2)[0]
    pad = len(long) - len(short)
    tokens = jnp.asarray(np.stack([long, np.concatenate([np.zeros(pad, int), short])]))
    segments = jnp.asarray(np.stack([np.ones(9, int), np.r_[np.zeros(pad, int), np.ones(4, int)]]))
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    cache = KVCache.create(cfg, batch=2, max_len=12)
    logits, cache = run(model, tokens, positions=positions, segment_ids=segments, cache=cache)
    next_tok = jnp.asarray([[3], [5]])
    step, cache = run(model, next_tok, positions=positions[:, -1:] + 1, segment_ids=jnp.ones((2, 1), jnp.int32), cache=cache)
    alone, _ = run(model, np.r_[short, 5][None])
    np.testing.assert_allclose(np.asarray(logits[1, pad:]), np.asarray(alone[0, :4]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(step[1, 0]), np.asarray(alone[0, 4]), atol=1e-5, rtol=0)


def test_packed_documents_do_not_attend_to_each_other():
    cfg = CONFIGS["gqa"]
    model = build(cfg, seed=9)
    doc_a, doc_b = random_tokens(cfg, 1, 6, seed=3)[0], random_tokens(cfg, 1, 5, seed=4)[0]
    packed = jnp.asarray(np.r_[doc_a, doc_b, [0, 0]])[None]
    segments = jnp.asarray([[1] * 6 + [2] * 5 + [0, 0]])
    positions = jnp.asarray([list(range(6)) + list(range(5)) + [0, 0]])
    logits, _ = run(model, packed, positions=positions, segment_ids=segments)
    alone_b, _ = run(model, doc_b[None])
    alone_a, _ = run(model, doc_a[None])
    np.testing.assert_allclose(np.asarray(logits[0, 6:11]), np.asarray(alone_b[0]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(logits[0, :6]), np.asarray(alone_a[0]), atol=1e-5, rtol=0)
    assert np.isfinite(np.asarray(logits)).all()


def test_bf16_compute_keeps_fp32_params_and_stays_close():
    cfg = CONFIGS["gqa"]
    tokens = jnp.asarray(random_tokens(cfg, 2, 16))
    ref, _ = run(build(cfg, seed=2), tokens)
    model = build(cfg.replace(dtype="bfloat16"), seed=2)
    got, _ = run(model, tokens)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
    assert rel < 2e-2, rel


def test_per_layer_cache_with_presliced_layers_matches_full_forward():
    """The decode loop's fast path (weights sliced once, one cache array per layer) changes nothing."""
    from llama_jax.model.transformer import unstack_layers

    cfg = CONFIGS["gqa"].replace(scan_layers=False)
    model = build(cfg, seed=7)
    tokens = jnp.asarray(random_tokens(cfg, 2, 9))
    full, _ = run(model, tokens)
    layers = unstack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param))["layers"], cfg.n_layers)
    cache = KVCache.create(cfg, batch=2, max_len=12, per_layer=True)
    prefill, cache = run(model, tokens[:, :6], cache=cache, layer_params=layers)
    steps = [prefill]
    for t in range(6, 9):
        logits, cache = run(model, tokens[:, t:t + 1], cache=cache, layer_params=layers)
        steps.append(logits)
    assert isinstance(cache.k, tuple) and len(cache.k) == cfg.n_layers
    np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="need scan_layers=False"):
        build(cfg.replace(scan_layers=True))(tokens, cache=KVCache.create(cfg, 2, 12, per_layer=True))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("a_shape, b_shape, out_dtype", [
    ((48, 64), (64, 96), None),  # a projection
    ((2, 3, 40, 8), (2, 3, 8, 40), jnp.float32),  # attention scores
    ((2, 3, 40, 40), (2, 3, 40, 8), jnp.float32),  # attention output: the VJP transposes dy, not a
])
def test_matmul_gradients_equal_autodiff_of_a_plain_product(dtype, tol, a_shape, b_shape, out_dtype):
    """`matmul`'s hand-written VJP (row-major transposes on the CPU below fp32) changes no gradient beyond
    rounding to `dtype`."""
    from llama_jax.model.cpu_fast_paths import matmul

    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.normal(size=s), dtype) for s in (a_shape, b_shape))
    c = jnp.asarray(rng.normal(size=a_shape[:-1] + b_shape[-1:]), jnp.float32)

    def grads(product):
        return jax.jit(jax.grad(lambda a, b: jnp.sum(product(a, b).astype(jnp.float32) * c), argnums=(0, 1)))(a, b)

    ours = grads(lambda a, b: matmul(a, b, out_dtype))
    ref = grads(lambda a, b: jnp.matmul(a, b, preferred_element_type=out_dtype))
    for got, want in zip(ours, ref):
        assert got.dtype == want.dtype == dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.max(np.abs(got - want)) <= tol * np.max(np.abs(want))


def test_bf16_backward_pass_runs_every_product_in_bf16_on_cpu():
    """XLA:CPU runs a bf16 product that reads an operand transposed in fp32 on upcast copies, 4-5x slower
    (bench/RESULTS.md). In the bf16 gradient of the model, the only products on fp32 operands must be the
    forward attention's two (its scores and softmax are fp32 by design); every other one is bf16."""
    import re

    cfg = CONFIGS["gqa"].replace(dtype="bfloat16", scan_layers=False)
    graphdef, params = nnx.split(build(cfg, seed=0))
    tokens = jnp.asarray(random_tokens(cfg, 2, 16))

    def loss(params):
        logits, _ = nnx.merge(graphdef, params)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    products = []
    for computation in hlo.split("\n}\n"):  # instruction names are unique within a computation only
        dtype_of = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", computation))
        products += [(out, dtype_of[lhs], dtype_of[rhs]) for out, lhs, rhs in
                     re.findall(r"= (\w+)\[[\d,]*\]\{[\d,]+\} dot\(%([\w.\-]+), %([\w.\-]+)\)", computation)]
    # per layer: 7 projections x (forward + 2 gradients), attention 2 x (forward + 2 gradients); the output
    n_layers = cfg.n_layers
    assert len(products) == 3 * (7 * n_layers + 1) + 3 * 2 * n_layers, products
    assert products.count(("f32", "f32", "f32")) == 2 * n_layers, products
    assert products.count(("bf16", "bf16", "bf16")) == len(products) - 2 * n_layers, products
