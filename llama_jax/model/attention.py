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
`llama_jax.kernels`) never build that array; `cudnn` is cuDNN's fused attention. `IMPLEMENTATIONS` is the
one registry: the model config validates names against it (`check_impl_name`), `plan` asks it which
implementations keep the T×T scores, and `resolve_attention` picks the one a program runs, once, where
the program is built: `auto` by the `AUTO` table from the program's platform, shape and dtype, a named
one checked against them (one ConfigError when it cannot run).
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
    """cuDNN's fused attention through `jax.nn.dot_product_attention`, causal (cuDNN skips the blocks
    above the diagonal). Segment ids become a boolean [batch, 1, q_len, kv_len] mask (jax turns it into
    an additive bias); padding queries, which cuDNN would give the mean of every value, are zeroed as the
    other implementations do."""
    if q.shape[1] != k.shape[1]:
        raise ValueError("cudnn attention supports only q_len == kv_len (training / prefill)")
    mask = None if segment_ids is None else attention_mask(q.shape[1], k.shape[1], segment_ids)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")
    return out if segment_ids is None else jnp.where((segment_ids != 0)[:, :, None, None], out, 0)


def cudnn_per_shard(q, k, v, segment_ids=None):
    """`cudnn_attention` run per device shard under a mesh, as the Pallas kernels are
    (`kernels.sharding`): each shard builds its own rows' mask, and no partitioning rule of jax's
    custom call is relied on."""
    from llama_jax.kernels.sharding import shard_over_mesh  # imported on first use, as the kernels are

    return shard_over_mesh(cudnn_attention)(q, k, v, segment_ids)


@dataclass(frozen=True)
class AttentionCase:
    """What the choice of an implementation depends on: the platform the program is built for and the
    shape and dtype of the attention inside it."""

    platform: str  # "cpu" | "gpu" | "rocm" | "tpu" (`parallel.platform.platform_of` of the program's mesh)
    dtype: str  # the model's compute dtype name ("bfloat16", "float16", "float32")
    head_dim: int
    seq_len: int  # the longest sequence the program attends over
    segments: bool = True  # segment ids (packed documents, padding) come with the tokens
    training: bool = True  # gradients are taken


# cuDNN's limits as jax 0.11.2 checks them (`jax._src.cudnn.fused_attention_stablehlo`: `check_layout`,
# `check_is_flash_attention`) for the shapes the model sends, plus one of ours.
CUDNN_DTYPES = ("bfloat16", "float16")
CUDNN_MAX_HEAD_DIM = 128  # jax allows 256 from Hopper on, 128 before; an abstract device does not say which
# Ours: with segment ids jax hands cuDNN a dense [batch, 1, T, T] mask and bias (3·T² bytes per row: 192
# MiB at 8,192, 48 GiB at 131,072); longer sequences go to a kernel that never builds one.
CUDNN_MAX_MASKED_LEN = 8192


def cudnn_refusal(case: AttentionCase) -> str | None:
    """Why cuDNN's fused attention cannot run `case`, or None when it can."""
    if case.platform != "gpu":
        return f"runs only on an NVIDIA GPU, but this program targets {case.platform}"
    if case.dtype not in CUDNN_DTYPES:
        return f"needs dtype bfloat16 or float16, not {case.dtype}"
    if case.head_dim % 8 or case.head_dim > CUDNN_MAX_HEAD_DIM:
        return f"needs head_dim a multiple of 8 up to {CUDNN_MAX_HEAD_DIM}, not {case.head_dim}"
    if case.segments and case.training and case.seq_len % 2:
        return f"with segment ids needs an even sequence length to train, not {case.seq_len}"
    if case.segments and case.seq_len > CUDNN_MAX_MASKED_LEN:
        return (f"with segment ids builds a dense T×T mask, so it is taken only up to {CUDNN_MAX_MASKED_LEN} "
                f"positions, not {case.seq_len}")
    return None


def pallas_gpu_refusal(case: AttentionCase) -> str | None:
    """Our GPU kernel lowers through Triton for NVIDIA GPUs; elsewhere it interprets (CPU tests), which
    on an AMD GPU would be a silent, large slowdown."""
    return "is built for NVIDIA GPUs and would only interpret on an AMD one" if case.platform == "rocm" else None


@dataclass(frozen=True)
class AttentionImpl:
    """One implementation: where its function lives, what the memory planner must know of it and, for
    one that runs only on some programs, why it cannot run a given one."""

    name: str
    function: str  # "module:attribute", imported on first use (the kernels load Pallas)
    stores_scores: bool  # keeps the [q_len, kv_len] scores per head (the reference), else O(T) per row
    refusal: Callable[[AttentionCase], str | None] | None = None  # None: runs anywhere (a Pallas kernel interprets)
    # with segment ids, builds a dense [q_len, kv_len] boolean mask per row (all heads share it), which
    # jax turns into an additive bias in the compute dtype: (1 + c)·T² bytes per row (cuDNN)
    dense_mask: bool = False

    def memory(self) -> str:
        """What the planner says of its memory per row."""
        if self.stores_scores:
            return "keeps T×T scores"
        return "O(T) memory per row" + (", a T×T mask with segment ids" if self.dense_mask else "")

    def load(self) -> Callable:
        module, attribute = self.function.split(":")
        return getattr(importlib.import_module(module), attribute)

    def refuses(self, case: AttentionCase) -> str | None:
        return self.refusal(case) if self.refusal else None


IMPLEMENTATIONS: dict[str, AttentionImpl] = {impl.name: impl for impl in (
    AttentionImpl("xla", "llama_jax.model.attention:xla_attention", stores_scores=True),
    AttentionImpl("cudnn", "llama_jax.model.attention:cudnn_per_shard", stores_scores=False, refusal=cudnn_refusal,
                  dense_mask=True),
    AttentionImpl("pallas_gpu", "llama_jax.kernels:pallas_gpu", stores_scores=False, refusal=pallas_gpu_refusal),
    AttentionImpl("pallas_tpu", "llama_jax.kernels:pallas_tpu", stores_scores=False),
)}
ATTENTION_IMPL_NAMES = ("auto", *IMPLEMENTATIONS)

# What `auto` runs: per platform, the first of these that can run the program's case. Change a row only
# with a measurement on that platform (bench/attention.py) that says so.
AUTO: dict[str, tuple[str, ...]] = {
    # bench/RESULTS.md "Attention", 2026-11-27 NVIDIA H200 (bf16, head_dim 128, 32/8 heads, causal, no
    # segment ids): our Pallas kernel's forward+backward ran 0.65x cuDNN's speed at T = 4,096 with the
    # default blocks, 0.79x in the best variant, and below cuDNN at every T from 1k to 16k. So cuDNN
    # wherever it can run, ours where it cannot, until a GPU benchmark measures ours faster at that shape.
    "gpu": ("cudnn", "pallas_gpu"),
    # AMD GPUs: neither cuDNN nor our Triton kernel is built or measured for them (none was at hand)
    "rocm": ("xla",),
    "tpu": ("pallas_tpu",),  # the only flash attention for TPUs here (the reference keeps T×T scores)
    "cpu": ("xla",),  # the Pallas kernels only interpret on a CPU, far slower than the reference
}


def check_impl_name(name: str) -> None:
    """A ConfigError unless `name` is an implementation or `auto` (the model config's own check)."""
    if name not in ATTENTION_IMPL_NAMES:
        raise ConfigError(f"attention_impl={name!r}; expected one of {ATTENTION_IMPL_NAMES}")


def choose_impl(name: str, case: AttentionCase) -> str:
    """The implementation a program of `case` runs for `attention_impl: name`: `auto` by the `AUTO`
    table; a named one as asked, unless it cannot run the case (`cudnn` off an NVIDIA GPU, in fp32, ...):
    then one ConfigError line, instead of jax's error from deep inside the first compile."""
    check_impl_name(name)
    if name == "auto":
        return next(c for c in AUTO.get(case.platform, ("xla",)) if not IMPLEMENTATIONS[c].refuses(case))
    reason = IMPLEMENTATIONS[name].refuses(case)
    if reason:
        raise ConfigError(f"attention_impl={name!r} {reason}: use auto or xla")
    return name


def resolve_attention(cfg, platform: str, *, seq_len: int | None = None, segments: bool = True,
                      training: bool = True):
    """`cfg` (a ModelConfig) with `attention_impl` replaced by the implementation its program runs on
    `platform` (`choose_impl`), for sequences up to `seq_len` (default: the config's max_seq_len). Called
    once where a program is built; the model then only dispatches on the concrete name."""
    case = AttentionCase(platform, cfg.dtype, cfg.head_dim, seq_len or cfg.max_seq_len, segments, training)
    return cfg.replace(attention_impl=choose_impl(cfg.attention_impl, case))


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
    """Causal (grouped-query) attention by the named implementation (already resolved: `auto` never gets
    here), except that q_len != kv_len (a KV cache) always runs the reference; see the module docstring. Under
    context parallelism (the sequence split over devices in the balanced layout) the reference runs on
    all-gathered keys and the others on whole sequences of a share of the heads
    (`llama_jax.model.context_attention`). Otherwise the reference runs in query blocks on sequences
    longer than 2 blocks that divide into them (evaluation of long documents on a CPU: lm-eval's
    rolling windows span the whole context)."""
    q_len = q.shape[1]
    if q_len != k.shape[1]:
        # Decoding with a KV cache: only the reference handles q_len != kv_len.
        return _reference(q, k, v, segment_ids, q_offset)
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl={impl!r} reached the model unresolved; resolve it where the program "
                         f"is built (model.attention.resolve_attention)")
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
