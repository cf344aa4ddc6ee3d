"""``mmllm eval``: how well an assembled model built on the toy world's parts works, seen vs held-out.

Measured on items of the world's *seen* (training) and *held-out* combinations, per modality:

* ``x2t`` -- media -> text: the model describes a true item; :func:`read_attributes` reads every
  attribute back from the text (exactly one value named per attribute, or it is wrong);
* ``t2x`` -- text -> media: the model is asked for the canonical caption's media; the first signal
  group of that modality is decoded and the world's judge reads it back. Next to it, the oracle:
  the same decoder given the caption's own conditioning (as in ``mmllm world report``), on the same
  items and seeds, and the ratio of the two. A request that emits no group of that modality scores 0;
* ``routing`` -- the right signal groups are emitted exactly when media is asked for, and no
  others: over the t2x requests (one group of the asked modality), the x2t requests and held-out
  plain-chat prompts (none), and two-output requests (one group of each asked modality);
* ``text`` -- perplexity on held-out plain text (paragraphs of the Python 3.11.7 documentation's
  ``pydoc_data`` topics, frozen in ``passages/heldout.txt`` so that every Python measures the same text;
  no stage trains on it) of the assembled model vs its base core: the same weights with the
  LoRA adapter disabled and the logits restricted to the base vocabulary.

The accuracy of a modality is the mean over its attributes (``mean``); ``all`` counts items with
every attribute right. x2t and t2x of a model whose encoders or decoders are not the toy world's parts are
refused unless asked for (:func:`check_toy_parts`): they would not say how well that model works.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmllm.atomic import atomic_write_text
from mmllm.config import ConfigError
from mmllm.inference.generate import Request
from mmllm.progress import progress_bar
from mmllm.toyworld.evaluate import decoder_accuracy
from mmllm.toyworld.judges import Judge, attribute_accuracy
from mmllm.toyworld.world import MODALITIES, Item, World, balanced_items

log = logging.getLogger(__name__)

EVAL_SEED = 9876  # different renderings from the world report's and the stage data's
SPLITS = {"seen": "train", "held_out": "held_out"}
DESCRIBE_PROMPT = {"image": "<image>\nDescribe this image.", "audio": "<audio>\nWhat do you hear?",
                   "video": "<video>\nWhat happens in this clip?"}
MAKE_PROMPT = {"image": "Draw {c}.", "audio": "Make a sound: {c}", "video": "Show a clip of {c}."}
TASKS = ("x2t", "t2x", "routing", "text")
TARGETS = {"x2t": {"seen": 0.90, "held_out": 0.75}, "t2x_ratio": {"seen": 0.9, "held_out": 0.8},
           "routing": 0.97, "perplexity_ratio": 1.10}


@dataclass
class EvalOptions:
    output: Path
    items: int = 48  # per modality and split (x2t and t2x)
    batch_size: int = 16
    max_new_tokens: int = 48
    steps: int | None = None  # decoder steps (None: the decoder's own)
    guidance: float | None = None
    two_output_requests: int = 24  # routing: requests that ask for two media at once
    text_chunks: int = 48  # held-out plain-text passages for perplexity
    text_tokens: int = 128  # tokens per passage
    text_batch_size: int = 8  # passages per forward of the perplexity (mmllm eval --text-batch-size)
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    seed: int = 0
    parts: Path | None = None  # the toy world's parts the model's must be (None: the shipped ones; either counts)
    allow_other_parts: bool = False  # measure a model whose encoders or decoders are not those parts (warned)


def read_attributes(world: World, modality: str, text: str) -> dict[str, str | None]:
    """Every attribute of ``modality`` read from free text: the one value it names, else None."""
    return {name: next(iter(found)) if len(found) == 1 else None
            for name, found in world.mentions(modality, text).items()}


def eval_items(world: World, modality: str, split: str, n: int, seed: int = EVAL_SEED) -> list[Item]:
    """``n`` items spread evenly over the split's combinations (see :func:`balanced_items`)."""
    return balanced_items(world, modality, split, n, seed)


def _chunks(seq: list[Any], size: int) -> list[list[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _generate(model, requests: list[Request], options: EvalOptions, decode: bool, what: str) -> list[Any]:
    out = []
    for chunk in progress_bar(_chunks(requests, options.batch_size), desc=what, leave=False):
        out += model.generate(chunk, max_new_tokens=options.max_new_tokens, decode_media=decode,
                              steps=options.steps, guidance=options.guidance)
    return out


def emitted(result: Any) -> list[str]:
    """The modalities of the signal groups a generation emitted, one entry per group."""
    return sorted(m for m, conds in result.conditioning.items() for _ in conds)


PASSAGES_FILE = Path(__file__).resolve().parent / "passages" / "heldout.txt"
# heldout.txt as scripts/freeze_passages.py writes it from CPython 3.11.7's pydoc_data (another file: its sha256)
PASSAGES_SHA256 = "decf623e76c9b4acea69431aa98b33fac052d01a4ac977620db04a1984b7c306"
_REMAKE = ("reinstall mmllm (its wheel ships the file), or write it again by running the mmllm repository's "
           "scripts/freeze_passages.py with CPython 3.11.7; or leave 'text' out of the tasks (--tasks)")


def held_out_text_source() -> str:
    """What :func:`held_out_text` reads, as ``eval.json`` records it under ``text.passages``: the shipped file's
    name and sha256, the same on every Python (reports before it named the Python whose ``pydoc_data`` topics
    they read: ``pydoc_data topics of Python 3.11.7`` measured the same passages)."""
    return f"{PASSAGES_FILE.name} sha256:{PASSAGES_SHA256}"


def held_out_paragraphs(path: Path | None = None, sha256: str = PASSAGES_SHA256) -> list[str]:
    """The held-out prose paragraphs of ``path`` (default :data:`PASSAGES_FILE`; one blank line between two),
    refused (a ConfigError saying how to get the file back) when it is missing, unreadable or not the file
    ``sha256`` names."""
    path = PASSAGES_FILE if path is None else path
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"mmllm eval's held-out text passages {path} cannot be read ({exc}): {_REMAKE}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ConfigError(f"mmllm eval's held-out text passages {path} are not the shipped ones (sha256 {digest}, "
                          f"expected {sha256}: changed or damaged): {_REMAKE}")
    return data.decode("utf-8").removesuffix("\n").split("\n\n")


def held_out_text(tokenizer: Any, chunks: int, tokens: int,
                  paragraphs: list[str] | None = None) -> list[list[int]]:
    """The first ``chunks`` paragraphs (of :func:`held_out_paragraphs` unless given) at least ``tokens`` tokens
    long for ``tokenizer``, cut to ``tokens`` each."""
    out = []
    for p in held_out_paragraphs() if paragraphs is None else paragraphs:
        ids = tokenizer(p, add_special_tokens=False).input_ids
        if len(ids) >= tokens:
            out.append(ids[:tokens])
        if len(out) == chunks:
            break
    if not out:
        raise ValueError(f"no paragraph of the held-out passages ({PASSAGES_FILE.name}) is {tokens} tokens long "
                         "for this tokenizer: lower EvalOptions.text_tokens (the default is 128), or leave 'text' "
                         "out of tasks")
    if len(out) < chunks:
        log.warning("text: only %d passages of %d tokens (asked for %d); lower text_tokens for more",
                    len(out), tokens, chunks)
    return out


@torch.no_grad()
def perplexities(model, passages: list[list[int]], batch_size: int = 8) -> dict[str, float]:
    """Perplexity of the assembled model and of its base core on ``passages`` (equal lengths, at least 2 tokens:
    the first token of a passage is never predicted)."""
    if not any(len(p) >= 2 for p in passages):
        raise ValueError(f"perplexity needs a passage of at least 2 tokens to predict one from another, got "
                         f"{len(passages)} passages of lengths {sorted({len(p) for p in passages})}: "
                         "give longer passages (held_out_text's tokens >= 2)")
    llm = model.llm
    first_new = llm.first_new_id
    totals = {"model": 0.0, "base": 0.0}
    count = 0
    for chunk in _chunks(passages, batch_size):
        ids = torch.tensor(chunk, device=model.device)
        targets = ids[:, 1:]
        for which in ("model", "base"):
            if which == "base" and model._peft_model is not None:
                with model._peft_model.disable_adapter():
                    logits = llm.model(input_ids=ids).logits[:, :-1, :first_new]
            elif which == "base":
                logits = llm.model(input_ids=ids).logits[:, :-1, :first_new]
            else:
                logits = llm.model(input_ids=ids).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            totals[which] += float(nll)
        count += targets.numel()
    ppl = {k: math.exp(v / count) for k, v in totals.items()}
    ppl["ratio"] = ppl["model"] / ppl["base"]
    ppl["tokens"] = count
    return ppl


def other_parts_measured(assembly: Any, options: EvalOptions) -> list[str]:
    """What among the encoders (x2t) and decoders (t2x) ``options`` measures is not a toy-world part (of
    ``options.parts`` or the shipped ones), one line each (:func:`mmllm.toyworld.identity.other_parts`)."""
    from mmllm.toyworld.identity import other_parts
    from mmllm.toyworld.parts import shipped_dir

    wanted = [("encoders", m) for m in options.modalities if "x2t" in options.tasks]
    wanted += [("decoders", m) for m in options.modalities if "t2x" in options.tasks]
    return other_parts(assembly, wanted, [options.parts or shipped_dir(), shipped_dir()])


def check_toy_parts(assembly: Any, options: EvalOptions) -> list[str]:
    """Refuse (a ConfigError naming what differs) to score x2t / t2x of a model whose encoders or decoders are
    not the toy world's parts, unless ``options.allow_other_parts``: then warn. Its scores would measure parts
    that never saw the toy world's media against judges of that world, not how well the model works. Returns
    what differs."""
    differ = other_parts_measured(assembly, options)
    if not differ:
        return differ
    where = options.parts or "the shipped ones"
    if not options.allow_other_parts:
        raise ConfigError(
            "mmllm eval scores x2t and t2x on the toy world's media, read back by judges trained on that world: the "
            "scores say how well a model works only when its encoders and decoders are the toy world's parts, and "
            f"this model's are not ({where}): {'; '.join(differ)}. They would not measure your model's quality. "
            "Pass --allow-other-parts (EvalOptions.allow_other_parts=True) to measure it anyway (parts you re-made or "
            "fine-tuned on the toy world), --parts for the folder of re-made parts, or --tasks routing,text for what "
            "does not depend on them")
    log.warning("this model's encoders or decoders are not the toy world's parts (%s): %s. Its x2t / t2x scores "
                "measure those parts on the toy world's media (--allow-other-parts)", where, "; ".join(differ))
    return differ


def run_eval(model, judges: dict[str, Judge], options: EvalOptions) -> dict[str, Any]:
    """Every measurement ``options`` asks for; ``eval.json`` is rewritten after each one (``"complete": false``
    until the last), so an interrupted or failing run keeps the scores it finished. A measurement that
    cannot run (a modality without a judge for t2x, without an encoder or decoder) is named under
    ``skipped``, never left out silently. A model whose measured encoders or decoders are not the toy world's
    parts is refused before anything is written (:func:`check_toy_parts`); with ``allow_other_parts`` what
    differs is warned about and kept under ``other_parts``. Holds ``options.output``'s lock while it runs (a
    second eval writing there is refused: both would rewrite ``eval.json``)."""
    from mmllm.folder_lock import hold_folder

    differ = check_toy_parts(model.config, options)
    with hold_folder(options.output, "mmllm eval", "give this run another output folder (--output)"):
        return _run_eval(model, judges, options, differ)


def _run_eval(model, judges: dict[str, Judge], options: EvalOptions, other_parts: list[str]) -> dict[str, Any]:
    world = World()
    model.eval()
    report: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
                              "complete": False, "x2t": {}, "t2x": {}, "routing": {}, "text": {}, "skipped": [],
                              "other_parts": other_parts, "samples": []}
    routes: list[tuple[list[str], list[str], str]] = []  # (expected, emitted, prompt)
    # read (and checked) before the generation tasks: a missing file is said at once, not after them
    paragraphs = held_out_paragraphs() if "text" in options.tasks else []
    _save(report, options)

    for modality in options.modalities:
        wants = {"x2t": "x2t" in options.tasks, "t2x": "t2x" in options.tasks}
        missing = {"x2t": None if modality in model.encoders else f"the model has no {modality} encoder",
                   "t2x": None if modality in model.decoders else f"the model has no {modality} decoder"}
        if missing["t2x"] is None and modality not in judges:
            missing["t2x"] = f"no judge-{modality} among the judges (--parts)"
        for task, why in missing.items():
            if wants[task] and why:
                log.warning("%s %s not measured: %s", task, modality, why)
                report["skipped"].append({"task": task, "modality": modality, "why": why})
        if all(why for why in missing.values()):
            continue
        report["x2t"][modality], report["t2x"][modality] = {}, {}
        for split_name, split in SPLITS.items():
            items = eval_items(world, modality, split, options.items)
            if wants["x2t"] and not missing["x2t"]:
                requests = [Request([{"role": "user", "content": DESCRIBE_PROMPT[modality]}], [(modality, i.media)],
                                    seed=options.seed) for i in items]
                results = _generate(model, requests, options, False, f"x2t {modality} {split_name}")
                predicted = [read_attributes(world, modality, r.text) for r in results]
                report["x2t"][modality][split_name] = attribute_accuracy(predicted, [i.attributes for i in items])
                routes += [([], emitted(r), DESCRIBE_PROMPT[modality]) for r in results]
                report["samples"] += [{"task": "x2t", "split": split_name, "truth": i.caption, "answer": r.text}
                                      for i, r in list(zip(items, results))[:3]]
                _save(report, options)
            if wants["t2x"] and not missing["t2x"]:
                report["t2x"][modality][split_name] = _text_to_media(
                    model, judges[modality], world, modality, items, options, routes, report["samples"], split_name)
                _save(report, options)

    if "routing" in options.tasks:
        _routing(model, world, options, routes, report)
        _save(report, options)
    if "text" in options.tasks:
        passages = held_out_text(model.llm.tokenizer, options.text_chunks, options.text_tokens, paragraphs)
        report["text"] = {**perplexities(model, passages, options.text_batch_size),
                          "passages": held_out_text_source()}
    report["complete"] = True
    _save(report, options)
    return report


def _save(report: dict[str, Any], options: EvalOptions) -> None:
    atomic_write_text(options.output / "eval.json", json.dumps(report, indent=2))


def _routing(model, world: World, options: EvalOptions, routes: list, report: dict[str, Any]) -> None:
    """Routing over the x2t / t2x requests already run, held-out plain chat and two-output requests."""
    from mmllm.toyworld.chat_prompts import EVAL as PLAIN

    plain = _generate(model, [Request([{"role": "user", "content": p}], seed=options.seed) for p in PLAIN],
                      options, False, "plain chat")
    routes += [([], emitted(r), p) for p, r in zip(PLAIN, plain)]
    report["samples"] += [{"task": "plain", "prompt": p, "answer": r.text} for p, r in list(zip(PLAIN, plain))[:3]]
    pairs = [("image", "audio"), ("image", "video"), ("audio", "video")]
    multi_requests, multi_expected = [], []
    n = options.two_output_requests
    for k in range(n):
        a, b = pairs[k % 3]
        if a not in model.decoders or b not in model.decoders:
            continue
        ia = eval_items(world, a, "train", n)[k]
        ib = eval_items(world, b, "train", n)[(k * 5 + 1) % n]
        ask_b = MAKE_PROMPT[b].format(c=ib.caption)
        prompt = f"{MAKE_PROMPT[a].format(c=ia.caption)} Also, {ask_b[0].lower()}{ask_b[1:]}"
        multi_requests.append(Request([{"role": "user", "content": prompt}], seed=options.seed))
        multi_expected.append(sorted([a, b]))
    multi = _generate(model, multi_requests, options, False, "two outputs")
    routes += [(e, emitted(r), q.messages[0]["content"]) for e, r, q in zip(multi_expected, multi, multi_requests)]

    report["routing"] = routing_scores(routes)


ROUTING_KINDS = {"media requests": lambda e: len(e) == 1, "two outputs": lambda e: len(e) == 2,
                 "no media asked": lambda e: len(e) == 0}


def routing_scores(routes: list[tuple[list[str], list[str], str]]) -> dict[str, Any]:
    """The share of ``routes`` (expected groups, emitted groups, prompt) that emitted exactly what was expected:
    ``all`` and ``n`` over every prompt, and per prompt kind present ``{"score": share, "n": prompts}``."""
    right = [e == got for e, got, _ in routes]
    out: dict[str, Any] = {"all": float(np.mean(right)) if right else float("nan"), "n": len(routes)}
    for name, keep in ROUTING_KINDS.items():
        sel = [ok for ok, (e, _, _) in zip(right, routes) if keep(e)]
        if sel:
            out[name] = {"score": float(np.mean(sel)), "n": len(sel)}
    out["wrong_examples"] = [{"prompt": p, "expected": e, "emitted": got} for e, got, p in routes if e != got][:10]
    return out


def _text_to_media(model, judge: Judge, world: World, modality: str, items: list[Item], options: EvalOptions,
                   routes: list, samples: list, split_name: str) -> dict[str, Any]:
    requests = [Request([{"role": "user", "content": MAKE_PROMPT[modality].format(c=i.caption)}],
                        seed=options.seed + k) for k, i in enumerate(items)]
    results = _generate(model, requests, options, True, f"t2x {modality} {split_name}")
    routes += [([modality], emitted(r), q.messages[0]["content"]) for r, q in zip(results, requests)]
    made = [r.media.get(modality, [None])[0] if r.media.get(modality) else None for r in results]
    present = [k for k, m in enumerate(made) if m is not None]
    predicted: list[dict[str, str | None]] = [dict.fromkeys(world.specs[modality].names) for _ in items]
    if present:
        for k, p in zip(present, judge.predict([made[k] for k in present])):
            predicted[k] = p
    model_score = attribute_accuracy(predicted, [i.attributes for i in items])
    # the oracle: the same decoder on the caption's own conditioning, the same seeds
    oracle, _ = decoder_accuracy(model.decoders[modality], judge, items, options.steps, options.guidance,
                                 batch_size=options.batch_size, seed=options.seed)
    samples += [{"task": "t2x", "split": split_name, "prompt": q.messages[0]["content"], "answer": r.text}
                for q, r in list(zip(requests, results))[:2]]
    return {"model": model_score, "oracle": oracle, "emitted": len(present) / len(items),
            "ratio": model_score["mean"] / oracle["mean"] if oracle["mean"] else float("nan")}


def format_eval(report: dict[str, Any]) -> str:
    lines = ["direction  modality  split      model   oracle  ratio   n     target"]
    lines += [f"NOT THE TOY WORLD'S PARTS: {d}" for d in report.get("other_parts", [])]
    for modality, splits in report["x2t"].items():
        for split, s in splits.items():
            lines.append(f"x2t        {modality:<9} {split:<10} {s['mean']:6.3f}  {'':6}  {'':6}  {s['n']:<4}  "
                         f">= {TARGETS['x2t'][split]:.2f}")
    for modality, splits in report["t2x"].items():
        for split, s in splits.items():
            lines.append(f"t2x        {modality:<9} {split:<10} {s['model']['mean']:6.3f}  {s['oracle']['mean']:6.3f}  "
                         f"{s['ratio']:6.3f}  {s['model']['n']:<4}  ratio >= {TARGETS['t2x_ratio'][split]:.1f}")
    lines += [f"{s['task']:<10} {s['modality']:<9} not measured: {s['why']}" for s in report.get("skipped", [])]
    r = report["routing"]
    if r:
        lines.append(f"routing    {r['all']:.3f} over {r['n']} prompts ("
                     + ", ".join(f"{k} {r[k]['score']:.3f} of {r[k]['n']}" for k in ROUTING_KINDS if k in r)
                     + f"; target >= {TARGETS['routing']})")
    t = report["text"]
    if t:
        lines.append(f"text       perplexity {t['model']:.3f} vs base {t['base']:.3f}: ratio {t['ratio']:.3f} "
                     f"over {t['tokens']} tokens of {t.get('passages', 'pydoc_data topics')} "
                     f"(target <= {TARGETS['perplexity_ratio']})")
    return "\n".join(lines)
