"""``mmllm`` command line: train, inspect, config, infer, export, refine, data check, cache, demo, eval, world."""

from __future__ import annotations

# ruff: noqa: E402 -- the imports below come after the module entry's hand-over, which must run before any of them

if __name__ == "__main__":  # `python -m mmllm.cli` (how `accelerate launch -m mmllm.cli` runs each process): the
    # command as the console script runs it, mmllm.console's entry, which imports this module afresh under a Ctrl-C
    # handler: run from here, a Ctrl-C while the imports below ran printed Python's traceback of them
    from mmllm.console import entry as _console_entry

    _console_entry()  # exits

import argparse
import contextlib
import difflib
import json
import logging
import math
import os
import select
import signal
import sys
import textwrap
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from mmllm import __version__
from mmllm.atomic import atomic_write_text
from mmllm.config import EXIT_INTERNAL_ERROR, files_named_in, user_path
from mmllm.locations import doc_page, docs_folder
from mmllm.log_filters import drop_diffusers_noise
from mmllm.memory import OutOfMemory, first_line, is_out_of_memory, ran_out_on_the_host
from mmllm.progress import no_progress_bars

if TYPE_CHECKING:
    from mmllm.training.parts import StageParts

log = logging.getLogger("mmllm")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARIES = ("httpx", "urllib3", "filelock")


def _reaches_the_terminal(logger: logging.Logger, level: int) -> bool:
    """Whether a handler that ``logger``'s records of ``level`` reach (its own, then its parents' while they
    propagate) writes them to stderr or stdout: one set to show warnings only does not show the command's INFO."""
    terminal = {id(s) for s in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__) if s is not None}
    current: logging.Logger | None = logger
    while current is not None:
        if any(isinstance(h, logging.StreamHandler) and id(h.stream) in terminal and h.level <= level
               for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


@contextlib.contextmanager
def cli_logging(verbose: bool, quiet: bool = False) -> Iterator[None]:
    """The command's log lines on stderr for the length of one ``main`` call, and the logging as it was after.

    ``quiet`` (``-q``): mmllm's warnings and errors only, and no progress bars (``mmllm.progress``).

    A stderr handler of its own is added to the root logger beside whatever handlers are there (a caller's,
    pytest's caplog): ``logging.basicConfig(force=True)`` used to remove those for the rest of the process.
    Where a handler that ``mmllm``'s lines reach already writes to stderr or stdout (a caller's
    ``logging.basicConfig()``), none is added: that one shows them, and a second printed each line twice.
    The levels it sets are put back and its handler removed when the call returns, so ``main`` called from
    Python leaves the caller's logging as it found it; run as the program, the output is what it was.
    """
    # Under torchrun / accelerate launch, the other processes report warnings and errors only: their
    # INFO lines (parameter tables, progress, "done") would repeat the main process's word for word.
    # Other libraries say INFO about their own workings (open_clip logs each model build on the root
    # logger): their warnings are shown, their INFO only with -v.
    level = logging.DEBUG if verbose else logging.INFO
    if quiet or os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    root, own = logging.getLogger(), logging.getLogger("mmllm")
    others = [logging.getLogger(name) for name in QUIET_LIBRARIES]
    levels_before = [(logger, logger.level) for logger in (root, own, *others)]
    handler = None if _reaches_the_terminal(own, level) else logging.StreamHandler()  # sys.stderr as it is now
    if handler is not None:  # (pytest's capsys replaces it per test)
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    own.setLevel(level)
    for logger in others:
        logger.setLevel(logging.WARNING)
    drop_diffusers_noise()
    try:
        with no_progress_bars(quiet):
            yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
            handler.close()
        for logger, before in levels_before:
            logger.setLevel(before)


def cmd_train(args: argparse.Namespace) -> int:
    from mmllm.config import load_stage
    from mmllm.training.interrupt import TrainingInterrupted
    from mmllm.training.loop import train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process reads the config; one that cannot stops all
        from mmllm.training.agreement import on_every_process
        from mmllm.training.loop import join_processes

        state = join_processes()
        cfg = on_every_process(state, lambda: load_stage(args.config, args.overrides))[state.process_index].value
    else:
        cfg = load_stage(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingInterrupted as stopped:
        # every process stops alike; the others' word would repeat the main process's (it is in their -v log)
        (log.warning if os.environ.get("RANK", "0") == "0" else log.info)("%s", stopped)
        return stopped.exit_code
    losses = [x for x in result.losses if x == x]  # NaN: a step with no readable sample
    val = result.validation
    held_out = (f", validation loss {val[0]['loss']:.4f} (step {val[0]['step']}) -> {val[-1]['loss']:.4f}"
                if val else "")
    if os.environ.get("RANK", "0") == "0":  # the result, on stdout as other commands' (kept by -q); once per run
        print(f"done: {result.steps} steps, loss {losses[0] if losses else float('nan'):.4f} -> "
              f"{losses[-1] if losses else float('nan'):.4f}{held_out}, {result.skipped} samples skipped; "
              f"checkpoint {result.final_checkpoint}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from mmllm.config import (
        STAGE_DEFAULT_TRAINABLE,
        is_stage_yaml,
        load_assembly,
        load_lora,
        naming_overrides,
        read_yaml,
    )
    from mmllm.model import AnyToAnyModel
    from mmllm.registry import check_part_options
    from mmllm.training.freeze import apply_trainable, count_parameters

    check_json_target(args.json)
    data = read_yaml(args.config)
    if is_stage_yaml(data):  # a stage config: inspect its assembly
        from mmllm.config import load_stage

        if args.lora:
            raise SystemExit(f"--lora counts an adapter for an assembly YAML; {args.config} is a stage config, "
                             "whose adapter is its own lora: file (give another with lora=PATH)")
        stage = load_stage(args.config, args.overrides)
        assembly, lora = _stage_assembly(stage), stage.lora
        overrides, prefix = stage.assembly_overrides, "assembly."
    else:
        stage, assembly, lora = None, load_assembly(args.config, args.overrides, ""), args.lora
        check_part_options(assembly, args.config, args.overrides)
        overrides, prefix = args.overrides, ""
    with naming_overrides(overrides, prefix):  # a dimension that disagrees names the override that set it
        model = AnyToAnyModel.assemble(assembly, llm_weights=False)  # counted and checked, never run
    print(f"assembly: {assembly.name}")
    print(f"  llm: {assembly.llm.kind} {assembly.llm.options}  hidden={model.llm.hidden_size}")
    for m, spec in assembly.encoders.items():
        enc = model.encoders[m]
        print(f"  encoders.{m}: {spec.kind} -> ({enc.num_tokens}, {enc.output_dim})")
    for m, spec in assembly.decoders.items():
        print(f"  decoders.{m}: {spec.kind} conditioning {model.decoders[m].conditioning_shape}, "
              f"{assembly.signal_tokens[m]} signal tokens")
    print("dimension checks passed:")
    for line in model.checks:
        print(f"  ok  {line}")
    if lora:
        model.add_lora(load_lora(lora))
    stages = {stage.stage: stage.resolved_trainable()} if stage else STAGE_DEFAULT_TRAINABLE
    table = {}
    for name, flags in stages.items():
        flags = dict(flags)
        if flags.get("lora") and model.lora_config is None:
            flags["lora"] = False
            note = " (no LoRA config given: pass --lora configs/lora/X.yaml to count it)"
        else:
            note = ""
        apply_trainable(model, flags, log_table=False)
        parts, held = _inspected_parts(model, stage)
        rows = count_parameters(model, parts)
        table[name] = {r.name: {"trainable": r.trainable, "frozen": r.frozen} for r in rows}
        print(f"stage {name}{note}: {held}")
        for r in rows:
            print(f"  {r.name:<30} trainable {r.trainable:>12,}  frozen {r.frozen:>12,}")
        print(f"  {'total':<30} trainable {sum(r.trainable for r in rows):>12,}  "
              f"frozen {sum(r.frozen for r in rows):>12,}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"checks": model.checks, "stages": table}, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """``mmllm config``: the resolved config on stdout, as YAML that ``--config`` takes back; nothing built."""
    from mmllm.resolved_config import checkpoint_config_yaml, config_yaml

    if args.checkpoint is not None:
        sys.stdout.write(checkpoint_config_yaml(args.checkpoint, args.overrides))
    else:
        sys.stdout.write(config_yaml(args.config, args.overrides))
    return 0


def _load_model(checkpoint: str, device: str, dtype: str, trust_remote_code: bool = False):
    import torch

    from mmllm.model import AnyToAnyModel

    model = AnyToAnyModel.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise SystemExit(f"--dtype must be one of {list(dtypes)}")
    held: dict[torch.dtype, int] = {}
    for param in model.llm.model.parameters():  # most of it (the signal rows beside its tables are fp32)
        held[param.dtype] = held.get(param.dtype, 0) + param.numel()
    loaded = max(held, key=held.__getitem__)
    if dtypes[dtype].itemsize > loaded.itemsize:
        log.warning("the checkpoint's LLM loads in %s (its assembly's llm.dtype); --dtype %s casts it and every other "
                    "part up, holding it in %dx the memory: pass --dtype %s to answer in the dtype it loads in",
                    str(loaded).removeprefix("torch."), dtype, dtypes[dtype].itemsize // loaded.itemsize,
                    str(loaded).removeprefix("torch."))
    return model.to(device=device, dtype=dtypes[dtype]).eval()


def _check_device(device: str) -> None:
    """A --device torch cannot use, refused with the reason before anything loads (not torch's traceback later)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise SystemExit(f"--device {device}: not a device name ({exc}); use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no NVIDIA driver or GPU found"
            raise SystemExit(f"--device {device}: CUDA is not available here ({why}; torch {torch.__version__}); "
                             f"use --device cpu, or run on a machine with a GPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {device}: MPS is not available here; use --device cpu")


def _inspected_parts(model, stage) -> tuple[StageParts, str]:
    """What a stage holds of the frozen parts: from its data when ``stage`` is a stage config whose data
    reads, else the most its losses could need (every decoder as far as the losses go, every encoder)."""
    from mmllm.config import LossConfig
    from mmllm.data.dataset import load_stage_records
    from mmllm.training.parts import StageParts, decoder_parts_for, stage_parts

    if stage is not None:
        try:
            parts = stage_parts(stage.losses, load_stage_records(stage.all_data(), stage.stage)[0])
            return parts, f"holds {parts.describe()}"
        except (OSError, ValueError) as exc:
            reason = f"its data does not read ({exc})"
    else:
        reason = "no stage data given"
    wanted = decoder_parts_for(stage.losses if stage is not None else LossConfig())
    parts = StageParts({m: wanted for m in model.decoders}, frozenset(model.encoders))
    return parts, f"holds at most {parts.describe()} ({reason})"


def cmd_infer(args: argparse.Namespace) -> int:
    """Answer a requests file (or one request given by flags) into --output; exit 1 if any request failed."""
    import hashlib
    import tempfile

    from mmllm.folder_lock import hold_folder
    from mmllm.inference.gallery import write_gallery
    from mmllm.inference.runner import (
        OutputError,
        check_overwrite,
        check_resume,
        device_type,
        gallery_keys,
        pending_lines,
        prepare_output,
        read_lines,
        run_requests,
        run_settings,
        where_failed,
    )
    from mmllm.training.checkpoint import read_meta, require_checkpoint_folder

    require_checkpoint_folder(args.checkpoint, "--checkpoint")

    read_meta(Path(args.checkpoint))  # no checkpoint (a run's folder, say) is named as such, not compared as one
    if bool(args.input) == bool(args.prompt):
        raise SystemExit("give either --input requests.jsonl or --prompt TEXT (with optional --image/--audio/--video)")
    flag_media = {m: getattr(args, m) for m in ("image", "audio", "video") if getattr(args, m)}
    if args.input and flag_media:
        raise SystemExit(f"--{next(iter(flag_media))} goes with --prompt; in a requests file, put media in the request")
    for m, path in flag_media.items():  # a flag's typo refused at once, not an error record after the model loads
        if not Path(path).is_file():
            raise SystemExit(f"--{m} {path}: {not_a_file(Path(path))}; give the {m} file to answer about")
    require_at_least_1(args, "batch_size", "max_new_tokens", "steps", "decode_batch_size", "threads")
    if not 0 <= args.seed < 2**63:  # what a request's own seed may be (torch's generators take no more)
        raise SystemExit(f"--seed must be at least 0 and below 2**63, got {args.seed}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SystemExit("--temperature must be >= 0 and --top-p in (0, 1]")
    _check_device(args.device)
    with tempfile.TemporaryDirectory(prefix="mmllm-infer-") as tmp, contextlib.ExitStack() as held:
        if args.input:
            requests = Path(args.input)
            if requests.is_dir():
                raise SystemExit(f"--input {requests}: a folder; give the requests file (JSONL) in it "
                                 f"({files_named_in(requests, '*.jsonl')})")
            if not requests.is_file():
                raise SystemExit(f"--input {requests}: file not found")
            lines = read_lines(requests)
            if not lines:  # not worth loading a model for: most likely the wrong file
                raise SystemExit(f"--input {requests}: holds no requests (no line that is not blank); give one JSON "
                                 'object per line, e.g. {"id": "r1", "prompt": "Draw a red circle."}')
        else:
            rec = {"prompt": args.prompt, "seed": args.seed,
                   **{m: str(Path(p).resolve()) for m, p in flag_media.items()}}
            # the id names the request and its settings: a re-run into the same --output skips only the same
            settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "steps", "guidance",
                                                      "dtype")} | {"device": device_type(args.device)}
            key = {**rec, **settings, "checkpoint": str(Path(args.checkpoint).resolve())}
            digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
            requests = Path(tmp) / "request.jsonl"
            requests.write_text(json.dumps({"id": f"prompt-{digest}", **rec}) + "\n")
            lines = read_lines(requests)
        try:  # refused before the model loads: OUT unwritable, or holding answers of another checkpoint/settings
            prepare_output(Path(args.output))
            # one run at a time in OUT (a second refused here, FolderInUse): both would answer every request
            held.enter_context(hold_folder(Path(args.output), "mmllm infer", "give this run another --output"))
            done = None
            if args.overwrite:
                check_overwrite(Path(args.output), requests, lines)
            else:
                done = check_resume(Path(args.output), requests, run_settings(
                    Path(args.checkpoint), args.dtype, args.seed, args.max_new_tokens, args.temperature, args.top_p,
                    args.steps, args.guidance, args.device), lines)
        except OutputError as exc:
            raise SystemExit(str(exc)) from exc
        held.enter_context(torch_threads(args.threads))
        if lines and not args.overwrite and not pending_lines(lines, Path(args.output), done):  # nothing to load
            log.info("all %d request(s) are already done in %s (same checkpoint and settings); the model is not "
                     "loaded", len(lines), args.output)
            counts = {"done": 0, "failed": 0, "skipped": len(lines), "stopped": 0}
            if args.input:  # the requests file may have lost requests since: the gallery shows those it holds
                write_gallery(Path(args.output), gallery_keys(lines))
        else:
            model = _load_model(args.checkpoint, args.device, args.dtype, args.trust_remote_code)
            counts = run_requests(model, requests, Path(args.output), batch_size=args.batch_size, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, steps=args.steps, guidance=args.guidance,
                                  decode_batch_size=args.decode_batch_size, fail_fast=args.fail_fast,
                                  checkpoint=Path(args.checkpoint), overwrite=args.overwrite,
                                  gallery="requests" if args.input else "all", resume_checked=True,
                                  lines=lines, done=done, source=None if args.input else "--prompt")
        if args.prompt:  # quick use: show the answer's record, OUT still locked (read in two passes: see iter_latest)
            from mmllm.inference.gallery import iter_latest

            for rec in iter_latest(Path(args.output) / "results.jsonl"):  # one at a time: OUT may gather many
                if rec["id"] == f"prompt-{digest}":
                    print(json.dumps(rec, indent=2))
    log.info("requests: %(done)d done, %(failed)d failed, %(skipped)d already done", counts)
    if counts["failed"]:  # a warning: under -q too (in CI, a log file), the exit code 1 says where to look
        log.warning("%s", where_failed(Path(args.output), args.overwrite))
    return 1 if counts["failed"] or counts["stopped"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    from mmllm.training.checkpoint import export_merged, export_weights_only, require_checkpoint_folder

    if args.merge_lora and args.dtype is not None:
        raise SystemExit("--merge-lora writes the LLM in its own dtype; leave --dtype unset")
    if args.merge_lora and args.assembly:  # export_merged records the checkpoint's assembly, its LLM the merged one
        raise SystemExit("--assembly goes with a weights-only export (without --merge-lora); --merge-lora "
                         "records the checkpoint's own assembly, with the merged LLM; leave --assembly out")
    require_checkpoint_folder(args.checkpoint, "--checkpoint")
    # export_merged and export_weights_only take --output's lock themselves (a second export there is refused)
    if args.merge_lora:
        path = export_merged(Path(args.checkpoint), Path(args.output), trust_remote_code=args.trust_remote_code)
        log.info("wrote merged model to %s", path)
    else:
        dtype = args.dtype or "float32"
        path = export_weights_only(Path(args.checkpoint), Path(args.output), dtype,
                                   Path(args.assembly) if args.assembly else None)
        log.info("wrote the learned weights (%s, no training state) to %s", dtype, path)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mmllm.demo import run_demo

    if args.quick and not args.tiny:
        raise SystemExit("--quick shortens the training of --tiny; the embedded default is already trained: "
                         "use `mmllm demo --tiny --quick`, or leave --quick out")
    from mmllm.inference.runner import OutputError

    try:
        code = run_demo(Path(args.output), quick=args.quick, tiny=args.tiny)
    except OutputError as exc:  # e.g. an --output whose media/ holds the requests' inputs
        raise SystemExit(str(exc)) from exc
    print(f"demo: open {Path(args.output) / 'index.html'}")  # the result, on stdout as other commands' (kept by -q)
    return code


def _stage_assembly(cfg):
    """The assembly a stage trains: ``init_from``'s recorded one when that checkpoint exists (checked against
    the stage's as training checks it), else the stage's own (file + ``assembly.*`` overrides)."""
    from mmllm.config import config_source, load_assembly
    from mmllm.registry import check_part_options
    from mmllm.training.checkpoint import checkpoint_assembly
    from mmllm.training.init_from import continues_checkpoint

    if continues_checkpoint(cfg):  # refused as training refuses it: the recorded assembly is built next
        return checkpoint_assembly(Path(cfg.init_from))
    assembly = load_assembly(cfg.assembly, cfg.assembly_overrides)
    check_part_options(assembly, config_source(cfg.assembly), cfg.assembly_overrides, "assembly.")
    return assembly


def _stage_model(args: argparse.Namespace, shapes_only: bool = False, check=None):
    """The stage config, its records and the model with what `mmllm cache` runs of its parts; with
    ``shapes_only``, no records and no decoder or encoder weights (for `data check`, which reads the
    tokenizer and the shapes only, and must report bad data rather than fail on it). Neither runs the
    LLM: it is built from its config alone (tokenizer, token ids, sizes; no weights read).

    The assembly is the one the stage trains: ``init_from``'s recorded one when that checkpoint exists
    (checked against the stage's as training checks it). Both commands run before training, so the
    previous stage's checkpoint may not exist yet: the assembly is then the stage's own. That gives what
    both read: the tokens and shapes come from the assembly the previous stage trains, and the cache
    files each frozen part's outputs under that part's fingerprint, so training finds them only if it
    runs the same part. ``check(cfg)`` runs on the config before anything loads."""
    from mmllm.config import config_source, load_stage, naming_overrides
    from mmllm.data.dataset import load_stage_records
    from mmllm.model import AnyToAnyModel
    from mmllm.training.init_from import checkpoint_missing
    from mmllm.training.parts import StageParts, cache_parts, stage_parts

    cfg = load_stage(args.config, args.overrides)
    if check is not None:
        check(cfg)
    if checkpoint_missing(cfg):
        use = "the tokens and shapes it checks" if shapes_only else "the frozen encoders and decoders it runs"
        note = "" if shapes_only else (" The cache files their outputs under each part's fingerprint: training "
                                       "uses them only if the checkpoint runs the same parts (with "
                                       "cache.require=true, a mismatch is reported before training).")
        log.info("init_from %s is not there yet (the previous stage is not trained): %s come from the stage's own "
                 "assembly %s, which the previous stage trains if its config names the same one.%s",
                 cfg.init_from, use, config_source(cfg.assembly), note)
    assembly = _stage_assembly(cfg)
    per_dataset = None if shapes_only else load_stage_records(cfg.all_data(), cfg.stage)[0]
    parts = StageParts() if shapes_only else cache_parts(stage_parts(cfg.losses, per_dataset))
    log.info("stage %s: %s; the LLM from its config alone (not run here)", cfg.stage, parts.describe())
    with naming_overrides(cfg.assembly_overrides, "assembly."):
        model = AnyToAnyModel.assemble(assembly, parts.decoders, parts.encoders, llm_weights=False)
    return cfg, per_dataset, model


def cmd_data_check(args: argparse.Namespace) -> int:
    from mmllm.data.check import check_stage_data

    check_json_target(args.json)
    cfg, _, model = _stage_model(args, shapes_only=True)
    report = check_stage_data(cfg, model, decode=not args.no_decode)
    print(report.format())
    if args.json:
        report.write_json(args.json)
    return 0 if report.ok else 1


def cmd_cache(args: argparse.Namespace) -> int:
    from mmllm.data.cache_build import build_cache, require_cache_dir

    require_at_least_1(args, "batch_size")
    # the records read once, for the model's parts and the cache
    cfg, per_dataset, model = _stage_model(args, check=require_cache_dir)
    report = build_cache(cfg, model, batch_size=args.batch_size, device=args.device, per_dataset=per_dataset)
    print(report.format())
    everything = cfg.cache.encoders and (cfg.cache.targets or not cfg.losses.mse)
    if everything and not report.failed and (report.computed or report.present) and not cfg.cache.require:
        print("  everything this stage reads is cached: with cache.require=true it trains without holding the "
              "parts the cache replaces")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    """``mmllm world report``: the toy world's parts measured on seen and held-out combinations."""
    from mmllm.config import MODALITIES
    from mmllm.toyworld.parts import shipped_dir
    from mmllm.toyworld.report import ReportOptions, format_report, run_report

    require_at_least_1(args, "per_combo", "decoder_items", "steps")
    parts_dir = Path(args.parts) if args.parts else shipped_dir()
    if not parts_dir.is_dir():
        raise SystemExit(f"--parts {parts_dir}: not a directory (train with scripts/pretrain_toy_components.py)")
    options = ReportOptions(
        parts_dir=parts_dir,
        output=Path(args.output),
        modalities=comma_list(args.modalities, "--modalities", MODALITIES),
        per_combo=args.per_combo,
        decoder_items=args.decoder_items,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
    )
    report = run_report(options)
    print(format_report(report))
    log.info("wrote %s", Path(args.output) / "report.json")
    return 0


def cmd_world_data(args: argparse.Namespace) -> int:
    """``mmllm world data``: the three stages' training data, rendered from the world's training combinations,
    and their evaluation data (``held-out/``) from its held-out combinations."""
    from mmllm.toyworld.stage_data import StageDataOptions, write_stage_data

    plain = Path(args.plain) if args.plain else None
    if plain is not None and not plain.is_file():
        raise SystemExit(f"--plain {plain}: not found (make it with `mmllm world distil --out {plain}`)")
    counts = write_stage_data(StageDataOptions(out=Path(args.out), seed=args.seed, plain_answers=plain))
    for name, n in counts.items():
        print(f"{name:>14}  {n}")
    return 0


def default_assembly_file() -> Path:
    """The embedded default's assembly YAML, in the repository mmllm runs from (a wheel holds no configs/)."""
    from mmllm.locations import SOURCE_TREE, repository_root

    repo = repository_root()
    if repo is None:
        raise SystemExit(f"--assembly: the default, configs/assemblies/default.yaml, is in the repository and a wheel "
                         f"does not install it (this mmllm is installed in {SOURCE_TREE}): give --assembly the "
                         "path of an assembly YAML, e.g. a clone's configs/assemblies/default.yaml")
    return repo / "configs" / "assemblies" / "default.yaml"


def cmd_world_distil(args: argparse.Namespace) -> int:
    """``mmllm world distil``: the base LLM's own answers to the plain-chat prompts (instruct-stage data)."""
    from mmllm.config import load_assembly
    from mmllm.registry import build
    from mmllm.toyworld.chat_prompts import TRAIN
    from mmllm.toyworld.stage_data import distil_plain_chat

    require_at_least_1(args, "max_new_tokens")
    assembly = load_assembly(args.assembly or default_assembly_file())
    core = build("llm", assembly.llm, "llm")
    records = distil_plain_chat(core, TRAIN, Path(args.out), max_new_tokens=args.max_new_tokens)
    log.info("wrote %d answers to %s", len(records), args.out)
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    """``mmllm refine``: fit the output projections on cached signal-token states (see mmllm/training/refine.py)."""
    from mmllm.folder_lock import hold_beside
    from mmllm.training.checkpoint import export_folder, require_checkpoint_folder

    require_checkpoint_folder(args.checkpoint, "--checkpoint")  # before the data is read
    require_at_least_1(args, "steps", "batch_size", "cache_batch_size", "threads")
    if args.limit < 0:
        raise SystemExit(f"--limit must be at least 0 (0: every conversation), got {args.limit}")
    if not args.lr > 0:
        raise SystemExit(f"--lr must be a number above 0, got {args.lr}")
    # saved beside --output and renamed into place: where --output is a link (a folder on another disk), the
    # checkpoint goes where it leads and the link stays (as exports do)
    args.output = export_folder(args.output)
    # one run at a time into --output (a second refused before the model loads): each replaces it whole
    with hold_beside(Path(args.output), "mmllm refine", "give this run another --output"), \
            torch_threads(args.threads):
        path, results = _refine(args)
    for r in results:
        print(f"{r.modality:>6}: {r.groups_train} groups, validation relative MSE {r.val_before:.4f} -> "
              f"{r.val_after:.4f}")
    log.info("wrote %s", path)
    return 0


def _refine(args: argparse.Namespace) -> tuple[Path, list]:
    """``mmllm refine``'s work: the data read, the model loaded, its output projections fitted and saved."""
    from mmllm.data.formats import read_records
    from mmllm.model import AnyToAnyModel
    from mmllm.training.refine import collect_signal_states, describe, refine_output_projections

    conversations = []
    for path in args.data:  # read before the model loads: a bad path fails at once
        records, errors = read_records(path, args.format)
        conversations += records
        if errors:
            log.warning("%s: %d malformed record(s) skipped", path, len(errors))
    if args.limit:
        conversations = conversations[: args.limit]
    model = AnyToAnyModel.from_pretrained(args.checkpoint, decoder_parts="conditioning",  # targets, no generation
                                          trust_remote_code=args.trust_remote_code)
    cache = collect_signal_states(model, conversations, batch_size=args.cache_batch_size)
    if not cache.hidden:
        raise SystemExit("the data holds no assistant outputs (signal groups) to refine on")
    results = refine_output_projections(model, cache, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                        seed=args.seed)
    path = model.save_pretrained(args.output, extra={"refined_from": str(Path(args.checkpoint).absolute()),
                                                     "refine": describe(results)})
    return path, results


def cmd_eval(args: argparse.Namespace) -> int:
    """``mmllm eval``: x2t, t2x (vs the oracle), routing and text retention of a toy-world model."""
    from mmllm.config import MODALITIES
    from mmllm.demo import shipped_default
    from mmllm.folder_lock import hold_folder
    from mmllm.model import AnyToAnyModel
    from mmllm.toyworld.judges import Judge
    from mmllm.toyworld.model_eval import TASKS, EvalOptions, format_eval, run_eval
    from mmllm.toyworld.parts import shipped_dir
    from mmllm.training.checkpoint import require_checkpoint_folder

    checkpoint = Path(args.checkpoint) if args.checkpoint else shipped_default()
    if args.checkpoint:
        require_checkpoint_folder(checkpoint, "--checkpoint")
    else:
        require_checkpoint_folder(checkpoint, "the shipped default glue", " (train it with scripts/train_default.sh, "
                                  "or give --checkpoint)")
    parts = Path(args.parts) if args.parts else shipped_dir()
    if not parts.is_dir():
        raise SystemExit(f"--parts {parts}: not a directory (the folder holding judge-<modality>/, "
                         "default: the shipped mmllm/toyworld/weights)")
    if args.items < 1:
        raise SystemExit(f"--items {args.items}: give at least 1 item per modality and split")
    require_at_least_1(args, "batch_size", "text_batch_size", "steps", "threads")
    modalities = comma_list(args.modalities, "--modalities", MODALITIES)
    tasks = comma_list(args.tasks, "--tasks", TASKS)
    options = EvalOptions(output=Path(args.output), items=args.items, batch_size=args.batch_size,
                          text_batch_size=args.text_batch_size, steps=args.steps,
                          guidance=args.guidance, modalities=modalities, seed=args.seed, tasks=tasks,
                          parts=parts if args.parts else None, allow_other_parts=args.allow_other_parts)
    _refuse_other_parts(checkpoint, options)  # before anything loads or is written; run_eval checks it again
    # one run at a time in --output (a second refused before anything loads): both would rewrite eval.json.
    # run_eval takes the same lock: held by this process already, it is counted, not taken twice
    with hold_folder(Path(args.output), "mmllm eval", "give this run another --output"):
        judges = {m: Judge.load(parts / f"judge-{m}") for m in modalities if (parts / f"judge-{m}").is_dir()}
        with torch_threads(args.threads):
            model = AnyToAnyModel.from_pretrained(checkpoint, trust_remote_code=args.trust_remote_code)
            report = run_eval(model, judges, options)
    print(format_eval(report))
    log.info("wrote %s", Path(args.output) / "eval.json")
    return 0


def _refuse_other_parts(checkpoint: Path, options) -> None:
    """``mmllm eval`` of a checkpoint whose recorded encoders or decoders are not the toy world's parts, refused
    from its ``mmllm.json`` before the model loads (a minute with a real core). A folder that is no checkpoint is
    left to loading, which says what is wrong with it."""
    from mmllm.toyworld.model_eval import check_toy_parts
    from mmllm.training.checkpoint import CheckpointError, checkpoint_assembly

    if options.allow_other_parts:
        return  # run_eval warns, once
    try:
        assembly = checkpoint_assembly(checkpoint)
    except (CheckpointError, OSError, ValueError):
        return
    check_toy_parts(assembly, options)


def finite_float(text: str) -> float:
    """An argparse type: a float, refusing nan and inf (which float() reads)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a classifier-free guidance scale, a finite number of at least 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (a scale of at most 1 turns guidance off), got {text}")
    return value


def not_a_file(path: Path) -> str:
    """What ``path``, which is not a regular file, is: for an error refusing it where a file goes."""
    if path.is_dir():
        return "a folder"
    if path.exists():  # a pipe (`--image <(...)`), a device: media are read from regular files only
        return "not a regular file (media are read from files, not pipes or devices)"
    return "file not found"


def check_json_target(path: str | None) -> None:
    """``--json PATH`` refused before the work when it names a folder (it was refused after, the work lost)."""
    if path is not None and Path(path).is_dir():
        raise SystemExit(f"--json {path}: a folder; give a file path, e.g. {Path(path) / 'report.json'}")


def require_at_least_1(args: argparse.Namespace, *names: str) -> None:
    """Refuse a count flag (``--batch-size``, ``--steps``, ...) below 1 before anything loads; None: not given."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def comma_list(text: str, flag: str, valid: Sequence[str]) -> list[str]:
    """``a,b`` -> ``["a", "b"]``, each one of ``valid`` (else exit naming the flag and the valid values)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in valid]
    if unknown or not items:
        raise SystemExit(f"{flag} {text!r}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}; "
                         f"valid: {', '.join(valid)} (comma-separated)")
    return items


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count at ``n`` (``--threads``; None or 0: left as it is) for the length of the block, and
    as it was after: ``main`` called from Python leaves the caller's process as it found it."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


TRUST_HELP = ("load a checkpoint whose assembly sets trust_remote_code for a part (runs that model's own Python code; "
              "refused without this flag)")


class HelpFormatter(argparse.HelpFormatter):
    """Each option's default after its help, where it has one the help does not already give. A text of several
    lines (a command's outputs and examples) keeps its lines: those not indented wrapped to the terminal, the
    indented ones (examples, a table) as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text = f"{text} (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:
            return super()._fill_text(text, width, indent)
        lines = []
        for line in text.splitlines():
            if line.startswith(" "):
                lines.append(indent + line)
            else:
                lines += textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=indent + "  ") or [""]
        return "\n".join(lines)


EXIT_CODES = """\
exit codes:
  0        done
  1        infer: a request failed (or --fail-fast stopped the run); data check: a problem
           found in the data
  2        a usage error, or what was given refused (a bad flag, config, path or data file, an
           output folder in use), or memory or disk ran out: one line saying what to fix (-v
           adds the traceback)
  70       an unexpected error, a fault of mmllm or of what it runs (EX_SOFTWARE): its traceback
  130/143  stopped by Ctrl-C (SIGINT) / SIGTERM (train saves the step under way first)
  141      the reader of stdout stopped reading (`mmllm inspect ... | head`), said nothing

Logs and progress bars go to stderr (-q: warnings and errors only, no bars); results to stdout and the \
files each command's --help names. \
`mmllm COMMAND --help` gives a command's flags, their defaults, what it writes and an example."""

EPILOGS = {
    "train": """\
writes: checkpoints OUTPUT_DIR/step-N and OUTPUT_DIR/final.json (naming the last), OUTPUT_DIR being the stage's \
output_dir (relative to the working directory; output_dir=PATH overrides it); prints (stdout) one line at the end: \
"done: N steps, loss A -> B, ...; checkpoint OUTPUT_DIR/step-N"
examples:
  mmllm train --config configs/stages/tiny/encode_align.yaml max_steps=50
  mmllm train --config configs/stages/tiny/encode_align.yaml --resume   # on from the newest step-N""",
    "inspect": """\
prints (stdout): the parts, dimension checks and per-stage parameter counts; --json FILE also writes the counts
example:
  mmllm inspect --config configs/assemblies/tiny.yaml --lora configs/lora/tiny.yaml""",
    "config": """\
prints (stdout): the config as YAML with every key's default filled in, the overrides applied and, for a stage, \
its assembly: and lora: files written in and its paths absolute, as train resolves them; given back as --config \
(train --config resolved.yaml) it is the same config. Writes nothing; builds no model and reads no weights.
--checkpoint DIR prints the stage config that trained that checkpoint (its mmllm.json's record, the assembly it built and its LoRA written in, relative paths made absolute from the folder training ran in), after verifying its manifest; train --config on it re-runs that training (give another output_dir: the checkpoint's own holds it). An export, a merged export or a checkpoint that records no stage is refused (exit 2).
examples:
  mmllm config --config configs/stages/tiny/instruct.yaml optim.lr=1e-3 > resolved.yaml
  mmllm config --checkpoint runs/tiny/instruct/step-30 output_dir=runs/again > again.yaml""",
    "infer": """\
writes into --output: results.jsonl (one record per request: text, reply, files, error), media/ and index.html \
(pages/: failed.html listing the failed requests, and the pages beyond 1000 requests); with \
--prompt the answer's record is also printed on stdout as JSON. Exit code 1 if any request failed: the same \
command retries only the failed ones.
examples:
  mmllm infer --checkpoint runs/tiny/instruct/step-30 --input data/samples/requests.jsonl \\
      --output out/
  mmllm infer --checkpoint runs/tiny/instruct/step-30 --prompt "What is this?" \\
      --image data/samples/media/red_circle.png --output out/""",
    "export": """\
writes: the inference copy into --output (replacing an earlier export there whole)
examples:
  mmllm export --checkpoint runs/tiny/instruct/step-30 --output ship/ --dtype float16
  mmllm export --checkpoint runs/tiny/instruct/step-30 --output merged/ --merge-lora""",
    "demo": """\
writes into --output: index.html (the gallery), results.jsonl and media/ (with --tiny, its training runs in \
--output's runs/ too)
examples:
  mmllm demo
  mmllm demo --tiny --output outputs/tiny""",
    "check": """\
prints (stdout): the report; --json FILE also writes it. Exit code 1 if it finds a problem in the data.
example:
  mmllm data check --config configs/stages/tiny/encode_align.yaml""",
    "cache": """\
writes: the features into the stage's cache.dir; prints (stdout) what was computed, found or failed
example:
  mmllm cache --config configs/stages/tiny/decode_align.yaml cache.dir=cache/tiny""",
    "refine": """\
writes: the refined checkpoint into --output; prints (stdout) each modality's validation relative MSE
example:
  mmllm refine --checkpoint runs/tiny/instruct/step-30 --data data/samples/chat.jsonl \\
      --output refined/""",
    "eval": """\
writes: --output/eval.json (after each measurement); prints (stdout) the table
examples:
  mmllm eval                                  # the shipped default
  mmllm eval --checkpoint runs/default/instruct/step-450 --tasks x2t,routing \\
      --output outputs/eval-mine""",
    "report": """\
writes: --output/report.json; prints (stdout) the table
example:
  mmllm world report --modalities image --output outputs/world-report""",
    "data": """\
writes under --out: the stages' media and JSONL, and held-out/ for evaluation; prints (stdout) the counts
example:
  mmllm world data --out data/default --plain data/default/plain_chat.jsonl""",
    "distil": """\
writes: the answers as chat JSONL into the file --out names
example:
  mmllm world distil --out data/default/plain_chat.jsonl""",
}


class CommandParser(argparse.ArgumentParser):
    """A parser whose "the following arguments are required" error names, as :func:`unrecognized` does, the flag
    each unknown one on the command line resembles: `export --out DIR` (for --output) was refused for the
    --output it lacked, before the unknown --out was reported, without a word of it. ``command_line``: the
    words parsed, set by :func:`main` on every parser (:func:`remember_command_line`)."""

    command_line: list[str] = []

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            flags = {flag for action in self._actions for flag in action.option_strings}
            unknown = [w for w in self.command_line if w.startswith("--") and w.split("=", 1)[0] not in flags]
            message = "; ".join([message, *resembling(unknown, self)])
        super().error(message)


def remember_command_line(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Give ``parser`` and every command's parser under it the command line ``argv`` (:class:`CommandParser`)."""
    parser.command_line = argv
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                remember_command_line(child, argv)


def add_command(sub, name: str, summary: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does, each option's default, what it writes and an example; its
    flags taken only as written in full (:func:`build_parser`)."""
    return sub.add_parser(name, help=summary, description=summary, epilog=epilog, formatter_class=HelpFormatter,
                          allow_abbrev=False)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False on every parser (add_command): a flag is taken only as written in full. An abbreviation
    # (`--out` for `--output`) that worked would change meaning, or become ambiguous, the day a flag starting the
    # same way is added, under the scripts that use it; refused, it says which flag it resembles (unrecognized)
    p = CommandParser(prog="mmllm", description="Assemble, train and run an any-to-any multimodal model. "
                                f"The commands, configs, data formats and checkpoints are documented in {docs_folder()}.",
                                epilog=EXIT_CODES, formatter_class=HelpFormatter, allow_abbrev=False)
    verbose_help = "tracebacks of errors and other libraries' INFO logging"
    quiet_help = "warnings and errors only: no INFO lines, no progress bars (results on stdout are kept)"
    p.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = add_command(sub, "train", "train one stage from a stage YAML", EPILOGS["train"])
    t.add_argument("--config", type=user_path, required=True, metavar="YAML", help="a stage YAML (configs/stages/)")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in output_dir (from step 0 if there is none)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the stage, e.g. max_steps=50 optim.lr=1e-3 (assembly.key=value: of its assembly)")
    t.set_defaults(fn=cmd_train)

    i = add_command(sub, "inspect", "assemble and print parts, dimension checks, per-stage parameter counts",
                    EPILOGS["inspect"])
    i.add_argument("--config", type=user_path, required=True, metavar="YAML", help="an assembly or stage YAML")
    i.add_argument("--lora", type=user_path, metavar="YAML",
                   help="with an assembly YAML: a LoRA YAML, to count the instruct stage's adapter")
    i.add_argument("--json", type=user_path, metavar="FILE", help="also write the counts here")
    i.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the config, e.g. llm.options.layers=4")
    i.set_defaults(fn=cmd_inspect)

    cf = add_command(sub, "config", "print the resolved config a stage (or assembly) YAML and overrides give, or "
                                    "that trained a checkpoint, as YAML: every default, overrides applied, files "
                                    "it names written in",
                     EPILOGS["config"])
    source = cf.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", type=user_path, metavar="YAML", help="a stage or assembly YAML")
    source.add_argument("--checkpoint", type=user_path, metavar="DIR",
                        help="a training checkpoint (step-N): the stage config that trained it")
    cf.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="overrides, as train (or inspect, for an assembly) takes them, e.g. optim.lr=1e-3 "
                         "assembly.max_length=64")
    cf.set_defaults(fn=cmd_config)

    r = add_command(sub, "infer", "batch inference from a checkpoint: requests JSONL in, media + results.jsonl "
                                  "+ index.html out (exit 1 if any request failed)", EPILOGS["infer"])
    r.add_argument("--checkpoint", type=user_path, required=True, metavar="DIR", help="a checkpoint directory (step-N)")
    r.add_argument("--input", type=user_path, metavar="JSONL",
                   help=f"requests, one JSON object per line (the schema: {doc_page('inference.md')})")
    r.add_argument("--output", type=user_path, required=True, metavar="DIR",
                   help="output folder; re-running on it skips requests already done (refused if they were "
                        "answered with another checkpoint, --seed, --max-new-tokens, ..., --dtype or --device type)")
    r.add_argument("--overwrite", action="store_true",
                   help="start --output afresh: remove its results.jsonl, media/, index.html and pages/ first")
    r.add_argument("--prompt", metavar="TEXT", help="one request from the command line instead of --input")
    r.add_argument("--image", type=user_path, metavar="FILE", help="with --prompt: an input image")
    r.add_argument("--audio", type=user_path, metavar="FILE", help="with --prompt: an input audio file")
    r.add_argument("--video", type=user_path, metavar="FILE", help="with --prompt: an input video")
    r.add_argument("--batch-size", type=int, default=8, metavar="N", help="requests answered together")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="every part is cast to it (a core whose llm.dtype is lower is cast up, with a warning)")
    r.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's); 1 is fastest for tiny models on a busy machine")
    r.add_argument("--seed", type=int, default=0, metavar="N", help="seed of requests that give none")
    r.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest answer, in tokens")
    r.add_argument("--temperature", type=finite_float, default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    r.add_argument("--top-p", type=finite_float, default=1.0, metavar="P", help="nucleus sampling mass, in (0, 1]")
    r.add_argument("--steps", type=int, default=None, metavar="N",
                   help="decoder denoising steps (default: the decoder's)")
    r.add_argument("--guidance", type=guidance_scale, default=None, metavar="G",
                   help="decoder classifier-free guidance scale, >= 0; <= 1 turns it off (default: the decoder's)")
    r.add_argument("--decode-batch-size", type=int, default=None, metavar="N",
                   help="signal groups per decoder call (default: a whole batch's); 1 makes media bit-identical "
                        "whatever --batch-size, at a speed cost")
    r.add_argument("--fail-fast", action="store_true", help="stop at the first failed request")
    r.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    r.set_defaults(fn=cmd_infer)

    e = add_command(sub, "export", "write an inference copy: learned weights only (optionally fp16), or the "
                                   "LLM with the LoRA adapter merged in (--merge-lora)", EPILOGS["export"])
    e.add_argument("--checkpoint", type=user_path, required=True, metavar="DIR", help="a checkpoint directory (step-N)")
    e.add_argument("--output", type=user_path, required=True, metavar="DIR",
                   help="a new or empty folder, or an earlier export's (replaced whole)")
    e.add_argument("--merge-lora", action="store_true", help="merge LoRA into the LLM and save the LLM with it")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights-only copy: float32 (default)")
    e.add_argument("--assembly", type=user_path, metavar="YAML",
                   help="weights-only copy: record this assembly YAML instead of the checkpoint's")
    e.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    e.set_defaults(fn=cmd_export)

    d = add_command(sub, "demo", "the embedded default answering requests in every direction, offline", EPILOGS["demo"])
    d.add_argument("--output", type=user_path, default="outputs", metavar="DIR", help="where the answers go")
    d.add_argument("--tiny", action="store_true", help="the wiring demo: train the tiny random assembly, then answer")
    d.add_argument("--quick", action="store_true", help="with --tiny: 4 steps per stage (for tests)")
    d.set_defaults(fn=cmd_demo)

    data = add_command(sub, "data", "inspect a stage's data").add_subparsers(dest="data_command", required=True,
                                                                             metavar="COMMAND")
    dc = add_command(data, "check", "counts per modality, missing/unreadable files, over-long samples; no training",
                     EPILOGS["check"])
    dc.add_argument("--config", type=user_path, required=True, metavar="YAML", help="a stage YAML")
    dc.add_argument("--no-decode", action="store_true", help="only check that media files exist (faster)")
    dc.add_argument("--json", type=user_path, metavar="FILE", help="also write the full report here")
    dc.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the stage")
    dc.set_defaults(fn=cmd_data_check)

    c = add_command(sub, "cache", "precompute encoder features and conditioning targets into cache.dir",
                    EPILOGS["cache"])
    c.add_argument("--config", type=user_path, required=True, metavar="YAML",
                   help="a stage YAML with `cache: {dir: PATH}`")
    c.add_argument("--batch-size", type=int, default=16, metavar="N", help="samples per encoder/decoder call")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    c.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of the stage, e.g. cache.dir=PATH")
    c.set_defaults(fn=cmd_cache)
    rf = add_command(sub, "refine", "fit the output projections on cached signal-token states of a trained "
                                    "checkpoint (one LLM forward per conversation, then many cheap steps)",
                     EPILOGS["refine"])
    rf.add_argument("--checkpoint", type=user_path, required=True, metavar="DIR",
                    help="a trained checkpoint directory (step-N)")
    rf.add_argument("--data", type=user_path, required=True, nargs="+", metavar="FILE",
                    help="conversation files with assistant outputs")
    rf.add_argument("--format", default="mmllm-chat", help="the data files' format (as a stage's data: format:)")
    rf.add_argument("--output", type=user_path, required=True, metavar="DIR", help="the refined checkpoint's directory")
    rf.add_argument("--steps", type=int, default=3000, metavar="N", help="training steps per modality")
    rf.add_argument("--batch-size", type=int, default=64, metavar="N", help="signal groups per step")
    rf.add_argument("--cache-batch-size", type=int, default=8, metavar="N",
                    help="conversations per LLM forward while caching")
    rf.add_argument("--lr", type=finite_float, default=5e-4, help="learning rate")
    rf.add_argument("--limit", type=int, default=0, metavar="N", help="use the first N conversations (0: all)")
    rf.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    rf.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the batches and the validation split")
    rf.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    rf.set_defaults(fn=cmd_refine)

    ev = add_command(sub, "eval", "x2t / t2x accuracy vs the oracle, routing and text perplexity of a "
                                  "model on the toy world's parts (default: the shipped default)", EPILOGS["eval"])
    ev.add_argument("--checkpoint", type=user_path, metavar="DIR",
                    help="a checkpoint directory (default: the shipped default glue)")
    ev.add_argument("--parts", type=user_path, metavar="DIR",
                    help="folder holding the judges (default: the shipped mmllm/toyworld/weights)")
    ev.add_argument("--output", type=user_path, default="outputs/eval", metavar="DIR", help="where eval.json goes")
    ev.add_argument("--items", type=int, default=48, metavar="N", help="items per modality and split")
    ev.add_argument("--batch-size", type=int, default=16, metavar="N",
                    help="requests answered together (x2t, t2x, routing)")
    ev.add_argument("--text-batch-size", type=int, default=8, metavar="N",
                    help="held-out text passages per forward of the perplexity (text)")
    ev.add_argument("--modalities", default="image,audio,video", metavar="LIST", help="comma-separated")
    ev.add_argument("--tasks", default="x2t,t2x,routing,text", metavar="LIST",
                    help="which measurements (comma-separated)")
    ev.add_argument("--steps", type=int, default=None, metavar="N",
                    help="decoder denoising steps (default: the decoder's)")
    ev.add_argument("--guidance", type=guidance_scale, default=None, metavar="G",
                    help="classifier-free guidance scale, >= 0; <= 1 turns it off (default: the decoder's)")
    ev.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads (default: torch's)")
    ev.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the model's answers")
    ev.add_argument("--allow-other-parts", action="store_true",
                    help="measure a model whose encoders or decoders are not the toy world's parts (refused "
                         "without it: its x2t / t2x scores would not say how well it works)")
    ev.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    ev.set_defaults(fn=cmd_eval)

    w = add_command(sub, "world", "the toy world: measure its parts; write or distil the default's data")
    wsub = w.add_subparsers(dest="world_command", required=True, metavar="COMMAND")
    wr = add_command(wsub, "report", "judge, retrieval and oracle-decoder accuracy, seen vs held-out",
                     EPILOGS["report"])
    wr.add_argument("--parts", type=user_path, metavar="DIR",
                    help="folder of trained parts (default: the shipped mmllm/toyworld/weights)")
    wr.add_argument("--output", type=user_path, default="outputs/world-report", metavar="DIR",
                    help="where report.json goes")
    wr.add_argument("--modalities", default="image,audio,video", metavar="LIST", help="comma-separated")
    wr.add_argument("--per-combo", type=int, default=2, metavar="N",
                    help="true items per combination (judge, retrieval)")
    wr.add_argument("--decoder-items", type=int, default=48, metavar="N",
                    help="generated items per split and modality")
    wr.add_argument("--steps", type=int, default=None, metavar="N",
                    help="decoder denoising steps (default: the decoder's)")
    wr.add_argument("--guidance", type=guidance_scale, default=None, metavar="G",
                    help="classifier-free guidance scale, >= 0; <= 1 turns it off (default: the decoder's)")
    wr.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the decoders' generation")
    wr.set_defaults(fn=cmd_world)
    wd = add_command(wsub, "data", "write the default's stage data (media + JSONL) from the world's training combos, "
                                   "and held-out/ eval data from its held-out combos", EPILOGS["data"])
    wd.add_argument("--out", "--output", type=user_path, required=True, metavar="DIR", help="the data folder to write")
    wd.add_argument("--plain", type=user_path, metavar="JSONL",
                    help="distilled plain chat JSONL (from `mmllm world distil`) to mix in")
    wd.add_argument("--seed", type=int, default=0, metavar="N", help="the data is a function of it")
    wd.set_defaults(fn=cmd_world_data)
    wl = add_command(wsub, "distil", "the base LLM's greedy answers to the plain-chat prompts -> JSONL",
                     EPILOGS["distil"])
    wl.add_argument("--assembly", type=user_path, metavar="YAML",
                    help="the assembly whose LLM answers (default: the repository's configs/assemblies/default.yaml; "
                         "a wheel does not install it)")
    wl.add_argument("--out", "--output", type=user_path, required=True, metavar="JSONL", help="the file to write")
    wl.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer, in tokens")
    wl.set_defaults(fn=cmd_world_distil)
    # -v and -q also after the command (`mmllm train ... -v`: where users add it when an error asks for it);
    # SUPPRESS keeps a command's parser from resetting a -v or -q given before the command
    for command in (t, i, cf, r, e, d, dc, c, rf, ev, wr, wd, wl):
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
    return p


def _offline_hint(exc: BaseException, offline_by_default: bool) -> None:
    """After an error from the hub's client: say that the CLI, not the user, turned the hub off."""
    text = str(exc).lower()
    if offline_by_default and any(s in text for s in ("couldn't connect", "offline", "outgoing traffic")):
        log.error("mmllm runs offline unless HF_HUB_OFFLINE is set (the hub part above is not in the local "
                  "cache): HF_HUB_OFFLINE=0 lets it download, or give a local path")


def main(argv: list[str] | None = None) -> int:
    offline_by_default = "HF_HUB_OFFLINE" not in os.environ
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    remember_command_line(parser, sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`train --config C --resume max_steps=50`) are overrides too
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            command = command_parser(parser, args)  # its usage, not the top level's, with the flag it most resembles
            command.error(unrecognized(extra, command))
    if args.verbose and args.quiet:
        command_parser(parser, args).error("-q/--quiet and -v/--verbose ask for less and more: give one of them")
    with cli_logging(args.verbose, args.quiet):
        return run_command(args, offline_by_default)


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the command ``args`` ran (`mmllm world report`'s), for an error shown with its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def command_name(args: argparse.Namespace) -> str:
    """The command ``args`` ran as a user writes it: ``eval``, ``world report``, ``data check``."""
    sub = getattr(args, f"{args.command}_command", None)
    return f"{args.command} {sub}" if sub else args.command


def unrecognized(extra: list[str], parser: argparse.ArgumentParser) -> str:
    """argparse's "unrecognized arguments", naming the flag of ``parser`` each unknown one most resembles."""
    return "; ".join([f"unrecognized arguments: {' '.join(extra)}", *resembling(extra, parser)])


def resembling(words: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """"--given: did you mean --flag?" for each ``--`` word of ``words`` (``--given=value`` too) that resembles a
    flag of ``parser``."""
    flags = [flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")]
    hints = []
    for word in words:
        given = word.split("=", 1)[0]
        close = difflib.get_close_matches(given, flags, n=1) if given.startswith("--") else []
        if close:
            hints.append(f"{given}: did you mean {close[0]}?")
    return hints


def stdout_reader_gone() -> bool:
    """Whether stdout is a pipe its reader has closed (`mmllm inspect ... | head -3`: it read what it wanted), not
    another pipe of the command's that broke. If so, stdout is pointed at /dev/null, so that Python's flush of what
    is left at exit does not fail on it again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation: no file behind it
        return False
    if not hasattr(select, "poll"):  # Windows: no poll(); the broken pipe is reported as any other
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0)):
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


def after_a_stop(args: argparse.Namespace, started: float) -> str:
    """What a command stopped at once by a signal leaves, and how to go on: the end of its one-line error.
    ``started``: when the command started (``time.time()``), to tell its results from an earlier run's."""
    command = command_name(args)
    if command == "train":
        return ": the steps since output_dir's newest checkpoint are lost; the same command with --resume goes on from it"
    if command == "infer":
        return ": the same command goes on, skipping the requests already answered"
    if command == "eval":  # eval.json is rewritten after each measurement, report.json after each modality
        return kept_so_far(Path(args.output) / "eval.json", "measurements", started)
    if command == "world report":
        return kept_so_far(Path(args.output) / "report.json", "modalities", started)
    return ""


RESULTS_CLOCK_SLACK_S = 1.0  # a file's modification time can be a few ms behind time.time() (a coarser clock)


def kept_so_far(results: Path, what: str, started: float) -> str:
    """What ``results`` (eval.json, report.json: rewritten after each measurement, ``"complete": false`` until
    the last) keeps of a run started at ``started`` and stopped before its end. One last written before
    ``started`` is an earlier run's (this one was stopped before it wrote anything, e.g. while its model loaded)."""
    try:
        written = results.stat().st_mtime
        complete = json.loads(results.read_text()).get("complete")
    except (OSError, ValueError, AttributeError):  # stopped before the run wrote it
        return f": no {what} had finished ({results} was not written)"
    if written < started - RESULTS_CLOCK_SLACK_S:
        return f": no {what} of this run had finished ({results} is an earlier run's, left as it was)"
    if complete is False:
        return f': {results} keeps the {what} finished so far ("complete": false); the one under way is lost'
    return ""


# what needs less memory, per command, after an out-of-memory error outside infer's batches (train raises OutOfMemory
# with its own advice, mmllm.training.out_of_memory, from building its model to its last step)
LESS_MEMORY = {
    "infer": "; to load the model in less memory: --dtype bfloat16 (or float16), or --device cpu",
    "cache": ("; the features computed before it are in cache.dir, and the same command with a smaller --batch-size "
              "computes only the rest"),
    "refine": "; give a smaller --cache-batch-size (the LLM forwards) or --batch-size (the fitting steps)",
    "eval": ("; give a smaller --batch-size (the requests of x2t, t2x and routing answered together), or "
             "--text-batch-size (the passages of the text perplexity)"),
}


def less_memory(args: argparse.Namespace, host: bool = False) -> str:
    """The end of the one line an out-of-memory error ends ``args``'s command with: what needs less (:data:`LESS_MEMORY`),
    leaving out what the run already does (an infer given --dtype bfloat16 is not told to give it). ``host``: the
    machine's memory ran out (torch's CPU allocator), where --device cpu is no way out."""
    command = command_name(args)
    if command == "infer":
        lower = getattr(args, "dtype", "float32") != "float32"
        if host:
            return (f"; the model is loaded in {args.dtype} already: a machine with more memory" if lower else
                    "; to load the model in less memory: --dtype bfloat16 (or float16)")
        if lower:
            return f"; the model is loaded in {args.dtype} already: --device cpu holds it in host memory"
    return LESS_MEMORY.get(command, "")


def report_out_of_memory(args: argparse.Namespace, line: str, exc: BaseException) -> None:
    """One line saying where memory ran out, what is kept and what needs less (-v: with torch's traceback and
    its full message)."""
    if args.verbose:
        log.error("%s", line, exc_info=exc)
    else:
        log.error("%s (run with -v for the traceback)", line)


def run_command(args: argparse.Namespace, offline_by_default: bool) -> int:
    """The parsed command, its errors as one line and an exit code (2: what was given is wrong). An exception
    of another kind is raised on: a fault of mmllm or of what it runs (:func:`entry` exits 70 with its traceback)."""
    from mmllm.config import UserError

    started = time.time()
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a reader gone (`| head`) is found here, not in Python's flush at exit
        return code
    except UserError as exc:  # ConfigError (CheckpointError, FolderInUse), DataFileChanged, CacheError
        if args.verbose:
            log.exception("%s", exc)
        else:
            log.error("%s", exc)
        _offline_hint(exc, offline_by_default)
        return 2
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        log.error("%s", exc.code)  # a command refusing what it was given, saying why
        return 2
    except OutOfMemory as exc:  # training's (all of train's), naming the step, the checkpoint kept and what needs less
        report_out_of_memory(args, str(exc), exc)
        return 2
    except RuntimeError as exc:  # out of memory anywhere else (a GPU's, or on CPU torch's allocator's RuntimeError):
        if not is_out_of_memory(exc):  # loading a model, a cache batch, an eval batch; any other: a fault
            raise
        report_out_of_memory(args, f"{command_name(args)} ran out of memory ({first_line(exc)})"
                                   f"{after_a_stop(args, started)}{less_memory(args, ran_out_on_the_host(exc))}", exc)
        return 2
    except KeyboardInterrupt as exc:  # a signal before training's first step, a second one, Ctrl-C elsewhere
        name = exc.args[0] if exc.args and exc.args[0] in ("SIGINT", "SIGTERM") else "SIGINT"
        if args.verbose:
            log.exception("stopped by %s at once", name)
        log.error("stopped by %s at once%s", name, after_a_stop(args, started))
        return 128 + signal.Signals[name]
    except OSError as exc:  # a path given (or named by a config) that is missing, unreadable or unwritable
        if isinstance(exc, BrokenPipeError) and stdout_reader_gone():
            return 128 + signal.SIGPIPE  # what a shell reports of `yes | head`; nothing went wrong, nothing said
        if args.verbose:
            log.exception("%s", exc)
        else:
            log.error("%s (run with -v for the traceback)", exc)
        _offline_hint(exc, offline_by_default)
        return 2




def report_internal_error() -> int:
    """An exception no command turned into its one-line error (a fault of mmllm, or of a library or part it runs)
    on stderr, with its traceback and what to do, whatever -q; :data:`EXIT_INTERNAL_ERROR`, the exit code that
    tells it apart from 1 (a request failed, a data problem found) and 2 (what was given refused)."""
    traceback.print_exc()
    sys.stderr.write(f"mmllm {__version__}: unexpected error (exit code {EXIT_INTERNAL_ERROR}), not one in what was "
                     "given: a fault of mmllm or of a library or part it runs, the traceback above says where (out of "
                     "memory: give the run less to hold, e.g. a smaller batch size). Please report a fault with the "
                     "command you ran and this output.\n")
    return EXIT_INTERNAL_ERROR


def entry() -> None:
    """The ``mmllm`` command as a process (the console script, ``python -m mmllm``): exits with :func:`main`'s
    code; 70 (:func:`report_internal_error`) where an unexpected exception escapes it, 130 and nothing said for a
    Ctrl-C before or after the command ran (parsing its arguments; one while it runs is :func:`run_command`'s).
    One process of a multi-process launch (``WORLD_SIZE`` > 1: ``accelerate launch``, ``torchrun``) ends
    with ``os._exit`` once its logs and output are flushed: its work is done (checkpoints written and synced,
    the process group destroyed), and the interpreter's teardown could still abort it -- gloo's C++ threads
    destroyed at exit ("terminate called without an active exception", SIGABRT), which made the launcher report
    a finished run as failed."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except Exception:  # noqa: BLE001 -- every other kind is a fault: its traceback, and a code of its own
        code = report_internal_error()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()  # what the interpreter's teardown would flush
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)

