"""Progress for long commands: a tqdm bar per stage on a terminal, `logging` lines everywhere.

Everything goes to stderr (stdout stays clean for `--json`). Log lines go through the standard
`logging` logger `"pyrovae"`, so users and schedulers can route them; the CLI attaches a
stderr handler (`configure`), the Python API leaves that to the application. Bars show only
when stderr is a terminal and the logger is at INFO or below (`--quiet` hides both).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("pyrovae")


def configure(verbosity: int = 0) -> None:
    """CLI logging: `-1` (--quiet) warnings only and no bars, `0` INFO lines (one per epoch
    or stage), `1` (--verbose) DEBUG as well. Lines are `pyrovae: message` on stderr."""
    log.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))
    mine = [h for h in log.handlers if getattr(h, "_pyrovae", False)]
    if mine:  # configured before (another command in this process): follow the current stderr
        try:
            mine[0].setStream(sys.stderr)
        except ValueError:  # the previous stderr was closed (e.g. captured, then released)
            mine[0].stream = sys.stderr
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pyrovae: %(message)s"))
        handler._pyrovae = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.propagate = False


def show_bars() -> bool:
    """Bars are for people at a terminal: stderr is a TTY and INFO is on."""
    return sys.stderr.isatty() and log.isEnabledFor(logging.INFO)


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it") -> Any:
    """A tqdm bar on stderr (time left included) when `show_bars()`, else a silent one."""
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
        disable=not show_bars(), dynamic_ncols=True,
    )


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """One INFO line when a stage of a command ends: `name: done in 12.3 s`."""
    t0 = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - t0)
