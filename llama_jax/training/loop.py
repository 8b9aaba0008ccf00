"""The training loop: data → sharded train step → metrics, checkpoints, evaluation; resumable at any step.

`train(cfg)` runs one invocation of a run directory. Everything that can be checked without compiling
is checked first (config, run directory, tokenizer, data, checkpoint shapes). Then:

- the state comes from the run's latest complete checkpoint if there is one (params, optimizer state,
  step and data-iterator position: the run continues exactly where it stopped; a step damaged since it
  was saved is set aside and the one before it used), else from `init_from`
  (weights only: fresh optimizer, step 0), else from random initialisation; it is created or read
  directly in its shards on the configured mesh;
- each step feeds this process's rows of the global batch to `llama_jax.training.step.jit_train_step` (the
  project's one train step), and the next batch is read and placed on the devices while they run it;
  the loss and gradient norm are checked every step, so a non-finite value stops the run before any
  bad state is saved, and, with `spikes` configured, a loss spike rolls the run back to the last
  checkpoint before it and skips the data since (`llama_jax.training.spikes`);
- checkpoints are saved asynchronously every `checkpoint_every` steps, at the end, and when SIGTERM
  (preemption) arrives; metrics go to the terminal, `metrics.jsonl` and TensorBoard (process 0 only).
"""
from __future__ import annotations

import functools
import gzip
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from llama_jax.convert.sharded_read import read_sharded
from llama_jax.model import api
from llama_jax.model.attention import resolve_attention
from llama_jax.model.config import EXECUTION_FIELDS
from llama_jax.model.lora import adapter_shapes, init_adapters
from llama_jax.utils.trees import flatten
from llama_jax.checkpoint.integrity import CheckpointDamaged
from llama_jax.checkpoint.run import RunCheckpoints, abstract_with_shardings
from llama_jax.utils.config_io import ConfigError, to_dict
from llama_jax.parallel.distributed import initialize
from llama_jax.training.metrics import MetricsLog, Progress, format_values
from llama_jax.training.peak import job_peak
from llama_jax.parallel.mesh import activate, make_global_batch, make_mesh
from llama_jax.parallel.platform import platform_of
from llama_jax.parallel.rules import rules_for
from llama_jax.training.profiling import StepProfiler
from llama_jax.training.run_lock import RunLock
from llama_jax.training.spikes import Spike, SpikeDetector, describe_spike
from llama_jax.training.task_eval import TaskEval
from llama_jax.convert import companions
from llama_jax.data.tokenizer import Tokenizer, builtin_tokenizer, check_vocab_size, load_tokenizer
from llama_jax.training.config import TrainConfig
from llama_jax.training.optimizer import lr_schedule, make_optimizer
from llama_jax.training.step import (TrainState, create_train_state, init_train_state, jit_eval_step, jit_train_step,
                                     train_state_shardings)


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step and the last good checkpoint."""


@dataclass
class TrainResult:
    """What one invocation did: `losses[i]` is the loss of step `first_step + i`."""

    first_step: int
    last_step: int
    losses: list[float] = field(default_factory=list)
    status: str = "completed"  # "completed" | "stopped" (stop_at_step) | "preempted" (SIGTERM)
    validation: dict | None = None


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory and prove it writable, or fail with the reason, before any compile."""
    run_dir = Path(cfg.run_dir).expanduser()
    probe = run_dir / f".write-test-{jax.process_index()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run_dir {run_dir} is not writable: {e.strerror or e}") from None
    return run_dir


def check_same_model(run_dir: Path, cfg: TrainConfig) -> None:
    """Resuming a run with another model is an error naming the first differing model field."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    saved = (yaml.safe_load(path.read_text()) or {}).get("model", {})
    for key, value in to_dict(cfg.model).items():
        if key not in EXECUTION_FIELDS and saved.get(key) != value:
            raise ConfigError(f"run_dir {run_dir} holds a run with model.{key}={saved.get(key)!r}, this config "
                              f"has {value!r}: use another run_dir or the run's own model config")


def load_run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    tokenizer = (load_tokenizer(cfg.tokenizer) if cfg.tokenizer
                 else builtin_tokenizer(cfg.model.vocab_size, str(cfg.cache_path)))
    check_vocab_size(tokenizer, cfg.model.vocab_size)
    return tokenizer


def write_run_files(run_dir: Path, cfg: TrainConfig, tokenizer: Tokenizer) -> None:
    """The resolved config (model as a full mapping), a copy of the tokenizer, and the files that make an
    export the same chat model (`llama_jax.convert.companions`: tokenizer config and chat template from
    the tokenizer's directory, generation config and BOS/EOS/pad ids from `init_from`, else made from the
    tokenizer), beside the checkpoints."""
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(run_dir / "config.yaml")
    target = run_dir / f"tokenizer{Path(tokenizer.path).suffix}"
    if Path(tokenizer.path).resolve() != target.resolve():
        shutil.copyfile(tokenizer.path, target)
    model_dirs = [Path(cfg.init_from)] if cfg.init_from else []
    companions.carry(run_dir, tokenizer_dirs=[Path(tokenizer.path).parent], model_dirs=model_dirs,
                     token_ids=companions.source_token_ids(model_dirs, tokenizer.path), hf_target=False)


class Evaluator:
    """Validation loss and bits per byte over a fixed list of batches (built once, reused every eval).

    Every process builds the whole global batches (validation is small) so it can count the bytes of all
    rows, and feeds only its own rows to the devices.
    """

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, eval_fn, mesh, rules, max_batches: int | None):
        from llama_jax.data import make_eval_batches

        batch_size = cfg.eval_batch_size or cfg.global_batch_size
        self._batches = list(make_eval_batches(cfg.data, tokenizer, seq_len=cfg.seq_len, batch_size=batch_size,
                                               max_batches=max_batches))
        self._rows = slice(jax.process_index() * batch_size // jax.process_count(),
                           (jax.process_index() + 1) * batch_size // jax.process_count())
        self._step, self._mesh, self._rules = eval_fn, mesh, rules

    def __call__(self, params) -> dict:
        nll = tokens = 0.0
        num_bytes = 0
        text = "num_bytes" in self._batches[0]  # else fine-tuning: the loss on held-out answers only
        for batch in self._batches:
            num_bytes += int(batch["num_bytes"].sum()) if text else 0
            local = {k: v[self._rows] for k, v in batch.items() if k != "num_bytes"}
            sums = jax.device_get(self._step(params, make_global_batch(local, self._mesh, self._rules)))
            nll += float(sums["nll_sum"])
            tokens += float(sums["tokens"])
        if not text:
            return {"loss": nll / max(tokens, 1.0), "tokens": int(tokens)}
        return {"loss": nll / max(tokens, 1.0), "bits_per_byte": nll / math.log(2) / max(num_bytes, 1),
                "tokens": int(tokens), "bytes": num_bytes}


def gzip_bits_per_byte(text: bytes) -> float:
    """What `gzip -9` achieves on `text`: the baseline a language model must beat."""
    return 8.0 * len(gzip.compress(text, compresslevel=9)) / max(len(text), 1)


class _Window:
    """Losses and timing since the last log line: mean loss, tokens/s, step time and MFU.

    The first step of an invocation includes compilation, so timing starts when it ends.
    """

    def __init__(self, cfg: TrainConfig):
        self._tokens_per_step = cfg.global_batch_size * cfg.seq_len
        self._peak = job_peak(jax.devices()[0], jax.device_count(), cfg.model.dtype, cfg.peak_flops_per_device)
        self._flops_per_token = cfg.model.flops_per_token(cfg.seq_len)
        self._losses, self._start, self._steps = [], None, 0

    def add(self, loss: float) -> bool:
        """Record a finished step; True for the invocation's first (compiling) step."""
        self._losses.append(loss)
        if self._start is None:
            self._start = time.perf_counter()
            return True
        self._steps += 1
        return False

    def mean_loss(self) -> float:
        return float(np.mean(self._losses))

    def throughput(self) -> dict:
        if not self._steps:
            return {}
        elapsed = time.perf_counter() - self._start
        tokens_per_s = self._steps * self._tokens_per_step / elapsed
        values = {"tokens_per_s": tokens_per_s, "step_time_s": elapsed / self._steps}
        if self._peak is not None:
            values[self._peak.key] = self._peak.mfu(self._flops_per_token * tokens_per_s)
        return values

    def exclude(self, seconds: float) -> None:
        """Leave time spent on something else (evaluation) out of the throughput."""
        if self._start is not None:
            self._start += seconds

    def reset(self) -> None:
        self._losses, self._start, self._steps = [], time.perf_counter(), 0


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then it saves and exits cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


class CheckpointsDamaged(ValueError):
    """No saved step of the run restores; the message lists each step tried and what was wrong with it."""


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _trained_init(cfg: TrainConfig):
    """What the optimizer trains, freshly initialised: the model's params, or with LoRA the adapters."""
    if cfg.lora.enabled:
        return init_adapters(cfg.model, cfg.lora, cfg.seed)
    return api.init_params(cfg.model)


def _restore_newest_intact(cfg: TrainConfig, ckpts: RunCheckpoints, shardings, optimizer, say):
    """(state, meta) of the newest step that passes its integrity record and restores with finite
    parameters, or None when the run has no step. A damaged step (or one without a record, which a job
    killed between orbax's commit and the record leaves) is set aside (one line says which file failed)
    and the previous one tried; a checkpoint of another model is a configuration error, not damage."""
    tried, abstract = [], None
    expected = ({p: s.shape for p, s in flatten(adapter_shapes(cfg.model, cfg.lora)).items()} if cfg.lora.enabled
                else api.flat_param_shapes(cfg.model))
    while (step := ckpts.latest_step()) is not None:
        where = ckpts.directory / str(step)
        unverified = not ckpts.record(step).is_file()
        problem = ckpts.damage(step)
        if problem is None:
            try:
                saved_shapes = ckpts.param_shapes(step)
            except Exception as e:  # noqa: BLE001  (orbax raises many types for unreadable metadata)
                problem = f"its metadata does not read ({_one_line(e)})"
        if problem is None:
            api.check_shapes(saved_shapes, expected, f"checkpoint {where}")
            if abstract is None:
                abstract = jax.eval_shape(lambda: init_train_state(_trained_init(cfg), optimizer))
            try:
                params, opt_state, meta = ckpts.restore(
                    step, abstract_with_shardings(abstract.params, shardings.params),
                    abstract_with_shardings(abstract.opt_state, shardings.opt_state))
                step_array = jax.device_put(jnp.asarray(meta["step"], jnp.int32), shardings.step)
            except CheckpointDamaged as e:
                problem = str(e)
            except Exception as e:  # noqa: BLE001
                problem = f"it does not restore ({_one_line(e)})"
            else:
                say(f"resuming from {where} (step {step})")
                return TrainState(step=step_array, params=params, opt_state=opt_state), meta
        state = "unverified" if unverified else "damaged"
        aside = ckpts.set_aside(step, "unverified" if unverified else "corrupt")
        tried.append(f"step {step}: {problem}")
        say(f"checkpoint step {step} is {state}: {problem}; moved to {aside}, trying the previous step")
    if tried:
        raise CheckpointsDamaged(f"no checkpoint in {ckpts.directory} restores (each was moved aside as "
                                 f"<step>.corrupt-<time> or <step>.unverified-<time>): " + "; ".join(tried))
    return None


def _lora_base(cfg: TrainConfig, mesh, rules, say):
    """The frozen base weights of a LoRA run (from `init_from`, sharded, read straight into lora.base_dtype
    if set: a bf16 base never exists in full precision on the devices)."""
    base = cfg.model.replace(param_dtype=cfg.lora.base_dtype) if cfg.lora.base_dtype else cfg.model
    _, params, _ = read_sharded(cfg.init_from, lambda _: api.param_shardings(base, mesh, rules), expected=base)
    say(f"LoRA: base weights from {cfg.init_from} (frozen), rank {cfg.lora.rank} adapters on {cfg.lora.targets}")
    return params


def _with_base(base, *fns):
    """LoRA's jitted steps take the frozen base as a third argument; the loop calls (trained, batch)."""
    return tuple(lambda trained, batch, fn=fn: fn(trained, batch, base) for fn in fns)


def _initial_state(cfg: TrainConfig, ckpts: RunCheckpoints, optimizer, shardings, mesh, rules,
                   say) -> tuple[TrainState, dict]:
    """(state, meta) from the newest intact checkpoint, else from `init_from`, else random; always sharded.
    With LoRA the state holds the adapters (fresh: B = 0, the base model) and `init_from` is the base."""
    restored = _restore_newest_intact(cfg, ckpts, shardings, optimizer, say)
    if restored is not None:
        return restored
    if cfg.lora.enabled:
        init = jax.jit(lambda: init_train_state(_trained_init(cfg), optimizer), out_shardings=shardings)
        with activate(mesh, rules):
            return init(), {}
    if cfg.init_from:
        _, params, _ = read_sharded(cfg.init_from, lambda _: shardings.params, expected=cfg.model)
        init = jax.jit(optimizer.init, out_shardings=shardings.opt_state)
        with activate(mesh, rules):
            opt_state = init(params)
        say(f"initialised weights from {cfg.init_from} (fresh optimizer, step 0)")
        step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
        return TrainState(step=step, params=params, opt_state=opt_state), {}
    return create_train_state(cfg.model, optimizer, mesh, rules, cfg.seed), {}


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) the training run `cfg.run_dir` up to `cfg.last_step`, holding its lock."""
    initialize(cfg.distributed)
    main = jax.process_index() == 0
    say = functools.partial(print, flush=True) if main else lambda *_: None
    run_dir = prepare_run_dir(cfg)
    with RunLock(run_dir, heartbeat_s=cfg.lock_heartbeat_s, stale_after_s=cfg.lock_stale_after_s, say=say):
        return _train_locked(cfg, run_dir, main, say)


def _train_locked(cfg: TrainConfig, run_dir: Path, main: bool, say) -> TrainResult:
    check_same_model(run_dir, cfg)
    # `cudnn` on a CPU fails here, before any data or compiling (the step builders resolve for their mesh)
    resolve_attention(cfg.model, platform_of(None), seq_len=cfg.seq_len)
    task_eval = TaskEval.prepare(cfg)  # bad tasks fail here, before anything compiles
    clock = time.perf_counter()
    tokenizer = load_run_tokenizer(cfg)
    say(f"tokenizer {tokenizer.path} (vocab {tokenizer.vocab_size}) ready in {time.perf_counter() - clock:.1f} s")
    if main:
        write_run_files(run_dir, cfg, tokenizer)

    from llama_jax.data import make_train_iterator

    clock = time.perf_counter()
    data = make_train_iterator(cfg.data, tokenizer, seq_len=cfg.seq_len, global_batch_size=cfg.global_batch_size,
                               process_index=jax.process_index(), process_count=jax.process_count())
    say(f"training data ready in {time.perf_counter() - clock:.1f} s")
    mesh = make_mesh(cfg.mesh)
    rules = rules_for(cfg.mesh.strategy)
    optimizer = make_optimizer(cfg.optimizer, cfg.steps)
    schedule = lr_schedule(cfg.optimizer, cfg.steps)
    ckpts = RunCheckpoints(run_dir, keep=cfg.keep_checkpoints, keep_period=cfg.keep_period,
                           async_save=cfg.async_checkpointing)
    say(f"model {api.param_count(cfg.model) / 1e6:,.1f} M parameters, mesh {dict(mesh.shape)} ({cfg.mesh.strategy}), "
        f"{cfg.steps} steps of {cfg.global_batch_size} × {cfg.seq_len} tokens, run_dir {run_dir}")

    start_time = time.perf_counter()
    lora = cfg.lora if cfg.lora.enabled else None
    shardings = train_state_shardings(cfg.model, optimizer, mesh, rules, lora)
    state, meta = _initial_state(cfg, ckpts, optimizer, shardings, mesh, rules, say)
    spikes = SpikeDetector(cfg.spikes)
    if "data" in meta:
        data.set_state(meta["data"])
    if "spikes" in meta:
        spikes.set_state(meta["spikes"])
    first = int(meta.get("step", 0))
    progress = Progress(enabled=main, mode=cfg.progress, start=first, total=cfg.last_step)
    log = MetricsLog(run_dir, enabled=main, resume_step=first, say=say)
    step_fn = jit_train_step(cfg.model, optimizer, mesh, rules, schedule=schedule,
                                      micro_batches=cfg.micro_batches, lora=lora, seed=cfg.seed)
    eval_fn = jit_eval_step(cfg.model, mesh, rules, lora=lora)
    if lora is not None:  # the frozen base is an argument of every step, never part of the state
        step_fn, eval_fn = _with_base(_lora_base(cfg, mesh, rules, say), step_fn, eval_fn)
    evaluator = None
    if cfg.eval_every:
        evaluator = Evaluator(cfg, tokenizer, eval_fn, mesh, rules, cfg.eval_batches or None)
    if task_eval:
        task_eval.bind(cfg, tokenizer, mesh, rules)

    profiler = StepProfiler(run_dir / "profile", cfg.profile_start_step, cfg.profile_steps)
    window = _Window(cfg)
    result = TrainResult(first_step=first + 1, last_step=first)
    last_saved = first if ckpts.latest_step() == first and first else None
    preemption = _Preemption()

    def next_batch():
        """The next global batch on the devices, and the data position after it (what a checkpoint of
        the step that consumes it must record: the following batch is fetched before that save)."""
        batch = make_global_batch(next(data), mesh, rules)
        return batch, data.get_state()

    def timed(evaluate, params):
        """`evaluate(params)`, its time left out of the throughput."""
        eval_start = time.perf_counter()
        values = evaluate(params)
        window.exclude(time.perf_counter() - eval_start)
        return values

    def save(step: int) -> None:
        nonlocal last_saved
        if last_saved == step:
            return
        meta = {"step": step, "data": data_position, "seed": cfg.seed, "spikes": spikes.get_state()}
        if cfg.lora.enabled:  # the checkpoint holds only the adapters: say what they adapt
            meta["lora_base"] = cfg.init_from
        ckpts.save(step, state.params, state.opt_state, meta)
        last_saved = step

    def roll_back(spike: Spike) -> TrainState:
        """PaLM's remedy: restore the newest checkpoint from before the spike and continue on the data after
        the spike's last batch (the batches since that checkpoint are skipped); log it as an event."""
        nonlocal last_saved
        ckpts.wait()
        if len(rollbacks) >= cfg.spikes.max_rollbacks or not any(s < spike.first_step for s in ckpts.steps()):
            raise TrainingDiverged(
                f"step {spike.step}: {describe_spike(spike, cfg.spikes)}, and "
                + (f"spikes.max_rollbacks={cfg.spikes.max_rollbacks} rollbacks were already made" if rollbacks
                   else f"no checkpoint from before step {spike.first_step} is left in {ckpts.directory} to roll back to")
                + "; stopping (lower optimizer.peak_lr or check the data)")
        for bad in [s for s in ckpts.steps() if s >= spike.first_step]:
            say(f"checkpoint step {bad} was saved during the spike; moved to {ckpts.set_aside(bad, 'spike')}")
        restored, meta = _restore_newest_intact(cfg, ckpts, shardings, optimizer, say)
        good = int(meta["step"])
        skipped = [meta["data"]["batch"], data_position["batch"] - 1]  # data_position: after the spike's last batch
        data.set_state(data_position)
        spikes.set_state(meta.get("spikes", {"recent": [], "streak": []}))
        rollbacks.append(spike)
        del result.losses[max(0, good - first):]
        result.first_step, result.last_step = min(result.first_step, good + 1), good
        last_saved = good
        window.reset()
        log.rewind(good)
        event = {"detected_at_step": spike.step, "first_anomalous_step": spike.first_step, "loss": spike.loss,
                 "loss_mean": spike.loss_mean, "grad_norm": spike.grad_norm, "grad_norm_mean": spike.grad_norm_mean,
                 "rolled_back_to_step": good, "skipped_batches": skipped}
        log.write(good, "spike", event)
        progress.message(f"step {spike.step}: {describe_spike(spike, cfg.spikes)}; rolled back to step {good}, "
                         f"skipping data batches {skipped[0]}–{skipped[1]} (rollback {len(rollbacks)} of at most "
                         f"{cfg.spikes.max_rollbacks})")
        return restored

    rollbacks: list[Spike] = []
    try:
        step = first
        upcoming = next_batch() if first < cfg.last_step else None
        while step < cfg.last_step:
            step += 1
            profiler.step_starting(step)
            batch, data_position = upcoming
            state, metrics = step_fn(state, batch)  # dispatched: the devices work while the host fetches
            upcoming = next_batch() if step < cfg.last_step else None
            metrics = jax.device_get(metrics)
            profiler.step_finished(step)
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                ckpts.wait()
                good = ckpts.latest_step()
                raise TrainingDiverged(
                    f"step {step}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite; stopping. The last good checkpoint "
                    f"is {'step ' + str(good) + ' in ' + str(ckpts.directory) if good is not None else 'none'} "
                    f"(lower optimizer.peak_lr or check the data, then restart to resume from it)")
            spike = spikes.observe(step, loss, grad_norm)
            if spike is not None:
                state = roll_back(spike)
                step = result.last_step
                upcoming = next_batch()  # the batch after the spike's last one
                continue
            result.losses.append(loss)
            result.last_step = step
            if window.add(loss):
                progress.message(f"compiled and ran step {step} in {time.perf_counter() - start_time:.1f} s")
            log_now = step % cfg.log_every == 0 or step == cfg.last_step
            values = {"loss": window.mean_loss(), "lr": float(metrics["lr"]), "grad_norm": grad_norm,
                      "target_share": float(metrics["target_share"])}
            if log_now:
                values.update(window.throughput())
                log.write(step, "train", values)
                window.reset()
            progress.update(step, values, log=log_now)
            if evaluator and step % cfg.eval_every == 0 and step != cfg.last_step:
                val = timed(evaluator, state.params)
                log.write(step, "eval", val)
                progress.message(f"step {step} validation | {format_values(val)}")
            if task_eval and task_eval.due(step):
                for task, values in timed(task_eval, state.params).items():
                    log.write(step, f"eval/{task}", values)
                    progress.message(f"step {step} eval/{task} | {format_values(values)}")
            if step % cfg.checkpoint_every == 0 or step == cfg.last_step:
                save(step)
            if preemption.requested:
                save(step)
                ckpts.wait()  # durable and recorded before the line says so
                result.status = "preempted"
                progress.message(f"SIGTERM: saved step {step}, exiting")
                break
        else:
            result.status = "completed" if cfg.last_step == cfg.steps else "stopped"
        if result.status == "completed" and cfg.final_eval:
            if evaluator is None or cfg.eval_batches:  # the periodic one covers only part of the split
                evaluator = Evaluator(cfg, tokenizer, eval_fn, mesh, rules, None)
            result.validation = final_validation(cfg, evaluator, state.params)
            log.write(cfg.last_step, "final_eval", result.validation)
            v = result.validation
            if cfg.data.is_chat:
                progress.message(f"validation ({v['tokens']:,} answer tokens): loss {v['loss']:.4f}")
            else:
                progress.message(f"validation ({v['bytes']:,} bytes, {v['tokens']:,} tokens): loss {v['loss']:.4f} | "
                                 f"{v['bits_per_byte']:.4f} bits/byte | gzip -9: {v['gzip9_bits_per_byte']:.4f} bits/byte")
        ckpts.wait()
    finally:
        profiler.close()
        preemption.restore()
        progress.close()
        log.close()
        ckpts.close()
    return result


def final_validation(cfg: TrainConfig, evaluator: Evaluator, params) -> dict:
    """A full pass over the validation split, next to gzip -9 on the same text."""
    from llama_jax.data import validation_text

    values = evaluator(params)
    if cfg.data.is_chat:  # held-out conversations: no text to compress
        return values
    values["gzip9_bits_per_byte"] = gzip_bits_per_byte(validation_text(cfg.data))
    return values
