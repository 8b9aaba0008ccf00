"""Fine-tuning data: strict conversation readers, chat templates, target masks.

Oracles: transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` on the same tokenizer
files (ids and mask equal), Meta's LLaMA 2 chat encoding written out here (BOS + encode("[INST] u [/INST]
a ") + EOS per exchange), and hand-written LLaMA 3 and Alpaca texts.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_jax.data.chat_records import ROLES, RecordError, read_conversations, record_messages
from llama_jax.data.chat_template import BUILTIN_TEMPLATES, ChatTemplate, TemplateError
from llama_jax.data.instruction_task import SPLITS
from llama_jax.data.tokenizer import load_tokenizer
from sft_tokenizers import LLAMA2_SPECIALS, LLAMA3_SPECIALS, make_tokenizer_dir

CONVERSATION = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hello there, how are you?"},
                {"role": "assistant", "content": "I am fine, thanks. Ünïcödé ok."},
                {"role": "user", "content": "Reverse these words: apple banana"},
                {"role": "assistant", "content": " banana apple \n"}]

CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message.role == 'system' %}
<|im_start|>system
{{ message.content }}<|im_end|>
        {% continue %}
    {% endif %}
<|im_start|>{{ message.role }}
    {% if message.role == 'assistant' %}
{% generation %}{{ message.content }}<|im_end|>{% endgeneration %}

    {% else %}
{{ message.content }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# --- readers -------------------------------------------------------------------------------------------

def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_the_three_formats_give_the_same_messages(tmp_path):
    alpaca = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"},
                                                {"instruction": "Hi", "output": "Hello"}])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    chat = write_jsonl(tmp_path / "c.jsonl", ["", {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}])
    got = list(read_conversations("alpaca", alpaca))
    assert got == [(f"{alpaca}:1", [{"role": "user", "content": "Add\n\n1 2", "instruction": "Add", "input": "1 2"},
                                    {"role": "assistant", "content": "3"}]),
                   (f"{alpaca}:2", [{"role": "user", "content": "Hi", "instruction": "Hi", "input": ""},
                                    {"role": "assistant", "content": "Hello"}])]
    expected = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}]
    assert list(read_conversations("sharegpt", sharegpt)) == [(f"{sharegpt}:1", expected)]
    assert list(read_conversations("chat", chat)) == [(f"{chat}:2", expected)]  # blank line 1 skipped


@pytest.mark.parametrize("kind,record,message", [
    ("alpaca", "{not json", "not valid JSON"),
    ("alpaca", [1, 2], "expected a JSON object, got list"),
    ("alpaca", {"instruction": "x"}, "missing field 'output'"),
    ("alpaca", {"instruction": 3, "output": "y"}, "instruction: expected a string, got int"),
    ("sharegpt", {"conversations": []}, "conversations: expected a non-empty list"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "conversations[0].from: unknown speaker 'bot'"),
    ("sharegpt", {"conversations": [{"from": "gpt"}]}, "conversations[0]: missing field 'value'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}, "oops"]}, "messages[1]: expected an object, got str"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: unknown role 'robot'"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, "messages[0]: content: expected a string, got NoneType"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ("chat", {"messages": [{"role": "user", "content": "x\udcff"}, {"role": "assistant", "content": "y"}]},
     "messages[0]: content: a lone surrogate U+DCFF at character 1 (not Unicode text)"),
    ("alpaca", {"instruction": "\ud800", "output": "y"}, "instruction: a lone surrogate U+D800 at character 0"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\udfff!"}]},
     "conversations[1]: value: a lone surrogate U+DFFF"),
    ("chat", {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                           {"role": "assistant", "content": "y"}]}, "a system message must come first"),
])
def test_a_bad_record_is_one_line_naming_file_line_and_field(tmp_path, kind, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}] * (kind == "chat")
                       + [{"instruction": "q", "output": "a"}] * (kind == "alpaca")
                       + [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
                       * (kind == "sharegpt") + [record])
    with pytest.raises(RecordError) as info:
        list(read_conversations(kind, path))
    text = str(info.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text
    assert len(list(read_conversations(kind, path, skip_bad_lines=True))) == 1


# text, and text around a lone surrogate (valid JSON: "\udcff") or an escaped pair (a real character)
TEXT = st.text(max_size=5) | st.tuples(st.text(max_size=2), st.sampled_from(["\ud800", "\udcff", "\ud83d\ude00"]),
                                       st.text(max_size=2)).map("".join)
def test_line_separators_inside_json_strings_stay_in_the_record(tmp_path):
    """JSON Lines end at "\\n" only; U+2028, U+0085 and \\r are text inside a JSON string written raw
    (ensure_ascii=False), and used to split the record into two broken lines."""
    content = "one\u2028two\x85three\rfour"
    record = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n\r\n" + json.dumps(record) + "\r\n",
                    encoding="utf-8", newline="")  # Windows line ends too
    assert list(read_conversations("chat", str(path))) == [(f"{path}:1", record["messages"]),
                                                           (f"{path}:3", record["messages"])]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=8)
TURN = st.fixed_dictionaries({}, optional={"role": st.sampled_from([*ROLES, "bot"]) | JSON,
                                           "content": TEXT | JSON,
                                           "from": st.sampled_from(["human", "gpt", "system", "x"]) | JSON,
                                           "value": TEXT | JSON})
RECORD = st.fixed_dictionaries({}, optional={"instruction": TEXT | JSON, "input": TEXT | JSON,
                                             "output": TEXT | JSON, "messages": st.lists(TURN, max_size=4) | JSON,
                                             "conversations": st.lists(TURN, max_size=4) | JSON}) | JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["alpaca", "sharegpt", "chat"]), record=RECORD)
def test_fuzzed_records_give_valid_messages_or_a_one_line_error(kind, record):
    try:
        messages = record_messages(kind, json.dumps(record), "f.jsonl:7")
    except RecordError as e:
        assert str(e).startswith("f.jsonl:7: ") and "\n" not in str(e)
        return
    assert messages and all(m["role"] in ROLES and isinstance(m["content"], str) for m in messages)
    assert all(m["content"].encode("utf-8") is not None for m in messages)  # text a tokenizer can take
    assert any(m["role"] == "assistant" for m in messages)
    assert all(m["role"] != "system" for m in messages[1:])


# --- templates against transformers --------------------------------------------------------------------

def hf_ids_and_mask(directory, messages, **kwargs):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(str(directory))
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                 **kwargs)
    return list(out["input_ids"]), list(out["assistant_masks"]), hf


@pytest.mark.parametrize("name,specials,template", [
    ("llama3", LLAMA3_SPECIALS, BUILTIN_TEMPLATES["llama3"]),
    ("llama2", LLAMA2_SPECIALS, BUILTIN_TEMPLATES["llama2"]),
    ("alpaca", LLAMA2_SPECIALS, BUILTIN_TEMPLATES["alpaca"]),
    ("chatml-from-tokenizer_config", (*LLAMA2_SPECIALS, "<|im_start|>", "<|im_end|>"), CHATML_TEMPLATE),
])
def test_ids_and_target_mask_equal_transformers_apply_chat_template(tmp_path, name, specials, template):
    directory = make_tokenizer_dir(tmp_path / name, specials, template)
    messages = CONVERSATION if name != "alpaca" else CONVERSATION[1:3]
    hf_ids, hf_mask, hf = hf_ids_and_mask(directory, messages)
    tokenizer = load_tokenizer(directory)
    for choice in {"tokenizer", name} & {"tokenizer", *BUILTIN_TEMPLATES}:
        ids, mask = ChatTemplate(choice, tokenizer).encode(messages)
        assert ids.tolist() == hf_ids, choice
        assert mask.astype(int).tolist() == hf_mask, choice
    assert 0 < sum(hf_mask) < len(hf_mask)
    if name != "alpaca":  # a prompt to be answered ends with the assistant's header
        prompt = ChatTemplate("tokenizer", tokenizer).encode_prompt(CONVERSATION[:2])
        assert prompt == hf.apply_chat_template(CONVERSATION[:2], tokenize=True, add_generation_prompt=True,
                                                return_dict=True)["input_ids"]

def test_llama3_text_is_metas_format(tmp_path):
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path, LLAMA3_SPECIALS, None))
    template = ChatTemplate("llama3", tokenizer)
    chat = template.render(CONVERSATION[:3])
    assert chat.text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nHello there, how are you?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\nI am fine, thanks. Ünïcödé ok.<|eot_id|>")
    assert [chat.text[a:b] for a, b in chat.target_spans] == ["I am fine, thanks. Ünïcödé ok.<|eot_id|>"]
    ids, mask = template.encode(CONVERSATION[:3])
    assert tokenizer.decode(ids[mask]) == "I am fine, thanks. Ünïcödé ok."  # decode drops the special
    assert ids[mask][-1] == template.end_of_turn_id == tokenizer._tok.token_to_id("<|eot_id|>")


def test_llama2_on_sentencepiece_is_metas_encoding(stdlib_tokenizer):
    """Meta's llama/generation.py: per exchange, BOS + encode(f"[INST] {u} [/INST] {a} ") + EOS, the
    system prompt wrapped in <<SYS>> inside the first user turn; targets: the answer pieces and EOS."""
    tok = stdlib_tokenizer
    ids, mask = ChatTemplate("llama2", tok).encode(CONVERSATION)
    first = f"[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHello there, how are you? [/INST]"
    second = "[INST] Reverse these words: apple banana [/INST]"
    expected, expected_mask = [], []
    for prompt, answer in ((first, "I am fine, thanks. Ünïcödé ok."), (second, "banana apple")):
        prompt_ids = [tok.bos_id] + tok.encode(prompt, bos=False)
        whole = [tok.bos_id] + tok.encode(f"{prompt} {answer} ", bos=False) + [tok.eos_id]
        assert whole[:len(prompt_ids)] == prompt_ids  # the answer starts a new piece ("▁...")
        expected += whole
        expected_mask += [0] * len(prompt_ids) + [1] * (len(whole) - len(prompt_ids))
    assert ids.tolist() == expected
    assert mask.astype(int).tolist() == expected_mask


def test_alpaca_hand_checked(tmp_path):
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path, LLAMA2_SPECIALS, None))
    template = ChatTemplate("alpaca", tokenizer)
    with_input = [{"role": "user", "content": "Add\n\n1 2", "instruction": "Add", "input": "1 2"},
                  {"role": "assistant", "content": "3"}]
    chat = template.render(with_input)
    assert chat.text == ("<s>Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.\n\n"
                         "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3</s>")
    assert [chat.text[a:b] for a, b in chat.target_spans] == ["3</s>"]
    ids, mask = template.encode(with_input)
    assert mask.sum() == 2 and ids[-1] == tokenizer.eos_id and mask[-2:].all()
    plain = template.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]).text
    assert plain == ("<s>Below is an instruction that describes a task. Write a response that appropriately "
                     "completes the request.\n\n### Instruction:\nHi\n\n### Response:\nHello</s>")


def test_template_errors_are_clear(tmp_path):
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path / "a", LLAMA2_SPECIALS, "{{ messages[0].content }}"))
    with pytest.raises(TemplateError, match="no {% generation %} blocks"):
        ChatTemplate("tokenizer", tokenizer)
    with pytest.raises(TemplateError, match="<|eot_id|> is not a single token"):
        ChatTemplate("llama3", tokenizer)
    with pytest.raises(TemplateError, match="alternate user and assistant"):
        ChatTemplate("llama2", tokenizer).encode(CONVERSATION[:2] + CONVERSATION[1:3])
    broken = load_tokenizer(make_tokenizer_dir(tmp_path / "b", LLAMA2_SPECIALS,
                                               "{% generation %}{{ messages[0].content.nope() }}{% endgeneration %}"))
    with pytest.raises(TemplateError, match="does not render"):
        ChatTemplate("tokenizer", broken).encode(CONVERSATION)
    unclosed = load_tokenizer(make_tokenizer_dir(tmp_path / "c", LLAMA2_SPECIALS, "{% generation %}{{ x }"))
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("tokenizer", unclosed).encode(CONVERSATION)


def test_instruction_task_files_are_disjoint_reversals(tmp_path):
    from llama_jax.cli.train import main

    assert main(["instruction-task", str(tmp_path)]) == 0
    inputs = {}
    for split, count in SPLITS.items():
        conversations = [m for _, m in read_conversations("alpaca", str(tmp_path / f"{split}.jsonl"))]
        assert len(conversations) == count
        for user, answer in conversations:
            assert answer["content"].split() == user["input"].split()[::-1] and 3 <= len(user["input"].split()) <= 5
        inputs[split] = {user["input"] for user, _ in conversations}
    assert sum(map(len, inputs.values())) == len(set().union(*inputs.values())) == sum(SPLITS.values())
    first = (tmp_path / "train.jsonl").read_bytes()
    assert main(["instruction-task", str(tmp_path / "again")]) == 0 and (tmp_path / "again" / "train.jsonl").read_bytes() == first
