"""The feature cache on the tiny assembly: what `mmllm cache` writes is what training reads (hit, same
loss); what is not there is computed (miss), also inside a batch that mixes both; a cache made by a
different component is never used (stale, with a warning); a damaged cache is recomputed or refused."""

import copy
import json
import logging
import shutil
import time

import pytest
import torch
from PIL import Image

from mmllm.cli import main
from mmllm.config import load_stage
from mmllm.data.cache import CacheError, FeatureCache
from mmllm.data.cache_build import build_cache
from mmllm.data.dataset import StageDataset, collate, load_stage_records
from mmllm.data.fingerprint import decoder_fingerprint, encoder_fingerprint
from mmllm.data.precomputed import open_precomputed
from mmllm.model import AnyToAnyModel
from mmllm.training.loop import token_spec
from tests.conftest import REPO

STAGE_FILES = {"encode-align": "encode_align", "decode-align": "decode_align"}


@pytest.fixture(scope="module")
def model(tiny_assembly):
    return AnyToAnyModel.assemble(tiny_assembly)


@pytest.fixture
def data(sample_data, tmp_path):
    """A private copy of the sample pairs and media (tests change files)."""
    root = tmp_path / "data"
    shutil.copytree(sample_data["pairs"].parent / "media", root / "media")
    shutil.copy(sample_data["pairs"], root / "pairs.jsonl")
    return root


def cfg_for(stage, data, cache, *extra):
    return load_stage(REPO / "configs/stages/tiny" / f"{STAGE_FILES[stage]}.yaml", [
        f"output_dir={data.parent / 'out'}", "report_to=none", "init_from=null", f"cache.dir={cache}",
        f"data=[{{path: {data / 'pairs.jsonl'}, format: mmllm-pairs}}]", *extra])


def batch_of(cfg, model, precomputed):
    (convs,), _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(convs, model.llm.tokenizer, token_spec(model), pre, precomputed=precomputed)
    return collate([ds[i] for i in range(len(ds))], model.llm.tokenizer.pad_token_id)


def loss(model, batch, cfg):
    with torch.no_grad():
        return {k: float(v) for k, v in model(batch, cfg.losses).items()}


def test_hit_encoder_features_skip_the_encoder_and_give_the_same_loss(model, data, tmp_path):
    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    report = build_cache(cfg, model)
    assert dict(report.computed) == {"encoder/image": 8, "encoder/video": 8, "encoder/audio": 3}
    again = build_cache(cfg, model)  # incremental: nothing left to compute
    assert not again.computed and sum(again.present.values()) == 19
    assert not list((tmp_path / "cache").glob("*.tmp")) and not list((tmp_path / "cache").glob(".*.tmp"))

    pre = open_precomputed(cfg, model)
    cached = batch_of(cfg, model, pre)
    assert cached["media"] == {} and set(cached["media_features"]) == {"image", "audio", "video"}
    assert pre.stats() == {"encoder/audio/hit": 3, "encoder/image/hit": 8, "encoder/video/hit": 8}
    plain = batch_of(cfg, model, None)
    assert loss(model, cached, cfg) == pytest.approx(loss(model, plain, cfg), rel=1e-5)
    model.encoders["image"].forward = None  # would fail if called: cached features skip the encoder
    try:
        model(cached, cfg.losses)
    finally:
        del model.encoders["image"].forward


def test_hit_conditioning_targets_match_the_decoders_own(model, data, tmp_path):
    cfg = cfg_for("decode-align", data, tmp_path / "cache")
    assert dict(build_cache(cfg, model).computed) == {"condition/image": 8, "condition/video": 8, "condition/audio": 3}
    pre = open_precomputed(cfg, model)
    cached = batch_of(cfg, model, pre)
    for m, rows in cached["signal_targets"].items():
        expected = model.decoders[m].condition(cached["signal_captions"][m])
        assert torch.allclose(torch.stack(rows), expected, atol=1e-6)
    assert loss(model, cached, cfg) == pytest.approx(loss(model, batch_of(cfg, model, None), cfg), rel=1e-5)


def test_miss_is_computed_also_inside_a_batch_mixing_cached_and_new_items(model, data, tmp_path, caplog):
    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    build_cache(cfg, model)
    Image.new("RGB", (32, 32), (10, 200, 10)).save(data / "media/new.png")
    lines = data.joinpath("pairs.jsonl").read_text().splitlines()
    lines.insert(1, json.dumps({"id": "new", "modality": "image", "media": "media/new.png", "caption": "new"}))
    data.joinpath("pairs.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        pre = open_precomputed(cfg, model)
        cached = batch_of(cfg, model, pre)
    assert pre.stats()["encoder/image/miss"] == 1 and pre.stats()["encoder/image/hit"] == 8
    assert cached["media"]["image"].shape[0] == 1 and cached["media_features"]["image"]["index"].tolist() == [
        0, 2, 3, 4, 5, 6, 7, 8]  # the new image is the 2nd image of the batch
    assert "has no image encoder output" in caplog.text and "mmllm cache" in caplog.text
    assert loss(model, cached, cfg) == pytest.approx(loss(model, batch_of(cfg, model, None), cfg), rel=1e-5)


def test_stale_cache_is_never_used_silently(model, data, tmp_path, caplog):
    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    build_cache(cfg, model)
    changed = copy.deepcopy(model)
    with torch.no_grad():  # a change deep inside a tensor (past what MediaEncoder.fingerprint samples)
        weight = next(p for p in changed.encoders["image"].parameters() if p.numel() > 2048)
        weight.view(-1)[-1] += 1.0
    assert encoder_fingerprint(changed.encoders["image"]) != encoder_fingerprint(model.encoders["image"])
    assert encoder_fingerprint(changed.encoders["audio"]) == encoder_fingerprint(model.encoders["audio"])
    with caplog.at_level(logging.WARNING):
        pre = open_precomputed(cfg, changed)
        batch = batch_of(cfg, changed, pre)
    assert "STALE for encoders.image" in caplog.text and "NOT using it" in caplog.text
    assert pre.stats()["encoder/image/stale"] == 8 and "encoder/image/hit" not in pre.stats()
    assert batch["media"]["image"].shape[0] == 8 and "image" not in batch["media_features"]
    assert pre.stats()["encoder/audio/hit"] == 3  # untouched parts still hit
    assert loss(changed, batch, cfg) == pytest.approx(loss(changed, batch_of(cfg, changed, None), cfg), rel=1e-5)
    # a media file whose content changed under the same name is a miss, not a stale hit
    Image.new("RGB", (32, 32), (0, 0, 0)).save(data / "media/red_circle.png")
    pre = open_precomputed(cfg, model)
    batch_of(cfg, model, pre)
    assert pre.stats()["encoder/image/miss"] == 1 and pre.stats()["encoder/image/hit"] == 7


def test_a_decoding_version_is_in_its_own_modalitys_encoder_fingerprints_only(model, monkeypatch):
    """Video decoding changing (long clips sought) makes video encoders' cached features stale, not images'."""
    import mmllm.data.media as media

    encoders = {m: model.encoders[m] for m in ("image", "audio", "video") if m in model.encoders}
    assert "video" in encoders and "image" in encoders
    before = {m: encoder_fingerprint(e) for m, e in encoders.items()}
    assert media.media_decode_version("video") == media.VIDEO_DECODE_VERSION
    monkeypatch.setattr(media, "VIDEO_DECODE_VERSION", media.VIDEO_DECODE_VERSION + "-next")
    after = {m: encoder_fingerprint(e) for m, e in encoders.items()}
    assert after["video"] != before["video"]
    assert all(after[m] == before[m] for m in encoders if m != "video")
    monkeypatch.setattr(media, "MEDIA_DECODE_VERSION", media.MEDIA_DECODE_VERSION + "-next")
    assert all(encoder_fingerprint(e) != before[m] for m, e in encoders.items() if m != "video")


def test_decoder_fingerprint_follows_the_text_side_not_call_state(model):
    decoder = model.decoders["image"]
    before = decoder_fingerprint(decoder)
    decoder.condition(["a red circle"])  # sets padding/truncation state on the tokenizer
    assert decoder_fingerprint(decoder) == before
    changed = copy.deepcopy(decoder)
    with torch.no_grad():
        next(changed.text_encoder.parameters()).view(-1)[-1] += 1.0
    assert decoder_fingerprint(changed) != before


def test_damaged_cache_is_recomputed_or_refused_with_the_file_named(model, data, tmp_path, caplog):
    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    build_cache(cfg, model)
    shard = next((tmp_path / "cache").glob("encoder-image-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        pre = open_precomputed(cfg, model)
        batch = batch_of(cfg, model, pre)
    assert shard.name in caplog.text and pre.stats()["encoder/image/miss"] == 8
    assert batch["media"]["image"].shape[0] == 8
    (tmp_path / "cache/index.json").write_text("{not json")
    with pytest.raises(CacheError, match="index.json"):
        FeatureCache(tmp_path / "cache")


def test_a_shard_damaged_after_its_keys_were_read_is_recomputed_not_raised(model, data, tmp_path, caplog):
    """The keys are read at the start (cache.require's coverage check); a shard truncated later (another `mmllm
    cache` rewriting it, a disk fault) made the lookup of whichever process read it first raise safetensors' error,
    stopping that process alone while the others waited for it at the step's collectives."""
    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    build_cache(cfg, model)
    pre = open_precomputed(cfg, model)
    section = next(iter(pre.cache.sections.values()))
    assert section.keys()  # listed while the shard was whole
    shard = next((tmp_path / "cache").glob("encoder-image-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING):
        batch = batch_of(cfg, model, pre)
    assert f"cannot read shard {shard} any more" in caplog.text
    assert pre.stats()["encoder/image/miss"] == 8 and batch["media"]["image"].shape[0] == 8
    assert caplog.text.count("cannot read shard") == 1  # once: its entries are absent from then on


def test_cache_command(data, tmp_path, capsys):
    args = ["cache", "--config", str(REPO / "configs/stages/tiny/decode_align.yaml"), "init_from=null",
            f"data=[{{path: {data / 'pairs.jsonl'}, format: mmllm-pairs}}]"]
    assert main([*args, f"cache.dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out
    assert "condition/image: 8 computed" in out and "condition/audio: 3 computed" in out
    assert "with cache.require=true it trains without holding" in out
    index = json.loads((tmp_path / "c/index.json").read_text())
    assert {(s["kind"], s["modality"]) for s in index["sections"].values()} == {
        ("condition", "image"), ("condition", "audio"), ("condition", "video")}
    assert main([*args, f"cache.dir={tmp_path / 'c'}"]) == 0
    assert "condition/image: 0 computed, 8 already cached" in capsys.readouterr().out
    assert main(args) == 2  # no cache.dir: a configuration error, said plainly
    assert "cache.dir" in capsys.readouterr().err


def test_out_of_memory_while_caching_is_one_line_and_keeps_what_was_computed(data, tmp_path, monkeypatch, capsys):
    """A torch.OutOfMemoryError in `mmllm cache` ended it with torch's traceback (exit code 1); now one line (exit
    code 2) says what ran out and to give a smaller --batch-size. The features computed before it were already
    written (the writer flushes on the way out), and the same command computes only the rest."""
    from mmllm.data.cache import CacheWriter

    real_add, added = CacheWriter.add, []

    def add(self, key, tensor):
        added.append(key)
        if len(added) == 5:  # the third batch of 2, after two batches of image targets
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee PYTORCH_CUDA_ALLOC_CONF")
        return real_add(self, key, tensor)

    monkeypatch.setattr(CacheWriter, "add", add)
    args = ["cache", "--config", str(REPO / "configs/stages/tiny/decode_align.yaml"), "init_from=null", "--batch-size",
            "2", f"data=[{{path: {data / 'pairs.jsonl'}, format: mmllm-pairs}}]", f"cache.dir={tmp_path / 'c'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert "cache ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.); the features computed before " \
           "it are in cache.dir, and the same command with a smaller --batch-size computes only the rest" in errors[0]
    monkeypatch.undo()
    assert main(args) == 0
    assert "condition/image: 4 computed, 4 already cached" in capsys.readouterr().out


def _lookups(tmp_path, sections: dict[str, dict[str, torch.Tensor]]):
    """A Precomputed over a cache holding ``sections`` (fingerprint -> content hash -> image features)."""
    from mmllm.data.precomputed import Precomputed

    cache = FeatureCache(tmp_path / "cache")
    for fp, entries in sections.items():
        with cache.writer("encoder", "image", fp, {}) as writer:
            for key, tensor in entries.items():
                writer.add(key, tensor)
    return Precomputed(FeatureCache(tmp_path / "cache"), tmp_path / "cache", {"image": "mine"}, {},
                       {"image": (2, 3)}, {})


def test_a_media_file_is_read_once_while_unchanged_and_again_when_it_changes(tmp_path, monkeypatch):
    """Precomputed.features hashed the whole file on every lookup (every epoch), also when the cache held
    nothing for its encoder; a changed file must still never get the old file's features."""
    import os

    from mmllm.data import fingerprint

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(bytes([i]) * 5000)
    reads = []
    hash_file = fingerprint.file_hash
    monkeypatch.setattr(fingerprint, "file_hash", lambda path: reads.append(path) or hash_file(path))
    feats = {hash_file(f): torch.full((2, 3), float(i)) for i, f in enumerate(files)}

    nothing = _lookups(tmp_path / "other", {})  # a cache without a section for this encoder: nothing to look up
    assert [nothing.features("image", f) for f in files * 2] == [None] * 6 and not reads
    assert nothing.stats() == {"encoder/image/miss": 6}

    pre = _lookups(tmp_path, {"mine": feats})
    for _ in range(3):  # epochs
        assert [float(pre.features("image", f)[0, 0]) for f in files] == [0.0, 1.0, 2.0]
    assert sorted(reads) == sorted(map(str, files))  # each file read once
    # the same size and modification time, other bytes (a copy keeping the time): read again, not the old entry
    stat = files[1].stat()
    time.sleep(0.05)  # past the kernel's timestamp granularity (a clock tick)
    files[1].write_bytes(bytes([9]) * 5000)
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert pre.features("image", files[1]) is None and pre.stats()["encoder/image/miss"] == 1
    files[1].write_bytes(bytes([1]) * 5000)  # back as it was: the cached entry again
    assert float(pre.features("image", files[1])[0, 0]) == 1.0
    # a stale section (another fingerprint) needs the key to say so: the file is read for it
    stale = _lookups(tmp_path / "stale", {"theirs": feats})
    assert stale.features("image", files[0]) is None and stale.stats() == {"encoder/image/stale": 1}


def test_a_cache_on_a_file_system_without_locks_is_built_with_one_warning(model, data, tmp_path, monkeypatch, caplog):
    """flock fails there with ENOSYS (Lustre without -o flock): the index update after each shard stopped the
    command with a bare '[Errno 38]' after the shard was computed. It goes on unlocked, warned about once."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cfg = cfg_for("encode-align", data, tmp_path / "cache")
    with caplog.at_level("WARNING"):
        report = build_cache(cfg, model)
    assert dict(report.computed) == {"encoder/image": 8, "encoder/video": 8, "encoder/audio": 3}
    assert sum(build_cache(cfg, model).present.values()) == 19  # every shard is in the index
    warned = [r for r in caplog.records if "does not lock files" in r.getMessage()]
    assert len(warned) == 1 and "Function not implemented" in warned[0].getMessage()
