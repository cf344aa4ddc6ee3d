"""A GGUF file's header checked against its size before the ``gguf`` package reads it.

``gguf.GGUFReader`` walks a metadata array element by element for as many elements as the file *claims*, keeping
a (possibly empty) slice for each: a 100-byte file whose array claims 2**40 elements took memory until the
machine ran out. :func:`check_gguf_header` walks the same layout with every count bounded by the bytes left in
the file, so such a file is refused, by name, before transformers hands it to that reader.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from mmllm.config import ConfigError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
# GGUF value types: id -> size in bytes of a scalar (8: string, 9: array are sized by what follows them)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset (each has at least these)


class _Header:
    def __init__(self, data: mmap.mmap, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self, what: str) -> ConfigError:
        return ConfigError(f"{self.path}: not a GGUF file mmllm reads ({what} at byte {self.pos}, in a file of "
                           f"{len(self.data)} bytes); the file is damaged or was made to exhaust memory")

    def take(self, size: int, what: str) -> bytes:
        if size < 0 or size > len(self.data) - self.pos:
            raise self.fail(f"{what} of {size} bytes runs past the end")
        chunk = self.data[self.pos:self.pos + size]
        self.pos += size
        return chunk

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, each: int) -> int:
        """A count of items of at least ``each`` bytes, that must fit in the bytes left."""
        n = self.number("Q", what)
        if n * each > len(self.data) - self.pos:
            raise self.fail(f"{what} {n} (x {each} bytes) does not fit in the file")
        return n

    def string(self, what: str) -> None:
        self.take(self.number("Q", f"{what} length"), what)

    def value(self, kind: int, key: str, depth: int = 0) -> None:
        if kind in SCALAR_SIZES:
            self.take(SCALAR_SIZES[kind], f"value of {key}")
        elif kind == STRING:
            self.string(f"string of {key}")
        elif kind == ARRAY and depth < 4:
            item = self.number("I", f"array type of {key}")
            if item in SCALAR_SIZES:
                self.take(self.count(f"array length of {key}", SCALAR_SIZES[item]) * SCALAR_SIZES[item],
                          f"array of {key}")
                return
            for _ in range(self.count(f"array length of {key}", 8 if item == STRING else 12)):
                self.value(item, key, depth + 1)
        else:
            raise self.fail(f"value type {kind} of {key}")


def check_gguf_header(path: Path) -> None:
    """Raise :class:`ConfigError` when ``path``'s GGUF header (magic, counts, metadata) does not fit in the file."""
    path = Path(path)
    if path.stat().st_size < 24:
        raise ConfigError(f"{path}: not a GGUF file mmllm reads ({path.stat().st_size} bytes, shorter than a header)")
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        _check(_Header(data, path))


def _check(head: _Header) -> None:
    if head.take(4, "magic") != MAGIC:
        raise head.fail("no GGUF magic")
    if (version := head.number("I", "version")) not in VERSIONS:
        raise head.fail(f"version {version}")
    head.count("tensor count", MIN_TENSOR_INFO)
    for _ in range(head.count("metadata count", 8 + 4)):
        length = head.number("Q", "key length")
        key = head.take(length, "key").decode("utf-8", "replace")
        head.value(head.number("I", f"type of {key}"), key)
