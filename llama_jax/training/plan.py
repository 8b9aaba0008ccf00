"""`plan`: will this model fit on that slice? Per-device memory from shapes alone, before asking for chips.

    python train.py plan [CONFIG.yaml] key=value ... [devices=N] [device_memory_gib=80] [platform=gpu|rocm|tpu|cpu]
    python -m llama_jax.training.plan configs/train/llama1-65b.yaml mesh.fsdp=256 devices=256

Reads the same training config as `train.py` (model, mesh, optimizer, batch), builds the parameter and
optimizer-state shardings with the very functions training uses, and counts each device's shard bytes;
no weights are allocated and no devices beyond the host's are needed (`devices=` simulates the count).

Parameters, gradients and optimizer state are exact. Activations are an estimate of what the backward
pass keeps alive per device for each remat policy (see `activation_bytes`); XLA's scheduling, fusion
and temporary buffers move the real figure, so leave headroom. Last, the bytes each device sends per
step over the data-centre network between slices and within its slice (`plan_traffic`).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import jax
import numpy as np
import optax
from jax.sharding import PartitionSpec

from llama_jax.model.config import REMAT_POLICIES, ModelConfig
from llama_jax.utils.config_io import ConfigError, from_dict, parse_override
from llama_jax.parallel.logical import Rules, logical_to_spec
from llama_jax.model import api
from llama_jax.model.attention import IMPLEMENTATIONS, resolve_attention
from llama_jax.model.transformer import chunk_count
from llama_jax.parallel.rules import MESH_AXES, axis_product, check_rules_use_mesh, rules_for
from llama_jax.model.lora import LoraConfig, adapter_count, adapter_shapes, target_paths
from llama_jax.training.step import make_optimizer, opt_state_specs, trainable_specs
from llama_jax.training.plan_traffic import rule_axes, traffic_bytes
from llama_jax.utils.trees import flatten

GIB = 1024 ** 3
PLATFORMS = ("gpu", "rocm", "tpu", "cpu")
FP32 = 4


@dataclass(frozen=True)
class PlanOptions:
    """The plan's own keys (everything else on the command line belongs to the training config)."""

    devices: int = 0  # 0: the mesh's fixed sizes, or this host's device count if an axis is -1
    device_memory_gib: float = 0.0  # 0: do not judge the fit
    platform: str = "gpu"  # the devices planned for: decides what attention_impl=auto runs

    def __post_init__(self):
        if self.devices < 0 or self.device_memory_gib < 0:
            raise ConfigError("plan: devices and device_memory_gib must be >= 0")
        if self.platform not in PLATFORMS:
            raise ConfigError(f"plan: platform={self.platform!r}; expected one of {list(PLATFORMS)}")


def _shard_bytes(shapes, specs, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of arrays `shapes` split by `specs` (splits are even: checked upstream)."""
    total = 0
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for shape, spec in zip(jax.tree.leaves(shapes), spec_leaves, strict=True):
        parts = math.prod(axis_product(mesh_shape, target) for target in spec)
        total += math.prod(shape.shape) * np.dtype(shape.dtype).itemsize // parts
    return total


def state_bytes_per_device(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rules: Rules,
                           mesh_shape: dict[str, int]) -> dict[str, int]:
    """Exact bytes per device of parameters, gradients (sharded like the parameters) and optimizer state."""
    shapes = api.param_shapes(model_cfg)
    specs = api.param_specs(model_cfg, rules, mesh_shape)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    params = _shard_bytes(shapes, specs, mesh_shape)
    return {"params": params, "grads": params,
            "optimizer": _shard_bytes(opt_shapes, opt_state_specs(specs, optimizer, model_cfg), mesh_shape)}


def lora_state_bytes_per_device(model_cfg: ModelConfig, optimizer: optax.GradientTransformation, rules: Rules,
                                mesh_shape: dict[str, int], lora: LoraConfig) -> dict[str, int]:
    """The same for a LoRA run: the frozen base (in lora.base_dtype) plus the adapters; gradients and
    optimizer state for the adapters only; and, while a step runs, the adapted copy of each target
    kernel and its gradient (the step merges base and adapters, see `llama_jax.model.lora`)."""
    dtype = lora.base_dtype or model_cfg.param_dtype
    base = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), api.param_shapes(model_cfg))
    specs = api.param_specs(model_cfg, rules, mesh_shape)
    shapes, adapter_specs = adapter_shapes(model_cfg, lora), trainable_specs(model_cfg, rules, mesh_shape, lora)
    adapters = _shard_bytes(shapes, adapter_specs, mesh_shape)
    flat_shapes, flat_specs = flatten(api.param_shapes(model_cfg)), flatten(specs)
    targets = target_paths(model_cfg, lora)
    merged = _shard_bytes([flat_shapes[p] for p in targets], [flat_specs[p] for p in targets], mesh_shape)
    opt_shapes = jax.eval_shape(optimizer.init, shapes)
    return {"params": _shard_bytes(base, specs, mesh_shape) + adapters, "grads": adapters,
            "optimizer": _shard_bytes(opt_shapes, opt_state_specs(adapter_specs, optimizer, model_cfg, shapes),
                                      mesh_shape),
            "adapted": 2 * merged}


def gathered_weight_bytes(model_cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int]) -> int:
    """Transient bytes of FSDP: one layer's weights and the embedding/output gathered whole over `fsdp`,
    and their gradients before the reduce-scatter (2×). Zero when parameters are not fsdp-sharded."""
    whole = {**mesh_shape, **{axis: 1 for axis in rule_axes(rules, "embed", mesh_shape)}}
    shapes = api.param_shapes(model_cfg)
    sharded, gathered = api.param_specs(model_cfg, rules, mesh_shape), api.param_specs(model_cfg, rules, whole)

    def extra(key):
        return _shard_bytes(shapes[key], gathered[key], whole) - _shard_bytes(shapes[key], sharded[key], mesh_shape)

    heads = max(extra(k) for k in ("tok_embeddings", "output") if k in shapes)
    return 2 * (extra("layers") // model_cfg.n_layers + heads)


def _split(rules: Rules, name: str, mesh_shape: dict[str, int]) -> int:
    """How many ways the rules split the logical dimension `name` on this mesh."""
    return axis_product(mesh_shape, logical_to_spec((name,), rules, tuple(mesh_shape))[0])


def activation_bytes(cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int], rows: int, seq_len: int,
                     policy: str, platform: str = "gpu") -> int:
    """Estimated activation bytes per device kept for the backward pass of one micro-batch.

    Per layer and token of the device (its rows, and its share of positions under context parallelism),
    in elements (tensor-split dims divided by their split; c = compute dtype bytes):
      full          the layer input (D·c).
      save_matmuls  the layer input and every projection output: ((D + 2·kv·hd)/t + 2·D + 2·F/t)·c.
      none          all of the above, the fp32 norm inputs (2·D·4), rotary q/k in fp32, the SwiGLU gate
                    and product (2·F/t·c), the attention output, and for the `xla` attention its fp32
                    scores and probabilities (2·H/t·T·4; a flash kernel keeps one row statistic instead);
                    cuDNN's dense mask from segment ids, a boolean and its bias ((1 + c)·T, all heads).
                    Which one `attention_impl` is comes from the attention registry (`auto` resolved
                    for `platform`).
    Under `full` and `save_matmuls` the layer being differentiated recomputes its `none` set; once per
    step come the embedding output and, for one loss chunk's positions
    (`transformer.log_probs_in_chunks`: at most `loss_chunk_size` per row), the fp32 logits, their
    softmax and its gradient (3·V/t·4).
    Within ~35% of XLA:CPU's own buffer assignment on small models (tests/test_sharding_plan.py).
    """
    # rows per device (rounded up) × positions per device (context parallelism splits them)
    tokens = -(-rows // _split(rules, "activation_batch", mesh_shape)) * seq_len // _split(
        rules, "activation_length", mesh_shape)
    t_heads = _split(rules, "activation_heads", mesh_shape)
    t_mlp = _split(rules, "activation_mlp", mesh_shape)
    t_vocab = _split(rules, "activation_vocab", mesh_shape)
    c = np.dtype(cfg.compute_dtype).itemsize
    d, f, kv_dim = cfg.dim, cfg.hidden_dim, cfg.kv_heads * cfg.head_dim
    layer_input = d * c
    matmul_outputs = ((d + 2 * kv_dim) / t_heads + 2 * d + 2 * f / t_mlp) * c
    heads = cfg.n_heads / t_heads
    impl = IMPLEMENTATIONS[resolve_attention(cfg, platform, seq_len=seq_len).attention_impl]
    attention = 2 * heads * seq_len * FP32 if impl.stores_scores else heads * FP32
    if impl.dense_mask:  # training batches carry segment ids
        attention += (1 + c) * seq_len
    everything = (layer_input + matmul_outputs + 2 * d * FP32 + (d + kv_dim) / t_heads * FP32
                  + 2 * f / t_mlp * c + d / t_heads * c + attention)
    per_layer = {"none": everything, "save_matmuls": layer_input + matmul_outputs, "full": layer_input}[policy]
    recompute = 0.0 if policy == "none" else everything
    chunk_tokens = tokens // chunk_count(seq_len, cfg.loss_chunk_size)
    logits = chunk_tokens * 3 * cfg.vocab_size / t_vocab * FP32
    return int(tokens * (cfg.n_layers * per_layer + recompute + d * c) + logits)


def _split_argv(argv: list[str]) -> tuple[str | None, list[str], PlanOptions]:
    path = argv[0] if argv and argv[0].endswith((".yaml", ".yml")) else None
    rest = argv[1:] if path else list(argv)
    own, overrides = {}, []
    for text in rest:
        if "=" not in text:
            raise ConfigError(f"unexpected argument {text!r}: expected CONFIG.yaml first, then key=value")
        key, value = parse_override(text)
        if len(key) == 1 and key[0] in PlanOptions.__dataclass_fields__:
            own[key[0]] = value
        else:
            overrides.append(text)
    return path, overrides, from_dict(PlanOptions, own)


def render_plan(cfg, options: PlanOptions) -> str:
    """The plan report for a `TrainConfig` (see the module docstring)."""
    model = cfg.model
    fixed = [getattr(cfg.mesh, axis) for axis in MESH_AXES]
    n_devices = options.devices or (jax.device_count() if -1 in fixed else math.prod(fixed))
    mesh_shape = cfg.mesh.shape(n_devices)
    rules = rules_for(cfg.mesh.strategy)
    check_rules_use_mesh(rules, mesh_shape)
    rows = cfg.global_batch_size // cfg.micro_batches
    row_shards = _split(rules, "activation_batch", mesh_shape)
    warnings = []
    if rows % row_shards:
        warnings.append(f"warning: {rows} rows per micro-batch do not split over the {row_shards} batch shards "
                        f"(data × fsdp); training needs global_batch_size / micro_batches to be a multiple of "
                        f"{row_shards}. Activations above assume {-(-rows // row_shards)} row(s) per device.")
    optimizer = make_optimizer(cfg.optimizer, cfg.steps)
    state = state_bytes_per_device(model, optimizer, rules, mesh_shape)
    full_state = sum(state.values())
    if cfg.lora.enabled:
        state = lora_state_bytes_per_device(model, optimizer, rules, mesh_shape, cfg.lora)
        warnings.append(f"LoRA rank {cfg.lora.rank} on {cfg.lora.targets}: {adapter_count(model, cfg.lora) / 1e6:,.2f} M "
                        f"trainable parameters; parameters, gradients and optimizer state take "
                        f"{sum(state.values()) / GIB:.2f} GiB per device against {full_state / GIB:.2f} GiB for "
                        f"full fine-tuning (saves {(full_state - sum(state.values())) / GIB:.2f} GiB)")
    if cfg.micro_batches > 1:
        state["grads"] *= 2  # the accumulator plus the current micro-batch's gradients
    acts = {p: activation_bytes(model, rules, mesh_shape, rows, cfg.seq_len, p, options.platform)
            for p in REMAT_POLICIES}
    impl = resolve_attention(model, options.platform, seq_len=cfg.seq_len).attention_impl
    gathered = gathered_weight_bytes(model, rules, mesh_shape)
    total = sum(state.values()) + gathered + acts[model.remat]

    mesh_text = " × ".join(f"{a}={n}" for a, n in mesh_shape.items())
    if cfg.seq_len % (2 * _split(rules, "activation_length", mesh_shape)):
        warnings.append(f"warning: seq_len {cfg.seq_len} must be a multiple of 2 × the context split "
                        f"({_split(rules, 'activation_length', mesh_shape)}) to train")
    lines = [f"plan: {api.param_count(model) / 1e9:.2f} B parameters ({model.param_dtype}, compute {model.dtype}), "
             f"{model.n_layers} layers, dim {model.dim}, vocab {model.vocab_size}",
             f"mesh: {mesh_text} ({n_devices} devices), strategy {cfg.mesh.strategy}",
             f"batch: {cfg.global_batch_size} rows × {cfg.seq_len} tokens in {cfg.micro_batches} micro-batch(es); "
             f"attention {model.attention_impl} on {options.platform}: {impl} "
             f"({IMPLEMENTATIONS[impl].memory()})",
             "", "rules (logical axis -> mesh axes):"]
    lines += [f"  {name:22s} {target if target else '-'}" for name, target in rules]
    rows_out = [("parameters", state["params"]), ("gradients", state["grads"]),
                 ("optimizer state", state["optimizer"]), ("gathered weights (transient)", gathered)]
    if "adapted" in state:
        rows_out.append(("LoRA adapted weights (transient)", state["adapted"]))
    rows_out += [(f"activations, remat={p}", acts[p]) for p in REMAT_POLICIES]
    rows_out.append((f"total (remat={model.remat})", total))
    lines += ["", f"{'per device':34s}{'GiB':>8s}"]
    lines += [f"  {label:32s}{n / GIB:8.2f}{'   <- configured' if label.endswith('=' + model.remat) else ''}"
              for label, n in rows_out]
    if options.device_memory_gib:
        used = total / (options.device_memory_gib * GIB)
        verdict = "fits" if used <= 1 else "DOES NOT FIT"
        lines.append(f"device memory {options.device_memory_gib:g} GiB: {verdict} ({used:.0%} of it, "
                     f"before XLA's temporaries)")
    traffic = traffic_bytes(model, rules, mesh_shape, param_shard=state["params"], rows=rows, seq_len=cfg.seq_len,
                            micro_batches=cfg.micro_batches, kernel=impl != "xla")
    lines += ["", f"{'traffic per device per step (estimate)':42s}{'over DCN GiB':>14s}{'in slice GiB':>14s}"]
    lines += [f"  {name:40s}{dcn / GIB:14.3f}{ici / GIB:14.3f}" for name, (dcn, ici) in traffic.items()]
    lines.append(f"  {'total':40s}{sum(d for d, _ in traffic.values()) / GIB:14.3f}"
                 f"{sum(i for _, i in traffic.values()) / GIB:14.3f}")
    lines += warnings
    return "\n".join(lines)


def plan_cli(argv: list[str]) -> int:
    """Entry point for `python train.py plan ...` and `python -m llama_jax.training.plan ...`."""
    from llama_jax.training.config import load_train_config  # the training config's one loader

    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        path, overrides, options = _split_argv(list(argv))
        print(render_plan(load_train_config(path, overrides), options))
    except ConfigError as err:
        print(f"plan: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(plan_cli(sys.argv[1:]))
