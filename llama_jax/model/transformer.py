"""The LLaMA decoder (Touvron et al., 2023) in Flax NNX, readable top to bottom.

    tokens → tok_embeddings → n_layers × [x + Attention(RMSNorm(x)); x + FeedForward(RMSNorm(x))]
           → RMSNorm → output (or the tied embedding) → logits

No biases anywhere. Parameter names follow Meta's reference (`attention.wq`, `feed_forward.w1`,
`attention_norm`, ...) so the checkpoint mappings in `llama_jax.model.params` read like a table. The rotary
embedding uses the half-split layout (first half of each head's features paired with the second half,
as in Hugging Face); Meta's checkpoints pair adjacent features and are permuted on import.

The layers are one `Block` whose parameters carry a leading `layers` axis. `scan_layers=True` runs them
with `jax.lax.scan` (compile time independent of depth); `False` unrolls a Python loop over the same
stacked parameters, so both modes share checkpoints and produce identical outputs.

Projections multiply 2-D activations, `(batch·length, features) @ W`. The products, attention's inner
products and the loss's target gather go through `cpu_fast_paths`, which lowers them in their plain form
everywhere but on XLA:CPU.

The file ends with the loss (the output layer applied a chunk of positions at a time, so whole logits
never exist) and the two entry points that run the model on a pure dict of weights: `apply` and
`target_log_probs`. The weights' shapes, axes and shardings come from `llama_jax.model.api`.

LoRA training with dropout passes its adapters unmerged (`lora=`, a `LoraPath`): each target projection
then adds its `Adapter`'s term, scale · dropout(x) A B. Everything else sees plain (or merged) weights.
"""
from __future__ import annotations

import functools
import math

import flax.struct
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp
from flax import nnx

from llama_jax.model.attention import attention
from llama_jax.model.config import ModelConfig
from llama_jax.parallel.context import context_shards, from_balanced, to_balanced
from llama_jax.parallel.logical import constrain
from llama_jax.model.cpu_fast_paths import matmul, target_logit
from llama_jax.utils.trees import flatten, unflatten

MATMUL_CHECKPOINT_NAME = "linear_out"
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def _param(rngs: nnx.Rngs | None, shape, axes, cfg: ModelConfig, stack: tuple[int, ...], init) -> nnx.Param:
    """A parameter of shape `stack + shape` whose logical axis names ride along as metadata."""
    full_shape = tuple(stack) + tuple(shape)
    value = init(rngs.params(), full_shape, cfg.weight_dtype) if rngs is not None else jnp.ones(full_shape, cfg.weight_dtype)
    return nnx.Param(value, axes=("layers",) * len(stack) + tuple(axes))


@flax.struct.dataclass
class Adapter:
    """One projection's LoRA adapter in its unmerged form, for one layer and one call: the projection
    computes x W + scale · dropout(x) A B (Hu et al., 2021; Hugging Face peft's LoraLayer), the dropout
    (inverted: kept inputs scaled by 1/(1 - rate)) on the adapter's input only. Training uses this form
    only when lora.dropout > 0: otherwise the adapted weight W + scale · A B is merged beforehand."""

    a: jax.Array  # [in, rank]
    b: jax.Array  # [rank, out]
    key: jax.Array  # this projection's dropout key
    scale: float = flax.struct.field(pytree_node=False)
    rate: float = flax.struct.field(pytree_node=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """scale · dropout(x) A B for 2-D activations x [tokens, in], in x's dtype."""
        if self.rate > 0:
            keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        low_rank = matmul(matmul(x, self.a.astype(x.dtype)), self.b.astype(x.dtype))
        return (self.scale * low_rank).astype(x.dtype)


@flax.struct.dataclass
class LoraPath:
    """The adapters of every target projection for one forward pass in the unmerged form (see `Adapter`):
    `adapters` is shaped like the params' target branches ({"layers": {"attention": {"wq": {"a": [L, in,
    rank], "b": [L, rank, out]}}}}); `key` is the pass's dropout key, from which each layer and projection
    draws its own independent mask (`dropout_keys`)."""

    adapters: dict
    key: jax.Array
    scale: float = flax.struct.field(pytree_node=False)
    rate: float = flax.struct.field(pytree_node=False)


def dropout_keys(key: jax.Array, layer_adapters: dict, n_layers: int) -> dict:
    """One dropout key per layer for each adapted projection, [n_layers] stacked, shaped like
    `layer_adapters` with each {"a", "b"} replaced by its keys (projections in sorted path order)."""
    projections = sorted({path[:-1] for path in flatten(layer_adapters)})  # (..., "wq") of (..., "wq", "a")
    return unflatten(dict(zip(projections, jax.random.split(key, (len(projections), n_layers)))))


def _layer_adapters(adapters: dict | None, keys: dict | None, lora: LoraPath | None) -> dict | Adapter:
    """One layer's slices of the adapters and keys as `Adapter`s, shaped like the layer's params."""
    if adapters is None:
        return {}
    if "a" in adapters:
        return Adapter(adapters["a"], adapters["b"], keys, lora.scale, lora.rate)
    return {name: _layer_adapters(sub, keys[name], lora) for name, sub in adapters.items()}


class Linear(nnx.Module):
    """y = x @ W with W [in, out], computed in the config's compute dtype on 2-D activations; plus a
    LoRA `Adapter`'s term when one is given."""

    def __init__(self, in_dim: int, out_dim: int, axes: tuple[str, str], cfg: ModelConfig, *, stack=(), rngs):
        self.kernel = _param(rngs, (in_dim, out_dim), axes, cfg, stack, nnx.initializers.normal(cfg.init_std))
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array, adapter: Adapter | None = None) -> jax.Array:
        x2d = x.reshape(-1, x.shape[-1]).astype(self.dtype)
        y = matmul(x2d, self.kernel[...].astype(self.dtype))
        if adapter is not None:
            y = y + adapter(x2d)
        y = checkpoint_name(y, MATMUL_CHECKPOINT_NAME)
        return y.reshape(*x.shape[:-1], y.shape[-1])


class RMSNorm(nnx.Module):
    """x / rms(x) · scale, computed in fp32 whatever the compute dtype."""

    def __init__(self, dim: int, cfg: ModelConfig, *, stack=()):
        self.scale = _param(None, (dim,), ("norm",), cfg, stack, None)
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse wavelengths θ^(-2i/head_dim), with LLaMA 3.1's long-context scaling when configured."""
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    # Long wavelengths are stretched by `factor`, short ones kept, the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, interpolated, scaled)


def rope_angles(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin [batch, length, head_dim/2] of position·frequency, in fp32."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(cfg)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate each (x[i], x[i + head_dim/2]) pair of every head by its position's angle."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots, filled left to right.

    `segment_ids` marks filled slots (0: empty or padding), which the attention mask uses, so batched
    prompts of different lengths can be left-padded. `index` is the number of slots written so far.
    """

    k: jax.Array  # [layers, batch, kv_heads, max_len, head_dim]: heads-major, the layout the score
    v: jax.Array  # product reads, so a decode step never transposes the whole cache
    segment_ids: jax.Array  # [batch, max_len] int32
    index: jax.Array  # int32 scalar

    @classmethod
    def create(cls, cfg: ModelConfig, batch: int, max_len: int, dtype=None, *, per_layer: bool = False) -> "KVCache":
        """`per_layer` (unrolled layers only): k and v as tuples of one array per layer, so a decode step
        updates each layer's cache in place instead of re-stacking all of them."""
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        dtype = dtype or cfg.compute_dtype
        k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
        if per_layer:
            k, v = tuple(k), tuple(v)
        return cls(k, v, jnp.zeros((batch, max_len), jnp.int32), jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    """Causal grouped-query self-attention: n_kv_heads key/value heads each serve a group of query heads."""

    def __init__(self, cfg: ModelConfig, *, stack=(), rngs):
        d, h, kv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        self.wq = Linear(cfg.dim, h * d, ("embed", "heads"), cfg, stack=stack, rngs=rngs)
        self.wk = Linear(cfg.dim, kv * d, ("embed", "kv_heads"), cfg, stack=stack, rngs=rngs)
        self.wv = Linear(cfg.dim, kv * d, ("embed", "kv_heads"), cfg, stack=stack, rngs=rngs)
        self.wo = Linear(h * d, cfg.dim, ("heads", "embed"), cfg, stack=stack, rngs=rngs)
        self.n_heads, self.n_kv_heads, self.head_dim = h, kv, d
        self.impl = cfg.attention_impl

    def __call__(self, x, rope, segment_ids, cache=None, cache_index=None, adapters: dict | None = None):
        batch, length, _ = x.shape
        adapters = adapters or {}
        q = self.wq(x, adapters.get("wq")).reshape(batch, length, self.n_heads, self.head_dim)
        k = self.wk(x, adapters.get("wk")).reshape(batch, length, self.n_kv_heads, self.head_dim)
        v = self.wv(x, adapters.get("wv")).reshape(batch, length, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", "activation_head_dim"))
        q_offset = 0
        if cache is not None:  # write this call's keys/values into their slots, attend over all slots
            k_cache, v_cache = (
                jax.lax.dynamic_update_slice_in_dim(c, x.transpose(0, 2, 1, 3).astype(c.dtype), cache_index, axis=2)
                for c, x in zip(cache, (k, v)))
            cache, q_offset = (k_cache, v_cache), cache_index
            # The attention's [batch, slots, kv_heads, d] view: XLA cancels this transpose against the
            # one its score product would otherwise apply to the whole cache on every token.
            k, v = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
        out = attention(q, k, v, segment_ids, impl=self.impl, q_offset=q_offset)
        return self.wo(out.reshape(batch, length, self.n_heads * self.head_dim), adapters.get("wo")), cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) · w3 x)."""

    def __init__(self, cfg: ModelConfig, *, stack=(), rngs):
        self.w1 = Linear(cfg.dim, cfg.hidden_dim, ("embed", "mlp"), cfg, stack=stack, rngs=rngs)
        self.w3 = Linear(cfg.dim, cfg.hidden_dim, ("embed", "mlp"), cfg, stack=stack, rngs=rngs)
        self.w2 = Linear(cfg.hidden_dim, cfg.dim, ("mlp", "embed"), cfg, stack=stack, rngs=rngs)

    def __call__(self, x, adapters: dict | None = None):
        adapters = adapters or {}
        return self.w2(jax.nn.silu(self.w1(x, adapters.get("w1"))) * self.w3(x, adapters.get("w3")), adapters.get("w2"))


class Block(nnx.Module):
    """One pre-norm decoder layer (parameters stacked over `stack`, applied one layer at a time)."""

    def __init__(self, cfg: ModelConfig, *, stack=(), rngs):
        self.attention_norm = RMSNorm(cfg.dim, cfg, stack=stack)
        self.attention = Attention(cfg, stack=stack, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.dim, cfg, stack=stack)
        self.feed_forward = FeedForward(cfg, stack=stack, rngs=rngs)

    def __call__(self, x, rope, segment_ids, cache=None, cache_index=None, adapters: dict | None = None):
        """`adapters`: this layer's `Adapter`s, shaped like its params ({"attention": {"wq": ...}})."""
        adapters = adapters or {}
        attn_out, cache = self.attention(self.attention_norm(x), rope, segment_ids, cache, cache_index,
                                         adapters.get("attention"))
        x = x + attn_out
        x = x + self.feed_forward(self.ffn_norm(x), adapters.get("feed_forward"))
        return constrain(x, BATCH_LENGTH_EMBED), cache


def _remat(fn, policy: str):
    """Wrap a layer function by the named rematerialisation policy (gradients are identical under all)."""
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    # save_matmuls: keep the linear layers' outputs, recompute norms, rotary, softmax and SwiGLU gating.
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(MATMUL_CHECKPOINT_NAME))


class Transformer(nnx.Module):
    """LLaMA: `model(tokens) -> (logits [batch, length, vocab] fp32, cache)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        embed_init = nnx.initializers.normal(cfg.init_std)
        self.tok_embeddings = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg, (), embed_init)
        self.layers = Block(cfg, stack=(cfg.n_layers,), rngs=rngs)
        self.norm = RMSNorm(cfg.dim, cfg)
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, ("embed", "vocab"), cfg, rngs=rngs)

    def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, cache: KVCache | None = None,
                 layer_params: list | None = None, logits_at: jax.Array | None = None,
                 lora: LoraPath | None = None, head: bool = True):
        """tokens [batch, length] int. positions default to 0.. (or the cache's next slots).

        segment_ids [batch, length]: document ids for packed sequences, 0 for padding (see
        `llama_jax.model.attention`). With a `cache`, this call's tokens fill the next slots and attend to
        everything cached before them; the updated cache is returned.
        layer_params (unrolled layers only): each layer's parameters, sliced from the stacked ones once
        by the caller (`unstack_layers`) outside a decode loop: XLA:CPU does not hoist the slices out of
        the loop and would otherwise copy every weight on every token.
        logits_at [batch, n] int: only the logits at these positions, [batch, n, vocab] (scoring a
        continuation reads a few positions: the output layer, a large share of a small model's work,
        then runs on those only).
        lora: LoRA adapters applied unmerged, with dropout on their inputs (training; see `LoraPath`).
        head=False: return the final normed hidden states [batch, length, dim] in the compute dtype
        instead of the logits, for a loss that applies `head_kernel` chunk by chunk (`target_log_probs`).
        """
        cfg = self.cfg
        batch, length = tokens.shape
        start = 0 if cache is None else cache.index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (batch, length))
        if cache is not None:
            new_segments = jnp.ones((batch, length), jnp.int32) if segment_ids is None else segment_ids
            segment_ids = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, new_segments.astype(jnp.int32), start, axis=1)
        shards = context_shards()
        if shards > 1 and cache is not None:
            raise ValueError(f"decoding with a KV cache cannot split sequences over devices (the mesh's context "
                             f"axes split them {shards} ways): use a mesh without context parallelism")
        if shards > 1:  # the balanced layout of context parallelism (`parallel.context`), undone below
            tokens, positions = to_balanced(tokens, shards), to_balanced(positions, shards)
            segment_ids = None if segment_ids is None else to_balanced(segment_ids, shards)
        rope = rope_angles(cfg, positions)

        # The lookup reads whole rows: gather the table's embed shards first, as FSDP does for a matmul's
        # weights (left to itself, XLA:SPMD replicates the looked-up activations instead).
        table = constrain(self.tok_embeddings[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(cfg.compute_dtype)
        x = constrain(x, BATCH_LENGTH_EMBED)

        block_def, block_params = nnx.split(self.layers)

        adapters = keys = None
        if lora is not None:
            adapters = lora.adapters["layers"]
            keys = dropout_keys(lora.key, adapters, cfg.n_layers)

        def layer(x, params_cache_adapters):
            params, layer_cache, layer_adapters, layer_keys = params_cache_adapters
            block_adapters = _layer_adapters(layer_adapters, layer_keys, lora)
            return nnx.merge(block_def, params)(x, rope, segment_ids, layer_cache, start, block_adapters)

        layer = _remat(layer, cfg.remat)
        kv = None if cache is None else (cache.k, cache.v)
        per_layer_cache = cache is not None and isinstance(cache.k, tuple)
        if cfg.scan_layers:
            if layer_params is not None or per_layer_cache:
                raise ValueError("layer_params and a per-layer KVCache need scan_layers=False")
            x, kv = jax.lax.scan(layer, x, (block_params, kv, adapters, keys))
        else:
            layer_params = layer_params or unstack_layers(block_params, cfg.n_layers)
            outputs = []
            for i in range(cfg.n_layers):
                x, layer_kv = layer(x, (layer_params[i], None if kv is None else (kv[0][i], kv[1][i]),
                                        *jax.tree.map(lambda a: a[i], (adapters, keys))))
                outputs.append(layer_kv)
            if cache is not None:
                kv = tuple(zip(*outputs)) if per_layer_cache else jax.tree.map(lambda *a: jnp.stack(a), *outputs)

        if shards > 1:
            x = constrain(from_balanced(x, shards), BATCH_LENGTH_EMBED)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        x = self.norm(x)
        if cache is not None:
            cache = KVCache(kv[0], kv[1], segment_ids, start + length)
        if not head:
            return x, cache
        return _logits(x, self.head_kernel()), cache

    def head_kernel(self) -> jax.Array:
        """The output projection [dim, vocab] in the compute dtype (the embedding's transpose when tied)."""
        if self.output is None:
            return self.tok_embeddings[...].astype(self.cfg.compute_dtype).T
        return self.output.kernel[...].astype(self.cfg.compute_dtype)

    def target_log_probs(self, tokens: jax.Array, targets: jax.Array, **kwargs) -> tuple[jax.Array, jax.Array]:
        """Per-token (log p(target) fp32, target == argmax) [batch, length] on `tokens`, the logits computed
        `cfg.loss_chunk_size` positions at a time and never whole (`log_probs_in_chunks`); keyword
        arguments as for `__call__`. The training loss is -log p."""
        hidden, _ = self(tokens, head=False, **kwargs)
        return log_probs_in_chunks(hidden, self.head_kernel(), targets, self.cfg.loss_chunk_size)


def unstack_layers(layers, n_layers: int) -> list:
    """The stacked `layers` parameters as one tree per layer."""
    return [jax.tree.map(lambda a: a[i], layers) for i in range(n_layers)]


# The loss. At 128K tokens and LLaMA 3's vocabulary, whole fp32 logits of one sequence are 67 GB, so the
# loss applies the output layer in sequence chunks: at most one chunk's [batch, chunk, vocab] logits
# exist at a time, forward and backward (the backward pass recomputes each chunk's logits:
# `jax.checkpoint` on the scanned chunk).
#
# Chunks are strided, not contiguous: chunk j holds positions j, j + n, j + 2n, ... (n chunks). A length
# split over devices (context parallelism: `activation_length` on the `context` mesh axis) then stays
# split inside every chunk, each device computing its own positions' share; contiguous chunks would put
# each chunk on one device. The loss is a sum over positions, so their order is irrelevant.

def _logits(x: jax.Array, head: jax.Array) -> jax.Array:
    """fp32 logits [batch, length, vocab] of hidden states x [batch, length, dim] under `head` [dim, vocab]."""
    batch, length, dim = x.shape
    logits = matmul(x.reshape(batch * length, dim).astype(head.dtype), head).astype(jnp.float32)
    return constrain(logits.reshape(batch, length, head.shape[1]), LOGITS_AXES)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per token in fp32: [batch, length, vocab], [batch, length] -> [batch, length]
    (the loss of a caller that already holds whole logits)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - target_logit(logits, targets)


def chunk_count(length: int, chunk_size: int) -> int:
    """The fewest chunks, each at most `chunk_size` positions, that split `length` evenly (a divisor)."""
    if chunk_size <= 0:
        raise ValueError(f"loss chunk size must be > 0, got {chunk_size}")
    n = -(-length // chunk_size)
    while length % n:
        n += 1
    return n


def _chunk_log_probs(hidden: jax.Array, head: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p(target) and target == argmax for one chunk: hidden [b, c, d], head [d, vocab], targets [b, c]."""
    logits = _logits(hidden, head)
    log_probs = target_logit(logits, targets) - jax.nn.logsumexp(logits, axis=-1)
    return log_probs, jnp.argmax(logits, axis=-1) == targets


def log_probs_in_chunks(hidden: jax.Array, head: jax.Array, targets: jax.Array,
                        chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probability of each target and whether the target is the model's argmax.

    hidden [batch, length, dim]: the final normed hidden states (`Transformer(..., head=False)`); head
    [dim, vocab] in the compute dtype (`Transformer.head_kernel`); targets [batch, length] int.
    Returns (log p(target) [batch, length] fp32, target == argmax [batch, length] bool); -log p is
    `token_nll` of the logits hidden @ head, and the argmax is jnp.argmax's (the first of equal maxima).

    At most `chunk_size` positions' logits per row are live at once (see above); with one chunk nothing
    is recomputed, so short sequences run exactly as whole logits would.
    """
    batch, length, dim = hidden.shape
    n = chunk_count(length, chunk_size)
    if n == 1:
        return _chunk_log_probs(hidden, head, targets)
    size = length // n
    # position i*n + j -> chunk j, row i of it: [batch, size, n] -> [n, batch, size]
    hidden_chunks = hidden.reshape(batch, size, n, dim).transpose(2, 0, 1, 3)
    target_chunks = targets.reshape(batch, size, n).transpose(2, 0, 1)
    body = jax.checkpoint(lambda h, t: _chunk_log_probs(h, head, t),
                          policy=jax.checkpoint_policies.nothing_saveable)
    _, (log_probs, is_argmax) = jax.lax.scan(lambda carry, xs: (carry, body(*xs)), None,
                                             (hidden_chunks, target_chunks))
    unchunk = lambda x: x.transpose(1, 2, 0).reshape(batch, length)  # noqa: E731
    return unchunk(log_probs), unchunk(is_argmax)


# Building the model, and running it on a pure dict of weights (`nnx.to_pure_dict` of its parameters,
# what optax, orbax and the converters hold; `api` derives their shapes, axes and shardings): training,
# evaluation and decoding run it through `apply` and `target_log_probs`, inside or outside jit.

def build(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A randomly initialised model (normal(0, init_std) matrices, unit norm scales)."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Transformer:
    """The model with shapes and dtypes only: no weights are allocated."""
    return nnx.eval_shape(lambda: build(cfg))


@functools.lru_cache(maxsize=None)
def graphdef(cfg: ModelConfig) -> nnx.GraphDef:
    """The model's structure without weights (cached: configs are frozen dataclasses)."""
    return nnx.split(abstract(cfg))[0]


def apply(cfg: ModelConfig, params, tokens: jax.Array, **kwargs):
    """`Transformer.__call__` of the model whose weights are `params`: (logits fp32, cache)."""
    return nnx.merge(graphdef(cfg), params)(tokens, **kwargs)


def target_log_probs(cfg: ModelConfig, params, tokens: jax.Array, targets: jax.Array,
                     **kwargs) -> tuple[jax.Array, jax.Array]:
    """`Transformer.target_log_probs` of the model whose weights are `params`."""
    return nnx.merge(graphdef(cfg), params).target_log_probs(tokens, targets, **kwargs)
