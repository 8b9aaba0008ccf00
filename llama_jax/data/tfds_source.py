"""TensorFlow Datasets sources, read through `tfds.data_source` (array_record): no TensorFlow needed.
Text for pretraining (`read_tfds_documents`) and conversations for fine-tuning (`read_tfds_conversations`).

`tensorflow_datasets` is imported only here, and only when a tfds source is configured, so the model,
kernels and benchmarks run without it. `data_dir` lets an offline or pre-downloaded catalog work:
nothing is ever downloaded; a dataset must already be prepared there (in array_record format).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from llama_jax.data.chat_records import RecordError, field_renames, messages_of, strict_conversations
from llama_jax.data.config import SourceConfig
from llama_jax.utils.extras import require


def open_prepared_split(name: str, split: str, data_dir: str | None):
    """(builder, records) of a dataset split prepared as array_record in `data_dir`; never downloads.

    Shared by training sources and evaluation tasks, so both refuse a missing, unprepared or
    tfrecord-only dataset, or a missing split, with the same message.
    """
    require("tfds", f"TFDS dataset {name!r}")
    import tensorflow_datasets as tfds

    where = f"data_dir={data_dir!r}" if data_dir else "TFDS's default data_dir"
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"TFDS dataset {name!r} is not in the catalog and not found prepared in {where}") from e
    if not builder.is_prepared():
        raise ValueError(f"TFDS dataset {name!r} is not prepared in {where}: prepare it there first "
                         f"(download_and_prepare with file_format='array_record'); nothing is downloaded")
    if split not in builder.info.splits:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r} (splits: {sorted(builder.info.splits)})")
    try:
        records = builder.as_data_source(split=split)
    except NotImplementedError as e:  # prepared as tfrecord: only TensorFlow could read it
        raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} is not in array_record format ({e})") from e
    return builder, records


def _prepared_split(src: SourceConfig):
    """The source's (builder, records), after also checking that the text field exists."""
    builder, records = open_prepared_split(src.name, src.split, src.data_dir)
    if src.text_field not in builder.info.features:
        raise ValueError(f"TFDS dataset {src.name!r} has no feature {src.text_field!r} "
                         f"(features: {sorted(builder.info.features)})")
    return builder, records


def read_tfds_documents(src: SourceConfig) -> list[str]:
    """The split's texts in record order, decoded from UTF-8 (TFDS returns text features as bytes)."""
    _, records = _prepared_split(src)
    docs = []
    for _, record in _batches(records):
        value = record[src.text_field]
        docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return docs


def tfds_fingerprint(src: SourceConfig) -> str:
    """Identity of the prepared split: where it lives, its version and its record count."""
    builder, _ = _prepared_split(src)
    return f"{builder.data_dir}\t{builder.info.version}\t{builder.info.splits[src.split].num_examples}"


def _batches(records) -> Iterator[tuple[int, dict]]:
    """(index, record) of every record, read 1,024 at a time."""
    for start in range(0, len(records), 1024):
        yield from enumerate(records.__getitems__(range(start, min(start + 1024, len(records)))), start=start)


def plain_record(value, where: str, *, top: bool = True):
    """A TFDS record as the JSON a JSONL line would hold: text (bytes) decoded from UTF-8, arrays as lists,
    numpy scalars as Python numbers, and a nested dict of equal-length lists (how TFDS returns a Sequence
    of FeaturesDict, e.g. the turns of a conversation) as a list of dicts."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"{where}: not UTF-8 text ({e.reason})") from None
    if isinstance(value, (np.ndarray, list, tuple)):
        return [plain_record(v, where, top=False) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        plain = {k: plain_record(v, where, top=False) for k, v in value.items()}
        columns = list(plain.values())
        if not top and columns and all(isinstance(c, list) and len(c) == len(columns[0]) for c in columns):
            return [dict(zip(plain, row)) for row in zip(*columns)]
        return plain
    return value


def read_tfds_conversations(src: SourceConfig) -> Iterator[tuple[str, list[dict]]]:
    """("tfds:NAME[split]#index", messages) of every record of a conversation source's TFDS split, read by
    the same strict readers as JSONL lines (after `src.fields` renames)."""
    _, records = open_prepared_split(src.name, src.split, src.data_dir)
    renames, label = field_renames(src.fields), f"tfds:{src.name}[{src.split}]"
    items = ((f"{label}#{i}", lambda where, record=record: messages_of(src.kind, plain_record(record, where), where,
                                                                      renames))
             for i, record in _batches(records))
    return strict_conversations(items, label, skip_bad_lines=src.skip_bad_lines)
