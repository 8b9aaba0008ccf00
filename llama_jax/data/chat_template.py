"""Chat templates: conversations -> text -> token ids plus the mask of what the model should learn to say.

Every template is a Jinja template rendered the way Hugging Face transformers renders `chat_template`
(sandboxed, `trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, `raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text, the special tokens as variables), so a tokenizer's
own template (`chat_template.jinja`, where transformers 5 saves it, or the `chat_template` of
`tokenizer_config.json`) gives the text transformers' `apply_chat_template` gives. The built-in templates
are written the same way:

    llama2    Meta's Llama-2-chat template: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>
              (the system prompt and the first user turn are joined, then stripped together)
    llama3    Meta-Llama-3-Instruct's: <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
    llama3.1  Llama-3.1-Instruct's: llama3 plus a system header with the knowledge cutoff and the date
              (`date_string`, "26 Jul 2024" unless the data config's `chat_date` says otherwise)
    alpaca    Stanford Alpaca's prompt (### Instruction / ### Input / ### Response), answer + EOS

A template is untrusted code: it runs sandboxed, and a render that takes longer than `RENDER_SECONDS`
or writes more than `RENDER_CHARS` characters stops with a TemplateError, as does any failure inside it
(`{{ 1/0 }}`, a macro calling itself), each one line naming where the template came from.

What is learnt is marked in the template with `{% generation %} ... {% endgeneration %}` (transformers'
tag for `return_assistant_tokens_mask`): the built-ins wrap each assistant answer and its end-of-turn
token in it. A token is a target when its text overlaps a generation block, which is the rule transformers
applies. A tokenizer template without generation blocks has nothing to learn from and is refused.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
import types
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

# LLaMA 2 and 3 are Meta's official Hugging Face templates (Llama-2-chat, Meta-Llama-3-Instruct,
# Llama-3.1-Instruct without its tool-calling branches), word for word, with generation blocks added.
BUILTIN_TEMPLATES: dict[str, str] = {
    "llama2": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set loop_messages = messages[1:] -%}{%- set system_message = messages[0]['content'] -%}"
        "{%- else -%}{%- set loop_messages = messages -%}{%- set system_message = false -%}{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('llama2 conversations alternate user and assistant turns, starting with the user') }}"
        "{%- endif -%}"
        "{%- if loop.index0 == 0 and system_message != false -%}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
        "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}"),
    "llama3": (
        "{%- for message in messages -%}"
        "{%- set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -%}"
        "{%- if loop.index0 == 0 -%}{%- set header = bos_token + header -%}{%- endif -%}"
        "{{ header }}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else -%}{{ message['content'] | trim + '<|eot_id|>' }}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    "llama3.1": (
        "{{- bos_token -}}"
        "{%- if not date_string is defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}"
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system_message = messages[0]['content'] | trim -%}{%- set messages = messages[1:] -%}"
        "{%- else -%}{%- set system_message = '' -%}{%- endif -%}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
        "{{- 'Cutting Knowledge Date: December 2023\\n' -}}"
        "{{- 'Today Date: ' + date_string + '\\n\\n' -}}"
        "{{- system_message + '<|eot_id|>' -}}"
        "{%- for message in messages -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
        "{%- else -%}{{- message['content'] | trim + '<|eot_id|>' -}}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"),
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
_LLAMA3_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
REQUIRED_TOKENS = {"llama3": _LLAMA3_TOKENS, "llama3.1": _LLAMA3_TOKENS}
END_OF_TURN = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>"}  # the others end a turn with EOS

# Private-use characters bracket generation blocks in the rendered text; they are removed afterwards.
_OPEN, _CLOSE = "\ue000", "\ue001"
JINJA_FILE = "chat_template.jinja"  # where transformers 5 saves a tokenizer's template


class TemplateError(ValueError):
    """A template does not compile or render, or does not fit the tokenizer."""


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation and the [start, end) character spans of its generation blocks."""

    text: str
    target_spans: tuple[tuple[int, int], ...]


RENDER_SECONDS = 10.0  # per conversation: a real chat template renders one in well under a millisecond
RENDER_CHARS = 64 * 2**20  # output characters per conversation (and the largest string `*` may build)


class _TooCostly(Exception):
    """Raised inside a render that ran past its time or size bound."""


_deadline = threading.local()
_MONITOR_NAME = "llama_jax chat template time bound"
_FREE_TOOL_IDS = (3, 4)  # the sys.monitoring ids no standard tool claims (debugger 0, coverage 1, profiler 2, ...)


def _on_jump(code, offset, destination):
    """Every backward or forward jump of template code (each loop iteration) checks the deadline."""
    if time.monotonic() > getattr(_deadline, "at", float("inf")):
        raise _TooCostly(f"rendering took over {RENDER_SECONDS:g} s")


def _watch(template) -> None:
    """Turn on jump events for the code of `template` alone (its root, blocks and the macros inside them),
    so the deadline is checked on every loop iteration without slowing any other code."""
    monitoring = sys.monitoring
    tool = next((i for i in _FREE_TOOL_IDS if monitoring.get_tool(i) == _MONITOR_NAME), None)
    if tool is None:
        tool = next((i for i in _FREE_TOOL_IDS if monitoring.get_tool(i) is None), None)
        if tool is None:  # both taken by other tools: the output bound still holds
            return
        monitoring.use_tool_id(tool, _MONITOR_NAME)
        monitoring.register_callback(tool, monitoring.events.JUMP, _on_jump)
    pending = [template.root_render_func.__code__, *(f.__code__ for f in template.blocks.values())]
    while pending:
        code = pending.pop()
        monitoring.set_local_events(tool, code, monitoring.events.JUMP)
        pending += [c for c in code.co_consts if isinstance(c, types.CodeType)]


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

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """transformers' sandbox, with `*` and `**` refused where the result would be huge (one
        `{{ 'x' * 10**10 }}` would otherwise exhaust memory before any bound is checked)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 \
                    and right * max(abs(left).bit_length(), 1) > 8 * RENDER_CHARS:
                raise _TooCostly(f"{left} ** {right} is too large")
            if operator == "*":
                for seq, count in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                            and len(seq) * count > RENDER_CHARS:
                        raise _TooCostly(f"a sequence of {len(seq)} repeated {count} times is too large")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
    from jinja2 import TemplateError as JinjaError

    try:
        template = _environment().from_string(source)
    except JinjaError as e:
        raise TemplateError(f"does not compile: {_one_line(e)}") from None
    except (RecursionError, MemoryError) as e:  # a template nested thousands of levels deep
        raise TemplateError(f"does not compile: {type(e).__name__}") from None
    _watch(template)
    return template


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _bounded_render(template, variables: dict) -> str:
    """The template's output, stopped by `_TooCostly` past `RENDER_SECONDS` or `RENDER_CHARS`."""
    previous = getattr(_deadline, "at", None)
    _deadline.at = time.monotonic() + RENDER_SECONDS
    try:
        parts, size = [], 0
        for part in template.generate(**variables):
            size += len(part)
            if size > RENDER_CHARS:
                raise _TooCostly(f"the output passed {RENDER_CHARS} characters")
            parts.append(part)
        return "".join(parts)
    finally:
        _deadline.at = previous if previous is not None else float("inf")


def render(source: str, messages: list[dict], special_tokens: dict[str, str], *,
           add_generation_prompt: bool = False, origin: str = "the chat template",
           variables: dict | None = None) -> RenderedChat:
    """Render `messages` with the Jinja template `source`; TemplateError (one line, starting with
    `origin`: the template's file or name) if it fails or runs past its bounds."""
    if any(_OPEN in m["content"] or _CLOSE in m["content"] for m in messages):
        raise TemplateError("a message contains the private-use characters U+E000/U+E001")
    try:
        template = _compiled(source)
    except TemplateError as e:
        raise TemplateError(f"{origin}: {e}") from None
    try:
        marked = _bounded_render(template, {**(variables or {}), "messages": messages,
                                            "add_generation_prompt": add_generation_prompt, **special_tokens})
    except TemplateError as e:  # raise_exception(...) inside the template
        raise TemplateError(f"{origin}: {e}") from None
    except _TooCostly as e:
        raise TemplateError(f"{origin}: stopped rendering: {e}") from None
    except Exception as e:  # anything a template can provoke: 1/0, a self-calling macro, bad types
        raise TemplateError(f"{origin}: does not render: {_one_line(e)}") from None
    parts, spans, length, start = [], [], 0, None
    for piece in re.split(f"([{_OPEN}{_CLOSE}])", marked):
        if piece in (_OPEN, _CLOSE):
            if (piece == _OPEN) != (start is None):
                raise TemplateError(f"{origin}: nests or unbalances {{% generation %}} blocks")
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
    """A template chosen by name (`llama2`, `llama3`, `llama3.1`, `alpaca`, or `tokenizer`: the tokenizer's own,
    from `chat_template.jinja` or `tokenizer_config.json` beside it), bound to a tokenizer: conversations in,
    (token ids, target mask) out. `date` is the template's `date_string` (LLaMA 3.1's "Today Date")."""

    def __init__(self, name: str, tokenizer, *, date: str | None = None):
        if name not in TEMPLATE_CHOICES:
            raise TemplateError(f"chat_template: {name!r} is not one of {list(TEMPLATE_CHOICES)}")
        self.name, self.tokenizer = name, tokenizer
        self.variables = {} if date is None else {"date_string": date}
        self.special_tokens = {"bos_token": tokenizer.token_text(tokenizer.bos_id),
                               "eos_token": tokenizer.token_text(tokenizer.eos_id)}
        if name == "tokenizer":
            self.source, self.origin = self._tokenizer_template()
        else:
            self.source, self.origin = BUILTIN_TEMPLATES[name], f"chat_template {name}"
        for token in REQUIRED_TOKENS.get(name, ()):
            if len(tokenizer.encode_chat_text(token)[0]) != 1:
                raise TemplateError(f"chat_template {name}: {token} is not a single token of {tokenizer.path} "
                                    f"(use a LLaMA 3 tokenizer or another template)")
        end = END_OF_TURN.get(name)
        self.end_of_turn_id = tokenizer.encode_chat_text(end)[0][0] if end else tokenizer.eos_id

    def _tokenizer_template(self) -> tuple[str, str]:
        """(template source, its file): `chat_template.jinja` (transformers 5) else tokenizer_config.json's."""
        from llama_jax.data.tokenizer import TokenizerError, read_special_tokens_of, read_tokenizer_config

        directory = Path(self.tokenizer.path).parent
        config_path = directory / "tokenizer_config.json"
        try:
            config = read_tokenizer_config(config_path) if config_path.is_file() else {}
            tokens = read_special_tokens_of(config, config_path, keys=("bos_token", "eos_token", "unk_token", "pad_token"))
        except TokenizerError as e:
            raise TemplateError(f"chat_template tokenizer: {e}") from None
        self.special_tokens.update({key: value for key, value in tokens.items() if value is not None})
        jinja = directory / JINJA_FILE
        if jinja.is_file():
            try:
                template, origin = jinja.read_bytes().decode("utf-8"), str(jinja)
            except UnicodeDecodeError as e:
                raise TemplateError(f"{jinja}: not UTF-8 (byte {e.start})") from None
        else:
            template, origin = config.get("chat_template"), str(config_path)
            if isinstance(template, list):  # named templates: transformers uses "default"
                template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
            if not isinstance(template, str) or not template:
                raise TemplateError(f"chat_template tokenizer: neither {jinja} nor a chat_template string in "
                                    f"{config_path}")
        if "generation" not in template:
            raise TemplateError(f"{origin}: the template has no {{% generation %}} blocks, so it does not say "
                                f"which tokens are the assistant's; choose a built-in template")
        return template, origin

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> RenderedChat:
        return render(self.source, messages, self.special_tokens, add_generation_prompt=add_generation_prompt,
                      origin=self.origin, variables=self.variables)

    def encode(self, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids int32, target mask bool) of a whole conversation."""
        chat = self.render(messages)
        ids, ends = self.tokenizer.encode_chat_text(chat.text)
        return np.asarray(ids, np.int32), target_mask(np.asarray(ends), chat.text, chat.target_spans)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation to be continued by the model (ends with the assistant's header)."""
        return self.tokenizer.encode_chat_text(self.render(messages, add_generation_prompt=True).text)[0]
