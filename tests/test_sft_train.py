"""Fine-tuning end to end: train.py on conversations (metrics, validation, init_from), eval.py generate
--chat, bad input as exit status 2, and (slow) the CPU example learning its instruction task."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llama_jax.cli import eval as eval_cli
from llama_jax.cli import train as train_cli
from llama_jax.data.chat_template import BUILTIN_TEMPLATES
from llama_jax.data.tokenizer import load_tokenizer
from llama_jax.training.config import load_train_config
from llama_jax.training.loop import train
from sft_tokenizers import LLAMA3_SPECIALS, make_tokenizer_dir
from test_sft_batches import conversation


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return write_chat_files(tmp_path_factory.mktemp("sft"))


def write_chat_files(root: Path) -> dict:
    """A LLaMA 3-style tokenizer (with its chat template) and train/validation conversations under `root`."""
    tokenizer = make_tokenizer_dir(root / "tok", LLAMA3_SPECIALS, BUILTIN_TEMPLATES["llama3"])
    for split, ids in (("train", range(24)), ("validation", range(100, 106))):
        (root / f"{split}.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in ids))
    return {"root": root, "tokenizer": str(tokenizer / "tokenizer.json"), "train": str(root / "train.jsonl"),
            "validation": str(root / "validation.jsonl")}


def overrides(files: dict, run_dir: Path, **extra) -> list[str]:
    values = {
        "model": "tiny", "model.vocab_size": load_tokenizer(files["tokenizer"]).vocab_size, "model.dim": 32,
        "model.n_layers": 1, "model.n_heads": 2, "model.ffn_hidden_dim": 64, "model.max_seq_len": 128,
        "model.dtype": "float32", "model.attention_impl": "xla",
        "data.sources": f"[{{kind: chat, path: {files['train']}}}]",
        "data.validation_sources": f"[{{kind: chat, path: {files['validation']}}}]",
        "data.chat_template": "llama3", "tokenizer": files["tokenizer"], "run_dir": str(run_dir), "steps": 3,
        "global_batch_size": 2, "seq_len": 128, "log_every": 1, "eval_every": 2, "checkpoint_every": 3,
        "optimizer.warmup_steps": 1, "progress": "lines", "async_checkpointing": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_train_reports_target_share_and_answer_loss_then_generate_chat(files, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    result = train(load_train_config(None, overrides(files, run_dir)))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [r["target_share"] for r in records if r["kind"] == "train"]
    assert len(shares) == 3 and all(0.05 < s < 0.6 for s in shares)  # answers only, not prompts or padding
    assert {"loss", "tokens"} == set(result.validation) and result.validation["tokens"] > 0
    assert any(r["kind"] == "eval" for r in records)

    # init_from the run: step 0 with its weights, fine-tuning continues
    second = train(load_train_config(None, overrides(files, tmp_path / "second", init_from=str(run_dir), steps=1)))
    assert second.first_step == 1 and second.losses[0] < result.losses[0]

    capsys.readouterr()  # the run's copy of the tokenizer keeps its tokenizer_config.json (chat template)
    assert eval_cli.main(["generate", str(run_dir), "--dtype", "fp32", "--chat", "tokenizer", "--system", "Be terse.",
                          "--prompt", "Reverse: apple banana", "--max-new-tokens", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generations"][0]["prompt"] == "Reverse: apple banana" and 1 <= out["new_tokens"] <= 4

    from llama_jax.evaluation import generate as generate_mod  # --chat-date reaches the template

    dates = []
    monkeypatch.setattr(generate_mod, "chat_prompts", lambda *a, date=None, _real=generate_mod.chat_prompts:
                        dates.append(date) or _real(*a, date=date))
    assert eval_cli.main(["generate", str(run_dir), "--dtype", "fp32", "--chat", "llama3.1", "--chat-date",
                          "05 Dec 2026", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert dates == ["05 Dec 2026"]


@pytest.mark.parametrize("line,message", [
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
    ('{"messages": [{"role": "robot", "content": "q"}]}', "messages[0].role: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\udcff"}]}',
     "messages[1]: content: a lone surrogate U+DCFF at character 1 (not Unicode text)"),  # was a tokenizer traceback
])
def test_bad_record_is_exit_status_2_naming_file_and_line(files, tmp_path, capsys, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(Path(files["train"]).read_text() + line + "\n")
    code = train_cli.main(overrides(files, tmp_path / "run", **{"data.sources": f"[{{kind: chat, path: {bad}}}]"}))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {bad}:25: ") and message in err and "\n" not in err


@pytest.mark.thorough
def test_cpu_example_learns_its_instruction_task(tmp_path, monkeypatch):
    """configs/train/sft-tiny.yaml as documented, from random weights: >= 90 % exact match on held-out prompts."""
    from llama_jax.data.chat_records import read_conversations
    from llama_jax.evaluation.generate import Generator, SamplingConfig, chat_prompts
    from llama_jax.evaluation.loading import load_eval_model

    monkeypatch.chdir(tmp_path)
    assert train_cli.main(["instruction-task", "data/reverse-words"]) == 0
    config = Path(__file__).parents[1] / "llama_jax" / "configs" / "train" / "sft-tiny.yaml"
    cfg = load_train_config(config, ["progress=lines", "eval_every=0"])
    train(cfg)
    model = load_eval_model(cfg.run_dir, dtype="fp32")
    tests = [messages for _, messages in read_conversations("alpaca", "data/reverse-words/test.jsonl")]
    prompts, end_of_turn = chat_prompts(model.tokenizer, cfg.data.chat_template, [m[:-1] for m in tests])
    result = Generator(model, SamplingConfig(max_new_tokens=16), eos_id=end_of_turn)(prompts)
    answers = [model.tokenizer.decode(t).strip() for t in result.tokens]
    exact = np.mean([a == m[-1]["content"] for a, m in zip(answers, tests)])
    assert exact >= 0.9, list(zip(answers, tests))[:5]
