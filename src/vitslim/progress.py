"""Progress of long loops (calibration, compensation, evaluation, timing) for people.

On a terminal a tqdm bar shows it. When stderr is a file or a pipe (a batch job, ``2> log``) a bar
would print nothing useful, so the main process logs INFO lines on the ``vitslim`` logger instead
(``vitslim -v`` shows them): after the first item, then every ``LOG_EVERY_ITEMS`` items or
``LOG_EVERY_SECONDS`` seconds, with the count, the rate and the time left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

from vitslim import distributed

logger = logging.getLogger("vitslim")

LOG_EVERY_ITEMS = 100
LOG_EVERY_SECONDS = 30.0
Item = TypeVar("Item")


class Progress:
    """``update`` after each item; ``close`` (or leave the with-block) at the end."""

    def __init__(self, description: str, *, total: int | None = None, unit: str = "item", show: bool = True) -> None:
        show = show and distributed.is_main()
        self.bar = tqdm(total=total, desc=description, unit=unit, disable=None if show else True, leave=False)
        self.log = show and bool(self.bar.disable)  # no bar on screen: log lines instead
        self.description, self.total, self.unit = description, total, unit
        self.done, self.logged_done = 0, 0
        self.started = self.logged_at = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, count: int = 1, **postfix: str) -> None:
        self.done += count
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(count)
        now = time.perf_counter()
        due = self.logged_done == 0 or self.done - self.logged_done >= LOG_EVERY_ITEMS or now - self.logged_at >= LOG_EVERY_SECONDS
        if self.log and due:
            elapsed = max(now - self.started, 1e-9)
            of_total = f"/{self.total}" if self.total else ""
            left = f", ETA {tqdm.format_interval((self.total - self.done) * elapsed / self.done)}" if self.total else ""
            extra = "".join(f", {key} {value}" for key, value in postfix.items())
            logger.info(f"{self.description}: {self.unit} {self.done}{of_total}, {self.done / elapsed:.1f}/s{left}{extra}")
            self.logged_at, self.logged_done = now, self.done

    def close(self) -> None:
        self.bar.close()


def track(items: Iterable[Item], description: str, *, total: int | None = None, unit: str = "item", show: bool = True) -> Iterator[Item]:
    """``items``, one by one, with their progress shown (see the module docstring)."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with Progress(description, total=total, unit=unit, show=show) as progress:
        for item in items:
            yield item
            progress.update()
