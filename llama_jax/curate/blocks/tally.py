"""Per-task counters written as small JSON files, summed afterwards by the funnel report.

Files under a shared output directory work the same for local, Slurm and Ray tasks, and a relaunched
task simply overwrites its own file, so the sums stay right however often a task ran.
"""
from __future__ import annotations

import json
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from llama_jax.utils.files import write_atomically


def write_tally(directory: str | Path, rank: int, counts: dict[str, int]) -> None:
    write_atomically(Path(directory) / f"{rank:05d}.json", json.dumps(counts).encode())


def read_tally(directory: str | Path) -> dict[str, int]:
    """The counts of every task that wrote one under `directory` (empty if none did)."""
    total: dict[str, int] = {}
    for path in sorted(Path(directory).glob("*.json")):
        for key, value in json.loads(path.read_text()).items():
            total[key] = total.get(key, 0) + value
    return total


class FunnelCounter(PipelineStep):
    """Counts the documents and UTF-8 bytes flowing past it, for one side ("in" or "out") of a stage."""

    name = "funnel counter"
    type = "📊 - STATS"

    def __init__(self, directory: str):
        super().__init__()
        self.directory = directory

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        docs = size = 0
        for doc in data or ():
            docs += 1
            size += len(doc.text.encode("utf-8", "surrogatepass"))
            yield doc
        write_tally(self.directory, rank, {"docs": docs, "bytes": size})
