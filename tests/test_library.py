"""mmllm used as a Python library (a notebook or a script of one's own), not through the CLI: what a call
leaves behind in the caller's process, and docs/python.md's examples, run as written."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from mmllm.inference.generate import Request

REPO = Path(__file__).resolve().parent.parent


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_generate_leaves_a_training_model_in_the_modes_it_had(tiny_model):
    """A look at the answers in the middle of one's own training loop must not end the loop's training mode
    (dropout in the projections and LoRA), nor switch on the frozen parts' training mode."""
    tiny_model.train()
    tiny_model.encoders.eval()  # as a training loop has it: frozen parts in eval mode, the glue training
    before = _modes(tiny_model)
    assert tiny_model.input_projections.training and not tiny_model.encoders.image.training

    results = tiny_model.generate([Request(messages=[{"role": "user", "content": "Generate an image: a red circle"}])],
                                  max_new_tokens=4, decode_media=False)

    assert len(results) == 1 and isinstance(results[0].text, str)
    assert _modes(tiny_model) == before


def test_run_requests_leaves_a_training_model_in_the_modes_it_had(tiny_model, tmp_path):
    from mmllm import run_requests

    tiny_model.train()
    before = _modes(tiny_model)
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "r1", "prompt": "Generate an image: a red circle", "max_new_tokens": 3}\n')
    counts = run_requests(tiny_model, requests, tmp_path / "out")
    assert counts["done"] == 1 and counts["failed"] == 0
    assert _modes(tiny_model) == before


def test_generate_runs_a_training_model_in_eval_mode(tiny_model, sample_data):
    """Inside the call every part runs in eval mode (no dropout), whatever mode the model was in."""
    seen: list[tuple[str, bool]] = []
    parts = {"encoder": tiny_model.encoders["image"], "input projection": tiny_model.input_projections["image"],
             "llm": tiny_model.llm.model}
    for name, part in parts.items():
        part.register_forward_hook(lambda module, args, out, name=name: seen.append((name, module.training)))
    image = next((sample_data["pairs"].parent / "media").glob("*.png"))
    tiny_model.train()
    tiny_model.generate([Request(messages=[{"role": "user", "content": "<image>\nWhat is this?"}],
                                 media=[("image", image)])], max_new_tokens=2, decode_media=False)
    assert {name for name, _ in seen} == set(parts)
    assert not any(training for _, training in seen), seen


def test_building_a_model_leaves_the_root_logger_unconfigured(tiny_assembly, monkeypatch):
    """open_clip logs through the root logger's module functions (``logging.info``), which configure the root
    logger when it has no handler: a script's own ``logging.basicConfig(level=logging.INFO)`` after building
    a model then did nothing (the root had a handler, at WARNING)."""
    from mmllm.model import AnyToAnyModel

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a fresh script's (pytest's own capture handlers aside)
    monkeypatch.setattr(root, "level", logging.WARNING)
    AnyToAnyModel.assemble(tiny_assembly)
    AnyToAnyModel.assemble(tiny_assembly, encoder_weights=[])  # the encoders as shapes: the meta-device path
    assert root.handlers == []


def _docs_page_code(page: str) -> str:
    """The ```python blocks of the docs page ``page``, in order, as one script (they build on each other, as a
    notebook's cells do)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / page).read_text(), re.S)
    assert blocks, f"docs/{page} holds no Python code"
    return "\n".join(blocks)


def test_the_python_docs_page_runs_as_written(tmp_path):
    """docs/python.md's library examples, run as a script from a folder that has the repository's configs/ and
    data/ (as the repository root does), in a fresh process: what they print is what they claim."""
    script = tmp_path / "docs_example.py"
    script.write_text(_docs_page_code("python.md"))
    for name in ("configs", "data"):
        (tmp_path / name).symlink_to(REPO / name)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout
    assert "encoders.image (open-clip) -> (16, 32)" in out  # the tiny assembly's checks
    assert "encoders.image (__main__:MeanColour) -> (1, 8)" in out  # the part of one's own, trained and reloaded
    assert out.count("runs/mine/encode_align/step-5") == 1 and (tmp_path / "runs/ours/encode_align/step-5").is_dir()
    assert "MeanColour" in out.splitlines()[-1]


def test_the_package_exports_its_public_names_without_importing_torch_first():
    import mmllm

    assert set(mmllm.__all__) == {"__version__", *mmllm._EXPORTS}
    for name in mmllm._EXPORTS:
        assert getattr(mmllm, name).__name__ == name
    fresh = subprocess.run([sys.executable, "-c", "import sys, mmllm; print('torch' in sys.modules)"],
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == "False"  # `mmllm --help` and the CLI's start stay light


def test_save_assembly_writes_what_load_assembly_reads_back_equal(tiny_assembly, tmp_path):
    import copy

    from mmllm import ComponentSpec, load_assembly, save_assembly

    changed = copy.deepcopy(tiny_assembly)
    changed.encoders["image"] = ComponentSpec("tests.custom_parts:PixelEncoder", {"size": 2, "dim": 4})
    changed.input_projections["image"].kind = "linear"
    assert load_assembly(save_assembly(changed, tmp_path / "a" / "assembly.yaml")) == changed


def test_a_second_train_into_the_same_folder_says_how_to_resume_in_python(tmp_path):
    """Running a notebook cell again: the refusal names the Python call that continues, not only the flag."""
    import pytest

    from mmllm import ConfigError, load_stage, train

    stage = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                       [f"output_dir={tmp_path / 'run'}", "max_steps=1", "report_to=none"])
    train(stage)
    with pytest.raises(ConfigError, match=r"pass --resume \(in Python: train\(cfg, resume=True\)\)"):
        train(stage)
    assert train(stage, resume=True).steps == 1  # as the message says: the run is already at max_steps


def test_a_kind_of_a_scripts_own_class_missing_in_this_process_says_where_it_must_be():
    import pytest

    from mmllm import ConfigError
    from mmllm.registry import resolve

    with pytest.raises(ConfigError, match=r"__main__ has no class NotDefinedHere .*defines \(or imports\) "
                                          r"NotDefinedHere in its own __main__"):
        resolve("encoder", "__main__:NotDefinedHere", "encoders.image")


def test_the_command_line_adds_its_log_filter_once_however_often_it_runs():
    """``mmllm.cli.main`` called again in one process (tests, a notebook) added one more filter each time."""
    from mmllm.cli import main
    from mmllm.log_filters import DIFFUSERS_PIPELINES, DiffusersNoise

    logger = logging.getLogger(DIFFUSERS_PIPELINES)
    for _ in range(3):
        assert main(["train", "--config", "no-such-stage.yaml"]) == 2  # refused after logging is set up
    assert sum(isinstance(f, DiffusersNoise) for f in logger.filters) == 1


@contextlib.contextmanager
def diffusers_pipeline_messages(keep_cli_filter: bool):
    """What diffusers' pipeline logger lets through to its handlers inside the block (its own handler writes to
    the stderr it found at import, which capsys does not see); without the command line's filter when asked, as
    in a script that never ran the command line."""
    from mmllm.log_filters import DIFFUSERS_PIPELINES, DiffusersNoise

    logger = logging.getLogger(DIFFUSERS_PIPELINES)
    cli_filters = [] if keep_cli_filter else [f for f in logger.filters if isinstance(f, DiffusersNoise)]
    for f in cli_filters:
        logger.removeFilter(f)
    shown: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger.addHandler(handler)
    try:
        yield shown
    finally:
        logger.removeHandler(handler)
        for f in cli_filters:
            logger.addFilter(f)


def test_the_deprecation_notices_of_the_pipelines_mmllm_builds_are_not_shown_in_library_use(tiny_assembly):
    """diffusers warns each time an AudioLDM (or text-to-video) pipeline is built: built for every model, it
    repeated in a script's output. Shown once a process, it still said what no user could act on: the
    pipeline class is the decoder kind's choice. Now it is not shown."""
    from mmllm.log_filters import DIFFUSERS_PIPELINES, DiffusersNoise
    from mmllm.model import AnyToAnyModel

    logger = logging.getLogger(DIFFUSERS_PIPELINES)
    before = list(logger.filters)
    with diffusers_pipeline_messages(keep_cli_filter=False) as shown:
        for _ in range(2):
            model = AnyToAnyModel.assemble(tiny_assembly)
            assert model.decoders["audio"].pipeline is not None and model.decoders["video"].pipeline is not None
    assert not [m for m in shown if "has been deprecated" in m], shown
    def ours(filters):
        return [f for f in filters if isinstance(f, DiffusersNoise)]

    assert ours(logger.filters) == ours(before)  # the library's filter is gone after


def test_mmllm_quiet_shows_no_deprecation_notice_of_its_own_pipelines(capsys):
    """``mmllm -q`` printed "The TextToVideoSDPipeline has been deprecated ..." and the AudioLDM one at the first
    model a process built: warnings, but none a user can act on."""
    from mmllm.cli import main

    with diffusers_pipeline_messages(keep_cli_filter=True) as shown:
        assert main(["-q", "inspect", "--config", str(REPO / "configs/assemblies/default.yaml")]) == 0
    capsys.readouterr()
    built = [m for m in shown if "Expected types" in m or "deprecated" in m]
    assert not built, built


def test_other_pipelines_deprecation_notices_are_shown_once_and_mmllm_s_list_is_its_decoders():
    from mmllm.decoders._diffusion import PIPELINE_KINDS
    from mmllm.log_filters import MMLLM_PIPELINES, DiffusersNoise

    assert MMLLM_PIPELINES == set(PIPELINE_KINDS)

    def shown(noise, class_name):
        message = f"The {class_name} has been deprecated and will not receive bug fixes or feature updates after " \
                  "Diffusers version 0.33.1. "
        return noise.filter(logging.LogRecord("diffusers", logging.WARNING, __file__, 1, message, None, None))

    noise = DiffusersNoise()
    assert [shown(noise, "AudioLDMPipeline"), shown(noise, "TextToVideoSDPipeline")] == [False, False]
    assert [shown(noise, "PaintByExamplePipeline"), shown(noise, "PaintByExamplePipeline")] == [True, False]


def test_a_request_written_wrong_is_refused_saying_how_to_write_it():
    """A bare string for ``messages`` failed deep in the chat template ("should be dicts ... got 'D'"), and a
    media path without its modality with "too many values to unpack"."""
    import pytest

    with pytest.raises(ValueError, match=r"messages=\[\{'role': 'user', 'content': TEXT\}\]"):
        Request(messages="Draw a red circle.")
    with pytest.raises(ValueError, match=r"messages\[0\]: a dict with 'role'"):
        Request(messages=[{"role": "human", "content": "hi"}])
    with pytest.raises(ValueError, match=r"media\[0\]: a \(modality, item\) pair.*\('image', 'cat.png'\)"):
        Request(messages=[{"role": "user", "content": "<image>\nWhat is it?"}], media=["cat.png"])
    ok = Request(messages=[{"role": "user", "content": "<image>\nWhat is it?"}], media=[("image", "cat.png")])
    assert ok.media == [("image", "cat.png")]


def test_model_generate_shows_the_parameters_of_the_function_it_calls():
    """``help(model.generate)`` in a notebook showed ``(*args, **kwargs)``; its signature now is the function's,
    and stays so."""
    import inspect

    from mmllm.inference import generate as module
    from mmllm.model import AnyToAnyModel

    method = inspect.signature(AnyToAnyModel.generate).parameters
    function = inspect.signature(module.generate).parameters
    assert list(method)[1:] == list(function)[1:]  # past self / model
    assert all(method[n].default == function[n].default and method[n].kind == function[n].kind
               for n in list(function)[1:])


def test_paths_given_as_path_objects_in_python_are_taken_as_the_strings_yaml_gives(tiny_assembly, tmp_path):
    """Options built in Python hold ``Path`` objects: a part's string option refused one ("expected a string,
    got PosixPath(...)"), and an assembly holding one could not be written as YAML."""
    import copy

    from mmllm import ComponentSpec, load_assembly, save_assembly
    from mmllm.config import from_dict
    from mmllm.encoders.open_clip import OpenClipImageEncoder

    options = {**tiny_assembly.encoders["image"].options, "model_name": tmp_path / "tiny-vit"}
    assert from_dict(OpenClipImageEncoder.Options, options).model_name == str(tmp_path / "tiny-vit")
    changed = copy.deepcopy(tiny_assembly)
    changed.encoders["image"] = ComponentSpec("open-clip", options)
    again = load_assembly(save_assembly(changed, tmp_path / "assembly.yaml"))
    assert again.encoders["image"].options["model_name"] == str(tmp_path / "tiny-vit")


def test_an_assembly_changed_after_it_was_made_assembles_as_if_written_so(tiny_assembly):
    """Parts added to an AssemblyConfig in Python got no projection defaults (a bare KeyError 'image' from
    assemble), and a decoder taken out left its signal tokens in the LLM, with no projection or decoder for
    them. assemble now checks the config as made, as loading it from YAML does, without changing the caller's."""
    import copy

    import pytest

    from mmllm import AnyToAnyModel, AssemblyConfig, ConfigError

    config = AssemblyConfig(name="grown", llm=tiny_assembly.llm, max_length=64)
    config.encoders["image"] = tiny_assembly.encoders["image"]
    config.decoders["image"] = tiny_assembly.decoders["image"]
    as_given = copy.deepcopy(config)
    model = AnyToAnyModel.assemble(config, decoder_parts="config")
    assert list(model.input_projections) == list(model.output_projections) == ["image"]
    assert list(model.llm.signal_ids) == ["image"] and model.config.signal_tokens == {"image": 4}
    assert config == as_given  # the caller's object is left as it was

    shrunk = copy.deepcopy(tiny_assembly)
    del shrunk.decoders["audio"]
    with pytest.raises(ConfigError, match=r"output_projections\.audio is set but decoders\.audio is not"):
        AnyToAnyModel.assemble(shrunk, decoder_parts="config")
    del shrunk.output_projections["audio"]
    model = AnyToAnyModel.assemble(shrunk, decoder_parts="config")
    assert list(model.llm.signal_ids) == ["image", "video"] and list(model.output_projections) == ["image", "video"]
