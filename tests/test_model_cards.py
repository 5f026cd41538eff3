"""Model cards: the repaired model's folder gets a README.md in Hugging Face model-card form (metadata, verdict,
method, data hashes, HS and FA with intervals before and after); `--push-to-hub` is checked before any work, and
a hub that cannot be reached or refuses is one line, exit 2."""

from __future__ import annotations

import http.server
import json
import threading

import pytest
from huggingface_hub import ModelCard

from antidote_llm.cli.main import main
from antidote_llm.runtime.modelcard import CardFacts, CardRow, hub_model_id, model_card
from test_guard import _cli, behaviour, lineage, zeroed_share  # noqa: F401 - fixtures

FACTS = CardFacts(
    title="Antidote-repaired model", summary="It zeroed 96 weights.", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
    base_adapters=["finetune/adapter"], verdict="repaired", reason="ratio 0.05 brings the probe harmful score to 0.0",
    results=[CardRow(model="fine-tuned (before)", harmful="50.0 [38.1, 61.9] (32/64)", accuracy="90.0 [85.1, 93.4] (180/200)"),
             CardRow(model="at ratio 0.05 (after, repaired)", harmful="0.0 [0.0, 5.7] (0/64)")],
    measured_on="Measured on 64 probe prompts.", method={"score": "refusal", "targets": ["adapter-a"], "ratio": None},
    data={"probe_prompts": {"source": "probe.jsonl", "rows": 64, "sha256": "ab" * 32}},
)


def test_the_card_reads_literally():
    text = model_card(FACTS, "peft")
    assert text.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\n"
                           "pipeline_tag: text-generation\ntags:\n- antidote\n- safety\n- pruning\n---\n\n"
                           "# Antidote-repaired model\n\nThis is a LoRA adapter repaired with Antidote (Huang et al.")
    for line in ("## Verdict\n\n**repaired**: ratio 0.05 brings the probe harmful score to 0.0\n",
                 "| model | HS % [95% CI] (harmful / prompts) | FA % [95% CI] (correct / rows) |\n|---|---|---|\n"
                 "| fine-tuned (before) | 50.0 [38.1, 61.9] (32/64) | 90.0 [85.1, 93.4] (180/200) |\n"
                 "| at ratio 0.05 (after, repaired) | 0.0 [0.0, 5.7] (0/64) | not measured |\n\n"
                 "Measured on 64 probe prompts.\n",
                 '| score | `refusal` |\n| targets | `["adapter-a"]` |\n| ratio | n/a |\n',
                 f"| probe_prompts | probe.jsonl | 64 | `{'ab' * 32}` |\n",
                 "This adapter is `finetune/adapter` repaired; it lies on `HuggingFaceTB/SmolLM2-135M-Instruct`.",
                 'model = AutoPeftModelForCausalLM.from_pretrained("THIS_REPO_OR_FOLDER")'):
        assert line in text
    assert ModelCard(text).data.to_dict() == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                              "library_name": "peft", "pipeline_tag": "text-generation",
                                              "tags": ["antidote", "safety", "pruning"]}
    merged = model_card(FACTS.model_copy(update={"verdict": None, "results": []}), "transformers")
    assert "library_name: transformers" in merged and "## Verdict" not in merged
    assert "Not measured by this run" in merged and "AutoModelForCausalLM.from_pretrained" in merged
    assert "Repaired from `HuggingFaceTB/SmolLM2-135M-Instruct` with the adapters `finetune/adapter` merged." in merged


def test_only_a_hub_id_is_the_metadatas_base_model(tmp_path):
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "owner" / "aligned").mkdir(parents=True)
    for local in (str(tmp_path / "owner" / "aligned"), "aligned/", "smollm2-135m-instruct", "x/model.gguf"):
        assert hub_model_id(local) is None
    card = ModelCard(model_card(FACTS.model_copy(update={"base_model": str(tmp_path)}), "peft"))
    assert "base_model" not in card.data.to_dict() and f"it lies on `{tmp_path}`" in card.text


# --- the commands write it ------------------------------------------------------------------------------


def test_guard_writes_a_card_into_each_repaired_model_folder(behaviour, lineage):  # noqa: F811
    behaviour(safe_from=zeroed_share(0.05))
    out = lineage / "repaired"
    assert _cli(lineage, out, "--save-merged") == 0
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["outputs"]["cards"] == {"adapter": "adapter/README.md", "merged": "merged/README.md"}
    adapter, merged = ModelCard.load(out / "adapter" / "README.md"), ModelCard.load(out / "merged" / "README.md")
    assert adapter.data.library_name == "peft" and merged.data.library_name == "transformers"
    assert adapter.data.tags == ["antidote", "safety", "pruning"] and adapter.data.base_model is None  # a local base
    text = adapter.text
    fine_tuned, candidate = verdict["fine_tuned"], verdict["candidate"]
    assert f"**repaired**: {verdict['reason']}" in text
    assert (f"| fine-tuned (before) | {fine_tuned['harmful']['value']:.1f} [{fine_tuned['harmful']['low']:.1f}, "
            f"{fine_tuned['harmful']['high']:.1f}] ({fine_tuned['harmful']['count']}/{fine_tuned['harmful']['of']}) | "
            f"80.0 [") in text
    assert f"| at ratio 0.05 (after, repaired) | 0.0 [0.0, {candidate['harmful']['high']:.1f}] (0/64) | 80.0 [" in text
    assert "| method | `antidote guard` |" in text and "| chosen_ratio | `0.05` |" in text
    assert "| max_accuracy_drop | `5.0` |" in text and "| score | `wanda` |" in text
    for role, row in verdict["inputs"].items():
        assert f"| {role} | {row['source']} | {row['rows']} | `{row['sha256']}` |" in text
    behaviour(safe_from=1.1)  # rejected without --write-best: no model, no card
    assert _cli(lineage, lineage / "rejected") == 3 and "cards" not in json.loads(
        (lineage / "rejected" / "verdict.json").read_text())["outputs"]


def test_realign_writes_a_card_with_the_method_and_the_data_hash(lineage, capsys):  # noqa: F811
    out = lineage / "realigned"
    assert main(["realign", "--model", str(lineage / "aligned"), "--adapter", str(lineage / "ft"), "--device", "cpu",
                 "--data", str(lineage / "calibration.jsonl"), "--ratio", "0.05", "--template", "plain",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    card = ModelCard.load(out / "adapter" / "README.md")
    assert card.data.library_name == "peft" and report["outputs"]["cards"] == {"adapter": "adapter/README.md"}
    assert f"| calibration | {lineage / 'calibration.jsonl'} | 12 | `{report['data']['sha256']}` |" in card.text
    assert "| ratio | `0.05` |" in card.text and "| score | `wanda` |" in card.text
    assert f"Antidote zeroed {report['totals']['pruned']:,} of {report['totals']['scored']:,} scored weights" in card.text
    assert "Not measured by this run" in card.text and "## Verdict" not in card.text


# --- pushing --------------------------------------------------------------------------------------------


def _guard_push(lineage, out, repo="me/repaired"):  # noqa: F811
    return _cli(lineage, out, "--push-to-hub", repo)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


@pytest.fixture
def online(monkeypatch, tmp_path):
    """The hub not in offline mode, no stored token, and the endpoint as the test sets it."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return monkeypatch


def test_a_push_that_cannot_happen_is_one_line_exit_2_before_any_work(behaviour, lineage, capsys, online):  # noqa: F811
    fake = behaviour(safe_from=zeroed_share(0.05))
    out = lineage / "pushed"
    assert _guard_push(lineage, out, repo="not a repo id") == 2
    assert "is not a hub repo id" in _one_line(capsys)
    assert _guard_push(lineage, out) == 2
    assert "no Hugging Face token" in _one_line(capsys)
    online.setenv("HF_TOKEN", "hf_not_a_real_token")
    online.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert _guard_push(lineage, out) == 2
    assert "the hub at http://127.0.0.1:9 did not accept the token" in _one_line(capsys)
    import huggingface_hub.constants

    online.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _guard_push(lineage, out) == 2
    assert "HF_HUB_OFFLINE" in _one_line(capsys)
    assert not out.exists() and fake.calls == []  # refused before the model was touched


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A hub that knows the token but refuses to create the repo."""

    def do_GET(self):  # noqa: N802
        self._answer(200, {"type": "user", "name": "me", "auth": {"accessToken": {"role": "write"}}})

    def do_POST(self):  # noqa: N802
        self._answer(403, {"error": "You don't have the rights to create a model under the namespace \"me\""})

    def _answer(self, status: int, body: dict):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_an_upload_the_hub_refuses_is_one_line_exit_2_with_the_verdict_kept(behaviour, lineage, capsys, online):  # noqa: F811
    behaviour(safe_from=zeroed_share(0.05))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        online.setenv("HF_TOKEN", "hf_not_a_real_token")
        online.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        out = lineage / "pushed"
        assert _guard_push(lineage, out) == 2
    finally:
        server.shutdown()
    line = _one_line(capsys)
    assert line.startswith(f"antidote: error: pushing {out / 'adapter'} to me/repaired failed:")
    assert "the folder is written" in line
    assert json.loads((out / "verdict.json").read_text())["verdict"] == "repaired"
    assert (out / "adapter" / "README.md").is_file()


from test_frontier import files  # noqa: E402, F401 - a fixture


def test_realign_auto_writes_a_card_with_hs_and_fa_before_and_after(files, capsys):  # noqa: F811
    tmp, base, adapter, data, probe, validation = files
    out = tmp / "auto"
    assert main([*map(str, ("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", "auto",
                            "--probe-prompts", probe, "--task", "sst2", "--validation-data", validation,
                            "--max-accuracy-drop", 100, "--max-new-tokens", 2, "--task-max-new-tokens", 2,
                            "--out", out, "--quiet"))]) == 0
    report = json.loads((out / "report.json").read_text())
    baseline = report["points"][0]
    chosen = next(p for p in report["points"] if p["selection"] == "antidote" and p["ratio"] == report["picked_ratio"])
    assert (baseline["prompts"], baseline["rows"]) == (3, 2)  # the counts behind the rates, for their intervals
    text = ModelCard.load(out / "adapter" / "README.md").text
    for name, point in (("fine-tuned (before)", baseline), (f"repaired at ratio {report['picked_ratio']:g} (after)", chosen)):
        assert f"| {name} | {point['harmful_score']:.1f} [" in text and f"({point['harmful_count']}/3) |" in text
        assert f"({point['correct']}/2) |" in text
    assert "chosen by `--ratio auto`" in text and f"| ratio | `{report['picked_ratio']}` |" in text
    assert main([*map(str, ("realign", "--model", base, "--adapter", adapter, "--data", data, "--ratio", "0.05,0.3",
                            "--out", tmp / "many", "--push-to-hub", "me/x"))]) == 2
    assert "give one --ratio or --ratio auto" in _one_line(capsys) and not (tmp / "many").exists()
