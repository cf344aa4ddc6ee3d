"""Batched generation: left-padded prompts with media spliced in, the LLM's KV-cached ``generate``,
then one more forward over prompt + answer to read the signal tokens' hidden states, the output
projections, and the decoders -- each fed all of its groups in one batch.

Signal groups are completed by construction: once ``<img_0>`` is emitted, the logits processor
forces ``<img_1> .. <img_{k-1}>``, so every group the model starts is a whole group.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from mmllm.data.media import load_media
from mmllm.data.template import encode_prompt

log = logging.getLogger(__name__)


class SignalGroupProcessor:
    """Forces each signal group to completion once its first token is emitted."""

    def __init__(self, signal_ids: dict[str, list[int]]):
        self.next_of: dict[int, int] = {}
        for ids in signal_ids.values():
            for a, b in zip(ids, ids[1:]):
                self.next_of[a] = b
        # Signal tokens other than a group's first are only allowed when forced.
        self.inner = sorted({i for ids in signal_ids.values() for i in ids[1:]})

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.inner:
            scores[:, self.inner] = float("-inf")
        if input_ids.shape[1] == 0:  # first step with inputs_embeds: nothing generated yet
            return scores
        last = input_ids[:, -1].tolist()
        for row, tok in enumerate(last):
            forced = self.next_of.get(tok)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores


@dataclass
class Request:
    """One prompt: chat messages whose contents hold ``<image>``-style placeholders, and the media
    items (``(modality, path_or_decoded)``) for those placeholders in order."""

    messages: list[dict[str, str]]
    media: list[tuple[str, Any]]
    seed: int = 0


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def prepare_batch(model, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    from mmllm.training.loop import token_spec

    spec = token_spec(model)
    tok = model.llm.tokenizer
    rows, media = [], {}
    for req in requests:
        ids, spans = encode_prompt(req.messages, tok, spec)
        if len(spans) != len(req.media):
            raise ValueError(f"prompt has {len(spans)} media placeholders but {len(req.media)} media items")
        for modality, item in req.media:
            if modality not in model.encoders:
                raise ValueError(f"{modality} input but the assembly has no encoders.{modality}")
            raw = load_media(modality, item) if isinstance(item, (str, bytes)) or hasattr(item, "__fspath__") else item
            media.setdefault(modality, []).append(model.encoders[modality].preprocess([raw]))
        rows.append(ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        input_ids[i, length - len(r):] = torch.tensor(r)
        mask[i, length - len(r):] = 1
    return input_ids, mask, {m: torch.cat(v) for m, v in media.items()}


def generate(
    model,
    requests: list[Request],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    decode_media: bool = True,
    steps: int | None = None,
    guidance: float | None = None,
):
    from mmllm.model import GenerationResult

    model.eval()
    device = model.device
    tok = model.llm.tokenizer
    input_ids, mask, media = prepare_batch(model, requests)
    input_ids, mask = input_ids.to(device), mask.to(device)
    embeds = model.embed_inputs(input_ids, media)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
        torch.manual_seed(requests[0].seed)
    from transformers import LogitsProcessorList

    new = model.llm.model.generate(
        inputs_embeds=embeds, attention_mask=mask,
        logits_processor=LogitsProcessorList([SignalGroupProcessor(model.llm.signal_ids)]), **gen_kwargs,
    )
    # Trim each row at its first end-of-sequence.
    answers: list[list[int]] = []
    for row in new.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        answers.append([t for t in row if t != tok.pad_token_id])
    results = [GenerationResult(text=tok.decode(a, skip_special_tokens=True).strip(), token_ids=a) for a in answers]

    if any(t in {i for ids in model.llm.signal_ids.values() for i in ids} for a in answers for t in a):
        _attach_conditioning(model, input_ids, mask, media, answers, results)
        if decode_media:
            for m in model.decoders:
                conds = [c for r in results for c in r.conditioning.get(m, [])]
                if not conds:
                    continue
                seeds = [req.seed + j for req, r in zip(requests, results) for j in range(len(r.conditioning.get(m, [])))]
                items = model.decoders[m].generate(torch.stack(conds), steps=steps, guidance=guidance, seeds=seeds)
                it = iter(items)
                for r in results:
                    r.media[m] = [next(it) for _ in r.conditioning.get(m, [])]
    return results


def _attach_conditioning(model, input_ids, mask, media, answers, results) -> None:
    """Forward prompt + answer once; the signal groups' hidden states -> output projections."""
    device = input_ids.device
    longest = max(len(a) for a in answers)
    pad = model.llm.tokenizer.pad_token_id
    tail = torch.full((len(answers), longest), pad, dtype=torch.long, device=device)
    tail_mask = torch.zeros_like(tail)
    for i, a in enumerate(answers):
        if a:
            tail[i, : len(a)] = torch.tensor(a, device=device)
            tail_mask[i, : len(a)] = 1
    full_ids = torch.cat([input_ids, tail], 1)
    full_mask = torch.cat([mask, tail_mask], 1)
    embeds = model.embed_inputs(full_ids, media)
    hidden = model.llm.decoder()(inputs_embeds=embeds, attention_mask=full_mask,
                                 position_ids=_position_ids(full_mask)).last_hidden_state
    for m in model.decoders:
        if m not in model.llm.signal_ids:
            continue
        ids = torch.tensor(model.llm.signal_ids[m], device=device)
        sig_mask = torch.isin(full_ids, ids) & full_mask.bool()
        if not bool(sig_mask.any()):
            continue
        per_row = sig_mask.sum(1).tolist()
        h, e = hidden[sig_mask], embeds[sig_mask]
        k = len(ids)
        cond = model.output_projections[m](h.reshape(-1, k, h.shape[-1]), e.reshape(-1, k, e.shape[-1]))
        it = iter(cond)
        for r, n in zip(results, per_row):
            r.conditioning[m] = [next(it) for _ in range(n // k)]
