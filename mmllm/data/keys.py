"""Keys of a data record that its format does not read: a typo ("output" for "outputs", "contnet" for "content",
"medai" for "media") would drop outputs or media from training without a word, so each is counted per file
(:class:`KeyTally`), said once per key in training's log and listed by ``mmllm data check``.

Each format declares the keys it reads (:class:`Keys`), at the record's level and at the levels of the lists of
objects it holds (mmllm-chat's messages and their outputs, the turns of the LLaVA and NExT-GPT layouts). Only
the first read of a data file (at the start of a run) tallies them: records drawn later are not looked at again.
The state kept is per key, never per record (a key, its first line, a count).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_UNKNOWN_KEYS = 100  # distinct unknown keys tallied per file; others are counted together (a bounded state
# however the records' keys vary: a record keyed by its own ids would add a key per record)


def closest(key: str, known: Iterable[str]) -> str | None:
    """The key of ``known`` closest to ``key`` (difflib's), or None when none is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return close[0] if close else None


LEADING_KEYS = ("id", "role", "content")  # listed first, in this order, where a level reads them: what a record is


def in_reading_order(known: Iterable[str]) -> tuple[str, ...]:
    """The keys ``known`` as messages list them: :data:`LEADING_KEYS` first, the others alphabetically (a chat
    message's ``role, content, media, outputs``, as ``mmllm infer``'s warning of a request's message lists them)."""
    known = set(known)
    return tuple(k for k in LEADING_KEYS if k in known) + tuple(sorted(known - set(LEADING_KEYS)))


def did_you_mean(key: str | None) -> str:
    """"; did you mean 'x'?" for a likely key ``key`` (from :func:`closest`), "" for None. (``mmllm infer``'s
    warning of a request's unknown message keys words its guess the same way.)"""
    return f"; did you mean {key!r}?" if key else ""


@dataclass(frozen=True)
class Keys:
    """The keys a format reads at one level of a record. ``children``: a key holding a list of objects -> the
    keys of those objects. ``refused``: keys the format's parser reports as an error of their own (the record is
    malformed, said there), not listed again as unknown. ``what``: how a message names an object of this level."""

    known: frozenset[str]
    children: dict[str, Keys] = field(default_factory=dict)
    refused: frozenset[str] = frozenset()
    what: str = "a record"
    accepted: frozenset[str] = field(init=False, repr=False, compare=False)  # known and refused

    def __post_init__(self) -> None:
        object.__setattr__(self, "accepted", self.known | self.refused)


def keys(known: Iterable[str], children: dict[str, Keys] | None = None, refused: Iterable[str] = (),
         what: str = "a record") -> Keys:
    """A :class:`Keys` from any iterables."""
    return Keys(frozenset(known), dict(children or {}), frozenset(refused), what)


@dataclass
class UnknownKey:
    """One key of a data file that its format does not read: where it is (``place``, e.g.
    ``messages[].contnet``), the line of the first record holding it, how many records hold it."""

    place: str
    first_line: int
    count: int
    did_you_mean: str | None  # the key the format reads that is closest to it
    level: str  # what holds it: "a record", "a message", ...
    level_keys: tuple[str, ...]  # the keys read at that level

    def warning(self, path: Any, fmt: str) -> str:
        """The one warning of this key in training's log."""
        guess = did_you_mean(self.did_you_mean)
        return (f"{path}:{self.first_line}: {self.place} is a key the {fmt} format does not read ({self.level}'s "
                f"keys: {', '.join(self.level_keys)}): it is ignored{guess} ({self.count} record(s) of the file hold "
                "it; said once per key of this file, `mmllm data check` lists them)")

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.place, "first_line": self.first_line, "count": self.count,
                "did_you_mean": self.did_you_mean}


class KeyTally:
    """The keys of one data file's records that its format does not read, tallied as the file is read
    (:meth:`see` each record). A record holding only keys read costs a superset test per object."""

    def __init__(self, schema: Keys | None):
        self.schema = schema
        self.found: dict[str, UnknownKey] = {}
        self.more = 0  # records holding keys past the first MAX_UNKNOWN_KEYS, not tallied one by one
        self.more_line = 0  # the first of them

    def see(self, rec: dict[str, Any], line: int) -> None:
        """Tally the unknown keys of record ``rec`` (at ``line``); each counts once per record."""
        if self.schema is None:
            return
        if _all_known(rec, self.schema):  # most records: no string built, nothing allocated
            return
        places = _unknown(rec, self.schema, "", None)
        if not places:
            return
        past = False
        for place, key, level in places.values():
            if (got := self.found.get(place)) is not None:
                got.count += 1
                continue
            if len(self.found) >= MAX_UNKNOWN_KEYS:
                past = True
                continue
            self.found[place] = UnknownKey(place, line, 1, closest(key, level.known), level.what,
                                           in_reading_order(level.known))

        if past:
            self.more += 1
            self.more_line = self.more_line or line

    def unknown(self) -> list[UnknownKey]:
        return list(self.found.values())

    def more_warning(self, path: Any, fmt: str) -> str | None:
        """The warning of the keys past the first :data:`MAX_UNKNOWN_KEYS`, or None."""
        if not self.more:
            return None
        return (f"{path}:{self.more_line}: {self.more} record(s) hold still other keys the {fmt} format does not read "
                f"(past the first {MAX_UNKNOWN_KEYS} such keys, not listed one by one): they are ignored")


def _all_known(obj: dict[str, Any], level: Keys) -> bool:
    """Whether ``obj`` and the objects its lists hold have only keys their level reads (no string built, nothing
    allocated: what most records cost)."""
    if not level.accepted.issuperset(obj):
        return False
    for name, child in level.children.items():
        items = obj.get(name)
        if type(items) is list:
            accepted, nested = child.accepted, child.children
            for item in items:
                if type(item) is dict and not (accepted.issuperset(item) and (not nested or _all_known(item, child))):
                    return False
    return True


def _unknown(obj: dict[str, Any], level: Keys, prefix: str,
             out: dict[str, tuple[str, str, Keys]] | None) -> dict[str, tuple[str, str, Keys]] | None:
    """The unknown keys of ``obj`` and of the objects its lists hold, by place (``out``, made when the first is
    found: a record with none allocates nothing)."""
    accepted = level.accepted
    if not accepted.issuperset(obj):
        for key in obj:
            if key not in accepted:
                if out is None:
                    out = {}
                place = f"{prefix}{key}"
                out.setdefault(place, (place, str(key), level))
    for name, child in level.children.items():
        items = obj.get(name)
        if isinstance(items, list):
            inner = f"{prefix}{name}[]."
            for item in items:
                if isinstance(item, dict):
                    out = _unknown(item, child, inner, out)
    return out
