"""The three measurements of the toy world, each on a list of items of one split.

* :func:`judge_accuracy` -- a judge reading true media;
* :func:`retrieval_accuracy` -- an encoder's zero-shot caption retrieval: each item's embedding
  against the canonical captions of *every* combination of its modality (seen and held-out), by
  cosine similarity to their MiniLM sentence embeddings; top-1 means every attribute right;
* :func:`decoder_accuracy` -- a decoder given the true caption's own conditioning (the oracle),
  its output read back by the judge.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from mmllm.toyworld.judges import Judge, attribute_accuracy
from mmllm.toyworld.text import MiniLMText
from mmllm.toyworld.world import Item, World

log = logging.getLogger(__name__)


def judge_accuracy(judge: Judge, items: list[Item]) -> dict[str, float]:
    predicted = judge.predict([i.media for i in items])
    return attribute_accuracy(predicted, [i.attributes for i in items])


@torch.no_grad()
def embed(encoder: Any, media: list[Any], batch_size: int = 64) -> torch.Tensor:
    """``(N, D)`` L2-normalised pooled embeddings (an encoder built with ``tokens: pooled``)."""
    out = []
    for start in range(0, len(media), batch_size):
        feats = encoder.encode(media[start : start + batch_size])
        if feats.shape[1] != 1:
            raise ValueError(f"retrieval needs one pooled token per item, got {feats.shape[1]}")
        out.append(F.normalize(feats[:, 0].float(), dim=-1))
    return torch.cat(out)


def retrieval_accuracy(
    encoder: Any, text: MiniLMText, world: World, modality: str, items: list[Item]
) -> dict[str, float]:
    combos = world.combos(modality, "all")
    captions = [world.caption(modality, world.attributes_of(modality, c)) for c in combos]
    targets = text.sentence(captions)
    sims = embed(encoder, [i.media for i in items]) @ targets.T
    ranks = sims.argsort(dim=1, descending=True)
    truth = torch.tensor([combos.index(i.combo) for i in items])
    top1 = ranks[:, 0] == truth
    top5 = (ranks[:, :5] == truth[:, None]).any(dim=1)
    picked = [world.attributes_of(modality, combos[k]) for k in ranks[:, 0].tolist()]
    per_attribute = attribute_accuracy(picked, [i.attributes for i in items])
    return {
        "top1": float(top1.float().mean()),
        "top5": float(top5.float().mean()),
        "n": len(items),
        **{f"attribute_{k}": v for k, v in per_attribute.items() if k not in ("all", "n")},
    }


def decoder_accuracy(
    decoder: Any,
    judge: Judge,
    items: list[Item],
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[dict[str, float], list[Any]]:
    """Generate from each item's caption conditioning (the oracle) and judge the result."""
    generated: list[Any] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        conditioning = decoder.condition([i.caption for i in chunk])
        seeds = [seed + start + k for k in range(len(chunk))]
        generated.extend(decoder.generate(conditioning, steps=steps, guidance=guidance, seeds=seeds))
    predicted = judge.predict(generated)
    return attribute_accuracy(predicted, [i.attributes for i in items]), generated
