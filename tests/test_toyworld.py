"""The toy world: determinism, held-out combinations, renderers, captions, and every part family
(judge, encoder, VAE, decoder) built tiny, trained one step, exported and reloaded through the registry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from mmllm.config import ComponentSpec, read_yaml
from mmllm.registry import parse_options
from mmllm.toyworld import parts as P
from mmllm.toyworld import recipes
from mmllm.toyworld.diffusion import DecoderRecipe, DecoderSetup, VAERecipe, VAESetup
from mmllm.toyworld.judges import Judge, JudgeConfig, log_mel
from mmllm.toyworld.training import Optim, train
from mmllm.toyworld.world import MODALITIES, SPECS, Sampler, World, evaluation_items

REPO = Path(__file__).resolve().parent.parent
TINY_VIT = P.ViTConfig(patch_size=8, width=32, layers=1, head_width=16)
TINY_CLAP = P.ClapConfig(depths=[1, 1], num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32)
TINY_VAE = {"channels": [8, 16, 16], "norm_groups": 4}  # latents: image 8x8, audio 16x16
TINY_UNET = P.UNetConfig(channels=[16, 32], attention=[True, False], heads=2, norm_groups=4, sample_size=8)
ONE_STEP = Optim(steps=1, batch_size=4, lr=1e-3, warmup=1)


def as_array(media) -> np.ndarray:
    if hasattr(media, "frames"):
        return np.stack([np.asarray(f) for f in media.frames])
    if hasattr(media, "waveform"):
        return media.waveform
    return np.asarray(media)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> recipes.Context:
    from mmllm.toyworld.text import MiniLMText

    out = tmp_path_factory.mktemp("toy-parts")
    return recipes.Context(World(), out, MiniLMText, eval_per_combo=1, precompute=False)


# ------------------------------------------------------------------------------------------ the world


@pytest.mark.parametrize("modality", MODALITIES)
def test_items_are_deterministic(world, modality):
    a = Sampler(world, modality, seed=3).batch(5, 3)
    b = Sampler(world, modality, seed=3).batch(5, 3)
    c = Sampler(world, modality, seed=4).batch(5, 3)
    assert [i.caption for i in a] == [i.caption for i in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(as_array(x.media), as_array(y.media))
    assert [i.combo for i in a] != [i.combo for i in c] or any(
        not np.array_equal(as_array(x.media), as_array(y.media)) for x, y in zip(a, c)
    )


@pytest.mark.parametrize("modality", MODALITIES)
def test_held_out_combinations_never_drawn_for_training(world, modality):
    spec = SPECS[modality]
    held = set(world.combos(modality, "held_out"))
    train_combos = set(world.combos(modality, "train"))
    assert held and not held & train_combos
    assert held | train_combos == set(world.combos(modality, "all"))
    for pattern in spec.held_out:  # each pattern removes something, and nothing else
        assert any(all(dict(zip(spec.names, c))[k] == v for k, v in pattern.items()) for c in held)
    for attr in spec.attributes:  # compositional: every value is still seen in training
        assert {c[spec.names.index(attr.name)] for c in train_combos} == set(attr.values)
    sampler = Sampler(world, modality, "train", seed=0)
    drawn = {i.combo for b in range(40) for i in sampler.batch(b, 16, media=False)}
    assert drawn and not drawn & held
    unique = sampler.batch(0, len(train_combos), unique=True, media=False)
    assert len({i.combo for i in unique}) == len(train_combos)


def test_finite_variants_repeat_renderings_not_captions(world):
    sampler = Sampler(world, "image", "train", seed=1, variants=2)
    items = [i for b in range(30) for i in sampler.batch(b, 16, media=False)]
    seeds: dict = {}
    for item in items:
        seeds.setdefault(item.combo, set()).add(item.seed)
    assert max(len(s) for s in seeds.values()) == 2
    assert len({i.caption for i in items}) > len(seeds)  # paraphrases still vary per draw


def test_renderers_shapes_rates_and_frames(world):
    image = world.render("image", world.attributes_of("image", world.combos("image")[0]), 0)
    assert image.mode == "RGB" and image.size == (32, 32)
    audio = world.render("audio", world.attributes_of("audio", world.combos("audio")[0]), 0)
    assert audio.sample_rate == 16000 and audio.waveform.shape == (16384, 1)
    assert audio.waveform.dtype == np.float32 and np.abs(audio.waveform).max() <= 1.0
    video = world.render("video", world.attributes_of("video", world.combos("video")[0]), 0)
    assert len(video.frames) == 8 and video.fps == 8.0
    assert all(f.size == (32, 32) and f.mode == "RGB" for f in video.frames)


def test_video_moves_in_its_direction(world):
    for direction, (axis, sign) in {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}.items():
        video = world.render("video", {"colour": "blue", "shape": "square", "direction": direction}, 1)
        centres = []
        for frame in (video.frames[0], video.frames[-1]):
            blue = np.asarray(frame).astype(int)
            mask = (blue[..., 2] > 150) & (blue[..., 0] < 100)
            centres.append(np.argwhere(mask).mean(axis=0))
        assert sign * (centres[1][axis] - centres[0][axis]) > 8, direction


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_paraphrase_parses_back(world, modality):
    for combo in world.combos(modality):
        attributes = world.attributes_of(modality, combo)
        captions = world.all_captions(modality, attributes)
        assert len(captions) >= len(SPECS[modality].templates)
        assert captions[0] == world.caption(modality, attributes)
        for caption in captions:
            assert world.parse(modality, caption) == attributes, caption
    with pytest.raises(ValueError, match="missing"):
        world.parse(modality, "nothing to see here")


def test_log_mel_is_the_audio_decoders_own(world, ctx):
    from mmllm.decoders.audioldm import AudioLDMDecoder
    from mmllm.toyworld.vocoder import GriffinLimVocoder

    clip = world.render("audio", {"pitch": "high", "timbre": "bright", "rhythm": "double"}, 2)
    decoder = AudioLDMDecoder.__new__(AudioLDMDecoder)  # log_mel only reads these four fields
    decoder.sampling_rate, decoder.hop_length, decoder.mel_bins, decoder.frames = 16000, 256, 64, 64
    mine = log_mel(torch.from_numpy(clip.mono())[None])[0, 0]
    torch.testing.assert_close(mine, decoder.log_mel(clip), atol=1e-4, rtol=1e-4)
    wave = GriffinLimVocoder(n_iter=16)(mine[None])
    assert wave.shape == (1, 16384)
    assert (log_mel(wave)[0, 0] - mine).abs().mean() < 0.8  # Griffin-Lim keeps the magnitudes


# ------------------------------------------------------------------------------------------ the parts


def test_judge_trains_resumes_exactly_and_reloads(ctx, tmp_path):
    setup = recipes.JudgeSetup(
        "image", JudgeConfig("image", channels=[8, 16], hidden=32), Optim(2, 4, 1e-3, 1)
    )
    straight = recipes.JudgeRecipe(setup, ctx, "judge-image")
    train(straight, tmp_path / "a.pt", progress=False)
    resumed = recipes.JudgeRecipe(setup, ctx, "judge-image")
    train(resumed, tmp_path / "b.pt", max_steps=1, save_every=1, progress=False)
    resumed = recipes.JudgeRecipe(setup, ctx, "judge-image")
    train(resumed, tmp_path / "b.pt", resume=True, progress=False)
    for (name, x), y in zip(straight.judge.state_dict().items(), resumed.judge.state_dict().values()):
        torch.testing.assert_close(x, y, msg=name)
    info = straight.export(tmp_path / "judge-image")
    assert set(info["metrics"]["true_media"]) == {"train", "held_out"}
    judge = Judge.load(tmp_path / "judge-image")
    assert set(judge.predict([ctx.world.render("image", dict(zip(SPECS["image"].names, c)), 0)
                              for c in ctx.world.combos("image")[:2]])[0]) == set(SPECS["image"].names)


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_other_judges_build_and_step(ctx, modality, tmp_path):
    setup = recipes.JudgeSetup(modality, JudgeConfig(modality, channels=[8, 16], hidden=32), ONE_STEP)
    if modality == "audio":  # every clip through the Griffin-Lim round trip, features cached per rendering
        setup.griffin_lim_fraction, setup.variants = 1.0, 2
    recipe = recipes.JudgeRecipe(setup, ctx, f"judge-{modality}")
    result = train(recipe, tmp_path / "s.pt", progress=False)
    assert result.steps == 1 and np.isfinite(result.losses[0])


@pytest.mark.parametrize("modality", MODALITIES)
def test_encoder_steps_exports_and_reloads_through_registry(ctx, modality):
    setup = recipes.EncoderSetup(
        modality, ONE_STEP, vit=None if modality == "audio" else TINY_VIT, clap=TINY_CLAP if modality == "audio" else None,
        probe_items=8,
    )
    recipe = recipes.EncoderRecipe(setup, ctx, f"encoder-{modality}")
    before = [p.detach().clone() for p in recipe.tower.parameters()]
    train(recipe, ctx.out / ".state" / f"encoder-{modality}.pt", progress=False)
    assert any(not torch.equal(a, b) for a, b in zip(before, recipe.tower.parameters()))
    info = recipe.export(ctx.out / f"encoder-{modality}")
    assert info["registry_entry"]["kind"] == {"image": "open-clip", "audio": "hf-audio", "video": "frames-video"}[modality]
    loaded = P.build_part("encoder", info["registry_entry"], "encoders.x")
    assert (loaded.num_tokens, loaded.output_dim) == (1, 384)
    items = evaluation_items(ctx.world, modality, "train", 1, 0)[:3]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode([i.media for i in items]), recipe.encoder.encode([i.media for i in items]), atol=1e-5, rtol=1e-4
        )
    assert 0.0 <= info["metrics"]["retrieval"]["train"]["top1"] <= 1.0


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_vae_steps_and_exports(ctx, modality):
    vae = P.VAEConfig(in_channels=3 if modality == "image" else 1, sample_size=32 if modality == "image" else 64, **TINY_VAE)
    recipe = VAERecipe(VAESetup(modality, vae, ONE_STEP, probe_items=8), ctx, f"vae-{modality}")
    train(recipe, ctx.out / ".state" / f"vae-{modality}.pt", progress=False)
    info = recipe.export(ctx.out / f"vae-{modality}")
    assert info["metrics"]["scaling_factor"] > 0
    assert (ctx.out / f"vae-{modality}" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("modality", MODALITIES)
def test_decoder_steps_exports_and_reloads_through_registry(ctx, modality):
    vae_name = "vae-audio" if modality == "audio" else "vae-image"
    if not (ctx.out / vae_name / "config.json").is_file():
        test_vae_steps_and_exports(ctx, vae_name.split("-")[1])
    unet = dataclasses.replace(TINY_UNET, sample_size=16 if modality == "audio" else 8)
    recipe = DecoderRecipe(DecoderSetup(modality, unet, ONE_STEP), ctx, f"decoder-{modality}", ctx.out / vae_name)
    train(recipe, ctx.out / ".state" / f"decoder-{modality}.pt", progress=False)
    info = recipe.export(ctx.out / f"decoder-{modality}")  # asserts the reloaded decoder conditions alike
    assert info["conditioning_shape"] == ([1, 384] if modality == "audio" else [24, 384])
    folder = ctx.out / f"decoder-{modality}"
    assert not (folder / "text_encoder" / "model.safetensors").exists()  # MiniLM's weights are not copied
    decoder = P.build_part("decoder", info["registry_entry"], "decoders.x")
    out = decoder.generate(decoder.condition(["a red circle"]), steps=1, seeds=[0])
    if modality == "image":
        assert out[0].size == (32, 32)
    elif modality == "audio":
        assert out[0].sample_rate == 16000 and out[0].waveform.shape[0] == 16384
    else:
        assert len(out[0].frames) == 8 and out[0].frames[0].size == (32, 32)


def test_video_decoder_starts_from_the_image_unet(ctx):
    if not (ctx.out / "decoder-image" / "unet").is_dir():
        test_decoder_steps_exports_and_reloads_through_registry(ctx, "image")
    setup = DecoderSetup("video", TINY_UNET, ONE_STEP, init_from_image=True)
    recipe = DecoderRecipe(setup, ctx, "decoder-video", ctx.out / "vae-image")
    from diffusers import UNet2DConditionModel

    image = UNet2DConditionModel.from_pretrained(ctx.out / "decoder-image" / "unet").state_dict()
    video = recipe.unet.state_dict()
    for key in ("conv_in.weight", "down_blocks.0.attentions.0.proj_in.weight", "mid_block.resnets.0.conv1.weight"):
        torch.testing.assert_close(video[key].flatten(), image[key].flatten().float())


def test_shipped_entries_parse_against_their_kinds():
    data = read_yaml(REPO / "configs" / "assemblies" / "default.yaml")
    generated = P.assembly_entries(Path("/weights"))
    for table, section in (("encoder", "encoders"), ("decoder", "decoders")):
        for modality, entry in data[section].items():
            parse_options(table, ComponentSpec.parse(entry, f"{section}.{modality}"), f"{section}.{modality}")
            assert entry["kind"] == generated[section][modality]["kind"]
            assert set(entry) == set(generated[section][modality]), f"{section}.{modality}"


def test_part_selection_and_order():
    parts = recipes.default_parts()
    assert [p.name for p in recipes.select("decoders", parts)] == [
        "vae-image", "vae-audio", "decoder-image", "decoder-audio", "decoder-video"
    ]
    assert [p.name for p in recipes.select("judge-video,image", parts)] == [
        "judge-image", "judge-video", "encoder-image", "vae-image", "decoder-image"
    ]
    with pytest.raises(ValueError, match="unknown part"):
        recipes.select("encoder-smell", parts)
