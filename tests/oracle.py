"""The independent oracle: Hugging Face transformers' LlamaForCausalLM (torch, fp32) with random weights,
and our model loaded with exactly those weights through the library's own mapping."""
from __future__ import annotations

import numpy as np
import torch
import transformers

from llama_jax.model.config import ModelConfig
from llama_jax.model.api import build
from llama_jax.model.api import load_into
from llama_jax.model.params import hf_config_dict, params_from_torch


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
