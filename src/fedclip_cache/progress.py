"""Progress bars the CLI draws (rich): stage 1 takes a bar as a callback and draws nothing itself."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def extract_bar(total: int) -> Iterator[Callable[[int], None]]:
    """The extract progress bar (images attempted of ``total``, images per second, elapsed and remaining time);
    yields the function to call with how many more images were attempted (``cache.extract.ProgressBar``)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class _Rate(TextColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} img/s" if speed else "… img/s")

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(""),
                  TimeElapsedColumn(), TimeRemainingColumn(), transient=False) as bar:
        task = bar.add_task("extract", total=total)
        yield lambda n: bar.update(task, advance=n)


def extract(cfg, progress=extract_bar):
    """The public ``fedclip_cache.extract``: :func:`fedclip_cache.cache.extract.extract` drawing this bar while
    ``cfg.progress`` is set, as the library always did (stage 1 itself imports no rich; pass ``progress=None`` for
    no bar)."""
    from .cache.extract import extract as run_extract

    return run_extract(cfg, progress=progress)
