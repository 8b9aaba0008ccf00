"""Chat templates: conversations -> text -> token ids plus the mask of what the model should learn to say.

Every template is a Jinja template rendered the way Hugging Face transformers renders `chat_template`
(sandboxed, `trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, the special tokens as variables), so a tokenizer's
own `chat_template` from `tokenizer_config.json` gives the text transformers' `apply_chat_template` gives.
The built-in templates are written the same way:

    llama2   Meta's LLaMA 2 chat format: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>
    llama3   LLaMA 3's header tokens: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    alpaca   Stanford Alpaca's prompt (### Instruction / ### Input / ### Response), answer + EOS

What is learnt is marked in the template with `{% generation %} ... {% endgeneration %}` (transformers'
tag for `return_assistant_tokens_mask`): the built-ins wrap each assistant answer and its end-of-turn
token in it. A token is a target when its text overlaps a generation block, which is the rule transformers
applies. A tokenizer template without generation blocks has nothing to learn from and is refused.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

BUILTIN_TEMPLATES: dict[str, str] = {
    "llama2": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] | trim -%}{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system = none -%}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('llama2 conversations alternate user and assistant turns, starting with the user') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set content = message['content'] | trim -%}"
        "{%- if loop.first and system is not none -%}"
        "{%- set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content -%}{%- endif -%}"
        "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
        "{%- else -%}"
        "{% generation %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}"),
    "llama3": (
        "{{ bos_token }}"
        "{%- for message in messages -%}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    "alpaca": (
        "{%- set with_input = messages | selectattr('input', 'defined') | selectattr('input') | list -%}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set preamble = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
        "{%- elif with_input -%}"
        "{%- set preamble = 'Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.' -%}"
        "{%- else -%}"
        "{%- set preamble = 'Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.' -%}"
        "{%- endif -%}"
        "{{ bos_token + preamble + '\\n\\n' }}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if message['input'] is defined -%}"
        "{{ '### Instruction:\\n' + message['instruction'] + '\\n\\n' }}"
        "{%- if message['input'] -%}{{ '### Input:\\n' + message['input'] + '\\n\\n' }}{%- endif -%}"
        "{%- else -%}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}{%- endif -%}"
        "{{ '### Response:\\n' }}"
        "{%- else -%}"
        "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
        "{%- if not loop.last -%}{{ '\\n\\n' }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"),
}
TEMPLATE_CHOICES = (*BUILTIN_TEMPLATES, "tokenizer")
# Special tokens a built-in template writes out besides BOS/EOS: each must be one token of the tokenizer.
REQUIRED_TOKENS = {"llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
END_OF_TURN = {"llama3": "<|eot_id|>"}  # the others end a turn with EOS

# Private-use characters bracket generation blocks in the rendered text; they are removed afterwards.
_OPEN, _CLOSE = "\ue000", "\ue001"


class TemplateError(ValueError):
    """A template does not compile or render, or does not fit the tokenizer."""


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation and the [start, end) character spans of its generation blocks."""

    text: str
    target_spans: tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=None)
def _environment():
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """`{% generation %}...{% endgeneration %}`: brackets its output with the private markers."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return [nodes.Output([nodes.TemplateData(_OPEN)], lineno=lineno), *body,
                    nodes.Output([nodes.TemplateData(_CLOSE)], lineno=lineno)]

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
    from jinja2 import TemplateError as JinjaError

    try:
        return _environment().from_string(source)
    except JinjaError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None


def render(source: str, messages: list[dict], special_tokens: dict[str, str], *,
           add_generation_prompt: bool = False) -> RenderedChat:
    """Render `messages` with the Jinja template `source`; TemplateError (one line) if it fails."""
    from jinja2 import TemplateError as JinjaError

    if any(_OPEN in m["content"] or _CLOSE in m["content"] for m in messages):
        raise TemplateError("a message contains the private-use characters U+E000/U+E001")
    try:
        marked = _compiled(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **special_tokens)
    except TemplateError:
        raise
    except (JinjaError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise TemplateError(f"the chat template does not render: {type(e).__name__}: {e}") from None
    parts, spans, length, start = [], [], 0, None
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece in (_OPEN, _CLOSE):
            if (piece == _OPEN) != (start is None):
                raise TemplateError("the chat template nests or unbalances {% generation %} blocks")
            if piece == _CLOSE and length > start:
                spans.append((start, length))
            start = length if piece == _OPEN else None
        else:
            parts.append(piece)
            length += len(piece)
    return RenderedChat("".join(parts), tuple(spans))


def target_mask(byte_ends: np.ndarray, text: str, spans) -> np.ndarray:
    """Which tokens overlap a span: token i covers UTF-8 bytes [end[i-1], end[i]) of `text`."""
    reach = np.maximum.accumulate(byte_ends) if len(byte_ends) else byte_ends
    begins = np.concatenate([[0], reach[:-1]])
    mask = np.zeros(len(reach), bool)
    for start, end in spans:
        lo, hi = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
        mask |= (reach > lo) & (begins < hi)
    return mask


class ChatTemplate:
    """A template chosen by name (`llama2`, `llama3`, `alpaca`, or `tokenizer`: its tokenizer_config.json's
    `chat_template`), bound to a tokenizer: conversations in, (token ids, target mask) out."""

    def __init__(self, name: str, tokenizer):
        if name not in TEMPLATE_CHOICES:
            raise TemplateError(f"chat_template: {name!r} is not one of {list(TEMPLATE_CHOICES)}")
        self.name, self.tokenizer = name, tokenizer
        self.special_tokens = {"bos_token": tokenizer.token_text(tokenizer.bos_id),
                               "eos_token": tokenizer.token_text(tokenizer.eos_id)}
        if name == "tokenizer":
            self.source = self._tokenizer_template()
        else:
            self.source = BUILTIN_TEMPLATES[name]
        for token in REQUIRED_TOKENS.get(name, ()):
            if len(tokenizer.encode_chat_text(token)[0]) != 1:
                raise TemplateError(f"chat_template {name}: {token} is not a single token of {tokenizer.path} "
                                    f"(use a LLaMA 3 tokenizer or another template)")
        end = END_OF_TURN.get(name)
        self.end_of_turn_id = tokenizer.encode_chat_text(end)[0][0] if end else tokenizer.eos_id

    def _tokenizer_template(self) -> str:
        path = Path(self.tokenizer.path).with_name("tokenizer_config.json")
        if not path.is_file():
            raise TemplateError(f"chat_template tokenizer: {path} does not exist")
        config = json.loads(path.read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
        if not isinstance(template, str) or not template:
            raise TemplateError(f"chat_template tokenizer: {path} has no chat_template string")
        if "generation" not in template:
            raise TemplateError(f"chat_template tokenizer: {path}'s template has no {{% generation %}} blocks, so "
                                f"it does not say which tokens are the assistant's; choose a built-in template")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                self.special_tokens[key] = value
        return template

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> RenderedChat:
        return render(self.source, messages, self.special_tokens, add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, target mask bool) of a whole conversation."""
        chat = self.render(messages)
        ids, ends = self.tokenizer.encode_chat_text(chat.text)
        return np.asarray(ids, np.int32), target_mask(np.asarray(ends), chat.text, chat.target_spans)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation to be continued by the model (ends with the assistant's header)."""
        return self.tokenizer.encode_chat_text(self.render(messages, add_generation_prompt=True).text)[0]
