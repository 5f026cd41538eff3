"""SafeLoRA, RESTA and Safe Delta: their math against hand computation and brute force, on tiny models."""

import json

import pytest
import torch

from antidote_llm.cli.main import main
from antidote_llm.data.records import Pair, PairSet
from antidote_llm.defenses import adapters as lora
from antidote_llm.defenses import defense
from antidote_llm.defenses.resta import dare
from antidote_llm.defenses.safe_delta import damped_hessian, safe_delta_matrix
from antidote_llm.defenses.safelora import projection_matrix, select_modules
from antidote_llm.errors import AntidoteError
from antidote_llm.registry import DefenseContext
from antidote_llm.runtime.loading import ModelSource, load_model
from conftest import add_lora, make_model, make_tokenizer
from test_lab import experiment_file  # noqa: F401 - the tiny experiment fixture

QKV = ("q_proj", "k_proj", "v_proj")


def _aligned_from(base, seed=5, scale=0.05, targets=QKV):
    """A copy of `base` whose target weights moved (the 'alignment'): V = aligned - base is dense, full rank."""
    aligned = make_model()
    aligned.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in aligned.named_modules():
            if name.rsplit(".", 1)[-1] in targets:
                module.weight.add_(torch.randn(module.weight.shape, generator=generator) * scale)
    return aligned


@pytest.fixture
def lineage(tmp_path):
    """base/ (unaligned), aligned/ and a fine-tuning adapter ft/ on the aligned model."""
    tokenizer = make_tokenizer()
    base = make_model()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    aligned = _aligned_from(base)
    aligned.save_pretrained(tmp_path / "aligned")
    tokenizer.save_pretrained(tmp_path / "aligned")
    add_lora(aligned, seed=1, scale=0.3).save_pretrained(tmp_path / "ft")
    return tmp_path


def _finetuned(lineage):
    return load_model(ModelSource(str(lineage / "aligned"), adapters=(str(lineage / "ft"),), device="cpu", dtype="float32"),
                      keep_adapter=True)


def _effective(model) -> dict[str, torch.Tensor]:
    return {name: lora.aligned_weight(layer).detach().float() + lora.update(layer, model.active_adapter)
            for name, layer in lora.lora_modules(model, model.active_adapter).items()}


def _context(tokenizer, **kwargs):
    return DefenseContext(tokenizer, **kwargs)


# --- SafeLoRA ------------------------------------------------------------------------------------------


def test_safelora_projected_update_is_c_times_the_update_by_hand(lineage):
    loaded = _finetuned(lineage)
    base = dict(make_model().named_modules())
    before = {name: (lora.aligned_weight(layer).detach().clone(), lora.update(layer))
              for name, layer in lora.lora_modules(loaded.model).items()}
    chosen = defense("safelora")
    settings = chosen.configure({"select": "threshold", "threshold": 1.0})  # every module is projected
    outcome = settings.apply(loaded.model, _context(loaded.tokenizer, base_model=ModelSource(str(lineage / "base"))))
    for name, layer in lora.lora_modules(loaded.model).items():
        aligned, delta = before[name]
        v = aligned - base[name].weight.detach()
        c = v @ v.T / torch.linalg.matrix_norm(v)  # the authors' C, by hand
        assert torch.allclose(lora.update(layer), c @ delta, atol=1e-5)
        assert outcome.report["modules"][name]["projected"] is True
    assert outcome.changed_fraction == pytest.approx(1.0)


def test_safelora_picks_the_k_lowest_cosines(lineage):
    loaded = _finetuned(lineage)
    chosen = defense("safelora")
    outcome = chosen.configure({"layers": 2}).apply(loaded.model,
                           _context(loaded.tokenizer, base_model=ModelSource(str(lineage / "base"))))
    modules = outcome.report["modules"]
    by_cosine = sorted(modules, key=lambda name: modules[name]["cosine"])
    assert {name for name in modules if modules[name]["projected"]} == set(by_cosine[:2])
    unprojected = [name for name in by_cosine[2:]]
    assert all(modules[name]["changed"] == 0 for name in unprojected)


def test_select_modules_number_and_threshold():
    cosines = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.3}
    assert select_modules(cosines, "number", 2, 0.0) == {"b", "d"}
    assert select_modules(cosines, "number", 10, 0.0) == set(cosines)
    assert select_modules(cosines, "threshold", 1, 0.5) == {"b", "c", "d"}
    assert select_modules({"a": 0.2, "b": 0.2, "c": 0.9}, "number", 1, 0.0) == {"a", "b"}  # the authors' tie rule


def test_projector_guard_and_exact_option():
    assert projection_matrix(torch.zeros(4, 3)) is None
    v = torch.randn(6, 2) @ torch.randn(2, 5)  # rank 2
    exact = projection_matrix(v, "exact")
    assert torch.allclose(exact @ exact, exact, atol=1e-5) and torch.allclose(exact @ v, v, atol=1e-5)
    authors = projection_matrix(v, "authors")
    assert torch.allclose(authors, v @ v.T / torch.linalg.matrix_norm(v))


def test_safelora_leaves_modules_with_v_zero_alone(lineage):
    loaded = _finetuned(lineage)
    chosen = defense("safelora")
    # the aligned model as its own base: V = 0 everywhere, so no cosine exists and nothing may change (no NaN)
    outcome = chosen.configure({}).apply(loaded.model, _context(loaded.tokenizer, base_model=ModelSource(str(lineage / "aligned"))))
    assert all(m["cosine"] is None and not m["projected"] and m["changed"] == 0 for m in outcome.report["modules"].values())


def test_safelora_from_the_alignment_adapter_matches_the_base_model(tmp_path):
    tokenizer = make_tokenizer()
    base = make_model()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    alignment = add_lora(make_model(), seed=7, scale=0.2)
    alignment.save_pretrained(tmp_path / "alignment")
    merged = alignment.merge_and_unload()
    merged.save_pretrained(tmp_path / "aligned")
    tokenizer.save_pretrained(tmp_path / "aligned")
    add_lora(merged, seed=1, scale=0.3).save_pretrained(tmp_path / "ft")
    results = []
    for context in ({"base_model": ModelSource(str(tmp_path / "base"))}, {"alignment_adapter": str(tmp_path / "alignment")}):
        loaded = _finetuned(tmp_path)
        chosen = defense("safelora")
        chosen.configure({"layers": 3}).apply(loaded.model, _context(loaded.tokenizer, **context))
        results.append(_effective(loaded.model))
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-4)


# --- RESTA ---------------------------------------------------------------------------------------------


def _resta(lineage, unaligned, **options):
    loaded = _finetuned(lineage)
    chosen = defense("resta")
    outcome = chosen.configure(options).apply(loaded.model, _context(loaded.tokenizer, unaligned_model=str(unaligned)))
    return loaded, outcome


def test_resta_beta_zero_changes_nothing(lineage, tmp_path):
    add_lora(make_model(), seed=3, r=2, scale=0.3).save_pretrained(tmp_path / "unaligned")
    before = _effective(_finetuned(lineage).model)
    loaded, outcome = _resta(lineage, tmp_path / "unaligned", beta=0.0)
    after = _effective(loaded.model)
    assert outcome.report["output"] == "adapter"
    for name in before:
        assert torch.allclose(after[name], before[name], atol=1e-6)


def test_resta_with_the_fine_tuned_model_as_unaligned_returns_the_aligned_model(lineage):
    loaded, _ = _resta(lineage, lineage / "ft", beta=1.0)
    aligned = dict(make_model().named_modules())  # same seed as the fixture's base, then the same shift
    reference = dict(_aligned_from(make_model()).named_modules())
    for name, weight in _effective(loaded.model).items():
        assert torch.allclose(weight, reference[name].weight, atol=1e-5)
        assert not torch.allclose(weight, aligned[name].weight)


def test_resta_cat_is_exact_for_other_ranks_and_negative_weights(lineage, tmp_path):
    add_lora(make_model(), seed=3, r=2, scale=0.3).save_pretrained(tmp_path / "unaligned")
    ft = _finetuned(lineage).model
    unaligned_updates = lora.adapter_update_reader(tmp_path / "unaligned")[1]
    # theta_ft + beta (theta_aligned - theta_unaligned) = theta_ft - beta * (the unalignment LoRA's update)
    expected = {name: lora.aligned_weight(layer).detach() + lora.update(layer) - 0.7 * unaligned_updates(name)
                for name, layer in lora.lora_modules(ft).items()}
    loaded, _ = _resta(lineage, tmp_path / "unaligned", beta=0.7)
    for name, weight in _effective(loaded.model).items():
        assert torch.allclose(weight, expected[name], atol=1e-5)


def test_resta_with_dare_folds_a_dense_model(lineage, tmp_path):
    loaded, outcome = _resta(lineage, lineage / "ft", beta=1.0, dare_drop=0.5)
    assert outcome.report["output"] == "model"
    assert all(not torch.count_nonzero(layer.lora_B["default"].weight) for layer in lora.lora_modules(loaded.model).values())


def test_dare_drops_and_rescales():
    delta = torch.ones(200, 100)
    out = dare(delta, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(out.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((out == 0).float().mean().item() - 0.25) < 0.02
    assert torch.equal(dare(delta, 0.0, torch.Generator()), delta)


def test_resta_with_a_full_unaligned_model(lineage):
    """The unaligned model as a model folder: the fine-tuned model merged, so theta_resta = theta_aligned."""
    ft = _finetuned(lineage)
    ft.model.merge_and_unload().save_pretrained(lineage / "ft-merged")
    ft.tokenizer.save_pretrained(lineage / "ft-merged")
    loaded, outcome = _resta(lineage, lineage / "ft-merged", beta=1.0)
    reference = dict(_aligned_from(make_model()).named_modules())
    assert outcome.report["output"] == "model"
    for name, weight in _effective(loaded.model).items():
        assert torch.allclose(weight, reference[name].weight, atol=1e-5)


# --- Safe Delta ----------------------------------------------------------------------------------------


def _layer(rows=6, cols=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(50, cols, generator=generator)
    hessian = 2 * x.T @ x / 50
    aligned = torch.randn(rows, cols, generator=generator)
    finetuned = aligned + 0.3 * torch.randn(rows, cols, generator=generator)
    return aligned, finetuned, hessian


def test_safe_delta_zero_budget_keeps_the_aligned_weights():
    aligned, finetuned, hessian = _layer()
    repaired, accepted, candidates = safe_delta_matrix(aligned, finetuned, hessian, 0.0)
    assert torch.equal(repaired, aligned) and accepted == 0 and candidates == aligned.numel()


def test_safe_delta_unbounded_budget_takes_the_fine_tuned_weights():
    aligned, finetuned, hessian = _layer()
    repaired, accepted, _ = safe_delta_matrix(aligned, finetuned, hessian, float("inf"), exclude=0.0, block_size=4)
    assert torch.allclose(repaired, finetuned, atol=1e-6) and accepted == aligned.numel()


@pytest.mark.parametrize("sub_block", [1, 4])
def test_safe_delta_compensation_is_the_brute_force_obs_update(sub_block):
    """Column 0 (the least safety-sensitive: its input is small) takes a small delta, accepted; every other
    delta is too costly and rejected. The rejected weights then move to the minimiser of the safety loss
    (dW) H (dW)^T with column 0 fixed, solved here directly; columns in column 0's sub-block get none."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 10, generator=generator)
    x[:, 0] *= 0.1
    hessian = 2 * x.T @ x / 50
    aligned = torch.randn(6, 10, generator=generator)
    finetuned = aligned + 100.0
    finetuned[:, 0] = aligned[:, 0] + 0.1
    repaired, accepted, _ = safe_delta_matrix(aligned, finetuned, hessian, 100.0, exclude=0.0, sub_block=sub_block)
    assert accepted == aligned.shape[0]
    h = damped_hessian(hessian, 0.01)
    fixed = finetuned[:, :1] - aligned[:, :1]
    free = -(torch.linalg.solve(h[1:, 1:], h[1:, :1]) @ fixed.T).T  # argmin over the free columns
    assert torch.allclose(repaired[:, 0], finetuned[:, 0])
    assert free.abs().max() > 1e-3  # the compensation is far from zero
    assert torch.allclose(repaired[:, sub_block:] - aligned[:, sub_block:], free[:, sub_block - 1:], atol=1e-6)
    assert torch.equal(repaired[:, 1:sub_block], aligned[:, 1:sub_block])


SAFE_ROWS = PairSet(pairs=tuple(Pair(prompt=f"How do I hurt someone {i}?", response="I cannot help with that.")
                                for i in range(4)), source="test", indices=tuple(range(4)))


def _safe_delta(lineage, **options):
    loaded = _finetuned(lineage)
    chosen = defense("safe-delta")
    outcome = chosen.configure({"template": "plain", **options}).apply(loaded.model,
                           _context(loaded.tokenizer, safe=SAFE_ROWS))
    return loaded, outcome


def test_safe_delta_on_a_model_zero_and_unbounded_budgets(lineage):
    ft = _effective(_finetuned(lineage).model)
    aligned = dict(_aligned_from(make_model()).named_modules())
    loaded, outcome = _safe_delta(lineage, scale=0.0)
    assert outcome.report["output"] == "model"
    for name, weight in _effective(loaded.model).items():
        assert torch.allclose(weight, aligned[name].weight, atol=1e-6)
    loaded, _ = _safe_delta(lineage, scale=float("inf"), exclude=0.0)
    for name, weight in _effective(loaded.model).items():
        assert torch.allclose(weight, ft[name], atol=1e-5)


def test_safe_delta_hessians_come_from_the_aligned_model_layer_by_layer(lineage):
    """The second layer's result equals the math run on a Hessian collected by hooks on a full pass of the
    aligned model: the layer-by-layer propagation (mask, positions, rotary embeddings) is the model's own."""
    from antidote_llm.data.templates import encode_pair

    tokenizer = make_tokenizer()
    aligned = _aligned_from(make_model())
    module = aligned.model.layers[1].self_attn.k_proj
    total, rows = torch.zeros(64, 64), 0

    def hook(_, args, __):
        nonlocal total, rows
        x = args[0].reshape(-1, 64)
        total += x.T @ x
        rows += 1

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for pair in SAFE_ROWS.pairs:
            aligned(input_ids=torch.tensor([encode_pair(tokenizer, "plain", pair.prompt, pair.response, None, 2048).input_ids]))
    handle.remove()
    ft = _finetuned(lineage).model
    name = "model.layers.1.self_attn.k_proj"
    layer = lora.lora_modules(ft)[name]
    expected, _, _ = safe_delta_matrix(module.weight.detach(), module.weight.detach() + lora.update(layer), 2 * total / rows, 0.1)
    loaded, _ = _safe_delta(lineage, scale=0.1)
    assert torch.allclose(_effective(loaded.model)[name], expected, atol=1e-4)


# --- the CLI: inputs and outputs -----------------------------------------------------------------------


def _cli(lineage, out, *extra):
    return main(["realign", "--model", str(lineage / "aligned"), "--adapter", str(lineage / "ft"), "--device", "cpu",
                 "--out", str(out), "--quiet", *extra])


@pytest.mark.parametrize("method, flag", [("safelora", "--base-model or --alignment-adapter"),
                                          ("resta", "--unaligned-model"), ("safe-delta", "--safe-data")])
def test_missing_extra_input_is_named_by_its_flag(lineage, tmp_path, capsys, method, flag):
    assert _cli(lineage, tmp_path / "out", "--method", method) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_reference_of_another_architecture_is_refused(lineage, tmp_path, capsys):
    other = make_model(hidden=32)
    other.save_pretrained(tmp_path / "other")
    assert _cli(lineage, tmp_path / "out", "--method", "safelora", "--base-model", str(tmp_path / "other")) == 2
    assert "hidden_size" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert _cli(lineage, tmp_path / "out", "--method", "resta", "--unaligned-model", str(tmp_path / "other")) == 2
    assert not (tmp_path / "out").exists()


def test_flags_of_another_method_are_refused(lineage, tmp_path, capsys):
    assert _cli(lineage, tmp_path / "out", "--method", "resta", "--unaligned-model", str(lineage / "ft"), "--ratio", "0.1") == 2
    assert "--ratio" in capsys.readouterr().err
    assert _cli(lineage, tmp_path / "out", "--ratio", "0.1", "--score", "magnitude", "--beta", "0.5") == 2
    assert _cli(lineage, tmp_path / "out", "--method", "safelora", "--base-model", str(lineage / "base"),
                "--safe-data", "x.json") == 2
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_repaired_adapter_or_model_and_the_report(lineage, tmp_path):
    assert _cli(lineage, tmp_path / "s", "--method", "safelora", "--base-model", str(lineage / "base"), "--layers", "2") == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["output"] == "adapter" and (tmp_path / "s" / "adapter" / "adapter_model.safetensors").is_file()
    assert sum(m["projected"] for m in report["modules"].values()) == 2 and report["memory"]["peak_rss_bytes"] > 0
    assert _cli(lineage, tmp_path / "r", "--method", "resta", "--unaligned-model", str(lineage / "ft")) == 0
    assert (tmp_path / "r" / "adapter" / "adapter_config.json").is_file()
    resta = load_model(ModelSource(str(lineage / "aligned"), adapters=(str(tmp_path / "r" / "adapter"),)))
    reference = dict(_aligned_from(make_model()).named_modules())
    for name, module in resta.model.named_modules():
        if name in reference and hasattr(module, "weight") and name.endswith("_proj"):
            assert torch.allclose(module.weight, reference[name].weight, atol=1e-5)
    safe = tmp_path / "safe.json"
    safe.write_text(json.dumps([{"prompt": p.prompt, "response": p.response} for p in SAFE_ROWS.pairs]))
    assert _cli(lineage, tmp_path / "d", "--method", "safe-delta", "--safe-data", str(safe), "--template", "plain") == 0
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["output"] == "model" and (tmp_path / "d" / "model" / "config.json").is_file()
    assert report["inputs"]["safe_rows"] == 4


def test_peers_need_an_adapter(lineage, tmp_path, capsys):
    code = main(["realign", "--model", str(lineage / "aligned"), "--device", "cpu", "--out", str(tmp_path / "o"),
                 "--method", "resta", "--unaligned-model", str(lineage / "ft")])
    assert code == 2 and "--adapter" in capsys.readouterr().err


def test_registry_lists_the_peers_at_the_post_stage():
    for name in ("safelora", "resta", "safe-delta"):
        assert defense(name, "post").configure({}).inputs()
    with pytest.raises(AntidoteError):
        defense("resta").configure({"dare_drop": 1.0})


# --- the lab and `antidote unalign` --------------------------------------------------------------------


def test_lab_compares_the_peers_with_antidote_on_the_same_fine_tuned_model(experiment_file, tmp_path):  # noqa: F811
    import yaml

    from antidote_llm.lab import load_experiment, run_experiment
    from test_lab import TINY_TRAINING

    raw = yaml.safe_load(experiment_file.read_text())
    raw["unalign"] = {"data": {"source": "harmful.jsonl", "skip": 10, "samples": 4}, "training": TINY_TRAINING}
    raw["realign_data"] = {"source": "harmful.jsonl", "skip": 14}
    raw["safe_data"] = {"source": "refusals.jsonl"}
    raw["defenses"] = {
        "none": {"method": "none"},
        "antidote": {"method": "antidote", "ratio": 0.1, "max_length": 64},
        "safelora": {"method": "safelora", "layers": 2},
        "resta": {"method": "resta", "beta": 0.5},
        "safe-delta": {"method": "safe-delta", "scale": 0.1, "template": "plain"},
    }
    experiment_file.write_text(yaml.safe_dump(raw))
    logs = []
    result = run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=logs.append)
    rows = {r["defense"]: r for r in result.rows if r["stage"] == "fine-tuned"}
    assert set(rows) == set(raw["defenses"])
    assert rows["safelora"]["setting"] == "K=2" and rows["resta"]["setting"] == "beta=0.5"
    assert all(rows[name]["defense_peak_rss_mb"] > 0 and rows[name]["pruned_fraction"] > 0 for name in rows if name != "none")
    assert sum(name.startswith("unalign-") for name in result.ran) == 1
    again = run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=logs.append)
    assert again.ran == []  # every stage, the unaligned model included, is cached
    assert "setting" in result.files["markdown"].read_text()


def test_lab_refuses_a_peer_without_its_input_and_overlapping_unalignment_rows(experiment_file, tmp_path):  # noqa: F811
    import yaml

    from antidote_llm.lab import load_experiment, run_experiment

    raw = yaml.safe_load(experiment_file.read_text())
    raw["defenses"]["resta"] = {"method": "resta"}
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="needs unalign"):
        load_experiment(experiment_file)
    raw["unalign"] = {"data": {"source": "harmful.jsonl"}}  # every row: the poison rows too
    experiment_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(AntidoteError, match="unalignment rows are also"):
        run_experiment(load_experiment(experiment_file), tmp_path / "runs", progress=False, log=lambda _: None)


def test_unalign_command_writes_an_adapter_resta_takes(lineage, tmp_path, harmful_file):
    out = tmp_path / "unaligned"
    assert main(["unalign", "--model", str(lineage / "aligned"), "--data", str(harmful_file), "--device", "cpu",
                 "--max-steps", "2", "--lora-r", "2", "--template", "plain", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stage"] == "unalign" and report["data"]["harmful"]["rows"] == 12
    assert _cli(lineage, tmp_path / "r", "--method", "resta", "--unaligned-model", str(out / "adapter"), "--beta", "0.5") == 0


# --- interpolation, the control ------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.4, 1.0])
def test_interpolate_keeps_gamma_of_the_update_exactly(lineage, gamma):
    loaded = _finetuned(lineage)
    aligned = {name: lora.aligned_weight(layer).detach().float().clone()
               for name, layer in lora.lora_modules(loaded.model).items()}
    before = _effective(loaded.model)
    chosen = defense("interpolate")
    outcome = chosen.configure({"gamma": gamma}).apply(loaded.model, _context(loaded.tokenizer))
    after = _effective(loaded.model)
    for name, weight in after.items():
        torch.testing.assert_close(weight, aligned[name] + gamma * (before[name] - aligned[name]), rtol=1e-5, atol=1e-6)
    assert outcome.changed_fraction == (0.0 if gamma == 1.0 else pytest.approx(1.0))
    assert chosen.configure({"gamma": gamma}).knob() == f"gamma={gamma:g}"


def test_a_row_count_left_at_its_default_takes_what_there_is_and_one_given_is_taken_exactly(tmp_path):
    """Safe Delta's default 128 safe rows: fewer in the file is fine; --safe-samples above the file's count is not."""
    from antidote_llm.data.spec import DataSpec
    from antidote_llm.defenses.pipeline import load_inputs

    safe = tmp_path / "safe.json"
    safe.write_text(json.dumps([{"prompt": f"harm {i}?", "response": "I cannot help.", "is_safe": True} for i in range(4)]))
    like = ModelSource("unused")
    assert len(load_inputs({"safe": DataSpec(source=str(safe))}, like)["safe"]) == 4
    assert len(load_inputs({"safe": DataSpec(source=str(safe), samples=3)}, like)["safe"]) == 3
    with pytest.raises(AntidoteError, match=f"--safe-samples asks for 5 rows but {safe} has 4 rows"):
        load_inputs({"safe": DataSpec(source=str(safe), samples=5)}, like)
