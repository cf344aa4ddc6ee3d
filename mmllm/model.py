"""AnyToAnyModel: the assembled model -- splice media in, compute the stage losses, generate out.

Assembly (:meth:`AnyToAnyModel.assemble`) builds every part through the registry and checks every
dimension that must agree *before* any training: encoder width -> input projection -> LLM hidden
size, and output projection -> decoder conditioning shape. Errors name the keys on both sides.

The placeholder contract (as transformers' Llava): each ``<image>`` in the text is expanded by
the collator into as many placeholder ids as the input projection yields tokens; here the
projected features replace them with ``masked_scatter``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mmllm import registry
from mmllm.config import (
    ALL_LINEAR,
    AssemblyConfig,
    ConfigError,
    LoraConfig,
    LossConfig,
    parse_assembly,
    to_dict,
)
from mmllm.decoders._diffusion import shared_text_encoders
from mmllm.decoders.base import DECODER_PARTS, MediaDecoder
from mmllm.encoders.base import MediaEncoder
from mmllm.llm import LLMCore, position_ids
from mmllm.projections import InputProjection, OutputProjection
from mmllm.seeding import seeded as seeded_generators

if TYPE_CHECKING:
    from mmllm.inference.generate import Request

log = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded(seed: int, where: str):
    """Build under a fixed RNG derived from (seed, where), so a rebuilt random part is identical."""
    offset = int(hashlib.sha256(where.encode()).hexdigest()[:8], 16)
    with seeded_generators((seed * 1_000_003 + offset) % (2**63)):
        yield


@dataclass
class GenerationResult:
    """One request's answer: its text (special tokens dropped), the answer's token ids, and per output
    modality one entry per signal-token group it emitted -- the decoder conditioning the output projection
    made, and the media the decoder made from it (a ``PIL.Image.Image``, an :class:`mmllm.data.media.Audio`
    or an :class:`mmllm.data.media.Video`; none when generated with ``decode_media=False``). ``outputs``: the
    modality of each signal-token group, in the order the answer emitted them; :attr:`reply` is the answer as the
    assistant message to give back in a later request's ``messages``."""

    text: str
    token_ids: list[int]
    # per output modality, one entry per emitted signal-token group
    conditioning: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    media: dict[str, list[Any]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    # the modality of a signal group the token limit (max_new_tokens, or the context's end) cut off: dropped, so
    # in neither ``outputs`` nor ``media``, nor in ``reply``; None where no group was cut
    cut_off: str | None = None

    @property
    def reply(self) -> dict[str, Any]:
        """The answer as an assistant message (``{"role": "assistant", "content": text, "outputs": [{"modality":
        ...}, ...]}``, as training data writes a turn that produced media): a conversation that goes on gives it
        back in its ``messages``, and the prompt then renders it with its signal tokens, as training renders
        such a turn (the text alone would lack them)."""
        return {"role": "assistant", "content": self.text, "outputs": [{"modality": m} for m in self.outputs]}


class AnyToAnyModel(nn.Module):
    def __init__(
        self,
        config: AssemblyConfig,
        llm: LLMCore,
        encoders: dict[str, MediaEncoder],
        decoders: dict[str, MediaDecoder],
        input_projections: dict[str, InputProjection],
        output_projections: dict[str, OutputProjection],
        checks: list[str],
    ):
        super().__init__()
        self.config = config
        self.llm = llm
        self.encoders = nn.ModuleDict(encoders)
        self.decoders = nn.ModuleDict(decoders)
        self.input_projections = nn.ModuleDict(input_projections)
        self.output_projections = nn.ModuleDict(output_projections)
        self.checks = checks
        self.lora_config: LoraConfig | None = None
        self._peft_model = None  # a PeftModel wrapping llm.model (same modules), when LoRA is on
        # Set by the training loop under FSDP: each sharded module's forward is a collective, so every
        # process must run the same modules the same number of times, whatever its batch holds.
        self.sharded = False

    # ------------------------------------------------------------------ assembly
    @classmethod
    def assemble(
        cls,
        config: AssemblyConfig,
        decoder_parts: str | Mapping[str, str] = "all",
        encoder_weights: Collection[str] | None = None,
        llm_weights: bool = True,
    ) -> AnyToAnyModel:
        """Build every part and check every dimension. ``decoder_parts`` (one of ``DECODER_PARTS``, or one
        per modality, ``"config"`` for a modality not named): what each decoder loads -- ``"all"`` to
        generate; ``"conditioning"`` (text encoder) for MSE targets; ``"config"`` (no weights) when
        nothing runs it. ``encoder_weights``: the modalities whose encoder loads its weights (None: all);
        the others are built as :class:`EncoderShape`, reading no weights. ``llm_weights=False``: the LLM
        is its config on the meta device (tokenizer, token ids and sizes only). The checks are the same.
        ``config`` is checked as it is now, as loading it from YAML checks it (parts added or taken out in
        Python after it was made included); the model holds a checked copy, the caller's is left alone."""
        config = config.checked()
        parts_of = {m: decoder_parts if isinstance(decoder_parts, str) else decoder_parts.get(m, "config")
                    for m in config.decoders}
        bad = sorted({p for p in parts_of.values() if p not in DECODER_PARTS})
        if bad:
            raise ValueError(f"decoder_parts must be among {DECODER_PARTS}, got {bad}")
        for name, given, held in (("decoder_parts", decoder_parts, config.decoders),
                                  ("encoder_weights", encoder_weights, config.encoders)):
            unknown = sorted(set(given) - set(held)) if given is not None and not isinstance(given, str) else []
            if unknown:
                raise ValueError(f"{name} names {unknown}, which the assembly has no {name.split('_')[0]}s for; "
                                 f"its {name.split('_')[0]}s: {sorted(held)}")
        checks: list[str] = []
        with seeded(config.seed, "llm"):
            llm: LLMCore = registry.build("llm", config.llm, "llm", weights=llm_weights)
        llm.add_tokens(config.signal_tokens, seed=config.seed)
        if llm.max_positions is not None and config.max_length > llm.max_positions:
            # a learned position table (GPT-2) fails with an index error at the first long sample
            raise ConfigError(f"max_length={config.max_length} is longer than the LLM's context, "
                              f"{llm.max_positions} positions (its config's max_position_embeddings): "
                              f"set max_length to at most {llm.max_positions}")
        hidden = llm.hidden_size
        encoders: dict[str, MediaEncoder] = {}
        decoders: dict[str, MediaDecoder] = {}
        in_proj: dict[str, InputProjection] = {}
        out_proj: dict[str, OutputProjection] = {}
        for m, spec in config.encoders.items():
            with seeded(config.seed, f"encoders.{m}"):
                enc = registry.build("encoder", spec, f"encoders.{m}", weights=encoder_weights is None or m in encoder_weights)
            if enc.modality != m:
                raise ConfigError(f"encoders.{m}: kind {spec.kind!r} encodes {enc.modality}, not {m}")
            pc = config.input_projections[m]
            if pc.input_dim and pc.input_dim != enc.output_dim:
                raise ConfigError(
                    f"input_projections.{m}.input_dim={pc.input_dim} disagrees with "
                    f"encoders.{m} ({spec.kind}) output_dim={enc.output_dim}"
                )
            encoders[m] = enc.requires_grad_(False).eval()
            with seeded(config.seed, f"input_projections.{m}"):
                try:
                    in_proj[m] = InputProjection(enc.output_dim, enc.num_tokens, hidden, pc)
                except ValueError as exc:
                    raise ConfigError(f"input_projections.{m}: {exc}") from exc
            checks.append(
                f"encoders.{m} ({spec.kind}) -> ({enc.num_tokens}, {enc.output_dim}) -> "
                f"input_projections.{m} ({pc.kind}) -> ({in_proj[m].num_tokens}, {hidden}) = llm hidden size {hidden}"
            )
        with shared_text_encoders():  # one copy of a text encoder several decoders name
            for m, spec in config.decoders.items():
                with seeded(config.seed, f"decoders.{m}"):
                    dec = registry.build("decoder", spec, f"decoders.{m}", parts=parts_of[m])
                if dec.modality != m:
                    raise ConfigError(f"decoders.{m}: kind {spec.kind!r} decodes {dec.modality}, not {m}")
                L, D = dec.conditioning_shape
                oc = config.output_projections[m]
                wanted = (oc.num_queries or L, oc.output_dim or D)
                if wanted != (L, D):
                    raise ConfigError(
                        f"output_projections.{m} produces ({wanted[0]}, {wanted[1]}) (num_queries, output_dim) but "
                        f"decoders.{m} ({spec.kind}) conditioning_shape is ({L}, {D}); "
                        f"set output_projections.{m}.num_queries/output_dim to 0 (derive) or to ({L}, {D})"
                    )
                decoders[m] = dec.requires_grad_(False).eval()
                with seeded(config.seed, f"output_projections.{m}"):
                    try:
                        out_proj[m] = OutputProjection(hidden, config.signal_tokens[m], (L, D), oc)
                    except ValueError as exc:
                        raise ConfigError(f"output_projections.{m}: {exc}") from exc
                checks.append(
                    f"llm hidden {hidden} x {config.signal_tokens[m]} signal tokens -> output_projections.{m} -> "
                    f"({L}, {D}) = decoders.{m} ({spec.kind}) conditioning_shape"
                )
        return cls(config, llm, encoders, decoders, in_proj, out_proj, checks)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, cfg: LoraConfig, allow_unmatched: bool = False) -> None:
        """Attach a fresh LoRA adapter. Every name in ``cfg.target_modules`` must name some module of the
        core (PEFT's rule: the module's name, or its last dotted parts), or it is a ConfigError listing
        the core's own layer names: PEFT itself adapts whatever part of the list matches and silently
        drops the rest (the Llama default's ``o_proj`` on a Phi core). ``allow_unmatched`` only warns, for
        re-attaching an adapter a checkpoint already recorded."""
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        if self._peft_model is not None:
            raise RuntimeError("LoRA is already attached")
        # "all-linear" is expanded here rather than left to PEFT, whose shortcut would also adapt the frozen
        # matrix inside mmllm's wrapped LM head (it only leaves out a head that is itself a linear layer)
        targets = lora_candidate_names(self.llm.model) if cfg.target_modules == ALL_LINEAR else list(cfg.target_modules)
        unmatched = unmatched_lora_targets(self.llm.model, targets)
        if unmatched:
            message = (f"lora.target_modules {targets}: {unmatched} name no module of this LLM "
                       f"({type(self.llm.model).__name__}); its layers LoRA can adapt are "
                       f"{lora_candidate_names(self.llm.model)}: set target_modules in the LoRA YAML to some of these")
            if not allow_unmatched:
                raise ConfigError(message)
            log.warning("%s (the checkpoint's adapter was trained without them)", message)
        peft_cfg = PeftLoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
            bias="none", task_type="CAUSAL_LM",
            # GPT-2 style Conv1D layers store their weight transposed; PEFT would fix it per layer, warning each time
            fan_in_fan_out=_targets_only_conv1d(self.llm.model, targets),
        )
        try:
            with seeded(self.config.seed, "lora"), warnings.catch_warnings():
                # peft asks transformers 5's deprecated alias `is_gradient_checkpointing`: noise no user can act on
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                self._peft_model = get_peft_model(self.llm.model, peft_cfg)
        except ValueError as exc:
            raise ConfigError(f"lora.target_modules {cfg.target_modules}: {exc}") from exc
        self.lora_config = cfg

    def set_lora_dropout(self, p: float) -> None:
        """Change the attached adapter's dropout (the one LoRA setting that does not change its weights)."""
        from dataclasses import replace

        from peft.tuners.lora import LoraLayer

        if self._peft_model is None or self.lora_config is None:
            raise RuntimeError("no LoRA adapter is attached")
        for module in self.llm.model.modules():
            if isinstance(module, LoraLayer):
                for name in list(module.lora_dropout):
                    module.lora_dropout[name] = nn.Dropout(p) if p > 0 else nn.Identity()
        for peft_cfg in self._peft_model.peft_config.values():  # what adapter_config.json records
            peft_cfg.lora_dropout = p
        self.lora_config = replace(self.lora_config, dropout=p)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.llm.model.named_parameters() if "lora_" in n}

    # ------------------------------------------------------------------ parameter groups
    def glue_parameters(self) -> dict[str, dict[str, nn.Parameter]]:
        """Everything that can learn, grouped by what the stage YAML calls it."""
        return {
            "input_projections": {f"input_projections.{n}": p for n, p in self.input_projections.named_parameters()},
            "output_projections": {
                f"output_projections.{n}": p for n, p in self.output_projections.named_parameters()
            },
            "signal_embeddings": {f"llm.{n}": p for n, p in self.llm.signal_parameters().items()},
            "lora": {f"lora.{n}": p for n, p in self.lora_parameters().items()},
        }

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """Projections and signal rows (LoRA is saved separately, in PEFT's format)."""
        groups = self.glue_parameters()
        return {name: _whole(p) for g in ("input_projections", "output_projections", "signal_embeddings")
                for name, p in groups[g].items()}

    def lora_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The LoRA weights under PEFT's own names (for ``save_pretrained(state_dict=...)``); None without LoRA."""
        if self._peft_model is None:
            return None
        return {n: _whole(p) for n, p in self._peft_model.named_parameters() if "lora_" in n}

    def load_learned_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Strict: every key must be present with the same shape; extra keys are refused, and so are values that
        are NaN or inf (:class:`~mmllm.training.checkpoint.CheckpointError`: a diverged run's weights)."""
        from mmllm.training.checkpoint import refuse_nonfinite

        expected = {}
        for group in ("input_projections", "output_projections", "signal_embeddings"):
            expected.update(self.glue_parameters()[group])
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ConfigError(
                f"{source}: learned weights do not match this assembly: "
                f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            )
        refuse_nonfinite(state, source)
        with torch.no_grad():
            for name, p in expected.items():
                if tuple(state[name].shape) != tuple(p.shape):
                    raise ConfigError(f"{source}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
                p.copy_(state[name].to(p.dtype))

    # ------------------------------------------------------------------ forward pieces
    @property
    def device(self) -> torch.device:
        return self.llm.model.get_input_embeddings().weight.device

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        media: dict[str, torch.Tensor],
        media_features: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each modality's placeholder run replaced by projected features.

        ``media[m]`` are encoder inputs; ``media_features[m]`` (from the feature cache, see
        mmllm/data/dataset.py) are precomputed encoder outputs ``{"features": (n, T, D), "index": (n,)}``
        at positions ``index`` among all of the batch's ``m`` items, which skip the encoder.
        """
        embeds = self.llm.embed(input_ids)
        media_features = media_features or {}
        for m in [*media, *(k for k in media_features if k not in media)]:
            mask = input_ids == self.llm.placeholder_ids[m]
            n_slots = int(mask.sum())
            if m not in self.encoders:
                raise ConfigError(f"the batch holds {m} inputs but the assembly has no encoders.{m}")
            feats = self._encoder_features(m, media.get(m), media_features.get(m))
            if feats is None and n_slots == 0:
                continue
            if feats is None:
                raise ValueError(f"{m}: no inputs but {n_slots} placeholder slots in the batch")
            proj = self.input_projections[m](feats.to(_dtype_of(self.input_projections[m])))
            if proj.shape[0] * proj.shape[1] != n_slots:
                raise ValueError(
                    f"{m}: {proj.shape[0]} items x {proj.shape[1]} tokens = {proj.shape[0] * proj.shape[1]} "
                    f"features but {n_slots} placeholder slots in the batch"
                )
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), proj.reshape(-1, proj.shape[-1]).to(embeds.dtype))
        return embeds

    # --- precomputed encoder features and conditioning targets (mmllm.data.precomputed) -----------
    def _encoder_features(
        self, m: str, inputs: torch.Tensor | None, cached: dict[str, torch.Tensor] | None
    ) -> torch.Tensor | None:
        """Encoder outputs of all ``m`` items in placeholder order: computed from ``inputs``, and
        taken from ``cached["features"]`` at positions ``cached["index"]``."""
        encoder = self.encoders[m]
        # an EncoderShape has no weights but keeps their dtype; it refuses to run, by name, below
        enc_dtype = next(encoder.parameters()).dtype if encoder.runnable else encoder.dtype
        computed = None
        if inputs is not None and inputs.shape[0] > 0:
            with torch.no_grad():
                computed = self.encoders[m](inputs.to(self.device, enc_dtype))
        if cached is None or cached["features"].shape[0] == 0:
            return computed
        feats, index = cached["features"].to(self.device, enc_dtype), cached["index"].to(self.device)
        if computed is None:
            return feats
        if tuple(computed.shape[1:]) != tuple(feats.shape[1:]):
            raise ValueError(f"{m}: cached encoder features have shape {tuple(feats.shape[1:])} but encoders.{m} "
                             f"gives {tuple(computed.shape[1:])}; rebuild the cache with `mmllm cache`")
        out = computed.new_empty((computed.shape[0] + feats.shape[0], *computed.shape[1:]))
        rest = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
        rest[index] = False
        out[index] = feats.to(out.dtype)
        out[rest] = computed
        return out

    def signal_targets(self, m: str, captions: list[str], given: list[torch.Tensor | None] | None) -> torch.Tensor:
        """The decoder's conditioning of each caption; rows given precomputed (cache, NExT-GPT .npy) are used."""
        given = list(given) if given is not None else [None] * len(captions)
        if len(given) != len(captions):
            raise ValueError(f"{m}: {len(given)} precomputed targets for {len(captions)} captions")
        missing = [i for i, t in enumerate(given) if t is None]
        if missing:
            with torch.no_grad():
                rows = self.decoders[m].condition([captions[i] for i in missing])
            for i, row in zip(missing, rows):
                given[i] = row
        shape = tuple(self.decoders[m].conditioning_shape)
        bad = [tuple(t.shape) for t in given if tuple(t.shape) != shape]
        if bad:
            raise ValueError(f"{m}: precomputed conditioning targets of shape {bad[0]}, decoders.{m} expects {shape}")
        return torch.stack([t.to(self.device, torch.float32) for t in given])
    # --- end of precomputed inputs -------------------------------------------------------------

    def signal_states(
        self, input_ids: torch.Tensor, hidden: torch.Tensor, embeds: torch.Tensor, modality: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and input embeddings at this modality's signal tokens, as (G, k, D) groups."""
        ids = torch.tensor(self.llm.signal_ids[modality], device=input_ids.device)
        mask = torch.isin(input_ids, ids)
        k = len(ids)
        n = int(mask.sum())
        if n % k:
            raise ValueError(f"{modality}: {n} signal tokens is not a whole number of groups of {k}")
        return hidden[mask].reshape(-1, k, hidden.shape[-1]), embeds[mask].reshape(-1, k, embeds.shape[-1])

    def hidden_states(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A collated batch -> (input ids, input embeddings with media spliced in, last hidden states)."""
        input_ids = batch["input_ids"].to(self.device)
        attention_mask = batch["attention_mask"].to(self.device)
        embeds = self.embed_inputs(input_ids, batch.get("media", {}), batch.get("media_features"))
        # use_cache=False: transformers otherwise builds a KV cache in every training forward (an extra
        # reference to every layer's keys and values, kept until the step ends); nothing reads it
        hidden = self.llm.decoder()(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
            use_cache=False,
        ).last_hidden_state
        return input_ids, embeds, hidden

    def forward(
        self, batch: dict[str, Any], losses: LossConfig | None = None, normalizers: dict[str, float] | None = None
    ) -> dict[str, torch.Tensor]:
        """The weighted stage loss and its parts.

        Each part is a *sum* over its units (label tokens for ``ce``, signal groups for ``mse_*``, signal
        groups with target media for ``denoise_*``) divided by ``normalizers[part]`` -- the unit count of the whole optimiser
        step across micro-batches and processes -- or by the local count when none is given. That
        makes W processes with batch b compute exactly the loss of one process with batch W*b.
        The denoising loss draws its noise and timesteps from ``batch["noise_seed"]`` per call, or, where
        ``batch["noise_seeds"][m]`` gives one seed per signal group of ``m``, per group from its own.
        """
        losses = losses or LossConfig()
        labels = batch["labels"].to(self.device)
        anchor = self._every_trainable_parameter_in_graph()  # first: see its docstring
        input_ids, embeds, hidden = self.hidden_states(batch)

        def norm(part: str, local: int) -> float:
            return float(normalizers[part]) if normalizers and part in normalizers else float(max(local, 1))

        out: dict[str, torch.Tensor] = {}
        total = hidden.new_zeros((), dtype=torch.float32)
        # Next-token CE, logits only where a label exists (cheaper than the full vocabulary x sequence).
        shift_labels = labels[:, 1:]
        sel = shift_labels != -100
        if losses.ce and bool(sel.any()):
            logits = self.llm.logits(hidden[:, :-1][sel])
            ce_sum = F.cross_entropy(logits.float(), shift_labels[sel], reduction="sum")
            out["ce"] = ce_sum / norm("ce", int(sel.sum()))
            total = total + losses.ce * out["ce"]
        for m, captions in batch.get("signal_captions", {}).items():
            if not captions:
                continue
            h, e = self.signal_states(input_ids, hidden, embeds, m)
            if h.shape[0] != len(captions):
                raise ValueError(f"{m}: {h.shape[0]} signal groups but {len(captions)} target captions")
            p_dtype = _dtype_of(self.output_projections[m])
            pred = self.output_projections[m](h.to(p_dtype), e.to(p_dtype))
            if losses.mse:
                target = self.signal_targets(m, list(captions), batch.get("signal_targets", {}).get(m))
                target = target.to(pred.device).float()
                per_group = F.mse_loss(pred.float(), target, reduction="none").flatten(1).mean(1)
                if losses.mse_relative:  # scale-free: each group's error over its target's mean square
                    per_group = per_group / target.pow(2).flatten(1).mean(1).clamp(min=1e-12)
                out[f"mse_{m}"] = per_group.sum() / norm(f"mse_{m}", len(captions))
                total = total + losses.mse * out[f"mse_{m}"]
            # The denoising loss scores the groups whose output names its media; the others have
            # none to score (they still count for CE and MSE), so they are left out of it and of its
            # unit count (:func:`denoise_units`), not allowed to drop the rest of the batch.
            media = batch.get("signal_media", {}).get(m) or []
            scored = [i for i, x in enumerate(media) if x is not None]
            if losses.denoise and scored:
                group_seeds = batch.get("noise_seeds", {}).get(m)
                # per-group seeds (validation): each group's draws come from its own seed, so its noise does not
                # depend on which other groups share its batch; otherwise one seed per call (training)
                seed = [group_seeds[i] for i in scored] if group_seeds is not None else \
                    batch.get("noise_seed", batch.get("step", 0))
                rows = pred if len(scored) == len(media) else pred[torch.tensor(scored, device=pred.device)]
                mean = self.decoders[m].denoising_loss(rows, [media[i] for i in scored], seed=seed)
                out[f"denoise_{m}"] = mean * len(scored) / norm(f"denoise_{m}", len(scored))
                total = total + losses.denoise * out[f"denoise_{m}"]
        if losses.retain and self._peft_model is not None:
            rows = self.text_only_rows(input_ids)
            if bool(rows.any()):
                mask = batch["attention_mask"].to(self.device)[rows]
                kl_sum = self._retention_kl(input_ids[rows], mask, hidden[rows])
                out["retain"] = kl_sum / norm("retain", int(mask.sum()))
                total = total + losses.retain * out["retain"]
            elif self.sharded and normalizers and "retain" in normalizers:
                # No text-only row here, but some process has one this step (the count spans them all)
                # and runs the core through the sharded layers: join it, with weight 0.
                first = slice(0, 1)
                total = total + 0.0 * self._retention_kl(
                    input_ids[first], batch["attention_mask"].to(self.device)[first], hidden[first])
        # 0 x the hidden states, which every LoRA weight shapes: LoRA gets a gradient even with ce off
        out["loss"] = total + anchor + hidden.float().sum() * 0.0
        return out

    def _every_trainable_parameter_in_graph(self) -> torch.Tensor:
        """0 x every trainable projection parameter and signal row, so that each gets a gradient on
        every process whatever its batch holds. FSDP reduce-scatters the gradients a process *has*: a
        rank whose batch lacks video would send fewer and break the collective. The values are
        unchanged; the difference is that a parameter no process used in a step gets a zero gradient
        instead of none, so AdamW applies its momentum and weight decay to it that step, as it does
        under DDP for a parameter only some processes used.

        ``forward`` builds this term before anything else. Autograd runs the nodes made last first, so
        these run last, and every projection parameter's gradient becomes ready there, in this fixed
        order, whatever the batch used: DeepSpeed ZeRO-2 packs gradients into its reduction buckets in
        the order they become ready, and ranks whose batches differ would otherwise pack them
        differently and add up the wrong numbers."""
        params = [*self.input_projections.parameters(), *self.output_projections.parameters(),
                  *self.llm.signal_parameters().values()]
        # in fp32: a half-precision sum could overflow to inf, and inf x 0 is nan
        return sum((p.float().sum() for p in params if p.requires_grad), torch.zeros((), device=self.device)) * 0.0

    def text_only_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows without any added token (signal tokens, media placeholders): plain text the core reads."""
        return (input_ids < self.llm.first_new_id).all(dim=1)

    def _retention_kl(self, input_ids: torch.Tensor, mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Sum over attended positions of KL(core || model), the core being the adapter-free LLM."""
        first_new = self.llm.first_new_id
        keep = mask.bool()
        with torch.no_grad(), self._peft_model.disable_adapter():
            core = self.llm.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids(mask),
                                  use_cache=False).logits
            core_logp = F.log_softmax(core[keep][:, :first_new].float(), dim=-1)
        # The model's distribution spans the signal rows too: mass it puts there on plain text is lost.
        model_logp = F.log_softmax(self.llm.logits(hidden[keep]).float(), dim=-1)[:, :first_new]
        return (core_logp.exp() * (core_logp - model_logp)).sum()

    # ------------------------------------------------------------------ save / load
    def describe(self) -> dict[str, Any]:
        return {"assembly": to_dict(self.config), "lora": to_dict(self.lora_config) if self.lora_config else None}

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        from mmllm.training.checkpoint import save_model_checkpoint

        return save_model_checkpoint(self, Path(directory).expanduser(), extra or {})

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        trainable_lora: bool = False,
        decoder_parts: str | Mapping[str, str] = "all",
        encoder_weights: Collection[str] | None = None,
        trust_remote_code: bool = False,
    ) -> AnyToAnyModel:
        """A checkpoint (any stage's) with its frozen parts rebuilt, in eval mode (call ``train()`` to train
        it); ``decoder_parts`` and ``encoder_weights`` as in :meth:`assemble`. A checkpoint whose assembly sets
        ``trust_remote_code`` for a part is refused unless ``trust_remote_code=True``: what runs code is the
        caller's choice, not the checkpoint's."""
        from mmllm.training.checkpoint import load_model_checkpoint

        return load_model_checkpoint(Path(directory).expanduser(), trainable_lora=trainable_lora, decoder_parts=decoder_parts,
                                     encoder_weights=encoder_weights, trust_remote_code=trust_remote_code)

    @classmethod
    def from_assembly_dict(cls, data: dict[str, Any]) -> AnyToAnyModel:
        return cls.assemble(parse_assembly(data))

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        requests: list[Request],
        *,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        decode_media: bool = True,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> list[GenerationResult]:
        """Answer ``requests`` (:class:`~mmllm.inference.generate.Request`) in one batch, one
        :class:`GenerationResult` each, in eval mode (a training model gets its modes back). A request's own
        ``max_new_tokens``, ``temperature``, ``top_p``, ``steps`` and ``guidance`` win over these; sampling is
        seeded per request (``Request.seed``). ``decode_media=False`` stops at the conditioning (no decoder
        runs). Raises on the first bad request; :func:`mmllm.inference.runner.run_requests` isolates them."""
        from mmllm.inference.generate import generate

        return generate(self, requests, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                        top_p=top_p, decode_media=decode_media, steps=steps, guidance=guidance)


def denoise_units(batch: dict[str, Any], modality: str) -> int:
    """The groups of ``modality`` the denoising loss scores in a collated batch: those whose output
    names its media (an output without media has nothing to denoise)."""
    return sum(x is not None for x in batch.get("signal_media", {}).get(modality) or [])


def unit_counts(batch: dict[str, Any], model: AnyToAnyModel) -> dict[str, float]:
    """What each loss part of :meth:`AnyToAnyModel.forward` sums over, in one collated batch: label tokens
    (``ce``), text tokens of the text-only rows (``retain``), signal groups (``mse_<m>``) and those with
    target media (``denoise_<m>``)."""
    out = {"ce": float((batch["labels"][:, 1:] != -100).sum()),
           "retain": float(batch["attention_mask"][model.text_only_rows(batch["input_ids"])].sum())}
    for m, caps in batch["signal_captions"].items():
        out[f"mse_{m}"] = float(len(caps))
        out[f"denoise_{m}"] = float(denoise_units(batch, m))
    return out


def _lora_layer_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # GPT-2 style layers; PEFT adapts them like nn.Linear

    return (nn.Linear, Conv1D)


def lora_candidate_names(model: nn.Module) -> list[str]:
    """The last name part of each layer of ``model`` LoRA can adapt, in the frozen core (not the LM head,
    which mmllm wraps for the signal rows)."""
    return sorted({name.rsplit(".", 1)[-1] for name in _lora_layers(model)})


def _lora_layers(model: nn.Module) -> list[str]:
    """The full name of each layer of ``model`` LoRA can adapt, but the wrapped LM head's base; a layer an
    adapter already wraps counts once, under its own name (not its ``base_layer``, ``lora_A``, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings()
    skip = {id(head.base)} if head is not None and hasattr(head, "base") else set()
    layers, wrapped = [], ()
    for name, module in model.named_modules():
        if not name or name.startswith(wrapped):
            continue  # an adapted layer's own parts (base_layer, lora_A, ...)
        if isinstance(module, BaseTunerLayer):
            layers.append(name)
            wrapped = (*wrapped, f"{name}.")
        elif isinstance(module, _lora_layer_types()) and id(module) not in skip:
            layers.append(name)
    return layers


def lora_layer_names(model: nn.Module, target_modules: Collection[str] | str) -> frozenset[str]:
    """The full names of the layers of ``model`` (the core, its signal rows added) that a LoRA
    ``target_modules`` adapts: ``"all-linear"`` as :meth:`AnyToAnyModel.add_lora` expands it, a list by PEFT's
    rule (a layer's whole name, or its end after a dot). The same with an adapter attached (a layer PEFT
    wrapped counts once, under its own name), so two spellings of one adapter compare equal."""
    layers = _lora_layers(model)
    if target_modules == ALL_LINEAR:
        return frozenset(layers)
    return frozenset(n for n in layers if any(n == t or n.endswith(f".{t}") for t in target_modules))


def _targets_only_conv1d(model: nn.Module, targets: Collection[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    hit = [m for n, m in model.named_modules() if n and any(n == t or n.endswith(f".{t}") for t in targets)]
    return bool(hit) and all(isinstance(m, Conv1D) for m in hit)


def unmatched_lora_targets(model: nn.Module, targets: Collection[str]) -> list[str]:
    """The entries of a LoRA ``target_modules`` list that match no module name of ``model`` by PEFT's
    rule for a list: the whole name, or its end after a dot."""
    names = [name for name, _ in model.named_modules() if name]
    return [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]


def _whole(p: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy; an FSDP2 shard is gathered first (a collective: every process calls it)."""
    t = p.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.cpu().contiguous()


def _dtype_of(module: nn.Module) -> torch.dtype:
    """Projections may run in another dtype than the LLM (fp32 glue on a bf16 core)."""
    return next(module.parameters()).dtype


def describe_json(model: AnyToAnyModel) -> str:
    return json.dumps(model.describe(), indent=2, default=str)
