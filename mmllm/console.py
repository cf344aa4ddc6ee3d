"""The ``mmllm`` command's first module (the console script's ``mmllm.console:entry``, ``python -m mmllm``, and
``python -m mmllm.cli``, which hands over to it before its own imports).

It imports the standard library only, so that a Ctrl-C while the command's own modules import (``mmllm.cli``
and what it reads at import, about 80 ms) exits 130 without a word, as one while the command runs does, not with
Python's traceback of the import. A Ctrl-C while torch imports is the command's (it imports torch as it runs).
"""

from __future__ import annotations

import signal
import sys


def entry() -> None:
    """Import the command line and run it (:func:`mmllm.cli.entry`: exits with its code)."""
    try:
        from mmllm.cli import entry as run
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    run()
