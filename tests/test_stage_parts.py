"""A stage holds only the parts it runs. A decoder loads ``config`` (shapes), ``conditioning`` (text
encoder), ``denoise`` (denoiser and VAE) or ``all`` (``decoder_parts``): the checks, the conditioning and
the denoising loss are the same in every mode that has them,
what a mode lacks is refused by name, and its weights are never read. decode-align, which reads
captions only, releases the encoders to their shapes."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmllm.config import ComponentSpec, ConfigError, load_stage
from mmllm.data.dataset import load_stage_records
from mmllm.data.fingerprint import decoder_fingerprint
from mmllm.data.media import Audio, Video
from mmllm.registry import build
from mmllm.training.freeze import count_parameters
from mmllm.training.loop import build_model
from mmllm.training.parts import stage_parts

REPO = Path(__file__).resolve().parents[1]
ENTRIES = yaml.safe_load((REPO / "configs/assemblies/_tiny_decoders.yaml").read_text())["decoders"]
MODALITIES = ["image", "audio", "video"]
CAPTIONS = ["a red circle", "a blue square"]
GENERATION = {"image": {"unet", "vae"}, "audio": {"unet", "vae", "vocoder"}, "video": {"unet", "vae"}}
DENOISING = {"unet", "vae"}  # what the denoising loss runs, in every family


MEDIA = {  # one item each decoder's denoising loss can encode
    "image": lambda: Image.new("RGB", (64, 64), (200, 30, 30)),
    "audio": lambda: Audio(np.sin(np.linspace(0, 400, 16000)).astype(np.float32), 16000),
    "video": lambda: Video([Image.new("RGB", (64, 64), (30, 30, 200 - 20 * i)) for i in range(4)], 4.0),
}


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
    denoiser = from_folder(modality, saved[modality], "denoise")
    shape = from_folder(modality, saved[modality], "config")
    assert top_level_parts(full) == {"text_encoder"} | GENERATION[modality]
    assert top_level_parts(text) == {"text_encoder"}
    assert top_level_parts(denoiser) == DENOISING
    assert top_level_parts(shape) == set() and not list(shape.parameters())
    assert full.conditioning_shape == text.conditioning_shape == denoiser.conditioning_shape == shape.conditioning_shape
    assert [d.parts for d in (full, text, denoiser, shape)] == ["all", "conditioning", "denoise", "config"]
    conditioning = full.condition(CAPTIONS)
    assert torch.equal(text.condition(CAPTIONS), conditioning)
    media = [MEDIA[modality]()] * len(CAPTIONS)
    assert torch.equal(denoiser.denoising_loss(conditioning, media, seed=3),
                       full.denoising_loss(conditioning, media, seed=3))
    # a feature cache built by either is valid for the other
    assert decoder_fingerprint(text) == decoder_fingerprint(full)


@pytest.mark.parametrize("modality", MODALITIES)
def test_what_a_mode_lacks_is_refused_by_name(modality):
    text, denoiser, shape = (build_entry(modality, parts) for parts in ("conditioning", "denoise", "config"))
    conditioning = text.condition(CAPTIONS)
    for decoder in (text, denoiser, shape):
        with pytest.raises(RuntimeError, match=r"cannot generate .*decoder_parts='all'"):
            decoder.generate(conditioning, steps=1)
    for decoder in (text, shape):
        with pytest.raises(RuntimeError, match=r"cannot compute the denoising loss.*decoder_parts='denoise'"):
            decoder.denoising_loss(conditioning, [None, None])
    for decoder in (denoiser, shape):
        with pytest.raises(RuntimeError, match=r"without its text_encoder.*decoder_parts='conditioning'"):
            decoder.condition(CAPTIONS)
        with pytest.raises(ValueError, match="no conditioning to fingerprint"):
            decoder_fingerprint(decoder)
    with pytest.raises(ValueError, match="holds parts='denoise'; it cannot release to 'conditioning'"):
        denoiser.release("conditioning")


@pytest.mark.parametrize("modality", MODALITIES)
def test_unused_weights_are_never_read_but_their_configs_are_checked(modality, saved, tmp_path):
    folder = shutil.copytree(saved[modality], tmp_path / "pipe")
    for part in GENERATION[modality] | {"text_encoder"}:
        for weights in (folder / part).glob("*.safetensors"):
            weights.write_bytes(b"not safetensors")  # reading them would fail
    from_folder(modality, folder, "config")
    with pytest.raises(Exception):  # noqa: B017 - whatever diffusers raises on a corrupt file
        from_folder(modality, folder, "all")
    # the denoising loss reads no text encoder (nor the audio vocoder)
    text_side = shutil.copytree(saved[modality], tmp_path / "text-side")
    for part in {"text_encoder"} | (GENERATION[modality] - DENOISING):
        for weights in (text_side / part).glob("*.safetensors"):
            weights.write_bytes(b"not safetensors")
    assert top_level_parts(from_folder(modality, text_side, "denoise")) == DENOISING
    with pytest.raises(Exception):  # noqa: B017
        from_folder(modality, text_side, "conditioning")
    # the assembly-time checks read the unloaded UNet's config
    unet_config = folder / "unet" / "config.json"
    config = json.loads(unet_config.read_text())
    key = "projection_class_embeddings_input_dim" if modality == "audio" else "cross_attention_dim"
    config[key] = 999
    unet_config.write_text(json.dumps(config))
    with pytest.raises((ValueError, ConfigError), match="999"):
        from_folder(modality, folder, "config")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="valid: config, conditioning, denoise, all"):
        build_entry("image", "everything")


def _inputs_outputs(cfg) -> tuple[set[str], set[str]]:
    per_dataset = load_stage_records(cfg.data, cfg.stage)[0]
    return ({r.modality for d in per_dataset for c in d for r in c.media_refs()},
            {o.modality for d in per_dataset for c in d for o in c.output_refs()})


@pytest.mark.parametrize(
    ("stage", "overrides", "wanted"),
    [
        ("encode_align", [], "conditioning"),  # media -> caption: no outputs, so no decoder loads anything
        ("decode_align", [], "conditioning"),  # caption -> signal tokens: no inputs, so no encoder is kept
        ("instruct", [], "conditioning"),
        ("instruct", ["losses.denoise=0.5"], "all"),
        ("instruct", ["losses.denoise=0.5", "losses.mse=0"], "denoise"),  # conditioned on the projection only
        ("decode_align", ["losses.mse=0"], "config"),
    ],
)
def test_a_stage_holds_what_its_data_and_losses_run(stage, overrides, wanted, tmp_path):
    from mmllm.config import load_assembly
    from mmllm.model import AnyToAnyModel

    cfg = load_stage(REPO / f"configs/stages/tiny/{stage}.yaml", [f"output_dir={tmp_path}", "init_from=null",
                                                                     *overrides])
    inputs, outputs = _inputs_outputs(cfg)
    assert (stage != "encode_align" or not outputs) and (stage != "decode_align" or not inputs)
    model = build_model(cfg)
    for m, decoder in model.decoders.items():
        assert decoder.parts == (wanted if m in outputs else "config")
    for m, encoder in model.encoders.items():
        assert encoder.runnable == (m in inputs)
        assert (sum(p.numel() for p in encoder.parameters()) > 0) == (m in inputs)
    full = AnyToAnyModel.assemble(load_assembly(cfg.assembly))
    # `mmllm inspect` counts a stage's holdings on the whole model: the same numbers
    parts = stage_parts(cfg.losses, load_stage_records(cfg.data, cfg.stage)[0])
    held = {r.name: r.frozen for r in count_parameters(model) if r.name.startswith(("encoders.", "decoders."))}
    counted = {r.name: r.frozen for r in count_parameters(full, parts)
               if r.name.startswith(("encoders.", "decoders."))}
    assert held == counted
    for m, encoder in model.encoders.items():  # what the input projections and the checks read is kept
        assert (encoder.modality, encoder.num_tokens, encoder.output_dim) == (
            m, full.encoders[m].num_tokens, full.encoders[m].output_dim)
        assert encoder.describe() == full.encoders[m].describe()
        if not encoder.runnable:
            with pytest.raises(RuntimeError, match=f"the {m} encoder .* holds no weights.* cannot preprocess"):
                encoder.preprocess([None])
            with pytest.raises(RuntimeError, match="cannot encode media"):
                encoder(torch.zeros(1))


@pytest.mark.parametrize("stage", ["encode_align", "decode_align"])
def test_an_alignment_stage_on_conversations_keeps_what_they_use(stage, tmp_path, caplog):
    """Conversation data in an alignment stage may give media inputs to decode-align and ask
    encode-align for outputs: the stage keeps those encoders and loads those decoders' text side, and
    trains on every sample (none skipped for a missing part)."""
    import dataclasses

    from mmllm.training.loop import train

    chat = load_stage(REPO / "configs/stages/tiny/instruct.yaml", [])
    cfg = load_stage(REPO / f"configs/stages/tiny/{stage}.yaml", [f"output_dir={tmp_path}", "init_from=null",
                                                                     "max_steps=3", "save_every=0",
                                                                     "losses.mse=1.0"])
    cfg = dataclasses.replace(cfg, data=chat.data)
    inputs, outputs = _inputs_outputs(cfg)
    assert inputs and outputs
    with caplog.at_level("WARNING"):
        result = train(cfg)
    assert not [r for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_decoders_naming_the_same_text_encoder_share_one_copy(saved, tmp_path):
    """Two decoders whose ``text_encoder:`` names the same weights (class, config, dtype alike) hold one
    module in an assembly, as the embedded default's three MiniLM-conditioned decoders do; apart, two."""
    from mmllm.config import read_yaml
    from mmllm.decoders._diffusion import shared_text_encoders
    from mmllm.model import AnyToAnyModel, parse_assembly

    shared = saved["image"] / "text_encoder"  # a CLIPTextModel, as the video pipeline's is
    video = shutil.copytree(saved["video"], tmp_path / "video")
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


def test_a_unet_saved_before_diffusers_0_9_has_one_size_in_every_mode(saved, tmp_path):
    """StableDiffusionPipeline reads such a UNet's sample_size < 64 as 64; an unloaded UNet's config too."""
    folder = shutil.copytree(saved["image"], tmp_path / "old")
    config = json.loads((folder / "unet/config.json").read_text())
    assert config["sample_size"] < 64
    (folder / "unet/config.json").write_text(json.dumps({**config, "_diffusers_version": "0.8.0"}))
    entry = {k: v for k, v in ENTRIES["image"].items() if k not in ("tiny", "height", "width")}
    full, text = (build_entry("image", parts, {**entry, "model": str(folder)}) for parts in ("all", "conditioning"))
    assert (full.height, full.width) == (text.height, text.width) == (64 * full.vae_scale_factor,) * 2
    assert decoder_fingerprint(full) == decoder_fingerprint(text)


def test_mmllm_cache_runs_the_text_side_only():
    """`mmllm cache` computes encoder features and conditioning targets: of a stage that denoises, it
    loads the decoders' text encoders (for the targets, when the stage has an MSE loss) and no denoiser."""
    from mmllm.training.parts import StageParts, cache_parts

    encoders = frozenset({"image"})
    stage = StageParts({"image": "all", "audio": "denoise", "video": "conditioning"}, encoders)
    assert cache_parts(stage) == StageParts({"image": "conditioning", "video": "conditioning"}, encoders)
