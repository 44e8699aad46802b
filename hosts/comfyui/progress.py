"""ComfyUI's side of the core's progress ticks: the interrupt is checked and the
node's progress bar advanced at every iteration of a long loop."""

from __future__ import annotations

import contextlib

import comfy.model_management
import comfy.utils

from ...attnseg.progress import reporting


@contextlib.contextmanager
def comfy_progress():
    """Report the core's loops inside this block to ComfyUI (one bar per stage)."""
    bars: dict[str, tuple[comfy.utils.ProgressBar, int]] = {}

    def report(stage: str, done: int, total: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar, bar_total = bars.get(stage, (None, None))
        if bar is None or bar_total != total or done <= 1:
            bar = comfy.utils.ProgressBar(total)
            bars[stage] = (bar, total)
        bar.update_absolute(done, total)

    with reporting(report):
        yield
