"""Progress and cancellation for the core's long loops, without a host import.

A host wraps a node's work in :func:`reporting` with a callback (ComfyUI's:
check the interrupt flag, advance the progress bar); the loops call
:func:`tick` once per iteration. With no reporter installed a tick costs a
context-variable read."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

# (stage, done, total) -> None; may raise to cancel the work.
Reporter = Callable[[str, int, int], None]

_reporter: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("attnseg_reporter", default=None)


@contextlib.contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def tick(stage: str, done: int, total: int) -> None:
    reporter = _reporter.get()
    if reporter is not None:
        reporter(stage, done, total)
