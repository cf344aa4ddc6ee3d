"""The three stages on the tiny assembly: exactly the declared parameters learn, the loss goes
down, every frozen part is bit-identical afterwards, checkpoints reload exactly, resume is exact."""

import json
import logging

import pytest
import torch
from torch import nn

from mmllm.config import ConfigError, load_stage
from mmllm.data.dataset import StageDataset, collate, load_stage_records
from mmllm.model import AnyToAnyModel
from mmllm.training.freeze import apply_trainable
from mmllm.training.loop import build_model, token_spec, train
from tests.conftest import REPO

STAGES = {"encode-align": "encode_align", "decode-align": "decode_align", "instruct": "instruct"}
EXPECTED_GROUPS = {
    "encode-align": {"input_projections"},
    "decode-align": {"output_projections", "signal_embeddings"},
    "instruct": {"input_projections", "output_projections", "signal_embeddings", "lora"},
}


def stage_cfg(stage, sample_data, out, **overrides):
    data = "pairs" if stage != "instruct" else "chat"
    fmt = "mmllm-pairs" if stage != "instruct" else "mmllm-chat"
    items = [f"output_dir={out}", "report_to=none", f"data=[{{path: {sample_data[data]}, format: {fmt}}}]",
             "init_from=null"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_stage(REPO / "configs/stages/tiny" / f"{STAGES[stage]}.yaml", items)


def fixed_batch_loss(model, cfg):
    """Mean loss over the whole (small) data set in one batch: a fixed yardstick."""
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(per[0], model.llm.tokenizer, token_spec(model), pre)
    batch = collate([ds[i] for i in range(len(ds))], model.llm.tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        return {k: float(v) for k, v in model(batch, cfg.losses).items()}


def frozen_snapshot(model):
    trainable = {id(p) for group in model.glue_parameters().values() for p in group.values()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in trainable}


@pytest.mark.parametrize("stage", list(STAGES))
def test_exactly_the_declared_parameters_require_grad(stage, sample_data, tmp_path):
    cfg = stage_cfg(stage, sample_data, tmp_path)
    model = build_model(cfg)
    apply_trainable(model, cfg.resolved_trainable())
    groups = model.glue_parameters()
    expected = {id(p) for g in EXPECTED_GROUPS[stage] for p in groups[g].values()}
    actual = {id(p) for p in model.parameters() if p.requires_grad}
    assert actual == expected and expected
    # the original LLM matrices, encoders and decoders never learn
    emb = model.llm.model.get_input_embeddings()
    assert not emb.base.weight.requires_grad
    assert not any(p.requires_grad for p in model.encoders.parameters())
    assert not any(p.requires_grad for p in model.decoders.parameters())


@pytest.fixture(scope="module")
def chain(sample_data, tmp_path_factory):
    """Train encode-align -> decode-align -> instruct, each from the previous checkpoint."""
    root = tmp_path_factory.mktemp("chain")
    results, previous = {}, None
    for stage in STAGES:
        cfg = stage_cfg(stage, sample_data, root / stage, max_steps=16, save_every=8,
                        **({"init_from": previous} if previous else {}))
        before_model = build_model(cfg)
        before = fixed_batch_loss(before_model, cfg)
        frozen = frozen_snapshot(before_model)
        result = train(cfg)
        after_model = AnyToAnyModel.from_pretrained(result.final_checkpoint)
        results[stage] = dict(cfg=cfg, result=result, before=before, after=fixed_batch_loss(after_model, cfg),
                              frozen=frozen, model=after_model)
        previous = result.final_checkpoint
    return results


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_lowers_its_loss(chain, stage):
    before, after = chain[stage]["before"], chain[stage]["after"]
    assert after["loss"] < 0.9 * before["loss"], (before, after)
    if stage != "encode-align":
        for key in (k for k in before if k.startswith("mse_")):
            assert after[key] < before[key], (key, before, after)


@pytest.mark.parametrize("stage", list(STAGES))
def test_frozen_parts_are_bit_identical_after_training(chain, stage):
    frozen, model = chain[stage]["frozen"], chain[stage]["model"]
    now = dict(model.named_parameters())
    assert frozen, "nothing frozen?"
    for name, value in frozen.items():
        assert torch.equal(now[name], value), name


def test_checkpoint_reloads_to_bit_identical_learned_weights(chain):
    model = chain["instruct"]["model"]
    again = AnyToAnyModel.from_pretrained(chain["instruct"]["result"].final_checkpoint)
    a, b = model.learned_state_dict(), again.learned_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = model.lora_parameters(), again.lora_parameters()
    assert la and la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def test_checkpoint_layout_is_the_same_for_every_stage(chain):
    for stage, entry in chain.items():
        files = {p.name for p in entry["result"].final_checkpoint.iterdir()}
        assert {"mmllm.json", "learned.safetensors", "manifest.json", "training_state"} <= files, stage
        assert ("adapter" in files) == (stage == "instruct")


def test_resume_equals_an_uninterrupted_run(sample_data, tmp_path):
    full = train(stage_cfg("instruct", sample_data, tmp_path / "full", max_steps=6, save_every=3))
    part = stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=3, save_every=3)
    train(part)
    resumed = train(stage_cfg("instruct", sample_data, tmp_path / "part", max_steps=6, save_every=3), resume=True)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    a = AnyToAnyModel.from_pretrained(full.final_checkpoint)
    b = AnyToAnyModel.from_pretrained(resumed.final_checkpoint)
    for k, v in a.learned_state_dict().items():
        torch.testing.assert_close(b.learned_state_dict()[k], v, rtol=0, atol=1e-6)
    for k, v in a.lora_parameters().items():
        torch.testing.assert_close(b.lora_parameters()[k], v, rtol=0, atol=1e-6)


def test_micro_batches_of_a_step_make_the_step_one_batch_of_them_makes(sample_data, tmp_path, monkeypatch):
    """The same samples per optimizer step (batch 4, or 2 x grad_accum 2, or 1 x grad_accum 4) give the same
    step losses and the same update: each loss part is divided by its unit count over the whole step (label
    tokens, signal groups, text tokens), not averaged per micro-batch; the schedule and the clipping count
    optimizer steps, once each. Padding differs between the ways (each micro-batch pads to its own longest)."""
    from mmllm.training import loop

    applied, clipped = [], []
    real_step, real_clip = torch.optim.AdamW.step, loop.clip_to

    def step(self, *args, **kwargs):
        applied[-1].append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(loop, "clip_to", lambda *args: clipped[-1].append(float(args[2])) or real_clip(*args))
    settings = {"schedule.warmup_steps": 2, "optim.max_grad_norm": 0.5, "losses.retain": 0.5}
    runs = []
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        applied.append([])
        clipped.append([])
        cfg = stage_cfg("instruct", sample_data, tmp_path / f"b{batch_size}", max_steps=4, batch_size=batch_size,
                        grad_accum=grad_accum, **settings)
        runs.append(train(cfg))
        lr = loop.lr_lambda(cfg)
        assert applied[-1] == pytest.approx([cfg.optim.lr * lr(s) for s in range(4)], rel=1e-9)
    for run, norms in zip(runs[1:], clipped[1:]):
        assert run.losses == pytest.approx(runs[0].losses, rel=1e-5)
        assert norms == pytest.approx(clipped[0], rel=1e-4)  # the total norm, clipped once per step
    assert all(n > 0.5 for n in clipped[0])  # every step was clipped: the norms above are what clipping read


def test_tampered_checkpoint_is_refused_naming_the_file(chain, tmp_path):
    import shutil

    from mmllm.training.checkpoint import CheckpointError

    copy = tmp_path / "ckpt"
    shutil.copytree(chain["decode-align"]["result"].final_checkpoint, copy)
    with open(copy / "learned.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(CheckpointError, match="learned.safetensors"):
        AnyToAnyModel.from_pretrained(copy)


def test_gradient_checkpointing_gives_the_same_step(sample_data, tmp_path, monkeypatch):
    import transformers.modeling_utils as hf

    calls, real = [], hf.checkpoint  # what transformers wraps the decoder layers in when checkpointing is on
    monkeypatch.setattr(hf, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    plain = train(stage_cfg("instruct", sample_data, tmp_path / "a", max_steps=2))
    assert not calls
    ckpt = train(stage_cfg("instruct", sample_data, tmp_path / "b", max_steps=2, grad_checkpointing=True))
    assert calls
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-5)


def test_bf16_mixed_precision_trains(sample_data, tmp_path):
    result = train(stage_cfg("decode-align", sample_data, tmp_path, max_steps=3, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("in_yaml", [None, "no"])
def test_mixed_precision_comes_from_the_launcher_unless_the_stage_sets_it(in_yaml, sample_data, tmp_path,
                                                                          monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    extra = {"mixed_precision": in_yaml} if in_yaml else {}
    with caplog.at_level(logging.INFO, logger="mmllm.training.loop"):
        train(stage_cfg("encode-align", sample_data, tmp_path, max_steps=1, **extra))
    assert f"mixed precision {'no' if in_yaml else 'bf16'}" in caplog.text


def test_denoising_loss_trains_the_output_projection_through_the_frozen_unet(sample_data, tmp_path):
    cfg = stage_cfg("instruct", sample_data, tmp_path, max_steps=2, **{"losses.denoise": 1.0, "losses.mse": 0.0})
    model = build_model(cfg)
    apply_trainable(model, cfg.resolved_trainable())
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(per[0], model.llm.tokenizer, token_spec(model), pre, load_output_media=True)
    with_target = [ds[i] for i, c in enumerate(per[0]) if any(o.path for m in c.messages for o in m.outputs)]
    batch = collate(with_target, model.llm.tokenizer.pad_token_id)
    out = model(batch, cfg.losses)
    assert "denoise_image" in out and torch.isfinite(out["denoise_image"])
    out["loss"].backward()
    grads = [p.grad for p in model.output_projections["image"].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model.decoders.parameters())


def test_a_group_without_target_media_leaves_the_denoising_loss_of_the_others_as_it_was(sample_data, tmp_path):
    """An output without ``media`` has nothing to denoise: it is left out of the denoising loss and of
    its unit count, instead of dropping the whole batch's denoising loss (and diluting other steps')."""
    from mmllm.training.loop import _global_counts, _part_keys

    cfg = stage_cfg("instruct", sample_data, tmp_path, **{"losses.denoise": 1.0, "losses.mse": 0.0})
    model = build_model(cfg)
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(per[0], model.llm.tokenizer, token_spec(model), pre, load_output_media=True)
    drawn = [ds[i] for i, c in enumerate(per[0]) if any(o.modality == "image" and o.path for o in c.output_refs())]
    with_media, caption_only = drawn[0], dict(drawn[1])
    caption_only["outputs"] = [(m, caption, None, cond) for m, caption, _, cond in caption_only["outputs"]]
    pad = model.llm.tokenizer.pad_token_id
    alone, mixed = collate([with_media], pad), collate([with_media, caption_only], pad)
    model.eval()
    with torch.no_grad():
        expected = model(alone, cfg.losses)["denoise_image"]
        got = model(mixed, cfg.losses)
    assert "denoise_image" in got
    torch.testing.assert_close(got["denoise_image"], expected, rtol=1e-4, atol=1e-6)

    class OneProcess:
        device = torch.device("cpu")

        def reduce(self, tensor, op):
            return tensor

    counts, samples, tokens, stopped = _global_counts(OneProcess(), [mixed], _part_keys(model), model)
    assert counts["mse_image"] == 2 and counts["denoise_image"] == 1 and not stopped
    assert (samples, tokens) == (2, len(with_media["input_ids"]) + len(caption_only["input_ids"]))  # no padding


def test_each_micro_batch_draws_its_own_denoising_noise(sample_data, tmp_path, monkeypatch):
    """The denoising loss's noise and timesteps are seeded per micro-batch of the step, not by the step
    alone (which gave every micro-batch, and every process, the same draws)."""
    from mmllm.decoders.sd_image import StableDiffusionDecoder

    seeds, real = [], StableDiffusionDecoder.denoising_loss
    monkeypatch.setattr(StableDiffusionDecoder, "denoising_loss",
                        lambda self, cond, media, seed=None: seeds.append(seed) or real(self, cond, media, seed))
    train(stage_cfg("instruct", sample_data, tmp_path, max_steps=2, batch_size=6, grad_accum=2,
                    **{"losses.denoise": 1.0, "losses.retain": 0.0}))
    assert len(seeds) >= 3 and len(set(seeds)) == len(seeds)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_frozen_core_runs_without_dropout_in_training_whatever_kind_of_dropout_it_has(tiny_assembly,
                                                                                        checkpointing):
    """Attention dropout is applied by ``self.training`` (no ``nn.Dropout`` module), as is OPT's residual
    dropout: the training loop must put the core itself in eval mode, LoRA's dropout alone training;
    under gradient checkpointing the checkpointed layers keep training mode (or nothing is checkpointed)."""
    from mmllm.config import LoraConfig
    from mmllm.training.loop import _freeze_dropout

    model = AnyToAnyModel.assemble(tiny_assembly, decoder_parts="config", encoder_weights=[])
    model.add_lora(LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    for module in model.llm.model.modules():
        if hasattr(module, "attention_dropout"):  # as an LLM whose config sets attention_dropout
            module.attention_dropout = 0.5
    if checkpointing:
        model.llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 300, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad():
        expected = model.hidden_states(batch)[2]
    model.train()
    _freeze_dropout(model)
    got = model.hidden_states(batch)[2]  # LoRA's B starts at 0: its dropout changes nothing yet
    torch.testing.assert_close(got, expected)
    lora_dropout = [m for n, m in model.llm.model.named_modules() if "lora_dropout" in n and isinstance(m, nn.Dropout)]
    assert lora_dropout and all(m.training for m in lora_dropout)
    layers = list(model.llm.model.model.layers)
    assert all(layer.training == checkpointing for layer in layers)
    assert not any(layer.self_attn.training for layer in layers)


def test_a_training_forward_builds_no_kv_cache(tiny_assembly, monkeypatch):
    """Nothing reads a KV cache in training; transformers would build one per forward and hold every
    layer's keys and values in it until the step ends."""
    import transformers.cache_utils as cache_utils

    built, real = [], cache_utils.DynamicCache.__init__
    monkeypatch.setattr(cache_utils.DynamicCache, "__init__", lambda self, *a, **kw: built.append(1) or real(self, *a, **kw))
    model = AnyToAnyModel.assemble(tiny_assembly, decoder_parts="config", encoder_weights=[])
    ids = torch.randint(0, 300, (2, 12))
    model.train()
    built.clear()  # what assembly ran is not a training forward
    model.hidden_states({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert not built


def test_a_loaded_checkpoint_is_in_eval_mode_so_its_adapter_dropout_is_off(tiny_assembly, tmp_path):
    from mmllm.config import LoraConfig

    model = AnyToAnyModel.assemble(tiny_assembly, decoder_parts="config", encoder_weights=[])
    model.add_lora(LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.lora_parameters().items():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: its dropout would change the output
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AnyToAnyModel.from_pretrained(tmp_path / "ckpt", decoder_parts="config", encoder_weights=[])
    assert not any(m.training for m in loaded.modules())
    ids = torch.randint(0, 300, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(loaded.hidden_states(batch)[2], loaded.hidden_states(batch)[2], rtol=0, atol=0)


def test_relative_mse_divides_each_group_by_its_target_power(sample_data, tmp_path):
    cfg = stage_cfg("decode-align", sample_data, tmp_path)
    model = build_model(cfg)
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(per[0], model.llm.tokenizer, token_spec(model), pre)
    sample = next(s for s in (ds[i] for i in range(len(ds))) if isinstance(s, dict) and s["outputs"])
    batch = collate([sample], model.llm.tokenizer.pad_token_id)
    (modality, captions), = [(m, c) for m, c in batch["signal_captions"].items() if c]
    model.eval()
    with torch.no_grad():
        absolute = model(batch, cfg.losses)[f"mse_{modality}"]
        cfg.losses.mse_relative = True
        relative = model(batch, cfg.losses)[f"mse_{modality}"]
        power = model.decoders[modality].condition(list(captions)).float().pow(2).mean()
    torch.testing.assert_close(relative, absolute / power, rtol=1e-5, atol=0)


def test_retention_kl_reads_only_text_rows_and_teaches_the_adapter(sample_data, tmp_path):
    """losses.retain: KL to the adapter-free core on text-only rows; rows holding added tokens are
    ignored, it is ~0 while the adapter is untouched, and its gradient reaches the LoRA weights."""
    from mmllm.config import LossConfig

    cfg = stage_cfg("instruct", sample_data, tmp_path)
    model = build_model(cfg)
    apply_trainable(model, cfg.resolved_trainable())
    tok = model.llm.tokenizer
    plain = tok("a plain sentence about the weather and the sea", add_special_tokens=False).input_ids
    signal = plain[:-2] + model.llm.signal_ids["image"][:2]
    pad = tok.pad_token_id

    def batch(rows):
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, -100)}

    losses = LossConfig(ce=0.0, mse=0.0, retain=1.0)
    model.eval()
    untouched = model(batch([plain]), losses)["retain"]
    with torch.no_grad():  # the untouched adapter differs from the core only by the added rows' share
        probs = model.llm.model(input_ids=torch.tensor([plain])).logits.float().softmax(-1)
        added_share = probs[..., model.llm.first_new_id:].sum(-1)
    torch.testing.assert_close(untouched, -torch.log1p(-added_share).mean(), rtol=1e-4, atol=1e-6)
    lora = model.lora_parameters()
    with torch.no_grad():
        for name, p in lora.items():
            if "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.5)
    alone = model(batch([plain]), losses)["retain"]
    with_signal_row = model(batch([plain, signal]), losses)
    assert float(alone.detach()) > 10 * float(untouched.detach()) + 1e-4
    torch.testing.assert_close(with_signal_row["retain"], alone)
    with_signal_row["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    assert "retain" not in model(batch([signal]), losses)


def test_retention_without_a_lora_adapter_is_refused_before_training(sample_data, tmp_path):
    cfg = stage_cfg("decode-align", sample_data, tmp_path, **{"losses.retain": 1.0})
    with pytest.raises(ValueError, match=r"losses\.retain.*no adapter"):
        build_model(cfg)


def test_a_continued_adapter_takes_the_stage_files_dropout_and_refuses_another_shape(sample_data, tmp_path):
    first = train(stage_cfg("instruct", sample_data, tmp_path / "a", max_steps=1))
    lora = tmp_path / "lora.yaml"
    lora.write_text("r: 4\nalpha: 8\ndropout: 0.2\ntarget_modules: [v_proj, q_proj]\n")
    model = build_model(stage_cfg("instruct", sample_data, tmp_path / "b", init_from=first.final_checkpoint, lora=lora))
    drops = [m for n, m in model.llm.model.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in drops)
    assert model.lora_config.dropout == 0.2
    assert model._peft_model.peft_config["default"].lora_dropout == 0.2  # adapter_config.json says so too
    lora.write_text("r: 8\nalpha: 8\ndropout: 0.0\ntarget_modules: [q_proj, v_proj]\n")
    with pytest.raises(ConfigError, match=r"r: 4 \(checkpoint\) vs 8"):
        build_model(stage_cfg("instruct", sample_data, tmp_path / "c", init_from=first.final_checkpoint, lora=lora))


@pytest.mark.parametrize("sharded", [False, True])
def test_every_trainable_parameter_gets_a_gradient_and_sharded_processes_run_the_same_passes(
        sharded, sample_data, tmp_path):
    """What FSDP needs of one process's micro-batch (here: one image->text conversation, no text-only
    row, no signal tokens, ce off): every trainable parameter still gets a gradient, and when another
    process has text-only rows this step ("retain" in the step's counts), the core pass runs here too."""
    from mmllm.config import LossConfig

    cfg = stage_cfg("instruct", sample_data, tmp_path)
    model = build_model(cfg)
    apply_trainable(model, cfg.resolved_trainable())
    model.sharded = sharded
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(per[0], model.llm.tokenizer, token_spec(model), pre)
    pick = next(i for i, c in enumerate(per[0]) if "<image>" in c.messages[0].content
                and not any(o for m in c.messages for o in m.outputs))
    batch = collate([ds[pick]], model.llm.tokenizer.pad_token_id)
    assert not bool(model.text_only_rows(batch["input_ids"]).any())
    core_passes = []
    model.llm.model.register_forward_hook(lambda *_: core_passes.append(1))  # only the retention pass calls it
    out = model(batch, LossConfig(ce=0.0, mse=1.0, retain=1.0), normalizers={"retain": 7.0})
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert len(core_passes) == (1 if sharded else 0)
    assert float(out["loss"].detach()) == 0.0  # the joined pass and the zero terms add nothing


def test_gradients_become_ready_in_the_same_order_whatever_the_batch_holds(sample_data, tmp_path):
    """DeepSpeed ZeRO-2 packs gradients into its reduction buckets in the order they become ready; two
    processes whose batches hold different modalities must still pack them alike, or the reduction
    adds up the wrong numbers. An image->text and an audio->text conversation use different input
    projections, yet every trainable parameter's gradient is ready in the same order."""
    cfg = stage_cfg("instruct", sample_data, tmp_path)
    model = build_model(cfg)
    apply_trainable(model, cfg.resolved_trainable())
    per, _, _ = load_stage_records(cfg.data, cfg.stage)
    pre = {m: e.preprocess for m, e in model.encoders.items()}
    ds = StageDataset(per[0], model.llm.tokenizer, token_spec(model), pre)
    names = {p: n for n, p in model.named_parameters() if p.requires_grad}
    order: list[str] = []
    for p in names:
        p.register_post_accumulate_grad_hook(lambda p: order.append(names[p]))
    orders = []
    for placeholder in ("<image>", "<audio>"):
        pick = next(i for i, c in enumerate(per[0]) if placeholder in c.messages[0].content)
        order.clear()
        model(collate([ds[pick]], model.llm.tokenizer.pad_token_id))["loss"].backward()
        orders.append(list(order))
        model.zero_grad(set_to_none=True)
    assert len(orders[0]) == len(names)
    assert orders[0] == orders[1]


# --- init_from: the stage's assembly vs the one the checkpoint records (mmllm/training/init_from.py)

LINEAR_AUDIO = "assembly.input_projections.audio.kind=linear"  # tiny.yaml says mlp


@pytest.fixture(scope="module")
def encode_align_checkpoints(sample_data, tmp_path_factory):
    """One-step encode-align checkpoints of tiny.yaml as it is and with the audio projection overridden."""
    root = tmp_path_factory.mktemp("init_from")
    plain = train(stage_cfg("encode-align", sample_data, root / "plain", max_steps=1)).final_checkpoint
    linear = train(load_stage(REPO / "configs/stages/tiny/encode_align.yaml", [
        f"output_dir={root / 'linear'}", "report_to=none", "max_steps=1", LINEAR_AUDIO,
        f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]"])).final_checkpoint
    return {"plain": plain, "linear": linear}


def decode_align_from(checkpoint, sample_data, out, *overrides):
    return load_stage(REPO / "configs/stages/tiny/decode_align.yaml", [
        f"output_dir={out}", "report_to=none", f"init_from={checkpoint}",
        f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]", *overrides])


def test_an_assembly_override_the_checkpoint_contradicts_is_refused_before_any_weight_loads(
        encode_align_checkpoints, sample_data, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the assembly was checked")

    monkeypatch.setattr(AnyToAnyModel, "from_pretrained", no_loading)
    cfg = decode_align_from(encode_align_checkpoints["plain"], sample_data, tmp_path, LINEAR_AUDIO)
    with pytest.raises(ConfigError) as exc:
        build_model(cfg)
    message = str(exc.value)
    for needle in ("assembly.input_projections.audio.kind", '"mlp" (checkpoint) vs "linear"', "Drop the override",
                   "init_from=null", str(encode_align_checkpoints["plain"])):
        assert needle in message


def test_overrides_repeated_from_the_previous_stage_continue_it_without_a_word(
        encode_align_checkpoints, sample_data, tmp_path, caplog):
    """scripts/train_default.sh passes the same OVERRIDES to every stage."""
    cfg = decode_align_from(encode_align_checkpoints["linear"], sample_data, tmp_path, LINEAR_AUDIO)
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        model = build_model(cfg)
    assert model.config.input_projections["audio"].kind == "linear"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "init_from" in r.getMessage()]


def test_a_stage_assembly_that_differs_from_the_checkpoint_is_named_in_a_warning(
        encode_align_checkpoints, sample_data, tmp_path, caplog):
    cfg = decode_align_from(encode_align_checkpoints["linear"], sample_data, tmp_path)  # override not repeated
    with caplog.at_level(logging.WARNING, logger="mmllm"):
        model = build_model(cfg)
    assert model.config.input_projections["audio"].kind == "linear"  # the checkpoint's, as the warning says
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "init_from" in r.getMessage()]
    assert len(warned) == 1
    assert 'input_projections.audio.kind: "linear" (checkpoint) vs "mlp"' in warned[0]
    assert "at 1 key(s)" in warned[0]
    assert "init_from=null" in warned[0]


def test_train_refuses_a_contradicting_override_before_writing_anything(encode_align_checkpoints, sample_data,
                                                                         tmp_path):
    cfg = decode_align_from(encode_align_checkpoints["plain"], sample_data, tmp_path / "out", LINEAR_AUDIO)
    with pytest.raises(ConfigError, match="cannot apply"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_mmllm_config_checks_an_existing_init_from_as_train_does_and_its_output_keeps_that_check(
        encode_align_checkpoints, sample_data, tmp_path, capsys):
    """The printed config writes the assembly.* overrides into its assembly: and keeps them listed, so a checkpoint
    that contradicts one is still refused when the printed file is given back (not merely warned about)."""
    from mmllm.cli import main

    stage = str(REPO / "configs/stages/tiny/decode_align.yaml")
    given = [f"output_dir={tmp_path / 'out'}", f"data=[{{path: {sample_data['pairs']}, format: mmllm-pairs}}]",
             LINEAR_AUDIO]
    assert main(["config", "--config", stage, *given, f"init_from={encode_align_checkpoints['plain']}"]) == 2
    assert "cannot apply" in capsys.readouterr().err
    assert main(["config", "--config", stage, *given, f"init_from={encode_align_checkpoints['linear']}"]) == 0
    out, err = capsys.readouterr()
    assert "training continues the assembly its mmllm.json records" in err
    printed = tmp_path / "resolved.yaml"
    printed.write_text(out)
    assert main(["config", "--config", str(printed), f"init_from={encode_align_checkpoints['plain']}"]) == 2
    assert "cannot apply" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_missing_init_from_says_how_to_go_on(sample_data, tmp_path):
    cfg = decode_align_from(tmp_path / "not-trained-yet", sample_data, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"checkpoint directory not found.*train that stage first.*init_from=null") as err:
        build_model(cfg)
    assert "a relative path resolves from" not in str(err.value)  # an absolute one: no note about relative ones


def test_a_mistyped_part_option_is_refused_naming_its_file_before_the_llm_is_built(tmp_path, monkeypatch):
    """An encoder option typo was reported only when that encoder was built: after the data was read, the
    output folder made and the LLM loaded (minutes for a large core), and without the assembly file's name."""
    def no_building(*args, **kwargs):
        raise AssertionError("the model was assembled before its parts' options were checked")

    assembly = tmp_path / "my_assembly.yaml"
    assembly.write_text((REPO / "configs/assemblies/tiny.yaml").read_text().replace(
        "    tokens: patch ", "    tokns: patch "))
    monkeypatch.setattr(AnyToAnyModel, "assemble", no_building)
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                     [f"assembly={assembly}", f"output_dir={tmp_path / 'out'}", "report_to=none"])
    with pytest.raises(ConfigError, match=rf"^{assembly}: unknown key\(s\) encoders\.image\.tokns; valid keys "
                                          r"here are: .*tokens"):
        train(cfg)
    assert not (tmp_path / "out").exists()


def test_a_mistyped_option_of_a_nested_part_is_refused_before_the_llm_is_built(tmp_path, monkeypatch):
    """frames-video's inner `image:` encoder was checked only when built, after the LLM loaded."""
    monkeypatch.setattr(AnyToAnyModel, "assemble", lambda *a, **k: pytest.fail("the model was assembled"))
    assembly = tmp_path / "my_assembly.yaml"
    text = (REPO / "configs/assemblies/tiny.yaml").read_text()
    assert "      tokens: pooled" in text
    assembly.write_text(text.replace("      tokens: pooled", "      tokns: pooled"))
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                     [f"assembly={assembly}", f"output_dir={tmp_path / 'out'}", "report_to=none"])
    with pytest.raises(ConfigError, match=rf"^{assembly}: unknown key\(s\) encoders\.video\.image\.tokns; valid "
                                          r"keys here are: .*tokens"):
        train(cfg)
    assert not (tmp_path / "out").exists()
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                     ["assembly.encoders.video.image.kind=no-such-encoder", f"output_dir={tmp_path / 'out'}",
                      "report_to=none"])
    with pytest.raises(ConfigError, match=r"tiny\.yaml: encoders\.video\.image: unknown encoder kind "
                                          r"'no-such-encoder'; valid kinds are: frames-video, hf-audio, open-clip"):
        train(cfg)


def test_a_missing_init_from_names_the_checkpoint_its_run_does_hold(sample_data, tmp_path):
    """The previous stage trained for fewer steps (`max_steps=10`) than the next stage's init_from names
    (step-30): the error names the step that run finished on, not only the one that is missing."""
    run = tmp_path / "encode_align"
    for step in (5, 10):
        (run / f"step-{step}").mkdir(parents=True)
    (run / "final.json").write_text(json.dumps({"checkpoint": "step-10"}))
    cfg = decode_align_from(run / "step-30", sample_data, tmp_path / "out")
    with pytest.raises(ConfigError, match="checkpoint directory not found") as err:
        build_model(cfg)
    assert f"holds step-5, step-10; its run finished on step-10 (final.json): init_from={run / 'step-10'}" in str(
        err.value)
    (run / "final.json").unlink()  # a run that has not finished: its newest checkpoint
    with pytest.raises(ConfigError) as err:
        build_model(cfg)
    assert f"no final.json: that run has not finished); the newest is init_from={run / 'step-10'}" in str(err.value)


def test_a_mistyped_part_option_set_by_an_override_names_the_override_not_only_the_file(tmp_path, monkeypatch):
    """`assembly.encoders.image.tokns=patch` was reported as tiny.yaml's unknown key, a file that does not hold it."""
    monkeypatch.setattr(AnyToAnyModel, "assemble", lambda *a, **k: pytest.fail("the model was assembled"))
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                     ["assembly.encoders.image.tokns=patch", f"output_dir={tmp_path / 'out'}", "report_to=none"])
    with pytest.raises(ConfigError, match=r"tiny\.yaml: unknown key\(s\) encoders\.image\.tokns; .* \(set on the "
                                          r"command line by assembly\.encoders\.image\.tokns=patch\)$"):
        train(cfg)


def test_a_dimension_an_override_set_names_the_override_when_training_assembles(tmp_path):
    """The dimension checks run when the model is assembled named the assembly key only, as if tiny.yaml held it."""
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml",
                     ["assembly.input_projections.image.input_dim=7", f"output_dir={tmp_path / 'out'}",
                      "report_to=none"])
    with pytest.raises(ConfigError, match=r"input_projections\.image\.input_dim=7 disagrees with encoders\.image "
                                          r"\(open-clip\) output_dim=32 \(set on the command line by "
                                          r"assembly\.input_projections\.image\.input_dim=7\)$"):
        train(cfg)


def _unbuildable(*args, **kwargs):
    raise ValueError("this model cannot be built")


@pytest.mark.parametrize("before", ["missing", "empty", "holding a file"])
def test_a_failed_run_removes_only_the_empty_output_dir_it_made(before, tmp_path, monkeypatch):
    """A run that failed after the output_dir check (a model that cannot be built) left the empty folder (and the
    parents it made) behind; one that was there before, or holds a file, is kept as it is."""
    monkeypatch.setattr(AnyToAnyModel, "assemble", _unbuildable)
    out = tmp_path / "runs" / "mine" / "encode_align"
    if before != "missing":
        out.mkdir(parents=True)
    if before == "holding a file":
        (out / "notes.txt").write_text("mine")
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml", [f"output_dir={out}", "report_to=none"])
    with pytest.raises(ValueError, match="cannot be built"):
        train(cfg)
    if before == "missing":
        assert not (tmp_path / "runs").exists()  # the parents it made too
    else:
        assert out.is_dir() and [p.name for p in out.iterdir()] == (["notes.txt"] if before != "empty" else [])


def test_training_logs_the_absolute_output_dir_once_at_start(tmp_path, monkeypatch, caplog):
    """A relative output_dir was logged as given: from another folder one could not tell where runs/ went."""
    monkeypatch.setattr(AnyToAnyModel, "assemble", _unbuildable)
    monkeypatch.chdir(tmp_path)
    cfg = load_stage(REPO / "configs/stages/tiny/encode_align.yaml", ["output_dir=runs/here", "report_to=none"])
    with caplog.at_level(logging.INFO, logger="mmllm"), pytest.raises(ValueError, match="cannot be built"):
        train(cfg)
    absolute = str(tmp_path / "runs" / "here")
    assert sum(absolute in r.getMessage() for r in caplog.records) == 1, [r.getMessage() for r in caplog.records]
