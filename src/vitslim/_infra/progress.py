"""Progress of long loops (calibration, compensation, evaluation, timing) for people.

On a terminal a tqdm bar shows it. When stderr is a file or a pipe (a batch job, ``2> log``) a bar
would print nothing useful, so the main process logs INFO lines on the ``vitslim._infra.progress`` logger
instead: after the first item, then every ``LOG_EVERY_ITEMS`` items or ``LOG_EVERY_SECONDS``
seconds, with the count, the rate and the time left. Long steps that are no loop of items (a
speed measurement, an ONNX export) log one line each on the same logger. The CLI shows that
logger at INFO without ``-v``: work of minutes must always say where it is, even piped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from vitslim._infra import distributed

logger = logging.getLogger("vitslim._infra.progress")

LOG_EVERY_ITEMS = 100
LOG_EVERY_SECONDS = 30.0
Item = TypeVar("Item")


class Progress:
    """``update`` after each item; ``close`` (or leave the with-block) at the end. ``initial``
    items were done before (a resumed run); rates and the time left count only this run's."""

    def __init__(self, description: str, *, total: int | None = None, unit: str = "item", show: bool = True, initial: int = 0) -> None:
        show = show and distributed.is_main()
        self.bar = tqdm(total=total, initial=initial, desc=description, unit=unit, disable=None if show else True, leave=False)
        self.log = show and bool(self.bar.disable)  # no bar on screen: log lines instead
        self.description, self.total, self.unit = description, total, unit
        self.initial = self.done = self.logged_done = initial
        self.started = self.logged_at = time.perf_counter()
        self.cleanup = contextlib.ExitStack()
        if not self.bar.disable:  # other log lines go through tqdm.write, off the bar's line
            self.cleanup.enter_context(logging_redirect_tqdm())
        self.cleanup.callback(self.bar.close)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def describe(self, description: str) -> None:
        """A new description (e.g. the epoch), for the bar and the log lines."""
        self.description = description
        self.bar.set_description(description, refresh=False)

    def update(self, count: int = 1, **postfix: str) -> None:
        """``count`` more items done; ``postfix`` shows beside the count (loss, images/s, ...)."""
        self.done += count
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(count)
        now = time.perf_counter()
        due = (self.logged_done == self.initial or self.done - self.logged_done >= LOG_EVERY_ITEMS
               or now - self.logged_at >= LOG_EVERY_SECONDS)
        if self.log and due:
            rate = (self.done - self.initial) / self.elapsed
            of_total = f"/{self.total}" if self.total else ""
            left = f", ETA {tqdm.format_interval((self.total - self.done) / rate)}" if self.total and rate > 0 else ""
            extra = "".join(f", {key} {value}" for key, value in postfix.items())
            logger.info(f"{self.description}: {self.unit} {self.done}{of_total}, {rate:.1f}/s{left}{extra}")
            self.logged_at, self.logged_done = now, self.done

    def close(self) -> None:
        self.cleanup.close()


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
