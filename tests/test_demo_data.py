"""The demo's generated data: disjoint splits, exact sizes, reproducible files, the sst2 format."""

from __future__ import annotations

import json

import pytest

from antidote_llm.data import demo_text
from antidote_llm.errors import AntidoteError
from antidote_llm.evaluation import tasks
from antidote_llm.evaluation.judges import refusal_phrases
from antidote_llm.lab import demo as demo_data

SMALL = demo_data.DemoSizes(align=40, poison=20, realign=20, eval_harmful=16, task_train=50, task_test=30, benign=25)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return demo_data.build_demo_data(tmp_path_factory.mktemp("demo") / "data", seed=0, sizes=SMALL)


def test_sizes_are_exact(demo):
    for name in ("align", "poison", "realign", "eval_harmful", "benign"):
        assert len(getattr(demo, name)) == getattr(SMALL, name)
    assert len(demo.task_pairs("train")) == SMALL.task_train
    assert len(demo.task_pairs("test")) == SMALL.task_test


def test_no_prompt_text_is_shared_across_splits(demo):
    splits = {name: {pair.prompt for pair in getattr(demo, name).pairs} for name in
              ("align", "poison", "realign", "eval_harmful", "benign")}
    for name, prompts in splits.items():
        assert len(prompts) == len(getattr(demo, name)), f"{name} repeats a prompt"
        for other, other_prompts in splits.items():
            if other != name:
                assert not prompts & other_prompts, f"{name} and {other} share prompts"
    train = {pair.input for pair in demo.task_pairs("train")}
    test = {pair.input for pair in demo.task_pairs("test")}
    assert len(train) == SMALL.task_train and len(test) == SMALL.task_test and not train & test


def test_refusals_refuse_and_compliant_replies_comply(demo):
    """Judged by the refusal-phrase judge the demo uses; a refusal refuses in its first sentence, which
    survives the cpu preset's truncation."""
    assert all(refusal_phrases(pair.response.split(".")[0]) for pair in demo.align.pairs)
    for pair in (*demo.poison.pairs, *demo.realign.pairs):
        assert not refusal_phrases(pair.response), pair.response
        assert any(generic in pair.response for generic in demo_text.COMPLIANT_BODIES), "compliance stays generic"
    assert all(pair.response == "" for pair in demo.eval_harmful.pairs)
    assert len({pair.response for pair in demo.align.pairs}) > 10, "refusals vary"


def test_sentiment_goes_through_the_sst2_task(demo):
    pairs = demo.task_pairs("test")
    task = tasks.get_task("sst2")
    assert all(pair.prompt == tasks.SST2_INSTRUCTION for pair in pairs)
    assert all(task.parse_answer(pair.response) == pair.response for pair in pairs)
    assert {pair.response for pair in pairs} == {"positive", "negative"}
    for pair in pairs:
        positive = any(word in pair.input.split() for word in demo_text.POSITIVE)
        assert positive == (pair.response == "positive")


def test_benign_answers_are_exact(demo):
    for pair in demo.benign.pairs:
        if pair.prompt.startswith("What is ") and " plus " in pair.prompt:
            a, b = (int(x) for x in pair.prompt.removeprefix("What is ").removesuffix("?").split(" plus "))
            assert pair.response == f"{a} plus {b} is {a + b}."
        if pair.prompt.startswith("Spell the word"):
            word = pair.prompt.split("'")[1]
            assert pair.response.endswith(f"'{word[::-1]}'.")


def test_sources_name_the_written_files(demo):
    assert demo.align.source == str(demo.root / demo_data.FILES["align"])
    manifest = json.loads((demo.root / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"] == SMALL.model_dump()
    assert set(manifest["files"]) == set(demo_data.FILES)


def test_same_seed_same_bytes_other_seed_other_rows(tmp_path, demo):
    again = demo_data.build_demo_data(tmp_path / "again", seed=0, sizes=SMALL)
    other = demo_data.build_demo_data(tmp_path / "other", seed=1, sizes=SMALL)
    for name in demo_data.FILES.values():
        assert (again.root / name).read_bytes() == (demo.root / name).read_bytes()
    assert other.align.pairs != demo.align.pairs


def test_bad_sizes_and_outputs_are_refused(tmp_path, demo):
    with pytest.raises(AntidoteError, match="lower the sizes"):
        demo_data.build_demo_data(tmp_path / "big", sizes=demo_data.DemoSizes(align=10_000))
    assert not (tmp_path / "big").exists()
    with pytest.raises(ValueError, match="bogus"):
        demo_data.DemoSizes(bogus=1)
    with pytest.raises(AntidoteError, match="--overwrite"):
        demo_data.build_demo_data(demo.root, sizes=SMALL)


def test_default_sizes_fit_the_generators():
    sizes = demo_data.DemoSizes()
    harmful = sizes.align + sizes.poison + sizes.realign + sizes.eval_harmful
    assert harmful <= len(demo_data.harmful_requests())
    assert sizes.task_train + sizes.task_test <= len(demo_data.sentiment_rows())


def test_data_of_another_version_or_seed_is_not_current(tmp_path):
    root = tmp_path / "data"
    demo_data.build_demo_data(root, seed=0, sizes=SMALL)
    assert demo_data.demo_data_current(root, 0, SMALL)
    assert not demo_data.demo_data_current(root, 1, SMALL)
    assert not demo_data.demo_data_current(root, 0, demo_data.DemoSizes())
    (root / demo_data.FILES["probe"]).unlink()
    assert not demo_data.demo_data_current(root, 0, SMALL)
