"""The LLM core: load it (hub id, local dir, GGUF file, or a tiny in-process Llama), freeze it,
and add the signal tokens and media placeholders.

Only the *new* rows learn. Instead of resizing the embedding matrix and the LM head and hoping a
gradient mask holds (NExT-GPT trained both whole matrices by accident), the original modules stay
frozen and untouched, and two thin wrappers add the new rows as separate parameters:

* :class:`ExtendedEmbedding` -- ids below ``first_new_id`` read the frozen table; signal-token ids
  read the trainable ``signal`` rows (times the table's ``embed_scale`` where it has one, as Gemma's
  does); placeholder ids read a zero buffer (their embeddings are replaced by projected media features
  anyway);
* :class:`ExtendedLMHead` -- logits over the original vocabulary (frozen) concatenated with the
  signal-token logits. With tied embeddings the signal rows are one shared parameter.

Token ids: the tokenizer's original ids, then the signal tokens of each output modality, then the
placeholders ``<image>``, ``<audio>``, ``<video>``. Placeholders are never predicted.

Built with ``weights=False`` the core is its config on torch's meta device (no weights read, no memory):
its tokenizer, token ids and sizes are those of the loaded core, for what needs only them (``mmllm data
check``, ``mmllm cache``, ``mmllm inspect``); embedding tokens with it is refused by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmllm.config import MODALITIES, ConfigError
from mmllm.folder_lock import waiting_lock
from mmllm.locations import resolve_location

log = logging.getLogger(__name__)

PLACEHOLDERS = {m: f"<{m}>" for m in MODALITIES}
SIGNAL_PREFIX = {"image": "img", "audio": "aud", "video": "vid"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def signal_token_strings(modality: str, count: int) -> list[str]:
    return [f"<{SIGNAL_PREFIX[modality]}_{i}>" for i in range(count)]


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token from an attention mask: the count of real tokens before it (padding at 0).
    Training, the retention KL and generation all use this, so they see the same positions."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class ExtendedEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, first_new_id: int, signal: nn.Parameter, num_placeholders: int):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.signal = signal
        self.register_buffer(
            "placeholder", torch.zeros(num_placeholders, base.embedding_dim, dtype=base.weight.dtype), persistent=False
        )

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects dtype/device/width
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.first_new_id
        out = self.base(ids.masked_fill(is_new, 0))
        if bool(is_new.any()):
            extra = torch.cat([self.signal.to(out.dtype), self.placeholder.to(out.dtype)])
            new = extra[(ids - self.first_new_id).clamp(0, extra.shape[0] - 1)]
            scale = getattr(self.base, "embed_scale", None)
            if scale is not None:
                # The table's own scale (Gemma, XGLM, BioGPT, ... multiply every row by sqrt(hidden) in the
                # embedding's forward): the new rows are rows of the same table, so they read the same way
                # (the LM head, tied or not, reads them unscaled, as it reads the table)
                new = new * torch.as_tensor(scale).to(device=out.device, dtype=out.dtype)
            out = torch.where(is_new.unsqueeze(-1), new, out)
        return out


class ExtendedLMHead(nn.Module):
    def __init__(self, base: nn.Linear, first_new_id: int, signal: nn.Parameter):
        super().__init__()
        self.base = base
        self.first_new_id = first_new_id
        self.signal = signal

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.base.bias[: self.first_new_id] if self.base.bias is not None else None
        logits = F.linear(hidden, self.base.weight[: self.first_new_id], bias)
        return torch.cat([logits, F.linear(hidden, self.signal.to(hidden.dtype))], dim=-1)


class LLMCore(nn.Module):
    """A frozen causal LM plus its tokenizer, with signal tokens and placeholders added."""

    def __init__(self, model: nn.Module, tokenizer: Any, describe: dict[str, Any]):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        # False for a core built from its config alone (weights=False: parameters on the meta device, for
        # good); read once here, not on every embed
        self.has_weights = next(model.parameters()).device.type != "meta"
        self._describe = describe
        self.model.requires_grad_(False)
        self.model.eval()
        if not getattr(tokenizer, "chat_template", None):
            source = describe.get("name_or_path") or describe.get("kind", "the LLM")
            raise ConfigError(
                f"llm: the tokenizer of {source} has no chat template (base models often have none), and mmllm "
                "renders every sample and request with it: set llm.chat_template to a Jinja template (its text, or "
                "a .jinja file), or use the model's chat/instruct variant"
            )
        from mmllm.data.template import template_problem

        problem = template_problem(tokenizer)
        if problem is not None:  # single-turn samples and requests still work: say it once, here
            log.warning("llm: the chat template of %s: %s; conversations with more than one assistant turn will be "
                        "skipped as unreadable", describe.get("name_or_path") or describe.get("kind"), problem)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.signal_ids: dict[str, list[int]] = {}
        self.placeholder_ids: dict[str, int] = {}
        self.first_new_id: int | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


    @property
    def max_positions(self) -> int | None:
        """The longest sequence the core takes (its config's ``max_position_embeddings``; GPT-2's
        ``n_positions``), or None where the config states none."""
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        return int(positions) if isinstance(positions, int) else None

    def describe(self) -> dict[str, Any]:
        return dict(self._describe)

    def add_tokens(self, signal_tokens: dict[str, int], seed: int = 0) -> None:
        """Add signal tokens (per output modality) and the media placeholders; wrap embeddings/head."""
        if self.first_new_id is not None:
            raise RuntimeError("signal tokens were already added")
        tok = self.tokenizer
        first = len(tok)
        base_emb: nn.Embedding = self.model.get_input_embeddings()
        if first > base_emb.num_embeddings:
            raise ConfigError(
                f"tokenizer has {first} tokens but the LLM's embedding table has {base_emb.num_embeddings} rows"
            )
        signal_strings = [s for m, n in signal_tokens.items() for s in signal_token_strings(m, n)]
        placeholder_strings = [PLACEHOLDERS[m] for m in MODALITIES]
        vocab = tok.get_vocab()
        present = {s: vocab[s] for s in signal_strings + placeholder_strings if s in vocab}
        if present:  # a LLaVA-style tokenizer already holds <image>
            raise ConfigError(
                f"llm: the tokenizer already has {', '.join(f'{s} (id {i})' for s, i in present.items())}; mmllm adds "
                "its placeholders and signal tokens as new ids beside the frozen table, so it needs a tokenizer "
                "without them (the base LLM's own, not a multimodal derivative's)"
            )
        added = tok.add_special_tokens(
            {"additional_special_tokens": signal_strings + placeholder_strings}, replace_extra_special_tokens=False
        )
        if added != len(signal_strings) + len(placeholder_strings):
            raise ConfigError(
                "some signal/placeholder tokens already exist in the tokenizer; "
                f"expected to add {len(signal_strings) + len(placeholder_strings)}, added {added}"
            )
        ids = tok.convert_tokens_to_ids(signal_strings + placeholder_strings)
        if ids != list(range(first, first + len(ids))):
            raise RuntimeError(f"new token ids are not contiguous from {first}: {ids}")
        for m, n in signal_tokens.items():
            self.signal_ids[m] = tok.convert_tokens_to_ids(signal_token_strings(m, n))
        self.placeholder_ids = {m: tok.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in MODALITIES}
        self.first_new_id = first

        # New rows start at the mean of the existing ones plus small noise (seeded).
        weight = base_emb.weight.detach().float()
        gen = torch.Generator().manual_seed(seed)
        n_signal = len(signal_strings)
        noise = torch.randn(n_signal, weight.shape[1], generator=gen).to(weight.device) * weight.std() * 0.1
        # The new rows are fp32 whatever the core's dtype: a bf16 row would round small AdamW updates
        # away. The wrappers cast them to the activations' dtype on use.
        signal = nn.Parameter(weight[:first].mean(0, keepdim=True) + noise)
        head = self.model.get_output_embeddings()
        tied = head is not None and head.weight is base_emb.weight
        self.model.set_input_embeddings(ExtendedEmbedding(base_emb, first, signal, len(placeholder_strings)))
        if head is not None:
            if tied:
                head_signal = signal
            else:
                hw = head.weight.detach().float()
                head_signal = nn.Parameter(hw[:first].mean(0, keepdim=True) + noise)
            self.model.set_output_embeddings(ExtendedLMHead(head, first, head_signal))
        # The wrappers own the new rows; nothing may re-tie or resize behind our back.
        self.model.config.tie_word_embeddings = False
        self.model.requires_grad_(False)
        log.info("added %d signal tokens and %d placeholders from id %d (tied head: %s)",
                 n_signal, len(placeholder_strings), first, tied)
        self.check_logits()

    # -- parameter groups -------------------------------------------------------------------
    def signal_parameters(self) -> dict[str, nn.Parameter]:
        out = {"embed_signal": self.model.get_input_embeddings().signal}
        head = self.model.get_output_embeddings()
        if head is not None and head.signal is not out["embed_signal"]:
            out["head_signal"] = head.signal
        return out

    @property
    def vocab_size(self) -> int:
        """Size of the logits: original vocabulary plus signal tokens (placeholders excluded)."""
        return int(self.first_new_id + sum(len(v) for v in self.signal_ids.values()))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.has_weights:
            raise RuntimeError("this LLM was built from its config alone (weights=False / llm_weights=False: "
                               "tokenizer and sizes only), so it cannot run; assemble the model with its weights")
        return self.model.get_input_embeddings()(ids)

    def decoder(self) -> nn.Module:
        """The transformer body (without LM head): returns last hidden states."""
        return self.model.get_decoder()

    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from last hidden states as the core's own forward (and so generation) computes them: the LM
        head, then what the architecture applies after it -- Cohere's ``logit_scale``, Granite's
        ``logits_scaling``, Gemma 2/3's ``final_logit_softcapping``. :meth:`check_logits` proves it per core."""
        out = self.lm_head()(hidden)
        config = self.model.config.get_text_config()
        if (scale := getattr(config, "logit_scale", None)) is not None:
            out = out * scale
        if (scaling := getattr(config, "logits_scaling", None)) is not None:
            out = out / scaling
        if cap := getattr(config, "final_logit_softcapping", None):
            out = torch.tanh(out / cap) * cap
        return out

    def check_logits(self, where: str = "llm") -> None:
        """Refuse a core whose forward turns hidden states into logits otherwise than :meth:`logits` (training
        computes its losses with :meth:`logits` at the labelled positions only; generation runs the forward)."""
        if not self.has_weights:
            return
        device = self.model.get_input_embeddings().weight.device
        ids = torch.arange(min(4, self.first_new_id), device=device)[None]
        mask = torch.ones_like(ids)
        with torch.no_grad():
            forward = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            hidden = self.decoder()(inputs_embeds=self.embed(ids), attention_mask=mask,
                                    use_cache=False).last_hidden_state
            ours = self.logits(hidden).float()
        tolerance = 1e-3 * float(forward.abs().max()) + 1e-6
        if forward.shape != ours.shape or not torch.allclose(forward, ours, rtol=1e-3, atol=tolerance):
            differ = float((forward - ours).abs().max()) if forward.shape == ours.shape else "in shape"
            raise ConfigError(
                f"{where}: {type(self.model).__name__} computes its logits otherwise than its LM head (max "
                f"difference {differ}), in a way mmllm does not know, so training would learn other logits than "
                "generation samples: this architecture is not supported as the core yet (mmllm.llm.LLMCore.logits "
                "lists the post-head transforms it applies)"
            )


# --------------------------------------------------------------------------------------------
# Loaders (registry kinds)
# --------------------------------------------------------------------------------------------


GGUF_CACHE_ENV = "MMLLM_GGUF_CACHE"  # this machine's GGUF conversion cache, over any assembly's gguf_cache
MACHINE_OPTIONS = ("gguf_cache",)  # hf-causal-lm options that say where this machine keeps things, not what the model is


def gguf_cache_root(configured: str) -> Path:
    """Where GGUF conversions are written: ``$MMLLM_GGUF_CACHE`` when set, else the assembly's ``gguf_cache``
    (a checkpoint's recorded one is dropped when it loads: :func:`without_machine_options`)."""
    return Path(os.environ.get(GGUF_CACHE_ENV) or configured).expanduser()


def without_machine_options(llm: Any) -> Any:
    """A recorded ``llm`` section without the options that name places on the machine that recorded it: a
    checkpoint (someone else's, perhaps) must not choose where this machine writes a GGUF conversion."""
    if not isinstance(llm, dict) or llm.get("kind") != "hf-causal-lm":
        return llm
    return {k: v for k, v in llm.items() if k not in MACHINE_OPTIONS}


def _gguf_cache_dir(gguf_path: Path, cache_root: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors model dir (reloads in well under a second)."""
    out = _gguf_cache_dir(gguf_path, cache_root)
    return convert_once(out, lambda tmp: _dequantize_into(gguf_path, tmp), f"dequantizing {gguf_path.name}")


def convert_once(out: Path, make: Callable[[Path], None], what: str) -> Path:
    """The model folder ``out``, made by ``make(tmp)`` and renamed into place unless it is there already.

    Every process of a run converts the same file: the first to take ``out``'s lock (``<out>.lock``) makes it
    while the others wait, then find it made -- one conversion per machine (per shared cache folder), where each
    process used to hold two fp32 copies of the model at once. The temporary folder is named by host and pid
    too: processes of other machines sharing the cache may have this one's pid (a container per machine)."""
    if _converted(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with waiting_lock(out.with_name(f"{out.name}.lock"),
                      "each process of the run that finds no conversion there makes its own"):
        if _converted(out):  # another process made it while this one waited
            return out
        log.info("%s once into %s (about 30 s; other processes converting it wait)", what, out)
        tmp = out.with_name(f"{out.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        try:
            tmp.replace(out)
        except OSError:
            if not _converted(out):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a process without the lock (no flock here) finished first
    return out


def _converted(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def _dequantize_into(gguf_path: Path, tmp: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mmllm.gguf_header import check_gguf_header

    check_gguf_header(gguf_path)  # before the gguf package's reader, which allocates what the header claims
    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {real_missing}, unexpected {unexpected}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


class HFCausalLM:
    """Any ``AutoModelForCausalLM``: a hub id, a local dir, or a GGUF file (``gguf_file``)."""

    @dataclass
    class Options:
        name_or_path: str
        gguf_file: str | None = None
        revision: str | None = None
        dtype: str = "float32"
        trust_remote_code: bool = False
        gguf_cache: str = "~/.cache/mmllm/gguf"
        # a Jinja chat template (its text, or a path to a .jinja file) for a tokenizer without one, or to
        # replace its own; recorded with the checkpoint's assembly, so inference renders prompts the same way
        chat_template: str | None = None

    @classmethod
    def from_options(cls, o: Options, where: str = "llm", weights: bool = True) -> LLMCore:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if o.dtype not in DTYPES:
            raise ConfigError(f"llm.dtype: {o.dtype!r} is not one of {list(DTYPES)}")
        location: str | Path = o.name_or_path
        local = resolve_location(o.name_or_path)
        if o.gguf_file:
            gguf = resolve_location(o.gguf_file)
            if not gguf.is_absolute():
                gguf = local / gguf
            if not gguf.is_file():
                raise ConfigError(f"llm.gguf_file: {gguf} not found")
            location = convert_gguf(gguf, gguf_cache_root(o.gguf_cache))
        elif local.exists():
            location = local
            _check_model_dir(local, where)
        elif local.is_absolute() or o.name_or_path.startswith((".", "~")):
            raise ConfigError(f"{where}.name_or_path: {local} does not exist (a local model dir; a hub id reads "
                              "'org/name')")
        kwargs = {"revision": o.revision, "trust_remote_code": o.trust_remote_code}
        try:
            tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        except (OSError, ValueError) as exc:  # not found / offline; no tokenizer files transformers can build from
            raise ConfigError(f"{where}.name_or_path: cannot load the tokenizer of {o.name_or_path!r}: {exc} (a model "
                              "folder holds its tokenizer's files too: tokenizer.save_pretrained(folder))") from exc
        _check_tokenizer(tokenizer, location, where)
        if o.chat_template is not None:
            tokenizer.chat_template = _read_template(o.chat_template, where)
        try:
            if weights:
                model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[o.dtype], **kwargs)
            else:
                config = AutoConfig.from_pretrained(location, **kwargs)
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[o.dtype],
                                                             trust_remote_code=o.trust_remote_code)
        except (OSError, ValueError) as exc:  # not found / offline; an architecture transformers does not know
            raise ConfigError(f"{where}.name_or_path: cannot load {o.name_or_path!r}: {exc}") from exc
        return LLMCore(model, tokenizer, {"kind": "hf-causal-lm", "name_or_path": o.name_or_path,
                                          "gguf_file": o.gguf_file, "dtype": o.dtype})


def _check_model_dir(folder: Path, where: str) -> None:
    """A local ``name_or_path`` must be a folder ``save_pretrained`` wrote (a GGUF file goes in ``gguf_file``)."""
    if folder.is_file():
        hint = (f"; a GGUF file is named by {where}.gguf_file (name_or_path: its folder)"
                if folder.suffix == ".gguf" else "")
        raise ConfigError(f"{where}.name_or_path: {folder} is a file, not a model folder{hint}")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{where}.name_or_path: {folder} holds no config.json, so it is no saved transformers "
                          f"model (it holds {sorted(p.name for p in folder.iterdir())[:12]}); write it with "
                          "model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")


def _read_template(value: str, where: str) -> str:
    """``chat_template``: the template's text, or the path of a file holding it (``.jinja``)."""
    if "{" in value:  # Jinja text: a file name holds no braces
        return value
    path = resolve_location(value)
    if not path.is_file():
        raise ConfigError(f"{where}.chat_template: {value!r} is neither a Jinja template (no '{{') nor a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:  # a traceback blaming mmllm (exit 70), and the locale's encoding was used
        raise ConfigError(f"{where}.chat_template: {path} is not UTF-8 text ({exc}); re-encode the file (e.g. "
                          "`iconv -f latin1 -t utf-8`)") from exc


def _check_tokenizer(tokenizer: Any, location: str | Path, where: str) -> None:
    """transformers 5 answers a model folder without tokenizer files with an *empty* tokenizer of the model
    type's class (GPT-2, Qwen, Phi: no tokens; Gemma: every word ``<unk>``), silently: refuse one that cannot
    read plain words."""
    ids = tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    if any(i != tokenizer.unk_token_id for i in ids):
        return
    folder = Path(location)
    held = f" (the folder holds {sorted(p.name for p in folder.iterdir())[:12]})" if folder.is_dir() else ""
    raise ConfigError(
        f"{where}.name_or_path: the tokenizer loaded from {str(location)!r} has {len(tokenizer)} token(s) and reads "
        f"'a red circle' as {tokenizer.convert_ids_to_tokens(ids)}: its tokenizer files are missing{held}; save "
        "the model's tokenizer into the same folder (tokenizer.save_pretrained(folder))"
    )


class TinyLlama:
    """A small Llama built in-process from a config (random weights, seeded), with the tiny tokenizer."""

    @dataclass
    class Options:
        hidden_size: int = 64
        num_layers: int = 2
        num_heads: int = 4
        num_kv_heads: int = 2
        intermediate_size: int = 128
        vocab_size: int = 512
        max_position_embeddings: int = 512
        tie_word_embeddings: bool = True
        init_std: float = 0.02  # weight init; larger gives a random core sharper, more steerable logits
        seed: int = 0

        def __post_init__(self) -> None:
            """Sizes transformers would refuse (a traceback, read as mmllm's fault) or build a model of that fails
            on its first forward (num_heads not a multiple of num_kv_heads): refused here, naming the option."""
            sizes = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")
            for name in sizes:
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.hidden_size % self.num_heads or self.hidden_size // self.num_heads % 2:
                raise ValueError(f"hidden_size={self.hidden_size} must be num_heads={self.num_heads} times an even "
                                 "head width (rotary positions turn pairs of dimensions)")
            if self.num_heads % self.num_kv_heads:
                raise ValueError(f"num_kv_heads={self.num_kv_heads} does not divide num_heads={self.num_heads}")

    @classmethod
    def from_options(cls, o: Options, where: str = "llm", weights: bool = True) -> LLMCore:
        from transformers import LlamaConfig, LlamaForCausalLM

        from mmllm.tiny_tokenizer import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer(o.vocab_size, o.max_position_embeddings)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=o.hidden_size,
            num_hidden_layers=o.num_layers,
            num_attention_heads=o.num_heads,
            num_key_value_heads=o.num_kv_heads,
            intermediate_size=o.intermediate_size,
            max_position_embeddings=o.max_position_embeddings,
            tie_word_embeddings=o.tie_word_embeddings,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            initializer_range=o.init_std,
        )
        with torch.random.fork_rng(devices=[]), contextlib.nullcontext() if weights else torch.device("meta"):
            torch.manual_seed(o.seed)
            model = LlamaForCausalLM(config)
        return LLMCore(model, tokenizer, {"kind": "tiny-llama", **o.__dict__})
