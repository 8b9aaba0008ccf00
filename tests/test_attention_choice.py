"""Which attention implementation a program runs: chosen once where it is built, from its mesh's platform
and its attention's shape and dtype (`model.attention.resolve_attention`, the `AUTO` table).

Oracles: jax 0.11.2's own limits for cuDNN's fused attention (`jax._src.cudnn.fused_attention_stablehlo`:
fp16/bf16 only, head_dim a multiple of 8 up to 128 before Hopper, an even length with a mask in training)
written out here by hand, the abstract meshes' device kinds, and the log records of generation. The
lowered programs (cuDNN's custom call in a GPU train step) are in tests/test_lowering.py.
"""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.evaluation.generate import Generator, SamplingConfig
from llama_jax.evaluation.loading import place_model
from llama_jax.model import api
from llama_jax.model.attention import attention, resolve_attention
from llama_jax.model.config import ModelConfig
from llama_jax.parallel.mesh import MeshConfig, make_mesh
from llama_jax.parallel.platform import abstract_mesh, platform_of
from llama_jax.utils.config_io import ConfigError

H100 = "NVIDIA H100 80GB HBM3"
GPU = platform_of(abstract_mesh({"fsdp": 2}, H100))
BF16_D128 = ModelConfig(vocab_size=64, dim=512, n_layers=1, n_heads=4, n_kv_heads=2, dtype="bfloat16",
                        attention_impl="auto", max_seq_len=2048)


def chosen(cfg: ModelConfig, platform: str, **case) -> str:
    return resolve_attention(cfg, platform, **case).attention_impl


def test_auto_is_cudnn_for_an_nvidia_gpu_mesh_in_bf16_or_fp16():
    assert GPU == "gpu" and BF16_D128.head_dim == 128
    assert chosen(BF16_D128, GPU) == "cudnn"
    assert chosen(BF16_D128.replace(dtype="float16"), GPU) == "cudnn"
    assert chosen(BF16_D128, GPU, seq_len=8192) == "cudnn"  # segment ids: the dense mask up to 8k
    assert chosen(BF16_D128, GPU, seq_len=2049, segments=False) == "cudnn"  # causal alone: any length
    assert chosen(BF16_D128, GPU, seq_len=2049, training=False) == "cudnn"  # odd with a mask: forward only


@pytest.mark.parametrize("changes, case, reason", [
    ({"dtype": "float32"}, {}, "needs dtype bfloat16 or float16, not float32"),
    ({"dim": 1024}, {}, "needs head_dim a multiple of 8 up to 128, not 256"),
    ({"dim": 400}, {}, "needs head_dim a multiple of 8 up to 128, not 100"),
    ({}, {"seq_len": 2049}, "with segment ids needs an even sequence length to train, not 2049"),
    ({}, {"seq_len": 16384}, "with segment ids builds a dense T×T mask, so it is taken only up to 8192 "
                             "positions, not 16384"),
], ids=["fp32", "head_dim-256", "head_dim-100", "odd-length-training", "long-masked"])
def test_auto_is_our_kernel_where_cudnn_cannot_run_and_cudnn_by_name_says_why(changes, case, reason):
    cfg = BF16_D128.replace(**changes)
    assert chosen(cfg, GPU, **case) == "pallas_gpu"
    with pytest.raises(ConfigError) as err:
        chosen(cfg.replace(attention_impl="cudnn"), GPU, **case)
    assert str(err.value) == f"attention_impl='cudnn' {reason}: use auto or xla"


def test_auto_is_pallas_tpu_on_tpus_and_xla_on_cpus():
    for kind in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite"):
        assert chosen(BF16_D128, platform_of(abstract_mesh({"fsdp": 2}, kind))) == "pallas_tpu"
    assert platform_of(None) == platform_of(make_mesh(MeshConfig())) == "cpu"  # this host, a real mesh of it
    assert chosen(BF16_D128, platform_of(make_mesh(MeshConfig()))) == "xla"
    assert chosen(BF16_D128.replace(dtype="float32"), "cpu") == "xla"


def test_auto_is_xla_on_amd_gpus_and_the_nvidia_kernels_say_why_not():
    """jax names both GPU vendors "gpu"; an AMD device kind (here an abstract MI300X) is told apart, and
    neither cuDNN nor our Triton kernel is chosen for it."""
    amd = platform_of(abstract_mesh({"fsdp": 2}, "AMD Instinct MI300X"))
    assert amd == "rocm" and platform_of(abstract_mesh({"fsdp": 2}, "NVIDIA H100 80GB HBM3")) == "gpu"
    assert chosen(BF16_D128, amd) == "xla"
    for name, reason in (("cudnn", "runs only on an NVIDIA GPU, but this program targets rocm"),
                         ("pallas_gpu", "is built for NVIDIA GPUs and would only interpret on an AMD one")):
        with pytest.raises(ConfigError) as err:
            chosen(BF16_D128.replace(attention_impl=name), amd)
        assert str(err.value) == f"attention_impl={name!r} {reason}: use auto or xla"


def test_one_error_type_for_a_bad_name_and_an_impossible_choice():
    """The config's check and the choice raise the same ConfigError, one line each."""
    with pytest.raises(ConfigError, match=r"^attention_impl='flash'; expected one of \('auto', 'xla', "):
        ModelConfig(attention_impl="flash")
    for platform in ("cpu", "tpu"):
        with pytest.raises(ConfigError, match=rf"^attention_impl='cudnn' runs only on an NVIDIA GPU, but this "
                                              rf"program targets {platform}: use auto or xla$"):
            chosen(BF16_D128.replace(attention_impl="cudnn"), platform)
    for name in ("xla", "pallas_gpu", "pallas_tpu"):  # named kernels run anywhere (interpreted off their chip)
        assert {chosen(BF16_D128.replace(attention_impl=name), p) for p in ("cpu", "gpu", "tpu")} == {name}


def test_the_model_only_dispatches_resolved_names():
    q = jnp.zeros((1, 8, 4, 16), jnp.float32)
    with pytest.raises(ValueError, match="impl='auto' reached the model unresolved"):
        attention(q, q[:, :, :2], q[:, :, :2], impl="auto")


def test_evaluation_models_resolve_once_for_their_platform():
    cfg = BF16_D128.replace(dtype="float32")
    params = numpy_params(cfg)
    assert place_model(cfg, params).cfg.attention_impl == "xla"  # auto on this CPU
    assert place_model(cfg.replace(attention_impl="pallas_tpu"), params).cfg.attention_impl == "pallas_tpu"
    with pytest.raises(ConfigError, match="^attention_impl='cudnn' runs only on an NVIDIA GPU"):
        place_model(cfg.replace(attention_impl="cudnn"), params)


def test_decoding_says_once_when_it_runs_another_attention_than_configured(caplog):
    """Generation attends over its KV cache with the `xla` reference whatever the config names: one log
    line says so when the config names another; none when it names `xla` (or `auto` resolves to it)."""
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, dtype="float32", attention_impl="pallas_gpu",
                      max_seq_len=32)
    params = numpy_params(cfg)
    sampling = SamplingConfig(max_new_tokens=3, stop_at_eos=False)
    with caplog.at_level(logging.WARNING, logger="llama_jax.evaluation.generate"):
        kernel = Generator(place_model(cfg, params), sampling, pad_id=0)
        assert [r.getMessage() for r in caplog.records] == [
            "generate: decoding attends over the KV cache with the xla reference attention, not the configured "
            "pallas_gpu (it needs queries and keys of equal length)"]
        caplog.clear()
        reference = Generator(place_model(cfg.replace(attention_impl="auto"), params), sampling, pad_id=0)
        assert caplog.records == []
    assert kernel([[5, 6, 7]]).tokens == reference([[5, 6, 7]]).tokens


def numpy_params(cfg: ModelConfig) -> dict:
    """The model's random weights as numpy arrays (what a checkpoint reader hands `place_model`)."""
    return jax.tree.map(np.asarray, api.init_params(cfg))
