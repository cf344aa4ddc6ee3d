"""`cache.require`: a stage whose feature cache holds everything it reads does not hold the frozen parts
the cache replaces, trains exactly as with them, and refuses an incomplete cache before training."""

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from mmllm.config import ConfigError
from mmllm.data.cache_build import build_cache
from mmllm.data.dataset import SampleError, StageDataset, load_stage_records
from mmllm.data.precomputed import open_precomputed
from mmllm.decoders.audioldm import AudioLDMDecoder
from mmllm.decoders.sd_image import StableDiffusionDecoder
from mmllm.decoders.text_to_video import TextToVideoDecoder
from mmllm.encoders.base import EncoderShape
from mmllm.model import AnyToAnyModel
from mmllm.training.loop import build_model, token_spec, train
from mmllm.training.parts import release_cached
from tests.test_cache import cfg_for, data  # noqa: F401  (the `data` fixture: a private copy of the samples)

STEPS = ["max_steps=3", "batch_size=4", "save_every=0"]


def held(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def records(cfg):
    return [c for convs in load_stage_records(cfg.data, cfg.stage)[0] for c in convs]


@pytest.mark.parametrize("stage,losses,freed", [
    ("encode-align", [], "encoders.audio, encoders.image, encoders.video"),
    ("decode-align", [], "decoders.audio, decoders.image, decoders.video"),
    # MSE targets from the cache, the denoising loss through the decoders kept without their text encoders
    ("decode-align", ["losses.denoise=0.5"], "decoders.audio, decoders.image, decoders.video"),
])
def test_require_frees_what_the_cache_replaces_and_trains_the_same(stage, losses, freed, data, tmp_path,  # noqa: F811
                                                                   caplog, monkeypatch):
    denoised = []  # the parts each decoder held when its denoising loss ran
    for family in (StableDiffusionDecoder, AudioLDMDecoder, TextToVideoDecoder):
        def spy(self, *args, _run=family.denoising_loss, **kwargs):
            denoised.append((self.modality, self.parts))
            return _run(self, *args, **kwargs)
        monkeypatch.setattr(family, "denoising_loss", spy)
    cache = tmp_path / "cache"
    cfg = cfg_for(stage, data, cache, *STEPS, *losses)
    build_cache(cfg, build_model(cfg))
    plain = train(cfg)
    plain_denoised, denoised[:] = set(denoised), []
    with caplog.at_level(logging.INFO, logger="mmllm.training.parts"):
        required = train(cfg_for(stage, data, cache, *STEPS, *losses, "cache.require=true",
                                 f"output_dir={tmp_path / 'req'}"))
    assert f"not holding {freed}" in caplog.text.replace(" text encoder", "")
    assert required.losses == plain.losses and required.skipped == plain.skipped == 0
    if losses:
        assert plain_denoised == {(m, "all") for m in ("image", "audio", "video")}
        assert set(denoised) == {(m, "denoise") for m in ("image", "audio", "video")}
    else:
        assert not plain_denoised and not denoised


def test_release_frees_the_text_side_and_keeps_what_the_denoising_loss_runs(tiny_assembly, data,  # noqa: F811
                                                                            tmp_path):
    cfg = cfg_for("decode-align", data, tmp_path / "cache")
    model = AnyToAnyModel.assemble(tiny_assembly, {"image": "all", "audio": "conditioning", "video": "conditioning"},
                                   encoder_weights=["image"])
    build_cache(cfg, model)
    pre = open_precomputed(cfg, model)
    before = held(model)
    text_encoders = {m: sum(p.numel() for p in d.text_encoder.parameters()) for m, d in model.decoders.items()}
    assert release_cached(model, pre, records(cfg)) == ["decoders.audio", "decoders.image", "decoders.video"]
    image = model.decoders["image"]
    assert image.parts == "denoise" and image.text_encoder is None
    assert image.unet is not None and image.vae is not None  # what denoising_loss runs
    for m in ("audio", "video"):
        assert model.decoders[m].parts == "config" and model.decoders[m].text_encoder is None
        assert model.decoders[m].conditioning_shape == tuple(pre.conditioning_shapes[m])  # sizes stay
    assert before - held(model) == sum(text_encoders.values())
    assert pre.required == {"condition/audio", "condition/image", "condition/video"}
    assert isinstance(model.encoders["audio"], EncoderShape)  # no sample gives input: never loaded


def test_require_refuses_an_incomplete_cache_before_training(data, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    cfg = cfg_for("encode-align", data, cache, *STEPS, "cache.require=true")
    build_cache(cfg, build_model(cfg))
    Image.new("RGB", (32, 32), (10, 200, 10)).save(data / "media/new.png")
    with open(data / "pairs.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "new", "modality": "image", "media": "media/new.png", "caption": "new"}) + "\n")
    with pytest.raises(ConfigError, match=r"encoder/image: 1 of 9 not found \(`mmllm cache .*` adds them\), e.g. "
                                          r".*new\.png"):
        train(cfg)
    assert not list((tmp_path / "out").glob("step-*"))
    build_cache(cfg, build_model(cfg))  # what `mmllm cache` does: adds the missing one
    assert train(cfg).skipped == 0
    with pytest.raises(ConfigError, match="cache.dir is not set"):
        train(cfg_for("encode-align", data, "null", *STEPS, "cache.require=true", f"output_dir={tmp_path / 'b'}"))
    with pytest.raises(ConfigError, match="holds no feature cache yet; run `mmllm cache"):
        train(cfg_for("encode-align", data, tmp_path / "never-built", *STEPS, "cache.require=true",
                      f"output_dir={tmp_path / 'c'}"))


def test_what_training_skips_anyway_does_not_fail_the_check(data, tmp_path, caplog):  # noqa: F811
    # a file that cannot be decoded is in no cache (`mmllm cache` reports it) and its samples are skipped
    cache = tmp_path / "cache"
    cfg = cfg_for("encode-align", data, cache, *STEPS, "batch_size=20", "cache.require=true")
    (data / "media/broken.png").write_bytes(b"not a png")
    with open(data / "pairs.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "broken", "modality": "image", "media": "media/broken.png", "caption": "x"}) + "\n")
    (failed,) = build_cache(cfg, build_model(cfg)).failed
    assert failed.startswith(f"{data / 'media/broken.png'} (referenced at {data / 'pairs.jsonl'}:")
    with caplog.at_level(logging.WARNING):
        result = train(cfg)
    assert "1 media file(s) cannot be read" in caplog.text and result.skipped >= 1


def test_only_what_can_be_freed_is_checked(data, tmp_path, caplog):  # noqa: F811
    # decode-align on image captions only: the audio and video decoders hold their configs alone
    (data / "pairs.jsonl").write_text("".join(
        line + "\n" for line in (data / "pairs.jsonl").read_text().splitlines() if '"image"' in line))
    cache = tmp_path / "cache"
    cfg = cfg_for("decode-align", data, cache, *STEPS, "cache.require=true")
    build_cache(cfg, build_model(cfg))
    with caplog.at_level(logging.INFO, logger="mmllm.training.parts"):
        train(cfg)
    assert "all 8 image targets this stage reads; not holding decoders.image text encoder" in caplog.text
    # targets not read from the cache are not required from it: the text encoder stays and computes them
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mmllm.training.parts"):
        with pytest.raises(ConfigError, match="nothing this stage holds can come from precomputed sources"):
            train(cfg_for("decode-align", data, cache, *STEPS, "cache.require=true", "cache.targets=false",
                          f"output_dir={tmp_path / 'b'}"))


def test_a_file_changed_after_the_check_is_its_samples_error(tiny_assembly, data, tmp_path):  # noqa: F811
    cfg = cfg_for("encode-align", data, tmp_path / "cache", "cache.require=true")
    model = AnyToAnyModel.assemble(tiny_assembly, "config")
    build_cache(cfg, model)
    pre = open_precomputed(cfg, model)
    release_cached(model, pre, records(cfg))
    assert all(isinstance(e, EncoderShape) for e in model.encoders.values())
    convs = records(cfg)
    ds = StageDataset(convs, model.llm.tokenizer, token_spec(model), {m: e.preprocess for m, e in model.encoders.items()},
                      precomputed=pre)
    index = next(i for i, c in enumerate(convs) if c.id == "img-red_circle")
    assert not isinstance(ds[index], SampleError)
    Image.new("RGB", (32, 32), (0, 0, 0)).save(data / "media/red_circle.png")
    got = ds[index]
    assert isinstance(got, SampleError) and "not in the feature cache" in got.error and "mmllm cache" in got.error
    with pytest.raises(RuntimeError, match="holds no weights, so it cannot encode media: the feature cache held"):
        model.encoders["image"](None)


def test_embedding_files_alone_can_cover_the_targets(tiny_assembly, tmp_path):
    from tests.test_data_stage import _npy_generation

    model = AnyToAnyModel.assemble(tiny_assembly, "conditioning")
    shape = model.decoders["image"].conditioning_shape
    path, embed, _ = _npy_generation(tmp_path, shape, shape)
    cfg = cfg_for("decode-align", tmp_path, "null", "cache.require=true",
                  f"data=[{{path: {path}, format: nextgpt-pairs, embeddings: {embed}}}]")
    pre = open_precomputed(cfg, model)
    assert release_cached(model, pre, records(cfg)) == ["decoders.image"]
    assert model.decoders["image"].parts == "config" and model.decoders["audio"].parts == "conditioning"
    # the check reads headers only: values that turn bad are the sample's error, saying what is wrong
    np.save(embed / "a.png.npy", np.full(shape, np.nan, dtype=np.float32))
    convs = records(cfg)
    ds = StageDataset(convs, model.llm.tokenizer, token_spec(model), {}, precomputed=pre)
    got = [ds[i] for i in range(len(ds))]
    bad = [g for g in got if isinstance(g, SampleError)]
    assert len(bad) == 1 and "a.png.npy holds NaN or infinite values" in bad[0].error

    (embed / "b.png.npy").write_bytes(b"")  # an empty file: unreadable, named, and not a crash
    model = AnyToAnyModel.assemble(tiny_assembly, "conditioning")
    with pytest.raises(ConfigError, match=r"condition/image: 1 of 2 not found \(only the data's embedding files "
                                          r"can hold them.*b\.png\.npy: No data left"):
        release_cached(model, open_precomputed(cfg, model), records(cfg))
    assert model.decoders["image"].parts == "conditioning"  # nothing freed when the check fails


def test_processes_check_their_shares_and_add_up_to_the_whole(tiny_assembly, data, tmp_path):  # noqa: F811
    from mmllm.data.precomputed import Coverage

    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    model = AnyToAnyModel.assemble(tiny_assembly, "config")
    build_cache(cfg, model)
    (data / "media/red_circle.png").write_bytes(b"not a png")  # unreadable
    Image.new("RGB", (32, 32), (0, 0, 0)).save(data / "media/blue_circle.png")  # changed: not in the cache
    pre, convs = open_precomputed(cfg, model), records(cfg)
    parts = ["encoder/audio", "encoder/image", "encoder/video"]
    whole = pre.coverage(convs, parts)
    shares = [pre.coverage(convs, parts, rank, 3) for rank in range(3)]
    assert all(sum(s.total.values()) < sum(whole.total.values()) for s in shares)
    merged = Coverage.merged(shares)
    assert merged.total == whole.total == {"encoder/image": 7, "encoder/audio": 3, "encoder/video": 8}
    assert sorted(merged.missing["encoder/image"]) == whole.missing["encoder/image"] == [
        str(data / "media/blue_circle.png")]
    assert len(merged.unreadable) == len(whole.unreadable) == 1
    assert re.match(rf"{re.escape(str(data / 'media/red_circle.png'))} \(referenced at .+\.jsonl:\d+\): ",
                    whole.unreadable[0]), whole.unreadable[0]
