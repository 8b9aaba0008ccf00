"""Pallas flash-attention kernels, registered in `llama_jax.model.attention.IMPLEMENTATIONS` by name.

- `flash_attention_gpu`: Triton-backend kernels for NVIDIA GPUs (interpret mode elsewhere).
- `flash_attention_tpu`: Mosaic kernels for TPUs; so far only ever run in TPU interpret mode.

`pallas_gpu` / `pallas_tpu` are what the model calls: the model's `(q, k, v, segment_ids)` with default
block sizes, run per device shard under a mesh (see `sharding`).
"""
from llama_jax.kernels.gpu_flash import flash_attention_gpu
from llama_jax.kernels.sharding import shard_over_mesh
from llama_jax.kernels.tpu_flash import flash_attention_tpu

__all__ = ["flash_attention_gpu", "flash_attention_tpu", "shard_over_mesh", "pallas_gpu", "pallas_tpu"]

pallas_gpu = shard_over_mesh(flash_attention_gpu)
pallas_tpu = shard_over_mesh(flash_attention_tpu)
