"""A JSON array data file read in bounded chunks (mmllm.data.formats.scan_records): whatever the chunk size, the
same records, lines, byte spans and errors as reading the file in one piece, and never the whole file at once."""

from __future__ import annotations

import codecs
import io
import json
from pathlib import Path

import pytest

from mmllm.data import formats
from mmllm.data.formats import DataFormatError, scan_records

WHOLE = 1 << 30  # a chunk larger than any file here: the file is read in one piece


def scan(path: Path, chunk: int, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, object, tuple[int, int]]]:
    """scan_records of ``path`` read ``chunk`` bytes at a time, errors as their messages."""
    monkeypatch.setattr(formats, "JSON_ARRAY_CHUNK", chunk)
    with open(path, "rb") as fh:
        return [(line, str(rec) if isinstance(rec, DataFormatError) else rec, span)
                for line, rec, span in scan_records(path, fh)]


def assert_every_chunk_size_reads_the_same(path: Path, monkeypatch: pytest.MonkeyPatch,
                                           sizes: list[int] | None = None) -> list:
    whole = scan(path, WHOLE, monkeypatch)
    for chunk in sizes or range(1, path.stat().st_size + 2):
        assert scan(path, chunk, monkeypatch) == whole, f"read {chunk} bytes at a time"
    return whole


RECORDS = [
    {"id": "quotes", "value": 'he said "]" and "[", then \\"}\\", {"x": [1]} \\'},  # escaped quotes, brackets
    {"id": "é", "value": "ünï 😀 中文 \u2028 ¿?"},  # characters of 2, 3 and 4 bytes
    {"id": "n", "n": 12345678901234567890, "f": -1.5e-10, "t": True, "z": None, "l": [1, [2, {"k": "]"}]]},
    {"id": "esc", "value": "\\u00e9 \\ud83d\\ude00 tab\t", "empty": {}},
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("bom", [False, True])
def test_records_lines_and_spans_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch, newline, bom):
    path = tmp_path / "llava.json"
    parts = [json.dumps(r, ensure_ascii=i % 2 == 1, indent=1 if i == 2 else None) for i, r in enumerate(RECORDS)]
    text = "  [" + newline + ("," + newline).join(parts) + " ," + newline + "]" + newline
    data = (codecs.BOM_UTF8 if bom else b"") + text.replace("\n", newline).encode("utf-8")
    path.write_bytes(data)
    whole = assert_every_chunk_size_reads_the_same(path, monkeypatch)
    assert [rec for _, rec, _ in whole] == RECORDS
    for line, rec, (offset, length) in whole:  # what the index reads again, and the line it names
        assert json.loads(data[offset:offset + length]) == rec
        assert line == data.count(b"\n", 0, offset) + 1


@pytest.mark.parametrize("bom", [False, True])
def test_lines_of_whitespace_before_the_array_count_at_any_chunk_size(tmp_path, monkeypatch, bom):
    """Whitespace before '[' longer than a read was dropped without its lines: every record's line one short."""
    path = tmp_path / "data.json"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + b' \r\n\n\t [\n{"a": 1},\n{"b": oops}]')
    whole = assert_every_chunk_size_reads_the_same(path, monkeypatch)
    assert [line for line, _, _ in whole] == [4, 5] and whole[1][1].startswith(f"{path}:5: not valid JSON")


ERRORS = {
    "unclosed": ('[\r\n{"a": 1},\r\n{"b": "ü"}\r\n', ["4: the JSON array is not closed with ']'"]),
    "cut literal": ('[\n{"a": "ü😀"},\n{"a": tru}\n]', ["3: not valid JSON (Expecting value, column 7)"]),
    "early error": ('[{"a": 1},\n {"caption": oops}, ' + '{"b": "ü"}, ' * 20 + ']',
                    ["2: not valid JSON (Expecting value, column 14)"]),
    "open string": ('[{"a": 1},\n {"b": "never closed}]', ["2: not valid JSON (Unterminated string starting at"]),
    "newline in a string": ('[{"a": 1},\n {"b": "one\ntwo"}]', ["2: not valid JSON (Invalid control character at, column 12)"]),
    "numbers": ('[1.5e3, {"a": 1},\n -0.25E-2, 12, 1E+7, {"b": "ü"}]',  # cut after "1.", "1.5e": the rest was not JSON
                ["1: expected a JSON object, got float", "2: expected a JSON object, got float",
                 "2: expected a JSON object, got int", "2: expected a JSON object, got float"]),
    "not objects": ('[{"a": 1}, 123456789, "s]\\"", [1, 2],\n true, {"b": "ü"}]',
                    ["1: expected a JSON object, got int", "1: expected a JSON object, got str",
                     "1: expected a JSON object, got list", "2: expected a JSON object, got bool"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
@pytest.mark.parametrize("bom", [False, True])
def test_errors_and_their_lines_do_not_depend_on_the_chunk_size(tmp_path, monkeypatch, case, bom):
    text, messages = ERRORS[case]
    path = tmp_path / "data.json"
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8"))
    whole = assert_every_chunk_size_reads_the_same(path, monkeypatch)
    errors = [rec for _, rec, _ in whole if isinstance(rec, str)]
    assert len(errors) == len(messages)
    for error, message in zip(errors, messages):
        assert error.startswith(f"{path}:{message}")


@pytest.mark.parametrize("data, line, byte, column", [
    (b'[\n{"a": "\xc3\xa9"},\n{"a": "caf\xe9"}]', 3, 0xe9, 11),  # a Latin-1 byte after a 2-byte character
    (b'[{"a": "\xe2\x82\xac"}, {"a": "\xe2\x82', 1, 0xe2, 23),  # a character cut by the end of the file
    (b'\xef\xbb\xbf[{"a": "caf\xe9"}]', 1, 0xe9, 12),  # columns on line 1 start after the byte order mark
    (b'\xef\xbb\xbf[{"a": 1},\n{"a": "\xc3\xa9"},\n\xff{"a": 2}]', 3, 0xff, 1),
])
def test_bytes_that_are_not_utf8_are_named_by_line_and_column_and_nothing_is_read(tmp_path, monkeypatch, data, line,
                                                                                   byte, column):
    """With a byte order mark the old reading named the byte 3 bytes early (and so a wrong byte, column or
    line): the decoder's positions count from after the mark."""
    path = tmp_path / "latin.json"
    path.write_bytes(data)
    whole = assert_every_chunk_size_reads_the_same(path, monkeypatch)
    assert len(whole) == 1  # one JSON array: no record read until the file is fixed
    assert whole[0][0] == line
    assert whole[0][1].startswith(f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x} at column {column});")


def test_an_element_nested_too_deeply_is_an_error_at_any_chunk_size(tmp_path, monkeypatch):
    path = tmp_path / "deep.json"
    path.write_text('[{"a": 1},\n' + "[" * 100_000 + "]" * 100_000 + "]\n")
    whole = assert_every_chunk_size_reads_the_same(path, monkeypatch, [1000, 4096, 65536, 150_001])
    assert [line for line, _, _ in whole] == [1, 2] and "nested too deeply" in whole[1][1]


class CountingFile(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.reads: list[int] = []
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        self.reads.append(-1 if size is None else size)
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_the_file_is_read_in_chunks_never_whole(monkeypatch):
    """The whole file was read (and decoded) at once: twice its size held in every process that read it."""
    recs = [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"é {i}"}]} for i in range(500)]
    fh = CountingFile(json.dumps(recs, ensure_ascii=False).encode())
    monkeypatch.setattr(formats, "JSON_ARRAY_CHUNK", 256)
    got = [rec for _, rec, _ in scan_records(Path("mem.json"), fh)]
    assert got == recs
    assert len(fh.reads) > 2 * len(fh.getvalue()) / 256  # checked once for UTF-8, then parsed
    assert max(fh.reads) == 4096 and min(fh.reads) > 0  # the first look at the file's head, then chunks
    assert set(fh.reads[2:]) == {256}


def test_a_file_that_is_not_ascii_is_read_twice_not_three_times(monkeypatch):
    """The UTF-8 check read each chunk holding a non-ASCII byte again to decode it (0.13 s of 1.3 s for 200k
    LLaVA conversations of 79 MB): it is decoded as read, then the file is read once more to be parsed."""
    recs = [{"id": f"r{i}", "value": f"é {i}"} for i in range(500)]
    fh = CountingFile(json.dumps(recs, ensure_ascii=False).encode())
    monkeypatch.setattr(formats, "JSON_ARRAY_CHUNK", 256)
    assert [rec for _, rec, _ in scan_records(Path("mem.json"), fh)] == recs
    assert fh.bytes_read <= 2 * len(fh.getvalue()) + 4096 + 3  # the head looked at; the byte order mark looked for


def test_an_element_larger_than_many_chunks_is_parsed_a_few_times_not_once_per_chunk(monkeypatch):
    big = {"id": "big", "value": "x" * 200_000, "more": list(range(20_000))}
    fh = CountingFile(json.dumps([{"a": 1}, big, {"b": 2}]).encode())
    monkeypatch.setattr(formats, "JSON_ARRAY_CHUNK", 1024)
    calls = []
    decode = json.JSONDecoder.raw_decode
    monkeypatch.setattr(json.JSONDecoder, "raw_decode", lambda self, s, idx=0: calls.append(idx) or decode(self, s, idx))
    got = [rec for _, rec, _ in scan_records(Path("big.json"), fh)]
    assert got == [{"a": 1}, big, {"b": 2}]
    assert len(calls) < 20  # the text read grows by as much again each time, not by a chunk


def test_an_integer_too_long_to_convert_is_an_error_at_any_chunk_size(tmp_path, monkeypatch):
    path = tmp_path / "long.json"
    path.write_text('[{"a": 1},\n{"n": ' + "1" * 5000 + "}, {}]")
    whole = assert_every_chunk_size_reads_the_same(path, monkeypatch, [100, 1000, 4400, 4500, 5100])
    assert [line for line, _, _ in whole] == [1, 2] and "an integer of more than 4300 digits" in whole[1][1]
