"""The mixing step as a datatrove block (one task): reads each source's curated output, writes the
mixture's shards and its manifest (the file `SourceConfig(kind="curated")` reads). Every shard line keeps
the document's raw-input id (and url), so a training document can be traced to where it was crawled."""
from __future__ import annotations

import json
from pathlib import Path

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from llama_jax.curate.blocks.readers import SafeJsonlReader
from llama_jax.curate.mixture import Doc, count_tokens, interleave_into_shards, plan_mixture
from llama_jax.data.curated import FORMAT, MANIFEST
from llama_jax.utils.files import write_atomically


def provenance(doc: Doc) -> dict:
    """A shard line: the text, its source, the id it had in the raw input and its url when it has one."""
    record = {"text": doc.text, "source": doc.source, "id": doc.id}
    if doc.url:
        record["url"] = doc.url
    return record


class MixtureWriter(PipelineStep):
    name = "🥣 mixture"
    type = "💽 - WRITER"

    def __init__(self, inputs: dict[str, str], weights: dict[str, float], epochs: dict[str, float],
                 output_dir: str, shard_tokens: int, seed: int, skipped_dir: str):
        super().__init__()
        self.inputs, self.weights, self.epochs = inputs, weights, epochs
        self.output_dir, self.shard_tokens, self.seed, self.skipped_dir = output_dir, shard_tokens, seed, skipped_dir

    def _read(self, name: str, folder: str) -> list[Doc]:
        if not Path(folder).is_dir():
            return []
        reader = SafeJsonlReader(folder, skipped_dir=f"{self.skipped_dir}/{name}")
        return [Doc(name, doc.text, count_tokens(doc.text), doc.id, str(doc.metadata.get("url") or ""))
                for doc in reader.run()]

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        sources = {name: self._read(name, folder) for name, folder in sorted(self.inputs.items())}
        plan = plan_mixture(sources, self.weights, self.epochs)
        shards = interleave_into_shards(plan["selected"], self.shard_tokens, self.seed)
        out = Path(self.output_dir)
        entries = []
        for i, shard in enumerate(shards):
            name = f"shard-{i:05d}.jsonl"
            lines = "".join(json.dumps(provenance(d), ensure_ascii=False) + "\n" for d in shard)
            write_atomically(out / name, lines.encode("utf-8"))
            entries.append({"file": name, "documents": len(shard), "tokens": sum(d.tokens for d in shard)})
        total = sum(e["tokens"] for e in entries)
        report = {}
        for name, docs in plan["selected"].items():
            tokens = sum(d.tokens for d in docs)
            report[name] = {"weight": plan["share"][name], "share": tokens / total, "tokens": tokens,
                            "tokens_available": plan["available"][name],
                            "epochs": tokens / plan["available"][name], "max_epochs": self.epochs[name]}
        manifest = {"format": FORMAT, "tokens": total, "sources": report, "shards": entries}
        write_atomically(out / MANIFEST, json.dumps(manifest, indent=1).encode())
        yield from ()
