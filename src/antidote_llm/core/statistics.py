"""Model plumbing for the statistics: forward hooks that feed ChannelStats, one pass per batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from antidote_llm.core.scoring import ChannelStats, squared_sum
from antidote_llm.core.targets import Target, decoder_layers
from antidote_llm.data.templates import Encoded, pad_ids
from antidote_llm.errors import AntidoteError


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    count_mask: torch.Tensor  # [B, T] bool: tokens whose activations count

    @property
    def tokens(self) -> int:
        return int(self.count_mask.sum())


def make_batches(encoded: Sequence[Encoded], batch_size: int, tokenizer, response_only: bool = False) -> list[Batch]:
    """Right-padded batches of rows sorted by length (longest first), so padding stays small.

    Padding never counts; with `response_only` the prompt tokens do not count either.
    """
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start:start + batch_size]]
        ids, attention = pad_ids(tokenizer, [row.input_ids for row in rows], "right")
        count = attention.bool()
        if response_only:
            for b, row in enumerate(rows):
                count[b, :row.prompt_len] = False
        batches.append(Batch(ids, attention, count))
    return batches


class _StopForward(Exception):
    """Raised after the last module whose inputs are needed: no LM head, no logits."""


def _stop_point(model: nn.Module, targets: Sequence[Target]) -> nn.Module | None:
    """The last decoder layer, if every target runs inside or before the decoder stack."""
    stack_name, layers = decoder_layers(model)
    for target in targets:
        if not (target.module_name.startswith(stack_name + ".") or target.layout == "embedding"):
            return None
    return layers[-1]


class _BatchState:
    """Per-batch caches: which token rows to add or subtract per device, and the squared sums of the last
    input tensor, so modules called in a row on the same input (q, k, v; gate, up) share one reduction.
    The cache holds the tensor itself and compares identity: an address could be reused."""

    def __init__(self, count_mask: torch.Tensor, scratch: dict[torch.device, torch.Tensor]):
        flat = count_mask.reshape(-1)
        self.tokens = int(flat.sum())
        # Subtract the uncounted rows (padding) when they are the few; gather the counted ones otherwise.
        self.subtract = self.tokens * 2 >= flat.numel()
        self._rows = (~flat if self.subtract else flat).nonzero().squeeze(1)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.last_input: torch.Tensor | None = None
        self.last_sum: torch.Tensor | None = None
        self.scratch = scratch  # one fp32 buffer per device for the squares, reused by every module and batch

    def rows(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self._rows.to(device)
        return self._on_device[device]

    def squared_sum(self, x: torch.Tensor) -> torch.Tensor:
        if not self.subtract:
            return squared_sum(x, self.rows(x.device), exclude=False)
        size = x.numel()
        buffer = self.scratch.get(x.device)
        if buffer is None or buffer.numel() < size:
            buffer = self.scratch[x.device] = torch.empty(size, dtype=torch.float32, device=x.device)
        return squared_sum(x, self.rows(x.device), exclude=True, out=buffer[:size].view(-1, x.shape[-1]))


def _linear_hook(stats: ChannelStats, state: list):
    def hook(module, args):
        x = args[0]
        batch: _BatchState = state[0]
        if batch.last_input is not x:
            batch.last_input, batch.last_sum = x, batch.squared_sum(x)
        stats.add_sum(batch.last_sum, batch.tokens)

    return hook


def _embedding_hook(stats: ChannelStats, state: list, vocab: int):
    def hook(module, args):
        batch: _BatchState = state[0]
        ids = args[0].reshape(-1)
        listed = torch.bincount(ids.index_select(0, batch.rows(ids.device)), minlength=vocab)[:vocab]
        counts = torch.bincount(ids, minlength=vocab)[:vocab] - listed if batch.subtract else listed
        stats.add_counts(counts, batch.tokens)

    return hook


@contextlib.contextmanager
def _target_hooks(targets: Sequence[Target], stats: dict[str, ChannelStats], state: list) -> Iterator[None]:
    handles = []
    try:
        for target in targets:
            device = target.weight.device
            if target.layout == "embedding":
                hook = _embedding_hook(stats[target.param_name], state, target.weight.shape[0])
            else:
                hook = _linear_hook(stats[target.param_name], state)
            stats[target.param_name].sum_sq = stats[target.param_name].sum_sq.to(device)
            handles.append(target.module.register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _stop_after_targets(model: nn.Module, targets: Sequence[Target]) -> Iterator[None]:
    """Stop each forward pass (_StopForward) once the last target has run, where that is before the LM head."""
    stop = _stop_point(model, targets)
    if stop is None:
        yield
        return

    def raise_stop(module, args, output):
        raise _StopForward

    handle = stop.register_forward_hook(raise_stop)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _hooks(model: nn.Module, targets: Sequence[Target], stats: dict[str, ChannelStats], state: list) -> Iterator[None]:
    with _stop_after_targets(model, targets), _target_hooks(targets, stats, state):
        yield


def input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device


def collect_statistics(
    model: nn.Module, batches: Iterable[Batch], targets: Sequence[Target], *, progress: bool = True, desc: str = "statistics"
) -> dict[str, ChannelStats]:
    """s_j for every target's input channels over the counted tokens, one forward pass per batch."""
    stats = {t.param_name: ChannelStats(t.in_features) for t in targets}
    state: list[_BatchState] = [None]
    device = input_device(model)
    batches = list(batches)
    with _hooks(model, targets, stats, state), torch.inference_mode():
        scratch: dict[torch.device, torch.Tensor] = {}
        for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
            state[0] = _BatchState(batch.count_mask, scratch)
            with contextlib.suppress(_StopForward):
                model(
                    input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device),
                    use_cache=False,
                )
    return stats


def collect_grams(
    model: nn.Module, batches: Iterable[Batch], targets: Sequence[Target], *, progress: bool = True,
    desc: str = "input Gram matrices",
) -> dict[str, torch.Tensor]:
    """H = sum_x x x^T (fp32, [in, in]) of every target's inputs over the counted tokens, one forward pass per
    batch: what a least-squares re-fit of the target's kept weights needs (scoring.compensate). Targets fed the
    same input (q, k, v) share one product per batch."""
    grams = {t.param_name: torch.zeros(t.in_features, t.in_features, dtype=torch.float32, device=t.weight.device)
             for t in targets}
    counted: list[torch.Tensor] = [None]
    last: list = [None, None]  # the last input seen and its product

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if last[0] is not x:
                flat = x.reshape(-1, x.shape[-1])[counted[0].to(x.device)].float()
                last[0], last[1] = x, flat.T @ flat
            grams[name] += last[1]
        return hook

    for target in targets:
        if target.layout != "linear":
            raise AntidoteError(f"compensation re-fits Linear weights; {target.param_name} is {target.layout}: "
                                "choose Linear targets or drop the compensation")
    device = input_device(model)
    handles = [t.module.register_forward_pre_hook(hook_for(t.param_name)) for t in targets]
    try:
        with _stop_after_targets(model, targets), torch.inference_mode():
            for batch in tqdm(list(batches), desc=desc, unit="batch", disable=not progress):
                counted[0], last[0], last[1] = batch.count_mask.reshape(-1), None, None
                with contextlib.suppress(_StopForward):
                    model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                          use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return grams


def collect_loss_gradients(
    model: nn.Module, batches: Iterable[Batch], targets: Sequence[Target], *, progress: bool = True,
    desc: str = "loss gradients",
) -> tuple[dict[str, torch.Tensor], int]:
    """The gradient of the summed next-token loss of the counted tokens for every target weight (in the weight's
    own layout, fp32), and how many tokens were counted. Only the targets take gradients: every other parameter's
    requires_grad is off meanwhile and restored after, and the model's weights are left unchanged."""
    params = list(model.parameters())
    wanted = {id(t.weight) for t in targets}
    trainable = [p.requires_grad for p in params]
    sums = {t.param_name: torch.zeros(t.weight.shape, dtype=torch.float32, device=t.weight.device) for t in targets}
    device, tokens = input_device(model), 0
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        for batch in tqdm(list(batches), desc=desc, unit="batch", disable=not progress):
            # the token at t is predicted at t - 1: count the predictions of counted tokens
            counted = batch.count_mask[:, 1:].to(device)
            with torch.enable_grad():
                logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                               use_cache=False).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(
                    logits[counted].float(), batch.input_ids[:, 1:].to(device)[counted], reduction="sum")
                loss.backward()
            tokens += int(counted.sum())
            for target in targets:
                if target.weight.grad is not None:
                    sums[target.param_name] += target.weight.grad.float()
                    target.weight.grad = None
    finally:
        for p, flag in zip(params, trainable, strict=True):
            p.requires_grad_(flag)
            p.grad = None
    return sums, tokens


@dataclass
class LayerInput:
    """What one decoder layer receives for one calibration batch: hidden states and the keyword arguments
    (position embeddings, attention mask, position ids) the model computed for it."""

    hidden: torch.Tensor
    kwargs: dict


class _Captured(Exception):
    """Raised by the pre-hook on layer 0 once it has seen its inputs."""


def first_layer_inputs(model: nn.Module, batches: Sequence[Batch]) -> list[LayerInput]:
    """The inputs of the first decoder layer for every batch: the model runs up to it and stops."""
    _, layers = decoder_layers(model)
    captured: list[LayerInput] = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(LayerInput(hidden, kwargs))
        raise _Captured

    device = input_device(model)
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                with contextlib.suppress(_Captured):
                    model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def collect_layer_statistics(
    layer: nn.Module, inputs: Sequence[LayerInput], batches: Sequence[Batch], targets: Sequence[Target],
    *, advance: bool = True,
) -> dict[str, ChannelStats]:
    """s_j for the targets inside one decoder layer: the same sums the whole-model pass accumulates, one layer
    at a time. With `advance`, each batch's hidden states are replaced in place by the layer's output (the next
    layer's input) as soon as the batch has run, so one copy of the calibration set's hidden states lives."""
    stats = {t.param_name: ChannelStats(t.in_features) for t in targets}
    state: list[_BatchState] = [None]
    scratch: dict[torch.device, torch.Tensor] = {}
    with _target_hooks(targets, stats, state), torch.inference_mode():
        for given, batch in zip(inputs, batches, strict=True):
            state[0] = _BatchState(batch.count_mask, scratch)
            out = layer(given.hidden, **given.kwargs)
            if advance:
                given.hidden = out[0] if isinstance(out, tuple) else out
    return stats
