"""Keep library threads' tracebacks off the terminal, so a failure reads as the command's one error line.

When a checkpoint save fails (a full disk), orbax logs the exception from each of its worker threads and
tensorstore's callbacks print hundreds of lines of "Event loop is closed" tracebacks into the dying event
loops, before the main thread even learns of the failure. The command then reports the failure itself,
as one line. At exit, the coroutines those dead loops never ran are garbage-collected, and Python warns
about each ("coroutine ... was never awaited"); their failed tasks and futures are collected too, and
asyncio logs each ("Task/Future exception was never retrieved", with or without a traceback). Without
`--debug` the commands therefore hide (a) ERROR records that orbax or asyncio log (these commands run no
event loop of their own: every one is orbax's), (b) traceback blocks written to `sys.stderr` and (c)
those never-awaited warnings; every other line passes through unchanged, and an exception that escapes the main thread (a
bug, not a reported failure) still prints its traceback.
"""
from __future__ import annotations

import logging
import sys
import threading
import traceback
import warnings

# What starts a block: the traceback itself, or the header Python prints before a thread's or an atexit
# callback's traceback.
_BLOCK_STARTS = ("Traceback (most recent call last):", "Exception in thread ", "Exception ignored in")
_CHAINING = ("During handling of the above exception, another exception occurred:",
             "The above exception was the direct cause of the following exception:")


class _TracebackFilter:
    """A stand-in for sys.stderr that drops traceback blocks (with their headers). Threads print
    their tracebacks concurrently, so each thread's partial line and state are kept apart."""

    def __init__(self, stream):
        self.stream = stream
        self._local = threading.local()

    def write(self, text: str) -> int:
        state = self._local
        *lines, state.pending = (getattr(state, "pending", "") + text).split("\n")
        for line in lines:
            if self._keep(state, line):
                self.stream.write(line + "\n")
        return len(text)

    @staticmethod
    def _keep(state, line: str) -> bool:
        if line.startswith(_BLOCK_STARTS):
            state.in_traceback = True
            return False
        if not getattr(state, "in_traceback", False):
            return True
        if line.startswith((" ", "\t")) or line.strip() in _CHAINING or not line.strip():
            return False  # a frame, a chaining note or the blank lines around it
        state.in_traceback = False  # the exception's own line ends the block
        return False

    def flush(self) -> None:
        state = self._local
        if getattr(state, "pending", "") and not getattr(state, "in_traceback", False):
            self.stream.write(state.pending)
        state.pending = ""
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def _not_orbax_error(record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and "orbax" in record.pathname.replace("\\", "/").split("/"))


def _not_an_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


def hide_library_tracebacks() -> None:
    """For the rest of this process (threads may print until it exits): filter sys.stderr and orbax's
    error records; the main thread's uncaught exceptions still go to the real stderr in full. Only a
    command's entry point calls this, once (`llama_jax.cli.train.run`): it changes the whole process."""
    real = sys.stderr
    sys.stderr = _TracebackFilter(real)
    sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=real)
    logging.getLogger("absl").addFilter(_not_orbax_error)  # orbax logs through absl's logger
    logging.getLogger("asyncio").addFilter(_not_an_error)  # orbax's never-retrieved task exceptions
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
