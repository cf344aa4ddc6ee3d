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
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "index.html", "<html>")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "<html>"
