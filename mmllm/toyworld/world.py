"""The toy world: attributes, compositional captions, held-out combinations and a seeded sampler.

Three modalities, each a product of attributes:

* image: colour x shape x size x position (32x32 RGB);
* audio: pitch x timbre x rhythm (1.024 s at 16 kHz);
* video: colour x shape x direction (8 frames of 32x32 at 8 fps; the moving shape leaves a fading trail).

Every combination of attribute values has several captions (templates x synonyms); the first
template with the first phrase of every value is the canonical caption. A fixed list of held-out
patterns (partial assignments such as ``{colour: red, shape: triangle}``) removes every matching
combination from all training of every part and stage: :meth:`World.combos` with ``split="train"``
never yields them, and :class:`Sampler` draws training items from that list only.

Everything random comes from ``numpy.random.Generator(PCG64(seed))``: an item is a pure function of
its attributes and its own seed, so a dataset is reproducible from ``(seed, index)`` alone.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mmllm.toyworld import render

Split = Literal["train", "held_out", "all"]
MODALITIES: tuple[str, ...] = ("image", "audio", "video")


@dataclass(frozen=True)
class Attribute:
    """One attribute: its values (in class-index order) and, per value, the phrases captions use."""

    name: str
    phrases: dict[str, tuple[str, ...]]  # value -> phrases; the first is canonical

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self.phrases)

    def index(self, value: str) -> int:
        return self.values.index(value)


@dataclass(frozen=True)
class ModalitySpec:
    modality: str
    attributes: tuple[Attribute, ...]
    templates: tuple[str, ...]  # str.format templates over the attribute names; the first is canonical
    held_out: tuple[dict[str, str], ...]  # partial assignments; a combo matching any is held out

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def attribute(self, name: str) -> Attribute:
        return next(a for a in self.attributes if a.name == name)


COLOURS = Attribute(
    "colour",
    {
        "red": ("red",),
        "orange": ("orange",),
        "yellow": ("yellow",),
        "green": ("green",),
        "blue": ("blue",),
        "purple": ("purple",),
    },
)
SHAPES = Attribute(
    "shape",
    {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",), "cross": ("cross", "plus sign")},
)

IMAGE = ModalitySpec(
    "image",
    (
        COLOURS,
        SHAPES,
        Attribute("size", {"small": ("small", "little"), "large": ("large", "big")}),
        Attribute(
            "position",
            {
                "top-left": ("top left corner", "upper left corner"),
                "top-right": ("top right corner", "upper right corner"),
                "bottom-left": ("bottom left corner", "lower left corner"),
                "bottom-right": ("bottom right corner", "lower right corner"),
                "centre": ("middle", "centre"),
            },
        ),
    ),
    (
        "a {size} {colour} {shape} in the {position}",
        "there is a {size} {colour} {shape} in the {position} of the picture",
        "a picture of a {size} {colour} {shape} in the {position}",
        "in the {position} you can see a {size} {colour} {shape}",
        "a {colour} {shape}, {size}, placed in the {position}",
    ),
    (
        {"colour": "red", "shape": "triangle"},
        {"colour": "green", "shape": "circle"},
        {"colour": "blue", "shape": "cross"},
        {"colour": "yellow", "shape": "square"},
    ),
)

AUDIO = ModalitySpec(
    "audio",
    (
        Attribute("pitch", {"low": ("low", "deep"), "medium": ("medium", "middle"), "high": ("high", "shrill")}),
        Attribute("timbre", {"pure": ("pure", "soft"), "buzzy": ("buzzy", "harsh"), "bright": ("bright", "brassy")}),
        Attribute(
            "rhythm",
            {
                "steady": ("held steadily", "sounding continuously"),
                "double": ("beeping twice", "in two beeps"),
                "fast": ("beeping four times", "in four quick beeps"),
            },
        ),
    ),
    (
        "a {pitch} {timbre} tone {rhythm}",
        "the sound of a {pitch} {timbre} note {rhythm}",
        "you can hear a {timbre} sound at a {pitch} pitch, {rhythm}",
        "a {timbre} {pitch} beep {rhythm}",
    ),
    (
        {"pitch": "low", "timbre": "buzzy", "rhythm": "fast"},
        {"pitch": "medium", "timbre": "bright", "rhythm": "steady"},
        {"pitch": "high", "timbre": "pure", "rhythm": "double"},
    ),
)

VIDEO = ModalitySpec(
    "video",
    (
        COLOURS,
        SHAPES,
        Attribute(
            "direction",
            {
                "left": ("to the left", "leftwards"),
                "right": ("to the right", "rightwards"),
                "up": ("up", "upwards"),
                "down": ("down", "downwards"),
            },
        ),
    ),
    (
        "a {colour} {shape} moving {direction}",
        "a {colour} {shape} slides {direction}",
        "a video of a {colour} {shape} travelling {direction}",
        "the {shape} is {colour} and moves {direction}",
    ),
    (
        {"colour": "red", "direction": "up"},
        {"colour": "blue", "direction": "left"},
        {"colour": "green", "direction": "right"},
        {"colour": "yellow", "direction": "down"},
    ),
)

SPECS: dict[str, ModalitySpec] = {"image": IMAGE, "audio": AUDIO, "video": VIDEO}

Combo = tuple[str, ...]  # one value per attribute, in ModalitySpec.attributes order


@dataclass
class Item:
    """One world sample: its attributes, a caption, and the seed its media are rendered from."""

    modality: str
    attributes: dict[str, str]
    caption: str
    seed: int
    media: Any = field(default=None, repr=False)  # PIL image, Audio or Video once rendered

    @property
    def combo(self) -> Combo:
        return tuple(self.attributes[n] for n in SPECS[self.modality].names)


class World:
    """Attribute lists, captions and renderers of the toy world (stateless apart from the specs)."""

    def __init__(self, specs: dict[str, ModalitySpec] | None = None) -> None:
        self.specs = dict(specs or SPECS)

    # -- combinations ---------------------------------------------------------------------------

    def is_held_out(self, modality: str, attributes: dict[str, str]) -> bool:
        return any(
            all(attributes[k] == v for k, v in pattern.items()) for pattern in self.specs[modality].held_out
        )

    def combos(self, modality: str, split: Split = "all") -> list[Combo]:
        spec = self.specs[modality]
        out = []
        for combo in itertools.product(*(a.values for a in spec.attributes)):
            held = self.is_held_out(modality, dict(zip(spec.names, combo)))
            if split == "all" or (split == "held_out") == held:
                out.append(combo)
        return out

    def attributes_of(self, modality: str, combo: Combo) -> dict[str, str]:
        return dict(zip(self.specs[modality].names, combo))

    # -- captions -------------------------------------------------------------------------------

    def caption(
        self, modality: str, attributes: dict[str, str], rng: np.random.Generator | None = None
    ) -> str:
        """The canonical caption (``rng`` None), or a random paraphrase: template and synonyms drawn."""
        spec = self.specs[modality]
        template = spec.templates[0] if rng is None else spec.templates[rng.integers(len(spec.templates))]
        words = {}
        for attr in spec.attributes:
            phrases = attr.phrases[attributes[attr.name]]
            words[attr.name] = phrases[0] if rng is None else phrases[rng.integers(len(phrases))]
        return _articles(template.format(**words))

    def all_captions(self, modality: str, attributes: dict[str, str]) -> list[str]:
        """Every phrasing of one combination (templates x synonyms), canonical first."""
        spec = self.specs[modality]
        choices = [attr.phrases[attributes[attr.name]] for attr in spec.attributes]
        out = []
        for template in spec.templates:
            for words in itertools.product(*choices):
                text = _articles(template.format(**dict(zip(spec.names, words))))
                if text not in out:
                    out.append(text)
        return out

    def mentions(self, modality: str, text: str) -> dict[str, set[str]]:
        """Per attribute of ``modality``, every value whose phrases occur in ``text`` as whole words."""
        lowered = text.lower()
        return {
            attr.name: {
                value
                for value, phrases in attr.phrases.items()
                for phrase in phrases
                if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", lowered)
            }
            for attr in self.specs[modality].attributes
        }

    def parse(self, modality: str, caption: str) -> dict[str, str]:
        """Read the attributes back from any caption of the world (exactly one value per attribute)."""
        out = {}
        for name, found in self.mentions(modality, caption).items():
            if len(found) != 1:
                raise ValueError(f"{modality} caption {caption!r}: {name} is {sorted(found) or 'missing'}")
            out[name] = found.pop()
        return out

    # -- media ----------------------------------------------------------------------------------

    def render(self, modality: str, attributes: dict[str, str], seed: int) -> Any:
        rng = np.random.default_rng(seed)
        if modality == "image":
            return render.image(attributes, rng)
        if modality == "audio":
            return render.sound(attributes, rng)
        if modality == "video":
            return render.video(attributes, rng)
        raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(self.specs)}")

    def item(
        self,
        modality: str,
        combo: Combo,
        seed: int,
        paraphrase: bool = True,
        media: bool = True,
        caption_seed: int | None = None,
    ) -> Item:
        """One item of ``combo``: media rendered from ``seed``, caption drawn from ``caption_seed``
        (default: ``seed`` too)."""
        attributes = self.attributes_of(modality, combo)
        rng = np.random.default_rng([seed if caption_seed is None else caption_seed, 1])
        caption = self.caption(modality, attributes, rng if paraphrase else None)
        item = Item(modality, attributes, caption, seed)
        if media:
            item.media = self.render(modality, attributes, seed)
        return item


class Sampler:
    """Seeded batches of items of one modality and split.

    Batch ``b`` is a pure function of ``(seed, b)``, so a resumed run draws the same data. With
    ``unique=True`` a batch holds distinct combinations (contrastive losses need no duplicate
    captions among the negatives); its size must then not exceed the number of combinations.
    With ``variants=K`` every combination has K renderings (media seeds), so a recipe may cache
    costly per-item features by ``(combo, seed)``; None draws a fresh rendering every time.
    """

    def __init__(
        self, world: World, modality: str, split: Split = "train", seed: int = 0, variants: int | None = None
    ) -> None:
        self.world, self.modality, self.split, self.seed = world, modality, split, seed
        self.combos = world.combos(modality, split)
        self.variants = variants
        if not self.combos:
            raise ValueError(f"no {split} combinations for {modality}")

    def batch(
        self, index: int, size: int, unique: bool = False, paraphrase: bool = True, media: bool = True
    ) -> list[Item]:
        rng = np.random.default_rng([self.seed, index])
        if unique:
            if size > len(self.combos):
                raise ValueError(f"unique batch of {size} > {len(self.combos)} {self.split} combinations")
            picks = rng.permutation(len(self.combos))[:size]
        else:
            picks = rng.integers(len(self.combos), size=size)
        if self.variants is None:
            seeds = rng.integers(2**62, size=size)
        else:
            seeds = [
                int(np.random.default_rng([self.seed, int(p), int(v), 3]).integers(2**62))
                for p, v in zip(picks, rng.integers(self.variants, size=size))
            ]
        caption_seeds = rng.integers(2**62, size=size)
        return [
            self.world.item(self.modality, self.combos[i], int(s), paraphrase, media, caption_seed=int(c))
            for i, s, c in zip(picks, seeds, caption_seeds)
        ]


def _articles(text: str) -> str:
    """``a orange`` -> ``an orange``."""
    return re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)


def evaluation_items(world: World, modality: str, split: Split, per_combo: int, seed: int) -> list[Item]:
    """A fixed evaluation set: ``per_combo`` items of every combination of ``split``, canonical captions."""
    return [_evaluation_item(world, modality, c, combo, k, seed)
            for c, combo in enumerate(world.combos(modality, split)) for k in range(per_combo)]


def spread_evenly(count: int, n: int) -> list[int]:
    """``n`` indices of ``range(count)`` (``n <= count``) spaced evenly from the first to the last."""
    return [] if n <= 0 else np.linspace(0, count - 1, n).round().astype(int).tolist()


def balanced_items(world: World, modality: str, split: Split, n: int, seed: int) -> list[Item]:
    """Exactly ``n`` evaluation items of ``split``, as balanced over its combinations as ``n`` allows: every
    combination ``n // C`` times (``C`` combinations), and the other ``n % C`` renderings on combinations
    spread evenly over the list, so that every attribute value is represented (the combinations are listed
    attribute by attribute: a prefix of the list would hold only the first colours). Ordered round by round,
    so that a prefix covers as many combinations as it can. The renderings are those of
    :func:`evaluation_items` with the same ``seed``."""
    combos = world.combos(modality, split)
    if n < 0 or not combos:
        raise ValueError(f"{n} {modality} items of split {split!r}: it has {len(combos)} combinations")
    rounds, rest = divmod(n, len(combos))
    picks = [(c, k) for k in range(rounds) for c in range(len(combos))]
    picks += [(c, rounds) for c in spread_evenly(len(combos), rest)]
    return [_evaluation_item(world, modality, c, combos[c], k, seed) for c, k in picks]


def _evaluation_item(world: World, modality: str, c: int, combo: Combo, k: int, seed: int) -> Item:
    """The ``k``-th rendering of the ``c``-th combination of an evaluation set seeded ``seed``."""
    item_seed = int(np.random.default_rng([seed, c, k, 7]).integers(2**62))
    return world.item(modality, combo, item_seed, paraphrase=False)
