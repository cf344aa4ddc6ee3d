"""Paths a user types with ``~`` lead to their home folder wherever they are typed: the shell expands ``~`` only
at the start of a word (not in ``--output=~/x``, ``key=~/x``, a quoted argument, YAML, JSONL or Python)."""

import json
import shutil
from pathlib import Path

import pytest

from mmllm.cli import main
from mmllm.config import load_stage
from mmllm.inference.runner import parse_request
from mmllm.locations import resolve_source
from mmllm.model import AnyToAnyModel
from tests.conftest import REPO, TINY


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # what a path left unexpanded would make: a folder named "~" here
    return home


def test_command_line_paths(home, tmp_path):
    shutil.copy(TINY, home / "tiny.yaml")
    assert main(["inspect", "--config=~/tiny.yaml", "--json=~/reports/inspect.json"]) == 0
    assert "stages" in json.loads((home / "reports" / "inspect.json").read_text())
    assert not (tmp_path / "~").exists()


def test_a_checkpoint_saved_and_loaded_from_python(home, tmp_path, tiny_assembly):
    AnyToAnyModel.assemble(tiny_assembly).save_pretrained("~/ckpt")
    assert (home / "ckpt" / "mmllm.json").is_file() and not (tmp_path / "~").exists()
    assert AnyToAnyModel.from_pretrained("~/ckpt", decoder_parts="config").config.name == tiny_assembly.name


def test_stage_config_paths_and_their_overrides(home):
    shutil.copy(REPO / "configs/stages/tiny/decode_align.yaml", home / "stage.yaml")
    shutil.copy(REPO / "configs/assemblies/tiny.yaml", home / "tiny.yaml")
    cfg = load_stage("~/stage.yaml", ["assembly=~/tiny.yaml", "output_dir=~/runs/da", "init_from=~/runs/ea/step-2",
                                      "cache.dir=~/cache"])
    assert (cfg.assembly, cfg.output_dir, cfg.init_from, cfg.cache.dir) == (
        str(home / "tiny.yaml"), str(home / "runs/da"), str(home / "runs/ea/step-2"), str(home / "cache"))


def test_media_paths_of_requests_and_parts_named_by_path(home, tmp_path):
    parsed = parse_request({"id": "r", "prompt": "what?", "image": "~/pics/a.png"}, tmp_path, 0, load=False)
    assert parsed.inputs == [str(home / "pics" / "a.png")]
    assert resolve_source("~/models/sd") == str(home / "models" / "sd")  # a decoder's or encoder's model:
    assert resolve_source("org/name") == "org/name"


def test_a_request_media_path_written_from_the_working_directory_says_where_paths_resolve(tmp_path, monkeypatch):
    """A requests file kept in its own folder, its paths written from where the command runs: the error said
    only 'image file not found: reqs/mydata/a.png'."""
    from PIL import Image

    from mmllm.data.media import MediaError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "mydata" / "a.png")
    reqs = tmp_path / "reqs"
    reqs.mkdir()
    with pytest.raises(MediaError, match=r"image file not found: .*reqs/mydata/a\.png \(media paths are relative to "
                                         r"the requests file's folder .*reqs; mydata/a\.png is a file from the "
                                         r"working directory .*: write it relative to the requests file, or absolute\)"):
        parse_request({"id": "r", "prompt": "what?", "image": "mydata/a.png"}, reqs, 0)
    parsed = parse_request({"id": "r", "prompt": "what?", "image": "../mydata/a.png"}, reqs, 0)  # as it should be
    assert parsed.inputs == [str(reqs / "../mydata/a.png")]
    with pytest.raises(MediaError, match=r"image file not found: .*reqs/elsewhere\.png$"):  # not here either: as before
        parse_request({"id": "r", "prompt": "what?", "image": "elsewhere.png"}, reqs, 0)


def test_an_export_into_a_link_to_a_folder_on_another_disk_writes_there_and_keeps_the_link(tiny_model, tmp_path):
    """An export replaces its --output whole (written beside it, renamed into place): an --output that is the user's
    link to a folder on another disk had the link itself renamed away and a folder put in its place, on this disk,
    the other disk's folder left empty."""
    import os

    from mmllm.config import ConfigError
    from mmllm.training.checkpoint import export_weights_only, verify_manifest

    checkpoint = tiny_model.save_pretrained(tmp_path / "checkpoint")
    other_disk = tmp_path / "other-disk" / "exports"
    other_disk.mkdir(parents=True)
    link = tmp_path / "exports"
    os.symlink(other_disk, link)
    for dtype in ("float16", "float32"):  # a new export, then one replacing it (an earlier export there)
        export_weights_only(checkpoint, link, dtype=dtype)
        assert link.is_symlink() and os.readlink(link) == str(other_disk)
        verify_manifest(other_disk)
        assert json.loads((other_disk / "mmllm.json").read_text())["exported_from"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".exports")]  # no leftover link or lock
    unmounted = tmp_path / "unmounted"
    os.symlink(tmp_path / "no-disk" / "exports", unmounted)  # a link to a disk not mounted: refused, kept
    with pytest.raises(ConfigError, match=r"unmounted is a link to .*no-disk/exports, which is no folder here"):
        export_weights_only(checkpoint, unmounted)
    assert unmounted.is_symlink() and not (tmp_path / "no-disk").exists()


def test_refine_into_a_link_to_a_folder_on_another_disk_writes_there_and_keeps_the_link(tiny_model, sample_data,
                                                                                     tmp_path, monkeypatch):
    """`mmllm refine` saves its checkpoint beside --output and renames it into place, as an export does: a link
    there (the user's folder on another disk) was renamed away and the checkpoint left on this disk. The checkpoint
    it was refined from is recorded absolute (it was recorded as given: relative to the folder refine ran in)."""
    import os

    from mmllm.training.checkpoint import verify_manifest

    checkpoint = tiny_model.save_pretrained(tmp_path / "checkpoint")
    other_disk = tmp_path / "other-disk" / "refined"
    other_disk.mkdir(parents=True)
    link = tmp_path / "refined"
    os.symlink(other_disk, link)
    monkeypatch.chdir(tmp_path)
    assert main(["refine", "--checkpoint", "checkpoint", "--data", str(sample_data["chat"]), "--steps", "2",
                 "--batch-size", "4", "--output", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(other_disk)
    verify_manifest(other_disk)
    assert json.loads((other_disk / "mmllm.json").read_text())["refined_from"] == str(checkpoint)
