"""Checkpoint conversion: bit-exact round trips, Hugging Face transformers as the oracle for HF files and
logits, and Meta's shard layout read back with plain torch.load."""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from llama_jax.model.api import flat_param_shapes
from llama_jax.checkpoint.layout import read_model_config
from llama_jax.checkpoint.params import load_params, save_params
from llama_jax.model.config import ModelConfig
from llama_jax.convert import convert, read_checkpoint
from llama_jax.cli.convert import main
from llama_jax.utils.trees import flatten
from llama_jax.model.params import our_shape, params_from_torch, tensor_maps
from llama_jax.model.transformer import apply
from oracle import hf_logits, hf_model

BASE = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, ffn_hidden_dim=96, norm_eps=1e-5, max_seq_len=64,
            dtype="float32", attention_impl="xla")
CONFIGS = {
    "mha": ModelConfig(**BASE),
    "gqa": ModelConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 2, "rope_theta": 500000.0}),
    "tied": ModelConfig(**{**BASE, "n_kv_heads": 2, "tie_embeddings": True}),
}
NP_DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}
CONFIG_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
LOGITS_ATOL = 1e-4


def random_params(cfg: ModelConfig, dtype: str = "fp32", seed: int = 0) -> dict:
    """Our pure-dict params with every entry random (norm scales included), in `dtype`."""
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for path, shape in flat_param_shapes(cfg).items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = (rng.standard_normal(shape) * 0.05).astype(NP_DTYPES[dtype])
    return tree


def save_random(tmp_path, name, cfg, dtype="fp32", seed=0):
    """A params-only orbax checkpoint of random weights (plus a tokenizer file); returns (dir, cfg, params)."""
    cfg = cfg.replace(param_dtype=CONFIG_DTYPES[dtype])
    params = random_params(cfg, dtype, seed)
    tokenizer = tmp_path / "tokenizer.model"
    tokenizer.write_bytes(b"not a real sentencepiece model, only has to travel along")
    save_params(tmp_path / name, params, cfg, tokenizer_path=tokenizer)
    return tmp_path / name, cfg, params


def exported_sources(root, model_parallel):
    """One small random model as ours (`ours/`), Meta's format in `model_parallel` shards (`meta/`) and
    Hugging Face's (`hf/`): the inputs the reader error and fuzz tests mutate."""
    src, _, _ = save_random(root, "ours", CONFIGS["mha"])
    convert(src, root / "meta", to="meta", model_parallel=model_parallel, progress=False)
    convert(src, root / "hf", to="hf", progress=False)
    return root


def assert_bit_equal(got: dict, expected: dict):
    got, expected = flatten(got), flatten(expected)
    assert sorted(got) == sorted(expected)
    for path, value in expected.items():
        assert got[path].dtype == value.dtype, path
        assert got[path].shape == value.shape, path
        assert np.array_equal(np.ascontiguousarray(got[path]).view(np.uint8), np.ascontiguousarray(value).view(np.uint8)), path


def test_shape_table_agrees_with_the_model():
    for cfg in CONFIGS.values():
        expected = flat_param_shapes(cfg)
        assert {m.ours: our_shape(m, cfg) for m in tensor_maps(cfg)} == expected


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_parallel", [1, 2, 4])
def test_orbax_meta_orbax_round_trip_is_bit_exact(tmp_path, dtype, model_parallel):
    src, cfg, params = save_random(tmp_path, "ours", CONFIGS["gqa"], dtype)
    convert(src, tmp_path / "meta", to="meta", model_parallel=model_parallel, progress=False)
    assert len(list((tmp_path / "meta").glob("consolidated.*.pth"))) == model_parallel
    # the preset supplies what params.json does not record (max_seq_len, compute dtype, ...)
    convert(tmp_path / "meta", tmp_path / "back", to="orbax", preset=str(src / "model.yaml"), progress=False)
    back_cfg = read_model_config(tmp_path / "back")
    assert back_cfg.hidden_dim == cfg.hidden_dim
    ffn_fields = ("ffn_hidden_dim", "multiple_of", "ffn_dim_multiplier")  # Meta states the size by its rule
    assert back_cfg.replace(**{k: getattr(cfg, k) for k in ffn_fields}) == cfg
    assert_bit_equal(load_params(tmp_path / "back", back_cfg), params)
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_orbax_hf_orbax_round_trip_is_bit_exact(tmp_path, dtype):
    src, cfg, params = save_random(tmp_path, "ours", CONFIGS["tied"], dtype)
    convert(src, tmp_path / "hf", to="hf", progress=False)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["dtype"] == hf_config["torch_dtype"] == CONFIG_DTYPES[dtype]
    convert(tmp_path / "hf", tmp_path / "back", to="orbax", preset=str(src / "model.yaml"), progress=False)
    assert read_model_config(tmp_path / "back") == cfg
    assert_bit_equal(load_params(tmp_path / "back", cfg), params)
    # what training's init_from does: restore straight onto devices
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = load_params(tmp_path / "back", cfg, shardings=jax.tree.map(lambda _: device, params))
    assert_bit_equal(jax.tree.map(np.asarray, placed), params)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_meta_hf_meta_round_trip_is_bit_exact(tmp_path, dtype):
    src, _, _ = save_random(tmp_path, "ours", CONFIGS["mha"], dtype)
    convert(src, tmp_path / "meta", to="meta", model_parallel=2, progress=False)
    convert(tmp_path / "meta", tmp_path / "hf", to="hf", progress=False)
    convert(tmp_path / "hf", tmp_path / "meta2", to="meta", model_parallel=2, progress=False)
    assert (tmp_path / "meta2" / "params.json").read_text() == (tmp_path / "meta" / "params.json").read_text()
    for shard in ("consolidated.00.pth", "consolidated.01.pth"):
        a = torch.load(tmp_path / "meta" / shard, weights_only=True)
        b = torch.load(tmp_path / "meta2" / shard, weights_only=True)
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_dtype_cast_matches_numpy_rounding(tmp_path):
    src, cfg, params = save_random(tmp_path, "ours", CONFIGS["mha"], "fp32")
    convert(src, tmp_path / "hf", to="hf", dtype="bf16", progress=False)
    got_cfg, got, _ = read_checkpoint(tmp_path / "hf")
    assert got_cfg.param_dtype == "bfloat16"
    assert_bit_equal(got, {k: v for k, v in _cast(params, NP_DTYPES["bf16"]).items()})


def test_fp16_flag_writes_fp32_rounded_to_fp16_and_reads_back_exactly(tmp_path, capsys):
    """`llama-jax-convert --dtype fp16` (what `python -m llama_jax.convert` runs): every tensor written to
    Hugging Face safetensors (read by the `safetensors` package) and to Meta's .pth (read by plain
    torch.load) is float16 and equals numpy's round-to-nearest of the fp32 value; converting that fp16
    checkpoint back with `--dtype fp32` gives those fp16 values widened exactly."""
    import safetensors.numpy

    src, cfg, params = save_random(tmp_path, "ours", CONFIGS["gqa"], "fp32")
    expected = _cast(params, np.float16)
    assert not all(np.array_equal(a.astype(np.float32), b) for a, b in zip(
        flatten(expected).values(), flatten(params).values()))  # the rounding is visible in these values
    for fmt in ("hf", "meta"):
        assert main(["--to", fmt, str(src), str(tmp_path / fmt), "--dtype", "fp16", "--no-progress"]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {tmp_path / fmt} ({fmt};")
    written = {}
    for f in (tmp_path / "hf").glob("*.safetensors"):
        written.update(safetensors.numpy.load_file(f))
    meta = {k: v.numpy() for k, v in torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True).items()}
    for fmt, tensors in (("hf", written), ("meta", meta)):
        assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}, fmt
        assert_bit_equal(params_from_torch(tensors.__getitem__, cfg, fmt), expected)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float16"
    for fmt in ("hf", "meta"):
        assert main(["--to", "orbax", str(tmp_path / fmt), str(tmp_path / f"{fmt}-back"), "--dtype", "fp32",
                     "--preset", str(src / "model.yaml"), "--no-progress"]) == 0
        back_cfg = read_model_config(tmp_path / f"{fmt}-back")
        assert back_cfg.param_dtype == "float32"
        assert_bit_equal(load_params(tmp_path / f"{fmt}-back", back_cfg), _cast(expected, np.float32))


def _cast(tree, dtype):
    return {k: _cast(v, dtype) if isinstance(v, dict) else v.astype(dtype) for k, v in tree.items()}


def _our_logits(cfg, params, tokens):
    logits = jax.jit(lambda p, t: apply(cfg, p, t)[0])(params, jnp.asarray(tokens))
    assert logits.dtype == jnp.float32
    return np.asarray(logits)


@pytest.mark.parametrize("name,max_shard_bytes", [("gqa", 40_000), ("tied", 5 * 2**30)])
def test_hf_export_loads_in_transformers_with_equal_logits(tmp_path, name, max_shard_bytes):
    src, cfg, params = save_random(tmp_path, "ours", CONFIGS[name])
    convert(src, tmp_path / "hf", to="hf", max_shard_bytes=max_shard_bytes, progress=False)
    sharded = (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert sharded == (name == "gqa")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    np.testing.assert_allclose(hf_logits(hf, tokens), _our_logits(cfg, params, tokens), atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mha", "gqa", "tied"])
def test_transformers_save_pretrained_imports_with_equal_logits(tmp_path, name):
    cfg = CONFIGS[name]
    hf = hf_model(cfg, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["--from", "hf", "--to", "orbax", "--no-progress", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    got_cfg = read_model_config(tmp_path / "ours")
    assert got_cfg.tie_embeddings == cfg.tie_embeddings and got_cfg.kv_heads == cfg.kv_heads
    params = load_params(tmp_path / "ours", got_cfg)
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(_our_logits(cfg, params, tokens), hf_logits(hf, tokens), atol=LOGITS_ATOL, rtol=0)


def test_sharded_safetensors_with_index_import(tmp_path):
    cfg = CONFIGS["gqa"]
    hf = hf_model(cfg, seed=4)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    got_cfg, got, tokenizer = read_checkpoint(tmp_path / "hf")
    assert tokenizer is None and got_cfg.param_dtype == "float32"
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert_bit_equal(got, params_from_torch(state.__getitem__, cfg, "hf"))


def _meta_rows_from_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Meta's row order from HF's, written index by index: Meta row 2i (2i+1) of a head is HF row i (i + hd/2)."""
    head_dim = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = w[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = w[h * head_dim + head_dim // 2 + i]
    return out


@pytest.mark.parametrize("model_parallel,embedding_split", [(1, None), (2, None), (2, 0)])
def test_meta_export_layout_read_with_plain_torch_load(tmp_path, model_parallel, embedding_split):
    cfg = CONFIGS["gqa"]
    hf = hf_model(cfg, seed=5)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", model_parallel=model_parallel,
            meta_embedding_split_dim=embedding_split, progress=False)
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert {k: params[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")} == {
        "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 128}
    assert ModelConfig(dim=64, n_heads=8, multiple_of=params["multiple_of"],
                       ffn_dim_multiplier=params.get("ffn_dim_multiplier")).hidden_dim == 96
    shards = [torch.load(tmp_path / "meta" / f"consolidated.{i:02d}.pth", weights_only=True)
              for i in range(model_parallel)]
    hf_state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    emb_dim = 1 if embedding_split is None else embedding_split
    split_dims = {"tok_embeddings": emb_dim, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                  "wo": 1, "w2": 1}
    hf_names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj",
                "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    expected = {"tok_embeddings.weight": hf_state["model.embed_tokens.weight"],
                "norm.weight": hf_state["model.norm.weight"], "output.weight": hf_state["lm_head.weight"]}
    for i in range(cfg.n_layers):
        for ours, theirs in hf_names.items():
            group = "attention" if ours in ("wq", "wk", "wv", "wo") else "feed_forward"
            key = f"layers.{i}.{ours}.weight" if "norm" in ours else f"layers.{i}.{group}.{ours}.weight"
            value = hf_state[f"model.layers.{i}.{theirs}.weight"]
            if ours in ("wq", "wk"):
                value = _meta_rows_from_half_split(value, cfg.n_heads if ours == "wq" else cfg.kv_heads)
            expected[key] = value
    for shard in shards:
        assert sorted(shard) == sorted(expected)
    for key, full in expected.items():
        module = key.split(".")[-2]
        dim = split_dims.get(key.split(".")[0] if key.count(".") == 1 else module)
        if model_parallel == 1 or dim is None:  # norms: replicated in every shard
            for shard in shards:
                np.testing.assert_array_equal(shard[key].numpy(), full)
            continue
        for i, shard in enumerate(shards):
            size = full.shape[dim] // model_parallel
            assert shard[key].shape[dim] == size and shard[key].shape[1 - dim] == full.shape[1 - dim], key
            np.testing.assert_array_equal(shard[key].numpy(), np.take(full, range(i * size, (i + 1) * size), axis=dim))
    # and back: the reader detects the embedding split and recovers HF's weights exactly
    _, back, _ = read_checkpoint(tmp_path / "meta")
    assert_bit_equal(back, params_from_torch(hf_state.__getitem__, cfg, "hf"))


def test_meta_import_accepts_rope_freqs_and_vocab_from_weights(tmp_path):
    src, cfg, params = save_random(tmp_path, "ours", CONFIGS["mha"])
    convert(src, tmp_path / "meta", to="meta", model_parallel=2, progress=False)
    meta = tmp_path / "meta"
    for i in range(2):
        shard = torch.load(meta / f"consolidated.{i:02d}.pth", weights_only=True)
        shard["rope.freqs"] = torch.ones(cfg.head_dim // 2)
        torch.save(shard, meta / f"consolidated.{i:02d}.pth")
    p = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**p, "vocab_size": -1}))
    got_cfg, got, tokenizer = read_checkpoint(meta)
    assert got_cfg.vocab_size == cfg.vocab_size and tokenizer == str(meta / "tokenizer.model")
    assert_bit_equal(got, params)


def test_tied_model_exports_to_meta_with_an_explicit_output(tmp_path):
    src, cfg, params = save_random(tmp_path, "ours", CONFIGS["tied"])
    convert(src, tmp_path / "meta", to="meta", model_parallel=2, progress=False)
    got_cfg, got, _ = read_checkpoint(tmp_path / "meta")
    assert not got_cfg.tie_embeddings  # Meta's format has no tying: the head is a copy
    assert_bit_equal(got, {**params, "output": {"kernel": params["tok_embeddings"].T}})


# params.json as Meta publishes it (LLaMA 2 7B ships vocab_size -1; LLaMA 3.1 8B adds use_scaled_rope).
PUBLISHED_PARAMS = {
    "llama2-7b": {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                  "vocab_size": -1},
    "llama3.1-8b": {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
                    "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True,
                    "vocab_size": 128256},
}


@pytest.mark.parametrize("preset", PUBLISHED_PARAMS)
def test_published_params_json_matches_our_presets_both_ways(preset):
    from llama_jax.model.config import load_model_config
    from llama_jax.model.external_config import meta_params_dict, meta_params_fields

    published = PUBLISHED_PARAMS[preset]
    ours = load_model_config(preset)
    fields = meta_params_fields(published, "params.json")
    if fields["vocab_size"] == -1:
        fields["vocab_size"] = ours.vocab_size  # taken from the weights when reading a checkpoint
    imported = ours.replace(**fields)
    for name in ("dim", "n_layers", "n_heads", "kv_heads", "hidden_dim", "norm_eps", "rope_theta", "rope_scaling"):
        assert getattr(imported, name) == getattr(ours, name), name
    exported = meta_params_dict(ours)
    assert {k: v for k, v in exported.items() if k != "vocab_size"} == {
        **{k: v for k, v in published.items() if k != "vocab_size"}, "rope_theta": ours.rope_theta}


def test_params_json_refuses_rope_scaling_meta_cannot_express():
    from llama_jax.model.config import RopeScaling
    from llama_jax.model.external_config import meta_params_dict

    cfg = CONFIGS["gqa"].replace(rope_scaling=RopeScaling(factor=32.0))
    assert meta_params_dict(cfg)["rope_scaling_factor"] == 32.0  # LLaMA 3.2's factor: expressible
    with pytest.raises(ValueError, match="low_freq_factor=1, high_freq_factor=4"):
        meta_params_dict(cfg.replace(rope_scaling=RopeScaling(low_freq_factor=2.0)))


@pytest.mark.parametrize("src,dst", [("bf16", "bf16"), ("fp32", "bf16"), ("fp32", "fp32")])
def test_blocked_copy_of_transposed_views_equals_numpy(src, dst):
    from llama_jax.convert.common import TRANSPOSE_BLOCK, contiguous

    rng = np.random.default_rng(0)
    source = rng.standard_normal((2 * TRANSPOSE_BLOCK + 7, 5)).astype(NP_DTYPES[src]).T  # several column blocks
    got = contiguous(source, NP_DTYPES[dst])
    expected = np.ascontiguousarray(source.astype(NP_DTYPES[dst]))
    assert got.flags.c_contiguous and got.dtype == NP_DTYPES[dst]
    assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))
