"""mmllm used as a Python library (a notebook or a script of one's own), not through the CLI: what a call
leaves behind in the caller's process, and the README's Python examples, run as written."""

from __future__ import annotations

import logging

import torch

from mmllm.inference.generate import Request


def _modes(model: torch.nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def test_generate_leaves_a_training_model_in_the_modes_it_had(tiny_model):
    """A look at the answers in the middle of one's own training loop must not end the loop's training mode
    (dropout in the projections and LoRA), nor switch on the frozen parts' training mode."""
    tiny_model.train()
    tiny_model.encoders.eval()  # as a training loop has it: frozen parts in eval mode, the glue training
    before = _modes(tiny_model)
    assert tiny_model.input_projections.training and not tiny_model.encoders.image.training

    results = tiny_model.generate([Request(messages=[{"role": "user", "content": "Generate an image: a red circle"}])],
                                  max_new_tokens=4, decode_media=False)

    assert len(results) == 1 and isinstance(results[0].text, str)
    assert _modes(tiny_model) == before


def test_generate_runs_a_training_model_in_eval_mode(tiny_model, sample_data):
    """Inside the call every part runs in eval mode (no dropout), whatever mode the model was in."""
    seen: list[tuple[str, bool]] = []
    parts = {"encoder": tiny_model.encoders["image"], "input projection": tiny_model.input_projections["image"],
             "llm": tiny_model.llm.model}
    for name, part in parts.items():
        part.register_forward_hook(lambda module, args, out, name=name: seen.append((name, module.training)))
    image = next((sample_data["pairs"].parent / "media").glob("*.png"))
    tiny_model.train()
    tiny_model.generate([Request(messages=[{"role": "user", "content": "<image>\nWhat is this?"}],
                                 media=[("image", image)])], max_new_tokens=2, decode_media=False)
    assert {name for name, _ in seen} == set(parts)
    assert not any(training for _, training in seen), seen


def test_building_a_model_leaves_the_root_logger_unconfigured(tiny_assembly, monkeypatch):
    """open_clip logs through the root logger's module functions (``logging.info``), which configure the root
    logger when it has no handler: a script's own ``logging.basicConfig(level=logging.INFO)`` after building
    a model then did nothing (the root had a handler, at WARNING)."""
    from mmllm.model import AnyToAnyModel

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a fresh script's (pytest's own capture handlers aside)
    monkeypatch.setattr(root, "level", logging.WARNING)
    AnyToAnyModel.assemble(tiny_assembly)
    AnyToAnyModel.assemble(tiny_assembly, encoder_weights=[])  # the encoders as shapes: the meta-device path
    assert root.handlers == []
