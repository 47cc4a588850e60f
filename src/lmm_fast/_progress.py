"""Progress bars of the command line (``lmm-fast hierarchy``, ``lmm-fast
compare``): when to show them, and bars that show on every terminal.

A terminal that reports no size (0 columns and 0 rows: a pseudo-terminal
opened without a window size, as ``script``, ``docker exec -t`` without a
size, some CI and IDE consoles do) makes tqdm hide every bar: it reads the
size as -1 rows and treats position 0 as below the screen. The bars here
then take the size from ``COLUMNS``/``LINES``, else 80 x 24.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import IO, Any

__all__ = ["progress_wanted", "progress_bar", "bar_size"]


def progress_wanted(option: bool | None, stream: IO[str] | None = None) -> bool:
    """Bars when ``option`` is True (``--progress``), none when False
    (``--no-progress``), and for ``None`` only when ``stream`` (stderr) is a
    terminal: not into a pipe or a log file."""
    if option is not None:
        return bool(option)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def bar_size(stream: IO[str] | None = None) -> dict[str, int]:
    """``ncols``/``nrows`` for tqdm when ``stream`` is a terminal that reports
    no size; ``{}`` otherwise (tqdm then sizes the bar itself)."""
    stream = sys.stderr if stream is None else stream
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return {}
    if size.columns > 0 and size.lines > 0:
        return {}
    fallback = shutil.get_terminal_size()  # COLUMNS and LINES, else 80 x 24
    return {"ncols": size.columns or fallback.columns, "nrows": size.lines or fallback.lines}


def progress_bar(iterable: Any = None, **options: Any) -> Any:
    """A ``tqdm.auto.tqdm`` bar that also shows on a terminal of unknown size."""
    from tqdm.auto import tqdm

    if not options.get("disable", False):
        options = {**bar_size(options.get("file")), **options}
    return tqdm(iterable, **options)
