"""Log messages of other libraries that mmllm's own use of them causes and no user can act on, dropped
where mmllm causes them (building a diffusers pipeline) and by the ``mmllm`` command for the whole run.

Kept free of heavy imports: the command line installs the filter before it imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

DIFFUSERS_PIPELINES = "diffusers.pipelines.pipeline_utils"  # the logger of both messages
# The pipeline classes mmllm's decoder kinds build (mmllm.decoders._diffusion.PIPELINE_KINDS, kept equal by a
# test): a deprecation notice about one of them is about mmllm's choice, which no user setting changes.
MMLLM_PIPELINES = frozenset({"StableDiffusionPipeline", "AudioLDMPipeline", "TextToVideoSDPipeline"})
_DEPRECATED = re.compile(r"The (\w+) has been deprecated and will not receive bug fixes")


class DiffusersNoise(logging.Filter):
    """The pipeline-argument type hints our own parts trip on purpose (a MiniLM text encoder where the
    pipeline's annotation names CLIP); diffusers' deprecation notices about the pipeline classes mmllm builds
    (``The AudioLDMPipeline has been deprecated ...``, at the first build in a process: even under ``mmllm -q``);
    and the same deprecation notice of any other pipeline class after its first time in the process."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Expected types for "):
            return False
        if deprecated := _DEPRECATED.search(message):
            if deprecated.group(1) in MMLLM_PIPELINES or message in self.seen:
                return False
            self.seen.add(message)
        return True


# One instance per process: its memory of the notices shown is the process's, and adding it again (each
# ``mmllm.cli.main`` call) is a no-op instead of one more filter on the logger every time.
DIFFUSERS_NOISE = DiffusersNoise()


def drop_diffusers_noise() -> None:
    """For the rest of the process (the command line)."""
    logging.getLogger(DIFFUSERS_PIPELINES).addFilter(DIFFUSERS_NOISE)


@contextlib.contextmanager
def diffusers_noise_dropped() -> Iterator[None]:
    """Inside the block only (the library: what it causes, not what a caller's own diffusers code logs)."""
    logger = logging.getLogger(DIFFUSERS_PIPELINES)
    added = DIFFUSERS_NOISE not in logger.filters
    logger.addFilter(DIFFUSERS_NOISE)
    try:
        yield
    finally:
        if added:
            logger.removeFilter(DIFFUSERS_NOISE)


# ``extra`` of a warning that reports a wait while it happens ("... failed; trying again in 30 s"): where a command
# holds the warnings of a stretch of work to say each once across processes (mmllm.training.agreement.HeldWarnings),
# such a line still goes out at once, or the user would see nothing until the wait is over
AS_IT_HAPPENS = {"mmllm_as_it_happens": True}


def said_as_it_happens(record: logging.LogRecord) -> bool:
    """Whether ``record`` was logged with :data:`AS_IT_HAPPENS`."""
    return bool(getattr(record, "mmllm_as_it_happens", False))
