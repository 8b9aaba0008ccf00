"""Mesh configuration, rules tables and derived shardings, checked on abstract shapes (one device).

The expected placements are the issue's: FSDP splits `embed`; tensor parallelism splits q/k/v/w1/w3 by
output, wo/w2 by input and the vocabulary of the embedding and output; norms stay replicated.
"""
import threading
from dataclasses import dataclass

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax.model.config import ModelConfig
from llama_jax.utils.config_io import ConfigError
from llama_jax.parallel.logical import active_rules
from llama_jax.parallel.mesh import MeshConfig, activate, device_grid, make_global_batch, make_mesh, process_rows
from llama_jax.parallel.rules import check_rules_use_mesh, rules_for
from llama_jax.training.step import (create_train_state, train_state_specs, opt_state_specs, OptimizerConfig,
                                     make_optimizer)
from llama_jax.model.api import param_specs
from llama_jax.model.api import init_params

CFG = ModelConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=64, dtype="float32",
                  attention_impl="xla", max_seq_len=32)
MESH_8 = {"data": 1, "fsdp": 4, "tensor": 2}


def test_mesh_config_resolves_minus_one_and_rejects_bad_sizes():
    assert MeshConfig().shape(8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert MeshConfig(data=2, fsdp=-1, tensor=2, strategy="fsdp+tp").shape(16) == {"data": 2, "fsdp": 4, "tensor": 2}
    assert MeshConfig(data=-1, fsdp=2).shape(8) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh.fsdp=0"):
        MeshConfig(fsdp=0)
    with pytest.raises(ConfigError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(ConfigError, match="mesh.strategy='zero'"):
        MeshConfig(strategy="zero")
    with pytest.raises(ConfigError, match="do not divide"):
        MeshConfig(data=3).shape(8)
    with pytest.raises(ConfigError, match="uses 4 devices, but there are 8"):
        MeshConfig(data=2, fsdp=2).shape(8)


def test_one_device_mesh_and_idle_axis_error():
    mesh = make_mesh(MeshConfig())
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == 1
    with pytest.raises(ConfigError, match=r"mesh axes \['tensor'\] have size > 1"):
        check_rules_use_mesh(rules_for("fsdp"), MESH_8)
    with pytest.raises(ConfigError, match="uses 2 devices, but there are 1"):
        make_mesh(MeshConfig(fsdp=1, tensor=2, strategy="fsdp+tp"))


def test_fsdp_plus_tp_places_parameters_megatron_style():
    specs = param_specs(CFG, rules_for("fsdp+tp"), MESH_8)
    attn, ffn = specs["layers"]["attention"], specs["layers"]["feed_forward"]
    by_output, by_input = P(None, "fsdp", "tensor"), P(None, "tensor", "fsdp")
    assert [attn[k]["kernel"] for k in ("wq", "wk", "wv", "wo")] == [by_output] * 3 + [by_input]
    assert [ffn[k]["kernel"] for k in ("w1", "w3", "w2")] == [by_output] * 2 + [by_input]
    assert specs["tok_embeddings"] == P("tensor", "fsdp") and specs["output"]["kernel"] == P("fsdp", "tensor")
    assert specs["norm"]["scale"] == P(None) and specs["layers"]["ffn_norm"]["scale"] == P(None, None)


def test_presets_dp_and_fsdp():
    dp = jax.tree.leaves(param_specs(CFG, rules_for("dp"), MESH_8), is_leaf=lambda x: isinstance(x, P))
    assert all(all(a is None for a in spec) for spec in dp)
    fsdp = param_specs(CFG, rules_for("fsdp"), {"data": 1, "fsdp": 8, "tensor": 1})
    assert fsdp["layers"]["attention"]["wo"]["kernel"] == P(None, None, "fsdp")
    assert fsdp["tok_embeddings"] == P(None, "fsdp")


def test_uneven_split_names_the_parameter():
    with pytest.raises(ConfigError, match=r"layers.attention.wk.kernel of shape \(2, 32, 16\): dimension 1 "
                                          r"\(embed, size 32\) is not divisible by mesh axes fsdp of total size 3"):
        param_specs(CFG, rules_for("fsdp"), {"data": 1, "fsdp": 3, "tensor": 1})


def test_optimizer_state_specs_mirror_params():
    optimizer = make_optimizer(OptimizerConfig(), 10)
    specs = train_state_specs(CFG, optimizer, rules_for("fsdp+tp"), MESH_8)
    adam = specs.opt_state[1][0]
    assert adam.mu == specs.params and adam.nu == specs.params
    assert adam.count == P() and specs.step == P()
    assert opt_state_specs(specs.params, optimizer, CFG) == specs.opt_state


def test_one_device_init_equals_plain_init_and_restores_rules():
    """With one device the sharded initialiser is the plain one; the rules are only active inside calls."""
    mesh, rules = make_mesh(MeshConfig()), rules_for("fsdp+tp")
    assert active_rules() == ()
    state = create_train_state(CFG, make_optimizer(OptimizerConfig(), 10), mesh, rules, seed=4)
    assert active_rules() == ()
    ref_params = jax.jit(lambda: init_params(CFG, seed=4))()
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert process_rows(mesh, 2) == slice(0, 2)
    batch = make_global_batch({"inputs": np.zeros((2, 8), np.int32)}, mesh, rules)
    assert batch["inputs"].shape == (2, 8) and batch["inputs"].sharding.mesh == mesh
    with activate(mesh, rules):
        assert active_rules() == rules
    assert active_rules() == ()


def test_rules_stay_with_the_program_that_activated_them():
    """Rules are scoped, not process-wide: another thread tracing meanwhile sees none, a nested
    activation's rules end with it, and an error inside leaves none behind."""
    mesh = make_mesh(MeshConfig())
    seen = {}
    with activate(mesh, rules_for("fsdp+tp")):
        worker = threading.Thread(target=lambda: seen.update(other_thread=active_rules()))
        worker.start()
        worker.join()
        with activate(mesh, rules_for("dp")):
            assert active_rules() == rules_for("dp")
        assert active_rules() == rules_for("fsdp+tp")
    assert seen == {"other_thread": ()}
    with pytest.raises(RuntimeError), activate(mesh, rules_for("dp")):
        raise RuntimeError("traced program failed")
    assert active_rules() == ()


def test_global_batch_rejects_scalars():
    with pytest.raises(ValueError, match=r"batch\['inputs'\] of local shape \(\)"):
        make_global_batch({"inputs": np.int32(3)}, make_mesh(MeshConfig()))


@dataclass(frozen=True)
class FakeDevice:
    """Stands in for a device of a multi-host job: only the attributes the mesh layout reads."""

    id: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def hosts_of(grid) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index)(grid)


def test_multi_host_layout_keeps_tensor_in_a_host_and_data_across_hosts():
    devices = [FakeDevice(i, i // 8) for i in range(32)]  # 4 hosts × 8 devices
    hosts = hosts_of(device_grid({"data": 4, "fsdp": 4, "tensor": 2}, devices))
    assert (hosts == np.arange(4)[:, None, None]).all()  # data index = host; fsdp and tensor inside it
    hosts = hosts_of(device_grid({"data": 2, "fsdp": 16, "tensor": 1}, devices))  # 2 data groups of 2 hosts each
    assert (hosts[:, :, 0] == np.repeat(np.arange(4), 8).reshape(2, 16)).all()
    assert sorted(d.id for d in device_grid({"data": 2, "fsdp": 16, "tensor": 1}, devices).flat) == list(range(32))
    with pytest.raises(ConfigError, match=r"mesh.tensor=16 must fit inside one host \(8 devices per host\)"):
        device_grid({"data": 1, "fsdp": 2, "tensor": 16}, devices)


@dataclass(frozen=True)
class SliceDevice:
    """A device of a multi-slice job: its slice (`slice_index`, as TPU devices report it) and host."""

    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def test_multi_slice_mesh_puts_dcn_axes_outermost_with_one_ici_grid_per_slice():
    # 4 slices × 8 devices, interleaved in the device list (slice = id % 4): a plain reshape would mix them
    devices = [SliceDevice(i, i % 4, i % 4) for i in range(32)]
    cfg = MeshConfig(dcn_data=2, dcn_fsdp=2, fsdp=4, tensor=2, strategy="fsdp+tp")
    sizes = cfg.shape(len(devices))
    assert tuple(sizes) == ("dcn_data", "dcn_fsdp", "data", "fsdp", "tensor")
    grid = device_grid(sizes, devices)
    assert grid.shape == (2, 2, 1, 4, 2)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    seen = set()
    for i in range(2):
        for j in range(2):
            ici = slices[i, j]
            assert len(set(ici.flat)) == 1, ici  # one slice holds the whole data × fsdp × tensor grid
            seen.add(int(ici.flat[0]))
            assert sorted(d.id for d in grid[i, j].flat) == [d.id for d in devices if d.slice_index == ici.flat[0]]
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match=r"4 slices, but the devices belong to 2 slice\(s\)"):
        device_grid(sizes, [SliceDevice(i, i % 2, i % 2) for i in range(32)])
    with pytest.raises(ConfigError, match="mesh.dcn_data=-1"):
        MeshConfig(dcn_data=-1)


def test_rules_never_put_tensor_or_context_across_slices():
    for strategy in ("dp", "fsdp", "fsdp+tp"):
        rules = rules_for(strategy)
        check_rules_use_mesh(rules, {"dcn_data": 2, "dcn_fsdp": 2, "data": 1, "fsdp": 2, "context": 2, "tensor": 2}
                             if strategy == "fsdp+tp" else {"dcn_data": 2, "dcn_fsdp": 2, "fsdp": 2, "context": 2})
        for name, target in rules:
            axes = {target} if isinstance(target, str) else set(target or ())
            if name.startswith("activation_") and axes & {"tensor", "context"}:
                assert not axes & {"dcn_data", "dcn_fsdp"}, (strategy, name, target)
        # only batch rows and FSDP shards cross slices
        dcn = {name for name, target in rules if set((target,) if isinstance(target, str) else target or ())
               & {"dcn_data", "dcn_fsdp"}}
        assert dcn == ({"activation_batch"} if strategy == "dp" else {"activation_batch", "embed"}), dcn
    bad = tuple((n, ("dcn_data", "context") if n == "activation_length" else t) for n, t in rules_for("fsdp"))
    with pytest.raises(ConfigError, match=r"rule activation_length -> \('dcn_data', 'context'\) puts \['context'\] "
                                          r"across slices"):
        check_rules_use_mesh(bad, {"dcn_data": 2, "fsdp": 2, "context": 2})
