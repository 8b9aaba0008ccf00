"""Read a source's documents as text, and fingerprint them cheaply for the token cache.

Documents are returned in a fixed order (sorted file names; line order within JSONL files; TFDS's own
record order), so everything downstream is deterministic. Empty documents are dropped; a source left
with none is an error ("empty corpus"), as are missing paths and malformed JSONL lines, each reported
with the file (and line) at fault, before any model code runs.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from pathlib import Path

from llama_jax.data import corpus
from llama_jax.data.curated import curated_shards
from llama_jax.data.config import SourceConfig
from llama_jax.utils.text import lone_surrogate

log = logging.getLogger(__name__)


def resolve_paths(pattern: str, *, key: str) -> list[str]:
    """Files named by `pattern`: a file, a directory (every non-hidden file below it) or a glob (`**` ok).

    `key` names the setting the pattern came from, for the error message.
    """
    p = Path(pattern).expanduser()
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise FileNotFoundError(f"{key}: directory {p} holds no files")
        return files
    if glob.has_magic(str(p)):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"{key}: glob {pattern!r} matches no files")
        return files
    raise FileNotFoundError(f"{key}: {pattern} does not exist")


def _source_files(src: SourceConfig) -> list[str]:
    if src.kind == "builtin":
        return [str(f) for f in corpus.builtin_files(src.split)]
    if src.kind == "curated":
        return curated_shards(src.path)
    return resolve_paths(src.path, key=f"source path ({src.describe()})")


def _read_utf8(path: str, *, newline: str | None = None) -> str:
    """The file's text; `newline` as for `open` (None: universal newlines, "": the file's own)."""
    try:
        with open(path, encoding="utf-8", newline=newline) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from e


def _read_jsonl(path: str, text_field: str, skip_bad_lines: bool) -> list[str]:
    docs, bad = [], []
    # JSON Lines end at "\n" ("\r\n" leaves a "\r", JSON whitespace): line numbers are those of grep -n, and
    # U+2028, U+0085, ... (which str.splitlines would also cut at) stay text inside a JSON string
    for number, line in enumerate(_read_utf8(path, newline="").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            problem = f"{path}:{number}: not valid JSON ({getattr(e, 'msg', 'nested too deeply')})"
        else:
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                problem = (f"{path}:{number}: no string field {text_field!r}"
                           + (f" (keys: {sorted(record)})" if isinstance(record, dict) else " (not a JSON object)"))
            elif (surrogate := lone_surrogate(text)) is not None:
                problem = f"{path}:{number}: {text_field}: {surrogate}"
            else:
                docs.append(text)
                continue
        if not skip_bad_lines:
            raise ValueError(problem + "; set skip_bad_lines to skip such lines")
        bad.append(problem)
    if bad:
        log.warning("skipped %d bad line(s) in %s, first: %s", len(bad), path, bad[0])
    return docs


def read_documents(src: SourceConfig) -> list[str]:
    """All non-empty documents of `src`, in a fixed order."""
    if src.kind == "tfds":
        from llama_jax.data.tfds_source import read_tfds_documents

        docs = read_tfds_documents(src)
    elif src.kind in ("jsonl", "curated"):
        docs = [d for f in _source_files(src) for d in _read_jsonl(f, src.text_field, src.skip_bad_lines)]
    else:
        docs = [_read_utf8(f) for f in _source_files(src)]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"empty corpus: source {src.describe()} has no non-empty documents")
    return docs


def source_fingerprint(src: SourceConfig) -> str:
    """Changes when the source's documents may have: its settings plus each file's path, size and mtime
    (for TFDS: the prepared dataset's version and record counts). Reads no document."""
    h = hashlib.sha256(repr(dataclasses.replace(src, weight=1.0)).encode())  # weight: sampling only
    if src.kind == "tfds":
        from llama_jax.data.tfds_source import tfds_fingerprint

        h.update(tfds_fingerprint(src).encode())
    else:
        for f in _source_files(src):
            stat = os.stat(f)
            h.update(f"{os.path.abspath(f)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()
