"""What a user sees when things go wrong: damaged files, bad rows, Ctrl-C; and --version, library noise."""

from __future__ import annotations

import importlib.metadata
import json
import struct
import subprocess
import sys
import warnings

import pytest

import antidote_llm
from antidote_llm.cli.main import main
from conftest import HARMFUL_ROWS, save_adapter, save_model


def run(capsys, *args) -> int:
    capsys.readouterr()  # drop what building the fixtures printed
    return main([*map(str, args)])


def realign_args(model, data, out, *extra):
    return ("realign", "--model", model, "--data", data, "--ratio", 0.1, "--out", out, "--device", "cpu", "--quiet", *extra)


def assert_refused(capsys, tmp_path, out, *needles) -> str:
    """Exit 2 was returned by the caller; here: one line on stderr naming the problem, nothing written."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("antidote: error: "), err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    return err


def truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_a_truncated_model_file_is_one_line_and_exit_2(tmp_path, harmful_file, capsys, keep):
    model = save_model(tmp_path / "model")
    truncate(model / "model.safetensors", keep)
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 2
    assert_refused(capsys, tmp_path, out, f"{model / 'model.safetensors'} is truncated or corrupt", "again")


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda a: truncate(a / "adapter_model.safetensors"), "adapter_model.safetensors is truncated or corrupt"),
        (lambda a: (a / "adapter_config.json").write_text("{"), "adapter_config.json is not valid JSON"),
    ],
)
def test_a_damaged_adapter_is_one_line_and_exit_2(tmp_path, harmful_file, capsys, damage, needle):
    base = save_model(tmp_path / "base")
    adapter = save_adapter(tmp_path / "adapter", base)
    damage(adapter)
    out = tmp_path / "out"
    assert run(capsys, *realign_args(base, harmful_file, out, "--adapter", adapter)) == 2
    assert_refused(capsys, tmp_path, out, needle)


def test_a_damaged_tokenizer_is_one_line_and_exit_2(tmp_path, harmful_file, capsys):
    model = save_model(tmp_path / "model")
    truncate(model / "tokenizer.json")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 2
    assert_refused(capsys, tmp_path, out, "cannot load the tokenizer")


def test_a_row_with_a_number_and_a_null_is_refused_before_any_work(tmp_path, capsys):
    model = save_model(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in HARMFUL_ROWS[:2]] + [{"prompt": 5, "response": None}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, data, out)) == 2
    assert_refused(capsys, tmp_path, out, f"{data} line 3: field 'prompt' is a number (5)")


def test_ctrl_c_during_scoring_is_one_line_exit_130_and_writes_nothing(tmp_path, harmful_file, capsys, monkeypatch):
    from antidote_llm.core import scoring

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scoring, "wanda_scores", interrupted)
    model = save_model(tmp_path / "model")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 130
    assert capsys.readouterr().err == "antidote: interrupted, nothing written\n"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sigterm_during_scoring_ends_like_ctrl_c_and_writes_nothing(tmp_path, harmful_file, capsys, monkeypatch):
    import os
    import signal

    from antidote_llm.core import scoring

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a scheduler would; the handler raises at once
        raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(scoring, "wanda_scores", terminated)
    model = save_model(tmp_path / "model")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 130
    assert capsys.readouterr().err == "antidote: interrupted, nothing written\n"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_ctrl_c_while_saving_removes_what_was_half_written(tmp_path, harmful_file, capsys, monkeypatch):
    """Interrupted right after the model's weights were written into the output's hidden temporary folder."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained
    written = []

    def save_then_interrupt(self, path, *args, **kwargs):
        original(self, path, *args, **kwargs)
        written.append(path)
        raise KeyboardInterrupt

    model = save_model(tmp_path / "model")
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_interrupt)
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 130
    assert capsys.readouterr().err == "antidote: interrupted, nothing written\n"
    assert written and written[0].parent.name.startswith(".out.tmp-")  # it did write, into the temporary folder
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_version_comes_from_the_installed_metadata(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"antidote {antidote_llm.__version__}\n"
    assert antidote_llm.__version__ == importlib.metadata.version("antidote-llm")


GRADIENT_CHECKPOINTING = "`is_gradient_checkpointing` is deprecated"


def test_importing_the_package_silences_the_gradient_checkpointing_warning():
    """In a fresh interpreter (pytest resets warning filters per test, so this cannot run in-process)."""
    code = (
        "import antidote_llm\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=2)\n"
        "LlamaForCausalLM(config).is_gradient_checkpointing\n"
        "import warnings; warnings.warn('other FutureWarnings still show', FutureWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert GRADIENT_CHECKPOINTING not in done.stderr
    assert "other FutureWarnings still show" in done.stderr  # the filter is narrow


def test_a_tiny_training_run_emits_no_gradient_checkpointing_warning(tmp_path):
    from antidote_llm import training
    from antidote_llm.data.records import Pair
    from antidote_llm.runtime.quiet import quiet_library_warnings
    from conftest import make_model, make_tokenizer

    config = training.preset("cpu", "align", template="plain", max_length=32, lora_r=2, lora_alpha=4, batch_size=2,
                             max_steps=1, logging_steps=1)
    pairs = [Pair(f"word {i}", f"answer {i}") for i in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # stricter than any default: every warning is recorded
        quiet_library_warnings()  # what `import antidote_llm` installs (pytest resets filters for each test)
        training.align(make_model(), make_tokenizer(), pairs, config, tmp_path / "align", progress=False)
    assert (tmp_path / "align" / "adapter").is_dir()
    assert not [w for w in caught if GRADIENT_CHECKPOINTING in str(w.message)]


# --- models that bring code, pickles, GGUF files (issue 22) -----------------------------------------------------

CONFIG_CODE = """from transformers import LlamaConfig


class PlantedConfig(LlamaConfig):
    model_type = "planted"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.frobnicate.strength  # an attribute it never set: AttributeError inside transformers_modules
"""
TOKENIZER_CODE = """from transformers import PreTrainedTokenizerFast


class PlantedTokenizer(PreTrainedTokenizerFast):
    def __init__(self, *args, **kwargs):
        raise AttributeError("'PlantedTokenizer' object has no attribute 'vocab_plan'")
"""


def _edit_json(path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _model_with_code(folder, part: str):
    """A tiny model whose config (part "model") or tokenizer (part "tokenizer") is a class of its own code."""
    model = save_model(folder)
    if part == "model":
        _edit_json(model / "config.json", model_type="planted",
                   auto_map={"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel"})
        (model / "planted.py").write_text(CONFIG_CODE)
    else:
        _edit_json(model / "tokenizer_config.json", auto_map={"AutoTokenizer": [None, "planted_tok.PlantedTokenizer"]})
        (model / "planted_tok.py").write_text(TOKENIZER_CODE)
    return model


@pytest.mark.parametrize(("part", "error"), [("model", "'PlantedConfig' object has no attribute 'frobnicate'"),
                                             ("tokenizer", "'PlantedTokenizer' object has no attribute 'vocab_plan'")],
                         ids=["model", "tokenizer"])
def test_trusted_code_that_fails_is_one_line_naming_the_model_and_the_error(tmp_path, harmful_file, capsys, part, error):
    model = _model_with_code(tmp_path / "model", part)
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out, "--trust-remote-code")) == 2
    assert_refused(capsys, tmp_path, out, f"the {part} code that '{model}' brings", f"AttributeError: {error}")


def test_code_refused_without_trust_keeps_the_trust_remote_code_hint_in_its_line(tmp_path, harmful_file, capsys):
    model = _model_with_code(tmp_path / "model", "model")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 2
    assert_refused(capsys, tmp_path, out, f"'{model}' brings its own code", "pass --trust-remote-code")


def test_a_pickle_the_safe_load_refuses_is_one_line_naming_safetensors(tmp_path, harmful_file, capsys):
    import os

    import torch

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    model = save_model(tmp_path / "model")
    (model / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, model / "pytorch_model.bin")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 2
    assert_refused(capsys, tmp_path, out, f"{model / 'pytorch_model.bin'} was refused as unsafe pickle",
                   "GLOBAL posix.system", "convert it to safetensors")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("body", [
    struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc" + bytes(32),  # a key that is no text
    struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40),  # a key longer than the file
    struct.pack("<IQQ", 7, 0, 0),  # an unknown version
    b"\x03",  # ends inside the header
], ids=["key-not-text", "key-past-the-end", "unknown-version", "cut-header"])
def test_a_gguf_file_with_garbage_after_the_magic_is_not_a_readable_gguf_file(tmp_path, harmful_file, capsys, body):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + body)
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 2
    err = assert_refused(capsys, tmp_path, out, f"'{model}': it is not a readable GGUF file", "convert it again")
    assert "JSON" not in err


@pytest.mark.parametrize(("template", "needles"), [
    ("{{ messages[0].content.__class__.__mro__ }}",
     ("Jinja's sandbox refused it: access to attribute '__class__' of 'str' object is unsafe;",)),
    ("{% for m in messages %}{{ m['content'] }}",
     ("it has a syntax error (line 1): Unexpected end of template", "'endfor'")),
], ids=["sandbox", "syntax"])
def test_a_chat_template_jinja_refuses_is_one_line_naming_the_problem(tmp_path, harmful_file, capsys, template, needles):
    from conftest import make_tokenizer

    model = save_model(tmp_path / "model")
    tokenizer = make_tokenizer()
    tokenizer.chat_template = template
    tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out, "--template", "chat")) == 2
    assert_refused(capsys, tmp_path, out, "the chat template of the model cannot be used", *needles,
                   "or use --template alpaca or plain")


# --- rows longer than the model's positions (issue 22) ----------------------------------------------------------

def _short_gpt2(folder, positions: int = 64):
    """A tiny GPT-2, whose learned position table has `positions` rows: a longer row indexes past it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import make_tokenizer

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=258, n_positions=positions, n_embd=32, n_layer=2, n_head=2, pad_token_id=256,
                        eos_token_id=257, bos_token_id=257)
    GPT2LMHeadModel(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def test_realign_cuts_rows_to_the_model_positions_by_default_and_refuses_a_longer_max_length(tmp_path, harmful_file,
                                                                                          capsys):
    model = _short_gpt2(tmp_path / "gpt2")
    assert len(HARMFUL_ROWS[0]["prompt"]) + len(HARMFUL_ROWS[0]["response"]) > 64  # bytes are tokens here
    assert run(capsys, *realign_args(model, harmful_file, tmp_path / "out")) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["method"]["max_length"] == 64
    out = tmp_path / "longer"
    assert run(capsys, *realign_args(model, harmful_file, out, "--max-length", 65)) == 2
    assert_refused(capsys, tmp_path, out, "max_length 65 is longer than the model's 64 positions", "64 or less")


def test_evaluate_ends_answers_at_the_model_positions_and_refuses_a_prompt_that_fills_them(tmp_path, capsys):
    model = _short_gpt2(tmp_path / "gpt2")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "Hi?"}, {"prompt": "How do I do it?"}]))
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", model, "--harmful-prompts", prompts, "--device", "cpu", "--no-progress"]
    assert run(capsys, *argv, "--template", "plain", "--out", out) == 0  # 512 new tokens asked for, by default
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 2 and all(answer["answer"] for answer in answers)
    out = tmp_path / "alpaca"  # the Alpaca preamble alone is longer than 64 tokens
    assert run(capsys, *argv, "--out", out) == 2
    assert_refused(capsys, tmp_path, out, "prompt 2 is 155 tokens long, and the model has 64 positions", "no room for an answer")


# --- a full disk (issue 22) -------------------------------------------------------------------------------------

def _full_disk(kind: str):
    """safetensors' low-level file writer, as it fails on a full disk: part of the file written, then the error."""
    import errno

    from safetensors import SafetensorError

    def write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        if kind == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.mark.parametrize("kind", ["safetensors", "oserror"])
def test_a_full_disk_while_saving_is_one_line_and_removes_the_temporary_folder(tmp_path, harmful_file, capsys,
                                                                              monkeypatch, kind):
    import safetensors.torch

    model = save_model(tmp_path / "model")
    monkeypatch.setattr(safetensors.torch, "serialize_file", _full_disk(kind))
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out)) == 2
    assert_refused(capsys, tmp_path, out, f"the disk holding {tmp_path} is full", "nothing was written",
                   "free space or choose another --out")


# --- samples larger than the file (issue 22) -------------------------------------------------------------------

def test_samples_larger_than_the_file_is_refused_naming_both_counts(tmp_path, harmful_file, capsys):
    model = save_model(tmp_path / "model")
    out = tmp_path / "out"
    assert run(capsys, *realign_args(model, harmful_file, out, "--samples", 500)) == 2
    # the file holds 13 rows, one of them safe (is_safe true), which the harmful rows leave out
    assert_refused(capsys, tmp_path, out, f"samples asks for 500 rows but {harmful_file} has 12 left "
                   "(1 of its 13 rows skipped, excluded or filtered out); lower samples to 12 or less")
    assert run(capsys, *realign_args(model, harmful_file, out, "--samples", 12)) == 0  # all there are: fine
