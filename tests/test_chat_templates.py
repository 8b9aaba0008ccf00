"""The built-in chat templates give the tokens transformers gives with Meta's official templates, and a
tokenizer's own `chat_template.jinja` gives the tokens and assistant mask transformers gives.

Oracles: transformers' `apply_chat_template` rendering the official template strings of
`official_chat_templates.py` on the same tokenizer files (ids equal); the assistant's characters are what
the conversation up to the answer adds to the conversation up to the question (with the generation
prompt), both rendered by transformers, mapped to tokens with transformers' own offsets (mask equal: the
answer's tokens and its end-of-turn token). LLaMA 2 runs on a SentencePiece model with LLaMA's settings
(byte fallback, `▁` prefix, `<s>`/`</s>` = 1/2) loaded by transformers in its Meta-compatible (`legacy`)
mode: each piece between special tokens keeps its dummy prefix, as in Meta's `chat_completion`.
"""
from __future__ import annotations

import json
import shutil

import pytest

import official_chat_templates as official
from llama_jax.data.chat_template import ChatTemplate, TemplateError
from llama_jax.data.tokenizer import load_tokenizer
from sft_tokenizers import LLAMA3_SPECIALS, make_tokenizer_dir
from test_sft_data import CHATML_TEMPLATE


def chat(*turns, system=None):
    roles = ["user", "assistant"] * len(turns)
    return ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": role, "content": text} for role, text in zip(roles, turns)]


CONVERSATIONS = [
    chat("  2+2?", "Four.", system="\n  You answer in one word.  \n"),
    chat("Hello there, how are you?", "I am fine, thanks. Ünïcödé ok."),
    chat("Hi", "Hello!", "Reverse: apple banana", " banana apple \n", "And cherry?", "cherry", system="You are terse."),
    chat("Say nothing.", ""),
    chat("Translate: 你好, мир 😀", "Hello, world 😀", system="  Ünïcödé\tsystem  "),
    chat("Empty system?", "Yes.", system=""),
    chat("Line one\nLine two\n\n", "Two\nlines\n"),
    chat("A", "", "B", "  ", "C", "done", system="   "),
    chat("Explain [INST] and <<SYS>> literally.", "They are [/INST] markers </s> in text."),
    chat("  leading", "trailing  ", system="\n\n"),
    chat("Q1", "A1", "Q2", "A2", "Q3", "A3", "Q4", "A4"),
    chat("Only a question, no answer yet.", system="Be brief.")[:-1],
    chat("Tabs\tand  double  spaces", "  spaced  out  "),
]


def llama2_sentencepiece_dir(tmp_path, stdlib_tokenizer):
    directory = tmp_path / "llama2"
    directory.mkdir()
    shutil.copyfile(stdlib_tokenizer.path, directory / "tokenizer.model")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


def transformers_ids_and_mask(hf, template, messages, **kwargs):
    """(ids, assistant mask) from transformers alone (see the module docstring)."""
    def text(msgs, prompt=False):
        return hf.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=prompt,
                                      **kwargs)

    full = text(messages)
    ids = hf.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                 **kwargs)["input_ids"]
    encoded = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    assert list(encoded["input_ids"]) == list(ids)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] == "assistant":
            before, upto = text(messages[:k], prompt=True), text(messages[:k + 1])
            assert full.startswith(upto) and upto.startswith(before)
            spans.append((len(before), len(upto)))
    mask = [int(any(a < end and b > start for start, end in spans)) for a, b in encoded["offset_mapping"]]
    return list(ids), mask


@pytest.mark.parametrize("name", ["llama2", "llama3", "llama3.1", "llama3.1-dated"])
def test_builtin_templates_equal_transformers_with_the_official_template(tmp_path, stdlib_tokenizer, name):
    import transformers

    if name == "llama2":
        directory, template = llama2_sentencepiece_dir(tmp_path, stdlib_tokenizer), official.LLAMA2
    else:
        directory = make_tokenizer_dir(tmp_path / "llama3", LLAMA3_SPECIALS, None)
        template = official.LLAMA3 if name == "llama3" else official.LLAMA3_1
    kwargs = {"date_string": "05 Dec 2026"} if name == "llama3.1-dated" else {}
    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    ours = ChatTemplate(name.removesuffix("-dated"), load_tokenizer(directory), date=kwargs.get("date_string"))
    assert ours.tokenizer.bos_id == hf.bos_token_id and ours.tokenizer.eos_id == hf.eos_token_id
    for messages in CONVERSATIONS:
        expected_ids, expected_mask = transformers_ids_and_mask(hf, template, messages, **kwargs)
        ids, mask = ours.encode(messages)
        assert ids.tolist() == expected_ids, messages
        assert mask.astype(int).tolist() == expected_mask, messages
        if name != "llama2":  # a prompt to be answered ends with the assistant's header
            question = messages[:-1] if messages[-1]["role"] == "assistant" else messages
            assert ours.encode_prompt(question) == hf.apply_chat_template(
                question, chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=True,
                **kwargs)["input_ids"]
    if name.startswith("llama3.1"):
        text = ours.render(CONVERSATIONS[1]).text
        assert f"Today Date: {kwargs.get('date_string', '26 Jul 2024')}\n\n" in text


def test_a_template_from_chat_template_jinja_equals_transformers(tmp_path):
    """transformers 5 saves a tokenizer's template as chat_template.jinja (tokenizer_config.json then has
    no chat_template key): `chat_template: tokenizer` reads it there."""
    import transformers

    source = make_tokenizer_dir(tmp_path / "src", (*LLAMA3_SPECIALS, "<|im_start|>", "<|im_end|>"), None)
    hf = transformers.AutoTokenizer.from_pretrained(str(source))
    hf.chat_template = CHATML_TEMPLATE
    hf.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    ours = ChatTemplate("tokenizer", load_tokenizer(tmp_path / "saved"))
    for messages in CONVERSATIONS:
        out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = ours.encode(messages)
        assert ids.tolist() == list(out["input_ids"]), messages
        assert mask.astype(int).tolist() == list(out["assistant_masks"]), messages


@pytest.mark.parametrize("body,message", [
    ("{{ 1/0 }}", "does not render: ZeroDivisionError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "does not render: RecursionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}", "output passed"),
    ("{{ 'x' * 10**10 }}", "too large"),
    ("{{ 7 ** (10 ** 12) }}", "too large"),
    ("{{ messages[0].content.nope() }}", "does not render: UndefinedError"),
    ("{% if %}", "does not compile"),
])
def test_a_hostile_template_is_one_line_naming_its_file(tmp_path, monkeypatch, body, message):
    from llama_jax.data import chat_template

    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    directory = make_tokenizer_dir(tmp_path, LLAMA3_SPECIALS, None)
    (directory / "chat_template.jinja").write_text("{% generation %}{% endgeneration %}" + body)
    template = ChatTemplate("tokenizer", load_tokenizer(directory))
    with pytest.raises(TemplateError) as info:
        template.encode(CONVERSATIONS[0])
    text = str(info.value)
    assert text.startswith(f"{directory / 'chat_template.jinja'}: ") and message in text and "\n" not in text


def test_chat_date_of_the_data_config_reaches_the_tokens(tmp_path):
    from llama_jax.data.config import DataConfig, SourceConfig
    from llama_jax.data.sft import make_sft_eval_batches

    directory = make_tokenizer_dir(tmp_path, LLAMA3_SPECIALS, None)
    (tmp_path / "chats.jsonl").write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    source = SourceConfig(kind="chat", path=str(tmp_path / "chats.jsonl"))
    tokenizer = load_tokenizer(directory)
    for date, expected in (("", "Today Date: 26 Jul 2024"), ("05 Dec 2026", "Today Date: 05 Dec 2026")):
        cfg = DataConfig(sources=[source], validation_sources=[source], chat_template="llama3.1", chat_date=date)
        (batch,) = make_sft_eval_batches(cfg, tokenizer, seq_len=128, batch_size=1)
        assert expected in tokenizer.decode(batch["inputs"][0])


def test_train_with_a_hostile_template_is_exit_2_and_one_line(tmp_path, capsys):
    from llama_jax.cli.train import main as train_main
    from test_sft_train import overrides, write_chat_files

    files = write_chat_files(tmp_path)
    jinja = tmp_path / "tok" / "chat_template.jinja"
    jinja.write_text("{% generation %}{% endgeneration %}{{ 1/0 }}")
    assert train_main(overrides(files, tmp_path / "run", **{"data.chat_template": "tokenizer"})) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{jinja}: does not render: ZeroDivisionError" in err[0], err
