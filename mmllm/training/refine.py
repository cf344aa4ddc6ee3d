"""Refine the output projections on cached signal-token states.

Once the core, its LoRA adapter and the signal-token rows are trained, the hidden states of a
conversation's signal tokens are fixed: only the output projection that maps them to the decoder's
conditioning is left to fit. Running the whole LLM forward and backward for every step of that
small regression (as the stages do) spends nearly all the compute on the frozen part. This module
runs the LLM *once* per conversation (no gradients), caches each signal group's hidden states,
input embeddings and conditioning target, and then trains only ``output_projections`` on the cache,
thousands of steps in minutes on a CPU.

A seeded tenth of the groups is held back as a validation set; the result reports the relative MSE
(each group's squared error over its target's mean square) on it before and after, so a refinement
that overfits is visible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mmllm.data.dataset import SampleError, StageDataset, collate
from mmllm.data.formats import Conversation
from mmllm.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass
class SignalCache:
    """Per output modality: hidden states ``(N, k, D)``, input embeddings ``(N, k, D)``, targets ``(N, L, C)``."""

    hidden: dict[str, torch.Tensor] = field(default_factory=dict)
    embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: int = 0

    def count(self, modality: str) -> int:
        return int(self.hidden[modality].shape[0]) if modality in self.hidden else 0


@torch.no_grad()
def collect_signal_states(model, conversations: list[Conversation], batch_size: int = 8) -> SignalCache:
    """One no-grad forward per conversation: every signal group's states and its conditioning target."""
    from mmllm.training.loop import token_spec

    model.eval()
    tok = model.llm.tokenizer
    preprocess = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(conversations, tok, token_spec(model), preprocess)
    parts: dict[str, dict[str, list[torch.Tensor]]] = {}
    cache = SignalCache()
    for start in progress_bar(range(0, len(ds), batch_size), desc="caching signal states"):
        samples = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        cache.skipped += sum(isinstance(s, SampleError) for s in samples)
        batch = collate(samples, tok.pad_token_id)
        if "input_ids" not in batch or not any(batch["signal_captions"].values()):
            continue
        ids, embeds, hidden = model.hidden_states(batch)
        for m, captions in batch["signal_captions"].items():
            if not captions:
                continue
            h, e = model.signal_states(ids, hidden, embeds, m)
            target = model.signal_targets(m, list(captions), batch.get("signal_targets", {}).get(m))
            got = parts.setdefault(m, {"h": [], "e": [], "t": []})
            got["h"].append(h.float().cpu())
            got["e"].append(e.float().cpu())
            got["t"].append(target.float().cpu())
    for m, got in parts.items():
        cache.hidden[m], cache.embeds[m], cache.targets[m] = (torch.cat(got[k]) for k in ("h", "e", "t"))
    return cache


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over groups of each group's squared error over its target's mean square."""
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (err / target.float().pow(2).flatten(1).mean(1).clamp(min=1e-12)).mean()


@dataclass
class RefineResult:
    modality: str
    groups_train: int
    groups_val: int
    val_before: float
    val_after: float
    train_last: float


def refine_output_projections(
    model, cache: SignalCache, steps: int = 3000, batch_size: int = 64, lr: float = 5e-4,
    weight_decay: float = 0.01, val_fraction: float = 0.1, seed: int = 0,
) -> list[RefineResult]:
    """Train every cached modality's output projection on its cache (AdamW, cosine to 10%)."""
    results = []
    for m in sorted(cache.hidden):
        proj = model.output_projections[m]
        n = cache.count(m)
        order = np.random.default_rng([seed, sum(map(ord, m))]).permutation(n)
        n_val = max(1, int(n * val_fraction)) if n > 1 else 0
        val, train = torch.as_tensor(order[:n_val]), torch.as_tensor(order[n_val:])
        dtype, device = next(proj.parameters()).dtype, next(proj.parameters()).device
        h, e, t = (x.to(device) for x in (cache.hidden[m], cache.embeds[m], cache.targets[m]))

        before = _val_loss(proj, h, e, t, val, dtype)
        params = [p for p in proj.parameters()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
        gen = torch.Generator().manual_seed(seed)
        proj.train()
        last = float("nan")
        bar = progress_bar(range(steps), desc=f"refining output_projections.{m}", leave=False)
        for _ in bar:
            pick = train[torch.randint(len(train), (min(batch_size, len(train)),), generator=gen)]
            loss = relative_mse(proj(h[pick].to(dtype), e[pick].to(dtype)), t[pick])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            last = float(loss.detach())
            bar.set_postfix(loss=f"{last:.4f}")
        proj.eval()
        for p in params:
            p.requires_grad_(False)
        result = RefineResult(m, len(train), n_val, before, _val_loss(proj, h, e, t, val, dtype), last)
        log.info("output_projections.%s: %d groups (%d held back); validation relative MSE %.4f -> %.4f",
                 m, result.groups_train, result.groups_val, result.val_before, result.val_after)
        results.append(result)
    return results


def _val_loss(proj, h: torch.Tensor, e: torch.Tensor, t: torch.Tensor, val: torch.Tensor, dtype) -> float:
    if len(val) == 0:
        return float("nan")
    proj.eval()
    with torch.no_grad():
        return float(relative_mse(proj(h[val].to(dtype), e[val].to(dtype)), t[val]))


def describe(results: list[RefineResult]) -> dict[str, Any]:
    return {r.modality: {"groups_train": r.groups_train, "groups_val": r.groups_val, "val_before": r.val_before,
                         "val_after": r.val_after, "train_last": r.train_last} for r in results}
