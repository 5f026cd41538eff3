"""SafeMERGE: the exact merge of the factors, the threshold rule, and the repair on tiny models through the
defense, the CLI and the lab, against brute force (PEFT merging each adapter into the aligned model)."""

import json

import pytest
import torch

from antidote_llm.cli.main import main
from antidote_llm.defenses import adapters as lora
from antidote_llm.defenses import defense
from antidote_llm.defenses.safelora import select_modules
from antidote_llm.defenses.safemerge import kept_factors, merged_factors
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import DefenseContext
from antidote_llm.runtime.loading import ModelSource, load_model
from conftest import add_lora, make_model, make_tokenizer
from test_lab import experiment_file  # noqa: F401 - the tiny experiment fixture

QKV = ("q_proj", "k_proj", "v_proj")


def _lora(model, seed, r, alpha, scale, targets=QKV):
    """A LoRA adapter with non-zero factors of rank r and scaling alpha / r."""
    return add_lora(model, seed=seed, r=r, targets=targets, scale=scale, alpha=alpha)


@pytest.fixture
def lineage(tmp_path):
    """base/, the alignment LoRA alignment/ (rank 3, scaling 3, q/k/v), aligned/ = base with it merged, and the
    user's fine-tuning LoRA ft/ on aligned/ (rank 4, scaling 2, q/k/v and o)."""
    tokenizer = make_tokenizer()
    base = make_model()
    base.save_pretrained(tmp_path / "base")
    alignment = _lora(make_model(), seed=7, r=3, alpha=9, scale=0.2)
    alignment.save_pretrained(tmp_path / "alignment")
    aligned = alignment.merge_and_unload()
    aligned.save_pretrained(tmp_path / "aligned")
    tokenizer.save_pretrained(tmp_path / "aligned")
    add_lora(aligned, seed=1, scale=0.3, targets=(*QKV, "o_proj")).save_pretrained(tmp_path / "ft")
    return tmp_path


def _finetuned(lineage, adapter="ft"):
    return load_model(ModelSource(str(lineage / "aligned"), adapters=(str(lineage / adapter),), device="cpu",
                                  dtype="float32"), keep_adapter=True)


def _effective(model) -> dict[str, torch.Tensor]:
    return {name: lora.aligned_weight(layer).detach().float() + lora.update(layer)
            for name, layer in lora.lora_modules(model).items()}


def _merged_weights(folder, adapter, aligned=None) -> dict[str, torch.Tensor]:
    """Brute force: the aligned model with `adapter` merged in by PEFT, every Linear's weight."""
    loaded = load_model(ModelSource(str(aligned or folder / "aligned"), adapters=(str(folder / adapter),),
                                    device="cpu", dtype="float32"))
    return {name: m.weight.detach().float() for name, m in loaded.model.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _safemerge(lineage, **options):
    loaded = _finetuned(lineage)
    outcome = defense("safemerge").configure(options).apply(
        loaded.model, DefenseContext(loaded.tokenizer, alignment_adapter=str(lineage / "alignment")))
    return loaded, outcome.report


# --- the math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [(0.8, 0.2), (0.5, 0.7), (0.0, 1.0)])
def test_merged_factors_carry_the_weighted_sum_of_the_two_updates_exactly(weights):
    g = torch.Generator().manual_seed(0)
    a_ft, b_ft = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    a_safe, b_safe = torch.randn(3, 10, generator=g), torch.randn(6, 3, generator=g)
    s_ft, s_safe = 2.0, 0.375
    a, b = merged_factors((a_ft, b_ft), (a_safe, b_safe), weights, (s_ft, s_safe))
    assert a.shape == (7, 10) and b.shape == (6, 7)  # rank r_ft + r_safe
    expected = weights[0] * s_ft * b_ft @ a_ft + weights[1] * s_safe * b_safe @ a_safe
    assert torch.allclose(s_ft * b @ a, expected, atol=1e-5)
    # not PEFT's "linear" merge, which averages the factors and so adds cross terms B_ft A_safe
    linear = (s_ft * (weights[0] ** 0.5 * b_ft[:, :3] + weights[1] ** 0.5 * b_safe)
              @ (weights[0] ** 0.5 * a_ft[:3] + weights[1] ** 0.5 * a_safe))
    assert not torch.allclose(linear, expected, atol=1e-2)


def test_kept_factors_pad_with_zeros_and_keep_the_update():
    g = torch.Generator().manual_seed(1)
    a_ft, b_ft = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    a, b = kept_factors((a_ft, b_ft), 3)
    assert a.shape == (7, 10) and b.shape == (6, 7) and not a[4:].any() and not b[:, 4:].any()
    assert torch.equal(b @ a, b_ft @ a_ft)


def test_threshold_is_strict_as_the_authors_and_number_keeps_the_k_lowest():
    cosines = {"a": 0.35, "b": 0.2, "c": 0.9, "d": 0.1}
    assert select_modules(cosines, "threshold", 1, 0.35, strict=True) == {"b", "d"}  # cos < tau
    assert select_modules(cosines, "threshold", 1, 0.35) == {"a", "b", "d"}  # SafeLoRA's cos <= tau
    assert select_modules(cosines, "number", 2, 0.0, strict=True) == {"b", "d"}


def test_settings_validate_the_weights_and_default_to_the_authors():
    chosen = defense("safemerge").configure({})
    assert (chosen.threshold, chosen.weights, chosen.select) == (0.35, (0.8, 0.2), "threshold")
    assert chosen.knob() == "tau=0.35, w=0.8/0.2"
    assert defense("safemerge").configure({"weights": [0.6, 0.4]}).weights == (0.6, 0.4)
    for bad in ([0.8], [0.8, 0.1, 0.1], [-0.1, 1.1], ["x", 0.2]):
        with pytest.raises(AntidoteError):
            defense("safemerge").configure({"weights": bad})


# --- the repair on a model --------------------------------------------------------------------------------


def test_safemerge_merges_below_the_threshold_and_equals_brute_force(lineage):
    _, probe = _safemerge(lineage, threshold=-1.0)  # nothing below: only the cosines
    cosines = {name: m["cosine"] for name, m in probe["modules"].items()}
    assert probe["changed_modules"] == 0 and cosines["model.layers.0.self_attn.o_proj"] is None  # no safety LoRA there
    measured = sorted(c for c in cosines.values() if c is not None)
    tau = (measured[2] + measured[3]) / 2
    loaded, report = _safemerge(lineage, threshold=tau)
    chosen = {name for name, c in cosines.items() if c is not None and c < tau}
    assert {name for name, m in report["modules"].items() if m["merged"]} == chosen and len(chosen) == 3

    ft = _merged_weights(lineage, "ft")  # W_aligned + dW_ft
    safe = _merged_weights(lineage, "alignment")  # W_aligned + dW_safe: the safety LoRA on the fine-tuned model
    before = _effective(_finetuned(lineage).model)
    for name, weight in _effective(loaded.model).items():
        if name in chosen:
            assert torch.allclose(weight, 0.8 * ft[name] + 0.2 * safe[name], atol=1e-5)
            assert report["modules"][name]["changed"] > 0
        else:
            assert torch.equal(weight, before[name]) and torch.allclose(weight, ft[name], atol=1e-6)
            assert report["modules"][name]["changed"] == 0
    layer = lora.lora_modules(loaded.model)["model.layers.0.self_attn.q_proj"]
    assert layer.r["default"] == 4 + 3 and layer.scaling["default"] == 2.0


def test_nothing_below_the_threshold_leaves_the_adapter_as_it_was(lineage):
    loaded, report = _safemerge(lineage, threshold=-1.0)
    assert report["changed_fraction"] == 0.0 and loaded.model.peft_config["default"].r == 4


def test_an_alignment_adapter_of_other_modules_is_refused(lineage, tmp_path):
    _lora(make_model(), seed=3, r=2, alpha=2, scale=0.1, targets=("gate_proj",)).save_pretrained(tmp_path / "other")
    loaded = _finetuned(lineage)
    with pytest.raises(AntidoteError, match="shares no LoRA module"):
        defense("safemerge").configure({}).apply(
            loaded.model, DefenseContext(loaded.tokenizer, alignment_adapter=str(tmp_path / "other")))


# --- the CLI -------------------------------------------------------------------------------------------------


def _cli(lineage, out, *extra):
    return main(["realign", "--model", str(lineage / "aligned"), "--adapter", str(lineage / "ft"), "--device", "cpu",
                 "--out", str(out), "--quiet", "--method", "safemerge", *extra])


def test_cli_writes_an_adapter_that_loads_with_the_merge(lineage, tmp_path):
    out = tmp_path / "m"
    assert _cli(lineage, out, "--alignment-adapter", str(lineage / "alignment"), "--threshold", "1",
                "--weights", "0.7", "--weights", "0.3") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "safemerge" and report["output"] == "adapter"
    assert report["settings"]["weights"] == [0.7, 0.3] and report["inputs"]["alignment_adapter"]
    merged = {name for name, m in report["modules"].items() if m["merged"]}
    assert len(merged) == 6  # q, k, v of both layers (o_proj has no safety LoRA)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 7 and not config.get("rank_pattern")
    ft, safe = _merged_weights(lineage, "ft"), _merged_weights(lineage, "alignment")
    repaired = _merged_weights(tmp_path, "m/adapter", lineage / "aligned")  # the saved adapter loaded by PEFT onto the aligned model
    for name in ft:
        expected = 0.7 * ft[name] + 0.3 * safe[name] if name in merged else ft[name]
        assert torch.allclose(repaired[name], expected, atol=1e-5), name
    # the project's own adapter reader takes it too (a plain LoRA of one rank)
    shapes, read = lora.adapter_update_reader(out / "adapter")
    assert set(shapes) == set(report["modules"])


def test_cli_without_the_safety_adapter_names_its_flag(lineage, tmp_path, capsys):
    assert _cli(lineage, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert "--alignment-adapter" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [["--weights", "-0.2", "--weights", "1"], ["--weights", "0.8"],
                                 ["--base-model", "somewhere"], ["--threshold", "2"]])
def test_cli_refuses_bad_settings_and_writes_nothing(lineage, tmp_path, capsys, bad):
    assert _cli(lineage, tmp_path / "out", "--alignment-adapter", str(lineage / "alignment"), *bad) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --- the lab -------------------------------------------------------------------------------------------------


def test_lab_gives_safemerge_the_alignment_stage_adapter_and_safelora_still_the_base(experiment_file, tmp_path):  # noqa: F811
    import yaml

    from antidote_llm.lab import load_experiment, run_experiment
    from antidote_llm.lab.plan import plan_experiment

    raw = yaml.safe_load(experiment_file.read_text())
    raw["defenses"] = {"none": {"method": "none"}, "safemerge": {"method": "safemerge", "threshold": 1.0},
                       "safelora": {"method": "safelora", "layers": 2}}
    experiment_file.write_text(yaml.safe_dump(raw))
    plan = plan_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False)
    works = {job.name.rsplit("-", 1)[0]: job.work for job in plan.jobs}
    align = next(job for job in plan.jobs if job.family == "align")
    assert works["defense-safemerge"].inputs == {"alignment_adapter": str(plan.settings[0].stages / align.name / "adapter")}
    assert set(works["defense-safelora"].inputs) == {"base_model"}  # its key as before

    result = run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=lambda _: None)
    rows = {r["defense"]: r for r in result.rows if r["stage"] == "fine-tuned"}
    assert rows["safemerge"]["setting"] == "tau=1.0, w=0.8/0.2" and rows["safemerge"]["pruned_fraction"] > 0


def test_lab_refuses_safemerge_without_an_alignment_stage(experiment_file):  # noqa: F811
    import yaml

    from antidote_llm.lab import load_experiment

    raw = yaml.safe_load(experiment_file.read_text())
    del raw["alignment"]
    raw["defenses"]["safemerge"] = {"method": "safemerge"}
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="needs alignment"):
        load_experiment(experiment_file)
