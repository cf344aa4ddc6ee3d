"""NExT-GPT's released data layouts -> mmllm's normal form.

Files are JSON arrays (as NExT-GPT ships them) or JSON Lines. Fields not listed here are ignored (each
said once per file in training's log; ``mmllm data check`` lists them).
Roles: ``"from"`` is ``human`` / ``gpt`` (``user`` / ``assistant`` / ``system`` are accepted too).

``nextgpt-pairs`` -- ``data/T_X_pair_data/{cc3m,webvid,audiocap}/``; each record is one of:

* a raw pair (``cc3m.json``, ``webvid.json``, ``audiocap.json``)::

    {"caption": str, "image_name" | "video_name" | "audio_name": str, "id": str (optional)}

* a comprehension record (``*_comprehension.json``) -- its human turn is the encode-align prompt::

    {"input_image" | "input_video" | "input_audio": str,
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the image about?"},
                       {"from": "gpt", "value": <caption>}]}

* a generation record (``*_generation.json``) -- its turns are the decode-align prompt and reply::

    {"output_image" | "output_video" | "output_audio": str,
     "image_captions" | "video_captions" | "audio_captions": str or [str],
     "image_caption_embeddings" | ...: "<name>.npy" or ["<name>.npy"] (optional),
     "conversations": [{"from": "human", "value": "render a picture of <caption>"},
                       {"from": "gpt", "value": "Here it is. <image>"}]}

  Media names resolve against the dataset's ``root`` (default: the JSON file's folder) or, when
  not there, its ``images/``, ``videos/`` or ``audios/`` subfolder (NExT-GPT's layout).

``nextgpt-t2x`` -- the text -> text+X instruction files (``{image,audio,video}_t2x.json``)::

    {"conversation" | "conversations": [
        {"from": "human", "value": str},
        {"from": "gpt", "value": str, "caption": str, "output_modality": "image"|"audio"|"video"|"text"}],
     "output_modality": str (optional, older files),
     "mm_name" | "image_name": str (optional: names the embedding file "<name>.npy", older files),
     "image_captions" | "audio_captions" | "video_captions": [str] (optional, newer files),
     "image_caption_embeddings" | ...: [str] (optional, aligned with the captions)}

  A gpt turn with a non-empty ``caption`` and an ``output_modality`` (the turn's, else the
  record's) yields one output of that modality. A ``<image>``/``<audio>``/``<video>`` marker in a
  gpt value marks an output too: it is removed from the text (mmllm appends the signal tokens at
  the end of the reply) and, when the turn has no caption, takes the next caption of the record's
  ``<modality>_captions`` (a turn's own caption that is the list's next one counts as taken).

``nextgpt-mosit`` -- MosIT dialogues (any modality in and out)::

    {"conversation" | "conversations": [
        {"from": "human", "value": "Listen: <Audio>thunder and rain</Audio>", "audio_list": ["rain.wav"]},
        {"from": "gpt", "value": "Here is the storm: <Image>dark storm clouds</Image>",
         "image_list": ["clouds.jpg"] (optional: target media)}],
     "image_list" | "audio_list" | "video_list": [str] (optional, record level)}

  In a human turn each tagged span ``<Image>...</Image>`` (or a bare ``<image>``; any case) is one
  media input: it becomes the placeholder, and its file is the next entry of the turn's
  ``<modality>_list`` (else of the record's list, consumed in order over the dialogue). In a gpt
  turn each tagged span is one output whose caption is the span's text; it is removed from the
  reply, and the turn's ``<modality>_list`` entries, when present, are the outputs' target media.
  A bare marker in a gpt turn takes its caption from the turn's ``caption``.

Precomputed caption embeddings (NExT-GPT's ``process_embeddings.py`` output) are used when the
dataset sets ``embeddings: <folder>`` (their ``embed_path``): the file of an output is the
record's ``*_caption_embeddings`` entry, else ``<media name>.npy`` -- always looked up by file
name in that folder. They become the decoders' conditioning targets when their shape matches the
decoder's ``conditioning_shape``; otherwise training says so and computes the targets itself.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Any

from mmllm.config import MODALITIES
from mmllm.data.formats import (
    CaptionPair,
    Conversation,
    DataFormatError,
    MediaRef,
    Message,
    OutputRef,
    ReadContext,
    checked_conversation,
)
from mmllm.data.keys import keys

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SUBFOLDERS = {"image": "images", "video": "videos", "audio": "audios"}
MARKER_RE = re.compile(r"<(image|audio|video)>", re.IGNORECASE)
# A MosIT span ``<Image>caption</Image>`` (group 2 = its text) or a bare ``<image>`` (group 2 = None).
SPAN_RE = re.compile(r"<(image|audio|video)>(?:((?:(?!<(?:image|audio|video)>).)*?)</\1>)?",
                     re.IGNORECASE | re.DOTALL)

# the keys each layout reads (others are ignored, and said: mmllm.data.keys); a turn's role and text are read
# from "from" / "value", else "role" / "content"
TURN_KEYS = {"from", "value", "role", "content"}


def _per_modality(*patterns: str) -> set[str]:
    return {p.format(m) for p in patterns for m in MODALITIES}


_TURNS = ("conversations", "conversation")
# keys of NExT-GPT's released files that no format needs, taken as read: warned on, they would be said for every
# record of every real file (data/prepare_data.py writes them), a turn's "input_modality" with "did you mean
# 'output_modality'?" -- a hint to rename a key that is right as it is
PAIR_PROVENANCE = {"audio_id"}  # audiocap.json: AudioCaps' id of the clip ("id" is read)
T2X_PROVENANCE = {"source_data"}  # {image,audio,video}_t2x.json: the pair the conversation was written from
T2X_TURN_PROVENANCE = {"input_modality"}  # "text" on each human turn: t2x inputs are text
PAIR_KEYS = keys({"id", "caption", *_TURNS} | PAIR_PROVENANCE
                 | _per_modality("{}_name", "input_{}", "output_{}", "{}_captions", "{}_caption_embeddings"),
                 dict.fromkeys(_TURNS, keys(TURN_KEYS, what="a turn")))
T2X_KEYS = keys({"id", "output_modality", "mm_name", "image_name", *_TURNS} | T2X_PROVENANCE
                | _per_modality("{}_captions", "{}_caption_embeddings"),
                dict.fromkeys(_TURNS, keys(TURN_KEYS | {"caption", "output_modality"} | T2X_TURN_PROVENANCE,
                                           what="a turn")))
MOSIT_KEYS = keys({"id", *_TURNS} | _per_modality("{}_list"),
                  dict.fromkeys(_TURNS, keys(TURN_KEYS | {"caption"} | _per_modality("{}_list"), what="a turn")))

# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------


def role_of(turn: Any, where: str) -> str:
    if not isinstance(turn, dict):
        raise DataFormatError(f"{where}: expected a turn object with 'from' and 'value'")
    who = turn.get("from", turn.get("role"))
    if not isinstance(who, str) or who.lower() not in ROLES:
        raise DataFormatError(f"{where}: 'from' is {who!r}; expected one of {', '.join(ROLES)}")
    value = turn.get("value", turn.get("content"))
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: 'value' must be a string, got {value!r}")
    return ROLES[who.lower()]


def text_of(turn: dict[str, Any]) -> str:
    return turn["value"] if "value" in turn else turn["content"]


def turns_of(rec: dict[str, Any], where: str) -> list[dict[str, Any]]:
    turns = rec.get("conversations", rec.get("conversation"))
    if not isinstance(turns, list) or not turns:
        raise DataFormatError(f"{where}: expected a non-empty 'conversations' (or 'conversation') list")
    return turns


def as_list(value: Any, where: str) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DataFormatError(f"{where}: expected a string or a list of strings, got {value!r}")


def clean(text: str) -> str:
    """Message text: runs of spaces collapsed, ends stripped (newlines kept)."""
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def caption_of(text: str) -> str:
    """A caption: all whitespace (NExT-GPT's stray CR/LF too) collapsed to single spaces."""
    return " ".join(text.split())


def _exists(path: str) -> bool:
    """``Path(path).exists()``, without building the Path: an error other than "not there" (a name too long) is
    raised, so the record is reported as malformed rather than its file as missing."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return False
        raise
    except ValueError:  # a NUL in the name
        return False
    return True


def find_media(ctx: ReadContext, name: Any, modality: str, where: str) -> Path:
    """``root/name``, else ``root/<images|videos|audios>/name``, looked up per record. A file found in
    neither place is reported where the file's other records of that modality were found (else in root)."""
    direct = ctx.media.resolve_str(name, where)
    key = f"nextgpt-subfolder-{modality}"
    if _exists(direct):
        ctx.state.setdefault(key, "")
        return Path(direct)
    nested = ctx.media.resolve_str(f"{SUBFOLDERS[modality]}/{name}", where)
    if _exists(nested):
        ctx.state.setdefault(key, SUBFOLDERS[modality])
        return Path(nested)
    return Path(nested if ctx.state.get(key) == SUBFOLDERS[modality] else direct)


def modality_key(rec: dict[str, Any], pattern: str) -> tuple[str, Any] | None:
    """The (modality, value) of the first present key ``pattern.format(m)``."""
    for m in MODALITIES:
        if rec.get(pattern.format(m)):
            return m, rec[pattern.format(m)]
    return None


# --------------------------------------------------------------------------------------------
# nextgpt-pairs
# --------------------------------------------------------------------------------------------


def parse_pair(rec: dict[str, Any], ctx: ReadContext, where: str) -> CaptionPair:
    raw = modality_key(rec, "{}_name")
    if raw is not None and "caption" in rec:
        modality, name = raw
        caption = rec["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise DataFormatError(f"{where}: missing or empty 'caption'")
        media = find_media(ctx, name, modality, f"{where}.{modality}_name")
        return CaptionPair(str(rec.get("id", Path(name).stem)), modality, caption_of(caption), media, where,
                           ctx.embedding(f"{Path(name).name}.npy", where))
    comp = modality_key(rec, "input_{}")
    if comp is not None:
        return _comprehension(rec, ctx, where, *comp)
    gen = modality_key(rec, "output_{}")
    if gen is not None:
        return _generation(rec, ctx, where, *gen)
    raise DataFormatError(
        f"{where}: not a NExT-GPT pair record: expected 'caption' + 'image_name'/'video_name'/'audio_name' "
        "(raw pairs), 'input_<modality>' + 'conversations' (*_comprehension.json) or 'output_<modality>' + "
        "'<modality>_captions' + 'conversations' (*_generation.json)"
    )


def _two_turns(rec: dict[str, Any], where: str) -> tuple[str, str]:
    turns = turns_of(rec, where)
    roles = [role_of(t, f"{where}.conversations[{i}]") for i, t in enumerate(turns)]
    if roles[:2] != ["user", "assistant"]:
        raise DataFormatError(f"{where}: expected a human turn then a gpt turn, got {roles}")
    return text_of(turns[0]), text_of(turns[1])


def _comprehension(rec: dict[str, Any], ctx: ReadContext, where: str, modality: str, name: Any) -> CaptionPair:
    question, caption = _two_turns(rec, where)
    question = MARKER_RE.sub(lambda mt: f"<{mt.group(1).lower()}>", question)
    slots = [s.lower() for s in MARKER_RE.findall(question)]
    if slots != [modality]:
        raise DataFormatError(
            f"{where}: the human turn must hold exactly one <{modality}> placeholder, found {slots or 'none'}"
        )
    if not caption.strip():
        raise DataFormatError(f"{where}: the gpt turn (the caption) is empty")
    media = find_media(ctx, name, modality, f"{where}.input_{modality}")
    return CaptionPair(str(rec.get("id", Path(name).stem)), modality, caption_of(caption), media, where,
                       ctx.embedding(f"{Path(name).name}.npy", where),
                       prompts={"encode-align": (question.strip(), "")})


def _generation(rec: dict[str, Any], ctx: ReadContext, where: str, modality: str, name: Any) -> CaptionPair:
    captions = as_list(rec.get(f"{modality}_captions"), f"{where}.{modality}_captions")
    if len(captions) != 1 or not captions[0].strip():
        raise DataFormatError(f"{where}: expected one non-empty '{modality}_captions' entry, got {captions!r}")
    request, reply = _two_turns(rec, where)
    embeds = as_list(rec.get(f"{modality}_caption_embeddings"), f"{where}.{modality}_caption_embeddings")
    embedding = ctx.embedding(embeds[0] if embeds else f"{Path(name).name}.npy", where)
    media = find_media(ctx, name, modality, f"{where}.output_{modality}")
    return CaptionPair(str(rec.get("id", Path(name).stem)), modality, caption_of(captions[0]), media, where, embedding,
                       prompts={"decode-align": (clean(request), clean(MARKER_RE.sub("", reply)))})


# --------------------------------------------------------------------------------------------
# nextgpt-t2x
# --------------------------------------------------------------------------------------------


def parse_t2x(rec: dict[str, Any], ctx: ReadContext, where: str) -> Conversation:
    turns = turns_of(rec, where)
    pools = {m: as_list(rec.get(f"{m}_captions"), f"{where}.{m}_captions") for m in MODALITIES}
    embeds = {m: as_list(rec.get(f"{m}_caption_embeddings"), f"{where}.{m}_caption_embeddings") for m in MODALITIES}
    used = {m: 0 for m in MODALITIES}
    mm_name = rec.get("mm_name") or rec.get("image_name")
    record_modality = rec.get("output_modality")

    def embedding_for(m: str, caption: str, index: int | None) -> Path | None:
        if index is not None and index < len(embeds[m]):
            return ctx.embedding(embeds[m][index], where)
        if caption in pools[m] and pools[m].index(caption) < len(embeds[m]):
            return ctx.embedding(embeds[m][pools[m].index(caption)], where)
        if isinstance(mm_name, str) and mm_name:
            return ctx.embedding(f"{Path(mm_name).name}.npy", where)
        return None

    messages = []
    for i, turn in enumerate(turns):
        w = f"{where}.conversation[{i}]"
        role = role_of(turn, w)
        value = text_of(turn)
        markers = [m.lower() for m in MARKER_RE.findall(value)]
        if role != "assistant":
            if markers:
                raise DataFormatError(f"{w}: a {markers[0]} marker in a human turn, but t2x files carry no input "
                                      "media; use the nextgpt-mosit or llava format for media inputs")
            messages.append(Message(role, value))
            continue
        outputs = []
        caption = turn.get("caption")
        modality = turn.get("output_modality") or record_modality
        if isinstance(caption, str) and caption.strip() and modality is not None and modality not in (*MODALITIES,
                                                                                                       "text"):
            raise DataFormatError(f"{w}: output_modality {modality!r} is not one of {', '.join(MODALITIES)} or "
                                  f"text, so the turn's caption {caption[:60]!r} has no output to go to")
        if isinstance(caption, str) and caption.strip() and modality in MODALITIES:
            if markers.count(modality) > 1 or any(m != modality for m in markers):
                raise DataFormatError(f"{w}: one caption for {modality} but markers {markers} in the reply")
            outputs.append(OutputRef(modality, caption_of(caption), None, embedding_for(modality, caption, None)))
            if used[modality] < len(pools[modality]) and caption_of(pools[modality][used[modality]]) == caption_of(
                    caption):  # the record's list holds this turn's caption too: a later bare marker takes the next
                used[modality] += 1
        else:
            for m in markers:
                if used[m] >= len(pools[m]):
                    raise DataFormatError(
                        f"{w}: the reply has a <{m}> marker but no caption for it: add 'caption' and "
                        f"'output_modality' to the turn, or list it in the record's '{m}_captions'"
                    )
                outputs.append(OutputRef(m, caption_of(pools[m][used[m]]), None, embedding_for(m, "", used[m])))
                used[m] += 1
        messages.append(Message(role, clean(MARKER_RE.sub("", value)), [], outputs))
    return checked_conversation(Conversation(str(rec.get("id", mm_name or where)), messages, where))


# --------------------------------------------------------------------------------------------
# nextgpt-mosit
# --------------------------------------------------------------------------------------------


def parse_mosit(rec: dict[str, Any], ctx: ReadContext, where: str) -> Conversation:
    turns = turns_of(rec, where)
    record = {m: as_list(rec.get(f"{m}_list"), f"{where}.{m}_list") for m in MODALITIES}
    record_used = {m: 0 for m in MODALITIES}
    messages = []
    for i, turn in enumerate(turns):
        w = f"{where}.conversation[{i}]"
        role = role_of(turn, w)
        lists = {m: as_list(turn.get(f"{m}_list"), f"{w}.{m}_list") for m in MODALITIES}
        if role == "assistant":
            messages.append(_mosit_reply(turn, text_of(turn), lists, ctx, w))
        else:
            text, media = _mosit_inputs(text_of(turn), lists, record, record_used, ctx, w)
            messages.append(Message(role, text, media))
    return checked_conversation(Conversation(str(rec.get("id", where)), messages, where))


def _mosit_inputs(value: str, lists: dict[str, list[str]], record: dict[str, list[str]],
                  record_used: dict[str, int], ctx: ReadContext, w: str) -> tuple[str, list[MediaRef]]:
    """Each tagged span or bare marker -> a placeholder and the next file of the turn's (or record's) list."""
    media: list[MediaRef] = []
    used = {m: 0 for m in MODALITIES}

    def take(mt: re.Match[str]) -> str:
        m = mt.group(1).lower()
        if used[m] < len(lists[m]):
            name = lists[m][used[m]]
        elif record_used[m] < len(record[m]):
            name = record[m][record_used[m]]
            record_used[m] += 1
        else:
            raise DataFormatError(
                f"{w}: the human turn shows a {m} ({mt.group(0)[:60]!r}) but names no file for it: "
                f"list it in the turn's (or the record's) '{m}_list'"
            )
        used[m] += 1
        media.append(MediaRef(m, find_media(ctx, name, m, f"{w}.{m}_list")))
        return f"<{m}>"

    return clean(SPAN_RE.sub(take, value)), media


def _mosit_reply(turn: dict[str, Any], value: str, lists: dict[str, list[str]], ctx: ReadContext,
                 w: str) -> Message:
    """Each tagged span is an output captioned by its text; a bare marker takes the turn's 'caption'."""
    outputs: list[OutputRef] = []
    for mt in SPAN_RE.finditer(value):
        m, span = mt.group(1).lower(), mt.group(2)
        if span is None:
            caption = turn.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise DataFormatError(f"{w}: a bare <{m}> in the reply needs a 'caption' on the turn "
                                      f"(or write it as <{m.capitalize()}>caption</{m.capitalize()}>)")
        else:
            caption = span
        if not caption_of(caption):
            raise DataFormatError(f"{w}: an empty {mt.group(0)!r} span; its text is the output's caption")
        outputs.append(OutputRef(m, caption_of(caption)))
    if sum(1 for mt in SPAN_RE.finditer(value) if mt.group(2) is None) > 1:
        raise DataFormatError(f"{w}: more than one bare marker in the reply share the turn's one 'caption'; "
                              "write each as a <Image>caption</Image> span")
    seen = {m: 0 for m in MODALITIES}
    for out in outputs:
        names = lists[out.modality]
        if seen[out.modality] < len(names):
            out.path = find_media(ctx, names[seen[out.modality]], out.modality, f"{w}.{out.modality}_list")
        seen[out.modality] += 1
    return Message("assistant", clean(SPAN_RE.sub("", value)), [], outputs)
