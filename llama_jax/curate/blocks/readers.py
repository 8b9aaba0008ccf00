"""Readers that never crash on one bad document, and always name the file they cannot read.

A line that is not UTF-8 or not a JSON object with the text field is counted (per reason, in a tally
the funnel reports) and skipped; a file that cannot be opened or decompressed stops the run with a
`CurateError` naming it.
"""
from __future__ import annotations

import json

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.readers.base import BaseDiskReader

from llama_jax.curate.blocks.tally import write_tally
from llama_jax.curate.errors import CurateError


class SafeJsonlReader(BaseDiskReader):
    """JSON Lines (plain, .gz or .zst), one document per line, text in `text_key`."""

    name = "🐿 safe jsonl"

    def __init__(self, data_folder: str, skipped_dir: str, text_key: str = "text", **kwargs):
        super().__init__(data_folder, text_key=text_key, **kwargs)
        self.skipped_dir = skipped_dir
        self.skipped = {"not_utf8": 0, "bad_json": 0, "no_text": 0}

    def read_file(self, filepath: str) -> DocumentsPipeline:
        try:
            with self.data_folder.open(filepath, "rb", compression="infer") as fh:
                for number, raw in enumerate(fh):
                    if not raw.strip():
                        continue
                    document = self._parse(raw, filepath, number)
                    if document is not None:
                        yield document
        except (OSError, EOFError, ValueError) as e:  # gzip/zstd corruption, permissions, truncation
            raise CurateError(f"{self.data_folder.resolve_paths(filepath)}: unreadable shard ({e})") from e

    def _parse(self, raw: bytes, filepath: str, number: int):
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            return self._skip("not_utf8")
        except json.JSONDecodeError:
            return self._skip("bad_json")
        if not isinstance(record, dict) or not isinstance(record.get(self.text_key), str) or not record[self.text_key]:
            return self._skip("no_text")
        return self.get_document_from_dict(record, filepath, number)

    def _skip(self, reason: str) -> None:
        self.skipped[reason] += 1
        self.stat_update(f"skipped_{reason}")
        return None

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        yield from super().run(data, rank, world_size)
        write_tally(self.skipped_dir, rank, self.skipped)
