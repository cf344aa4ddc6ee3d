"""Frozen media encoders, one file per family (see :mod:`mmllm.registry`)."""

from mmllm.encoders.base import MediaEncoder

__all__ = ["MediaEncoder"]
