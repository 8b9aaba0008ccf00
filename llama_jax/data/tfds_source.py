"""TensorFlow Datasets sources, read through `tfds.data_source` (array_record): no TensorFlow needed.

`tensorflow_datasets` is imported only here, and only when a tfds source is configured, so the model,
kernels and benchmarks run without it. `data_dir` lets an offline or pre-downloaded catalog work:
nothing is ever downloaded; a dataset must already be prepared there (in array_record format).
"""
from __future__ import annotations

from llama_jax.data.config import SourceConfig


def open_prepared_split(name: str, split: str, data_dir: str | None):
    """(builder, records) of a dataset split prepared as array_record in `data_dir`; never downloads.

    Shared by training sources and evaluation tasks, so both refuse a missing, unprepared or
    tfrecord-only dataset, or a missing split, with the same message.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"TFDS dataset {name!r} needs the tensorflow-datasets package") from e

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
    field = src.text_field
    docs = []
    for start in range(0, len(records), 1024):
        for record in records.__getitems__(range(start, min(start + 1024, len(records)))):
            value = record[field]
            docs.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return docs


def tfds_fingerprint(src: SourceConfig) -> str:
    """Identity of the prepared split: where it lives, its version and its record count."""
    builder, _ = _prepared_split(src)
    return f"{builder.data_dir}\t{builder.info.version}\t{builder.info.splits[src.split].num_examples}"
