"""A checkpoint save that fails (disk full, any I/O error): `train.py` prints one error line naming the step,
the cause and the intact previous checkpoint, exits 2 with no traceback (unless --debug), and rerunning
resumes from that previous checkpoint with the losses of an uninterrupted run (the oracle).

The failures are made in a child `train.py` two ways: ENOSPC raised by orbax's own file writes (what a full
disk does to them), and a real write failure of tensorstore's array files from a file-size limit
(RLIMIT_FSIZE, EFBIG), set once step 2 is safely saved; both hit the save of step 4.
"""
from __future__ import annotations

import logging
import sys
import warnings

import pytest

from test_train import (compilation_cache, corpus, losses_from_jsonl, overrides, run_in_process,  # noqa: F401
                        run_python)

FAIL_SAVE_OF_STEP_4 = r"""
import errno, os, resource, signal, sys

if os.environ["INJECT"] == "enospc":
    from orbax.checkpoint._src.path import async_path

    def failing(original):
        async def write(path, data):
            if any(part.startswith("4.orbax-checkpoint-tmp") for part in str(path).split("/")):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return await original(path, data)
        return write

    async_path.write_bytes, async_path.write_text = failing(async_path.write_bytes), failing(async_path.write_text)
else:
    from llama_jax.checkpoint import run as checkpoints

    save = checkpoints.RunCheckpoints.save

    def save_with_a_file_size_limit(self, step, *args, **kwargs):
        if step == 4:
            self.wait()  # step 2 is complete; now writing a file beyond 8000 bytes fails with EFBIG: the
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # arrays' files, not metrics.jsonl (6 lines)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8000, resource.RLIM_INFINITY))
        return save(self, step, *args, **kwargs)

    checkpoints.RunCheckpoints.save = save_with_a_file_size_limit
sys.argv = ["train.py", *sys.argv[1:]]
import train
sys.exit(train.run())  # what `python train.py` runs
"""

CAUSES = {"enospc": "[Errno 28] No space left on device: ", "fsize": "File too large"}


SETTINGS = {"steps": 6, "checkpoint_every": 2, "final_eval": "false"}


def fail_at_step_4(corpus, cache_dir, run_dir, inject, *flags):  # noqa: F811
    return run_python(FAIL_SAVE_OF_STEP_4, *overrides(corpus, run_dir, **SETTINGS), *flags, timeout=300,
                      env_extra={"INJECT": inject, "JAX_COMPILATION_CACHE_DIR": cache_dir,
                                 "LLAMA_JAX_MALLOC_TUNING": "0"})  # one interpreter start, not two


@pytest.fixture(scope="module")
def oracle(corpus, tmp_path_factory):  # noqa: F811
    """An uninterrupted run's losses, steps 1..6."""
    return run_in_process(corpus, tmp_path_factory.mktemp("oracle") / "run", **SETTINGS).losses


@pytest.mark.parametrize("inject", sorted(CAUSES))
def test_a_failed_save_is_one_line_exit_2_and_the_previous_step_resumes(corpus, compilation_cache, oracle,  # noqa: F811
                                                                         tmp_path, inject):
    run = tmp_path / "run"
    child = fail_at_step_4(corpus, compilation_cache, run, inject)
    assert child.returncode == 2, child.stderr[-3000:]
    assert child.stderr.startswith("error: saving checkpoint step 4 in ") and child.stderr.count("\n") == 1, \
        child.stderr[-3000:]
    assert CAUSES[inject] in child.stderr
    assert "the previous checkpoint (step 2) is intact" in child.stderr
    assert "Traceback" not in child.stdout + child.stderr and "ERROR:absl" not in child.stderr

    resumed = run_in_process(corpus, run, **SETTINGS)
    assert resumed.first_step == 3 and resumed.losses == oracle[2:]  # bitwise, fp32 CPU
    assert losses_from_jsonl(run) == dict(enumerate(oracle, 1))


@pytest.mark.slow  # one more child; the fast tests above cover "no traceback without --debug"
def test_debug_shows_the_tracebacks_and_the_same_line(corpus, compilation_cache, tmp_path):  # noqa: F811
    child = fail_at_step_4(corpus, compilation_cache, tmp_path / "run", "enospc", "--debug")
    assert child.returncode == 2
    assert "Traceback (most recent call last):" in child.stderr and "OSError: [Errno 28]" in child.stderr
    assert any(line.startswith("error: saving checkpoint step 4 in ") for line in child.stderr.splitlines())


def test_main_leaves_stderr_excepthook_logging_and_warnings_as_it_found_them(capsys):
    """Tests and notebooks call `main`; only the command's entry point (`run`) hides library tracebacks,
    for the process it owns. Two calls of `main` (each reaching the point where training would start)
    leave sys.stderr, sys.excepthook, the absl/asyncio log filters and the warning filters untouched."""
    from llama_jax.cli.train import main

    def process_state():
        return (sys.stderr, sys.excepthook, list(logging.getLogger("absl").filters),
                list(logging.getLogger("asyncio").filters), list(warnings.filters))

    before = process_state()
    assert main(["steps=-1"]) == 2
    after_first = process_state()
    assert main(["steps=-1"]) == 2
    assert process_state() == after_first == before
    assert capsys.readouterr().err.startswith("error: steps")


@pytest.mark.parametrize("hide", [True, False])
def test_never_awaited_coroutines_of_dead_event_loops_are_hidden_without_debug(hide):
    """At exit the coroutines of orbax's dead event loops are garbage-collected with a RuntimeWarning
    each (seen once in CI as two extra stderr lines after the error line); without --debug they are
    hidden like the threads' tracebacks, while any other warning still shows (control: hide=False)."""
    program = ("import gc, warnings\n"
               "from llama_jax.cli.quiet import hide_library_tracebacks\n"
               f"if {hide}: hide_library_tracebacks()\n"
               "async def write_fragment(): pass\n"
               "write_fragment(); gc.collect()\n"
               "warnings.warn('another warning', UserWarning)\n")
    child = run_python(program)
    assert child.returncode == 0 and "another warning" in child.stderr
    assert ("was never awaited" in child.stderr) is not hide, child.stderr


@pytest.mark.parametrize("hide", [True, False])
def test_never_retrieved_task_and_future_exceptions_are_hidden_without_debug(hide):
    """orbax's failed writes leave tasks and futures whose exceptions nobody retrieves; when they are
    garbage-collected asyncio logs each ("Task/Future exception was never retrieved", a future's without a
    traceback; seen in CI as 6-21 extra lines after the error line). Without --debug asyncio's error
    records are hidden (train.py runs no event loop of its own), while another logger's error still
    shows; with hide=False everything shows (control)."""
    program = ("import asyncio, gc, logging\n"
               "from llama_jax.cli.quiet import hide_library_tracebacks\n"
               "logging.basicConfig()\n"  # as absl does on orbax's first log call
               f"if {hide}: hide_library_tracebacks()\n"
               "async def write_fragment():\n    raise ValueError('task failed')\n"
               "async def main():\n"
               "    task = asyncio.ensure_future(write_fragment())\n"
               "    asyncio.get_running_loop().create_future().set_exception(OSError('future failed'))\n"
               "    await asyncio.sleep(0.01)\n"
               "asyncio.run(main()); gc.collect()\n"
               "logging.getLogger('llama_jax').error('another error')\n")
    child = run_python(program)
    assert child.returncode == 0 and "another error" in child.stderr, child.stderr
    assert ("task failed" in child.stderr) is not hide, child.stderr
    assert ("future failed" in child.stderr) is not hide, child.stderr
