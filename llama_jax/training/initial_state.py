"""Where a run's state comes from, always created or read straight into its shards on the run's mesh.

In order: the run's newest checkpoint that passes its integrity record and restores (params, optimizer
state, step and data-iterator position: the run continues exactly where it stopped; a damaged step is set
aside and the one before it tried); else `init_from` (weights only: fresh optimizer, step 0); else random
initialisation. With LoRA the state holds the adapters (fresh: B = 0, the base model) and `init_from` is
the frozen base, read by `lora_base`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.checkpoint.integrity import CheckpointDamaged
from llama_jax.checkpoint.run import RunCheckpoints, abstract_with_shardings
from llama_jax.convert.sharded_read import read_sharded
from llama_jax.model import api
from llama_jax.model.lora import adapter_shapes, init_adapters
from llama_jax.parallel.mesh import activate
from llama_jax.training.config import TrainConfig
from llama_jax.training.step import TrainState, create_train_state, init_train_state
from llama_jax.utils.trees import flatten


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


def restore_newest_intact(cfg: TrainConfig, ckpts: RunCheckpoints, shardings, optimizer, say):
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


def initial_state(cfg: TrainConfig, ckpts: RunCheckpoints, optimizer, shardings, mesh, rules,
                  say) -> tuple[TrainState, dict]:
    """(state, meta) from the newest intact checkpoint, else from `init_from`, else random; always sharded.
    `meta` is the checkpoint's (step, data position, spike history), empty for a new run."""
    restored = restore_newest_intact(cfg, ckpts, shardings, optimizer, say)
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


def lora_base(cfg: TrainConfig, mesh, rules, say):
    """The frozen base weights of a LoRA run (from `init_from`, sharded, read straight into lora.base_dtype
    if set: a bf16 base never exists in full precision on the devices)."""
    base = cfg.model.replace(param_dtype=cfg.lora.base_dtype) if cfg.lora.base_dtype else cfg.model
    _, params, _ = read_sharded(cfg.init_from, lambda _: api.param_shardings(base, mesh, rules), expected=base)
    say(f"LoRA: base weights from {cfg.init_from} (frozen), rank {cfg.lora.rank} adapters on {cfg.lora.targets}")
    return params
