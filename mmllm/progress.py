"""mmllm's progress bars: tqdm's, all made here so that one setting turns every one of them off.

``mmllm -q`` (``no_progress_bars()``) turns them off for the length of the command: in CI or with stderr sent
to a log file, a bar's hundreds of carriage-return updates are noise. tqdm's own ``TQDM_DISABLE`` environment
variable cannot do it: it changes tqdm's default only, and most of mmllm's bars pass ``disable=`` themselves
(the training loop's shows on the local main process only).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

_shown = True


def progress_bar(*args: Any, disable: bool | None = False, **kwargs: Any) -> tqdm:
    """``tqdm(*args, disable=..., **kwargs)``, off whatever ``disable`` says while ``no_progress_bars()`` is on."""
    return tqdm(*args, disable=True if not _shown else disable, **kwargs)


@contextlib.contextmanager
def no_progress_bars(off: bool = True) -> Iterator[None]:
    """Every ``progress_bar`` made inside it is off (``off=False``: changes nothing); as it was after."""
    global _shown
    before = _shown
    _shown = before and not off
    try:
        yield
    finally:
        _shown = before
