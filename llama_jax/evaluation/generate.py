"""Text generation with a KV cache: batched prompts of different lengths, the decode loop in one jit.

Prompts are left-padded to a common length, a length bucket (`scoring.length_bucket`: at least 16, four
sizes per power of two) so that few programs compile (padding has segment id 0, positions count real
tokens only), prefilled in one forward pass that fills the cache (the output layer on the last position
alone), then decoded one token per step inside a `lax.while_loop`. The whole loop is one compiled
program: no per-token dispatch, and bf16 weights are not re-converted on every token. A row stops at EOS
(later slots hold the pad id); the loop stops when every row has stopped or `max_new_tokens` are out.
Stop strings (lm-eval's `until`) are text, not tokens: with a stop condition the same loop runs
`CHECK_EVERY` tokens at a time (prefill and advance as two programs, the state passed between them), the
host marks the rows whose text holds a stop string as done, and generation ends as soon as all are; the
tokens are those of one uninterrupted run.

Sampling follows Hugging Face's order: temperature, then top-k, then top-p (nucleus: keep the fewest
most likely tokens whose probability reaches top_p); temperature 0 is greedy decoding (argmax).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.utils.config_io import ConfigError
from llama_jax.evaluation.loading import EvalModel
from llama_jax.evaluation.scoring import length_bucket
from llama_jax.model import transformer
from llama_jax.model.transformer import KVCache, unstack_layers

log = logging.getLogger(__name__)
CHECK_EVERY = 16  # tokens decoded between two checks of the callers' stop conditions


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def warp_logits(logits: jax.Array, *, temperature, top_k: int, top_p: float) -> jax.Array:
    """Logits [batch, vocab] scaled by temperature, with tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p >= 1:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # Keep the most likely tokens until their mass reaches top_p (the first one always).
    keep = (mass_before < top_p) | (jnp.arange(logits.shape[-1]) == 0)
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def _next_token(logits, key, temperature, *, greedy: bool, top_k: int, top_p: float):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    warped = warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, warped, axis=-1).astype(jnp.int32)


def _model(cfg, params):
    """The model on layers unrolled over weights sliced once, before any loop: inside a loop XLA:CPU
    would otherwise copy every weight (and, without one cache array per layer, the cache) every token.
    Its attention is the `xla` reference: queries attend over the KV cache (q_len != kv_len), which only
    the reference supports (`Generator` says so when the config names another)."""
    cfg = cfg.replace(scan_layers=False, attention_impl="xla")
    layer_params = unstack_layers(params["layers"], cfg.n_layers)
    return cfg, functools.partial(transformer.apply, cfg, params, layer_params=layer_params)


def _prefill(cfg, params, tokens, segment_ids, temperature, key, *, max_new: int, greedy: bool, top_k: int,
             top_p: float, eos_id: int, pad_id: int):
    """Prefill the left-padded prompts and pick the first new token: the decode state
    (step, last token, its position, cache, new tokens [batch, max_new], done rows)."""
    batch, prompt_len = tokens.shape
    pick = functools.partial(_next_token, temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p)
    cfg, model = _model(cfg, params)
    cache = KVCache.create(cfg, batch, prompt_len + max_new, per_layer=True)
    positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0)
    last = jnp.full((batch, 1), prompt_len - 1, jnp.int32)  # only the last position's logits are read
    logits, cache = model(tokens, positions=positions, segment_ids=segment_ids, cache=cache, logits_at=last)
    first = pick(logits[:, -1], jax.random.fold_in(key, 0))
    out = jnp.full((batch, max_new), pad_id, jnp.int32).at[:, 0].set(first)
    done = (first == eos_id) if eos_id >= 0 else jnp.zeros((batch,), bool)
    return jnp.int32(1), first, positions[:, -1] + 1, cache, out, done


def _advance(cfg, params, state, temperature, key, until, *, greedy: bool, top_k: int, top_p: float, eos_id: int,
             pad_id: int, **_):
    """Decode one token per step in a while loop until step `until` or every row is done."""
    pick = functools.partial(_next_token, temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p)
    _, model = _model(cfg, params)

    def running(state):
        step, _, _, _, _, done = state
        return (step < until) & ~jnp.all(done)

    def step_fn(state):
        step, token, position, cache, out, done = state
        logits, cache = model(token[:, None], positions=position[:, None], cache=cache)
        token = jnp.where(done, pad_id, pick(logits[:, 0], jax.random.fold_in(key, step)))
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        if eos_id >= 0:
            done = done | (token == eos_id)
        return step + 1, token, position + 1, cache, out, done

    return jax.lax.while_loop(running, step_fn, state)


def _decode(cfg, params, tokens, segment_ids, temperature, key, **kw):
    """Prefill, then decode up to `max_new` tokens: the whole generation as one program."""
    state = _prefill(cfg, params, tokens, segment_ids, temperature, key, **kw)
    return _advance(cfg, params, state, temperature, key, kw["max_new"], **kw)[4]


@dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]  # new tokens of each prompt, through EOS when it came
    seconds: float  # wall time of the compiled decode (prefill included, compilation not)
    compile_seconds: float  # 0 when the program for these shapes was already compiled

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds


class Generator:
    """Generates for `model` with `sampling`; one compiled program per (batch, padded prompt length)."""

    def __init__(self, model: EvalModel, sampling: SamplingConfig, *, eos_id: int | None = None,
                 pad_id: int | None = None):
        tok = model.tokenizer
        self.model, self.sampling = model, sampling
        self.eos_id = eos_id if eos_id is not None else (tok.eos_id if tok is not None else -1)
        self.pad_id = pad_id if pad_id is not None else (tok.pad_id if tok is not None else 0)
        if not sampling.stop_at_eos:
            self.eos_id = -1
        if model.cfg.attention_impl != "xla":
            log.warning("generate: decoding attends over the KV cache with the xla reference attention, not "
                        "the configured %s (it needs queries and keys of equal length)", model.cfg.attention_impl)
        self.compiled: dict[tuple[int, int], object] = {}
        static = dict(max_new=sampling.max_new_tokens, greedy=sampling.greedy, top_k=sampling.top_k,
                      top_p=sampling.top_p, eos_id=self.eos_id, pad_id=self.pad_id)
        self._fn = jax.jit(functools.partial(_decode, model.cfg, **static), out_shardings=model.out_sharding())
        # The same generation in pieces, for stop conditions checked on the host between them.
        self._prefill = jax.jit(functools.partial(_prefill, model.cfg, **static))
        # The state (KV cache included) is donated: each piece updates it in place instead of copying it.
        self._advance = jax.jit(functools.partial(_advance, model.cfg, **static), donate_argnums=(1,))

    @property
    def max_prompt_len(self) -> int:
        """The longest prompt that leaves room for max_new_tokens in the model's context."""
        return self.model.cfg.max_seq_len - self.sampling.max_new_tokens

    def _inputs(self, prompts: Sequence[Sequence[int]], seed: int, rows: int):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest > self.max_prompt_len:
            raise ValueError(f"generate: prompt of {longest} tokens + max_new_tokens "
                             f"{self.sampling.max_new_tokens} exceeds the model's max_seq_len "
                             f"{self.model.cfg.max_seq_len}")
        rows = -(-max(rows, len(prompts)) // self.model.row_multiple) * self.model.row_multiple
        width = length_bucket(longest, self.max_prompt_len)
        tokens = np.full((rows, width), self.pad_id, np.int32)
        segments = np.zeros((rows, width), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = p
            segments[i, width - len(p):] = 1
        for i in range(len(prompts), rows):  # filler rows: a one-token prompt, discarded
            segments[i, -1] = 1
        return (self.model.params, self.model.place_rows(tokens), self.model.place_rows(segments),
                jnp.float32(self.sampling.temperature or 1.0), jax.random.key(seed))

    def __call__(self, prompts: Sequence[Sequence[int]], *, seed: int | None = None, rows: int = 0,
                 stop: Callable[[list[int]], bool] | None = None, check_every: int = CHECK_EVERY) -> Generation:
        """New tokens for each prompt; `seed` overrides the sampling seed, `rows` pads the batch to at
        least that many rows (so batches of one evaluation share one compiled program). `stop(new tokens)`:
        a row is finished once it says so; it is asked every `check_every` tokens, between compiled
        decoding runs, and generation ends when every row is finished (rows may run a little past their
        stop: callers cut the text)."""
        args = self._inputs(prompts, self.sampling.seed if seed is None else seed, rows)
        if stop is not None:
            return self._generate_checked(args, len(prompts), stop, check_every)
        shape = args[1].shape
        compile_seconds = 0.0
        if shape not in self.compiled:
            start = time.perf_counter()
            with self.model.activate():
                self.compiled[shape] = self._fn.lower(*args).compile()
            compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out = np.asarray(self.compiled[shape](*args))
        return Generation(self._cut_at_eos(out[:len(prompts)]), time.perf_counter() - start, compile_seconds)

    def _cut_at_eos(self, out: np.ndarray) -> list[list[int]]:
        tokens = []
        for row in out:
            row = row.tolist()
            if self.eos_id in row:
                row = row[:row.index(self.eos_id) + 1]
            tokens.append(row)
        return tokens

    def _generate_checked(self, args, n: int, stop, check_every: int) -> Generation:
        """Prefill, then decode `check_every` tokens at a time, marking rows whose tokens `stop` accepts
        as done, until all are (filler rows count as done) or max_new_tokens are out."""
        params, _, _, temperature, key = args
        max_new = self.sampling.max_new_tokens
        start = time.perf_counter()
        ends = np.full(n, max_new)  # where the rows the host stopped end (later slots hold the pad id)
        with self.model.activate():
            state = self._prefill(*args)
            step = 1
            while True:
                step_now, token, position, cache, out, done = state
                new = np.asarray(out)[:n, :step]
                finished = np.asarray(done).copy()
                finished[n:] = True
                for i in np.flatnonzero(~finished[:n]):
                    if stop(self._cut_at_eos(new[i:i + 1])[0]):
                        finished[i], ends[i] = True, step
                if finished.all() or step >= max_new:
                    break
                step = min(step + check_every, max_new)
                done = jax.device_put(finished, done.sharding)
                state = self._advance(params, (step_now, token, position, cache, out, done), temperature, key,
                                      jnp.int32(step))
        tokens = [row[:end] for row, end in zip(self._cut_at_eos(new), ends)]
        return Generation(tokens, time.perf_counter() - start, 0.0)


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (lm-evaluation-harness's rule)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def generate_texts(generator: Generator, prompts: Sequence[Sequence[int]], *, until: Sequence[str] = (),
                   batch_size: int = 8, seed: int | None = None) -> list[str]:
    """Completion text of each token prompt, cut at `until`: prompts sorted by length (longest first)
    and decoded `batch_size` at a time, a batch ending once every row has written a stop string (or
    EOS); prompts too long for the context lose tokens on the left."""
    tok = generator.model.tokenizer
    stops = [s for s in until if s]
    stop = (lambda tokens: any(s in tok.decode(tokens) for s in stops)) if stops else None
    prompts = [list(p)[-generator.max_prompt_len:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        result = generator([prompts[i] for i in chunk], seed=seed, rows=batch_size, stop=stop)
        for i, tokens in zip(chunk, result.tokens):
            texts[i] = cut_at_stops(tok.decode(tokens), until)
    return texts


def chat_prompts(tokenizer, template_name: str, conversations: Sequence[list[dict]], *, date: str | None = None
                 ) -> tuple[list[list[int]], int]:
    """Conversations (messages, without the answer) as the chat template fine-tuning used renders them,
    ending with the assistant's header; and the end-of-turn id that stops generation (LLaMA 3: <|eot_id|>)."""
    from llama_jax.data.chat_template import ChatTemplate

    template = ChatTemplate(template_name, tokenizer, date=date)
    return [template.encode_prompt(list(messages)) for messages in conversations], template.end_of_turn_id
