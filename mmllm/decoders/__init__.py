"""Frozen diffusion decoders, one file per family (see :mod:`mmllm.registry`)."""

from mmllm.decoders.base import MediaDecoder

__all__ = ["MediaDecoder"]
