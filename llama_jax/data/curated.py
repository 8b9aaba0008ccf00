"""A curated mixture directory (written by `python -m llama_jax.curate`) as a training source.

The directory holds `manifest.json` and JSONL shards whose documents already interleave the curated
sources in the configured proportions, so training reads them as one source (kind "curated"). This
module only reads the manifest: it is the contract between the curation package and the data pipeline.
"""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "llama_jax.curated/1"


def curated_shards(directory: str | Path) -> list[str]:
    """The shard files listed by the mixture's manifest, checked to exist."""
    directory = Path(directory).expanduser()
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"curated source: {manifest_path} does not exist "
                                f"(expected the output of python -m llama_jax.curate)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
        shards = [directory / entry["file"] for entry in manifest["shards"]]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{manifest_path}: not a curated-mixture manifest ({e})") from None
    if not shards:
        raise ValueError(f"{manifest_path}: lists no shards")
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{manifest_path}: shard {shard} does not exist")
    return [str(s) for s in shards]
