"""Batched generation: left-padded prompts with media spliced in, the LLM's KV-cached ``generate``,
then a forward over each answer that holds signal tokens to read their hidden states, the output
projections, and the decoders -- each run on many signal groups per call (:class:`DecodeJob`).

A request's output does not depend on the batch it runs in:

* position ids come from the attention mask (left padding gets position 0 and is masked out), in
  ``generate`` and in the conditioning forward alike;
* greedy decoding is the default; sampling (a request's ``temperature > 0``) is done by
  :class:`RowSampler` with one ``torch.Generator`` per request, seeded from the request's seed,
  so sampled text is reproducible per request too;
* each request has its own token limit (:class:`RowLimits`), its own decoder steps/guidance, and
  its own decoder noise (``seeds=`` per signal group, see :func:`media_seed`);
* the conditioning forward runs per answer, unpadded, so conditioning is bit-identical too.

Text, token ids and conditioning are exactly the same alone or in a batch (greedy or sampled).
Media are the same up to float rounding in the decoders' batched kernels (at most one step of
8/16-bit quantisation, rarely); ``Settings.decode_batch_size=1`` makes them bit-identical.

Signal groups are completed by construction: once ``<img_0>`` is emitted, the logits processor
forces ``<img_1> .. <img_{k-1}>``; a group cut off by the token limit is dropped (logged, and named by
``GenerationResult.cut_off``).

An answer ends at the core's EOS, at the chat template's end-of-turn token (:func:`end_of_turn_ids`), or --
where the template closes turns with plain text several tokens long -- once its text holds that text
(:class:`RowStopStrings`), and is cut there (:func:`cut_at_stop`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmllm.config import MODALITIES
from mmllm.data.media import MediaError, load_media
from mmllm.data.template import ContextLengthError, TokenSpec, encode_prompt
from mmllm.llm import position_ids

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass
class Request:
    """One prompt: chat messages whose contents hold ``<image>``-style placeholders, the media items
    (``(modality, path or decoded item)``) for those placeholders in order, and its own settings
    (``None`` takes the call's default). An earlier assistant message that produced media says so under
    ``outputs`` (``[{"modality": "image"}]``, as training data writes it): it is rendered with its signal tokens,
    as training renders that turn (:func:`mmllm.data.template.prompt_messages`); ``GenerationResult.reply`` is an
    answer written so."""

    messages: list[dict[str, Any]]
    media: list[tuple[str, Any]] = field(default_factory=list)
    seed: int = 0
    max_new_tokens: int | None = None
    temperature: float | None = None  # 0 or None: greedy
    top_p: float | None = None
    steps: int | None = None  # decoder denoising steps
    guidance: float | None = None  # decoder classifier-free guidance scale

    def __post_init__(self) -> None:
        """What a script gets wrong first is refused here, saying how to write it (not later, deep in the
        chat template or the collator)."""
        if not isinstance(self.messages, list) or not self.messages:
            raise ValueError(f"Request.messages: a non-empty list of {{'role': ..., 'content': ...}} dicts, got "
                             f"{type(self.messages).__name__}; for one prompt write "
                             "messages=[{'role': 'user', 'content': TEXT}]")
        for i, message in enumerate(self.messages):
            if (not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant")
                    or not isinstance(message.get("content"), str)):
                raise ValueError(f"Request.messages[{i}]: a dict with 'role' (system, user or assistant) and "
                                 f"'content' (a string), got {message!r}")
            problem = outputs_problem(message)
            if problem:
                raise ValueError(f"Request.messages[{i}]: {problem}")
        for i, entry in enumerate(self.media):
            if not isinstance(entry, (tuple, list)) or len(entry) != 2 or entry[0] not in MODALITIES:
                raise ValueError(f"Request.media[{i}]: a (modality, item) pair, the modality one of "
                                 f"{', '.join(MODALITIES)} and the item a path or a decoded item, e.g. "
                                 f"('image', 'cat.png'); got {entry!r}")


def outputs_problem(message: dict[str, Any]) -> str | None:
    """What is wrong with a message's ``outputs`` (the media an earlier assistant turn produced: a list of
    ``{"modality": ...}`` dicts, other keys such as training data's ``caption`` allowed and not read), or None."""
    outputs = message.get("outputs")
    if outputs in (None, []):
        return None
    example = '[{"modality": "image"}]'
    if message.get("role") != "assistant":
        return (f"'outputs' belongs to assistant messages (the media an earlier answer produced); a "
                f"{message.get('role')} message gives its media as inputs, under 'media' with placeholders")
    if not isinstance(outputs, list):
        return f"'outputs' must be a list such as {example}, got {outputs!r}"
    for j, out in enumerate(outputs):
        if not isinstance(out, dict) or out.get("modality") not in MODALITIES:
            return (f"outputs[{j}] must be a dict whose 'modality' is one of {', '.join(MODALITIES)}, such as "
                    f"{example}; got {out!r}")
    return None


@dataclass
class PreparedRequest:
    """A request as model inputs: expanded token ids and each modality's preprocessed media."""

    request: Request
    ids: list[int]
    media: dict[str, torch.Tensor]  # modality -> (items, ...) in placeholder order


@dataclass
class Settings:
    """Call-wide defaults for what a :class:`Request` leaves as ``None``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    steps: int | None = None  # None: the decoder's own default
    guidance: float | None = None
    # Signal groups per decoder call (None: all of a batch's groups at once). Batched decoder kernels
    # round differently from single-item ones (about 1e-6), which can move a pixel or sample by one
    # step of 8/16-bit quantisation; 1 makes media bit-identical whatever the batch, at a speed cost.
    decode_batch_size: int | None = None


def token_spec(model) -> TokenSpec:
    from mmllm.training.loop import token_spec as spec_of

    return spec_of(model)


def prepare_request(model, request: Request, spec: TokenSpec | None = None) -> PreparedRequest:
    """Tokenise one request and preprocess its media. Raises ``ContextLengthError``, ``MediaError``
    or ``ValueError`` with a message a user can act on."""
    spec = spec or token_spec(model)
    ids, spans = encode_prompt(request.messages, model.llm.tokenizer, spec)
    positions = model.llm.max_positions
    if positions is not None and len(ids) >= positions:
        raise ContextLengthError(f"prompt is {len(ids)} tokens after media expansion; the LLM's context of "
                                 f"{positions} positions leaves none for the answer")
    if len(spans) != len(request.media):
        raise ValueError(f"prompt has {len(spans)} media placeholders but {len(request.media)} media items")
    media: dict[str, list[torch.Tensor]] = {}
    for modality, item in request.media:
        if modality not in model.encoders:
            raise MediaError(f"{modality} input, but this model has no {modality} encoder "
                             f"(it reads: {', '.join(model.encoders) or 'text only'})")
        if isinstance(item, str) or hasattr(item, "__fspath__"):
            item = load_media(modality, item)
        try:
            media.setdefault(modality, []).append(model.encoders[modality].preprocess([item]))
        except (ValueError, RuntimeError) as exc:
            raise MediaError(f"{modality} input cannot be preprocessed: {exc}") from exc
    return PreparedRequest(request, ids, {m: torch.cat(v) for m, v in media.items()})


def collate(model, batch: list[PreparedRequest]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Left-padded ids, their attention mask, and each modality's media in row-major placeholder order."""
    pad = model.llm.tokenizer.pad_token_id
    length = max(len(p.ids) for p in batch)
    input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, p in enumerate(batch):
        input_ids[i, length - len(p.ids):] = torch.tensor(p.ids)
        mask[i, length - len(p.ids):] = 1
    media: dict[str, list[torch.Tensor]] = {}
    for p in batch:
        for m, tensor in p.media.items():
            media.setdefault(m, []).append(tensor)
    return input_ids, mask, {m: torch.cat(v) for m, v in media.items()}


def media_seed(seed: int, index: int) -> int:
    """Decoder noise seed of a request's ``index``-th signal group of one modality."""
    return (seed + 1_000_003 * index) % (2**63)


# --------------------------------------------------------------------------------------------
# Logits processors and stopping criteria
# --------------------------------------------------------------------------------------------


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
        for row, tok in enumerate(input_ids[:, -1].tolist()):
            forced = self.next_of.get(tok)
            if forced is not None:
                scores[row] = float("-inf")
                scores[row, forced] = 0.0
        return scores


class RowSampler:
    """Per-request sampling inside a logits processor.

    ``generate`` runs greedy; for each row with a temperature > 0 this draws the next token from the
    row's own ``torch.Generator`` (temperature, then top-p) and leaves that token the only finite
    score, so greedy picks it. One draw per step per row: a request's samples do not depend on the
    other rows of its batch. Rows with temperature 0 are left alone (greedy).
    """

    def __init__(self, temperatures: list[float], top_ps: list[float], seeds: list[int]):
        self.rows = [
            (row, t, p, torch.Generator().manual_seed(s))
            for row, (t, p, s) in enumerate(zip(temperatures, top_ps, seeds)) if t > 0
        ]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, temperature, top_p, generator in self.rows:
            probs = torch.softmax(scores[row].float().cpu() / temperature, dim=-1)
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p >= top_p  # keep the smallest set reaching top_p
                probs[order[drop]] = 0.0
            token = int(torch.multinomial(probs, 1, generator=generator))
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores


class RowStopStrings:
    """Stops each row once the text it has generated holds one of ``stops`` (a chat template's end-of-turn
    written as plain text, several tokens long, see :func:`end_of_turn_texts`); :func:`cut_at_stop` then cuts the
    answer there. A row is judged on its own tokens only, so it stops at the same token alone or in a batch.

    Each step decodes only a row's last tokens: a stop string of ``n`` UTF-8 bytes that the newest token
    completes begins at most ``n`` tokens back (every token that shows text adds at least one byte).
    """

    def __init__(self, tokenizer, stops: list[str], rows: int):
        self.tokenizer, self.stops = tokenizer, stops
        self.window = max(len(s.encode()) for s in stops) + 1
        self.stopped = torch.zeros(rows, dtype=torch.bool)
        self.offset: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.offset is None:  # called after each new token: at the first call one is generated
            self.offset = input_ids.shape[1] - 1
        tails = input_ids[:, max(self.offset, input_ids.shape[1] - self.window):].tolist()
        for row, tail in enumerate(tails):
            if not self.stopped[row]:
                text = self.tokenizer.decode(tail, skip_special_tokens=True)
                self.stopped[row] = any(stop in text for stop in self.stops)
        return self.stopped.to(input_ids.device)


class RowLimits:
    """Stops each row at its own ``max_new_tokens`` (``generate`` then pads it)."""

    def __init__(self, limits: list[int]):
        self.limits = torch.tensor(limits)
        self.offset: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        if self.offset is None:  # called after each new token: at the first call one is generated
            self.offset = input_ids.shape[1] - 1
        return (input_ids.shape[1] - self.offset >= self.limits).to(input_ids.device)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _resolved(req: Request, settings: Settings) -> tuple[int, float, float]:
    limit = req.max_new_tokens if req.max_new_tokens is not None else settings.max_new_tokens
    temperature = req.temperature if req.temperature is not None else settings.temperature
    top_p = req.top_p if req.top_p is not None else settings.top_p
    return limit, temperature, top_p


@torch.inference_mode()
def generate_answers(model, batch: list[PreparedRequest], settings: Settings | None = None) -> list:
    """LLM answers (text, token ids) and the conditioning of every complete signal group, computed in eval
    mode (see :func:`eval_mode`)."""
    settings = settings or Settings()
    with eval_mode(model):
        return _generate_answers(model, batch, settings)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block; a model that was training gets back each module's own mode
    after it (a look at the answers inside one's own training loop leaves the loop as it was: the glue
    training, the frozen parts in eval mode). A model already in eval mode is left alone: no module walk."""
    if not model.training:
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _generate_answers(model, batch: list[PreparedRequest], settings: Settings) -> list:
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from mmllm.model import GenerationResult

    tok = model.llm.tokenizer
    limits, temperatures, top_ps = zip(*(_resolved(p.request, settings) for p in batch))
    context = model.llm.max_positions
    if context is not None:  # no position past the core's context (a learned table ends there)
        limits = tuple(min(limit, context - len(p.ids)) for limit, p in zip(limits, batch))
        # A row that has stopped still takes a position at every step the others generate: a row whose prompt
        # plus the batch's longest answer would run past the context answers alone, the others together.
        alone = [i for i, p in enumerate(batch) if len(p.ids) + max(limits) > context]
        if alone and len(batch) > 1:
            together = [i for i in range(len(batch)) if i not in alone]
            answers = dict(zip(together, _generate_answers(model, [batch[i] for i in together], settings))) \
                if together else {}
            answers |= {i: _generate_answers(model, [batch[i]], settings)[0] for i in alone}
            return [answers[i] for i in range(len(batch))]
    input_ids, mask, media = collate(model, batch)
    input_ids, mask = input_ids.to(model.device), mask.to(model.device)
    embeds = model.embed_inputs(input_ids, media)
    eos_ids, stops = end_of_turn_ids(model), end_of_turn_texts(model)
    stopping = [RowLimits(list(limits))] + ([RowStopStrings(tok, stops, len(batch))] if stops else [])
    new = model.llm.model.generate(
        inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask),
        max_new_tokens=max(limits), do_sample=False,
        pad_token_id=tok.pad_token_id, eos_token_id=eos_ids,
        logits_processor=LogitsProcessorList([
            SignalGroupProcessor(model.llm.signal_ids),
            RowSampler(list(temperatures), list(top_ps), [p.request.seed for p in batch]),
        ]),
        stopping_criteria=StoppingCriteriaList(stopping),
        stop_strings=None,  # the core's configured ones are among `stops` (transformers' own needs a tokenizer)
    )
    results = []
    for index, (row, limit) in enumerate(zip(new.tolist(), limits)):
        answer, cut_off = _trim(row[:limit], eos_ids, model.llm.signal_ids)
        if cut_off is not None:  # the callers say which request (generate, the runner): the batch's index is theirs
            log.debug("row %d: a %s signal group cut off at %d new tokens; dropped", index, cut_off, limit)
        text = tok.decode(answer, skip_special_tokens=True)
        if stops:
            answer, text = cut_at_stop(tok, answer, text, stops)
        outputs = [m for m, _ in _signal_groups(answer, model.llm.signal_ids)]
        results.append(GenerationResult(text=text.strip(), token_ids=answer, outputs=outputs, cut_off=cut_off))
    _attach_conditioning(model, batch, results)
    return results


def end_of_turn_ids(model) -> list[int]:
    """The ids an assembled model's answers end at: :func:`core_end_of_turn_ids` of its core."""
    return core_end_of_turn_ids(model.llm)


def core_end_of_turn_ids(core) -> list[int]:
    """The tokenizer's EOS, every id the core's generation config ends on (e.g. Llama 3's eot), and the token
    the chat template closes an answer with (:func:`template_end_of_turn`): training labels that token after
    every reply, so a model answers with it even where it is not the core's EOS (a base core given ChatML by
    ``llm.chat_template``), and generation ran on past it to ``max_new_tokens``. ``core``: an
    :class:`mmllm.llm.LLMCore` (its ``tokenizer`` and ``model``)."""
    ids = [core.tokenizer.eos_token_id, template_end_of_turn(core.tokenizer)]
    configured = getattr(getattr(core.model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


def _after_reply(tokenizer) -> str:
    """What the chat template writes right after an assistant's reply (leading whitespace dropped); "" where
    it writes nothing, or cannot render a user/assistant exchange."""
    reply = "mmllm end-of-turn probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply}],
                                             tokenize=False)
    except Exception:  # noqa: BLE001 -- a template that refuses this shape closes turns in no way we can find
        return ""
    at = text.rfind(reply)
    return text[at + len(reply):].lstrip() if at >= 0 else ""


def template_end_of_turn(tokenizer) -> int | None:
    """The token the chat template writes right after an assistant's reply, where it is one added token
    (ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``); None where the template closes a turn with plain
    text or with nothing."""
    rest = _after_reply(tokenizer)
    ids = tokenizer(rest, add_special_tokens=False).input_ids if rest else []
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in added else None


def template_end_of_turn_text(tokenizer) -> str | None:
    """The end-of-turn marker the chat template closes an assistant's reply with as plain text, where it is no
    single added token (that is :func:`template_end_of_turn`'s): the first line of what follows the reply,
    e.g. ``</s>`` spelled as text, or ``<|end|>`` where the vocabulary has no such token. Training labels it
    after every reply, so a model writes it when done. None where the template closes turns with one added
    token, with whitespace or with nothing."""
    if template_end_of_turn(tokenizer) is not None:
        return None
    text = _after_reply(tokenizer).strip().split("\n", 1)[0]
    added = [t.content for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values() if t.content]
    ends = [at for at in (text.find(t) for t in added) if at >= 0]  # "### End" + EOS: the text before the EOS
    return text[: min(ends, default=len(text))].strip() or None


def end_of_turn_texts(model) -> list[str]:
    """The strings an assembled model's answers end at: :func:`core_end_of_turn_texts` of its core."""
    return core_end_of_turn_texts(model.llm)


def core_end_of_turn_texts(core) -> list[str]:
    """The strings an answer ends at (:class:`RowStopStrings`): the template's end-of-turn text
    (:func:`template_end_of_turn_text`) and the ``stop_strings`` of the core's generation config."""
    texts = [template_end_of_turn_text(core.tokenizer)]
    configured = getattr(getattr(core.model, "generation_config", None), "stop_strings", None)
    texts += [configured] if isinstance(configured, str) else list(configured or [])
    return sorted({t for t in texts if isinstance(t, str) and t})


def cut_at_stop(tokenizer, answer: list[int], text: str, stops: list[str]) -> tuple[list[int], str]:
    """An answer (its token ids and decoded text) cut where the first stop string begins: the text before it,
    and the tokens whose text lies wholly before it (a token holding the stop string's start goes with it)."""
    found = [at for at in (text.find(stop) for stop in stops) if at >= 0]
    if not found:
        return answer, text
    cut = min(found)
    keep, beyond = 0, len(answer)  # decoded prefixes grow with their tokens: the longest within `cut` chars
    while keep < beyond:
        mid = (keep + beyond + 1) // 2
        if len(tokenizer.decode(answer[:mid], skip_special_tokens=True)) <= cut:
            keep = mid
        else:
            beyond = mid - 1
    return answer[:keep], text[:cut]


def before_end(row: list[int], eos: list[int]) -> list[int]:
    """A generated row up to (without) its first end-of-turn id (:func:`end_of_turn_ids`); all of it if none."""
    ends = [i for i, t in enumerate(row) if t in eos]
    return row[: ends[0]] if ends else row



def cut_off_note(modality: str) -> str:
    """What the warning of an answer whose ``modality`` signal group the token limit cut off says."""
    return (f"the answer's {modality} signal group was cut off by the token limit (max_new_tokens, or the context's "
            f"end): dropped, so no {modality} was made and the answer's reply leaves it out (a larger "
            "max_new_tokens leaves it room)")


def _trim(row: list[int], eos: list[int], signal_ids: dict[str, list[int]]) -> tuple[list[int], str | None]:
    """Cut at the first end-of-sequence token, then drop a signal group the token limit cut short at the end; the
    answer, and the cut group's modality (None where none was cut). Only the last group can be: once begun, a
    group is forced to completion."""
    row = before_end(row, eos)
    firsts = {ids[0]: (m, ids) for m, ids in signal_ids.items()}
    for start in range(max(0, len(row) - max((len(v) for v in signal_ids.values()), default=0)), len(row)):
        modality, ids = firsts.get(row[start], (None, None))
        if ids is not None and row[start: start + len(ids)] != ids:
            return row[:start], modality
    return row, None


def _signal_groups(answer: list[int], signal_ids: dict[str, list[int]]) -> list[tuple[str, int]]:
    """(modality, start index) of each complete signal group in an answer."""
    out = []
    for m, ids in signal_ids.items():
        k = len(ids)
        out += [(m, i) for i, t in enumerate(answer) if t == ids[0] and answer[i: i + k] == ids]
    return sorted(out, key=lambda g: g[1])


def _attach_conditioning(model, batch: list[PreparedRequest], results: list) -> None:
    """Each answer with signal groups: forward its prompt + answer, unpadded and alone (so its
    conditioning is bit-identical whatever batch it came from), then the output projections."""
    device = model.device
    for p, r in zip(batch, results):
        groups = _signal_groups(r.token_ids, model.llm.signal_ids)
        if not groups:
            continue
        ids = torch.tensor([p.ids + r.token_ids], device=device)
        embeds = model.embed_inputs(ids, p.media)
        hidden = model.llm.decoder()(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).last_hidden_state
        for m, start in groups:
            if m not in model.output_projections:
                log.warning("the model emitted %s signal tokens but has no %s decoder; ignored", m, m)
                continue
            s, k = len(p.ids) + start, len(model.llm.signal_ids[m])
            proj = model.output_projections[m]
            p_dtype = next(proj.parameters()).dtype
            cond = proj(hidden[:, s: s + k].to(p_dtype), embeds[:, s: s + k].to(p_dtype))
            r.conditioning.setdefault(m, []).append(cond[0])


@dataclass
class DecodeJob:
    """One signal group to decode: jobs with the same :attr:`key` can share a decoder call."""

    owner: Any  # whatever the caller tracks the request by
    modality: str
    index: int  # the group's index among its request's groups of this modality
    conditioning: torch.Tensor
    seed: int
    steps: int | None
    guidance: float | None

    @property
    def key(self) -> tuple[str, int | None, float | None]:
        return self.modality, self.steps, self.guidance


def decode_jobs(prepared: PreparedRequest, result, settings: Settings, owner: Any = None) -> list[DecodeJob]:
    """A result's signal groups as decode jobs, with the request's seed, steps and guidance; also
    sizes ``result.media[m]`` to hold one item per group (filled in by :func:`run_decoder`'s caller)."""
    req = prepared.request
    steps = req.steps if req.steps is not None else settings.steps
    guidance = req.guidance if req.guidance is not None else settings.guidance
    jobs = []
    for m, conds in result.conditioning.items():
        result.media[m] = [None] * len(conds)
        jobs += [DecodeJob(owner, m, j, c, media_seed(req.seed, j), steps, guidance) for j, c in enumerate(conds)]
    return jobs


@torch.inference_mode()
def run_decoder(model, jobs: list[DecodeJob]) -> list[Any]:
    """One decoder call for jobs sharing a key; one media item per job."""
    modality, steps, guidance = jobs[0].key
    if any(j.key != jobs[0].key for j in jobs):
        raise ValueError("run_decoder needs jobs of one modality, steps and guidance")
    return model.decoders[modality].generate(torch.stack([j.conditioning for j in jobs]), steps=steps,
                                             guidance=guidance, seeds=[j.seed for j in jobs])


def decode_outputs(model, batch: list[PreparedRequest], results: list, settings: Settings | None = None) -> None:
    """Decode every signal group of a batch into ``results[i].media``: one decoder call per modality
    and (steps, guidance), in chunks of ``settings.decode_batch_size`` groups."""
    settings = settings or Settings()
    queues: dict[tuple, list[DecodeJob]] = {}
    for i, (p, r) in enumerate(zip(batch, results)):
        for job in decode_jobs(p, r, settings, owner=i):
            queues.setdefault(job.key, []).append(job)
    for jobs in queues.values():
        size = settings.decode_batch_size or len(jobs)
        for chunk in (jobs[k: k + size] for k in range(0, len(jobs), size)):
            for job, item in zip(chunk, run_decoder(model, chunk)):
                results[job.owner].media[job.modality][job.index] = item


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
    """Answer a batch of requests in one go (raises on the first bad request; the batch runner in
    :mod:`mmllm.inference.runner` isolates bad requests instead), in eval mode: a model that was training
    is left in the modes it had (:func:`eval_mode`)."""
    settings = Settings(max_new_tokens, temperature if do_sample else 0.0, top_p, steps, guidance)
    spec = token_spec(model)
    batch = [prepare_request(model, r, spec) for r in requests]
    with eval_mode(model):  # one walk over the modules for both steps
        results = generate_answers(model, batch, settings)
        for i, result in enumerate(results):
            if result.cut_off is not None:
                log.warning("requests[%d]: %s", i, cut_off_note(result.cut_off))
        if decode_media:
            decode_outputs(model, batch, results, settings)
    return results
