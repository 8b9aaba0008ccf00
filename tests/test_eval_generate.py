"""Generation against transformers' `generate` (greedy, torch fp32, same weights and prompt), and the
sampling filters against transformers' logits warpers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from llama_jax.model.config import ModelConfig
from llama_jax.utils.config_io import ConfigError
from llama_jax.evaluation.generate import Generator, SamplingConfig, _next_token, warp_logits
from llama_jax.evaluation.loading import place_model
from oracle import hf_model, ours_from_hf

CFG = ModelConfig(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96,
                  dtype="float32", attention_impl="xla", norm_eps=1e-5, max_seq_len=64)
NEW = 10


@pytest.fixture(scope="module")
def hf():
    return hf_model(CFG, seed=5)


@pytest.fixture(scope="module")
def model(hf):
    return place_model(CFG, nnx.to_pure_dict(nnx.state(ours_from_hf(hf, CFG), nnx.Param)), dtype="fp32")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, CFG.vocab_size, n).tolist() for n in (5, 13, 1)]


@pytest.fixture(scope="module")
def hf_tokens(hf, prompts):
    return [hf_greedy(hf, p) for p in prompts]


def hf_greedy(hf, prompt, eos_id=None):
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      do_sample=False, max_new_tokens=NEW, eos_token_id=eos_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_batch_matches_transformers_per_prompt(model, prompts, hf_tokens):
    gen = Generator(model, SamplingConfig(max_new_tokens=NEW, stop_at_eos=False), pad_id=0)
    result = gen(prompts)
    assert result.tokens == hf_tokens
    assert result.new_tokens == 3 * NEW and result.tokens_per_second > 0 and result.compile_seconds > 0
    # The decode loop is one compiled program: other prompts of the same padded shape reuse it.
    again = gen([p[::-1] for p in prompts])
    assert len(gen.compiled) == 1 and again.compile_seconds == 0.0
    assert "while" in next(iter(gen.compiled.values())).as_text()


def test_rows_stop_at_eos_like_transformers(hf, model, prompts, hf_tokens):
    eos = hf_tokens[0][3]  # a token the first prompt reaches after 3 others
    gen = Generator(model, SamplingConfig(max_new_tokens=NEW), eos_id=eos, pad_id=0)
    got = gen(prompts).tokens
    for prompt, tokens in zip(prompts, got):
        expected = hf_greedy(hf, prompt, eos_id=eos)
        if eos in expected:  # transformers pads a finished row of a batch of one only up to its end
            expected = expected[:expected.index(eos) + 1]
        assert tokens == expected
    assert got[0][-1] == eos and len(got[0]) <= 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_conditions_end_generation_early_with_the_same_tokens(model, prompts, temperature):
    """Rows checked every `check_every` tokens: each is a prefix of the uninterrupted run's row, ending at
    the first check after its stop condition held (or where the run ends), and the run ends at the check
    where every row has stopped."""
    sampling = SamplingConfig(max_new_tokens=40, temperature=temperature, seed=3, stop_at_eos=False)
    gen = Generator(model, sampling, pad_id=0)
    full = gen(prompts).tokens
    every = 4
    for stop_after in ({0: 6, 1: 2, 2: 30}, {0: 3, 1: 9, 2: 1}):  # a row's stop holds from this many tokens on
        asked = []

        def stop(tokens):
            row = next(r for r, f in enumerate(full) if f[:len(tokens)] == tokens)  # rows differ from token 1
            asked.append(len(tokens))
            return len(tokens) >= stop_after[row]

        got = gen(prompts, stop=stop, check_every=every).tokens
        checks = [1 + every * j for j in range(10)]  # after the first token, then every 4
        for i, (f, g) in enumerate(zip(full, got)):
            assert g == f[:next(c for c in checks if c >= stop_after[i])]
        assert max(asked) == max(len(g) for g in got) < sampling.max_new_tokens  # the run ended early


def test_top_1_sampling_is_greedy(model, prompts, hf_tokens):
    sampled = Generator(model, SamplingConfig(max_new_tokens=NEW, temperature=1.3, top_k=1, seed=7,
                                              stop_at_eos=False), pad_id=0)(prompts).tokens
    assert sampled == hf_tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.5, 10, 0.6)])
def test_warpers_match_transformers(temperature, top_k, top_p):
    logits = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32) * 3
    ref = torch.as_tensor(logits)
    ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = TopPLogitsWarper(top_p)(None, ref)
    got = np.asarray(warp_logits(jnp.asarray(logits), temperature=temperature, top_k=top_k, top_p=top_p))
    ref = ref.numpy()
    np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_softmax():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    keys = jax.random.split(jax.random.key(0), 4000)
    sample = jax.jit(jax.vmap(lambda k: _next_token(logits, k, 0.8, greedy=False, top_k=3, top_p=1.0)[0]))
    counts = np.bincount(np.asarray(sample(keys)), minlength=6) / 4000
    expected = np.exp(np.array([2.0, 1.0, 0.5]) / 0.8)
    expected /= expected.sum()
    assert counts[3:].sum() == 0
    np.testing.assert_allclose(counts[:3], expected, atol=0.03)  # > 4 standard errors at n = 4000


def test_bad_requests_fail_before_compiling(model):
    with pytest.raises(ConfigError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    gen = Generator(model, SamplingConfig(max_new_tokens=60), pad_id=0)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        gen([[1] * 10])
    assert not gen.compiled
