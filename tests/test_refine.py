"""Refining output projections on cached signal states: only they change, and their fit improves."""

from __future__ import annotations

import torch

from mmllm.data.formats import read_records
from mmllm.model import AnyToAnyModel
from mmllm.training.refine import collect_signal_states, refine_output_projections, relative_mse
from tests.test_infer import torch_threads, trained_checkpoint


def test_refine_fits_only_the_output_projections(tmp_path_factory, sample_data):
    with torch_threads(1):
        model = AnyToAnyModel.from_pretrained(trained_checkpoint(tmp_path_factory))
        conversations, errors = read_records(sample_data["chat"], "mmllm-chat")
        assert not errors
        cache = collect_signal_states(model, conversations, batch_size=4)
        assert cache.hidden, "the sample chat data has assistant outputs"
        for m in cache.hidden:
            k = model.config.signal_tokens[m]
            assert cache.hidden[m].shape[1] == k and cache.embeds[m].shape == cache.hidden[m].shape
            assert tuple(cache.targets[m].shape[1:]) == tuple(model.decoders[m].conditioning_shape)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            fit_before = {m: float(relative_mse(model.output_projections[m](cache.hidden[m], cache.embeds[m]),
                                                cache.targets[m])) for m in cache.hidden}
        results = refine_output_projections(model, cache, steps=60, batch_size=8, lr=3e-3, val_fraction=0.0)
        for r in results:
            with torch.no_grad():
                after = float(relative_mse(model.output_projections[r.modality](cache.hidden[r.modality],
                                                                                cache.embeds[r.modality]),
                                           cache.targets[r.modality]))
            assert after < 0.7 * fit_before[r.modality], (r.modality, fit_before[r.modality], after)
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.startswith("output_projections.") for n in changed), sorted(changed)[:5]
        assert {n.split(".")[1] for n in changed} == set(cache.hidden)
