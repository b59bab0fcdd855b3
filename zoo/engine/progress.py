"""One progress system: long loops of the zoo (scoring a grid, generating data, scanning features) show
their progress inside Lightning's own bar when a Trainer is running (as one more Rich task, or a tqdm bar
below Lightning's), and as a plain tqdm bar otherwise. Two independent live displays would interleave.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_BAR = contextvars.ContextVar("zoo_progress_bar", default=None)


@contextlib.contextmanager
def lightning_progress(trainer):
    """Within this block, track() reports through the trainer's progress bar callback."""
    token = _BAR.set(getattr(trainer, "progress_bar_callback", None) if trainer is not None else None)
    try:
        yield
    finally:
        _BAR.reset(token)


def track(items: Iterable[T], total: int | None = None, desc: str = "", enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = _BAR.get()
    rich = getattr(bar, "progress", None)  # RichProgressBar's live Progress while a loop runs
    if rich is not None:
        task = rich.add_task(desc, total=total)
        try:
            for x in items:
                yield x
                rich.update(task, advance=1)
                bar.refresh()
        finally:
            rich.remove_task(task)
        return
    # Lightning's tqdm bars occupy positions 0-1 (train, val): draw below them
    kw = {"position": 2, "dynamic_ncols": True} if bar is not None else {}
    yield from tqdm(items, total=total, desc=desc, leave=False, **kw)
