"""Readers that never crash on one bad document, and always name the file they cannot read.

A line that is not UTF-8 or not a JSON object with the text field is counted (per reason, in a tally
the funnel reports) and skipped; a file that cannot be opened or decompressed stops the run with a
`CurateError` naming it.
"""
from __future__ import annotations

import contextlib
import json
from typing import BinaryIO, Iterator

from datatrove.data import DocumentsPipeline
from datatrove.io import DataFolder
from datatrove.pipeline.readers.base import BaseDiskReader

from llama_jax.curate.blocks.tally import write_tally
from llama_jax.curate.errors import CurateError
from llama_jax.utils.text import lone_surrogate


@contextlib.contextmanager
def open_source(folder: DataFolder, filepath: str, noun: str) -> Iterator[BinaryIO]:
    """`filepath` of `folder` opened for binary reading, decompressed by its extension; a file that cannot
    be opened, read or decompressed (permissions, gzip/zstd corruption, truncation), even while the
    caller reads it, becomes one CurateError naming it as an unreadable `noun`."""
    try:
        with folder.open(filepath, "rb", compression="infer") as fh:
            yield fh
    except (OSError, EOFError, ValueError) as e:
        raise CurateError(f"{folder.resolve_paths(filepath)}: unreadable {noun} ({e})") from e


class SafeJsonlReader(BaseDiskReader):
    """JSON Lines (plain, .gz or .zst), one document per line, text in `text_key`."""

    name = "🐿 safe jsonl"

    def __init__(self, data_folder: str, skipped_dir: str, text_key: str = "text", **kwargs):
        super().__init__(data_folder, text_key=text_key, **kwargs)
        self.skipped_dir = skipped_dir
        self.skipped = {"not_utf8": 0, "bad_json": 0, "no_text": 0}

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with open_source(self.data_folder, filepath, "shard") as fh:
            for number, raw in enumerate(fh):
                if not raw.strip():
                    continue
                document = self._parse(raw, filepath, number)
                if document is not None:
                    yield document

    def _parse(self, raw: bytes, filepath: str, number: int):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return self._skip("not_utf8")
        except json.JSONDecodeError:
            return self._skip("bad_json")
        if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str) or not record[self.text_key]:
            return self._skip("no_text")
        if lone_surrogate(record[self.text_key]) is not None:  # valid JSON (an escaped lone surrogate), not text
            return self._skip("not_utf8")
        return self.get_document_from_dict(record, filepath, number)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.stat_update(f"skipped_{reason}")
        return None

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        yield from super().run(data, rank, world_size)
        write_tally(self.skipped_dir, rank, self.skipped)
