"""StackExchange `Posts.xml` (the site dumps' format): one document per question, holding its title,
body and its answers sorted by score (highest first), HTML stripped.

The file must be a `<posts>` element of `<row>` elements; anything else (malformed XML, a row without
an Id, a non-integer Score) is an error naming the file, never a crash mid-way with a half-written shard.
Answers whose question is missing are dropped (counted).
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader

from llama_jax.curate.blocks.html_text import html_to_text
from llama_jax.curate.blocks.readers import open_source
from llama_jax.curate.errors import CurateError

QUESTION, ANSWER = "1", "2"


@dataclass
class Thread:
    title: str
    body: str
    answers: list[tuple[int, int, str]] = field(default_factory=list)  # (score, id, body)


def _int(row: ET.Element, key: str, where: str) -> int:
    value = row.get(key)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise CurateError(f"{where}: row {row.get('Id')!r}: {key}={value!r} is not an integer") from None


def parse_posts(stream, where: str) -> tuple[list[dict], int]:
    """Threads of the Posts.xml read from binary `stream` as records {"id", "text", "question_id"}, in
    question-id order, and the number of orphan answers dropped. `where` names the file in errors."""
    threads: dict[int, Thread] = {}
    answers: list[tuple[int, int, int, str]] = []
    try:
        events = ET.iterparse(stream, events=("start", "end"))
        _, root = next(events)
        if root.tag != "posts":
            raise CurateError(f"{where}: root element is <{root.tag}>, expected <posts>")
        for event, row in events:
            if event != "end" or row is root:
                continue
            if row.tag != "row":
                raise CurateError(f"{where}: unexpected element <{row.tag}> in <posts>")
            post_id, kind = _int(row, "Id", where), row.get("PostTypeId")
            if kind == QUESTION:
                threads[post_id] = Thread(row.get("Title", ""), row.get("Body", ""))
            elif kind == ANSWER:
                answers.append((_int(row, "ParentId", where), _int(row, "Score", where), post_id, row.get("Body", "")))
            root.clear()
    except ET.ParseError as e:
        raise CurateError(f"{where}: not well-formed XML ({e})") from None
    except StopIteration:
        raise CurateError(f"{where}: empty file") from None
    orphans = 0
    for parent, score, post_id, body in answers:
        if parent in threads:
            threads[parent].answers.append((score, post_id, body))
        else:
            orphans += 1
    records = []
    for question_id in sorted(threads):
        thread = threads[question_id]
        parts = [html_to_text(thread.title), html_to_text(thread.body)]
        for _score, _id, body in sorted(thread.answers, key=lambda a: (-a[0], a[1])):
            parts.append(html_to_text(body))
        text = "\n\n".join(p for p in parts if p)
        if text:
            records.append({"id": f"q{question_id}", "text": text, "question_id": question_id})
    return records, orphans


class StackExchangeReader(BaseDiskReader):
    name = "💬 StackExchange Posts.xml"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with open_source(self.data_folder, filepath, "dump") as fh:
            records, orphans = parse_posts(fh, self.data_folder.resolve_paths(filepath))
        self.stat_update("orphan_answers", value=orphans)
        for number, record in enumerate(records):
            yield self.get_document_from_dict(record, filepath, number)
