"""The ``mmllm`` process's exit codes (``mmllm --help``): 2 for what the user gave, found at any time (a config, a
data file changed under a run, an unusable cache folder, a run diverging), one line; 70 and the traceback for an unexpected error
(a fault of mmllm), never 1 (a failed request, a data problem found); 130 and nothing said for a Ctrl-C before the
command runs, while its modules import included; train's result on stdout, kept by -q."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

import mmllm
import mmllm.cli
import mmllm.training.loop
from mmllm.cli import EXIT_INTERNAL_ERROR, entry, main
from mmllm.config import load_assembly
from mmllm.data.index import DataFileChanged
from tests.conftest import REPO, TINY

STAGE = str(REPO / "configs/stages/tiny/encode_align.yaml")


def run_entry(monkeypatch, *argv: str) -> int:
    """``mmllm ARGV`` as the console script runs it, in this process: its exit code."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # else entry ends the test process with os._exit
    monkeypatch.setattr(sys, "argv", ["mmllm", *argv])
    with pytest.raises(SystemExit) as done:
        entry()
    return done.value.code


@pytest.mark.parametrize("quiet", [False, True])
def test_an_unexpected_error_exits_70_with_its_traceback_whatever_q(quiet, monkeypatch, capsys):
    """It exited 1, the code of a failed request or a data problem found: a scheduler could not tell a bad record
    from a fault of mmllm. Its traceback and what to do are shown under -q too."""

    def faulty(args):
        raise RuntimeError("a fault inside mmllm")

    monkeypatch.setattr(mmllm.cli, "cmd_inspect", faulty)
    assert run_entry(monkeypatch, *(["-q"] if quiet else []), "inspect", "--config", str(TINY)) == 70
    assert EXIT_INTERNAL_ERROR == 70  # sysexits.h's EX_SOFTWARE, as `mmllm --help` says
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a fault inside mmllm" in err
    assert "unexpected error (exit code 70)" in err and "Please report a fault" in err


def test_the_cpu_allocator_running_out_is_one_line_exit_2_with_what_needs_less(monkeypatch, capsys):
    """torch's CPU allocator raises a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), not
    torch.OutOfMemoryError: it exited 70 with the traceback, a fault of mmllm, where a GPU's gives exit 2 and
    the advice. Another RuntimeError is still a fault."""
    import torch

    from mmllm.model import AnyToAnyModel

    def assemble(*args, **kwargs):
        torch.empty(2**50, dtype=torch.uint8)  # 1 PiB: torch's own error, refused at once

    monkeypatch.setattr(AnyToAnyModel, "assemble", assemble)
    assert run_entry(monkeypatch, "inspect", "--config", str(TINY)) == 2
    err = capsys.readouterr().err
    assert re.search(r"ERROR mmllm: inspect ran out of memory \(.*DefaultCPUAllocator: can't allocate memory: you "
                     r"tried to allocate \d+ bytes.*\) \(run with -v for the traceback\)", err), err
    assert "Traceback" not in err and "unexpected error" not in err

    def faulty(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator is not this")  # the allocator named, not its out-of-memory error

    monkeypatch.setattr(AnyToAnyModel, "assemble", faulty)
    assert run_entry(monkeypatch, "inspect", "--config", str(TINY)) == 70


def test_a_fault_of_a_library_loading_a_part_exits_70_not_as_the_users_config(monkeypatch, capsys):
    """open_clip failing in any way was "encoders.image.model_name: open_clip could not build ...", exit 2: the
    user told to fix a config that was right; a bug (here an AttributeError) is a fault, with its traceback."""
    import open_clip

    def create_model(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'visual'")

    monkeypatch.setattr(open_clip, "create_model", create_model)
    assert run_entry(monkeypatch, "inspect", "--config", str(TINY)) == 70
    err = capsys.readouterr().err
    assert "AttributeError: 'NoneType' object has no attribute 'visual'" in err and "unexpected error" in err
    assert "could not build" not in err


def test_infer_out_of_the_machines_memory_is_not_told_to_use_the_cpu():
    from argparse import Namespace

    from mmllm.cli import less_memory

    args = Namespace(command="infer", dtype="float32", device="cpu")
    assert less_memory(args, host=True) == "; to load the model in less memory: --dtype bfloat16 (or float16)"
    assert "--device cpu" in less_memory(args, host=False)  # a GPU's memory ran out
    args.dtype = "bfloat16"
    assert less_memory(args, host=True) == "; the model is loaded in bfloat16 already: a machine with more memory"


def test_the_exit_code_table_names_70_and_1_no_longer_covers_crashes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    table = capsys.readouterr().out.split("exit codes:", 1)[1]
    assert re.search(r"^  70 +an unexpected error", table, re.M)
    code_1 = re.search(r"^  1 +(.*?)^  2 ", table, re.M | re.S).group(1)
    assert "unexpected" not in code_1


def test_a_data_file_changed_under_a_run_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    """DataFileChanged (not a ValueError, so no sample is skipped for it) escaped the command: a traceback and
    exit 1, read as mmllm's fault. The user restores the file and resumes: it is a refusal, exit 2."""
    message = (f"data file {tmp_path / 'pairs.jsonl'} changed while the run read samples from it; restore the "
               "file ... then resume the run (--resume)")

    def changed(*args, **kwargs):
        raise DataFileChanged(message)

    monkeypatch.setattr(mmllm.training.loop, "train", changed)
    assert run_entry(monkeypatch, "train", "--config", STAGE, f"output_dir={tmp_path / 'out'}") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "unexpected error" not in err


def test_an_unusable_cache_folder_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    """CacheError (its message says to delete the folder or point cache.dir elsewhere) was a traceback, exit 1."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "index.json").write_text(json.dumps({"format": "something else"}))
    assert run_entry(monkeypatch, "cache", "--config", STAGE, f"cache.dir={cache}") == 2
    err = capsys.readouterr().err
    assert "not an mmllm feature cache index; point `cache.dir` at another folder" in err
    assert "Traceback" not in err


def test_a_stage_asking_for_lora_without_an_adapter_is_a_config_error_not_a_crash(tmp_path, capsys):
    """A setting training checks once the model is built was a ValueError: with the crash code it would have read
    as mmllm's fault. It is the config's, one line, exit 2."""
    argv = ["train", "--config", STAGE, "trainable.lora=true", f"output_dir={tmp_path / 'out'}", "max_steps=1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "trainable.lora is on but no `lora:` file is set" in err and "Traceback" not in err


def test_a_run_that_diverges_is_one_line_exit_2_saying_what_to_change(monkeypatch, tmp_path, capsys):
    """max_nonfinite_steps non-finite steps in a row stop training with what to change (optim.lr, the data,
    mixed precision): a FloatingPointError, which the crash code would have blamed on mmllm."""
    from mmllm.model import AnyToAnyModel

    real_forward = AnyToAnyModel.forward

    def diverging(self, batch, losses=None, normalizers=None):
        out = real_forward(self, batch, losses, normalizers)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(AnyToAnyModel, "forward", diverging)
    argv = ["train", "--config", STAGE, "max_steps=4", "max_nonfinite_steps=2", f"output_dir={tmp_path / 'out'}"]
    assert run_entry(monkeypatch, *argv) == 2
    err = capsys.readouterr().err
    assert "2 steps in a row had a non-finite loss or gradient" in err and "lower optim.lr" in err
    assert "Traceback" not in err and "unexpected error" not in err


def test_ctrl_c_before_the_command_runs_exits_130_saying_nothing(monkeypatch, capsys):
    """A Ctrl-C while the arguments are parsed (outside the command's own handling) printed Python's traceback."""

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(mmllm.cli, "build_parser", interrupted)
    assert run_entry(monkeypatch, "inspect", "--config", str(TINY)) == 130
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


CTRL_C_WHILE_THE_CLI_IMPORTS = """
import importlib, importlib.abc, os, runpy, signal, sys, tomllib

class CtrlC(importlib.abc.MetaPathFinder):  # the user's Ctrl-C, while the command's modules import
    def find_spec(self, name, path=None, target=None):
        if name == "mmllm.config":  # one the command line imports first thing (mmllm.cli's own imports)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
sys.argv = ["mmllm", "--version"]
if {how!r} == "console script":  # what pip's script for [project.scripts] runs
    with open("pyproject.toml", "rb") as fh:
        module, _, function = tomllib.load(fh)["project"]["scripts"]["mmllm"].partition(":")
    sys.exit(getattr(importlib.import_module(module), function)())
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)  # python -m mmllm[.cli]
"""


@pytest.mark.parametrize("how", ["console script", "python -m mmllm", "python -m mmllm.cli"])
def test_ctrl_c_while_the_command_line_imports_exits_130_without_a_traceback(how):
    """`python -m mmllm.cli` (as `accelerate launch -m mmllm.cli` runs each process) ran the module's own imports
    outside the console's Ctrl-C handler: Python's traceback of the import, exit code -2."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", CTRL_C_WHILE_THE_CLI_IMPORTS.format(how=how, module=how.split()[-1])], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "", "")


@pytest.mark.parametrize("module", ["mmllm", "mmllm.cli"])
def test_the_module_entries_run_the_command(module, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, "-m", module, "--version"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"mmllm {mmllm.__version__}\n", "")
    refused = subprocess.run([sys.executable, "-m", module, "inspect", "--config", str(tmp_path / "none.yaml")],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "config file not found" in refused.stderr and "Traceback" not in refused.stderr


def test_train_prints_its_result_on_stdout_kept_by_quiet(tmp_path, capsys):
    """`mmllm train -q` said nothing at all on success: its `done:` line, where the checkpoint is, was an INFO
    log line. It is the command's result, on stdout as other commands' results (refine's, eval's)."""
    out = tmp_path / "out"
    assert main(["-q", "train", "--config", STAGE, "max_steps=2", "save_every=0", f"output_dir={out}"]) == 0
    captured = capsys.readouterr()
    assert re.fullmatch(r"done: 2 steps, loss \d+\.\d{4} -> \d+\.\d{4}, 0 samples skipped; checkpoint (\S+)\n",
                        captured.out), captured.out
    checkpoint = captured.out.rsplit("checkpoint ", 1)[1].strip()
    assert checkpoint == str(out / "step-2") and (out / "step-2").is_dir()
    assert " INFO " not in captured.err and "done:" not in captured.err


@pytest.mark.parametrize("override, message", [
    ("llm.num_heads=3", "llm: hidden_size=64 must be num_heads=3 times an even head width"),
    ("llm.hidden_size=0", "llm: hidden_size must be >= 1, got 0"),
])
def test_a_tiny_llm_of_sizes_transformers_refuses_is_a_config_error_not_a_crash(override, message, monkeypatch, capsys):
    """transformers' own check (hidden size not a multiple of the heads, an odd rotary width) or a division by
    zero escaped as a traceback, exit 70: "a fault of mmllm" for a number the user set."""
    assert run_entry(monkeypatch, "inspect", "--config", str(TINY), override) == 2
    err = capsys.readouterr().err
    assert message in err and override in err and "Traceback" not in err and "unexpected error" not in err


def test_a_tiny_llm_whose_heads_do_not_share_kv_heads_is_refused_before_it_is_built():
    """num_kv_heads not dividing num_heads built a model (inspect said nothing) whose first forward failed."""
    from mmllm.config import ConfigError
    from mmllm.registry import check_part_options

    with pytest.raises(ConfigError, match="num_kv_heads=3 does not divide num_heads=4"):
        check_part_options(load_assembly(TINY, ["llm.num_kv_heads=3"]), str(TINY))


def test_a_config_that_is_not_utf8_is_one_line_exit_2_naming_the_file(tmp_path, monkeypatch, capsys):
    """A YAML file saved as Latin-1 was read as text: a UnicodeDecodeError traceback, exit 70, blaming mmllm."""
    config = tmp_path / "tiny.yaml"
    config.write_bytes(TINY.read_bytes().replace(b"name: tiny", b"name: caf\xe9"))
    assert run_entry(monkeypatch, "inspect", "--config", str(config)) == 2
    err = capsys.readouterr().err
    assert f"{config}: not valid YAML" in err and "re-encode the file" in err and "Traceback" not in err


def test_a_config_saved_as_utf16_is_read(tmp_path):
    """YAML names UTF-16 after a byte order mark (Windows' "Unicode"); read as text it was refused."""
    from mmllm.config import read_yaml

    path = tmp_path / "tiny.yaml"
    path.write_bytes(TINY.read_text(encoding="utf-8").replace("\n", "\r\n").encode("utf-16"))
    assert read_yaml(path) == read_yaml(TINY)


def test_a_chat_template_file_that_is_not_utf8_is_a_config_error(tmp_path):
    """llm.chat_template naming a Latin-1 file raised UnicodeDecodeError while the model loaded: exit 70."""
    from mmllm.config import ConfigError, UserError
    from mmllm.llm import _read_template

    path = tmp_path / "chat.jinja"
    path.write_bytes(b"{% for m in messages %}\xab{{ m['content'] }}\xbb{% endfor %}")
    with pytest.raises(ConfigError, match=f"llm.chat_template: {path} is not UTF-8 text") as raised:
        _read_template(str(path), "llm")
    assert isinstance(raised.value, UserError)
    path.write_text("{{ messages }} é", encoding="utf-8")
    assert _read_template(str(path), "llm") == "{{ messages }} é"
