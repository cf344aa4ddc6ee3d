"""Swapping the LLM core: `hf-causal-lm` over architectures other than Llama, saved locally from tiny
random configs (no hub). Each builds in well under a second."""

from pathlib import Path

import pytest
import torch

from mmllm.config import ConfigError, LoraConfig, load_lora, parse_assembly, to_dict
from mmllm.llm import HFCausalLM
from mmllm.model import AnyToAnyModel
from mmllm.tiny_tokenizer import build_tiny_tokenizer
from mmllm.training.loop import train
from tests.test_stages import REPO, stage_cfg

SIZES = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
         "max_position_embeddings": 256}


def _config(arch: str, tokenizer):
    import transformers

    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "gpt2":  # Conv1D layers c_attn / c_proj / c_fc, learned absolute positions
        return transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=256, **ids)
    if arch == "gpt2-short":  # a position table of 40 rows: nothing may run past it
        return transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=40, **ids)
    if arch == "phi":  # q/k/v_proj but `dense`, not o_proj
        return transformers.PhiConfig(**SIZES, **ids)
    if arch == "gemma":  # scales its embedding rows by sqrt(hidden_size) in the embedding's forward
        return transformers.GemmaConfig(**SIZES, num_key_value_heads=1, head_dim=16, **ids)
    if arch == "qwen2":  # an embedding table padded past the tokenizer, as the real ones are
        return transformers.Qwen2Config(**SIZES, num_key_value_heads=1, **{**ids, "vocab_size": len(tokenizer) + 16})
    if arch == "gemma2":  # soft-caps its logits after the LM head
        return transformers.Gemma2Config(**SIZES, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0, **ids)
    if arch == "cohere":  # multiplies them by logit_scale
        return transformers.CohereConfig(**SIZES, num_key_value_heads=1, logit_scale=0.25, **ids)
    if arch == "granite":  # divides them by logits_scaling
        return transformers.GraniteConfig(**SIZES, num_key_value_heads=1, logits_scaling=4.0, **ids)
    raise ValueError(arch)


def save_core(arch: str, folder: Path) -> Path:
    """A tiny random `arch` core and the tiny tokenizer, saved as a local model dir."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer(512, 256)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(arch, tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_core_with_own_code(folder: Path) -> Path:
    """A tiny Qwen2 core whose classes come from Python files in its folder (``auto_map``): loading it runs them."""
    import json

    core = save_core("qwen2", folder)
    (core / "configuration_custom.py").write_text(
        "from transformers import Qwen2Config\n\n\nclass CustomConfig(Qwen2Config):\n    model_type = 'mmllm-custom'\n")
    (core / "modeling_custom.py").write_text(
        "from transformers import Qwen2ForCausalLM\n\nfrom .configuration_custom import CustomConfig\n\n\n"
        "class CustomForCausalLM(Qwen2ForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((core / "config.json").read_text())
    config.update(model_type="mmllm-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (core / "config.json").write_text(json.dumps(config))
    return core


def _assembled(arch: str, tiny_assembly, tmp_path: Path) -> AnyToAnyModel:
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(save_core(arch, tmp_path / arch))}
    return AnyToAnyModel.assemble(parse_assembly(data))


@pytest.mark.parametrize(("arch", "unmatched", "theirs"), [
    ("gpt2", "['q_proj', 'k_proj', 'v_proj', 'o_proj']", "['c_attn', 'c_fc', 'c_proj']"),
    ("phi", "['o_proj']", "['dense', 'fc1', 'fc2', 'k_proj', 'q_proj', 'v_proj']"),  # PEFT alone drops o_proj
])
def test_lora_targets_the_core_lacks_are_refused_naming_its_layers(arch, unmatched, theirs, tiny_assembly, tmp_path):
    model = _assembled(arch, tiny_assembly, tmp_path)
    with pytest.raises(ConfigError) as err:
        model.add_lora(LoraConfig())  # the Llama default: q/k/v/o_proj
    msg = str(err.value)
    assert f"{unmatched} name no module of this LLM" in msg and f"can adapt are {theirs}" in msg
    assert model.lora_parameters() == {}


def test_lora_on_gpt2_conv1d_layers_trains_only_the_adapter(tiny_assembly, tmp_path):
    model = _assembled("gpt2", tiny_assembly, tmp_path)
    model.add_lora(LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["c_attn", "c_proj"]))
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in model.lora_parameters()}
    assert adapted == {"c_attn", "c_proj"}
    for p in model.lora_parameters().values():
        p.requires_grad_(True)
    ids = torch.tensor([[5, 6, 7, model.llm.signal_ids["image"][0]]])
    logits = model.llm.model(inputs_embeds=model.llm.embed(ids)).logits
    logits.sum().backward()
    assert all(p.grad is not None for n, p in model.lora_parameters().items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.llm.model.named_parameters() if "lora_" not in n)


def test_all_linear_adapts_every_linear_layer_of_the_core_but_its_head_and_checkpoints_say_so(sample_data, tmp_path):
    """PEFT's `all-linear` shortcut was refused (it names no layer); passed on to PEFT it would also adapt the
    frozen matrix inside mmllm's wrapped LM head."""
    lora = tmp_path / "lora.yaml"
    lora.write_text((REPO / "configs/lora/tiny.yaml").read_text().split("target_modules")[0] + "target_modules: all-linear\n")
    result = train(stage_cfg("instruct", sample_data, tmp_path / "run", max_steps=2, lora=lora))
    model = AnyToAnyModel.from_pretrained(result.final_checkpoint)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in model.lora_parameters()}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not [n for n in model.lora_parameters() if "lm_head" in n]
    assert model.lora_config.target_modules == "all-linear"
    listed = tmp_path / "listed.yaml"  # the same layers as a list: another adapter config, refused on resume
    listed.write_text(lora.read_text().replace("all-linear", "[q_proj, k_proj, v_proj, o_proj]"))
    with pytest.raises(ConfigError, match="target_modules"):
        train(stage_cfg("instruct", sample_data, tmp_path / "run", max_steps=3, lora=listed), resume=True)
    # every layer all-linear adapted, as a list: the same adapter (it used to be refused as another config),
    # on --resume and as init_from of a stage that names the list
    listed.write_text(lora.read_text().replace(
        "all-linear", "[down_proj, gate_proj, up_proj, self_attn.q_proj, k_proj, v_proj, o_proj]"))
    resumed = train(stage_cfg("instruct", sample_data, tmp_path / "run", max_steps=3, lora=listed), resume=True)
    assert resumed.losses[:2] == result.losses
    after = train(stage_cfg("instruct", sample_data, tmp_path / "next", max_steps=1, lora=listed,
                            init_from=resumed.final_checkpoint))
    assert AnyToAnyModel.from_pretrained(after.final_checkpoint).lora_parameters().keys() == \
        model.lora_parameters().keys()
    lora.write_text(lora.read_text().replace("all-linear", "q_proj"))
    with pytest.raises(ConfigError, match=r"a list of layer names or 'all-linear', got 'q_proj' \(for one layer write \[q_proj\]\)"):
        load_lora(lora)


def test_infer_says_when_its_dtype_casts_a_lower_precision_core_up(tiny_assembly, tmp_path, caplog):
    """`mmllm infer --dtype float32` (the default) cast a core the assembly loads in bfloat16 up, at twice its
    memory, without a word."""
    from mmllm.cli import _load_model

    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(save_core("qwen2", tmp_path / "core")),
                   "dtype": "bfloat16"}
    AnyToAnyModel.assemble(parse_assembly(data)).save_pretrained(tmp_path / "ckpt")
    model = _load_model(str(tmp_path / "ckpt"), "cpu", "bfloat16")
    assert model.llm.lm_head().base.weight.dtype == torch.bfloat16 and "casts it" not in caplog.text
    model = _load_model(str(tmp_path / "ckpt"), "cpu", "float32")
    assert model.llm.lm_head().base.weight.dtype == torch.float32
    assert "loads in bfloat16 (its assembly's llm.dtype); --dtype float32 casts it and every other part up" in caplog.text
    assert "pass --dtype bfloat16" in caplog.text


@pytest.mark.parametrize("arch", ["gemma", "qwen2", "gpt2"])
def test_a_signal_row_embeds_as_the_table_row_it_equals(arch, tmp_path):
    """The signal rows are new rows of the core's embedding table: one holding row 5's values embeds as
    token 5 does, also where the table scales its rows (Gemma: by sqrt(hidden_size)), and the LM head
    scores it as token 5."""
    core = HFCausalLM.from_options(HFCausalLM.Options(str(save_core(arch, tmp_path / arch))))
    core.add_tokens({"image": 2})
    emb, head = core.model.get_input_embeddings(), core.lm_head()
    with torch.no_grad():
        emb.signal[0] = emb.base.weight[5]
        head.signal[0] = head.base.weight[5]
    signal = core.signal_ids["image"][0]
    torch.testing.assert_close(core.embed(torch.tensor([[signal]])), core.embed(torch.tensor([[5]])))
    logits = head(torch.randn(3, core.hidden_size))
    torch.testing.assert_close(logits[:, signal], logits[:, 5])
    assert logits.shape[-1] == core.vocab_size  # a padded table's unused rows are not scored


@pytest.mark.parametrize("arch", ["gpt2", "gemma"])
def test_a_model_folder_without_its_tokenizer_is_refused(arch, tmp_path):
    """transformers 5 gives such a folder an empty tokenizer of the model type's class (GPT-2: no tokens;
    Gemma: every word <unk>) without a word; mmllm would have trained on it."""
    folder = save_core(arch, tmp_path / arch)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    for weights in (True, False):
        with pytest.raises(ConfigError, match=r"llm\.name_or_path: the tokenizer loaded from .* its tokenizer files "
                                              r"are missing \(the folder holds \['config\.json', .*save_pretrained"):
            HFCausalLM.from_options(HFCausalLM.Options(str(folder)), weights=weights)


def test_a_local_name_or_path_that_is_no_model_folder_says_what_it_is(tmp_path):
    def refused(path: Path, pattern: str) -> None:
        with pytest.raises(ConfigError, match=pattern):
            HFCausalLM.from_options(HFCausalLM.Options(str(path)), weights=False)

    refused(tmp_path / "nowhere", r"llm\.name_or_path: .*nowhere does not exist \(a local model dir")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", r"empty holds no config\.json.*model\.save_pretrained")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    refused(tmp_path / "m.gguf", r"m\.gguf is a file, not a model folder; a GGUF file is named by llm\.gguf_file")


def test_a_tokenizer_without_a_chat_template_is_refused_unless_the_yaml_gives_one(tiny_assembly, tmp_path):
    """Every sample and request is rendered with the chat template: without one, training skipped every
    sample as unreadable and wrote a checkpoint of NaN losses. `llm.chat_template` supplies one."""
    from mmllm.data.template import encode_prompt
    from mmllm.inference.generate import token_spec
    from mmllm.tiny_tokenizer import CHAT_TEMPLATE

    folder = save_core("gpt2", tmp_path / "gpt2")
    (folder / "chat_template.jinja").unlink()
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(folder)}
    with pytest.raises(ConfigError, match=r"^llm: the tokenizer of .*gpt2 has no chat template.*llm\.chat_template"):
        AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    for template in (CHAT_TEMPLATE, str(tmp_path / "chat.jinja")):
        data["llm"]["chat_template"] = template
        model = AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
        ids, _ = encode_prompt([{"role": "user", "content": "hello"}], model.llm.tokenizer, token_spec(model))
        assert model.llm.tokenizer.decode(ids) == "<|bos|>user\nhello<|eos|>\n<|bos|>assistant\n"
    data["llm"]["chat_template"] = str(tmp_path / "nowhere.jinja")
    with pytest.raises(ConfigError, match=r"llm\.chat_template: .*nowhere\.jinja' is neither a Jinja template"):
        AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)


# Like Qwen3's: an assistant turn after the last user turn opens with an empty think block, earlier ones
# do not, so a turn's rendering changes once the next user turn arrives.
THINK_GATED_TEMPLATE = (
    "{% set last = namespace(i=0) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set last.i = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}<|bos|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and loop.index0 > last.i %}<think></think>{% endif %}{{ m['content'] }}<|eos|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}"
)


def test_a_template_that_is_not_prefix_stable_is_named_at_assembly(tiny_assembly, tmp_path, caplog):
    """Such a template skipped every multi-turn sample, each with 'not prefix-stable; cannot place labels';
    now assembly says so once, with what to do, and single-turn samples still encode."""
    from mmllm.data.formats import Conversation, Message
    from mmllm.data.template import encode_conversation
    from mmllm.inference.generate import token_spec

    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(save_core("qwen2", tmp_path / "qwen2")),
                   "chat_template": THINK_GATED_TEMPLATE}
    with caplog.at_level("WARNING", logger="mmllm.llm"):
        model = AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
    assert "not prefix-stable" in caplog.text and "llm.chat_template" in caplog.text
    assert "more than one assistant turn will be skipped" in caplog.text
    spec, tok = token_spec(model), model.llm.tokenizer
    one = Conversation("one", [Message("user", "hi"), Message("assistant", "hello")], source="t")
    assert tok.decode(encode_conversation(one, tok, spec).input_ids).endswith("assistant\n<think></think>hello<|eos|>\n")
    two = Conversation("two", [*one.messages, Message("user", "and?"), Message("assistant", "bye")], source="t")
    with pytest.raises(ValueError, match="turn 4 cannot be placed: multi-turn conversations need"):
        encode_conversation(two, tok, spec)
    caplog.clear()
    data["llm"]["chat_template"] = THINK_GATED_TEMPLATE.replace("loop.index0 > last.i", "true")
    with caplog.at_level("WARNING", logger="mmllm.llm"):
        model = AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
    assert "chat template" not in caplog.text
    assert len(encode_conversation(two, model.llm.tokenizer, token_spec(model)).input_ids) > 0


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite", "qwen2"])
def test_training_logits_are_the_forwards(arch, tmp_path):
    """The losses take logits from the last hidden states at labelled positions; they used the bare LM head,
    while generation runs the forward, which soft-caps (Gemma 2/3) or scales (Cohere, Granite) after it."""
    core = HFCausalLM.from_options(HFCausalLM.Options(str(save_core(arch, tmp_path / arch))))
    core.add_tokens({"image": 2})  # checks the same on a probe
    ids = torch.tensor([[5, 6, 7, core.signal_ids["image"][0], core.signal_ids["image"][1]]])
    with torch.no_grad():
        hidden = core.decoder()(inputs_embeds=core.embed(ids)).last_hidden_state
        torch.testing.assert_close(core.logits(hidden), core.model(input_ids=ids).logits)
        if arch != "qwen2":
            assert not torch.allclose(core.lm_head()(hidden), core.model(input_ids=ids).logits)


def test_a_core_with_a_post_head_transform_mmllm_does_not_know_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmllm.llm import LLMCore

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    tokenizer = build_tiny_tokenizer(512, 256)
    model = Doubled(LlamaConfig(**SIZES, num_key_value_heads=1, vocab_size=len(tokenizer)))
    core = LLMCore(model, tokenizer, {"kind": "test"})
    with pytest.raises(ConfigError, match=r"^llm: Doubled computes its logits otherwise than its LM head .*not supported"):
        core.add_tokens({"image": 2})


def test_a_tokenizer_that_already_has_a_placeholder_is_refused_naming_it(tmp_path):
    folder = save_core("qwen2", tmp_path / "qwen2")  # its table has 16 spare rows
    tokenizer = build_tiny_tokenizer(512, 256)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(folder)
    core = HFCausalLM.from_options(HFCausalLM.Options(str(folder)), weights=False)
    with pytest.raises(ConfigError, match=rf"^llm: the tokenizer already has <image> \(id {len(tokenizer) - 1}\); "
                                          "mmllm adds its placeholders"):
        core.add_tokens({"image": 2})


def test_the_context_is_the_cores_position_table(tiny_assembly, tmp_path):
    """GPT-2 learns one embedding per position: a max_length past n_positions failed with 'index out of range'
    at the first long sample, and every answer running past it did the same at inference."""
    from mmllm.inference.generate import Request, prepare_request

    data = to_dict(tiny_assembly)  # max_length 128
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(save_core("gpt2-short", tmp_path / "gpt2"))}
    with pytest.raises(ConfigError, match=r"^max_length=128 is longer than the LLM's context, 40 positions .*"
                                          r"set max_length to at most 40"):
        AnyToAnyModel.assemble(parse_assembly(data), llm_weights=False)
    data["max_length"] = 40
    model = AnyToAnyModel.assemble(parse_assembly(data))
    request = Request(messages=[{"role": "user", "content": "Draw a red circle."}])
    prompt = len(prepare_request(model, request).ids)
    answer = model.generate([request], max_new_tokens=64, decode_media=False)[0]
    assert 0 < len(answer.token_ids) <= 40 - prompt


def test_a_batch_with_a_prompt_near_the_context_end_answers_every_request(tiny_assembly, tmp_path):
    """In a batch a row that has stopped still takes a position at every step the others generate: a prompt
    near the end of GPT-2's position table beside a short one failed with 'index out of range'."""
    from mmllm.inference.generate import Request, prepare_request

    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(save_core("gpt2-short", tmp_path / "gpt2"))}
    data["max_length"] = 40
    model = AnyToAnyModel.assemble(parse_assembly(data))
    short = Request(messages=[{"role": "user", "content": "Hi."}])
    long = Request(messages=[{"role": "user", "content": "Draw a red circle and a blue square and a green one please."}])
    prompts = [len(prepare_request(model, r).ids) for r in (short, long)]
    assert prompts[1] > 30 and prompts[0] + 20 < 40  # the short one may answer past the long one's room
    together = model.generate([short, long], max_new_tokens=64, decode_media=False)
    for request, prompt, answer in zip((short, long), prompts, together, strict=True):
        assert 0 < len(answer.token_ids) <= 40 - prompt
        assert answer.token_ids == model.generate([request], max_new_tokens=64, decode_media=False)[0].token_ids


def test_a_merged_export_of_a_core_with_its_own_code_loads_and_answers_alike(tiny_assembly, tmp_path):

    from mmllm.training.checkpoint import export_merged, save_model_checkpoint

    core = save_core_with_own_code(tmp_path / "core")
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": str(core), "trust_remote_code": True}
    model = AnyToAnyModel.assemble(parse_assembly(data))
    model.add_lora(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in model.lora_parameters().values():
            p.normal_(0, 0.2)  # LoRA B starts at zero: make the adapter change the answers
    model.eval()  # no LoRA dropout
    ckpt = save_model_checkpoint(model, tmp_path / "ckpt", {})
    merged = AnyToAnyModel.from_pretrained(export_merged(ckpt, tmp_path / "merged", trust_remote_code=True),
                                           trust_remote_code=True)
    assert type(merged.llm.model).__name__ == "CustomForCausalLM" and merged.lora_config is None
    ids = torch.tensor([[3, 40, 41, 42, model.llm.signal_ids["image"][0]]])
    with torch.no_grad():
        a = model.llm.lm_head()(model.llm.decoder()(inputs_embeds=model.llm.embed(ids)).last_hidden_state)
        b = merged.llm.lm_head()(merged.llm.decoder()(inputs_embeds=merged.llm.embed(ids)).last_hidden_state)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_of_a_core_named_dot_slash_relative_loads_it_from_the_working_directory(
        tiny_assembly, tmp_path, monkeypatch):
    from mmllm.training.checkpoint import export_merged, export_weights_only, save_model_checkpoint

    monkeypatch.chdir(tmp_path)
    save_core("qwen2", tmp_path / "core")
    data = to_dict(tiny_assembly)
    data["llm"] = {"kind": "hf-causal-lm", "name_or_path": "./core"}  # relative paths: from the working directory
    model = AnyToAnyModel.assemble(parse_assembly(data))
    ckpt = save_model_checkpoint(model, tmp_path / "run" / "step-1", {})
    for loaded in (AnyToAnyModel.from_pretrained(ckpt),  # not taken for a merged export's ./llm, inside it
                   AnyToAnyModel.from_pretrained(export_weights_only(ckpt, tmp_path / "ship"))):
        assert loaded.llm.describe()["name_or_path"] == "./core"
    merged = export_merged(ckpt, tmp_path / "merged")  # its own ./llm is inside it, wherever it is loaded from
    monkeypatch.chdir(tmp_path / "run")
    assert AnyToAnyModel.from_pretrained(merged).llm.describe()["name_or_path"] == str(merged / "llm")


def write_tiny_llama_gguf(path: Path, hidden: int = 16, ff: int = 32, heads: int = 2, kv_heads: int = 1) -> list[str]:
    """A one-block random Llama as a float32 GGUF file with a GPT-2 style (byte-level BPE) tokenizer, laid out
    as llama.cpp writes SmolLM2's: the tiny tokenizer's tokens and merges, ``<|endoftext|>`` as the unknown
    token, bos/eos/pad ids and the chat template. Returns its token list."""
    import json

    import gguf
    import numpy as np

    from mmllm.tiny_tokenizer import CHAT_TEMPLATE

    tok = build_tiny_tokenizer(512, 256)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])] + ["<|endoftext|>"]
    control = {*tok.all_special_tokens, "<|endoftext|>"}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_unk_token_id(len(tokens) - 1)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head_dim = hidden // heads
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for name, shape in {"attn_q": (hidden, hidden), "attn_k": (kv_heads * head_dim, hidden),
                        "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, hidden),
                        "ffn_gate": (ff, hidden), "ffn_up": (ff, hidden), "ffn_down": (hidden, ff)}.items():
        writer.add_tensor(f"blk.0.{name}.weight", weight(*shape))
    for norm in ("attn_norm", "ffn_norm"):
        writer.add_tensor(f"blk.0.{norm}.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


def test_a_gguf_core_keeps_the_files_vocabulary_and_end_token(tmp_path, monkeypatch):
    """A GGUF Llama with a GPT-2 style tokenizer (SmolLM2's, the embedded default's core) converts into a core
    whose tokenizer is the file's: transformers 5.0-5.5 read it as CodeLlama's, 5 FIM tokens past the embedding
    table (the core was refused), and 5.6-5.17 gave it the bos token as its eos (generation's stop id)."""
    monkeypatch.setenv("MMLLM_GGUF_CACHE", str(tmp_path / "cache"))
    (tmp_path / "model").mkdir()
    tokens = write_tiny_llama_gguf(tmp_path / "model" / "core.gguf")
    core = HFCausalLM.from_options(HFCausalLM.Options(str(tmp_path / "model"), gguf_file="core.gguf"))
    assert len(core.tokenizer) == len(tokens) == core.model.get_input_embeddings().num_embeddings
    assert core.tokenizer.convert_ids_to_tokens([core.tokenizer.eos_token_id]) == ["<|eos|>"]
    assert core.tokenizer("a red circle")["input_ids"] == build_tiny_tokenizer(512, 256)("a red circle")["input_ids"]
    core.add_tokens({"image": 2})  # the signal rows go after the file's table
    assert core.signal_ids["image"] == [len(tokens), len(tokens) + 1]
