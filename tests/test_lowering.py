"""The real programs lowered for TPUs and GPUs that are not here: what a pod would first compile.

`jax.export` lowers (does not compile) a program for another platform when an abstract mesh of that
platform's devices is in context (`llama_jax.parallel.platform.abstract_mesh`). Lowering runs Pallas'
own checks (block shapes, layouts, grid and index maps, Mosaic's lowering for the given TPU generation,
Triton's for the GPU), the model's sharding rules and shard_map wiring; it does not run Mosaic's or
Triton's compilers, nor XLA's TPU/GPU SPMD partitioner. Oracles, each able to fail:

- the kernel custom call in each lowered module, by name (`flash_fwd_*`, `flash_dkdv_*`, `flash_dq_*`):
  `tpu_custom_call` (Mosaic) for TPU v4 / v5e / v5p / v6e, the Triton call for an H100. Control: the same
  programs with `attention_impl: xla`, or a kernel forced into interpret mode (what the host's backend
  would have chosen), hold none;
- the shardings the rules table implies, written out by hand from docs/sharding.md (not derived from
  the code under test): every parameter's and batch input's sharding in the train step's signature, the
  [batch, seq, vocab] logits' sharding constraint, and each kernel inside a shard_map that makes every
  mesh axis manual (Mosaic's requirement) with q/k/v split over the rules' batch and kv-head axes;
- context parallelism (`context=2 × fsdp=2 × tensor=2`): each kernel inside a shard_map over every axis
  that also holds the all-to-alls between sequence and head splits (explicit in the lowered module, since
  shard_map's collectives are written by us, not the partitioner), and the segment ids' all-gather;
- collectives, which exist only after SPMD partitioning: the same train step (the `xla` attention; the
  kernels sit in shard_map and add none) partitioned by XLA for 8 simulated CPU devices, in one
  subprocess: no collective ever moves the whole [batch, seq, vocab] logits, FSDP gathers the layer
  weights, tensor parallelism all-reduces [rows per device × seq, dim] activations. Control: rules that
  leave the logits unsharded do produce the whole-logits all-gather.

What export cannot express, so nothing here checks it: a multi-host mesh (an abstract mesh knows no
processes: which host feeds which rows and `device_grid`'s host layout are only exercised by
tests/test_multihost.py on CPU processes), the TPU/GPU compilers themselves (VMEM/shared-memory limits,
register pressure, Mosaic or Triton compile errors), and anything at run time (speed, numerics on the
hardware). The kernels' numerics are tested in interpret mode (tests/test_kernels.py).
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import export

from llama_jax.kernels import flash_attention_gpu, flash_attention_tpu
from llama_jax.model import api, cpu_fast_paths
from llama_jax.model.attention import resolve_attention
from llama_jax.model.config import ModelConfig
from llama_jax.parallel.mesh import activate
from llama_jax.parallel.platform import abstract_mesh, platform_of
from llama_jax.parallel.rules import rules_for

ROOT = Path(__file__).resolve().parent.parent
TPU_KINDS = ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite")  # v4, v5e, v5p, v6e as jax names them
H100 = "NVIDIA H100 80GB HBM3"
FULL_KINDS = ("TPU v5", H100)  # every mesh and every sequence length; the other kinds one of each
PLATFORM = {**{kind: "tpu" for kind in TPU_KINDS}, H100: "cuda"}
KERNEL = {"tpu": flash_attention_tpu, "cuda": flash_attention_gpu}
CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
SUFFIX = {"tpu": "tpu", "cuda": "gpu"}
CUSTOM_CALL = re.compile(r"custom_call @([\w$.]+)")
# cuDNN's fused attention with a mask (the segment ids), forward and backward: what `auto` runs on an H100.
CUDNN_FORWARD, CUDNN_BACKWARD = "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"

MESHES = {  # name: (axis sizes, rules preset)
    "fsdp=8": (dict(fsdp=8), "fsdp"),
    "fsdp=4xtensor=2": (dict(fsdp=4, tensor=2), "fsdp+tp"),
    "data=2xfsdp=2xtensor=2": (dict(data=2, fsdp=2, tensor=2), "fsdp+tp"),
}
# Context parallelism: sequences split over `context` (tests/test_context_parallel.py proves the numbers).
CONTEXT_MESHES = {"context=2xfsdp=2xtensor=2": (dict(fsdp=2, context=2, tensor=2), "fsdp+tp")}
MODEL = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=512,
                    max_seq_len=256, dtype="bfloat16", attention_impl="auto")
# Our kernels by name: on a GPU `auto` is cuDNN (test_auto_for_an_h100_lowers_to_cudnns_attention).
KERNEL_MODEL = {"tpu": MODEL, "cuda": MODEL.replace(attention_impl="pallas_gpu")}
ROWS, LENGTH = 8, 256


def lower(fn, args, kind: str, shape: dict | None = None, rules=()) -> str:
    """StableHLO text of `fn(*args)` exported for `kind`'s platform under an abstract mesh of `kind`."""
    platform = PLATFORM[kind]
    mesh = abstract_mesh(shape or {}, kind)
    with activate(mesh, rules):
        exported = export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=[export.DisabledSafetyCheck.custom_call(CALL[platform])])(*args)
    return exported.mlir_module()


def kernel_calls(text: str, platform: str) -> list[str]:
    """Names of the Pallas kernels the module calls through `platform`'s custom call, in order."""
    assert set(CUSTOM_CALL.findall(text)) <= {CALL[platform]}, set(CUSTOM_CALL.findall(text))
    names = re.findall(r'kernel_name = "(\w+)"' if platform == "tpu" else r'", name = "(\w+)", num_stages', text)
    assert len(names) == text.count(f"custom_call @{CALL[platform]}")
    return names


def kernel_names(platform: str, *, backward: bool = True) -> set[str]:
    stages = ("fwd", "dkdv", "dq") if backward else ("fwd",)
    return {f"flash_{stage}_{SUFFIX[platform]}" for stage in stages}


# ------------------------------------------------------------------------------------- the kernels alone


def kernel_cases() -> list:
    cases = []
    for kind in (*TPU_KINDS, H100):
        for head_dim in (64, 128):
            for segments in (False, True):
                for seq in ((128, 1000, 4096, 32768) if kind in FULL_KINDS else (2048,)):
                    cases.append(pytest.param(kind, head_dim, segments, seq,
                                              id=f"{kind}-d{head_dim}-seg{int(segments)}-T{seq}"))
    return cases


def attention_grads(kernel, **kwargs):
    """fwd + bwd of `kernel` with an all-ones cotangent: out, dq, dk, dv."""
    def run(q, k, v, segment_ids):
        out, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, segment_ids, **kwargs), q, k, v)
        return (out, *vjp(jnp.ones_like(out)))
    return run


def attention_args(head_dim: int, segments: bool, seq: int, heads: int = 8, kv_heads: int = 2):
    """bf16 q [1, T, 8, D], k/v [1, T, 2, D] (grouped-query), segment ids [1, T] or None."""
    q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), jnp.bfloat16)
    return q, kv, kv, jax.ShapeDtypeStruct((1, seq), jnp.int32) if segments else None


@pytest.mark.parametrize("kind, head_dim, segments, seq", kernel_cases())
def test_kernel_forward_and_backward_lower_to_the_platform_kernels(kind, head_dim, segments, seq):
    """Default blocks, interpret=None: the target platform (not this CPU host) must pick compiled kernels."""
    platform = PLATFORM[kind]
    text = lower(attention_grads(KERNEL[platform]), attention_args(head_dim, segments, seq), kind)
    assert sorted(kernel_calls(text, platform)) == sorted(kernel_names(platform))


def test_control_an_interpreted_kernel_holds_no_kernel_call():
    """What `interpret=None` gave when it followed the CPU host: plain HLO, no Triton call (the TPU's
    interpret mode refuses to lower for a TPU at all; its control is the `xla` train step below)."""
    text = lower(attention_grads(flash_attention_gpu, interpret=True), attention_args(64, True, 256), H100)
    assert kernel_calls(text, "cuda") == []


def test_auto_follows_the_mesh_devices_not_the_host():
    assert resolve_attention(MODEL, platform_of(None)).attention_impl == "xla"  # this CPU host, no mesh
    for kind, impl in (("TPU v6 lite", "pallas_tpu"), (H100, "cudnn")):
        assert resolve_attention(MODEL, platform_of(abstract_mesh({}, kind))).attention_impl == impl


# ---------------------------------------------------------------------------- the model's jitted programs

# Shardings the rules table of docs/sharding.md gives, in Shardy's notation; AdamW's moments mirror them.
FSDP = {"wq": '[{}, {"fsdp"}, {}]', "wk": '[{}, {"fsdp"}, {}]', "wv": '[{}, {"fsdp"}, {}]', "wo": '[{}, {}, {"fsdp"}]',
        "w1": '[{}, {"fsdp"}, {}]', "w3": '[{}, {"fsdp"}, {}]', "w2": '[{}, {}, {"fsdp"}]',
        "attention_norm": "[{}, {}]", "ffn_norm": "[{}, {}]", "norm": "[{}]",
        "output": '[{"fsdp"}, {}]', "tok_embeddings": '[{}, {"fsdp"}]', "batch": '[{"data", "fsdp"}, {}]',
        "logits": '[{"data", "fsdp"}, {}, {}]'}
FSDP_TP = {**FSDP, "wq": '[{}, {"fsdp"}, {"tensor"}]', "wk": '[{}, {"fsdp"}, {"tensor"}]',
           "wv": '[{}, {"fsdp"}, {"tensor"}]', "wo": '[{}, {"tensor"}, {"fsdp"}]', "w1": '[{}, {"fsdp"}, {"tensor"}]',
           "w3": '[{}, {"fsdp"}, {"tensor"}]', "w2": '[{}, {"tensor"}, {"fsdp"}]', "output": '[{"fsdp"}, {"tensor"}]',
           "tok_embeddings": '[{"tensor"}, {"fsdp"}]', "logits": '[{"data", "fsdp"}, {}, {"tensor"}]'}
EXPECTED = {"fsdp": FSDP, "fsdp+tp": FSDP_TP}
# q/k/v per kernel shard: rows over activation_batch's axes, heads over activation_kv_heads'.
KERNEL_QKV = {"fsdp": '[{"data", "fsdp"}, {}, {}, {}]', "fsdp+tp": '[{"data", "fsdp"}, {}, {"tensor"}, {}]'}


def signature_shardings(text: str) -> dict[str, str]:
    """{argument location (e.g. "state.params['norm']['scale']"): its sharding} of the exported main."""
    main = re.search(r"func\.func public @main\((.*?)\) -> ", text).group(1)
    return {loc: spec for spec, loc in re.findall(r'#sdy\.sharding<@mesh, (\[.*?\])>[^)]*?loc\("([^"]+)"\)', main)}


def expected_sharding(location: str, table: dict[str, str]) -> str:
    """The table's entry for an argument: its innermost parameter name (or `batch`), `[]` for scalars
    (the step counters)."""
    names = [n for n in re.findall(r"\['(\w+)'\]", location) if n not in ("kernel", "scale", "layers", "attention",
                                                                           "feed_forward")]
    if location.startswith("batch"):
        return table["batch"]
    return table[names[-1]] if names else "[]"


def enclosing_shard_map(lines: list[str], index: int) -> str | None:
    """Header line of the innermost shard_map (sdy.manual_computation) around line `index`, by indentation."""
    indent = len(lines[index]) - len(lines[index].lstrip())
    for line in reversed(lines[:index]):
        depth = len(line) - len(line.lstrip())
        if depth < indent:
            if "sdy.manual_computation" in line:
                return line
            if line.lstrip().startswith("func.func"):
                return None
            indent = depth
    return None


def check_sharded_program(text: str, strategy: str, platform: str | None, *, backward: bool) -> None:
    """Kernels by name inside shard_map over the rules' axes (none when `platform` is None), inputs
    sharded as the rules table says, the logits pinned as it says, no XLA:CPU fast path."""
    table = EXPECTED[strategy]
    assert cpu_fast_paths.SCOPE not in text and "stablehlo.case" not in text  # the plain forms only
    calls = kernel_calls(text, platform) if platform else []
    if platform:
        assert set(calls) == kernel_names(platform, backward=backward)
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if f"custom_call @{CALL[platform]}" in line:
                shard_map = enclosing_shard_map(lines, i)  # Mosaic needs every mesh axis manual
                assert shard_map and 'manual_axes={"data", "fsdp", "tensor"}' in shard_map, line[:120]
                assert KERNEL_QKV[strategy] in shard_map.split("out_shardings")[0], shard_map[:300]
    else:
        assert not CUSTOM_CALL.findall(text)
    shardings = signature_shardings(text)  # parameters, optimizer state (train step), batch
    params = [loc for loc in shardings if "params" in loc and "opt_state" not in loc]
    assert len(params) == len(api.flat_param_shapes(MODEL)), sorted(shardings)
    for loc, spec in shardings.items():
        assert spec == expected_sharding(loc, table), (loc, spec)
    logits = re.findall(rf"sdy\.sharding_constraint %\S+ <@mesh, (\[[^>]*\])> : tensor<{ROWS}x{LENGTH}x"
                        rf"{MODEL.vocab_size}xf32>", text)
    assert logits and set(logits) == {table["logits"]}, logits


def batch_args(with_segments: bool = True) -> dict:
    keys = ("inputs", "targets", "segment_ids", "positions") if with_segments else ("inputs", "targets")
    batch = {k: jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32) for k in keys}
    batch["loss_mask"] = jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.float32)
    return batch


def model_cases() -> list:
    return [pytest.param(kind, mesh, id=f"{kind}-{mesh}") for kind in (*TPU_KINDS, H100) for mesh in MESHES
            if kind in FULL_KINDS or mesh == "data=2xfsdp=2xtensor=2"]


def lowered_train_step(kind: str, mesh_name: str, model: ModelConfig | None = None) -> str:
    from llama_jax.training.step import OptimizerConfig, make_optimizer, init_train_state, jit_train_step

    shape, strategy = {**MESHES, **CONTEXT_MESHES}[mesh_name]
    model = model or KERNEL_MODEL[PLATFORM[kind]]
    optimizer = make_optimizer(OptimizerConfig(), total_steps=10)
    state = jax.eval_shape(lambda: init_train_state(api.init_params(model), optimizer))
    mesh, rules = abstract_mesh(shape, kind), rules_for(strategy)
    step = jit_train_step(model, optimizer, mesh, rules)  # the jitted program the training loop runs
    with activate(mesh, rules):
        exported = export.export(step.__wrapped__, platforms=[PLATFORM[kind]], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(CALL[PLATFORM[kind]])])(state, batch_args())
    return exported.mlir_module()


@pytest.mark.parametrize("kind, mesh", model_cases())
def test_train_step_lowers_with_the_kernels_and_the_rules_shardings(kind, mesh):
    check_sharded_program(lowered_train_step(kind, mesh), MESHES[mesh][1], PLATFORM[kind], backward=True)


def test_control_train_step_with_xla_attention_holds_no_kernel_call():
    text = lowered_train_step("TPU v5", "fsdp=4xtensor=2", MODEL.replace(attention_impl="xla"))
    check_sharded_program(text, "fsdp+tp", None, backward=True)
    with pytest.raises(AssertionError):
        check_sharded_program(text, "fsdp+tp", "tpu", backward=True)


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_context_parallel_train_step_runs_the_kernels_between_all_to_alls(kind):
    """Sequences split over `context`: each kernel (forward, dK/dV, dQ) inside a shard_map that makes
    every mesh axis manual and holds the all-to-alls between "local positions, all heads" and "whole
    sequences, a share of the heads"; the segment ids are all-gathered in such a shard_map; q/k/v enter split
    over rows, sequence and kv heads, and the batch inputs over rows and sequence, as the rules say."""
    platform = PLATFORM[kind]
    text = lowered_train_step(kind, "context=2xfsdp=2xtensor=2")
    assert set(kernel_calls(text, platform)) == kernel_names(platform)
    lines = text.splitlines()
    kernel_lines = [i for i, line in enumerate(lines) if f"custom_call @{CALL[platform]}" in line]
    bodies = []
    for i in kernel_lines:
        header = enclosing_shard_map(lines, i)
        assert header and 'manual_axes={"data", "fsdp", "context", "tensor"}' in header, lines[i][:120]
        start = max(j for j in range(i) if lines[j] == header)
        indent = len(header) - len(header.lstrip())
        end = next(j for j in range(i, len(lines)) if len(lines[j]) - len(lines[j].lstrip()) <= indent)
        bodies.append("\n".join(lines[start:end]))
        assert "stablehlo.all_to_all" in bodies[-1], lines[i][:120]
        assert '[{"data", "fsdp"}, {"context"}, {"tensor"}, {}]' in header.split("out_shardings")[0], header[:300]
    gathers = [i for i, line in enumerate(lines) if "stablehlo.all_gather" in line]
    assert gathers and all('manual_axes={"data", "fsdp", "context", "tensor"}' in (enclosing_shard_map(lines, i) or "")
                           for i in gathers)
    assert signature_shardings(text)["batch['inputs']"] == '[{"data", "fsdp"}, {"context"}]'


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_eval_forward_lowers_with_the_forward_kernel_only(kind):
    from llama_jax.training.step import jit_eval_step

    shape, strategy = MESHES["data=2xfsdp=2xtensor=2"]
    mesh, rules = abstract_mesh(shape, kind), rules_for(strategy)
    step = jit_eval_step(KERNEL_MODEL[PLATFORM[kind]], mesh, rules)
    with activate(mesh, rules):
        text = export.export(step.__wrapped__, platforms=[PLATFORM[kind]], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(CALL[PLATFORM[kind]])])(api.param_shapes(MODEL), batch_args()
                                                                          ).mlir_module()
    check_sharded_program(text, strategy, PLATFORM[kind], backward=False)


@pytest.mark.parametrize("kind", FULL_KINDS)
def test_decode_loop_lowers_as_one_while_loop_on_the_reference_attention(kind):
    """Prefill and decode attend over the KV cache (q_len != kv_len), which only the `xla` reference
    supports: the decode program holds one while loop and no kernel call, whatever `auto` means."""
    from llama_jax.evaluation.generate import _decode

    shape, strategy = MESHES["data=2xfsdp=2xtensor=2"]
    rules = rules_for(strategy)
    tokens = jax.ShapeDtypeStruct((ROWS, 16), jnp.int32)

    def decode(params, tokens, segment_ids):
        return _decode(MODEL, params, tokens, segment_ids, jnp.float32(1.0), jax.random.key(0), max_new=8,
                       greedy=True, top_k=0, top_p=1.0, eos_id=2, pad_id=0)

    text = lower(decode, (api.param_shapes(MODEL), tokens, tokens), kind, shape, rules)
    assert not CUSTOM_CALL.findall(text)
    assert text.count("stablehlo.while") >= 1 and "sdy.sharding_constraint" in text


def test_auto_for_an_h100_lowers_to_cudnns_attention(monkeypatch):
    """`attention_impl: auto` resolved for an H100 mesh (bf16, head_dim 64, segment ids): the training
    loss's gradient exported for CUDA holds cuDNN's fused attention, forward and backward, and none of
    our Triton kernels; control: `auto` resolved for this CPU host holds no call. Exported without a mesh: jax
    0.11.2 cannot lower cuDNN's custom-partitioned call under an abstract mesh at all ("AbstractMesh cannot
    be used when jaxpr contains primitives that require devices"). jax asks the host's cuDNN library for
    its version while tracing, only to write it into the call's config; this CPU host has none, so the
    test answers what the GPU image's cuDNN 9.19 would (bench/RESULTS.md, "Attention")."""
    from jax._src.cudnn import fused_attention_stablehlo

    from llama_jax.training.step import batch_nll

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91900)

    def calls(platform: str) -> set[str]:
        cfg = resolve_attention(MODEL, platform, seq_len=LENGTH)
        grad = jax.jit(jax.grad(lambda params, batch: batch_nll(cfg, params, batch)[0]))
        checks = [export.DisabledSafetyCheck.custom_call(c) for c in (CUDNN_FORWARD, CUDNN_BACKWARD, CALL["cuda"])]
        text = export.export(grad, platforms=["cuda"], disabled_checks=checks)(api.param_shapes(MODEL), batch_args())
        return set(CUSTOM_CALL.findall(text.mlir_module()))

    assert calls(platform_of(abstract_mesh({"fsdp": 8}, H100))) == {CUDNN_FORWARD, CUDNN_BACKWARD}
    assert calls(platform_of(None)) == set()


# --------------------------------------------------------- collectives, after XLA's SPMD partitioner (CPU)

COLLECTIVE = re.compile(r"= (\([^=]*?\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                        r"(?:-start)?\(")
UNSHARDED_LOGITS = tuple((name, None if name in ("activation_batch", "activation_vocab") else target)
                         for name, target in rules_for("fsdp+tp"))


def collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements) of every array each collective in the optimised HLO produces."""
    found = []
    for result, op in COLLECTIVE.findall(hlo):
        for dims in re.findall(r"\w+\[([\d,]*)\]", result):
            found.append((op, math.prod(int(d) for d in dims.split(",") if d)))
    return found


def partition_worker() -> dict:
    """8 CPU devices: each mesh's train step (fast paths off: the program a GPU/TPU gets) partitioned."""
    jax.config.update("jax_num_cpu_devices", 8)
    from llama_jax.parallel.mesh import MeshConfig, make_mesh
    from llama_jax.training.step import OptimizerConfig, make_optimizer, init_train_state, jit_train_step

    model = MODEL.replace(attention_impl="xla")
    optimizer = make_optimizer(OptimizerConfig(), total_steps=10)
    state = jax.eval_shape(lambda: init_train_state(api.init_params(model), optimizer))
    runs = {name: (shape, strategy, rules_for(strategy)) for name, (shape, strategy) in MESHES.items()}
    runs["control: logits unsharded"] = (MESHES["fsdp=4xtensor=2"][0], "fsdp+tp", UNSHARDED_LOGITS)
    runs.update({name: (shape, strategy, rules_for(strategy)) for name, (shape, strategy) in CONTEXT_MESHES.items()})
    out = {}
    for name, (shape, strategy, rules) in runs.items():
        mesh = make_mesh(MeshConfig(**shape, strategy=strategy))
        step = jit_train_step(model, optimizer, mesh, rules)
        with activate(mesh, rules):
            out[name] = collectives(step.__wrapped__.lower(state, batch_args()).compile().as_text())
    return out


@pytest.fixture(scope="module")
def partitioned() -> dict:
    # LLVM at -O0: partitioning is an HLO pass, unaffected; code generation is what it skips.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "LLAMA_JAX_CPU_FAST_PATHS": "0",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


LOGITS = ROWS * LENGTH * MODEL.vocab_size


@pytest.mark.parametrize("mesh", list(MESHES))
def test_no_collective_moves_the_whole_logits(partitioned, mesh):
    assert partitioned[mesh] and max(n for _, n in partitioned[mesh]) < LOGITS, partitioned[mesh]


def test_control_unsharded_logits_rules_do_gather_them(partitioned):
    assert ("all-gather", LOGITS) in [tuple(c) for c in partitioned["control: logits unsharded"]]


@pytest.mark.parametrize("mesh", list(MESHES))
def test_collectives_the_rules_imply(partitioned, mesh):
    """FSDP: every layer matrix is gathered whole along `embed` (dim × its other dimension's shard).
    Tensor parallelism: the Megatron all-reduce of [rows per device × seq, dim] block outputs."""
    shape, strategy = MESHES[mesh]
    ops = {tuple(c) for c in partitioned[mesh]}
    tensor = shape.get("tensor", 1)
    for other in (MODEL.n_heads * MODEL.head_dim, MODEL.n_kv_heads * MODEL.head_dim, MODEL.ffn_hidden_dim):
        assert ("all-gather", MODEL.dim * other // tensor) in ops, (other, sorted(ops))
    rows_per_device = ROWS // (shape.get("data", 1) * shape.get("fsdp", 1))
    megatron = ("all-reduce", rows_per_device * LENGTH * MODEL.dim) in ops
    assert megatron == (tensor > 1), sorted(ops)


def test_context_parallel_gathers_keys_and_values_not_logits(partitioned):
    """context=2 × fsdp=2 × tensor=2 with the `xla` attention (the all-gather form): each device gathers
    the whole sequence's K and V of its rows and kv heads, and no collective moves the whole logits."""
    shape, _ = CONTEXT_MESHES["context=2xfsdp=2xtensor=2"]
    ops = {tuple(c) for c in partitioned["context=2xfsdp=2xtensor=2"]}
    rows, kv_heads = ROWS // shape["fsdp"], MODEL.n_kv_heads // shape["tensor"]
    assert ("all-gather", rows * LENGTH * kv_heads * MODEL.head_dim) in ops, sorted(ops)
    assert max(n for _, n in ops) < LOGITS


if __name__ == "__main__":
    print(json.dumps(partition_worker()))
