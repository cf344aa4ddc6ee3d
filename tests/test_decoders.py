"""Tiny in-process diffusion decoders (SD image, AudioLDM audio, text-to-video) against the interface."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmllm.config import ComponentSpec, ConfigError
from mmllm.data.media import Audio, Video
from mmllm.decoders._diffusion import prediction_target, training_scheduler
from mmllm.registry import build

YAML_PATH = Path(__file__).resolve().parents[1] / "configs" / "assemblies" / "_tiny_decoders.yaml"
ENTRIES = yaml.safe_load(YAML_PATH.read_text())["decoders"]
MODALITIES = ["image", "audio", "video"]
EXPECTED_SHAPES = {"image": (16, 32), "audio": (1, 16), "video": (16, 32)}
CAPTIONS = ["a red circle", "a blue square"]


def build_entry(modality: str, **changes) -> torch.nn.Module:
    entry = {**ENTRIES[modality], **changes}
    where = f"decoders.{modality}"
    return build("decoder", ComponentSpec.parse(entry, where), where)


@pytest.fixture(scope="module")
def decoders() -> dict[str, torch.nn.Module]:
    return {m: build_entry(m) for m in MODALITIES}


def as_array(item) -> np.ndarray:
    """Comparable pixels / samples of one generated media item."""
    if isinstance(item, Image.Image):
        return np.asarray(item, dtype=np.float32)
    if isinstance(item, Audio):
        return item.waveform
    return np.stack([np.asarray(f, dtype=np.float32) for f in item.frames])


def state(decoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}


# ------------------------------------------------------------------------------------------------ building


@pytest.mark.parametrize("modality", MODALITIES)
def test_builds_frozen_with_known_shape(decoders, modality):
    decoder = decoders[modality]
    assert decoder.modality == modality
    assert decoder.conditioning_shape == EXPECTED_SHAPES[modality]
    params = list(decoder.parameters())
    assert params and not any(p.requires_grad for p in params)
    decoder.train()
    assert not any(m.training for m in decoder.modules())
    assert decoder.pipeline is decoder.pipeline  # built once and kept
    assert decoder.describe()["conditioning_shape"] == list(EXPECTED_SHAPES[modality])


@pytest.mark.parametrize("modality", MODALITIES)
def test_tiny_options_match_yaml_and_build(decoders, modality):
    cls = type(decoders[modality])
    assert {k: v for k, v in ENTRIES[modality].items() if k != "kind"} == cls.tiny_options()
    decoder = cls.from_options(cls.Options(**cls.tiny_options()))
    assert decoder.conditioning_shape == EXPECTED_SHAPES[modality]
    # same tiny sizes and seed -> same weights as the YAML build
    assert all(
        torch.equal(a, b)
        for a, b in zip(decoder.state_dict().values(), decoders[modality].state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("modality", MODALITIES)
def test_unknown_option_key_is_named(modality):
    with pytest.raises(ConfigError, match=rf"decoders\.{modality}\.bogus_key"):
        build_entry(modality, bogus_key=1)
    with pytest.raises(ConfigError, match=r"tiny\.bogus_size"):
        build_entry(modality, tiny={"bogus_size": 3})


def test_model_and_tiny_are_exclusive():
    with pytest.raises(ConfigError, match="exactly one"):
        build_entry("image", model="some/repo")
    with pytest.raises(ConfigError, match="scheduler_prediction_type"):
        build_entry("image", scheduler_prediction_type="flow")
    with pytest.raises(ConfigError, match=r"decoders\.video.*width must be a positive multiple of 8"):
        build_entry("video", width=30)
    for guidance in (-1.0, float("nan"), float("inf")):  # <= 1 turns guidance off; below 0 or not finite: no scale
        with pytest.raises(ConfigError, match=r"decoders\.image.*guidance must be a finite number >= 0"):
            build_entry("image", guidance=guidance)


@pytest.mark.parametrize("modality", MODALITIES)
def test_model_dir_round_trip(decoders, modality, tmp_path):
    """The ``model:`` path: a saved pipeline dir reloads (safetensors, offline) into the same decoder."""
    decoder = decoders[modality]
    decoder.pipeline.save_pretrained(tmp_path)
    entry = {k: v for k, v in ENTRIES[modality].items() if k != "tiny"}
    where = f"decoders.{modality}"
    loaded = build("decoder", ComponentSpec.parse({**entry, "model": str(tmp_path)}, where), where)
    assert loaded.conditioning_shape == decoder.conditioning_shape
    assert not any(p.requires_grad for p in loaded.parameters())
    cond = decoder.condition(CAPTIONS)
    torch.testing.assert_close(loaded.condition(CAPTIONS), cond)
    np.testing.assert_allclose(
        as_array(loaded.generate(cond[:1], seeds=[4])[0]),
        as_array(decoder.generate(cond[:1], seeds=[4])[0]),
        atol=1e-5,
    )


# ------------------------------------------------------------------------------------------------ condition


@pytest.mark.parametrize("modality", MODALITIES)
def test_condition_shape_and_content(decoders, modality):
    decoder = decoders[modality]
    cond = decoder.condition(CAPTIONS)
    assert cond.shape == (2, *decoder.conditioning_shape)
    assert torch.isfinite(cond).all()
    assert not torch.allclose(cond[0], cond[1])
    assert torch.allclose(decoder.condition(CAPTIONS[:1])[0], cond[0], atol=1e-6)


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.parametrize("modality", MODALITIES)
def test_generate_types_and_seed_batch_invariance(decoders, modality):
    decoder = decoders[modality]
    cond = decoder.condition(CAPTIONS)
    batch = decoder.generate(cond, seeds=[11, 12])
    assert len(batch) == 2
    if modality == "image":
        assert all(isinstance(x, Image.Image) and x.size == (32, 32) and x.mode == "RGB" for x in batch)
    elif modality == "audio":
        assert all(isinstance(x, Audio) for x in batch)
        assert all(x.sample_rate == decoder.vocoder.config.sampling_rate == 16000 for x in batch)
        assert all(x.waveform.shape == (1024, 1) and np.isfinite(x.waveform).all() for x in batch)
    else:
        assert all(isinstance(x, Video) and len(x.frames) == 4 and x.fps == 8.0 for x in batch)
        assert all(f.size == (32, 32) and f.mode == "RGB" for x in batch for f in x.frames)
    alone = decoder.generate(cond[1:], seeds=[12])
    a, b = as_array(alone[0]), as_array(batch[1])
    # float noise between batch sizes can move a decoded 8-bit pixel by one quantisation step (docs/inference.md: use
    # --decode-batch-size 1 for bit-identical files); seen once in 3072 pixels
    if modality == "audio":  # float samples
        np.testing.assert_allclose(a, b, atol=1e-5)
    else:
        np.testing.assert_allclose(a, b, atol=1.0)
        assert np.mean(a == b) > 0.99
    other_seed = decoder.generate(cond[1:], seeds=[13])
    assert not np.allclose(as_array(other_seed[0]), as_array(batch[1]))


@pytest.mark.parametrize("modality", MODALITIES)
def test_generate_without_guidance_and_with_explicit_negative(decoders, modality):
    decoder = decoders[modality]
    cond = decoder.condition(CAPTIONS)
    plain = decoder.generate(cond, guidance=1.0, steps=1, seeds=[0, 1])
    assert len(plain) == 2
    negative = decoder.condition([""])  # one row, broadcast to the batch
    explicit = decoder.generate(cond, negative_conditioning=negative, seeds=[3, 4])
    implicit = decoder.generate(cond, seeds=[3, 4])
    for a, b in zip(explicit, implicit, strict=True):
        np.testing.assert_allclose(as_array(a), as_array(b), atol=1e-5)


def test_generate_rejects_wrong_shape(decoders):
    with pytest.raises(ValueError, match="conditioning must have shape"):
        decoders["image"].generate(torch.zeros(1, 7, 32))


def test_scheduler_swap_generates():
    decoder = build_entry("image", scheduler="DPMSolverMultistepScheduler")
    assert type(decoder.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    images = decoder.generate(decoder.condition(CAPTIONS[:1]), steps=2, seeds=[0])
    assert images[0].size == (32, 32)


# ------------------------------------------------------------------------------------------------ loss


def sample_media(decoder, modality: str, n: int) -> list:
    rng = np.random.default_rng(0)
    if modality == "image":
        return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]
    if modality == "audio":
        t = np.arange(800) / 8000.0  # 0.1 s at 8 kHz: resampled, then cropped to 0.064 s
        return [Audio(np.sin(2 * math.pi * 440 * (i + 1) * t).astype(np.float32), 8000) for i in range(n)]
    frames = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(6)]
    return [Video(frames=frames, fps=8.0) for _ in range(n)]


@pytest.mark.parametrize("modality", MODALITIES)
def test_denoising_loss_reaches_conditioning_only(decoders, modality):
    decoder = decoders[modality]
    before = state(decoder)
    cond = decoder.condition(CAPTIONS).clone().requires_grad_(True)
    media = sample_media(decoder, modality, 2)
    loss = decoder.denoising_loss(cond, media, seed=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters())
    after = state(decoder)
    assert all(torch.equal(before[k], after[k]) for k in before)
    again = decoder.denoising_loss(cond.detach(), media, seed=0)
    assert torch.allclose(again, loss.detach())


@pytest.mark.parametrize("modality", MODALITIES)
def test_per_row_seeds_make_each_rows_denoising_loss_independent_of_its_batch(decoders, modality):
    """Validation seeds each held-out signal group: scored in one batch, each row draws what it draws alone."""
    decoder = decoders[modality]
    cond = decoder.condition(CAPTIONS)
    media = sample_media(decoder, modality, 2)
    together = decoder.denoising_loss(cond, media, seed=[5, 7])
    alone = [decoder.denoising_loss(cond[i:i + 1], media[i:i + 1], seed=[s]) for i, s in enumerate((5, 7))]
    torch.testing.assert_close(together, torch.stack(alone).mean(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(decoder.denoising_loss(cond, media, seed=[6, 8]), together)  # the seeds are used


def test_audio_conditioning_is_put_on_the_unit_sphere_as_the_unet_saw_it(decoders):
    """AudioLDM's UNet was trained on unit-norm text embeddings (its targets here too): a projection's
    output that is off the sphere by a scale is generated from, and trained through, as its direction."""
    decoder = decoders["audio"]
    cond = decoder.condition(CAPTIONS)
    assert torch.allclose(cond.norm(dim=-1), torch.ones(2), atol=1e-5)
    for a, b in zip(decoder.generate(cond, steps=2, seeds=[5, 6]), decoder.generate(1.7 * cond, steps=2, seeds=[5, 6]),
                    strict=True):
        np.testing.assert_allclose(a.waveform, b.waveform, atol=1e-5)
    media = sample_media(decoder, "audio", 2)
    torch.testing.assert_close(decoder.denoising_loss(0.5 * cond, media, seed=0),
                               decoder.denoising_loss(cond, media, seed=0))


def test_denoising_loss_honours_prediction_type_override():
    decoder = build_entry("image", scheduler_prediction_type="v_prediction")
    assert decoder.scheduler.config.prediction_type == "v_prediction"
    assert decoder.noise_scheduler.config.prediction_type == "v_prediction"
    loss = decoder.denoising_loss(decoder.condition(CAPTIONS[:1]), sample_media(decoder, "image", 1), seed=1)
    assert torch.isfinite(loss)


def test_audio_log_mel_shape(decoders):
    decoder = decoders["audio"]
    mel = decoder.log_mel(sample_media(decoder, "audio", 1)[0])
    assert mel.shape == (decoder.frames, decoder.vocoder.config.model_in_dim) == (64, 16)
    assert torch.isfinite(mel).all() and mel.min() >= math.log(1e-5) - 1e-4


# ------------------------------------------------------------------------------------------------ helper


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_prediction_target(kind):
    from diffusers import DDIMScheduler

    scheduler = training_scheduler(DDIMScheduler(beta_schedule="scaled_linear", prediction_type=kind))
    assert scheduler.config.prediction_type == kind
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 5, 5, generator=gen), torch.randn(3, 4, 5, 5, generator=gen)
    timesteps = torch.tensor([0, 500, 999])
    target = prediction_target(scheduler, latents, noise, timesteps)
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = {
        "epsilon": noise,
        "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * latents,
        "sample": latents,
    }[kind]
    torch.testing.assert_close(target, expected)


def test_prediction_target_rejects_unknown_type():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler()
    scheduler.register_to_config(prediction_type="flow_prediction")
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="flow_prediction"):
        prediction_target(scheduler, x, x, torch.tensor([1]))


def test_text_encoder_from_elsewhere_keeps_its_own_config_when_the_folder_has_none(decoders, tmp_path):
    """A pipeline folder without ``text_encoder/`` and ``text_encoder:`` naming the weights: the weights'
    own config is used (not a default-sized one, which transformers returns for a missing subfolder)."""
    import shutil

    decoder = decoders["image"]
    decoder.pipeline.save_pretrained(tmp_path / "pipe")
    shutil.move(tmp_path / "pipe" / "text_encoder", tmp_path / "weights")
    entry = {k: v for k, v in ENTRIES["image"].items() if k != "tiny"}
    spec = {**entry, "model": str(tmp_path / "pipe"), "text_encoder": str(tmp_path / "weights")}
    loaded = build("decoder", ComponentSpec.parse(spec, "decoders.image"), "decoders.image")
    assert loaded.conditioning_shape == decoder.conditioning_shape
    torch.testing.assert_close(loaded.condition(CAPTIONS), decoder.condition(CAPTIONS))
    for parts in ("config", "denoise"):  # a stage that does not load it still reads its width from the weights
        shape = build("decoder", ComponentSpec.parse(spec, "decoders.image"), "decoders.image", parts=parts)
        assert shape.conditioning_shape == decoder.conditioning_shape


def _saved_pipeline(decoders, modality: str, folder: Path) -> dict:
    decoders[modality].pipeline.save_pretrained(folder)
    return {**{k: v for k, v in ENTRIES[modality].items() if k != "tiny"}, "model": str(folder)}


def _refused(spec: dict, pattern: str, parts: str = "all", where: str = "decoders.image") -> None:
    with pytest.raises(ConfigError, match=pattern):
        build("decoder", ComponentSpec.parse(spec, where), where, parts=parts)


def test_a_pipeline_folder_missing_a_part_is_refused_naming_it(decoders, tmp_path):
    """transformers answers a missing text_encoder/ with a default CLIP config (width 512), so the error
    was 'UNet cross_attention_dim 32 != text encoder width 512'; a missing weights file was a bare OSError."""
    import shutil

    spec = _saved_pipeline(decoders, "image", tmp_path / "pipe")
    shutil.rmtree(tmp_path / "pipe" / "text_encoder")
    for parts in ("config", "conditioning", "all"):
        _refused(spec, r"^decoders\.image\.model: .*pipe has no text_encoder/.*copy the pipeline's", parts)
    spec = _saved_pipeline(decoders, "image", tmp_path / "pipe2")
    for weights in (tmp_path / "pipe2" / "vae").glob("*.safetensors"):
        weights.unlink()
    build("decoder", ComponentSpec.parse(spec, "decoders.image"), "decoders.image", parts="conditioning")  # no VAE read
    _refused(spec, r"^decoders\.image\.model: cannot load the StableDiffusionDecoder parts from .*vae.*\.safetensors")


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_a_tokenizer_without_model_max_length_is_refused_when_built(decoders, modality, tmp_path):
    """Unset, transformers reads model_max_length as 1e30: the conditioning shape was (1e30, D) and the
    first caption an OverflowError."""
    import json

    spec = _saved_pipeline(decoders, modality, tmp_path / "pipe")
    config = tmp_path / "pipe" / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model_max_length"}))
    _refused(spec, rf"^decoders\.{modality}\.model: the pipeline's tokenizer has model_max_length \d+ \(unset.*"
             r"tokenizer/tokenizer_config\.json", "config", f"decoders.{modality}")


def test_parts_that_do_not_fit_together_name_the_decoder(decoders, tmp_path):
    spec = _saved_pipeline(decoders, "image", tmp_path / "pipe")
    unet = tmp_path / "pipe" / "unet" / "config.json"
    unet.write_text(unet.read_text().replace('"cross_attention_dim": 32', '"cross_attention_dim": 48'))
    _refused(spec, r"^decoders\.image\.model: UNet cross_attention_dim 48 != text encoder width 32", "config")


@pytest.mark.parametrize(("kind", "folder_of", "pattern"), [
    ("sd-image", "video", r"is a TextToVideoSDPipeline, and this kind loads a StableDiffusionPipeline: use kind t2v-video"),
    ("sd-image", "audio", r"is a AudioLDMPipeline, and this kind loads a StableDiffusionPipeline: use kind audioldm"),
    ("t2v-video", "image", r"is a StableDiffusionPipeline, and this kind loads a TextToVideoSDPipeline: use kind sd-image"),
    ("audioldm-audio", "image", r"is a StableDiffusionPipeline, .* use kind sd-image"),
])
def test_a_folder_of_another_family_is_refused_naming_its_kind(decoders, kind, folder_of, pattern, tmp_path):
    """diffusers loaded a text-to-video folder into sd-image and an SD folder into t2v-video (warning only),
    which failed at the first denoising step; audioldm-audio on an SD folder was KeyError: 'vocoder'."""
    spec = {**_saved_pipeline(decoders, folder_of, tmp_path / "pipe"), "kind": kind}
    spec = {k: v for k, v in spec.items() if k in ("kind", "model", "steps", "guidance")}
    _refused(spec, rf"^decoders\.x\.model: .*pipe {pattern}", "config", "decoders.x")


def test_a_foreign_unet_class_is_refused(decoders, tmp_path):
    import json

    spec = _saved_pipeline(decoders, "image", tmp_path / "pipe")
    index = tmp_path / "pipe" / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": "MyPipeline",
                                 "unet": ["diffusers", "UNet3DConditionModel"]}))
    _refused(spec, r"\(MyPipeline\) holds a UNet3DConditionModel, but this kind's StableDiffusionPipeline takes a "
                   r"UNet2DConditionModel", "config")


@pytest.mark.parametrize("parts", ["config", "all"])
def test_a_library_a_pipeline_folder_names_is_not_imported_for_it(decoders, tmp_path, monkeypatch, parts):
    """model_index.json ships with the folder: diffusers imports only the libraries it loads parts from, and
    mmllm reading a part's config (a stage that does not load it) must not import another one either."""
    import json

    spec = _saved_pipeline(decoders, "image", tmp_path / "pipe")
    marker = tmp_path / "ran.txt"
    module = f"not_a_diffusion_library_{parts}"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    index["unet"] = [module, "UNet2DConditionModel"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises((ConfigError, ValueError)):
        build("decoder", ComponentSpec.parse(spec, "decoders.image"), "decoders.image", parts=parts)
    assert not marker.exists()
