"""The oracle (the authors' algorithm, written out on its own) is independent of the code it checks."""

import ast
import inspect

import pytest
import torch

from antidote_llm.core import oracle
from antidote_llm.core.oracle import authors_input_ids, oracle_masks
from antidote_llm.core.realign import RealignConfig, realign
from antidote_llm.core.targets import resolve_targets
from antidote_llm.data.records import Pair
from antidote_llm.data.templates import encode_pair
from conftest import HARMFUL_ROWS, add_lora, make_metaspace_tokenizer, make_model, make_tokenizer

PAIRS = [Pair(r["prompt"], r["response"]) for r in HARMFUL_ROWS if not r["is_safe"]]
PLUMBING = {"antidote_llm.data.records": {"Pair"}, "antidote_llm.core.targets": {"Target", "decoder_layers"}}


def test_oracle_imports_nothing_it_checks():
    """Tokenization, scores and selection are the oracle's own; from the project it takes only plumbing."""
    tree = ast.parse(inspect.getsource(oracle))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(alias.name.startswith("antidote_llm") for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("antidote_llm"):
            assert {alias.name for alias in node.names} <= PLUMBING.get(node.module, set()), node.module
    assert "reference" not in inspect.getsource(oracle).lower()


def _plant(monkeypatch, bug: str) -> None:
    """A bug in the project's tokenization, score or selection (each a plausible slip)."""
    from antidote_llm.core import scoring
    from antidote_llm.data import templates

    if bug == "template":  # a changed prompt template (here: a missing blank line)
        monkeypatch.setattr(templates, "ALPACA_NO_INPUT", templates.ALPACA_NO_INPUT.replace("\n\n### Response", "\n### Response"))
    elif bug == "count":  # one weight too many per row
        original = scoring.prune_count
        monkeypatch.setattr(scoring, "prune_count", lambda size, ratio: original(size, ratio) + 1)
    elif bug == "score":  # |W| * ||x||^2 instead of |W| * ||x||
        monkeypatch.setattr(scoring, "wanda_scores", lambda weight, mean_sq: weight.detach().float().abs() * mean_sq.float())


@pytest.mark.parametrize("bug", ["template", "count", "score"])
def test_a_bug_planted_in_our_code_is_caught_by_the_oracle(monkeypatch, bug):
    model, tokenizer = make_model(), make_tokenizer()
    targets = resolve_targets(model, ["all-linear"])
    config = RealignConfig(ratio=0.1, targets=("all-linear",), batch_size=4)
    assert all(torch.equal(realign(make_model(), tokenizer, config, PAIRS, progress=False).masks[name], mask)
               for name, mask in oracle_masks(model, tokenizer, PAIRS, targets, ratio=0.1).items())
    _plant(monkeypatch, bug)
    expected = oracle_masks(model, tokenizer, PAIRS, targets, ratio=0.1)
    result = realign(make_model(), tokenizer, config, PAIRS, progress=False)
    assert any(not torch.equal(result.masks[name], mask) for name, mask in expected.items())


@pytest.mark.parametrize("input", ["", "A door."])
def test_our_training_ids_are_the_authors_tokenization(input):
    """encode_pair (EOS as an id, offsets) and the oracle (EOS as text, the whole string) agree."""
    for tokenizer in (make_tokenizer(), make_metaspace_tokenizer()):
        for pair in PAIRS[:4]:
            pair = Pair(pair.prompt, pair.response, input)
            for max_length in (None, 30):
                ours = encode_pair(tokenizer, "alpaca", pair.prompt, pair.response, pair.input, max_length).input_ids
                assert ours == authors_input_ids(tokenizer, pair, max_length or 2048)


def test_masks_equal_the_oracle_under_a_metaspace_tokenizer():
    tokenizer = make_metaspace_tokenizer()
    model = add_lora(make_model(vocab=len(tokenizer)))
    targets = resolve_targets(model, ["adapter"])
    expected = oracle_masks(model, tokenizer, PAIRS, targets, ratio=0.05)
    result = realign(model, tokenizer, RealignConfig(ratio=0.05, batch_size=3), PAIRS, progress=False)
    assert set(result.masks) == set(expected)
    for name, mask in expected.items():
        assert torch.equal(result.masks[name], mask), name


@pytest.mark.parametrize(("ratio", "columns", "pruned"), [(0.1, 64, 7), (0.05, 64, 4), (0.05, 20, 1), (0.5, 3, 2)])
def test_oracle_prunes_what_the_authors_index_arithmetic_prunes(ratio, columns, pruned):
    """cols - int(cols * (1 - ratio)) per row, ties to the later index (the tail of a stable ascending sort)."""
    scores = torch.ones(2, columns)
    mask = oracle.authors_row_mask(scores, ratio)
    assert mask.sum(1).tolist() == [pruned, pruned]
    assert mask[:, columns - pruned:].all()  # all tied: the last ones are pruned
