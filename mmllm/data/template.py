"""Conversations -> token ids, labels, media order and signal groups.

The LLM's own chat template renders the conversation. Labels cover exactly what the assistant
says (its reply, its signal tokens and the template's end-of-turn marker); everything else is
``-100``. Each reply follows the very tokens inference prompts with (:func:`encode_prompt`): the text
up to a turn's start is tokenized whole, not turn by turn. Each media placeholder id is expanded to the number of tokens its input projection
yields, and truncation never cuts inside an expanded media span or a signal-token group: the cut
moves back to the span's start and the media/outputs past it are dropped with the text.
"""

from __future__ import annotations

import bisect
import datetime
import json
import re
import string
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from mmllm.config import DEFAULT_TEMPLATE_DATE, MODALITIES
from mmllm.data.formats import CaptionPair, Conversation, MediaRef, Message, OutputRef

IGNORE = -100

GENERATE_PROMPTS = {
    "image": "Generate an image: {caption}",
    "audio": "Generate a sound: {caption}",
    "video": "Generate a video: {caption}",
}


@dataclass
class TokenSpec:
    """What the template needs to know about the assembled model."""

    placeholder_ids: dict[str, int]
    media_tokens: dict[str, int]  # modality -> projected tokens per item
    signal_tokens: dict[str, list[str]]  # modality -> its signal token strings
    signal_ids: dict[str, list[int]]
    max_length: int
    template_date: str | None = DEFAULT_TEMPLATE_DATE  # the assembly's: see :func:`_render`


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]
    media: list[MediaRef] = field(default_factory=list)
    outputs: list[OutputRef] = field(default_factory=list)
    truncated: bool = False


class ContextLengthError(ValueError):
    pass


class SpecialTextError(ValueError):
    """A message's text holds the string of a token that changes the conversation's structure (a signal token, a
    special token the chat template writes, BOS/EOS/PAD/UNK: :func:`refused_tokens`): the tokenizer would read it
    as that token, not as text."""


# id(tokenizer) -> (a weak reference to it, what the pattern was derived from, the pattern of :func:`refused_tokens`)
_SPECIAL_TEXT: dict[int, tuple[weakref.ref, tuple, re.Pattern[str] | None]] = {}

# A conversation the chat template renders to find the special tokens it writes itself (its turn markers...)
_SAMPLE_CONVERSATION = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"},
                        {"role": "assistant", "content": "b"}]


def _special_added_tokens(tokenizer: Any) -> dict[int, str]:
    """id -> string of each of the tokenizer's special added tokens."""
    return {int(i): str(t.content) for i, t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
            if getattr(t, "special", False) and str(t.content)}


def template_tokens(tokenizer: Any, spec: TokenSpec) -> set[str]:
    """The special tokens the chat template writes itself (turn markers such as ``<|im_start|>``/``<|im_end|>``,
    a BOS it prints): those found in its rendering of a sample conversation (with a system turn, and without one
    where the template refuses it), the generation prompt included. None where it renders nothing."""
    special = _special_added_tokens(tokenizer)
    found: set[str] = set()
    for messages in (_SAMPLE_CONVERSATION, _SAMPLE_CONVERSATION[1:]):
        try:
            texts = [_render(tokenizer, messages, add_generation_prompt=False, date=spec.template_date),
                     _render(tokenizer, messages[:-1], add_generation_prompt=True, date=spec.template_date)]
        except Exception:  # noqa: BLE001 -- no template, or one refusing a system turn: what it renders is refused
            continue  # when a sample is encoded, with its own message
        found |= {special[i] for text in texts for i in _tokens(tokenizer, text) if i in special}
        break
    return found


def refused_tokens(tokenizer: Any, spec: TokenSpec) -> set[str]:
    """The strings a message's text may not hold, as the tokenizer would read each as a token that changes the
    structure mmllm relies on: the signal tokens, the special tokens the chat template writes itself
    (:func:`template_tokens`) and the tokenizer's BOS/EOS/PAD/UNK. Its other special tokens (SmolLM2's code-corpus
    markers ``<filename>``, ``<jupyter_code>``...) are read as the token, as ``apply_chat_template`` reads them,
    and the media placeholders (``<image>``...) are the markers of a message's media."""
    added = {str(t.content) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()}
    own = {getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    refused = {s for strings in spec.signal_tokens.values() for s in strings}
    refused |= {str(s) for s in own if s and str(s) in added}
    refused |= template_tokens(tokenizer, spec)
    return refused - {f"<{m}>" for m in MODALITIES} - {""}


def special_text_pattern(tokenizer: Any, spec: TokenSpec) -> re.Pattern[str] | None:
    """A pattern matching the strings of :func:`refused_tokens`, longest first; None where there are none.
    Derived once per tokenizer (again where tokens were added, its chat template, the signal tokens or the
    template date changed since), not per sample."""
    try:
        size = len(tokenizer)  # tokens added since: another pattern
    except TypeError:  # a stand-in without a length
        size = -1
    stamp = (size, getattr(tokenizer, "chat_template", None), tuple(map(tuple, spec.signal_tokens.values())),
             spec.template_date)
    key = id(tokenizer)
    cached = _SPECIAL_TEXT.get(key)
    if cached is not None and cached[0]() is tokenizer and cached[1] == stamp:
        return cached[2]
    strings = sorted(refused_tokens(tokenizer, spec), key=lambda s: (-len(s), s))
    pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
    try:
        _SPECIAL_TEXT[key] = (weakref.ref(tokenizer, lambda _: _SPECIAL_TEXT.pop(key, None)), stamp, pattern)
    except TypeError:  # an object no weak reference can name: not cached
        pass
    return pattern


def check_message_texts(messages: list[tuple[str, str]], tokenizer: Any, spec: TokenSpec, where: str) -> None:
    """Refuse (:class:`SpecialTextError`) a message whose text holds one of :func:`refused_tokens` (``messages``:
    each message's role and text, as written). The tokenizer reads such a string as the token itself, not as text:
    ``<img_0>..`` in a user's text was a signal group the model never produced, and a chat template's end-of-turn
    marker closed the turn and opened another the template never rendered. Training and inference refuse alike,
    so the two render the same tokens; ``where`` leads the message (a sample's file and line, a request's field)."""
    pattern = special_text_pattern(tokenizer, spec)
    if pattern is None:
        return
    for i, (role, text) in enumerate(messages):
        found = pattern.search(text)
        if found is not None:
            raise SpecialTextError(
                f"{where}[{i}]: the {role} text holds {found.group()!r} (at character {found.start() + 1}), a special "
                f"token of the assembly's tokenizer ({_special_kind(found.group())}): the tokenizer would read it as "
                "that token, not as text. Remove it or write it otherwise (e.g. with a space after its '<'); an "
                "answer that produced media lists them under 'outputs', and media inputs are marked with <image>, "
                "<audio> or <video>")


_SIGNAL_KIND = {"img": "an image", "aud": "audio", "vid": "a video"}  # mmllm.llm.SIGNAL_PREFIX's


def _special_kind(token: str) -> str:
    found = re.fullmatch(r"<(img|aud|vid)_\d+>", token)
    if found:
        return f"a signal token, which an answer emits to make {_SIGNAL_KIND[found.group(1)]}"
    return "a control token: one the chat template writes, such as its turn markers, or the tokenizer's BOS/EOS"


def pair_to_conversation(pair: CaptionPair, stage: str) -> Conversation:
    """encode-align: media -> caption. decode-align: caption -> signal tokens.

    A pair that carries its own prompt for the stage (NExT-GPT's comprehension / generation files)
    uses it; otherwise the defaults: the bare placeholder, and :data:`GENERATE_PROMPTS`.
    """
    user, reply = pair.prompts.get(stage, (None, ""))
    if stage == "encode-align":
        if pair.media is None:
            raise ValueError(f"{pair.source}: encode-align needs a 'media' path for each caption")
        msgs = [
            Message("user", user or f"<{pair.modality}>", [MediaRef(pair.modality, pair.media)]),
            Message("assistant", pair.caption),
        ]
    elif stage == "decode-align":
        msgs = [
            Message("user", user or GENERATE_PROMPTS[pair.modality].format(caption=pair.caption)),
            Message("assistant", reply,
                    outputs=[OutputRef(pair.modality, pair.caption, pair.media, pair.embedding)]),
        ]
    else:
        raise ValueError(f"caption pairs are for the alignment stages, not {stage!r}; use conversation data "
                         "(mmllm-chat, nextgpt-t2x, nextgpt-mosit, llava)")
    return Conversation(pair.id, msgs, pair.source)


def with_signal_tokens(content: str, outputs: list[str], spec: TokenSpec, where: str) -> str:
    """An assistant turn's content as the chat template is given it: its text, then the signal tokens of each of
    its ``outputs`` (modalities, in order) after a space (the signal tokens alone where the text is empty).
    Training renders every assistant turn's outputs so, and inference renders an earlier turn's outputs the same
    way (:func:`encode_prompt`), so that a conversation replayed to the model is the context training gave it."""
    if not outputs:
        return content
    for modality in outputs:
        if modality not in spec.signal_tokens:
            raise ValueError(f"{where}: an answer with an output of modality {modality}, but the assembly has no "
                             f"decoders.{modality}, so no {modality} signal tokens to render it with: leave that "
                             f"output out, or use an assembly that has decoders.{modality}")
    signals = "".join("".join(spec.signal_tokens[m]) for m in outputs)
    return f"{content} {signals}" if content.strip() else signals


def _template_messages(conv: Conversation, spec: TokenSpec) -> list[dict[str, str]]:
    return [{"role": msg.role,
             "content": with_signal_tokens(msg.content, [o.modality for o in msg.outputs], spec, conv.source)}
            for msg in conv.messages]


# strftime's codes that a template may ask ``strftime_now`` for (glibc's ``%-d`` style too)
_STRFTIME_CODES = [c for c in string.ascii_letters if c not in "EO"] + [f"-{c}" for c in "dmHIMSjy"]


@lru_cache(maxsize=16)
def dated_template(template: str, day: str) -> str:
    """``template`` with ``strftime_now(format)`` giving ``day`` (YYYY-MM-DD, midnight) in place of now.

    transformers gives chat templates a ``strftime_now`` that reads the clock (Llama 3.2/3.3, Granite,
    Mistral Small and others print today's date), and passes no callable a caller gives it on to the
    template. A macro of the same name, defined ahead of the template's own text, shadows it; it formats
    by a table of every strftime code for ``day``. A template that does not call it is returned as it is."""
    if "strftime_now" not in template:
        return template
    when = datetime.datetime.combine(datetime.date.fromisoformat(day), datetime.time())
    codes: dict[str, str] = {"%": "%"}
    for code in _STRFTIME_CODES:
        try:
            codes[code] = when.strftime(f"%{code}")
        except ValueError:  # a code this platform's strftime does not know
            continue
    table = json.dumps(codes, ensure_ascii=False)
    macro = ("{%- macro strftime_now(format) -%}{%- set ns = namespace(text='', flag=none) -%}"
             "{%- for c in format -%}"
             "{%- if ns.flag is not none and c == '-' and ns.flag == '' -%}{%- set ns.flag = '-' -%}"
             "{%- elif ns.flag is not none -%}{%- set ns.text = ns.text ~ " + table + ".get(ns.flag ~ c, '%' ~ ns.flag ~ c) -%}"
             "{%- set ns.flag = none -%}"
             "{%- elif c == '%' -%}{%- set ns.flag = '' -%}"
             "{%- else -%}{%- set ns.text = ns.text ~ c -%}{%- endif -%}"
             "{%- endfor -%}{{- ns.text -}}{%- endmacro %}")
    return macro + template


def _date_arguments(tokenizer: Any, date: str | None) -> dict[str, Any]:
    """What :func:`_render` passes ``apply_chat_template`` so that the template renders ``date`` as today:
    ``date_string`` (Llama 3.x's variable, "26 Jul 2024"), and a template whose ``strftime_now`` gives it.
    None: nothing (the template reads the clock)."""
    if date is None:
        return {}
    day = datetime.date.fromisoformat(date)
    return {"chat_template": dated_template(tokenizer.get_chat_template(), date),
            "date_string": day.strftime("%d %b %Y")}


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
            date: str | None = DEFAULT_TEMPLATE_DATE) -> str:
    """The chat template's text, rendered as on ``date`` (YYYY-MM-DD; the assembly's ``template_date``):
    templates that print today's date would otherwise make a sample differ from day to day, across a
    resume, and between training and inference. A conversation the template refuses (its
    ``raise_exception``: Mistral's "roles must alternate", Gemma 2's "System role not supported") is a
    ValueError, which training skips and counts as it does any sample that cannot be read, rather than
    jinja2's TemplateError."""
    if not messages:
        return ""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **_date_arguments(tokenizer, date))
    except TemplateError as exc:
        roles = ", ".join(m["role"] for m in messages)
        raise ValueError(f"the LLM's chat template refuses this conversation (roles: {roles}): {exc}; change the "
                         "conversation, or give llm.chat_template one that accepts it") from exc


PREFIX_STABLE_HINT = (
    "multi-turn conversations need a template under which each turn's rendering extends the previous one "
    "(Qwen3's drops the empty <think></think> block of assistant turns once a user turn follows): give "
    "llm.chat_template one that renders every assistant turn the same way wherever it stands"
)


def template_problem(tokenizer: Any) -> str | None:
    """Why the tokenizer's chat template cannot place the labels of a two-exchange conversation (what
    :func:`encode_conversation` needs), or None when it can."""
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    done = ""
    try:
        for i in (1, 3):
            prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
            full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                return f"its rendering of a two-exchange conversation is not prefix-stable: {PREFIX_STABLE_HINT}"
            done = full
    except Exception as exc:  # jinja2 TemplateError, or the template's own raise_exception
        return f"it cannot render a user/assistant/user/assistant conversation ({exc})"
    return None


def _tokens(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: no "sequence length is longer than the model's maximum" note; max_length is applied here
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids if text else []


def _labelled_tokens(tokenizer: Any, text: str, replies: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """``text`` as token ids, labelled on the ``replies`` (character spans of what the assistant says).

    Each turn's context is what :func:`encode_prompt` gives inference (the rendered prompt tokenized whole)
    and each reply the tokens that continue it in the whole text. Tokenizing each piece on its own differs
    wherever a tokenizer treats the start of a string specially: SentencePiece-style cores (Llama 2,
    Mistral, Vicuna) prepend "▁" to a string's start but not after a special token, so the model learnt to
    answer after another context than inference gives it, and to begin its answers with a token it is never
    asked for. The whole text is tokenized once (:func:`_whole_text_labels`); only where that cannot be
    shown to give each turn inference's context (a slow tokenizer, a token across a turn's start) is each
    prefix of the text tokenized whole, turn by turn."""
    if getattr(tokenizer, "is_fast", False):
        found = _whole_text_labels(tokenizer, text, replies)
        if found is not None:
            return found
    return _turn_by_turn_labels(tokenizer, text, replies)


def _turn_by_turn_labels(tokenizer: Any, text: str, replies: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """:func:`_labelled_tokens` where the whole text's tokens cannot be shown to give each turn inference's
    context: each prefix of the text tokenized whole, turn by turn."""
    ids: list[int] = []
    labels: list[int] = []
    placed = 0  # characters of text behind ids
    for begin, end in replies:
        prompt = _tokens(tokenizer, text[:begin])  # what inference prompts this turn with
        context = prompt[len(ids):] if prompt[:len(ids)] == ids else _tokens(tokenizer, text[placed:begin])
        ids += context
        labels += [IGNORE] * len(context)
        # the reply: the tokens that continue inference's prompt, even where an earlier turn left the training
        # context unlike it (a token across that turn's start); the reply on its own only where no prefix fits
        # (tokenized alone, a SentencePiece-style core would learn a "▁" its answers never begin with)
        whole = _tokens(tokenizer, text[:end])
        reply = whole[len(prompt):] if whole[:len(prompt)] == prompt else _tokens(tokenizer, text[begin:end])
        ids += reply
        labels += reply
        placed = end
    return ids, labels


def _whole_text_labels(tokenizer: Any, text: str,
                       replies: list[tuple[int, int]]) -> tuple[list[int], list[int]] | None:
    """The whole text's tokens, labelled where they start inside a reply; None unless the tokens before
    each reply are those of the text up to it. That is checked from the last added token (special tokens,
    placeholders: the tokenizer splits them off before anything else, so the text is cut cleanly there)
    before each reply's start, which keeps it linear in the length of the conversation."""
    if not text:
        return [], []
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, starts = list(enc.input_ids), [first for first, _ in enc.offset_mapping]
    for piece, want in _context_checks(_added_ids(tokenizer), text, replies, ids, starts):
        if _tokens(tokenizer, piece) != want:
            return None
    return ids, _reply_labels(ids, starts, replies)


def _added_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's added tokens (special tokens, placeholders)."""
    return set(getattr(tokenizer, "added_tokens_decoder", {}) or {})


def _context_checks(added: set[int], text: str, replies: list[tuple[int, int]], ids: list[int],
                    starts: list[int]) -> list[tuple[str, list[int]]]:
    """What shows the whole text's tokens (``ids``, starting at characters ``starts``) give each reply
    inference's context: per reply, the text from the last added token (``added``: their ids) before it up to
    it, and the tokens that text must be tokenized to."""
    checks = []
    for begin, _ in replies:
        k = bisect.bisect_left(starts, begin)  # tokens before the reply
        j = next((i for i in range(k - 1, -1, -1) if ids[i] in added), None)
        cut = 0 if j is None else starts[j]
        checks.append((text[cut:begin], ids[0 if j is None else j:k]))
    return checks


def _reply_labels(ids: list[int], starts: list[int], replies: list[tuple[int, int]]) -> list[int]:
    """``ids`` where a token starts inside a reply, else IGNORE."""
    labels = [IGNORE] * len(ids)
    for begin, end in replies:
        first, stop = bisect.bisect_left(starts, begin), bisect.bisect_left(starts, end)
        labels[first:stop] = ids[first:stop]
    return labels


def _labelled_tokens_batch(tokenizer: Any, items: list[tuple[str, list[tuple[int, int]]]]
                           ) -> list[tuple[list[int], list[int]]]:
    """:func:`_labelled_tokens` of each ``(text, replies)``, a fast tokenizer called once for all of the texts
    (its library's threads, where it may use them, share the work) and once for all of their distinct context
    checks (most often one: the template's text before a reply)."""
    if not getattr(tokenizer, "is_fast", False):
        return [_labelled_tokens(tokenizer, text, replies) for text, replies in items]
    texts = [text for text, _ in items if text]
    encs = _encode_batch(tokenizer, texts, offsets=True)
    added = _added_ids(tokenizer)  # a dict built at each ask
    whole: list[tuple[list[int], list[int]] | None] = []  # ids, starts
    checks: list[list[tuple[str, list[int]]]] = []
    for text, replies in items:
        if not text:
            whole.append(None)
            checks.append([])
            continue
        ids, offsets = next(encs)
        starts = [first for first, _ in offsets]  # each text's character spans made and let go in turn
        whole.append((ids, starts))
        checks.append(_context_checks(added, text, replies, ids, starts))
    # the text before a reply from the last added token: most often the same in every conversation (a template's
    # "<|im_start|>assistant\n"), tokenized once
    pieces = list(dict.fromkeys(piece for found in checks for piece, _ in found if piece))
    tokens = {piece: ids for piece, (ids, _) in zip(pieces, _encode_batch(tokenizer, pieces, offsets=False))}
    out = []
    for (text, replies), got, found in zip(items, whole, checks):
        if got is None:
            out.append(([], []))
            continue
        ids, starts = got
        fits = [tokens.get(piece, []) == want for piece, want in found]
        out.append((ids, _reply_labels(ids, starts, replies)) if all(fits)
                   else _turn_by_turn_labels(tokenizer, text, replies))
    return out


def _encode_batch(tokenizer: Any, texts: list[str], offsets: bool) -> Iterator[tuple[list[int], list[Any]]]:
    """Each text's token ids (as :func:`_tokens` gives them) and, with ``offsets``, their character spans, read
    from the tokenizer's own encodings as each is asked for: the spans of a whole batch, converted at once (a
    tuple a token), had the garbage collector run 4x as often."""
    if not texts:
        return
    kwargs = {"add_special_tokens": False, "return_attention_mask": False, "return_token_type_ids": False,
              "verbose": False}
    enc = tokenizer(texts, **kwargs)
    encodings = getattr(enc, "encodings", None) if offsets else None
    if offsets and encodings is None:  # no encodings of the tokenizers library: the spans converted
        enc = tokenizer(texts, return_offsets_mapping=True, **kwargs)
    for k, ids in enumerate(enc.input_ids):
        spans = [] if not offsets else encodings[k].offsets if encodings is not None else enc.offset_mapping[k]
        yield list(ids), spans


def expand_placeholders(
    ids: list[int], labels: list[int], spec: TokenSpec
) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Each placeholder id -> ``media_tokens[m]`` copies; returns ids, labels and the media spans."""
    by_id = {v: k for k, v in spec.placeholder_ids.items()}
    size = min(len(ids), len(labels))
    out_ids: list[int] = []
    out_labels: list[int] = []
    spans = []
    done = 0  # the text between placeholders copied a run at a time, not token by token
    for at in [i for i in range(size) if ids[i] in by_id]:
        m = by_id[ids[at]]
        if m not in spec.media_tokens:
            raise ValueError(f"the text holds a <{m}> placeholder but the assembly has no encoders.{m}")
        out_ids += ids[done:at]
        out_labels += labels[done:at]
        n = spec.media_tokens[m]
        spans.append((len(out_ids), len(out_ids) + n))
        out_ids += [ids[at]] * n
        out_labels += [IGNORE] * n
        done = at + 1
    out_ids += ids[done:size]
    out_labels += labels[done:size]
    return out_ids, out_labels, spans


def signal_spans(ids: list[int], spec: TokenSpec) -> list[tuple[int, int]]:
    firsts = {v[0]: len(v) for v in spec.signal_ids.values()}
    return [(i, i + firsts[t]) for i, t in enumerate(ids) if t in firsts]


def encode_conversation(conv: Conversation, tokenizer: Any, spec: TokenSpec) -> EncodedSample:
    _check_first_turn(conv)
    try:
        return _encode_conversation(conv, tokenizer, spec)
    except ValueError as exc:  # the template's own complaints do not know where the conversation is from
        if str(exc).startswith(conv.source):
            raise
        raise ValueError(f"{conv.source}: {exc}") from exc


def encode_conversations(convs: list[Conversation], tokenizer: Any,
                         spec: TokenSpec) -> list[EncodedSample | ValueError]:
    """What :func:`encode_conversation` gives each of ``convs``: its sample, or the ``ValueError`` it raises
    (the same message), with a fast tokenizer called for all of them at once rather than for each (``mmllm
    data check``; the figures: docs/data.md, Measurements)."""
    placed: list[tuple[Conversation, str, list[tuple[int, int]]] | ValueError] = []
    for conv in convs:
        try:
            _check_first_turn(conv)
            placed.append(_placed_replies(conv, tokenizer, spec))
        except ValueError as exc:
            placed.append(_sourced(conv, exc))
    try:
        labelled = iter(_labelled_tokens_batch(tokenizer, [(p[1], p[2]) for p in placed
                                                           if not isinstance(p, ValueError)]))
    except ValueError:  # a text the tokenizer refuses: it is that conversation's error, found one by one
        return [_encoded_or_error(conv, tokenizer, spec) for conv in convs]
    out: list[EncodedSample | ValueError] = []
    for conv, got in zip(convs, placed):
        if isinstance(got, ValueError):
            out.append(got)
            continue
        try:
            out.append(_encoded(got[0], *next(labelled), spec))
        except ValueError as exc:
            out.append(_sourced(conv, exc))
    return out


def _encoded_or_error(conv: Conversation, tokenizer: Any, spec: TokenSpec) -> EncodedSample | ValueError:
    try:
        return encode_conversation(conv, tokenizer, spec)
    except ValueError as exc:
        return exc


def _check_first_turn(conv: Conversation) -> None:
    first_turn = next((m.role for m in conv.messages if m.role != "system"), None)
    if first_turn != "user":
        raise ValueError(f"{conv.source}: a conversation must open with a user turn (after any system turn)")


def _sourced(conv: Conversation, exc: ValueError) -> ValueError:
    """``exc``, its message led by where the conversation is from (the template's own complaints do not say)."""
    if str(exc).startswith(conv.source):
        return exc
    out = ValueError(f"{conv.source}: {exc}")
    out.__cause__ = exc
    return out


# Messages past which a conversation is first cut to those its first max_length tokens reach (plus a margin of
# CONTEXT_MARGIN tokens, so that the tokens kept are the same as the whole conversation's).
LONG_CONVERSATION = 64
CONTEXT_MARGIN = 16


def within_context(conv: Conversation, tokenizer: Any, spec: TokenSpec) -> Conversation:
    """``conv`` without the messages that start past its first ``max_length`` tokens (which truncation drops
    anyway). Placing each reply renders the conversation up to it, so a conversation of n turns took time in
    n**2 (1600 short turns 7 s, a dataset line of 16000 over ten minutes, every time the sample was read): the
    prefix is rendered at 64, 128, 256... messages until it holds more than the context."""
    if len(conv.messages) <= LONG_CONVERSATION:  # every usual sample: nothing to render or cut
        return conv
    messages = _template_messages(conv, spec)
    k = LONG_CONVERSATION
    while k < len(messages):
        # the cut ends on a reply: the text encoded ends at the last reply placed, so a cut ending on a user turn
        # encoded less than the whole (a long last user turn was left out, and its media counted without their
        # placeholders: the sample refused)
        last = next((i for i in range(k - 1, -1, -1) if messages[i]["role"] == "assistant"), None)
        if last is not None:
            try:
                text = _render(tokenizer, messages[:last + 1], add_generation_prompt=False, date=spec.template_date)
            except ValueError:  # a prefix the template refuses: placing the turns says so, or places them all
                return conv
            if len(_tokens(tokenizer, text)) > spec.max_length + CONTEXT_MARGIN:
                return replace(conv, messages=conv.messages[:last + 1])
        k *= 2
    return conv


def _encode_conversation(conv: Conversation, tokenizer: Any, spec: TokenSpec) -> EncodedSample:
    conv, text, replies = _placed_replies(conv, tokenizer, spec)
    return _encoded(conv, *_labelled_tokens(tokenizer, text, replies), spec)


def _placed_replies(conv: Conversation, tokenizer: Any,
                    spec: TokenSpec) -> tuple[Conversation, str, list[tuple[int, int]]]:
    """The conversation (cut to its context, :func:`within_context`), its text rendered by the chat template,
    and the character spans of what the assistant says in it."""
    conv = within_context(conv, tokenizer, spec)
    check_message_texts([(m.role, m.content) for m in conv.messages], tokenizer, spec,
                        f"{conv.source}: messages")
    messages = _template_messages(conv, spec)
    replies: list[tuple[int, int]] = []  # character spans of what the assistant says in the rendered text
    done = ""  # the conversation rendered up to the last answer placed
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True, date=spec.template_date)
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False, date=spec.template_date)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(f"the tokenizer's chat template is not prefix-stable, so the labels of this "
                             f"conversation's turn {i + 1} cannot be placed: {PREFIX_STABLE_HINT}")
        replies.append((len(prompt), len(full)))
        done = full
    return conv, done, replies


def _encoded(conv: Conversation, ids: list[int], labels: list[int], spec: TokenSpec) -> EncodedSample:
    """The sample of the conversation's labelled tokens: placeholders expanded, checked against its media and
    outputs, truncated to ``max_length``."""
    # Placeholders must never be learned as outputs.
    placeholder = set(spec.placeholder_ids.values())
    labels = [IGNORE if t in placeholder else lab for t, lab in zip(ids, labels)]
    ids, labels, spans = expand_placeholders(ids, labels, spec)
    media = conv.media_refs()
    if len(spans) != len(media):
        raise ValueError(f"{conv.source}: {len(spans)} placeholders in the text but {len(media)} media items")
    outputs = [o for m in conv.messages for o in m.outputs]
    sig = signal_spans(ids, spec)
    if len(sig) != len(outputs):
        raise ValueError(f"{conv.source}: {len(sig)} signal groups in the text but {len(outputs)} outputs")
    truncated = False
    if len(ids) > spec.max_length:
        cut = spec.max_length
        for start, end in spans + sig:
            if start < cut < end:
                cut = min(cut, start)
        ids, labels = ids[:cut], labels[:cut]
        media = [m for m, (s, _) in zip(media, spans) if s < cut]
        outputs = [o for o, (s, _) in zip(outputs, sig) if s < cut]
        truncated = True
        if all(lab == IGNORE for lab in labels[1:]):
            raise ContextLengthError(
                f"{conv.source}: nothing left to learn after truncating to max_length={spec.max_length}"
            )
    return EncodedSample(conv.id, ids, labels, media, outputs, truncated)


def prompt_messages(messages: list[dict[str, Any]], spec: TokenSpec) -> list[dict[str, str]]:
    """Inference's messages as the chat template is given them: an earlier assistant turn's ``outputs`` (a list of
    ``{"modality": ...}``, as training data writes them) become its signal tokens, as training renders them
    (:func:`with_signal_tokens`)."""
    out = []
    for i, msg in enumerate(messages):
        outputs = [o["modality"] for o in msg.get("outputs") or []]
        out.append({"role": msg["role"], "content": with_signal_tokens(msg["content"], outputs, spec,
                                                                        f"messages[{i}]")})
    return out


def encode_prompt(
    messages: list[dict[str, Any]], tokenizer: Any, spec: TokenSpec
) -> tuple[list[int], list[tuple[int, int]]]:
    """Inference: a conversation up to the next assistant turn -> expanded ids and media spans. A message is
    ``{"role": ..., "content": ...}``; an assistant's may list the media it produced under ``outputs``
    (:func:`prompt_messages`). A message's text holding a special token's string is refused
    (:func:`check_message_texts`), as training refuses it."""
    check_message_texts([(m["role"], m["content"]) for m in messages], tokenizer, spec, "messages")
    text = _render(tokenizer, prompt_messages(messages, spec), add_generation_prompt=True, date=spec.template_date)
    ids = _tokens(tokenizer, text)
    ids, _, spans = expand_placeholders(ids, [IGNORE] * len(ids), spec)
    if len(ids) > spec.max_length:
        raise ContextLengthError(
            f"prompt is {len(ids)} tokens after media expansion; the context holds max_length={spec.max_length} "
            f"(the checkpoint's assembly): shorten the prompt, or drop earlier turns of the conversation"
        )
    return ids, spans
