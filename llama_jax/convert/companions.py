"""The files that make an exported checkpoint the same chat model, beside its weights and tokenizer.

transformers, vLLM and TGI read more than the weights: the tokenizer's `tokenizer_config.json` (special
tokens, `add_bos_token`), `special_tokens_map.json`, the chat template (`chat_template.jinja`, where
transformers 5 saves it), `generation_config.json` (the EOS ids generation stops at: LLaMA 3 Instruct's
`<|eot_id|>` is only there) and config.json's `bos_token_id` / `eos_token_id` (an int or a list) /
`pad_token_id`. Every conversion and every training run carries them along:

- the companion files are copied from the source (tokenizer files from the tokenizer's directory first,
  model files from the weights' directory first);
- the token ids come from the source's `config.json` (Hugging Face) or `token_ids.json` (what our
  params dirs, run dirs and Meta exports keep them in, since `model.yaml` and `params.json` have no place
  for them), else from the source's `generation_config.json`, else from the tokenizer;
- a target without a `generation_config.json` (a model trained from scratch) gets one made from those ids.

Every file read here is strict: a value of the wrong type is a ConvertError naming the file and key.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Iterable

from llama_jax.convert.common import ConvertError, read_json_object

TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"
TOKEN_IDS_FILE = "token_ids.json"
HF_CONFIG = "config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _valid_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_token_ids(path: Path) -> dict:
    """{bos_token_id, eos_token_id, pad_token_id: value} of those keys `path` (a JSON object) states;
    each an id, null, or (EOS only, as transformers allows) a non-empty list of ids."""
    data = read_json_object(path, "token id")
    ids = {}
    for key in TOKEN_ID_KEYS:
        if key not in data:
            continue
        value = data[key]
        ok = value is None or _valid_id(value) or (key == "eos_token_id" and isinstance(value, list) and value
                                                    and all(_valid_id(v) for v in value))
        if not ok:
            raise ConvertError(f"{path}: {key}: expected a token id (an integer >= 0){', a list of them' if key == 'eos_token_id' else ''} "
                               f"or null, got {json.dumps(value)[:80]}")
        ids[key] = value
    return ids


def tokenizer_token_ids(tokenizer_path: str | Path) -> dict:
    """The ids the tokenizer itself declares (BOS, EOS, its own pad piece if it has one); {} with a
    warning for a file we cannot read (LLaMA 3's Meta release ships a tiktoken `tokenizer.model`): the
    conversion goes on, and config.json then states no ids, as the source did not."""
    from llama_jax.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (TokenizerError, OSError) as e:
        print(f"warning: no BOS/EOS ids for config.json: {str(e).splitlines()[0]}", file=sys.stderr)
        return {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    if tokenizer.declared_pad_id is not None:
        ids["pad_token_id"] = tokenizer.declared_pad_id
    return ids


def source_token_ids(directories: Iterable[Path], tokenizer_path: str | Path | None) -> dict:
    """The token ids of a source checkpoint (module docstring: config.json / token_ids.json, else
    generation_config.json, else the tokenizer); {} when nothing says."""
    directories = [Path(d) for d in directories]
    for name in (HF_CONFIG, TOKEN_IDS_FILE, GENERATION_CONFIG):
        for directory in directories:
            if (directory / name).is_file() and (ids := read_token_ids(directory / name)):
                return ids
    return tokenizer_token_ids(tokenizer_path) if tokenizer_path else {}


def generation_config(token_ids: dict) -> dict:
    """What transformers' `GenerationConfig.from_model_config` writes for a config with these ids."""
    return {"_from_model_config": True, **{k: v for k, v in token_ids.items() if v is not None}}


def carry(target: Path, *, tokenizer_dirs: Iterable[Path], model_dirs: Iterable[Path], token_ids: dict,
          hf_target: bool) -> None:
    """Copy the companion files into `target` (tokenizer files from `tokenizer_dirs`, then `model_dirs`;
    the generation config from `model_dirs`, then `tokenizer_dirs`: the first that has each), make a
    generation_config.json from `token_ids` where none was found, and, unless the target is a Hugging Face
    directory (its config.json holds them), record `token_ids` in token_ids.json."""
    tokenizer_dirs, model_dirs = [Path(d) for d in tokenizer_dirs], [Path(d) for d in model_dirs]
    for names, dirs in ((TOKENIZER_COMPANIONS, tokenizer_dirs + model_dirs),
                        ((GENERATION_CONFIG,), model_dirs + tokenizer_dirs)):
        for name in names:
            found = next((d / name for d in dirs if (d / name).is_file()), None)
            if found is not None and found.resolve() != (target / name).resolve():
                shutil.copyfile(found, target / name)
    if not (target / GENERATION_CONFIG).is_file() and token_ids:
        (target / GENERATION_CONFIG).write_text(json.dumps(generation_config(token_ids), indent=2) + "\n")
    if not hf_target and token_ids:
        (target / TOKEN_IDS_FILE).write_text(json.dumps(token_ids, indent=2) + "\n")
