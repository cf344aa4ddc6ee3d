"""Assembly-time checks: parts chosen by exact name, every dimension agreeing before any training."""

import pytest
import torch

from mmllm.config import ConfigError, load_assembly, parse_assembly, to_dict
from mmllm.encoders.base import EncoderShape
from mmllm.model import AnyToAnyModel
from tests.conftest import TINY
from tests.custom_parts import PixelEncoder


def _tiny(**edits):
    data = to_dict(load_assembly(TINY))
    for path, value in edits.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return parse_assembly(data)


def test_output_projection_disagreeing_with_decoder_fails_naming_both():
    cfg = _tiny(output_projections__image__num_queries=77, output_projections__image__output_dim=768)
    with pytest.raises(ConfigError) as err:
        AnyToAnyModel.assemble(cfg)
    msg = str(err.value)
    assert "output_projections.image" in msg and "(77, 768)" in msg
    assert "decoders.image (sd-image)" in msg and "(16, 32)" in msg


def test_input_projection_width_disagreeing_with_encoder_fails_naming_both():
    with pytest.raises(ConfigError, match=r"input_projections\.audio\.input_dim=99.*encoders\.audio \(hf-audio\)"):
        AnyToAnyModel.assemble(_tiny(input_projections__audio__input_dim=99))


def test_unknown_kind_lists_valid_kinds_without_guessing():
    with pytest.raises(ConfigError, match="unknown encoder kind 'clip'.*frames-video, hf-audio, open-clip"):
        AnyToAnyModel.assemble(_tiny(encoders__image__kind="clip"))


def test_unknown_component_option_is_refused():
    with pytest.raises(ConfigError, match="decoders.image.*stepz"):
        AnyToAnyModel.assemble(_tiny(decoders__image__stepz=3))


def test_assembly_is_deterministic_from_the_seed(tiny_assembly):
    a = AnyToAnyModel.assemble(tiny_assembly).state_dict()
    b = AnyToAnyModel.assemble(tiny_assembly).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_signal_tokens_only_new_rows_learn(tiny_model):
    llm = tiny_model.llm
    n_signal = sum(tiny_model.config.signal_tokens.values())
    assert llm.vocab_size == llm.first_new_id + n_signal
    params = llm.signal_parameters()
    assert list(params) == ["embed_signal"]  # tied core: one shared block of new rows
    assert params["embed_signal"].shape == (n_signal, llm.hidden_size)
    emb = llm.model.get_input_embeddings()
    assert emb.base.weight.shape[0] == llm.first_new_id  # the original table is not resized
    ids = torch.tensor([[5, llm.signal_ids["image"][0], llm.placeholder_ids["image"]]])
    out = llm.embed(ids)
    assert torch.equal(out[0, 0], emb.base.weight[5])
    assert torch.equal(out[0, 1], params["embed_signal"][0])
    assert torch.count_nonzero(out[0, 2]) == 0
    logits = llm.lm_head()(torch.randn(2, llm.hidden_size))
    assert logits.shape == (2, llm.vocab_size)


def test_untied_core_gets_its_own_head_rows(tiny_assembly):
    data = to_dict(tiny_assembly)
    data["llm"]["tie_word_embeddings"] = False
    model = AnyToAnyModel.assemble(parse_assembly(data))
    assert set(model.llm.signal_parameters()) == {"embed_signal", "head_signal"}


def test_a_bf16_core_from_a_local_dir_keeps_fp32_signal_rows(tiny_assembly, tmp_path):
    """hf-causal-lm from a local dir in bfloat16: the new rows stay fp32 (bf16 would round small
    updates away), the wrappers cast on use, and fp32 projections accept bf16 activations."""
    from mmllm.llm import TinyLlama

    core = TinyLlama.from_options(TinyLlama.Options(**tiny_assembly.llm.options))
    core.model.save_pretrained(tmp_path / "llm")
    core.tokenizer.save_pretrained(tmp_path / "llm")
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(tmp_path / "llm"), "dtype": "bfloat16"}
    model = AnyToAnyModel.assemble(parse_assembly(data))
    assert model.llm.model.get_input_embeddings().base.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.llm.signal_parameters().values())
    ids = torch.tensor([[5, model.llm.signal_ids["image"][0]]])
    assert model.llm.embed(ids).dtype == torch.bfloat16
    h = torch.randn(1, model.config.signal_tokens["image"], model.llm.hidden_size, dtype=torch.bfloat16)
    proj = model.output_projections["image"]
    assert proj(h.float()).shape[1:] == model.decoders["image"].conditioning_shape


@pytest.mark.parametrize("kind", ["tiny-llama", "hf-causal-lm"])
def test_an_llm_built_without_weights_has_the_loaded_ones_tokens_and_sizes(kind, tiny_assembly, tmp_path):
    """`llm_weights=False` (data check, cache, inspect): the core on the meta device, reading no weights,
    with the same tokenizer, token ids, sizes, parameter counts and checks; running it is refused."""
    from mmllm.llm import TinyLlama
    from mmllm.training.freeze import count_parameters
    from mmllm.training.loop import token_spec

    data = to_dict(tiny_assembly)
    if kind == "hf-causal-lm":
        core = TinyLlama.from_options(TinyLlama.Options(**tiny_assembly.llm.options))
        core.model.save_pretrained(tmp_path / "llm")
        core.tokenizer.save_pretrained(tmp_path / "llm")
        for weights in (tmp_path / "llm").glob("*.safetensors"):
            weights.write_bytes(b"not read")  # reading them would fail
        data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(tmp_path / "llm")}
        shapes = AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
        core.model.save_pretrained(tmp_path / "llm")  # restored, for the loaded one to compare with
        full = AnyToAnyModel.assemble(parse_assembly(data))
    else:
        full = AnyToAnyModel.assemble(parse_assembly(data))
        shapes = AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
    assert full.llm.has_weights and not shapes.llm.has_weights
    assert all(p.device.type == "meta" for p in shapes.llm.model.parameters())
    assert shapes.llm.tokenizer.get_vocab() == full.llm.tokenizer.get_vocab()
    assert token_spec(shapes) == token_spec(full) and shapes.checks == full.checks
    assert shapes.llm.hidden_size == full.llm.hidden_size
    assert count_parameters(shapes) == count_parameters(full)
    with pytest.raises(RuntimeError, match="built from its config alone .* cannot run"):
        shapes.llm.embed(torch.tensor([[1, 2]]))


def test_a_component_of_your_own_is_named_by_its_import_path(tiny_assembly, tmp_path):
    from PIL import Image

    data = to_dict(tiny_assembly)
    data["encoders"]["image"] = {"kind": "tests.custom_parts:PixelEncoder", "size": 4, "dim": 8}
    data["input_projections"]["image"] = {"kind": "linear"}
    model = AnyToAnyModel.assemble(parse_assembly(data))
    encoder = model.encoders["image"]
    assert isinstance(encoder, PixelEncoder) and (encoder.num_tokens, encoder.output_dim) == (1, 8)
    assert encoder.encode([Image.new("RGB", (32, 32), "red")]).shape == (1, 1, 8)
    saved = model.save_pretrained(tmp_path / "ckpt")  # the kind is recorded; the checkpoint reloads
    assert isinstance(AnyToAnyModel.from_pretrained(saved).encoders["image"], PixelEncoder)
    shape = AnyToAnyModel.assemble(parse_assembly(data), encoder_weights=[]).encoders["image"]
    assert isinstance(shape, EncoderShape) and (shape.num_tokens, shape.output_dim) == (1, 8)
    for kind, message in (("tests.custom_parts:Nothing", "has no class Nothing with an Options dataclass"),
                          ("no_such_package.x:Y", "cannot import no_such_package.x"),
                          ("mmllm.llm:TinyLlama", "built a LLMCore, not a MediaEncoder")):
        data["encoders"]["image"] = {"kind": kind}
        with pytest.raises(ConfigError, match=message):
            AnyToAnyModel.assemble(parse_assembly(data))
