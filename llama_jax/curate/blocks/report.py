"""The funnel report as the run's last one-task phase."""
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep


class FunnelReport(PipelineStep):
    name = "📋 funnel report"
    type = "📊 - STATS"

    def __init__(self, root: str, stages: dict[str, list[str]]):
        super().__init__()
        self.root, self.stages = root, stages

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from pathlib import Path

        from llama_jax.curate.funnel import write_funnel

        write_funnel(Path(self.root), self.stages)
        yield from ()
