"""Training data of the embedded default's three stages, made from the toy world.

``write_stage_data(StageDataOptions(out=...))`` renders media of the world's *training* combinations
(held-out combinations never appear, in inputs or in outputs) and writes, under ``out``:

* ``media/{image,audio,video}/...`` -- PNG, 16-bit WAV, GIF (lossless for these few colours);
* ``align-{image,audio,video}.jsonl`` (``mmllm-pairs``) -- each media file with its canonical
  caption: encode-align learns media -> caption;
* ``generate.jsonl`` (``mmllm-chat``) -- "draw / make a sound / show a clip" requests phrased many
  ways -> the signal tokens, with the canonical caption as the decoder's conditioning target
  (decode-align);
* for the instruct stage (``mmllm-chat``): ``t2x.jsonl`` (text -> media), ``x2t.jsonl`` (media ->
  description), ``x2y.jsonl`` (image -> video and video -> image, where the world links them),
  ``multi.jsonl`` (two outputs in one answer), ``dialogue.jsonl`` (multi-turn, switching modality)
  and ``plain.jsonl`` (no media: the base core's own answers, :func:`distil_plain_chat`);
* ``held-out/`` -- the same kinds of record for the *held-out* combinations only, with their own
  ``media/``: ``align-{image,audio,video}.jsonl``, ``generate.jsonl``, ``t2x.jsonl`` and ``x2t.jsonl``.
  No stage trains on them; the default stage configs score them as ``eval_data``, so a run shows how
  well what it learns composes to combinations it never saw.

Everything is a pure function of ``seed``. The canonical caption is the one target for both
directions, whatever phrasing the request used: descriptions are then parseable by
:meth:`~mmllm.toyworld.world.World.parse`, and the output projection learns one conditioning per
combination -- the one the oracle of ``mmllm world report`` is measured with.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmllm.atomic import atomic_write_text
from mmllm.data.media import save_media
from mmllm.progress import progress_bar
from mmllm.toyworld.world import MODALITIES, Combo, Split, World

log = logging.getLogger(__name__)

SUFFIX = {"image": ".png", "audio": ".wav", "video": ".gif"}
NOUN = {"image": "picture", "audio": "sound", "video": "clip"}

# Requests for media. ``{c}`` is a caption; the colon forms also take captions that are sentences.
ASK = {
    "image": (
        "Draw {c}.", "Can you draw {c}?", "Please make a picture of {c}.", "Show me a picture of {c}.",
        "Paint {c}.", "I'd like an image of {c}.", "Generate an image: {c}", "Create a picture: {c}",
        "Draw this: {c}", "image please: {c}",
    ),
    "audio": (
        "Make a sound: {c}", "Generate a sound: {c}", "Play {c}.", "Can you make the sound of {c}?",
        "Let me hear {c}.", "Create audio of {c}.", "I want to hear this: {c}", "Make some audio: {c}",
        "Produce a sound of {c}.", "sound please: {c}",
    ),
    "video": (
        "Show a clip of {c}.", "Make a video of {c}.", "Generate a video: {c}", "Can you animate {c}?",
        "Create a short clip showing {c}.", "Show me a video: {c}", "Film this: {c}", "Make a clip: {c}",
        "Animate this: {c}", "video please: {c}",
    ),
}
NOUN_ONLY = {"Draw {c}.", "Can you draw {c}?", "Please make a picture of {c}.", "Show me a picture of {c}.",
             "Paint {c}.", "I'd like an image of {c}.", "Play {c}.", "Can you make the sound of {c}?",
             "Let me hear {c}.", "Create audio of {c}.", "Produce a sound of {c}.", "Show a clip of {c}.",
             "Make a video of {c}.", "Can you animate {c}?", "Create a short clip showing {c}."}
DESCRIBE = {
    "image": ("What is in this picture?", "Describe this image.", "What do you see?", "What does this show?",
              "Tell me what is in the image.", "Describe the picture, please."),
    "audio": ("What is this sound?", "Describe this audio.", "What do you hear?", "Describe the sound, please.",
              "What kind of sound is this?", "Tell me about this recording."),
    "video": ("What happens in this clip?", "Describe this video.", "What do you see moving?",
              "Describe the clip, please.", "What is going on in this video?", "Tell me what this video shows."),
}
DESCRIBE_REPLY = {"image": "The picture shows {c}.", "audio": "This is {c}.", "video": "The clip shows {c}."}
MAKE_REPLY = {"image": "Here is a picture of {c}.", "audio": "Here is the sound of {c}.",
              "video": "Here is a clip of {c}."}
IMAGE_TO_VIDEO = ("Make a video of the shape in this picture moving {d}.", "Animate this shape moving {d}.",
                  "Show a clip of this shape going {d}.", "Now make it move {d} in a video.")
VIDEO_TO_IMAGE = ("Draw this shape as a {s} picture in the {p}.", "Make a still picture of this shape, {s}, in the {p}.",
                  "Draw a {s} version of this shape in the {p}.")
SWITCH = ("Now {ask}", "Next, {ask}", "Thanks. {ask}", "Great. And now: {ask}")
FOLLOW_VIDEO = ("Now make a video of it moving {d}.", "Animate it moving {d}.", "Show it going {d} in a clip.")
FOLLOW_IMAGE = ("Now draw it {s} in the {p}.", "Draw it again, {s}, in the {p}.")


@dataclass
class StageDataOptions:
    out: Path
    seed: int = 0
    renderings: dict[str, int] = field(default_factory=lambda: {"image": 4, "audio": 12, "video": 5})
    generate: int = 3000  # decode-align requests
    t2x: int = 1800
    x2t: int = 1500
    x2y: int = 600
    multi: int = 600
    dialogue: int = 600
    plain_answers: Path | None = None  # distilled plain chat (JSONL of {"prompt", "answer"}); None: none
    held_out_renderings: dict[str, int] = field(default_factory=lambda: {"image": 2, "audio": 8, "video": 3})
    held_out_requests: int = 120  # each of held-out/generate, t2x and x2t


HELD_OUT = "held-out"  # the folder under ``out`` holding the held-out combinations' evaluation data


class _Media:
    """Rendered media of one split's combos: per modality, per combo, a list of paths relative to ``out``."""

    def __init__(self, world: World, out: Path, seed: int, renderings: dict[str, int], split: Split = "train"):
        self.world, self.out = world, out
        self.files: dict[str, dict[Combo, list[str]]] = {m: {} for m in MODALITIES}
        tag = 11 if split == "train" else 12  # the training media are those rendered before held-out ones existed
        for modality in MODALITIES:
            combos = world.combos(modality, split)
            folder = out / "media" / modality
            folder.mkdir(parents=True, exist_ok=True)
            for c, combo in enumerate(progress_bar(combos, desc=f"rendering {modality}", leave=False)):
                for k in range(renderings[modality]):
                    item_seed = int(np.random.default_rng([seed, MODALITIES.index(modality), c, k, tag]).integers(2**62))
                    rel = f"media/{modality}/{'-'.join(combo)}-{k}{SUFFIX[modality]}"
                    if not (out / rel).is_file():
                        media = world.render(modality, world.attributes_of(modality, combo), item_seed)
                        save_media(modality, media, out / rel)
                    self.files[modality].setdefault(combo, []).append(rel)

    def pick(self, modality: str, rng: np.random.Generator) -> tuple[Combo, str]:
        combos = list(self.files[modality])
        combo = combos[rng.integers(len(combos))]
        paths = self.files[modality][combo]
        return combo, paths[rng.integers(len(paths))]


def _choice(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


class _Writer:
    def __init__(self, world: World, media: _Media, seed: int, split: Split = "train"):
        self.world, self.media, self.seed, self.split = world, media, seed, split

    def canon(self, modality: str, combo: Combo) -> str:
        return self.world.caption(modality, self.world.attributes_of(modality, combo))

    def ask(self, modality: str, combo: Combo, rng: np.random.Generator) -> str:
        caption = self.world.caption(modality, self.world.attributes_of(modality, combo), rng)
        template = _choice(rng, ASK[modality])
        if template in NOUN_ONLY and not caption.startswith(("a ", "an ", "the ")):
            template = _choice(rng, [t for t in ASK[modality] if t not in NOUN_ONLY])
        return template.format(c=caption)

    def random_combo(self, modality: str, rng: np.random.Generator) -> Combo:
        combos = self.world.combos(modality, self.split)
        return combos[int(rng.integers(len(combos)))]

    def output(self, modality: str, combo: Combo) -> dict[str, str]:
        return {"modality": modality, "caption": self.canon(modality, combo)}

    def make_turn(self, modality: str, combo: Combo) -> dict[str, Any]:
        return {"role": "assistant", "content": MAKE_REPLY[modality].format(c=self.canon(modality, combo)),
                "outputs": [self.output(modality, combo)]}

    # -- kinds of record -----------------------------------------------------------------------

    def generate(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        modality = MODALITIES[i % 3]
        combo = self.random_combo(modality, rng)
        return {"id": f"gen-{i}", "messages": [
            {"role": "user", "content": self.ask(modality, combo, rng)},
            {"role": "assistant", "content": "", "outputs": [self.output(modality, combo)]}]}

    def t2x(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        modality = MODALITIES[i % 3]
        combo = self.random_combo(modality, rng)
        return {"id": f"t2x-{i}", "messages": [{"role": "user", "content": self.ask(modality, combo, rng)},
                                               self.make_turn(modality, combo)]}

    def describe_turns(self, modality: str, rng: np.random.Generator) -> tuple[Combo, list[dict[str, Any]]]:
        combo, path = self.media.pick(modality, rng)
        question = _choice(rng, DESCRIBE[modality])
        content = f"<{modality}>\n{question}" if rng.random() < 0.7 else f"{question} <{modality}>"
        reply = DESCRIBE_REPLY[modality].format(c=self.canon(modality, combo))
        return combo, [{"role": "user", "content": content, "media": [path]}, {"role": "assistant", "content": reply}]

    def x2t(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        _, turns = self.describe_turns(MODALITIES[i % 3], rng)
        return {"id": f"x2t-{i}", "messages": turns}

    def _linked_video(self, image_combo: Combo, rng: np.random.Generator) -> Combo | None:
        colour, shape = image_combo[0], image_combo[1]
        directions = [d for d in self.world.specs["video"].attribute("direction").values
                      if not self.world.is_held_out("video", {"colour": colour, "shape": shape, "direction": d})]
        return (colour, shape, _choice(rng, directions)) if directions else None

    def _linked_image(self, video_combo: Combo, rng: np.random.Generator) -> Combo | None:
        spec = self.world.specs["image"]
        options = [(video_combo[0], video_combo[1], s, p) for s in spec.attribute("size").values
                   for p in spec.attribute("position").values]
        options = [c for c in options if not self.world.is_held_out("image", self.world.attributes_of("image", c))]
        return options[int(rng.integers(len(options)))] if options else None

    def _phrase(self, modality: str, attribute: str, value: str, rng: np.random.Generator) -> str:
        return _choice(rng, self.world.specs[modality].attribute(attribute).phrases[value])

    def x2y(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        if i % 2 == 0:  # image -> video: same colour and shape, a direction from the request
            while True:
                combo, path = self.media.pick("image", rng)
                target = self._linked_video(combo, rng)
                if target is not None:
                    break
            ask = _choice(rng, IMAGE_TO_VIDEO).format(d=self._phrase("video", "direction", target[2], rng))
            src, modality = ("image", path), "video"
        else:  # video -> image: same colour and shape, size and position from the request
            while True:
                combo, path = self.media.pick("video", rng)
                target = self._linked_image(combo, rng)
                if target is not None:
                    break
            ask = _choice(rng, VIDEO_TO_IMAGE).format(
                s=self._phrase("image", "size", target[2], rng), p=self._phrase("image", "position", target[3], rng))
            src, modality = ("video", path), "image"
        return {"id": f"x2y-{i}", "messages": [
            {"role": "user", "content": f"<{src[0]}>\n{ask}", "media": [src[1]]}, self.make_turn(modality, target)]}

    def multi(self, i: int, rng: np.random.Generator) -> dict[str, Any]:
        first, second = [("image", "audio"), ("image", "video"), ("audio", "video"), ("video", "audio")][i % 4]
        a, b = self.random_combo(first, rng), self.random_combo(second, rng)
        ask_b = self.ask(second, b, rng)
        ask = f"{self.ask(first, a, rng)} Also, {ask_b[0].lower()}{ask_b[1:]}"
        reply = (f"{MAKE_REPLY[first].format(c=self.canon(first, a))[:-1]}, and "
                 f"{MAKE_REPLY[second].format(c=self.canon(second, b))[8:]}")  # "Here is the sound..." -> "the sound..."
        return {"id": f"multi-{i}", "messages": [
            {"role": "user", "content": ask},
            {"role": "assistant", "content": reply, "outputs": [self.output(first, a), self.output(second, b)]}]}

    def dialogue(self, i: int, rng: np.random.Generator, plain: list[dict[str, str]]) -> dict[str, Any]:
        kind = i % 4
        if kind == 0:  # make one thing, then another modality
            m1, m2 = (MODALITIES[int(k)] for k in rng.permutation(3)[:2])
            a, b = self.random_combo(m1, rng), self.random_combo(m2, rng)
            ask2 = self.ask(m2, b, rng)
            turns = [{"role": "user", "content": self.ask(m1, a, rng)}, self.make_turn(m1, a),
                     {"role": "user", "content": _choice(rng, SWITCH).format(ask=ask2[0].lower() + ask2[1:])},
                     self.make_turn(m2, b)]
        elif kind == 1:  # describe a picture, then animate it
            while True:
                combo, turns = self.describe_turns("image", rng)
                target = self._linked_video(combo, rng)
                if target is not None:
                    break
            follow = _choice(rng, FOLLOW_VIDEO).format(d=self._phrase("video", "direction", target[2], rng))
            turns += [{"role": "user", "content": follow}, self.make_turn("video", target)]
        elif kind == 2:  # describe a clip, then draw its shape
            while True:
                combo, turns = self.describe_turns("video", rng)
                target = self._linked_image(combo, rng)
                if target is not None:
                    break
            follow = _choice(rng, FOLLOW_IMAGE).format(
                s=self._phrase("image", "size", target[2], rng), p=self._phrase("image", "position", target[3], rng))
            turns += [{"role": "user", "content": follow}, self.make_turn("image", target)]
        else:  # plain chat, then media (or media, then plain chat)
            m = MODALITIES[int(rng.integers(3))]
            combo = self.random_combo(m, rng)
            media = [{"role": "user", "content": self.ask(m, combo, rng)}, self.make_turn(m, combo)]
            if plain:
                qa = plain[int(rng.integers(len(plain)))]
                chat = [{"role": "user", "content": qa["prompt"]}, {"role": "assistant", "content": qa["answer"]}]
                turns = chat + media if rng.random() < 0.5 else media + chat
            else:
                turns = media
        return {"id": f"dialogue-{i}", "messages": turns}


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))


def read_plain_answers(path: Path) -> list[dict[str, str]]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                out.append({"prompt": rec["prompt"], "answer": rec["answer"]})
    return out


def _align_records(writer: _Writer, media: _Media, modality: str) -> list[dict[str, Any]]:
    return [{"id": f"{modality}-{'-'.join(combo)}-{k}", "modality": modality, "media": path,
             "caption": writer.canon(modality, combo)}
            for combo, paths in media.files[modality].items() for k, path in enumerate(paths)]


def _stream(out: Path, name: str, seed: int, n: int, make) -> int:
    """Write ``n`` records ``make(i, rng)`` into ``out/name.jsonl``, each from its own child of the seed."""
    rng_root = np.random.SeedSequence([seed, sum(map(ord, name))])
    records = [make(i, np.random.default_rng(child)) for i, child in enumerate(rng_root.spawn(n))]
    _write_jsonl(out / f"{name}.jsonl", records)
    return len(records)


def write_stage_data(options: StageDataOptions) -> dict[str, int]:
    """Write every file listed in the module docstring; returns the number of records per file (the
    held-out files' names start with ``held-out/``)."""
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    world = World()
    media = _Media(world, out, options.seed, options.renderings)
    writer = _Writer(world, media, options.seed)
    plain = read_plain_answers(options.plain_answers) if options.plain_answers else []
    counts: dict[str, int] = {}

    for modality in MODALITIES:
        records = _align_records(writer, media, modality)
        _write_jsonl(out / f"align-{modality}.jsonl", records)
        counts[f"align-{modality}"] = len(records)

    counts["generate"] = _stream(out, "generate", options.seed, options.generate, writer.generate)
    counts["t2x"] = _stream(out, "t2x", options.seed, options.t2x, writer.t2x)
    counts["x2t"] = _stream(out, "x2t", options.seed, options.x2t, writer.x2t)
    counts["x2y"] = _stream(out, "x2y", options.seed, options.x2y, writer.x2y)
    counts["multi"] = _stream(out, "multi", options.seed, options.multi, writer.multi)
    counts["dialogue"] = _stream(out, "dialogue", options.seed, options.dialogue,
                                 lambda i, rng: writer.dialogue(i, rng, plain))
    if plain:
        _write_jsonl(out / "plain.jsonl", [
            {"id": f"plain-{i}", "messages": [{"role": "user", "content": qa["prompt"]},
                                               {"role": "assistant", "content": qa["answer"]}]}
            for i, qa in enumerate(plain)])
        counts["plain"] = len(plain)
    _check_split(world, out, counts, held_out=False)

    held = out / HELD_OUT
    held_media = _Media(world, held, options.seed, options.held_out_renderings, split="held_out")
    held_writer = _Writer(world, held_media, options.seed, split="held_out")
    held_counts: dict[str, int] = {}
    for modality in MODALITIES:
        records = _align_records(held_writer, held_media, modality)
        _write_jsonl(held / f"align-{modality}.jsonl", records)
        held_counts[f"align-{modality}"] = len(records)
    for name, make in (("generate", held_writer.generate), ("t2x", held_writer.t2x), ("x2t", held_writer.x2t)):
        held_counts[name] = _stream(held, name, options.seed + 1, options.held_out_requests, make)
    _check_split(world, held, held_counts, held_out=True)
    counts |= {f"{HELD_OUT}/{name}": n for name, n in held_counts.items()}
    log.info("stage data in %s: %s", out, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return counts


def _check_split(world: World, out: Path, counts: dict[str, int], held_out: bool) -> None:
    """Refuse to leave data behind that names a combination of the other split (a guard on the generator):
    training data naming a held-out combination, or held-out data naming a training one."""
    for name in counts:
        for line in (out / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            captions = [(rec["modality"], rec["caption"])] if "modality" in rec else [
                (o["modality"], o["caption"]) for m in rec["messages"] for o in m.get("outputs", [])]
            media = [] if "modality" in rec else [p for m in rec["messages"] for p in m.get("media", [])]
            for modality, caption in captions:
                if world.is_held_out(modality, world.parse(modality, caption)) != held_out:
                    split = "a held-out" if not held_out else "a training"
                    raise AssertionError(f"{out / name}: {rec['id']} uses {split} {modality} combination {caption!r}")
            for path in media:  # media are rendered per split, under the split's own folder
                if not (out / path).is_file():
                    raise AssertionError(f"{out / name}: {rec['id']} names {path}, not rendered under {out}")


def end_answer(tokenizer: Any, row: list[int], eos_ids: list[int], stops: list[str]) -> tuple[str, bool]:
    """A generated row's answer text (before its first end-of-turn id or stop string, stripped) and whether
    it ended there (False: it ran to the token limit)."""
    from mmllm.inference.generate import before_end, cut_at_stop

    ids = before_end(row, eos_ids)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    _, cut = cut_at_stop(tokenizer, ids, text, stops)
    return cut.strip(), len(ids) < len(row) or len(cut) < len(text)  # shorter: an end id or stop string found


def distil_plain_chat(model_core: Any, prompts: tuple[str, ...], out: Path, max_new_tokens: int = 128,
                      batch_size: int = 8) -> list[dict[str, str]]:
    """The base core's own greedy answers to ``prompts`` -> ``out`` (JSONL of {prompt, answer}).

    Learning these in the instruct stage keeps what the core says to plain text where it was (the
    LoRA adapter is pulled back towards the base distribution on exactly the inputs it sees).

    An answer ends where ``mmllm infer``'s do: at the core's EOS, the ids its generation config ends on, the
    token the chat template closes a reply with (:func:`~mmllm.inference.generate.core_end_of_turn_ids`), or an
    end-of-turn written as plain text / the config's ``stop_strings``
    (:func:`~mmllm.inference.generate.core_end_of_turn_texts`), cut before it."""
    import torch
    from transformers import StoppingCriteriaList

    from mmllm.inference.generate import RowStopStrings, core_end_of_turn_ids, core_end_of_turn_texts

    tok, model = model_core.tokenizer, model_core.model
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos_ids, stops = core_end_of_turn_ids(model_core), core_end_of_turn_texts(model_core)
    records = []
    for start in progress_bar(range(0, len(prompts), batch_size), desc="distilling plain chat"):
        chunk = prompts[start : start + batch_size]
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in chunk]
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        stopping = StoppingCriteriaList([RowStopStrings(tok, stops, len(chunk))] if stops else [])
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos_ids, pad_token_id=pad,
                                 stopping_criteria=stopping, stop_strings=None)  # stops: checked by RowStopStrings
        for prompt, row in zip(chunk, gen[:, width:].tolist()):
            answer, finished = end_answer(tok, row, eos_ids, stops)
            if not finished:  # cut at the last full sentence rather than teach a truncated reply
                end = max(answer.rfind(". "), answer.rfind(".\n"))
                answer = answer[: end + 1] if end > 0 else answer
            records.append({"prompt": prompt, "answer": answer})
    _write_jsonl(out, records)
    return records
