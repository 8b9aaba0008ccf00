"""The whole training update against PyTorch: Hugging Face's LlamaForCausalLM (fp32) trained by
`torch.optim.AdamW` with the LLaMA paper's constants written out here (β 0.9/0.95, ε 1e-8, weight decay
0.1 on matrices only, `clip_grad_norm_` at 1.0, linear warm-up then cosine to 10 % of the peak), against
our step as `train.py` builds it from configs/train/default.yaml: gradients, losses, learning rates,
parameters and Adam moments after every step.

Tensors are compared by their relative Frobenius error, ‖ours − torch‖ / ‖torch‖, per tensor (our
layout; the HF tensors go through the library's own HF → ours mapping, a transpose per matrix, so the
same mapping serves weights, gradients and moments).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from llama_jax.model.params import params_from_torch, tensor_maps, to_torch_layout, torch_name
from llama_jax.parallel.mesh import make_mesh
from llama_jax.parallel.rules import rules_for
from llama_jax.training.config import DEFAULT_TRAIN_CONFIG, load_train_config
from llama_jax.training.step import (OptimizerConfig, lr_schedule, make_optimizer, batch_nll, init_train_state,
                                     jit_train_step, train_state_shardings)
from llama_jax.utils.trees import get_path
from oracle import hf_model

# The LLaMA paper's optimiser (Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models",
# §2.2); that paper gives no ε: 1e-8 as docs/training.md states (PyTorch's and optax's default).
BETAS, EPS, WEIGHT_DECAY, CLIP_NORM, FINAL_LR_RATIO = (0.9, 0.95), 1e-8, 0.1, 1.0, 0.1

STEPS, WARMUP, PEAK_LR = 7, 2, 3e-2
ROWS, SEQ = 4, 16
GRAD_TOL = 1e-5  # relative Frobenius error per gradient tensor (observed 5e-7)
# The same for the parameters and Adam's moments after each step (observed ≤ 2.3e-6 and ≤ 2.1e-6). Each step
# starts torch from our state, so every update is compared alone: left to run apart, the two trajectories'
# fp32 rounding differences compound (6e-6 by step 7, Adam dividing near-zero gradients by their own RMS).
PARAM_TOL = MOMENT_TOL = 1e-5


def paper_lr(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to `peak` over `warmup` steps, then half a cosine down to 10 % of `peak` at
    `total`, constant after."""
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    return peak * (FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def assert_trees_close(ours, ref, tol, what):
    errors = {jax.tree_util.keystr(path): rel_err(a, b)
              for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(ref))}
    assert jax.tree.structure(ours) == jax.tree.structure(ref)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{what}: {worst} relative error {errors[worst]:.2e} > {tol:.0e}"


def to_ours(named_tensors: dict, cfg):
    """Tensors named as HF's parameters (weights, gradients or moments) as our parameter tree, copied
    (never sharing memory with torch's tensors, which its optimizer updates in place)."""
    return params_from_torch(lambda name: named_tensors[name].detach().numpy().copy(), cfg, "hf")


def to_hf(tree: dict, cfg) -> dict:
    """Our parameter-shaped tree (weights or moments) as {HF parameter name: array}: to_ours' inverse."""
    named = {}
    for tmap in tensor_maps(cfg):
        value = np.asarray(get_path(tree, tmap.ours))
        for i in range(cfg.n_layers) if tmap.per_layer else [None]:
            named[torch_name(tmap, "hf", i)] = to_torch_layout(value if i is None else value[i], tmap, cfg, "hf")
    return named


def batches(cfg, n, seed=0, target=None):
    """`n` batches of random tokens, or with `target` random inputs all followed by that token (learnt
    within a few steps, so the gradient norm falls); the loss masks drop ~25 % of the targets, unevenly
    across rows."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        tokens = rng.integers(0, cfg.vocab_size, (ROWS, SEQ + 1))
        targets = tokens[:, 1:] if target is None else np.full((ROWS, SEQ), target)
        mask = (rng.random((ROWS, SEQ)) > 0.25).astype(np.float32)
        yield {"inputs": tokens[:, :-1], "targets": targets, "loss_mask": mask}


def torch_loss(hf, batch):
    """Mean next-token NLL over the masked-in targets."""
    logits = hf(torch.as_tensor(batch["inputs"])).logits
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.as_tensor(batch["targets"]).flatten(),
                                            reduction="none")
    mask = torch.as_tensor(batch["loss_mask"]).flatten()
    return (nll * mask).sum() / mask.sum()


def adam_moments(opt_state):
    (adam,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    return adam


@pytest.fixture(scope="module")
def train_cfg(tiny_config):
    """configs/train/default.yaml (what `python train.py` runs) with the tiny model and a 7-step run
    (2 warm-up steps, peak lr 3e-2), in micro-batches of 2 rows."""
    cfg = load_train_config(overrides=[f"steps={STEPS}", f"optimizer.warmup_steps={WARMUP}",
                                       f"optimizer.peak_lr={PEAK_LR}", f"global_batch_size={ROWS}",
                                       f"seq_len={SEQ}", "micro_batches=2"])
    return dataclasses.replace(cfg, model=tiny_config)


def test_gradients_equal_torch_autograd(tiny_config):
    """Every parameter's gradient of the mean masked loss equals HF's under torch autograd."""
    hf = hf_model(tiny_config, seed=3)
    batch = next(batches(tiny_config, 1, seed=4))
    torch_loss(hf, batch).backward()
    expected = to_ours({name: p.grad for name, p in hf.named_parameters()}, tiny_config)

    def mean_loss(params):
        nll, tokens = batch_nll(tiny_config, params, jax.tree.map(jnp.asarray, batch))
        return nll / tokens

    params = to_ours(dict(hf.named_parameters()), tiny_config)
    assert_trees_close(jax.jit(jax.grad(mean_loss))(params), expected, GRAD_TOL, "gradient")


def test_schedule_equals_the_paper_formula(train_cfg):
    """lr at step 0 (0), through warm-up, its end (peak), the cosine, the last step (10 % of peak) and after."""
    schedule = lr_schedule(train_cfg.optimizer, train_cfg.steps)
    for step in range(STEPS + 3):
        assert float(schedule(step)) == pytest.approx(paper_lr(step, PEAK_LR, WARMUP, STEPS), rel=1e-6, abs=1e-12)
    assert float(schedule(STEPS)) == pytest.approx(FINAL_LR_RATIO * PEAK_LR, rel=1e-6)


def test_default_configs_carry_the_paper_constants():
    """The dataclass defaults (what a YAML that omits a key gets) and every pretraining YAML."""
    constants = lambda o: (o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm, o.min_lr_ratio)  # noqa: E731
    paper = (*BETAS, EPS, WEIGHT_DECAY, CLIP_NORM, FINAL_LR_RATIO)
    assert constants(OptimizerConfig()) == paper
    for name in ("default", "llama1-7b", "llama1-13b", "llama1-33b", "llama1-65b"):
        path = DEFAULT_TRAIN_CONFIG.parent / f"{name}.yaml"
        assert constants(load_train_config(path).optimizer) == paper, name


def test_training_steps_equal_torch_adamw(train_cfg):
    """Seven steps from the same weights on the same batches: loss, gradient norm and lr of every step, then
    the parameters and Adam's first and second moments after it. The steps cover warm-up (lr 0 at step 0)
    and the cosine, and gradient norms both above the clip (clipped) and below it (untouched)."""
    cfg = train_cfg.model
    hf = hf_model(cfg, seed=5)
    named = dict(hf.named_parameters())
    decay = [p for p in named.values() if p.ndim >= 2]  # matrices, embeddings included; not the norm scales
    no_decay = [p for p in named.values() if p.ndim < 2]
    assert len(no_decay) == 2 * cfg.n_layers + 1
    torch_opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=PEAK_LR, betas=BETAS, eps=EPS, foreach=False)
    torch_sched = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda t: paper_lr(t, 1.0, WARMUP, STEPS))

    # Ours, built exactly as the Trainer builds it from the run config.
    optimizer = make_optimizer(train_cfg.optimizer, train_cfg.steps)
    mesh, rules = make_mesh(train_cfg.mesh), rules_for(train_cfg.mesh.strategy)
    step_fn = jit_train_step(cfg, optimizer, mesh, rules,
                             schedule=lr_schedule(train_cfg.optimizer, train_cfg.steps),
                             micro_batches=train_cfg.micro_batches, donate=False)
    # placed as the step's outputs are, so that the second step reuses the first one's program
    state = jax.device_put(init_train_state(to_ours(named, cfg), optimizer),
                           train_state_shardings(cfg, optimizer, mesh, rules))

    norms = []
    for step, batch in enumerate(batches(cfg, STEPS, seed=6, target=7)):
        torch_opt.zero_grad()
        loss = torch_loss(hf, batch)
        loss.backward()
        loss = loss.item()
        norm = float(torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP_NORM))
        lr = torch_opt.param_groups[0]["lr"]
        torch_opt.step()
        torch_sched.step()

        state, metrics = step_fn(state, jax.tree.map(jnp.asarray, batch))
        assert float(metrics["loss"]) == pytest.approx(loss, rel=1e-6, abs=1e-6), step
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-5), step
        assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6, abs=1e-12), step
        norms.append(norm)

        adam = adam_moments(state.opt_state)
        assert int(adam.count) == step + 1
        assert_trees_close(state.params, to_ours(named, cfg), PARAM_TOL, f"step {step} parameters")
        for ours, key in ((adam.mu, "exp_avg"), (adam.nu, "exp_avg_sq")):
            theirs = to_ours({name: torch_opt.state[p][key] for name, p in named.items()}, cfg)
            assert_trees_close(ours, theirs, MOMENT_TOL, f"step {step} {key}")
        with torch.no_grad():  # the next step starts both from our state (see PARAM_TOL)
            for tree, key in ((state.params, None), (adam.mu, "exp_avg"), (adam.nu, "exp_avg_sq")):
                for name, value in to_hf(jax.device_get(tree), cfg).items():
                    target = named[name] if key is None else torch_opt.state[named[name]][key]
                    target.copy_(torch.from_numpy(np.array(value)))  # a writable copy

    assert min(norms) < CLIP_NORM < max(norms), norms  # both a clipped step and an unclipped one
