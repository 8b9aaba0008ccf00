"""Task accuracy during training (config `eval_tasks`, every `task_eval_every` steps).

`TaskEval.prepare` reads the tasks and builds every prompt without a model, so an unknown task or a bad
file stops the run before the train step compiles. `bind` then makes an EvalModel *view* of the training
state: the same sharded arrays on the training mesh with the training rules, nothing copied to the host
or duplicated on the devices. One TaskRunner serves the whole run; each evaluation only swaps in the
current params (same shapes and shardings), so its programs compile at the first evaluation only.
"""
from __future__ import annotations

from llama_jax.evaluation.loading import EvalModel
from llama_jax.evaluation.runner import Prepared, RunOptions, TaskRunner, prepare
from llama_jax.evaluation.catalog import load_tasks
from llama_jax.training.config import TrainConfig
from llama_jax.utils.config_io import ConfigError


class TaskEval:
    """The configured tasks, checked; call `bind` once the mesh exists, then the object with params."""

    def __init__(self, cfg: TrainConfig, prepared: list[Prepared], options: RunOptions):
        self._every, self._final_step = cfg.task_eval_every, cfg.steps
        self._prepared, self._options = prepared, options
        self._runner: TaskRunner | None = None

    @classmethod
    def prepare(cls, cfg: TrainConfig) -> "TaskEval | None":
        """None when no task is configured; else every task loaded and its prompts built (ConfigError
        naming `eval_tasks` and the task on bad input)."""
        section = cfg.eval_tasks
        if not section.tasks:
            return None
        options = RunOptions(num_fewshot=section.num_fewshot, limit=section.limit, batch_size=section.batch_size,
                             allow_unsafe_code=section.unsafe_run_generated_code)
        try:
            prepared = [prepare(t, options) for t in load_tasks(section.tasks, data_dir=section.data_dir)]
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"eval_tasks: {e}") from None
        return cls(cfg, prepared, options)

    def bind(self, cfg: TrainConfig, tokenizer, mesh, rules) -> None:
        """Build the runner on the training mesh; the params come with each call (the train step donates
        the state's buffers, so none is held in between)."""
        self._runner = TaskRunner(EvalModel(cfg.model, None, tokenizer, mesh, rules), self._options)

    def due(self, step: int) -> bool:
        """Every `task_eval_every` steps and at the run's final step."""
        return bool(self._every and step % self._every == 0) or step == self._final_step

    def __call__(self, params) -> dict[str, dict]:
        """{task: metrics} of the tasks scored with `params`."""
        self._runner.use_params(params)
        return {p.task.name: self._runner.run(p)[0] for p in self._prepared}
