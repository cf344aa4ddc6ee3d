"""Frozen media encoders, built tiny and random in-process (no download): shapes, freezing, determinism,
audio resampling / down-mixing, and configuration errors.

The tiny options used here are exactly the entries of ``configs/assemblies/_tiny_encoders.yaml``
(``test_tiny_yaml_builds`` keeps them in sync with each encoder's ``tiny_options()``). Per item:

* image ``open-clip`` tiny ViT (32x32, patch 8, width 32, 2 layers): patch 16 x 32, pooled 1 x 16;
* audio ``hf-audio`` (1 s at 16 kHz): clap sequence 16 x 32 / pooled 1 x 24, whisper 50 x 32 / 1 x 32,
  ast 18 x 32 / 1 x 32;
* video ``frames-video``, 4 frames of the tiny ViT pooled: concat 4 x 16, mean 1 x 16.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmllm import registry
from mmllm.config import ComponentSpec, ConfigError
from mmllm.data.media import Audio, Video
from mmllm.encoders.base import EncoderShape, MediaEncoder
from mmllm.encoders.hf_audio import HFAudioEncoder
from mmllm.encoders.open_clip import OpenClipImageEncoder
from mmllm.encoders.video import FramesVideoEncoder

ROOT = Path(__file__).resolve().parents[1]
TINY_YAML = ROOT / "configs" / "assemblies" / "_tiny_encoders.yaml"


def build(kind: str, options: dict[str, Any], where: str = "encoders.x", **kwargs: Any) -> Any:
    return registry.build("encoder", ComponentSpec.parse({"kind": kind, **options}, where), where, **kwargs)


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)),  # non-square: resized + cropped
        Image.new("RGB", (32, 32), (200, 30, 30)),
        Image.new("L", (64, 64), 128),  # grayscale is converted
    ]


def sounds() -> list[Audio]:
    rng = np.random.default_rng(0)
    t = np.arange(int(44100 * 1.5)) / 44100
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 660 * t)], axis=1) * 0.3
    mono_8k = rng.standard_normal(4000).astype(np.float32) * 0.1  # 0.5 s at 8 kHz
    return [Audio(stereo.astype(np.float32), 44100), Audio(mono_8k, 8000)]


def videos() -> list[Video]:
    long = Video([Image.new("RGB", (48, 32), (i * 20, 50, 255 - i * 20)) for i in range(10)], fps=8)
    short = Video([Image.new("RGB", (32, 32), (0, 200, 0)), Image.new("RGB", (32, 32), (0, 0, 200))], fps=2)
    return [long, short]


def assert_frozen(encoder: MediaEncoder) -> None:
    params = list(encoder.parameters())
    assert params and not any(p.requires_grad for p in params)
    encoder.train()  # a parent calling .train() must not wake dropout / batch-norm statistics
    assert not any(m.training for m in encoder.modules())


def check_encoder(encoder: MediaEncoder, items: list[Any]) -> torch.Tensor:
    out = encoder.encode(items)
    assert out.shape == (len(items), encoder.num_tokens, encoder.output_dim)
    assert torch.isfinite(out).all()
    assert torch.equal(out, encoder.encode(items)), "same input must give the same output"
    single = encoder.encode(items[-1:])
    assert torch.allclose(single[0], out[-1], atol=1e-5), "an item's features must not depend on its batch"
    assert_frozen(encoder)
    json.dumps(encoder.describe(), default=str)
    assert encoder.fingerprint() == encoder.fingerprint()
    return out


# ---------------------------------------------------------------------------------------------
# image
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, shape", [("pooled", (1, 16)), ("patch", (16, 32))])
def test_open_clip_tiny(tokens: str, shape: tuple[int, int]) -> None:
    encoder = build("open-clip", OpenClipImageEncoder.tiny_options(tokens=tokens))
    assert encoder.modality == "image"
    assert (encoder.num_tokens, encoder.output_dim) == shape
    assert encoder.preprocess(images()).shape == (3, 3, 32, 32)
    check_encoder(encoder, images())


def test_open_clip_image_size_override_and_checkpoint(tmp_path: Path) -> None:
    options = {**OpenClipImageEncoder.tiny_options(tokens="patch"), "image_size": 48}
    encoder = build("open-clip", options)
    assert encoder.num_tokens == 36 and encoder.preprocess(images()).shape[-2:] == (48, 48)

    # A full open_clip checkpoint file loads strictly into a model_config architecture.
    import open_clip

    from mmllm.encoders.open_clip import _create_clip

    full = _create_clip(OpenClipImageEncoder.Options(**OpenClipImageEncoder.tiny_options()), "")
    torch.save(full.state_dict(), tmp_path / "tiny.pt")
    loaded = build(
        "open-clip", {**OpenClipImageEncoder.tiny_options(), "pretrained": str(tmp_path / "tiny.pt")}
    )
    for name, tensor in full.visual.state_dict().items():
        assert torch.equal(loaded.visual.state_dict()[name], tensor), name
    assert isinstance(full, open_clip.CLIP) and not hasattr(loaded, "transformer")  # text tower dropped


TINY_RESNET = {"embed_dim": 16, "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}


def test_open_clip_errors() -> None:
    with pytest.raises(ConfigError, match="model_name") as info:
        build("open-clip", {"model_name": "ViT-Nope-999"})
    assert "ViT-Nope-999" in str(info.value)
    with pytest.raises(ConfigError, match="pretrained"):
        build("open-clip", {**OpenClipImageEncoder.tiny_options(), "pretrained": "/no/such/file.pt"})
    with pytest.raises(ConfigError, match="model_config"):
        build("open-clip", {"model_config": {"embed_dim": 16, "vision_cfg": {"bogus": 1}, "text_cfg": {}}})
    with pytest.raises(ConfigError, match="model_name"):
        build("open-clip", {"tokens": "patch"})


def test_open_clip_local_dir_without_a_checkpoint_is_refused_not_random(tmp_path: Path) -> None:
    """open_clip builds a `local-dir:` folder holding only open_clip_config.json with random weights and
    ignores `pretrained` beside a local-dir (a root-logger warning each): both would have trained on a
    random tower."""
    import json

    from safetensors.torch import save_file

    from mmllm.encoders.open_clip import TINY_MODEL_CONFIG, _create_clip

    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_MODEL_CONFIG}))
    options = {"model_name": f"local-dir:{tmp_path}", "tokens": "pooled"}
    with pytest.raises(ConfigError, match=r"encoders\.x\.model_name: .* holds no checkpoint .*random weights"):
        build("open-clip", options)
    assert build("open-clip", options, weights=False).output_dim == 16  # shapes need no checkpoint
    full = _create_clip(OpenClipImageEncoder.Options(**OpenClipImageEncoder.tiny_options()), "")
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    loaded = build("open-clip", options)
    for name, tensor in full.visual.state_dict().items():
        assert torch.equal(loaded.visual.state_dict()[name], tensor), name
    with pytest.raises(ConfigError, match=r"encoders\.x\.pretrained: a 'local-dir:' model .* ignores pretrained"):
        build("open-clip", {**options, "pretrained": str(tmp_path / "open_clip_model.safetensors")})


def test_open_clip_patch_tokens_of_a_resnet_tower_are_refused_naming_the_key() -> None:
    resnet = {**TINY_RESNET, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}}
    assert build("open-clip", {"model_config": resnet, "tokens": "pooled"}).num_tokens == 1
    with pytest.raises(ConfigError, match=r"^encoders\.x\.tokens: 'patch' needs .*ModifiedResNet"):
        build("open-clip", {"model_config": resnet, "tokens": "patch"})


# ---------------------------------------------------------------------------------------------
# audio
# ---------------------------------------------------------------------------------------------

AUDIO_SHAPES = {
    ("clap", "pooled"): (1, 24),
    ("clap", "sequence"): (16, 32),
    ("whisper", "pooled"): (1, 32),
    ("whisper", "sequence"): (50, 32),
    ("ast", "pooled"): (1, 32),
    ("ast", "sequence"): (18, 32),
}


@pytest.mark.parametrize("family, tokens", sorted(AUDIO_SHAPES))
def test_hf_audio_tiny(family: str, tokens: str) -> None:
    encoder = build("hf-audio", HFAudioEncoder.tiny_options(family=family, tokens=tokens))
    assert encoder.modality == "audio" and encoder.sampling_rate == 16000
    assert (encoder.num_tokens, encoder.output_dim) == AUDIO_SHAPES[family, tokens]
    batch = encoder.preprocess(sounds())  # 2 channels at 44.1 kHz and mono at 8 kHz in one batch
    assert batch.shape[0] == 2 and batch.dtype == torch.float32
    check_encoder(encoder, sounds())


@pytest.mark.parametrize("family", ["clap", "whisper", "ast"])
def test_hf_audio_downmix_resample_and_trim(family: str) -> None:
    encoder = build("hf-audio", HFAudioEncoder.tiny_options(family=family))
    rng = np.random.default_rng(1)
    mono = (rng.standard_normal(8000) * 0.2).astype(np.float32)
    as_stereo = Audio(np.stack([mono, mono], axis=1), 8000)
    assert torch.allclose(encoder.preprocess([as_stereo]), encoder.preprocess([Audio(mono, 8000)]))
    # the same sound at 16 kHz and at 44.1 kHz gives nearly the same features once resampled
    t = np.arange(16000) / 16000
    tone16 = Audio((0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 16000)
    t = np.arange(44100) / 44100
    tone44 = Audio((0.3 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 44100)
    a, b = encoder.preprocess([tone16]), encoder.preprocess([tone44])
    assert a.shape == b.shape
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    # clips longer than the window are cut to their head, never randomly cropped
    long = Audio((rng.standard_normal(16000 * 3) * 0.1).astype(np.float32), 16000)
    head = Audio(long.waveform[: encoder.max_samples], 16000)
    assert torch.equal(encoder.preprocess([long]), encoder.preprocess([head]))


def test_hf_audio_errors() -> None:
    tiny = HFAudioEncoder.tiny_options(family="clap")
    with pytest.raises(ConfigError, match=r"\bconfig\.not_a_field"):
        build("hf-audio", {**tiny, "config": {**tiny["config"], "not_a_field": 3}})
    with pytest.raises(ConfigError, match=r"feature_extractor\.hop_lenght"):
        build("hf-audio", {**tiny, "feature_extractor": {"hop_lenght": 100}})
    with pytest.raises(ConfigError, match="exactly one of model"):
        build("hf-audio", {**tiny, "model": "laion/clap-htsat-unfused"})
    with pytest.raises(ConfigError, match="not one of"):
        build("hf-audio", {**tiny, "family": "wav2vec"})
    with pytest.raises(ConfigError, match="model: cannot load"):
        build("hf-audio", {"family": "whisper", "model": "/no/such/whisper-dir"})
    whisper = HFAudioEncoder.tiny_options(family="whisper")
    with pytest.raises(ConfigError, match="Whisper encoder takes exactly"):
        build("hf-audio", {**whisper, "feature_extractor": {"feature_size": 8}})


def _save_tiny_checkpoint(family: str, folder: Path, drop: str | None = None) -> dict[str, torch.Tensor]:
    """A tiny random checkpoint laid out like the hub's (whole CLAP / Whisper seq2seq / AST classifier)."""
    from transformers import (
        ASTConfig,
        ASTForAudioClassification,
        ClapConfig,
        ClapModel,
        WhisperConfig,
        WhisperForConditionalGeneration,
    )

    from mmllm.encoders.hf_audio import TINY_CONFIGS

    torch.manual_seed(0)
    if family == "clap":
        text = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
        model = ClapModel(ClapConfig(audio_config=TINY_CONFIGS["clap"], text_config=text, projection_dim=24))
    elif family == "whisper":
        model = WhisperForConditionalGeneration(WhisperConfig(**TINY_CONFIGS["whisper"]))
    else:
        model = ASTForAudioClassification(ASTConfig(**TINY_CONFIGS["ast"]))
    state = {k: v for k, v in model.state_dict().items() if drop is None or drop not in k}
    model.save_pretrained(folder, state_dict=state)
    build("hf-audio", HFAudioEncoder.tiny_options(family=family)).extractor.save_pretrained(folder)
    return model.state_dict()


@pytest.mark.parametrize("family", ["clap", "whisper", "ast"])
def test_hf_audio_from_pretrained_dir(family: str, tmp_path: Path) -> None:
    saved = _save_tiny_checkpoint(family, tmp_path)
    encoder = build("hf-audio", {"family": family, "model": str(tmp_path), "tokens": "sequence"})
    assert (encoder.num_tokens, encoder.output_dim) == AUDIO_SHAPES[family, "sequence"]
    for name, tensor in encoder.tower.model.state_dict().items():  # every kept tensor came from the file
        assert any(k.endswith(name) and torch.equal(v, tensor) for k, v in saved.items()), name
    check_encoder(encoder, sounds())
    with pytest.raises(ConfigError, match="sampling_rate"):
        build("hf-audio", {"family": family, "model": str(tmp_path), "sampling_rate": 22050})


def test_an_unfused_clap_with_a_fusion_extractor_is_refused_when_built(tmp_path: Path) -> None:
    """ClapFeatureExtractor's default truncation is "fusion" (4 mel channels): an unfused tower failed at
    its first encode with a conv shape error; now when built, weights or not, naming the setting."""
    tiny = HFAudioEncoder.tiny_options(family="clap")
    for weights in (True, False):
        with pytest.raises(ConfigError, match=r"gives 4 mel channels \(truncation: fusion\).*truncation to rand_trunc"):
            build("hf-audio", {**tiny, "feature_extractor": {"truncation": "fusion"}}, weights=weights)


def test_hf_audio_folder_of_another_family_is_refused_naming_it(tmp_path: Path) -> None:
    """A Whisper folder under family: ast said only 'lacks 199 tensor(s)' (with weights) or that the
    extractor's shape did not fit (without)."""
    _save_tiny_checkpoint("whisper", tmp_path)
    for weights in (True, False):
        with pytest.raises(ConfigError, match=r"encoders\.x\.model: .* holds a 'whisper' model, not a ast one: "
                                              r"set family: whisper"):
            build("hf-audio", {"family": "ast", "model": str(tmp_path)}, weights=weights)


def test_hf_audio_refuses_missing_weights(tmp_path: Path) -> None:
    _save_tiny_checkpoint("ast", tmp_path, drop="layernorm.weight")
    with pytest.raises(ConfigError, match="lacks .* tensor"):
        build("hf-audio", {"family": "ast", "model": str(tmp_path)})


# ---------------------------------------------------------------------------------------------
# video
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temporal, shape", [("mean", (1, 16)), ("concat", (4, 16))])
def test_frames_video_tiny(temporal: str, shape: tuple[int, int]) -> None:
    encoder = build("frames-video", FramesVideoEncoder.tiny_options(temporal=temporal))
    assert encoder.modality == "video"
    assert (encoder.num_tokens, encoder.output_dim) == shape
    assert encoder.preprocess(videos()).shape == (2, 4, 3, 32, 32)
    out = check_encoder(encoder, videos())
    # frames really go through the image encoder: a still video == its frame's image features
    still = Video([Image.new("RGB", (32, 32), (0, 200, 0))], fps=1)
    image_feats = encoder.image.encode([still.frames[0]])
    assert torch.allclose(encoder.encode([still]), image_feats.repeat(1, shape[0], 1), atol=1e-5)
    assert out.shape[0] == 2


def test_frames_video_errors() -> None:
    with pytest.raises(ConfigError, match=r"\bimage: unknown encoder kind 'open-clap'"):
        build("frames-video", {"image": {"kind": "open-clap"}})
    with pytest.raises(ConfigError, match="needs an image encoder"):
        build("frames-video", {"image": {"kind": "hf-audio", **HFAudioEncoder.tiny_options()}})
    with pytest.raises(ConfigError, match="not one of"):
        build("frames-video", {**FramesVideoEncoder.tiny_options(), "temporal": "attention"})


# ---------------------------------------------------------------------------------------------
# registry and the shipped tiny YAML
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["open-clip", "hf-audio", "frames-video"])
def test_unknown_option_key_is_named(kind: str) -> None:
    with pytest.raises(ConfigError, match=r"encoders\.x\.no_such_option") as info:
        build(kind, {"no_such_option": 1})
    assert "valid keys" in str(info.value)


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ConfigError) as info:
        build("open_clip", {})
    message = str(info.value)
    assert "open_clip" in message
    for kind in ("open-clip", "hf-audio", "frames-video"):
        assert kind in message


def test_tiny_yaml_builds() -> None:
    encoders = yaml.safe_load(TINY_YAML.read_text())["encoders"]
    expected = {
        "image": ("open-clip", OpenClipImageEncoder.tiny_options(), images(), (16, 32)),
        "audio": ("hf-audio", HFAudioEncoder.tiny_options(), sounds(), (16, 32)),
        "video": ("frames-video", FramesVideoEncoder.tiny_options(), videos(), (4, 16)),
    }
    assert set(encoders) == set(expected)
    for modality, (kind, options, items, shape) in expected.items():
        spec = ComponentSpec.parse(encoders[modality], f"encoders.{modality}")
        assert (spec.kind, spec.options) == (kind, options), f"{modality}: YAML and tiny_options() differ"
        encoder = registry.build("encoder", spec, f"encoders.{modality}")
        assert encoder.modality == modality
        assert encoder.encode(items).shape == (len(items), *shape)


# ------------------------------------------------------------------------------------------------ no weights


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("open-clip", OpenClipImageEncoder.tiny_options(tokens="patch")),
        ("open-clip", OpenClipImageEncoder.tiny_options(tokens="pooled")),
        ("hf-audio", HFAudioEncoder.tiny_options(family="clap")),
        ("hf-audio", HFAudioEncoder.tiny_options(family="whisper")),
        ("hf-audio", HFAudioEncoder.tiny_options(family="ast")),
        ("frames-video", FramesVideoEncoder.tiny_options("mean")),
        ("frames-video", FramesVideoEncoder.tiny_options("concat")),
    ],
)
def test_an_encoder_built_without_weights_is_its_shape(kind: str, options: dict[str, Any]) -> None:
    """What a stage that never runs an encoder holds: shapes and description, no parameters."""
    full, shape = build(kind, options), build(kind, options, weights=False)
    assert isinstance(shape, EncoderShape) and not list(shape.parameters())
    assert (shape.modality, shape.num_tokens, shape.output_dim) == (full.modality, full.num_tokens, full.output_dim)
    assert shape.describe() == full.describe()
    with pytest.raises(RuntimeError, match="holds no weights"):
        shape.encode([])


@pytest.mark.parametrize("family", ["clap", "whisper", "ast"])
def test_an_audio_encoder_without_weights_reads_none(family: str, tmp_path: Path) -> None:
    _save_tiny_checkpoint(family, tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")  # reading them would fail
    spec = {"family": family, "model": str(tmp_path), "tokens": "sequence"}
    shape = build("hf-audio", spec, weights=False)
    assert (shape.num_tokens, shape.output_dim) == AUDIO_SHAPES[family, "sequence"]
    with pytest.raises(ConfigError):
        build("hf-audio", spec)


def test_an_open_clip_encoder_without_weights_reads_no_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "tiny.pt").write_bytes(b"not a checkpoint")
    options = {**OpenClipImageEncoder.tiny_options(tokens="patch"), "pretrained": str(tmp_path / "tiny.pt")}
    random = build("open-clip", OpenClipImageEncoder.tiny_options(tokens="patch"))
    shape = build("open-clip", options, weights=False)
    assert (shape.num_tokens, shape.output_dim) == (random.num_tokens, random.output_dim)
    with pytest.raises(ConfigError, match="pretrained"):
        build("open-clip", options)


@pytest.mark.parametrize("raised, refused", [
    (AttributeError("'NoneType' object has no attribute 'visual'"), False),  # a bug of open_clip or mmllm
    (FileNotFoundError("tiny.pt"), True),  # what the config names is missing
    (RuntimeError("Model config for tiny-vitt not found."), True),  # an unknown name
    # a package this environment lacks for the model: installing it fixes it (was exit 70, a traceback)
    (ModuleNotFoundError("No module named 'timm'", name="timm"), True),
    (ImportError("cannot import name 'x' from 'mmllm.encoders'", name="mmllm.encoders"), False),  # mmllm's own
])
def test_open_clip_failing_is_a_config_error_only_where_the_config_is_wrong(raised, refused, monkeypatch) -> None:
    """Any exception open_clip raised became "open_clip could not build ...": exit 2, one line, the user told to
    fix a config that was right, for a fault of open_clip or mmllm (exit 70 and its traceback)."""
    import open_clip

    def create_model(*args, **kwargs):
        raise raised

    monkeypatch.setattr(open_clip, "create_model", create_model)
    for options in (OpenClipImageEncoder.tiny_options(), {"model_name": "ViT-B-32", "pretrained": "tiny.pt"}):
        if refused:
            with pytest.raises(ConfigError, match="open_clip could not build") as err:
                build("open-clip", options)
            assert err.value.__cause__ is raised
        else:
            with pytest.raises(type(raised)) as err:
                build("open-clip", options)
            assert err.value is raised


def test_hf_audio_failing_to_load_is_a_config_error_only_where_the_input_is_wrong(tmp_path, monkeypatch) -> None:
    from mmllm.encoders import hf_audio

    _save_tiny_checkpoint("whisper", tmp_path)
    spec = {"family": "whisper", "model": str(tmp_path)}
    bug = TypeError("load() got an unexpected keyword argument 'dtype'")  # a library's API changed under mmllm

    def load(cls, name, trust_remote_code):
        raise bug

    monkeypatch.setattr(hf_audio._WhisperTower, "load", classmethod(load))
    with pytest.raises(TypeError) as err:
        build("hf-audio", spec)
    assert err.value is bug
    monkeypatch.undo()
    # a config value of the wrong type: huggingface_hub's strict-dataclass error (no ValueError), still the config's
    tiny = HFAudioEncoder.tiny_options(family="whisper")
    with pytest.raises(ConfigError, match=r"config: invalid WhisperConfig: .*d_model"):
        build("hf-audio", {**tiny, "config": {**tiny["config"], "d_model": "wide"}})


def test_out_of_memory_while_a_part_loads_is_not_called_a_config_error() -> None:
    from mmllm.part_errors import names_something_wrong

    try:
        torch.empty(2**50, dtype=torch.uint8)  # torch's CPU allocator: a RuntimeError, as a bad checkpoint's
    except RuntimeError as exc:
        assert not names_something_wrong(exc)
    assert not names_something_wrong(torch.OutOfMemoryError("CUDA out of memory."))
    assert names_something_wrong(RuntimeError("Error(s) in loading state_dict: size mismatch"))
    assert names_something_wrong(OSError("not found")) and not names_something_wrong(NameError("x"))
    from safetensors import SafetensorError

    assert names_something_wrong(SafetensorError("Error while deserializing header: header too large"))
    assert names_something_wrong(TypeError("unexpected keyword"), TypeError) and not names_something_wrong(
        TypeError("unexpected keyword"))


def test_sizes_of_a_parts_own_architecture_that_do_not_fit_are_the_configs_error(tmp_path) -> None:
    """A part built from the architecture its config spells out (open_clip's model_config, hf-audio's config):
    a size of 0 (ZeroDivisionError in open_clip) or per-layer lists of different lengths (IndexError in
    transformers) exited 70 with a traceback blaming mmllm, for a config the user has to fix."""
    image = OpenClipImageEncoder.tiny_options()
    image["model_config"] = {**image["model_config"], "vision_cfg": {**image["model_config"]["vision_cfg"],
                                                                     "patch_size": 0}}
    with pytest.raises(ConfigError, match=r"model_config: open_clip could not build it: .*division .*none of them 0"):
        build("open-clip", image)
    audio = HFAudioEncoder.tiny_options(family="clap")
    audio["config"] = {**audio["config"], "depths": [1, 1, 1], "num_attention_heads": [2, 2]}
    with pytest.raises(ConfigError, match=r"config: transformers cannot build ClapAudioConfig's model from it: "
                                          r"list index out of range \(check that its sizes fit together\)"):
        build("hf-audio", audio)


def test_an_empty_or_foreign_open_clip_checkpoint_is_named_with_what_went_wrong(tmp_path) -> None:
    """An empty checkpoint file ended the message with nothing ("... into model_config: "), a text file with "101"
    (torch.load's EOFError, KeyError): the error's kind says what those are."""
    empty, text = tmp_path / "empty.pt", tmp_path / "notes.pt"
    empty.write_bytes(b"")
    text.write_text("hello\n")
    for path, kind in ((empty, "EOFError"), (text, "KeyError: ")):
        options = {**OpenClipImageEncoder.tiny_options(), "pretrained": str(path)}
        with pytest.raises(ConfigError) as err:
            build("open-clip", options)
        assert f"cannot load {str(path)!r} into model_config: {kind}" in str(err.value), err.value
        assert "damaged, truncated or of another kind" in str(err.value)
