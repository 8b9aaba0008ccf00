"""Pallas flash-attention kernels; importing this package registers them as `pallas_gpu` / `pallas_tpu`.

- `flash_attention_gpu`: Triton-backend kernels for NVIDIA GPUs (interpret mode elsewhere).
- `flash_attention_tpu`: Mosaic kernels for TPUs; so far only ever run in TPU interpret mode.

The registered callables take the model's `(q, k, v, segment_ids)` with default block sizes and run per
device shard under a mesh (see `sharding`).
"""
from llama_jax.attention import ATTENTION_IMPLS
from llama_jax.kernels.gpu_flash import flash_attention_gpu
from llama_jax.kernels.sharding import shard_over_mesh
from llama_jax.kernels.tpu_flash import flash_attention_tpu

__all__ = ["flash_attention_gpu", "flash_attention_tpu", "shard_over_mesh"]

ATTENTION_IMPLS["pallas_gpu"] = shard_over_mesh(flash_attention_gpu)
ATTENTION_IMPLS["pallas_tpu"] = shard_over_mesh(flash_attention_tpu)
