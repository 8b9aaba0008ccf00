"""Read instruction and chat data (JSONL, or TFDS records) as conversations: lists of {"role", "content"}
messages.

Three record formats, one JSON object per line (or one TFDS record, see `tfds_source.py`):

    alpaca    {"instruction": str, "input": str (optional), "output": str}
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
    chat      {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

Every record becomes the same thing (roles `system`, `user`, `assistant`), so templates and masking never
care where a conversation came from. An Alpaca record's user message also keeps `instruction` and `input`
apart, for the Alpaca prompt (which prints them under separate headings).

The readers are strict because a silently dropped or misread record changes what the model learns: a line
that is not JSON, a missing or mistyped field, an unknown role or a conversation without an assistant turn
is a `RecordError` naming the file, the line and the field (`data.jsonl:12: conversations[3].from: ...`).
`skip_bad_lines` turns those errors into a count and a warning instead. A source's `fields` renames a
dataset's own field names to the format's ("instruction=question" reads field `question` as `instruction`,
also inside turns).
"""
from __future__ import annotations

import json
import logging
from typing import Callable, Iterable, Iterator

from llama_jax.utils.text import lone_surrogate

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(ValueError):
    """One record is malformed; the message is one line naming file, line and field."""


def _string(record: dict, key: str, where: str, *, optional: bool = False) -> str:
    if key not in record:
        if optional:
            return ""
        raise RecordError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(f"{where}: {key}: expected a string, got {type(value).__name__}")
    if (surrogate := lone_surrogate(value)) is not None:
        raise RecordError(f"{where}: {key}: {surrogate}")
    return value


def _turns(record: dict, key: str, where: str) -> list:
    value = record.get(key)
    if key not in record:
        raise RecordError(f"{where}: missing field {key!r}")
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: {key}: expected a non-empty list of turns")
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}: {key}[{i}]: expected an object, got {type(turn).__name__}")
    return value


def alpaca_messages(record: dict, where: str) -> list[dict]:
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, optional=True)
    output = _string(record, "output", where)
    content = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": content, "instruction": instruction, "input": extra},
            {"role": "assistant", "content": output}]


def _role_messages(record: dict, where: str, key: str, role_key: str, content_key: str, roles: dict,
                   noun: str) -> list[dict]:
    """The turns under `key` as messages; each turn's `role_key` names its role through `roles`."""
    messages = []
    for i, turn in enumerate(_turns(record, key, where)):
        at = f"{where}: {key}[{i}]"
        name = _string(turn, role_key, at)
        if name not in roles:
            raise RecordError(f"{at}.{role_key}: unknown {noun} {name!r} (expected one of {list(roles)})")
        messages.append({"role": roles[name], "content": _string(turn, content_key, at)})
    return messages


def sharegpt_messages(record: dict, where: str) -> list[dict]:
    return _role_messages(record, where, "conversations", "from", "value", SHAREGPT_ROLES, "speaker")


def chat_messages(record: dict, where: str) -> list[dict]:
    return _role_messages(record, where, "messages", "role", "content", {role: role for role in ROLES}, "role")


_READERS = {"alpaca": alpaca_messages, "sharegpt": sharegpt_messages, "chat": chat_messages}


def field_renames(fields: Iterable[str]) -> dict[str, str]:
    """{dataset field: format field} from "format_field=dataset_field" items (a source's `fields`)."""
    renames = {}
    for item in fields:
        ours, sep, theirs = item.partition("=")
        if not (sep and ours.strip() and theirs.strip()):
            raise ValueError(f"fields: {item!r} is not of the form format_field=dataset_field")
        renames[theirs.strip()] = ours.strip()
    return renames


def _renamed(record: dict, renames: dict[str, str]) -> dict:
    """`record` with its fields, and those of the turns in its list fields, renamed by `renames`."""
    def rename(d: dict) -> dict:
        return {renames.get(k, k): v for k, v in d.items()}
    return {k: [rename(t) if isinstance(t, dict) else t for t in v] if isinstance(v, list) else v
            for k, v in rename(record).items()}


def record_messages(kind: str, line: str, where: str, renames: dict[str, str] | None = None) -> list[dict]:
    """The messages of one JSONL line of format `kind`; `where` ("file:line") prefixes every error."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return messages_of(kind, record, where, renames)


def messages_of(kind: str, record: dict, where: str, renames: dict[str, str] | None = None) -> list[dict]:
    """The messages of one record (a parsed JSON object or a decoded TFDS record) of format `kind`."""
    messages = _READERS[kind](_renamed(record, renames) if renames else record, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(f"{where}: the conversation has no assistant turn: nothing to learn from it")
    if any(m["role"] == "system" for m in messages[1:]):
        raise RecordError(f"{where}: a system message must come first")
    return messages


def read_conversations(kind: str, path: str, *, skip_bad_lines: bool = False,
                       fields: Iterable[str] = ()) -> Iterator[tuple[str, list[dict]]]:
    """("file:line", messages) of every non-blank line of the JSONL file `path`."""
    renames = field_renames(fields)
    try:
        with open(path, encoding="utf-8", newline="") as fh:  # lines end at "\n", as in sources._read_jsonl
            lines = fh.read().split("\n")
    except UnicodeDecodeError as e:
        raise RecordError(f"{path}: not UTF-8 text ({e.reason})") from None
    records = ((f"{path}:{number}", lambda where, line=line: record_messages(kind, line, where, renames))
               for number, line in enumerate(lines, start=1) if line.strip())
    return strict_conversations(records, path, skip_bad_lines=skip_bad_lines)


def strict_conversations(records: Iterable[tuple[str, Callable[[str], list[dict]]]], source: str, *,
                         skip_bad_lines: bool) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for each (where, read) of `records` (`read(where)` gives the messages): the first
    `RecordError` stops the source, or with `skip_bad_lines` each is counted, then warned about once."""
    skipped, first = 0, None
    for where, read in records:
        try:
            messages = read(where)
        except RecordError as e:
            if not skip_bad_lines:
                raise RecordError(f"{e}; set skip_bad_lines to skip such records") from None
            skipped, first = skipped + 1, first or str(e)
            continue
        yield where, messages
    if skipped:
        log.warning("skipped %d bad record(s) in %s, first: %s", skipped, source, first)
