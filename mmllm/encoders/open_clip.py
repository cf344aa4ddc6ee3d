"""Frozen open_clip image towers (CLIP, SigLIP, EVA, CoCa, ... anything ``open_clip.create_model`` builds).

Only the vision tower is kept; the text tower is dropped right after the model is built.

* ``tokens: pooled`` -> 1 token per image: the projected image embedding, width ``embed_dim``;
* ``tokens: patch``  -> the ViT's patch tokens (after the final LayerNorm, before pooling and the
  projection), ``grid_h * grid_w`` tokens of the tower's width.

The architecture comes from one of:

* ``model_name``: an open_clip architecture (``ViT-B-32``), ``hf-hub:org/repo``, ``local-dir:/path`` or
  ``local-dir:package:module/sub/dir`` (a folder shipped inside an installed package);
  ``pretrained`` is then an open_clip tag (``laion2b_s34b_b79k``) or a checkpoint file;
* ``model_config``: an in-process config in the format of open_clip's ``model_configs/*.json``
  (``embed_dim``, ``vision_cfg``, ``text_cfg``); ``pretrained`` may then name a checkpoint file.
  open_clip 3.x has no ``create_model(model_cfg=...)``; the config goes through its public
  ``local-dir:`` schema (a temporary folder holding ``open_clip_config.json``).

Tiny random tower used by the tests (YAML)::

    kind: open-clip
    model_name: tiny-vit
    model_config:
      embed_dim: 16
      vision_cfg: {image_size: 32, patch_size: 8, width: 32, layers: 2, head_width: 16, mlp_ratio: 2.0}
      text_cfg: {context_length: 8, vocab_size: 64, width: 16, heads: 2, layers: 1}
    tokens: patch   # (B, 16, 32); pooled gives (B, 1, 16)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import torch
from PIL import Image
from torch import nn

from mmllm.config import ConfigError
from mmllm.encoders.base import EncoderShape, MediaEncoder
from mmllm.locations import is_package_path, resolve_source
from mmllm.part_errors import ARCHITECTURE_ERRORS, names_something_wrong, said

log = logging.getLogger(__name__)

TINY_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 32,
        "layers": 2,
        "head_width": 16,
        "mlp_ratio": 2.0,
    },
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


class OpenClipImageEncoder(MediaEncoder):
    modality = "image"

    @dataclass
    class Options:
        model_name: str | None = None  # open_clip architecture, "hf-hub:org/repo" or "local-dir:/path"
        pretrained: str | None = None  # open_clip pretrained tag or a checkpoint file; None = random init
        # an in-process open_clip model config: embed_dim, vision_cfg, text_cfg (as in model_configs/*.json)
        model_config: dict[str, Any] | None = None
        tokens: Literal["pooled", "patch"] = "pooled"
        image_size: int | None = None  # override the tower's input size (position embeddings are resized)
        # overrides of open_clip's PreprocessCfg: mean, std, interpolation, resize_mode, fill_color
        preprocess: dict[str, Any] | None = None

        def __post_init__(self) -> None:
            if self.model_name is None and self.model_config is None:
                raise ValueError(
                    "set model_name (an open_clip architecture) or model_config (an in-process config)"
                )
            if self.model_config is not None:
                missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in self.model_config]
                if missing:
                    raise ValueError(
                        f"model_config lacks {', '.join(missing)} (open_clip's model config format)"
                    )
            if self.preprocess:
                from open_clip.transform import PreprocessCfg

                valid = {f.name for f in dataclasses.fields(PreprocessCfg)}
                unknown = sorted(set(self.preprocess) - valid)
                if unknown:
                    raise ValueError(
                        f"unknown preprocess key(s) {unknown}; valid keys are: {', '.join(sorted(valid))}"
                    )

    @classmethod
    def tiny_options(cls, tokens: str = "patch") -> dict[str, Any]:
        """Options of a tiny random ViT (32x32 images, patch 8, width 32, 2 layers) for tests and demos."""
        return {"model_name": "tiny-vit", "model_config": copy.deepcopy(TINY_MODEL_CONFIG), "tokens": tokens}

    def __init__(self, visual: nn.Module, options: Options) -> None:
        super().__init__()
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self.options = options
        self.visual = visual
        self.preprocess_cfg: dict[str, Any] = dict(visual.preprocess_cfg)
        self.transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        if options.tokens == "patch" and not hasattr(visual, "output_tokens"):
            raise ConfigError(
                f"tokens: 'patch' needs an open_clip VisionTransformer tower; {type(visual).__name__} "
                "only gives the pooled embedding (use tokens: pooled)"
            )
        if hasattr(visual, "output_tokens"):
            visual.output_tokens = options.tokens == "patch"  # open_clip's own switch: (pooled, tokens)
        self.requires_grad_(False)
        self.eval()
        self._num_tokens, self._output_dim = self._infer_shape()

    # -- building ------------------------------------------------------------------------------

    @classmethod
    def from_options(cls, options: Options, where: str = "", weights: bool = True) -> MediaEncoder:
        """The encoder; with ``weights=False`` its :class:`EncoderShape`, built on the meta device without
        reading any weights (a stage that never runs it)."""
        prefix = f"{where}." if where else ""
        if not weights:  # open_clip would log that it initialised the model randomly: it did not, here
            with torch.device("meta"), _quiet_about("No pretrained weights loaded"):
                return EncoderShape(_named(prefix, cls, _create_clip(options, prefix, load_weights=False).visual,
                                           options))
        model = _create_clip(options, prefix)
        visual = model.visual
        del model  # drop the text tower (and logit scale): only the image side is ever used
        encoder = _named(prefix, cls, visual, options)
        log.info(
            "open_clip image encoder %s (pretrained=%s): %d token(s) x %d, input size %s",
            options.model_name or "model_config",
            options.pretrained,
            encoder.num_tokens,
            encoder.output_dim,
            encoder.preprocess_cfg["size"],
        )
        return encoder

    def _infer_shape(self) -> tuple[int, int]:
        visual = self.visual
        is_plain_vit = hasattr(visual, "grid_size") and getattr(visual, "attn_pool", None) is None
        if self.options.tokens == "pooled" and isinstance(getattr(visual, "output_dim", None), int):
            return 1, visual.output_dim
        if self.options.tokens == "patch" and is_plain_vit:
            extra = 1 if visual.pool_type == "none" else 0
            return visual.grid_size[0] * visual.grid_size[1] + extra, visual.transformer.width
        # Anything else (timm towers, attentional poolers): one dummy forward tells the truth.
        size = self.preprocess_cfg["size"]
        h, w = (size, size) if isinstance(size, int) else size
        with torch.no_grad():
            out = self.forward(torch.zeros(1, 3, h, w, dtype=next(visual.parameters()).dtype))
        return out.shape[1], out.shape[2]

    # -- MediaEncoder --------------------------------------------------------------------------

    @property
    def output_dim(self) -> int:
        return self._output_dim

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def train(self, mode: bool = True) -> Self:
        return super().train(False)  # frozen: dropout / patch dropout stay off whatever the parent does

    def preprocess(self, items: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(img.convert("RGB")) for img in items])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.visual(inputs)
        if self.options.tokens == "patch":
            return out[1]
        return out.unsqueeze(1)

    def describe(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "model_name": self.options.model_name,
            "pretrained": self.options.pretrained,
            "model_config": self.options.model_config,
            "tokens": self.options.tokens,
            "image_size": self.options.image_size,
            "preprocess": self.preprocess_cfg,
        }


def _named(prefix: str, cls: type[OpenClipImageEncoder], visual: nn.Module,
           options: OpenClipImageEncoder.Options) -> OpenClipImageEncoder:
    """The encoder around ``visual``; its ConfigErrors (``tokens: patch`` on a tower without patch tokens)
    name where in the YAML they are."""
    try:
        return cls(visual, options)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from exc


@contextlib.contextmanager
def _root_logger_left_alone() -> Iterator[None]:
    """open_clip logs with the root logger's module functions (``logging.info(...)``), and the first such call
    in a process whose root logger has no handler configures it (``logging.basicConfig()``: a stderr handler,
    level WARNING): a script's own ``logging.basicConfig(level=logging.INFO)`` after building a model then did
    nothing. The handlers such a call adds inside the block are removed after it (what it printed stays)."""
    root = logging.getLogger()
    before = list(root.handlers)
    try:
        yield
    finally:
        if not before:
            for handler in [h for h in root.handlers if h not in before]:
                root.removeHandler(handler)


@_root_logger_left_alone()
def _create_clip(options: OpenClipImageEncoder.Options, prefix: str, load_weights: bool = True) -> nn.Module:
    """Build the full open_clip model (random or pretrained) and wrap its errors in ConfigError; with
    ``load_weights=False`` (inside ``torch.device("meta")``) its structure only, no checkpoint read."""
    import open_clip

    kwargs: dict[str, Any] = {
        "force_image_size": options.image_size,
        "force_preprocess_cfg": options.preprocess,
        "pretrained_text": False,  # never fetch text-tower weights: the text tower is dropped
        "load_weights": load_weights,
    }
    if not load_weights:
        kwargs["device"] = torch.get_default_device()
    if options.model_config is None:
        name = options.model_name
        if name.startswith("local-dir:") and is_package_path(name[len("local-dir:"):]):
            name = "local-dir:" + resolve_source(name[len("local-dir:"):])
        if name.startswith("local-dir:"):
            _check_local_dir(Path(name[len("local-dir:"):]).expanduser(), options, prefix, load_weights)
        pretrained = resolve_source(options.pretrained) if options.pretrained else options.pretrained
        try:
            return open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as exc:  # open_clip raises RuntimeError / ValueError / FileNotFoundError / HF errors
            if not names_something_wrong(exc):  # a fault of open_clip or of mmllm, or memory running out
                raise
            known_arch = options.model_name.replace("/", "-") in open_clip.list_models()
            what = "pretrained" if options.pretrained and known_arch else "model_name"
            raise ConfigError(
                f"{prefix}{what}: open_clip could not build {options.model_name!r}: {exc}"
            ) from exc

    if options.pretrained is not None and not os.path.isfile(options.pretrained):
        raise ConfigError(
            f"{prefix}pretrained: with model_config, pretrained must be a checkpoint file; "
            f"{options.pretrained!r} is not a file"
        )
    try:
        with tempfile.TemporaryDirectory(prefix="mmllm-open-clip-") as folder, _quiet_about(folder):
            with open(os.path.join(folder, "open_clip_config.json"), "w") as fh:
                json.dump({"model_cfg": options.model_config}, fh)
            model = open_clip.create_model(f"local-dir:{folder}", **kwargs)
    except Exception as exc:
        if not names_something_wrong(exc, *ARCHITECTURE_ERRORS):  # a key its dataclasses lack, a size of 0, ...
            raise
        raise ConfigError(f"{prefix}model_config: open_clip could not build it: {said(exc)} (check its keys, and that "
                          "its sizes fit together, none of them 0)") from exc
    if options.pretrained is None:
        log.info("open_clip model_config %s: random weights (no pretrained checkpoint)", options.model_name)
    elif load_weights:
        try:
            open_clip.load_checkpoint(model, options.pretrained, strict=True)
        except Exception as exc:  # missing, not a checkpoint, tensors of other shapes (RuntimeError)
            if not names_something_wrong(exc):
                raise
            raise ConfigError(
                f"{prefix}pretrained: cannot load {options.pretrained!r} into model_config: {said(exc)} (give a "
                "checkpoint of this architecture that open_clip reads: *.safetensors, *.pt, *.bin; this one is "
                "damaged, truncated or of another kind or shape)"
            ) from exc
    return model


def _check_local_dir(folder: Path, options: OpenClipImageEncoder.Options, prefix: str, load_weights: bool) -> None:
    """What open_clip only logs about a ``local-dir:`` model: it ignores ``pretrained``, and a folder without
    a checkpoint file (``*.safetensors``, ``*.bin``, ``*.pth``) gives a randomly initialised tower."""
    if options.pretrained:
        raise ConfigError(f"{prefix}pretrained: a 'local-dir:' model loads the checkpoint in its folder and open_clip "
                          f"ignores pretrained ({options.pretrained!r}): drop it, or put that file in {folder}")
    checkpoints = ("*.safetensors", "*.bin", "*.pth")
    if load_weights and folder.is_dir() and not any(next(folder.glob(p), None) for p in checkpoints):
        raise ConfigError(
            f"{prefix}model_name: {folder} holds no checkpoint (*.safetensors, *.bin or *.pth beside "
            "open_clip_config.json), so open_clip would build the tower with random weights: copy its checkpoint "
            "there (open_clip_model.safetensors), or give the architecture as model_config for a random tower"
        )


@contextlib.contextmanager
def _quiet_about(text: str) -> Iterator[None]:
    """Drop open_clip's root-logger messages that contain ``text`` (our temporary config folder's name, or
    news of a random initialisation that is not one): they confuse users."""

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
