"""mmllm.atomic: a failed write leaves the previous file and no temporary; a good one is readable by others."""

import os
import stat

import pytest

from mmllm.atomic import atomic_write, atomic_write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = atomic_write_text(tmp_path / "out" / "results.json", "old")

    def torn(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, torn)
    assert target.read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["results.json"]


def test_a_written_file_has_the_permissions_a_plain_open_gives(tmp_path):
    path = atomic_write_text(tmp_path / "index.html", "<html>")
    plain = tmp_path / "plain.html"
    plain.write_text("<html>")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    assert path.read_text() == "<html>"


def test_the_umask_at_the_time_of_the_write_is_the_one_that_counts(tmp_path):
    """The umask was read once, at import, by setting it process-wide for a moment (a file another thread
    created then got that mode); a umask set later was ignored."""
    before = os.umask(0o077)
    try:
        path = atomic_write_text(tmp_path / "private.json", "{}")
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(before)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o600


def test_a_target_that_is_not_a_regular_file_is_written_directly(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        atomic_write_text(fifo, "report")
        assert os.read(reader, 100) == b"report"
    finally:
        os.close(reader)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
