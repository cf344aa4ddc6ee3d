"""mmllm's progress bars: tqdm's, all made here so that one setting turns every one of them off.

``mmllm -q`` (``no_progress_bars()``) turns them off for the length of the command: in CI or with stderr sent
to a log file, a bar's hundreds of carriage-return updates are noise. tqdm's own ``TQDM_DISABLE`` environment
variable cannot do it: it changes tqdm's default only, and most of mmllm's bars pass ``disable=`` themselves
(the training loop's shows on the local main process only). The libraries mmllm loads models with draw bars
of their own (transformers' "Loading weights" and "Writing model shards", diffusers' "Loading pipeline
components", huggingface_hub's downloads); ``no_progress_bars()`` turns those off through their own switches too.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from typing import Any

from tqdm.auto import tqdm

_shown = True

# (module, is-on, turn off, turn on) of each library whose own bars no_progress_bars() turns off
_LIBRARY_SWITCHES = (
    ("transformers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
    ("diffusers.utils.logging", "is_progress_bar_enabled", "disable_progress_bar", "enable_progress_bar"),
    ("huggingface_hub.utils", "are_progress_bars_disabled", "disable_progress_bars", "enable_progress_bars"),
)


def progress_bar(*args: Any, disable: bool | None = False, **kwargs: Any) -> tqdm:
    """``tqdm(*args, disable=..., **kwargs)``, off whatever ``disable`` says while ``no_progress_bars()`` is on."""
    return tqdm(*args, disable=True if not _shown else disable, **kwargs)


@contextlib.contextmanager
def no_progress_bars(off: bool = True) -> Iterator[None]:
    """Every ``progress_bar`` made inside it is off (``off=False``: changes nothing); as it was after."""
    global _shown
    before = _shown
    _shown = before and not off
    turn_back_on = _library_bars_off() if off else []
    try:
        yield
    finally:
        _shown = before
        for turn_on in turn_back_on:
            turn_on()


def _library_bars_off() -> list[Callable[[], None]]:
    """Turn off the bars transformers, diffusers and huggingface_hub draw; the calls that turn back on those that were on."""
    turn_back_on = []
    for module_name, state, turn_off, turn_on in _LIBRARY_SWITCHES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # not installed: it draws nothing
            continue
        was_on = getattr(module, state)()
        if state.startswith("are_") and state.endswith("_disabled"):
            was_on = not was_on
        if was_on:
            getattr(module, turn_off)()
            turn_back_on.append(getattr(module, turn_on))
    return turn_back_on
