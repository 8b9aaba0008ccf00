"""The Trainer: one invocation of a training run, its state held as attributes, its phases as methods.

    Trainer(cfg, run_dir, main, say)
        set_up()     the attention implementation, evaluation tasks, tokenizer, data, mesh, optimizer,
                     checkpoint manager: what can fail on bad input, checked before anything compiles
        restore()    the state: newest intact checkpoint, else `init_from`, else random (`initial_state`)
        build()      the jitted train and eval steps, the evaluators, metrics, profiler, SIGTERM handler
    run()            `step()` until `cfg.last_step`, then the final evaluation; `close()` at the end
        step()       one update: the next batch to `training.step.train_step` (jitted), the loss checked,
                     recorded, `evaluate()` and `save()` on schedule; a loss spike calls `roll_back()`

Each step feeds this process's rows of the global batch to the jitted step, and the next batch is read
and placed on the devices while they run it. The loss and gradient norm are checked every step, so a
non-finite value stops the run before any bad state is saved; with `spikes` configured a loss spike
rolls the run back to the last checkpoint before it and skips the data since (`training.spikes`).
Checkpoints are saved asynchronously every `checkpoint_every` steps, at the end, and when SIGTERM
(preemption) arrives; metrics go to the terminal, `metrics.jsonl` and TensorBoard (process 0 only).
"""
from __future__ import annotations

import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import yaml

from llama_jax.checkpoint.run import RunCheckpoints
from llama_jax.convert import companions
from llama_jax.data.tokenizer import Tokenizer, builtin_tokenizer, check_vocab_size, load_tokenizer
from llama_jax.model import api
from llama_jax.model.attention import resolve_attention
from llama_jax.parallel.mesh import make_global_batch, make_mesh
from llama_jax.parallel.platform import platform_of
from llama_jax.parallel.rules import rules_for
from llama_jax.training.config import TrainConfig
from llama_jax.training.initial_state import initial_state, lora_base, restore_newest_intact
from llama_jax.training.metrics import MetricsLog, Progress, Window, format_values
from llama_jax.training.step import lr_schedule, make_optimizer, jit_eval_step, jit_train_step, train_state_shardings
from llama_jax.training.profiling import StepProfiler
from llama_jax.training.spikes import Spike, SpikeDetector, describe_spike
from llama_jax.training.task_eval import TaskEval
from llama_jax.training.validation import Evaluator, final_validation
from llama_jax.utils.config_io import to_dict


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


class _Preemption:
    """Turns SIGTERM into a flag the trainer checks after each step (then it saves and exits cleanly)."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _with_base(base, *fns):
    """LoRA's jitted steps take the frozen base as a third argument; the trainer calls (trained, batch)."""
    return tuple(lambda trained, batch, fn=fn: fn(trained, batch, base) for fn in fns)


class Trainer:
    """One invocation of the run in `run_dir` (the caller holds its lock): construction sets up, restores
    and builds everything, so bad input fails before training starts; `run()` trains and closes."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, main: bool, say):
        self.cfg, self.run_dir, self.main, self.say = cfg, run_dir, main, say
        self.lora = cfg.lora if cfg.lora.enabled else None
        self.set_up()
        self.restore()
        self.build()

    def set_up(self) -> None:
        """What the state does not depend on, checked first: attention, tasks, tokenizer, data, then the
        mesh, optimizer and checkpoint manager."""
        cfg, say = self.cfg, self.say
        # `cudnn` on a CPU fails here, before any data or compiling (the step builders resolve for their mesh)
        resolve_attention(cfg.model, platform_of(None), seq_len=cfg.seq_len)
        self.task_eval = TaskEval.prepare(cfg)  # bad tasks fail here, before anything compiles
        clock = time.perf_counter()
        self.tokenizer = load_run_tokenizer(cfg)
        say(f"tokenizer {self.tokenizer.path} (vocab {self.tokenizer.vocab_size}) ready in "
            f"{time.perf_counter() - clock:.1f} s")
        if self.main:
            write_run_files(self.run_dir, cfg, self.tokenizer)

        from llama_jax.data import make_train_iterator

        clock = time.perf_counter()
        self.data = make_train_iterator(cfg.data, self.tokenizer, seq_len=cfg.seq_len,
                                        global_batch_size=cfg.global_batch_size,
                                        process_index=jax.process_index(), process_count=jax.process_count())
        say(f"training data ready in {time.perf_counter() - clock:.1f} s")
        self.mesh = make_mesh(cfg.mesh)
        self.rules = rules_for(cfg.mesh.strategy)
        self.optimizer = make_optimizer(cfg.optimizer, cfg.steps)
        self.ckpts = RunCheckpoints(self.run_dir, keep=cfg.keep_checkpoints, keep_period=cfg.keep_period,
                                    async_save=cfg.async_checkpointing)
        say(f"model {api.param_count(cfg.model) / 1e6:,.1f} M parameters, mesh {dict(self.mesh.shape)} "
            f"({cfg.mesh.strategy}), {cfg.steps} steps of {cfg.global_batch_size} × {cfg.seq_len} tokens, "
            f"run_dir {self.run_dir}")

    def restore(self) -> None:
        """The state, in its shards, with the data position and spike history saved beside it; `step_number`
        is the step it holds (0 for a new run)."""
        cfg = self.cfg
        self.started = time.perf_counter()  # "compiled and ran step N in ..." counts from here
        self.shardings = train_state_shardings(cfg.model, self.optimizer, self.mesh, self.rules, self.lora)
        self.state, meta = initial_state(cfg, self.ckpts, self.optimizer, self.shardings, self.mesh, self.rules,
                                         self.say)
        self.spikes = SpikeDetector(cfg.spikes)
        if "data" in meta:
            self.data.set_state(meta["data"])
        if "spikes" in meta:
            self.spikes.set_state(meta["spikes"])
        self.first = self.step_number = int(meta.get("step", 0))

    def build(self) -> None:
        """The jitted train and eval steps (with LoRA bound to the frozen base, never part of the state),
        the evaluators, where the numbers go, and the SIGTERM handler."""
        cfg, first = self.cfg, self.first
        self.progress = Progress(enabled=self.main, mode=cfg.progress, start=first, total=cfg.last_step)
        self.log = MetricsLog(self.run_dir, enabled=self.main, resume_step=first, say=self.say)
        self.step_fn = jit_train_step(cfg.model, self.optimizer, self.mesh, self.rules,
                                      schedule=lr_schedule(cfg.optimizer, cfg.steps),
                                      micro_batches=cfg.micro_batches, lora=self.lora, seed=cfg.seed)
        self.eval_fn = jit_eval_step(cfg.model, self.mesh, self.rules, lora=self.lora)
        if self.lora is not None:
            base = lora_base(cfg, self.mesh, self.rules, self.say)
            self.step_fn, self.eval_fn = _with_base(base, self.step_fn, self.eval_fn)
        self.evaluator = None
        if cfg.eval_every:
            self.evaluator = Evaluator(cfg, self.tokenizer, self.eval_fn, self.mesh, self.rules,
                                       cfg.eval_batches or None)
        if self.task_eval:
            self.task_eval.bind(cfg, self.tokenizer, self.mesh, self.rules)
        self.profiler = StepProfiler(self.run_dir / "profile", cfg.profile_start_step, cfg.profile_steps)
        self.window = Window(cfg)
        self.result = TrainResult(first_step=first + 1, last_step=first)
        self.last_saved = first if self.ckpts.latest_step() == first and first else None
        self.rollbacks: list[Spike] = []
        self.upcoming = self.data_position = None
        self.preemption = _Preemption()

    def run(self) -> TrainResult:
        """Train up to `cfg.last_step` (stopping early, saved, on SIGTERM), then the final evaluation."""
        cfg, result = self.cfg, self.result
        try:
            self.upcoming = self._next_batch() if self.step_number < cfg.last_step else None
            while self.step_number < cfg.last_step:
                if self.step() and self.preemption.requested:
                    self.save(self.step_number)
                    self.ckpts.wait()  # durable and recorded before the line says so
                    result.status = "preempted"
                    self.progress.message(f"SIGTERM: saved step {self.step_number}, exiting")
                    break
            else:
                result.status = "completed" if cfg.last_step == cfg.steps else "stopped"
            if result.status == "completed" and cfg.final_eval:
                self.final_evaluation()
            self.ckpts.wait()
        finally:
            self.close()
        return result

    def _next_batch(self):
        """The next global batch on the devices, and the data position after it (what a checkpoint of
        the step that consumes it must record: the following batch is fetched before that save)."""
        batch = make_global_batch(next(self.data), self.mesh, self.rules)
        return batch, self.data.get_state()

    def step(self) -> bool:
        """Run step `step_number + 1`; True once it counts (recorded, evaluated and saved on schedule),
        False when it completed a loss spike and the run was rolled back."""
        cfg, step = self.cfg, self.step_number + 1
        self.profiler.step_starting(step)
        batch, self.data_position = self.upcoming
        self.state, metrics = self.step_fn(self.state, batch)  # dispatched: the devices work, the host fetches
        self.upcoming = self._next_batch() if step < cfg.last_step else None
        metrics = jax.device_get(metrics)
        self.profiler.step_finished(step)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        self._stop_if_diverged(step, loss, grad_norm)
        spike = self.spikes.observe(step, loss, grad_norm)
        if spike is not None:
            self.roll_back(spike)
            return False
        self.step_number = step
        self._report(step, metrics, loss, grad_norm)
        self.evaluate(step)
        if step % cfg.checkpoint_every == 0 or step == cfg.last_step:
            self.save(step)
        return True

    def _stop_if_diverged(self, step: int, loss: float, grad_norm: float) -> None:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        self.ckpts.wait()
        good = self.ckpts.latest_step()
        last_good = f"step {good} in {self.ckpts.directory}" if good is not None else "none"
        raise TrainingDiverged(
            f"step {step}: the loss ({loss}) or gradient norm ({grad_norm}) is not finite; stopping. The last good "
            f"checkpoint is {last_good} (lower optimizer.peak_lr or check the data, then restart to resume from it)")

    def _report(self, step: int, metrics: dict, loss: float, grad_norm: float) -> None:
        """Record the step's loss; every `log_every` steps and at the last, a metrics record and a line."""
        cfg, window = self.cfg, self.window
        self.result.losses.append(loss)
        self.result.last_step = step
        if window.add(loss):
            self.progress.message(f"compiled and ran step {step} in {time.perf_counter() - self.started:.1f} s")
        log_now = step % cfg.log_every == 0 or step == cfg.last_step
        values = {"loss": window.mean_loss(), "lr": float(metrics["lr"]), "grad_norm": grad_norm,
                  "target_share": float(metrics["target_share"])}
        if log_now:
            values.update(window.throughput())
            self.log.write(step, "train", values)
            window.reset()
        self.progress.update(step, values, log=log_now)

    def evaluate(self, step: int) -> None:
        """Validation every `eval_every` steps (the final evaluation covers the last) and the tasks when due."""
        cfg = self.cfg
        if self.evaluator and step % cfg.eval_every == 0 and step != cfg.last_step:
            val = self._timed(self.evaluator)
            self.log.write(step, "eval", val)
            self.progress.message(f"step {step} validation | {format_values(val)}")
        if self.task_eval and self.task_eval.due(step):
            for task, values in self._timed(self.task_eval).items():
                self.log.write(step, f"eval/{task}", values)
                self.progress.message(f"step {step} eval/{task} | {format_values(values)}")

    def _timed(self, evaluate):
        """`evaluate(params)`, its time left out of the throughput."""
        eval_start = time.perf_counter()
        values = evaluate(self.state.params)
        self.window.exclude(time.perf_counter() - eval_start)
        return values

    def final_evaluation(self) -> None:
        """A full pass over the validation split (next to gzip -9 on the same text, for text data)."""
        cfg = self.cfg
        if self.evaluator is None or cfg.eval_batches:  # the periodic one covers only part of the split
            self.evaluator = Evaluator(cfg, self.tokenizer, self.eval_fn, self.mesh, self.rules, None)
        v = self.result.validation = final_validation(cfg, self.evaluator, self.state.params)
        self.log.write(cfg.last_step, "final_eval", v)
        if cfg.data.is_chat:
            self.progress.message(f"validation ({v['tokens']:,} answer tokens): loss {v['loss']:.4f}")
        else:
            self.progress.message(f"validation ({v['bytes']:,} bytes, {v['tokens']:,} tokens): loss {v['loss']:.4f}"
                                  f" | {v['bits_per_byte']:.4f} bits/byte"
                                  f" | gzip -9: {v['gzip9_bits_per_byte']:.4f} bits/byte")

    def save(self, step: int) -> None:
        """Checkpoint `step` (asynchronously) with the data position after its batch, unless already saved."""
        if self.last_saved == step:
            return
        meta = {"step": step, "data": self.data_position, "seed": self.cfg.seed, "spikes": self.spikes.get_state()}
        if self.lora is not None:  # the checkpoint holds only the adapters: say what they adapt
            meta["lora_base"] = self.cfg.init_from
        self.ckpts.save(step, self.state.params, self.state.opt_state, meta)
        self.last_saved = step

    def roll_back(self, spike: Spike) -> None:
        """PaLM's remedy: restore the newest checkpoint from before the spike and continue on the data after
        the spike's last batch (the batches since that checkpoint are skipped); log it as an event."""
        self.ckpts.wait()
        self._check_can_roll_back(spike)
        for bad in [s for s in self.ckpts.steps() if s >= spike.first_step]:
            aside = self.ckpts.set_aside(bad, "spike")
            self.say(f"checkpoint step {bad} was saved during the spike; moved to {aside}")
        self.state, meta = restore_newest_intact(self.cfg, self.ckpts, self.shardings, self.optimizer, self.say)
        good = int(meta["step"])
        skipped = [meta["data"]["batch"], self.data_position["batch"] - 1]  # position: after the spike's last batch
        self.data.set_state(self.data_position)
        self.spikes.set_state(meta.get("spikes", {"recent": [], "streak": []}))
        self.rollbacks.append(spike)
        del self.result.losses[max(0, good - self.first):]
        self.result.first_step, self.result.last_step = min(self.result.first_step, good + 1), good
        self.step_number = self.last_saved = good
        self.window.reset()
        self.log.rewind(good)
        event = {"detected_at_step": spike.step, "first_anomalous_step": spike.first_step, "loss": spike.loss,
                 "loss_mean": spike.loss_mean, "grad_norm": spike.grad_norm, "grad_norm_mean": spike.grad_norm_mean,
                 "rolled_back_to_step": good, "skipped_batches": skipped}
        self.log.write(good, "spike", event)
        self.progress.message(f"step {spike.step}: {describe_spike(spike, self.cfg.spikes)}; rolled back to step "
                              f"{good}, skipping data batches {skipped[0]}–{skipped[1]} (rollback "
                              f"{len(self.rollbacks)} of at most {self.cfg.spikes.max_rollbacks})")
        self.upcoming = self._next_batch()  # the batch after the spike's last one

    def _check_can_roll_back(self, spike: Spike) -> None:
        """A spike with no rollback left, or no checkpoint from before it, ends the run as diverged."""
        limit = self.cfg.spikes.max_rollbacks
        if len(self.rollbacks) < limit and any(s < spike.first_step for s in self.ckpts.steps()):
            return
        why = (f"spikes.max_rollbacks={limit} rollbacks were already made" if self.rollbacks else
               f"no checkpoint from before step {spike.first_step} is left in {self.ckpts.directory} to roll back to")
        raise TrainingDiverged(f"step {spike.step}: {describe_spike(spike, self.cfg.spikes)}, and {why}; stopping "
                               f"(lower optimizer.peak_lr or check the data)")

    def close(self) -> None:
        """Stop the profiler, give SIGTERM back, close the progress bar, metrics log and checkpoint manager."""
        self.profiler.close()
        self.preemption.restore()
        self.progress.close()
        self.log.close()
        self.ckpts.close()
