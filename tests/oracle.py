"""The independent oracle: Hugging Face transformers' LlamaForCausalLM (torch, fp32) with random weights,
and our model loaded with exactly those weights through the library's own mapping."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from llama_jax.model.config import ModelConfig
from llama_jax.model.transformer import build
from llama_jax.model.api import load_into
from llama_jax.model.external_config import hf_config_dict
from llama_jax.model.params import params_from_torch


def hf_model(cfg: ModelConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    """A randomly initialised fp32 LlamaForCausalLM of the same shape as `cfg`."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg))
    model = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    with torch.no_grad():  # HF initialises norms to ones; randomise them so the mapping is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ours_from_hf(hf: transformers.LlamaForCausalLM, cfg: ModelConfig):
    """Our model holding `hf`'s weights."""
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    model = build(cfg)
    load_into(model, params_from_torch(state.__getitem__, cfg, "hf"), source="hf state_dict")
    return model


def hf_logits(hf: transformers.LlamaForCausalLM, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def lm_eval_task(task_dir, name: str, num_fewshot: int | None = None, limit: int | None = None, seed: int = 1234):
    """lm-evaluation-harness's task `name` from the YAMLs in `task_dir` (stock tasks only where a YAML there
    includes them), its requests built with few-shot seed `seed`: (task, instances in document order)."""
    import warnings

    from lm_eval.tasks import TaskManager

    with warnings.catch_warnings():  # load_task_or_group is deprecated in 0.4.13 but returns the task itself
        warnings.simplefilter("ignore", DeprecationWarning)
        task = TaskManager(include_defaults=False, include_path=str(task_dir)).load_task_or_group([name])[name]
    if num_fewshot is not None:
        task.set_config("num_fewshot", num_fewshot)
    task.set_fewshot_seed(seed)
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return task, sorted(task.instances, key=lambda inst: (inst.doc_id, inst.idx))
