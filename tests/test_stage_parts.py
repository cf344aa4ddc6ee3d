"""A stage holds only the parts it runs. A decoder loads ``config`` (shapes), ``conditioning`` (text
encoder) or ``all`` (``decoder_parts``): the checks and the conditioning are the same in every mode,
what a mode lacks is refused by name, and its weights are never read. decode-align, which reads
captions only, releases the encoders to their shapes."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
import yaml

from mmllm.config import ComponentSpec, ConfigError, load_stage
from mmllm.data.fingerprint import decoder_fingerprint
from mmllm.registry import build
from mmllm.training.freeze import count_parameters
from mmllm.training.loop import build_model, decoder_parts

REPO = Path(__file__).resolve().parents[1]
ENTRIES = yaml.safe_load((REPO / "configs/assemblies/_tiny_decoders.yaml").read_text())["decoders"]
MODALITIES = ["image", "audio", "video"]
CAPTIONS = ["a red circle", "a blue square"]
GENERATION = {"image": {"unet", "vae"}, "audio": {"unet", "vae", "vocoder"}, "video": {"unet", "vae"}}


def build_entry(modality: str, parts: str, entry: dict | None = None) -> torch.nn.Module:
    where = f"decoders.{modality}"
    return build("decoder", ComponentSpec.parse(entry or ENTRIES[modality], where), where, parts=parts)


def top_level_parts(decoder: torch.nn.Module) -> set[str]:
    return {name for name, module in decoder.named_children() if any(True for _ in module.parameters())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """Each tiny decoder saved as a pipeline folder (the ``model:`` path)."""
    out = {}
    for m in MODALITIES:
        folder = tmp_path_factory.mktemp(m)
        build_entry(m, "all").pipeline.save_pretrained(folder)
        out[m] = folder
    return out


def from_folder(modality: str, folder: Path, parts: str) -> torch.nn.Module:
    entry = {k: v for k, v in ENTRIES[modality].items() if k != "tiny"}
    return build_entry(modality, parts, {**entry, "model": str(folder)})


@pytest.mark.parametrize("modality", MODALITIES)
def test_each_mode_loads_its_parts_with_the_same_shape_and_conditioning(modality, saved):
    full = from_folder(modality, saved[modality], "all")
    text = from_folder(modality, saved[modality], "conditioning")
    shape = from_folder(modality, saved[modality], "config")
    assert top_level_parts(full) == {"text_encoder"} | GENERATION[modality]
    assert top_level_parts(text) == {"text_encoder"}
    assert top_level_parts(shape) == set() and not list(shape.parameters())
    assert full.conditioning_shape == text.conditioning_shape == shape.conditioning_shape
    assert [d.parts for d in (full, text, shape)] == ["all", "conditioning", "config"]
    assert torch.equal(text.condition(CAPTIONS), full.condition(CAPTIONS))
    # a feature cache built by either is valid for the other
    assert decoder_fingerprint(text) == decoder_fingerprint(full)


@pytest.mark.parametrize("modality", MODALITIES)
def test_what_a_mode_lacks_is_refused_by_name(modality):
    text, shape = build_entry(modality, "conditioning"), build_entry(modality, "config")
    conditioning = text.condition(CAPTIONS)
    for decoder in (text, shape):
        with pytest.raises(RuntimeError, match=r"cannot generate .*decoder_parts='all'"):
            decoder.generate(conditioning, steps=1)
    with pytest.raises(RuntimeError, match="cannot compute the denoising loss"):
        text.denoising_loss(conditioning, [None, None])
    with pytest.raises(RuntimeError, match=r"without its text_encoder.*decoder_parts='conditioning'"):
        shape.condition(CAPTIONS)
    with pytest.raises(ValueError, match="no conditioning to fingerprint"):
        decoder_fingerprint(shape)


@pytest.mark.parametrize("modality", MODALITIES)
def test_unused_weights_are_never_read_but_their_configs_are_checked(modality, saved, tmp_path):
    folder = tmp_path / "pipe"
    folder.mkdir()
    for item in saved[modality].rglob("*"):
        if item.is_file():
            (folder / item.relative_to(saved[modality])).parent.mkdir(parents=True, exist_ok=True)
            (folder / item.relative_to(saved[modality])).write_bytes(item.read_bytes())
    for part in GENERATION[modality] | {"text_encoder"}:
        for weights in (folder / part).glob("*.safetensors"):
            weights.write_bytes(b"not safetensors")  # reading them would fail
    from_folder(modality, folder, "config")
    with pytest.raises(Exception):  # noqa: B017 - whatever diffusers raises on a corrupt file
        from_folder(modality, folder, "all")
    # the assembly-time checks read the unloaded UNet's config
    unet_config = folder / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    key = "projection_class_embeddings_input_dim" if modality == "audio" else "cross_attention_dim"
    config[key] = 999
    unet_config.write_text(json.dumps(config))
    with pytest.raises((ValueError, ConfigError), match="999"):
        from_folder(modality, folder, "config")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="valid: config, conditioning, all"):
        build_entry("image", "everything")


@pytest.mark.parametrize(
    ("stage", "overrides", "expected", "encoders_run"),
    [
        ("encode_align", [], "config", True),
        ("encode_align", ["losses.mse=1.0"], "config", True),  # no signal tokens in its data: no targets
        ("decode_align", [], "conditioning", False),
        ("instruct", [], "conditioning", True),
        ("instruct", ["losses.denoise=0.5"], "all", True),
    ],
)
def test_a_stage_holds_what_it_runs(stage, overrides, expected, encoders_run, tmp_path):
    from mmllm.config import load_assembly
    from mmllm.model import AnyToAnyModel

    cfg = load_stage(REPO / f"configs/stages/tiny/{stage}.yaml", [f"output_dir={tmp_path}", "init_from=null",
                                                                     *overrides])
    assert decoder_parts(cfg) == expected
    model = build_model(cfg)
    assert {d.parts for d in model.decoders.values()} == {expected}
    loaded = sum(p.numel() for p in model.decoders.parameters())
    assert (loaded == 0) == (expected == "config")
    assert all(e.runnable == encoders_run for e in model.encoders.values())
    assert (sum(p.numel() for p in model.encoders.parameters()) > 0) == encoders_run
    full = AnyToAnyModel.assemble(load_assembly(cfg.assembly))
    # `mmllm inspect` counts a stage's holdings on the whole model: the same numbers
    held = {r.name: r.frozen for r in count_parameters(model) if r.name.startswith(("encoders.", "decoders."))}
    counted = {r.name: r.frozen for r in count_parameters(full, expected, encoders=encoders_run)
               if r.name.startswith(("encoders.", "decoders."))}
    assert held == counted
    for m, encoder in model.encoders.items():  # what the input projections and the checks read is kept
        assert (encoder.modality, encoder.num_tokens, encoder.output_dim) == (
            m, full.encoders[m].num_tokens, full.encoders[m].output_dim)
        assert encoder.describe() == full.encoders[m].describe()
        if not encoders_run:
            with pytest.raises(RuntimeError, match=f"the {m} encoder .* was released .* cannot preprocess"):
                encoder.preprocess([None])
            with pytest.raises(RuntimeError, match="cannot encode media"):
                encoder(torch.zeros(1))


def test_decoders_naming_the_same_text_encoder_share_one_copy(saved, tmp_path):
    """Two decoders whose ``text_encoder:`` names the same weights (class, config, dtype alike) hold one
    module in an assembly, as the embedded default's three MiniLM-conditioned decoders do; apart, two."""
    from mmllm.config import read_yaml
    from mmllm.decoders._diffusion import shared_text_encoders
    from mmllm.model import AnyToAnyModel, parse_assembly

    shared = saved["image"] / "text_encoder"  # a CLIPTextModel, as the video pipeline's is
    video = tmp_path / "video"
    for item in saved["video"].rglob("*"):
        if item.is_file():
            (video / item.relative_to(saved["video"])).parent.mkdir(parents=True, exist_ok=True)
            (video / item.relative_to(saved["video"])).write_bytes(item.read_bytes())
    (video / "text_encoder/config.json").write_text((shared / "config.json").read_text())
    data = read_yaml(REPO / "configs/assemblies/tiny.yaml")
    for m, folder in (("image", saved["image"]), ("video", video)):
        entry = {k: v for k, v in ENTRIES[m].items() if k != "tiny"}
        data["decoders"][m] = {**entry, "model": str(folder), "text_encoder": str(shared)}
    model = AnyToAnyModel.assemble(parse_assembly(data), "conditioning")
    image, video_decoder = model.decoders["image"], model.decoders["video"]
    assert image.text_encoder is video_decoder.text_encoder
    alone = from_folder("image", saved["image"], "conditioning")
    assert torch.equal(image.condition(CAPTIONS), alone.condition(CAPTIONS))
    with shared_text_encoders():
        a = build_entry("image", "conditioning", data["decoders"]["image"])
    b = build_entry("image", "conditioning", data["decoders"]["image"])
    assert a.text_encoder is not b.text_encoder  # outside one assembly, nothing is shared
