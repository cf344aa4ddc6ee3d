"""Files a user did not make: a checkpoint, export or training state from someone else must not read outside
its folder unchecked, load a pickle, or turn on remote code by itself."""

import hashlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mmllm.config import ConfigError, parse_assembly, to_dict
from mmllm.model import AnyToAnyModel
from mmllm.training import checkpoint as ckpt
from tests.test_llm_swap import save_core_with_own_code


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_assembly) -> Path:
    """A tiny model's checkpoint, written as mmllm writes one (copied by each test that alters it)."""
    return AnyToAnyModel.assemble(tiny_assembly).save_pretrained(tmp_path_factory.mktemp("ckpt") / "step-1")


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "step-1"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Payload:
    """Pickles as a call that writes a marker file: what a malicious pickle runs when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_checkpoint_as_written_verifies(copy):
    ckpt.verify_manifest(copy)  # the checks below refuse only what mmllm never writes


def test_a_file_its_manifest_does_not_list_is_refused(copy):
    (copy / "adapter").mkdir()  # would be attached as a LoRA adapter, its weights never checked
    (copy / "adapter" / "adapter_model.safetensors").write_bytes(b"not listed")
    with pytest.raises(ckpt.CheckpointError, match=r"1 file\(s\) its manifest.json does not list "
                                                   r"\(adapter/adapter_model.safetensors\)"):
        ckpt.verify_manifest(copy)


def test_what_hubs_add_to_a_checkpoint_is_no_reason_to_refuse_it(copy):
    """A model repository's README.md and .gitattributes, the .cache/ of `hf download --local-dir`, a Mac's
    .DS_Store: mmllm never reads them, and refusing them made every checkpoint shared through a hub unloadable."""
    (copy / "README.md").write_text("# my model")
    (copy / ".gitattributes").write_text("*.safetensors filter=lfs")
    (copy / "LICENSE").write_text("MIT")
    (copy / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (copy / ".cache" / "huggingface" / "download" / "learned.safetensors.metadata").write_text("abc")
    (copy / ".DS_Store").write_bytes(b"\0")
    (copy / "._learned.safetensors").write_bytes(b"\0")  # macOS's AppleDouble twin on SMB/exFAT
    ckpt.verify_manifest(copy)
    (copy / "adapter").mkdir()  # beside them, a file mmllm would read is still refused
    (copy / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match=r"1 file\(s\) its manifest.json does not list \(adapter/"):
        ckpt.verify_manifest(copy)


def test_a_linked_file_is_checked_by_what_it_holds(copy, tmp_path):
    """The hub's cache links each file of a snapshot to its blob: same bytes, so it loads; other bytes are refused."""
    blob = tmp_path / "blobs" / "learned"
    blob.parent.mkdir()
    shutil.move(copy / "learned.safetensors", blob)
    os.symlink(blob, copy / "learned.safetensors")
    AnyToAnyModel.from_pretrained(copy)
    blob.write_bytes(blob.read_bytes()[:-8])
    with pytest.raises(ckpt.CheckpointError, match="learned.safetensors: contents do not match the manifest"):
        AnyToAnyModel.from_pretrained(copy)


def test_a_link_whose_blob_is_gone_is_a_missing_file(copy, tmp_path):
    """A hub-cache snapshot whose blob was deleted: the file is missing (it was a bare FileNotFoundError)."""
    os.remove(copy / "learned.safetensors")
    os.symlink(tmp_path / "blobs" / "gone", copy / "learned.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="learned.safetensors: listed in the manifest but missing"):
        ckpt.verify_manifest(copy)


def test_a_linked_folder_in_a_checkpoint_is_refused(copy, tmp_path):
    (tmp_path / "elsewhere").mkdir()  # its files would be read from outside, and no listing would show them
    os.symlink(tmp_path / "elsewhere", copy / "adapter")
    with pytest.raises(ckpt.CheckpointError, match="adapter: a linked folder"):
        ckpt.verify_manifest(copy)


@pytest.mark.parametrize("entry", ["../secret.txt", "..\\secret.txt", "{abs}"])
def test_a_manifest_entry_outside_the_checkpoint_is_refused(copy, tmp_path, entry):
    outside = tmp_path / "secret.txt"
    outside.write_text("the user's own file")
    entry = entry.format(abs=outside)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][entry] = _sha256(outside)  # a hash that matches tells whoever wrote it the contents
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError, match=r"lists \['.*secret.txt'\], outside the checkpoint"):
        ckpt.verify_manifest(copy)


def test_a_merged_exports_llm_folder_must_be_inside_it(copy):
    meta = ckpt.read_meta(copy)
    meta["merged_from"] = "somewhere"
    meta["assembly"]["llm"] = {"kind": "hf-causal-lm", "name_or_path": "./llm"}
    assert ckpt.merged_llm_folder(meta) == "llm"
    meta["assembly"]["llm"]["name_or_path"] = "./../../another-model"
    with pytest.raises(ckpt.CheckpointError, match="leads outside the checkpoint"):
        ckpt.merged_llm_folder(meta)


@pytest.mark.parametrize("module", ["{ckpt}.parts", "parts"])  # run from its parent folder, or from inside it
def test_a_class_the_checkpoint_names_is_never_imported_from_inside_it(saved, tmp_path, monkeypatch, module):
    copy = Path(shutil.copytree(saved, tmp_path / f"downloaded_{len(module)}"))
    marker = tmp_path / "ran.txt"
    (copy / "parts.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass Encoder:\n    pass\n")
    meta = ckpt.read_meta(copy)
    kind = module.format(ckpt=copy.name) + ":Encoder"
    meta["assembly"]["encoders"]["image"] = {"kind": kind}
    (copy / "mmllm.json").write_text(json.dumps(meta))
    ckpt.write_manifest(copy)  # whoever made it lists its files: the hashes hold
    where = copy.parent if "{ckpt}" in module else copy
    monkeypatch.chdir(where)
    monkeypatch.syspath_prepend(str(where))  # `python -m mmllm.cli` puts the working directory on sys.path
    with pytest.raises(ConfigError, match=f"kind '{kind}' would import .* inside"):
        AnyToAnyModel.from_pretrained(copy)
    assert not marker.exists()


def test_a_class_in_a_hub_cached_checkpoint_is_not_imported_either(saved, tmp_path, monkeypatch):
    """The hub's cache keeps a snapshot's files as links to blobs outside it: the linked ``parts.py`` is imported
    from inside the snapshot all the same (it was let through, resolved to its blob, and run)."""
    snapshot, blobs = tmp_path / "hub" / "snapshots" / "abc", tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    marker = tmp_path / "ran.txt"
    files = {rel.as_posix(): path.read_bytes() for path in saved.rglob("*") if path.is_file()
             for rel in [path.relative_to(saved)]}
    files["parts.py"] = f"open({str(marker)!r}, 'w').write('ran')\nclass Encoder:\n    pass\n".encode()
    meta = json.loads(files["mmllm.json"])
    meta["assembly"]["encoders"]["image"] = {"kind": "parts:Encoder"}
    files["mmllm.json"] = json.dumps(meta).encode()
    staged = tmp_path / "staged"  # the checkpoint as its maker uploads it, manifest listing parts.py
    for rel, data in files.items():
        (staged / rel).parent.mkdir(parents=True, exist_ok=True)
        (staged / rel).write_bytes(data)
    ckpt.write_manifest(staged)
    for i, path in enumerate(p for p in staged.rglob("*") if p.is_file()):
        blob, link = blobs / f"blob{i}", snapshot / path.relative_to(staged)
        shutil.copy(path, blob)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blob, link)
    monkeypatch.chdir(snapshot)
    monkeypatch.syspath_prepend(str(snapshot))
    with pytest.raises(ConfigError, match="kind 'parts:Encoder' would import parts from .*parts.py, inside"):
        AnyToAnyModel.from_pretrained(snapshot)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ remote code


@pytest.fixture(scope="module")
def remote_code_checkpoint(tmp_path_factory, tiny_assembly) -> Path:
    """A checkpoint whose core's classes come from its folder: its assembly sets trust_remote_code."""
    root = tmp_path_factory.mktemp("remote")
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(save_core_with_own_code(root / "core")),
                   "trust_remote_code": True}
    return AnyToAnyModel.assemble(parse_assembly(data)).save_pretrained(root / "step-1")


def test_a_checkpoint_does_not_turn_on_remote_code_by_itself(remote_code_checkpoint, tmp_path):
    with pytest.raises(ckpt.CheckpointError, match=r"sets trust_remote_code for llm.*pass --trust-remote-code"):
        AnyToAnyModel.from_pretrained(remote_code_checkpoint)
    with pytest.raises(ckpt.CheckpointError, match="sets trust_remote_code for llm"):
        ckpt.export_merged(remote_code_checkpoint, tmp_path / "merged")
    model = AnyToAnyModel.from_pretrained(remote_code_checkpoint, trust_remote_code=True)  # the caller's choice
    assert type(model.llm.model).__name__ == "CustomForCausalLM"


def test_the_suite_copies_remote_code_into_a_folder_of_its_own_not_the_home_folder(remote_code_checkpoint):
    """transformers runs a trust_remote_code core from a copy of its Python in HF_MODULES_CACHE, by default
    ~/.cache/huggingface/modules: the suite wrote there, on every machine, and concurrent runs shared it."""
    import inspect

    model = AnyToAnyModel.from_pretrained(remote_code_checkpoint, trust_remote_code=True)
    code = Path(inspect.getfile(type(model.llm.model))).resolve()
    assert not code.is_relative_to(Path.home().resolve()), code
    assert code.is_relative_to(Path(os.environ["MMLLM_TESTS_HF_MODULES"]).resolve()), code  # tests/conftest.py's


def test_the_cli_loads_remote_code_only_with_its_flag(remote_code_checkpoint, tmp_path, capsys):
    from mmllm.cli import main

    args = ["export", "--checkpoint", str(remote_code_checkpoint), "--merge-lora"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    assert "pass --trust-remote-code" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "b"), "--trust-remote-code"]) == 0


def test_training_from_it_needs_the_stages_own_assembly_to_trust_the_same_parts(remote_code_checkpoint, tmp_path):
    from types import SimpleNamespace

    import yaml

    from mmllm.training.init_from import stage_trusts_remote_code

    recorded = ckpt.read_meta(remote_code_checkpoint)["assembly"]
    own = tmp_path / "assembly.yaml"
    own.write_text(yaml.safe_dump({**recorded, "llm": {**recorded["llm"], "trust_remote_code": False}}))
    cfg = SimpleNamespace(init_from=str(remote_code_checkpoint), assembly=str(own), assembly_overrides=[])
    with pytest.raises(ConfigError, match=r"sets trust_remote_code for llm.*assembly.llm.trust_remote_code=true"):
        stage_trusts_remote_code(cfg)
    cfg.assembly_overrides = ["llm.trust_remote_code=true"]  # the user's own file or override turns it on
    assert stage_trusts_remote_code(cfg) is True
    plain = tmp_path / "plain"
    shutil.copytree(remote_code_checkpoint, plain)
    meta = ckpt.read_meta(plain)
    del meta["assembly"]["llm"]["trust_remote_code"]
    (plain / "mmllm.json").write_text(json.dumps(meta))
    assert stage_trusts_remote_code(SimpleNamespace(init_from=str(plain), assembly=str(own),
                                                    assembly_overrides=[])) is False


@pytest.mark.parametrize("command", [["inspect"], ["data", "check"]])
def test_commands_reading_a_stage_from_it_need_the_same_trust(remote_code_checkpoint, tmp_path, command, capsys):
    """`mmllm inspect`, `data check` and `cache` build the assembly init_from records: they ran the core's own
    code (its configuration_*.py, at least) where training from the same stage is refused."""
    import yaml

    from mmllm.cli import main

    recorded = ckpt.read_meta(remote_code_checkpoint)["assembly"]
    own = tmp_path / "assembly.yaml"
    own.write_text(yaml.safe_dump({**recorded, "llm": {**recorded["llm"], "trust_remote_code": False}}))
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"id": "a", "image": "x.png", "caption": "a red circle"}) + "\n")
    stage = tmp_path / "stage.yaml"
    stage.write_text(yaml.safe_dump({"stage": "encode-align", "assembly": str(own), "init_from": str(remote_code_checkpoint),
                                     "data": [{"path": str(data), "format": "mmllm-pairs"}],
                                     "output_dir": str(tmp_path / "run")}))
    assert main([*command, "--config", str(stage)]) == 2
    assert "sets trust_remote_code for llm" in capsys.readouterr().err
    assert main([*command, "--config", str(stage), "assembly.llm.trust_remote_code=true"]) != 2  # the user's own
    assert "sets trust_remote_code" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ pickles


def _scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def test_training_state_rng_round_trips_and_loads_as_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ckpt.save_training_state(tmp_path, {"state": {}, "param_groups": []}, _scheduler(), 5, {})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert ckpt.load_training_state(tmp_path, _scheduler())["step"] == 5
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    torch.load(tmp_path / "training_state" / "rng.pt", weights_only=True)  # no numpy object inside


def test_an_rng_file_written_before_it_held_tensors_still_loads(tmp_path):
    np.random.seed(4)
    ckpt.save_training_state(tmp_path, {"state": {}, "param_groups": []}, _scheduler(), 1, {})
    expected = np.random.rand()
    old = {"python": random.getstate(), "numpy": None, "torch": torch.get_rng_state(), "cuda": []}
    np.random.seed(4)
    old["numpy"] = np.random.get_state()  # numpy's key array pickled as an ndarray, as earlier mmllm saved it
    torch.save(old | {"per_process": [old]}, tmp_path / "training_state" / "rng.pt")
    np.random.seed(0)
    ckpt.load_training_state(tmp_path, _scheduler())
    assert np.random.rand() == expected


def test_a_pickle_in_training_state_is_refused_not_run(tmp_path):
    ckpt.save_training_state(tmp_path, {"state": {}, "param_groups": []}, _scheduler(), 1, {})
    marker = tmp_path / "ran.txt"
    (tmp_path / "training_state" / "rng.pt").write_bytes(pickle.dumps({"python": _Payload(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_training_state(tmp_path, _scheduler())
    assert not marker.exists()


def test_a_pickle_as_a_toy_parts_training_state_is_refused_not_run(tmp_path):
    from mmllm.toyworld.training import Optim, Recipe, train

    class Tiny(Recipe):
        name, optim, seed = "tiny", Optim(steps=2, batch_size=1, lr=0.1, warmup=0), 0

        def __init__(self):
            self.layer = torch.nn.Linear(2, 1)

        def modules(self):
            return {"layer": self.layer}

        def trainable(self):
            return list(self.layer.parameters())

        def loss(self, step):
            return self.layer(torch.ones(1, 2)).pow(2).sum()

        def export(self, folder):
            return {}

    state = tmp_path / "tiny.pt"
    train(Tiny(), state, progress=False)
    assert train(Tiny(), state, resume=True, progress=False).steps == 2  # its own state: still resumes
    marker = tmp_path / "ran.txt"
    state.write_bytes(pickle.dumps({"identity": _Payload(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        train(Tiny(), state, resume=True, progress=False)
    assert not marker.exists()


def test_a_package_path_is_located_without_importing_the_package(tmp_path, monkeypatch):
    from mmllm.locations import resolve_source

    marker = tmp_path / "ran.txt"
    (tmp_path / "somepkg" / "weights" / "decoder").mkdir(parents=True)
    (tmp_path / "somepkg" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (tmp_path / "somepkg" / "weights" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    shipped = Path(ckpt.__file__).parents[1] / "toyworld" / "weights"
    for value, folder in (("package:somepkg/weights/decoder", tmp_path / "somepkg/weights/decoder"),
                          ("package:somepkg.weights/decoder", tmp_path / "somepkg/weights/decoder"),
                          ("package:mmllm.toyworld/weights", shipped)):
        assert Path(resolve_source(value)) == folder
    assert not marker.exists()  # a config or checkpoint naming the package did not run its __init__.py


class _Converted(Exception):
    """Raised by the stand-in for the GGUF conversion: where it was asked to write."""


@pytest.fixture
def gguf_assembly(tiny_assembly, tmp_path, monkeypatch) -> dict:
    """The tiny assembly with a GGUF core whose conversion cache names a folder of the machine that wrote it;
    the conversion itself is replaced by one that reports where it would write."""
    import mmllm.llm

    def converted(gguf, cache_root):
        raise _Converted(cache_root)

    monkeypatch.setattr(mmllm.llm, "convert_gguf", converted)
    monkeypatch.delenv("MMLLM_GGUF_CACHE", raising=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "core.gguf").write_bytes(b"GGUF")
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(tmp_path / "model"), "gguf_file": "core.gguf",
                   "gguf_cache": str(tmp_path / "theirs")}
    return data


def _conversion_target(assembly) -> Path:
    from mmllm import registry

    with pytest.raises(_Converted) as converted:
        registry.build("llm", assembly.llm, "llm")
    return converted.value.args[0]


def test_a_checkpoint_does_not_choose_where_a_gguf_conversion_is_written(gguf_assembly, tmp_path, monkeypatch):
    """Its recorded gguf_cache was where loading it wrote the dequantised core (anywhere its maker named)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    recorded = {"format_version": ckpt.FORMAT_VERSION, "assembly": gguf_assembly}
    assert _conversion_target(ckpt.checkpoint_assembly(tmp_path, recorded)) == tmp_path / "home/.cache/mmllm/gguf"
    monkeypatch.setenv("MMLLM_GGUF_CACHE", str(tmp_path / "mine"))
    assert _conversion_target(ckpt.checkpoint_assembly(tmp_path, recorded)) == tmp_path / "mine"
    # an assembly of the user's own: its gguf_cache, unless the environment names one
    assert _conversion_target(parse_assembly(gguf_assembly)) == tmp_path / "mine"
    monkeypatch.delenv("MMLLM_GGUF_CACHE")
    assert _conversion_target(parse_assembly(gguf_assembly)) == tmp_path / "theirs"


def test_a_gguf_cache_elsewhere_is_no_difference_between_a_run_and_its_checkpoint(gguf_assembly):
    from mmllm.training.init_from import assembly_differences, normalized_assembly

    mine = {**gguf_assembly, "llm": {**gguf_assembly["llm"], "gguf_cache": "/data/gguf"}}
    assert assembly_differences(normalized_assembly(gguf_assembly), normalized_assembly(mine)) == []
