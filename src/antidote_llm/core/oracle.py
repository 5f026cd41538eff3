"""The authors' algorithm, written out on its own: the oracle for tests and the benchmark.

git-disl/Antidote computes the mask in utils.py `prune_wanda_outlier` (with `prepare_calibration_input`
and `WrappedGPT`) over rows built by utils.py `SupervisedDataset` / `preprocess`. The oracle follows
those steps with its own code, so that "our masks equal the oracle's" checks our tokenization, batched
statistics, scores and selection, not only the statistics pass:

  * rows: the Alpaca prompt (utils.py PROMPT_DICT) + answer + the EOS token's text, tokenized as one
    string with the tokenizer's special tokens and cut to max_length (the authors' model_max_length);
  * batch size 1, every token counted, no attention mask; the inputs of layer 0 are captured, then
    layer by layer each row is run once with hooks on the scored modules (statistics) and once more
    for the next layer's inputs (unpruned: the mask is applied after the sweep);
  * statistics: WrappedGPT's running mean over rows of the squared input norms per channel
    (`scaler_row`), kept verbatim except that it accumulates in float64 (theirs is float32);
  * score |W| * sqrt(scaler_row); per output row a stable ascending sort, and everything past the first
    int(cols * (1 - ratio)) indices is pruned.

From antidote_llm it takes only plumbing: `Pair`, and `Target` / `decoder_layers` to find the modules
(and to see GPT-2 Conv1D weights in Linear layout). Slow by design: never use it for real work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from antidote_llm.core.targets import Target, decoder_layers
from antidote_llm.data.records import Pair

PROMPT_INPUT = (  # utils.py PROMPT_DICT["prompt_input"]
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (  # utils.py PROMPT_DICT["prompt_no_input"]
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def authors_input_ids(tokenizer, pair: Pair, max_length: int) -> list[int]:
    """One calibration row as SupervisedDataset builds it: source + output + EOS text, tokenized at once."""
    example = {"instruction": pair.prompt, "input": pair.input, "output": pair.response}
    source = PROMPT_INPUT.format_map(example) if example.get("input", "") != "" else PROMPT_NO_INPUT.format_map(example)
    target = f"{example['output']}{tokenizer.eos_token}"
    return list(tokenizer(source + target, max_length=max_length, truncation=True)["input_ids"])


class _ScalerRow:
    """WrappedGPT.add_batch: a running mean over rows (not tokens) of sum_t x_tj^2."""

    def __init__(self, columns: int):
        self.scaler_row = torch.zeros(columns, dtype=torch.float64)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        if len(inp.shape) == 2:
            inp = inp.unsqueeze(0)
        tmp = inp.shape[0]
        inp = inp.reshape((-1, inp.shape[-1])).t()
        self.scaler_row *= self.nsamples / (self.nsamples + tmp)
        self.nsamples += tmp
        inp = inp.type(torch.float64)
        self.scaler_row += torch.norm(inp, p=2, dim=1) ** 2 / self.nsamples


def authors_row_mask(w_metric: torch.Tensor, ratio: float) -> torch.Tensor:
    """True where pruned: the authors keep the first int(cols * (1 - ratio)) of a stable ascending sort per
    row (`W_mask.scatter_(1, indices, 0)` on a mask of ones) and prune the rest."""
    layer_sparsity_ratio = 1 - ratio
    w_mask = torch.ones_like(w_metric, dtype=torch.bool)
    sort_res = torch.sort(w_metric, dim=-1, stable=True)
    indices = sort_res[1][:, :int(w_metric.shape[1] * layer_sparsity_ratio)]
    w_mask.scatter_(1, indices, False)
    return w_mask


class _Captured(Exception):
    pass


def _layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor):
    """prepare_calibration_input: the first layer's hidden states and keyword arguments for one row."""
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


def oracle_masks(
    model: nn.Module, tokenizer, pairs: Sequence[Pair], targets: Sequence[Target], ratio: float, max_length: int = 512,
) -> dict[str, torch.Tensor]:
    """Per-row top-`ratio` Wanda masks (Linear layout, True = pruned) computed the authors' way."""
    _, layers = decoder_layers(model)
    placed = {t.param_name for layer in layers for t in targets if any(m is t.module for m in layer.modules())}
    missing = [t.param_name for t in targets if t.param_name not in placed or t.layout == "embedding"]
    if missing:
        raise ValueError(f"the oracle scores Linear/Conv1D modules inside decoder layers only, not {missing}")
    device = next(model.parameters()).device
    rows = [authors_input_ids(tokenizer, pair, max_length) for pair in pairs]
    masks = {}
    with torch.no_grad():
        inps = [_layer_inputs(model, layers, torch.tensor([ids], device=device)) for ids in rows]
        for layer in layers:
            subset = [t for t in targets if any(m is t.module for m in layer.modules())]
            wrapped = {t.param_name: _ScalerRow(t.in_features) for t in subset}
            handles = [
                t.module.register_forward_pre_hook(lambda mod, args, w=wrapped[t.param_name]: w.add_batch(args[0].cpu()))
                for t in subset
            ]
            for hidden, kwargs in inps:  # first pass: statistics
                layer(hidden, **kwargs)
            for handle in handles:
                handle.remove()
            for t in subset:
                weight = t.to_linear(t.weight).detach().cpu().float()
                w_metric = torch.abs(weight) * torch.sqrt(wrapped[t.param_name].scaler_row.float().reshape((1, -1)))
                masks[t.param_name] = authors_row_mask(w_metric, ratio)
            outs = []
            for hidden, kwargs in inps:  # second pass: the next layer's inputs, with unpruned weights
                out = layer(hidden, **kwargs)
                outs.append((out[0] if isinstance(out, tuple) else out, kwargs))
            inps = outs
    return masks
