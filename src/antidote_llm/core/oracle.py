"""The reference implementation's algorithm, kept as an oracle for tests and the benchmark.

Batch size 1, every token counted, layer by layer: the inputs of layer 0 are captured, then each
layer is run once per row with hooks to gather statistics and once more to produce the next
layer's inputs (unpruned, as the reference propagates them). Wanda's running-mean update of the
statistics is kept verbatim. Slow by design: never use it for real work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from antidote_llm.core.scoring import select_per_row, wanda_scores
from antidote_llm.core.targets import Target, decoder_layers
from antidote_llm.data.records import Pair
from antidote_llm.data.templates import encode_pair


class _Captured(Exception):
    pass


class _WandaRunningStats:
    def __init__(self, columns: int):
        self.scaler_row = torch.zeros(columns, dtype=torch.float64)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t().double()  # [columns, tokens]
        self.scaler_row *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor):
    captured = {}

    def catch(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        raise _Captured

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["args"][0], captured["kwargs"]


def reference_masks(
    model: nn.Module, tokenizer, pairs: Sequence[Pair], targets: Sequence[Target], ratio: float,
    template: str = "alpaca", max_length: int = 512,
) -> dict[str, torch.Tensor]:
    """Per-row top-`ratio` Wanda masks (Linear layout) computed the reference's way."""
    _, layers = decoder_layers(model)
    device = next(model.parameters()).device
    rows = [encode_pair(tokenizer, template, p.prompt, p.response, p.input, max_length).input_ids for p in pairs]
    with torch.no_grad():
        states = [_layer_inputs(model, layers, torch.tensor([ids], device=device)) for ids in rows]
        masks = {}
        for layer in layers:
            inside = [t for t in targets if any(m is t.module for m in layer.modules())]
            stats = {t.param_name: _WandaRunningStats(t.in_features) for t in inside}
            handles = [
                t.module.register_forward_pre_hook(lambda mod, args, s=stats[t.param_name]: s.add_batch(args[0]))
                for t in inside
            ]
            for hidden, kwargs in states:  # first pass: statistics
                layer(hidden, **kwargs)
            for handle in handles:
                handle.remove()
            for t in inside:
                scores = wanda_scores(t.to_linear(t.weight), stats[t.param_name].scaler_row.float())
                masks[t.param_name] = select_per_row(scores, ratio)
            next_states = []
            for hidden, kwargs in states:  # second pass: the next layer's inputs
                out = layer(hidden, **kwargs)
                next_states.append((out[0] if isinstance(out, tuple) else out, kwargs))
            states = next_states
    return masks
