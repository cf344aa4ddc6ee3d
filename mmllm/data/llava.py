"""LLaVA's conversation JSON (LLaVA-Instruct-150K, llava_v1_5_mix665k, LLaVA-Pretrain) -> a Conversation.

A JSON array (or JSON Lines) of records; fields not listed here are ignored (each said
once per file in training's log; ``mmllm data check`` lists them)::

    {"id": "000000033471",
     "image": "coco/train2017/000000033471.jpg"   (optional; a string or a list of strings),
     "video": "clips/v1.mp4"                       (optional; a string or a list, LLaVA-Video style),
     "audio": "sounds/a1.wav"                      (optional; mmllm's extension, same rules),
     "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                       {"from": "gpt", "value": "The bus is white and red."}, ...]}

``from`` is ``human`` / ``gpt`` / ``system`` (``user`` / ``assistant`` are accepted too). The
``<image>`` / ``<video>`` / ``<audio>`` placeholders take the record's paths of that modality in
order. A record with exactly one image (or video, or audio) and no placeholder for it gets one
prepended to its first human turn, as LLaVA's own preprocessing does; any other disagreement
between placeholders and paths is an error naming the record. Text-only records (no ``image``)
are plain conversations. Paths resolve against the dataset's ``root`` (LLaVA's ``image_folder``),
default the JSON file's folder.
"""

from __future__ import annotations

from typing import Any

from mmllm.config import MODALITIES
from mmllm.data.formats import (
    PLACEHOLDER_RE,
    Conversation,
    DataFormatError,
    MediaRef,
    Message,
    ReadContext,
    checked_conversation,
)
from mmllm.data.keys import keys
from mmllm.data.nextgpt import TURN_KEYS, as_list, role_of, text_of, turns_of

# the keys the layout reads (others are ignored, and said: mmllm.data.keys), and "model", which LLaVA-1.5's
# released mix665k puts (empty) on its text-only ShareGPT records: known, not read, so not warned about on each
LLAVA_KEYS = keys({"id", "conversations", "conversation", "model", *MODALITIES},
                  dict.fromkeys(("conversations", "conversation"), keys(TURN_KEYS, what="a turn")))


def parse_llava(rec: dict[str, Any], ctx: ReadContext, where: str) -> Conversation:
    turns = turns_of(rec, where)
    roles = [role_of(t, f"{where}.conversations[{i}]") for i, t in enumerate(turns)]
    texts = [text_of(t) for t in turns]
    paths = {m: as_list(rec.get(m), f"{where}.{m}") for m in MODALITIES}
    for m in MODALITIES:
        count = sum(PLACEHOLDER_RE.findall(t).count(m) for t in texts)
        if count == 0 and len(paths[m]) == 1:
            first = roles.index("user") if "user" in roles else 0
            texts[first] = f"<{m}>\n{texts[first]}"
        elif count != len(paths[m]):
            raise DataFormatError(
                f"{where}: the conversation has {count} <{m}> placeholder(s) but '{m}' names "
                f"{len(paths[m])} file(s); make them agree"
            )
    queues = {m: iter(paths[m]) for m in MODALITIES}
    messages = []
    for i, (role, text) in enumerate(zip(roles, texts)):
        slots = PLACEHOLDER_RE.findall(text)
        if slots and role == "assistant":
            raise DataFormatError(f"{where}.conversations[{i}]: a media placeholder in a gpt turn; LLaVA data "
                                  "has media inputs only (use mmllm-chat or nextgpt-mosit for media outputs)")
        media = [MediaRef(m, ctx.media.resolve(next(queues[m]), f"{where}.{m}")) for m in slots]
        messages.append(Message(role, text, media))
    return checked_conversation(Conversation(str(rec.get("id", where)), messages, where))
