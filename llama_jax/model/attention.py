"""Causal self-attention behind one function, with the implementation chosen by name.

Every implementation takes the same arguments and returns the same result, so the model, training and
evaluation never know which one ran:

    q:           [batch, q_len, n_heads, head_dim]
    k, v:        [batch, kv_len, n_kv_heads, head_dim]    (n_kv_heads divides n_heads: grouped-query)
    segment_ids: [batch, kv_len] int32 or None. Positive ids mark documents; a query attends only to keys
                 of its own document. Id 0 marks padding: a padding query attends to nothing (its output
                 is zero) and a padding key is seen by nobody.
    q_offset:    index of the first query inside the key sequence (0 in training; the cache position when
                 decoding; may be traced). Only the `xla` reference supports q_len != kv_len, which
                 KV-cache decoding needs; the other implementations require q_len == kv_len, q_offset 0.

The mask is causal: query i (key index q_offset + i) sees keys j <= q_offset + i. The query-side segment
ids are segment_ids[:, q_offset : q_offset + q_len].

`xla` is the reference and the oracle for the kernels: scores and softmax in fp32, explicit mask, one
[batch, heads, q_len, kv_len] array. The Pallas kernels (`pallas_gpu`, `pallas_tpu`, from
`llama_jax.kernels`) never build that array. `IMPLEMENTATIONS` is the one registry: the model config
validates names against it, `plan` asks it which implementations keep the T×T scores, and `resolve_impl`
maps `auto` to a platform's best.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

from llama_jax.model.context_attention import context_parallel_attention
from llama_jax.model.cpu_fast_paths import grouped_query_products
from llama_jax.parallel.context import context_axes
from llama_jax.parallel.platform import target_platform
from llama_jax.utils.config_io import ConfigError


def attention_mask(q_len: int, kv_len: int, segment_ids: jax.Array | None, q_offset: int = 0) -> jax.Array:
    """Boolean [batch or 1, 1, q_len, kv_len] mask: causal, same document, no padding."""
    q_pos = q_offset + jnp.arange(q_len)[:, None]
    k_pos = jnp.arange(kv_len)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if segment_ids is not None:
        kv_seg = segment_ids
        q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, q_offset, q_len, axis=1)
        same_doc = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)
        mask = mask & same_doc[:, None]
    return mask


def xla_attention(q, k, v, segment_ids=None, *, q_offset: int = 0):
    """Reference attention: fp32 scores and softmax, fully masked rows give zeros (never NaN)."""
    return masked_attention(q, k, v, attention_mask(q.shape[1], k.shape[1], segment_ids, q_offset))


def masked_attention(q, k, v, mask):
    """The reference's core under any boolean mask [batch or 1, 1, q_len, kv_len] (context parallelism
    builds its own from true positions). Each kv head serves its group of query heads directly (K/V are
    never repeated)."""
    batch, q_len, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
    out, mask = grouped_query_products(q, k, v, mask)  # [b, kv, group, q, d], mask [b, 1, 1, q, s]
    # A query with no visible key (padding) would average masked keys: zero it instead.
    out = out * jnp.any(mask, axis=-1)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, n_heads, head_dim).astype(q.dtype)


def cudnn_attention(q, k, v, segment_ids=None):
    """cuDNN's fused attention through `jax.nn.dot_product_attention`, for comparison on GPUs."""
    if q.shape[1] != k.shape[1]:
        raise ValueError("cudnn attention supports only q_len == kv_len (training / prefill)")
    mask = None
    if segment_ids is not None:
        mask = attention_mask(q.shape[1], k.shape[1], segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=segment_ids is None,
                                        implementation="cudnn")


@dataclass(frozen=True)
class AttentionImpl:
    """One implementation: where its function lives and what the memory planner must know of it."""

    name: str
    function: str  # "module:attribute", imported on first use (the kernels load Pallas)
    stores_scores: bool  # keeps the [q_len, kv_len] scores per head (the reference), else O(T) per row
    platforms: tuple[str, ...] = ()  # the only platforms it runs on; () = any (a Pallas kernel interprets)

    def load(self) -> Callable:
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)


IMPLEMENTATIONS: dict[str, AttentionImpl] = {impl.name: impl for impl in (
    AttentionImpl("xla", "llama_jax.model.attention:xla_attention", stores_scores=True),
    AttentionImpl("cudnn", "llama_jax.model.attention:cudnn_attention", stores_scores=False,
                  platforms=("gpu", "cuda")),
    AttentionImpl("pallas_gpu", "llama_jax.kernels:pallas_gpu", stores_scores=False),
    AttentionImpl("pallas_tpu", "llama_jax.kernels:pallas_tpu", stores_scores=False),
)}
BEST_FOR_PLATFORM = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "tpu": "pallas_tpu"}
ATTENTION_IMPL_NAMES = ("auto", *IMPLEMENTATIONS)


def resolve_impl(name: str, platform: str | None = None) -> str:
    """Map `auto` to the platform's best implementation: a Pallas kernel on GPU/TPU, `xla` on CPU.
    `platform` defaults to the target of the program being traced (`parallel.platform.target_platform`:
    the mesh's devices, which may be abstract ones, else the host's backend). An implementation asked
    for on a platform it cannot run on (`cudnn` off an NVIDIA GPU) is a ConfigError, one line, instead of
    jax's "cuDNN is not detected" from deep inside the first compile."""
    if name not in ATTENTION_IMPL_NAMES:
        raise ValueError(f"attention_impl={name!r}; expected one of {ATTENTION_IMPL_NAMES}")
    platform = platform or target_platform()
    if name == "auto":
        return BEST_FOR_PLATFORM.get(platform, "xla")
    supported = IMPLEMENTATIONS[name].platforms
    if supported and platform not in supported:
        raise ConfigError(f"attention_impl={name!r} runs only on an NVIDIA GPU, but this program targets "
                          f"{platform}: use auto or xla")
    return name


QUERY_BLOCK = 512  # queries per block of the reference on long sequences (`xla_in_query_blocks`)


def xla_in_query_blocks(q, k, v, segment_ids=None, *, q_offset=0):
    """The reference, QUERY_BLOCK queries at a time in a loop: only one block's [heads, QUERY_BLOCK,
    kv_len] scores exist at once instead of [heads, q_len, kv_len] (4 heads at 8,192 tokens: 64 MB
    instead of 1 GB per array). Each query's softmax is over the same keys as in one piece."""
    batch, q_len, n_heads, head_dim = q.shape
    blocks = q.reshape(batch, q_len // QUERY_BLOCK, QUERY_BLOCK, n_heads, head_dim).swapaxes(0, 1)
    starts = q_offset + QUERY_BLOCK * jnp.arange(blocks.shape[0], dtype=jnp.int32)
    out = jax.lax.map(lambda b: xla_attention(b[1], k, v, segment_ids, q_offset=b[0]), (starts, blocks))
    return out.swapaxes(0, 1).reshape(q.shape)


def attention(q, k, v, segment_ids=None, *, impl: str = "xla", q_offset: int = 0):
    """Causal (grouped-query) attention by the named implementation; see the module docstring. Under
    context parallelism (the sequence split over devices in the balanced layout) the reference runs on
    all-gathered keys and the others on whole sequences of a share of the heads
    (`llama_jax.model.context_attention`). Otherwise the reference runs in query blocks on sequences
    longer than 2 blocks that divide into them (evaluation of long documents on a CPU: lm-eval's
    rolling windows span the whole context)."""
    q_len = q.shape[1]
    if q_len != k.shape[1]:
        # Decoding with a KV cache: only the reference handles q_len != kv_len.
        return _reference(q, k, v, segment_ids, q_offset)
    impl = resolve_impl(impl)
    axes = context_axes()
    if axes:
        kernel = None if impl == "xla" else IMPLEMENTATIONS[impl].load()
        return context_parallel_attention(q, k, v, segment_ids, axes, masked=masked_attention, kernel=kernel)
    if impl == "xla":
        return _reference(q, k, v, segment_ids, q_offset)
    return IMPLEMENTATIONS[impl].load()(q, k, v, segment_ids)


def _reference(q, k, v, segment_ids, q_offset):
    """xla_attention, in query blocks when the queries divide into more than two of them."""
    q_len = q.shape[1]
    if q_len > 2 * QUERY_BLOCK and q_len % QUERY_BLOCK == 0:
        return xla_in_query_blocks(q, k, v, segment_ids, q_offset=q_offset)
    return xla_attention(q, k, v, segment_ids, q_offset=q_offset)
