"""The model's configuration: one dataclass, validated once, with presets for every published shape.

Presets are YAML files in `configs/models/` (data, not code); `load_model_config("llama1-7b",
["n_layers=2"])` reads one and applies overrides. Derived sizes (head_dim, the SwiGLU hidden size by
Meta's `multiple_of` rule) are properties, so a config never holds two values that can disagree.

Each field says what changing it does (its dataclass metadata, read by `SHAPE_FIELDS`, `EXECUTION_FIELDS`
and `ModelConfig.weight_sizes`): a *shape* field changes the weights' shapes, so a checkpoint fixes it;
an *execution* field changes only how the same weights are computed, so a run may resume or a
checkpoint load with another value; the rest (norm epsilon, rotary settings, init, weight dtype) leave
the shapes alone but change what the weights mean. The model's other facts live beside this file:
parameter shapes, axes and counts in `api` (derived from the module definition), the Hugging Face and
Meta tensor names and layouts in `params`, their config.json and params.json in `external_config`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from llama_jax.model.attention import check_impl_name
from llama_jax.utils.config_io import ConfigError, apply_overrides, from_dict, load_yaml
from llama_jax.utils.dtypes import canonical, numpy_dtype

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_PRESET_DIR = CONFIG_DIR / "models"
REMAT_POLICIES = ("none", "full", "save_matmuls")


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA 3.1's frequency-dependent stretching of the rotary wavelengths (long context)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must exceed "
                f"low_freq_factor ({self.low_freq_factor})")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be > 0")


def _shape(default, size: str | None):
    """A field that changes the weights' shapes; `size` names the size it sets (a field or a derived
    property), None for one that decides whether a weight exists rather than its size."""
    return field(default=default, metadata={"role": "shape", "size": size})


def _execution(default):
    """A field that changes only how the same weights are computed (precision, kernels, memory)."""
    return field(default=default, metadata={"role": "execution"})


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA decoder. Defaults are LLaMA 1 7B's."""

    vocab_size: int = _shape(32000, "vocab_size")
    dim: int = _shape(4096, "dim")
    n_layers: int = _shape(32, "n_layers")
    n_heads: int = _shape(32, "n_heads")
    # None: multi-head attention (LLaMA 1); fewer: grouped-query
    n_kv_heads: int | None = _shape(None, "kv_heads")
    # None: Meta's rule from dim, ffn_dim_multiplier, multiple_of
    ffn_hidden_dim: int | None = _shape(None, "hidden_dim")
    multiple_of: int = _shape(256, "hidden_dim")
    ffn_dim_multiplier: float | None = _shape(None, "hidden_dim")
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = _execution(2048)  # rotary angles are computed, not stored: any length reads the weights
    tie_embeddings: bool = _shape(False, None)  # whether an output matrix exists, not its size
    init_std: float = 0.02
    param_dtype: str = "float32"
    # of matmuls and their gradients; norms, softmax and the loss are always fp32
    dtype: str = _execution("bfloat16")
    attention_impl: str = _execution("auto")
    scan_layers: bool = _execution(True)
    remat: str = _execution("none")
    # Positions per row whose [vocab] logits the loss holds at once (`transformer.log_probs_in_chunks`):
    # longer sequences are scored in chunks, each chunk's logits recomputed in the backward pass.
    loss_chunk_size: int = _execution(2048)

    def __post_init__(self):
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", "loss_chunk_size")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {getattr(self, key)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (dim/n_heads) must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ConfigError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim <= 0:
            raise ConfigError(f"ffn_hidden_dim must be > 0, got {self.ffn_hidden_dim}")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ConfigError(f"ffn_dim_multiplier must be > 0, got {self.ffn_dim_multiplier}")
        for key in ("norm_eps", "rope_theta", "init_std", "ffn_dim_multiplier"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a finite number > 0, got {value}")
        for key in ("param_dtype", "dtype"):  # any spelling of utils.dtypes, stored canonical
            object.__setattr__(self, key, canonical(getattr(self, key), key))
        check_impl_name(self.attention_impl)
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4·dim (so the three matrices cost what a 4·dim MLP would), scaled, rounded up."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def weight_sizes(self) -> dict[str, int]:
        """{size: value} of every size the shape fields set (kv_heads and hidden_dim derived): two
        configs hold weights of the same sizes exactly when these agree."""
        return {size: getattr(self, size) for f in dataclasses.fields(self) if (size := f.metadata.get("size"))}

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in matrix multiplies: every one but the input embedding table (a
        lookup) and the RMSNorm scales; a tied table counts once, as the output projection."""
        attention = 2 * self.dim * self.n_heads * self.head_dim + 2 * self.dim * self.kv_heads * self.head_dim
        return self.n_layers * (attention + 3 * self.dim * self.hidden_dim) + self.dim * self.vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Model FLOPs per trained token (forward + backward), the PaLM paper's accounting (Chowdhery et
        al. 2022, appendix B): 6·N_matmul + 12·n_layers·dim·seq_len.

        The second term is attention's two matmuls (QKᵀ and AV, 2·2·T·d per token per layer forward, ×3
        with the backward pass), counted over the full T×T square as is usual, not halved for the causal
        mask. Rematerialisation is not counted: MFU measures useful work."""
        return 6.0 * self.matmul_params + 12.0 * self.n_layers * self.dim * seq_len

    @property
    def compute_dtype(self):
        return numpy_dtype(self.dtype)

    @property
    def weight_dtype(self):
        return numpy_dtype(self.param_dtype)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _fields_of_role(role: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig) if f.metadata.get("role") == role)


# Fields that change the weights' shapes; fields a run may resume (or a checkpoint load) with other values.
SHAPE_FIELDS = _fields_of_role("shape")
EXECUTION_FIELDS = _fields_of_role("execution")


def model_preset_names() -> list[str]:
    return sorted(p.stem for p in MODEL_PRESET_DIR.glob("*.yaml"))


def model_config_dict(name_or_path: str) -> dict:
    """The raw mapping of a preset name (`configs/models/NAME.yaml`) or of a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown model preset {name_or_path!r}; presets: {', '.join(model_preset_names())}")
    return load_yaml(path)


def load_model_config(name_or_path: str, overrides: list[str] = ()) -> ModelConfig:
    """A preset or YAML file plus `key=value` overrides, validated."""
    return from_dict(ModelConfig, apply_overrides(model_config_dict(name_or_path), list(overrides)))
