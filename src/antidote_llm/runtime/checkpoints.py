"""Reading safetensors checkpoints and PEFT LoRA adapters lazily, tensor by tensor, and writing safetensors
files chunk by chunk: what the layer-by-layer path (--offload) and the adapter-reading defenses share."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from antidote_llm.errors import AntidoteError

ADAPTER_PREFIX = "base_model.model."  # what PEFT puts before the bare model's module names in a saved adapter
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
UNSUPPORTED_LORA = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save")


def open_safetensors(file: Path):
    """A safetensors file opened for lazy reads; a damaged file is named in an AntidoteError."""
    try:
        return safe_open(file, framework="pt")
    except SafetensorError as exc:
        raise AntidoteError(f"cannot read {file}: it is truncated or corrupt ({str(exc).splitlines()[0]}); "
                            "download or save it again") from None


class Checkpoint:
    """The tensors of a safetensors model folder (one file or shards with an index), read lazily."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {key: folder / name for key, name in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with open_safetensors(folder / "model.safetensors") as f:
                self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            raise AntidoteError(f"{folder} has no safetensors weights; --offload reads model.safetensors (or its shards)")

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """Copies of `keys`; each file is mapped only while its tensors are read, so its pages leave memory."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        tensors = {}
        for file, names in by_file.items():
            with open_safetensors(file) as f:
                tensors.update({name: f.get_tensor(name) for name in names})
        return tensors

    def rows(self, key: str, ids: Sequence[int]) -> torch.Tensor:
        """Rows `ids` (sorted, distinct) of a 2-D tensor, read run by run: only their pages are touched."""
        runs, start = [], 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                runs.append((ids[start], ids[i - 1] + 1))
                start = i
        with open_safetensors(self.files[key]) as f:
            tensor = f.get_slice(key)
            return torch.cat([tensor[a:b] for a, b in runs])

    def copy_to(self, keys: Sequence[str], dtype: torch.dtype, path: Path, chunk_bytes: int = 16 * 2**20) -> int:
        """Write `keys` in `dtype` to a safetensors file at `path`, chunk by chunk: the safetensors library
        writes only from memory, and an embedding matrix or LM head alone can be gigabytes. Each chunk is
        read with the file mapped only for that chunk, so neither the copy nor the mapping stays in memory.
        Returns the bytes of tensor data written."""
        element = torch.empty((), dtype=dtype).element_size()
        shapes = {}
        for key in keys:
            with open_safetensors(self.files[key]) as f:
                shapes[key] = f.get_slice(key).get_shape()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            size = math.prod(shapes[key]) * element
            header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shapes[key], "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
        with open(path, "wb") as out:
            out.write(len(encoded).to_bytes(8, "little"))
            out.write(encoded)
            for key in keys:
                shape = shapes[key]
                row_bytes = math.prod(shape[1:]) * element if len(shape) > 1 else element
                step = max(1, chunk_bytes // max(row_bytes, 1)) if shape else 1
                for start in range(0, shape[0] if shape else 1, step):
                    with open_safetensors(self.files[key]) as f:
                        chunk = f.get_slice(key)[start:start + step] if shape else f.get_tensor(key)
                    out.write(chunk.to(dtype).contiguous().view(torch.uint8).numpy().data)
        return offset

    def nbytes(self, dtype: torch.dtype) -> int:
        """The size of every tensor once loaded in `dtype`, from the file headers alone."""
        total, element = 0, torch.empty((), dtype=dtype).element_size()
        for file in set(self.files.values()):
            with open_safetensors(file) as f:
                total += sum(math.prod(f.get_slice(key).get_shape()) * element for key in f.keys())
        return total


class LoraAdapter:
    """A saved PEFT LoRA adapter folder: its config, scaling and tensors (keys as PEFT saves them), read lazily.

    `factors` maps each module name (as in the bare model: model.layers.0.self_attn.q_proj) to the keys of its
    factors, {"A": key, "B": key}."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.weights = self.folder / "adapter_model.safetensors"
        config_file = self.folder / "adapter_config.json"
        if not config_file.is_file() or not self.weights.is_file():
            raise AntidoteError(f"{folder} is not a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)")
        self.config = json.loads(config_file.read_text(encoding="utf-8"))
        unsupported = [key for key in UNSUPPORTED_LORA if self.config.get(key)]
        if unsupported:
            raise AntidoteError(f"adapter {folder} uses {', '.join(unsupported)}; give a plain LoRA adapter")
        r = self.config["r"]
        self.scaling = self.config["lora_alpha"] / (math.sqrt(r) if self.config.get("use_rslora") else r)
        with open_safetensors(self.weights) as f:
            self.keys = list(f.keys())
            self.shapes = {key: f.get_slice(key).get_shape() for key in self.keys}
        self.factors: dict[str, dict[str, str]] = {}
        for key in self.keys:
            module, _, kind = key.rpartition(".lora_")
            self.factors.setdefault(module.removeprefix(ADAPTER_PREFIX), {})[kind[0]] = key

    def read(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        with open_safetensors(self.weights) as f:
            return {key: f.get_tensor(key) for key in keys}

    def update_shape(self, module: str) -> tuple[int, int]:
        """[out, in] of the module's update B @ A."""
        keys = self.factors[module]
        return self.shapes[keys["B"]][0], self.shapes[keys["A"]][-1]

    def updates(self, modules: Sequence[str]) -> dict[str, torch.Tensor]:
        """The dense update scaling * B @ A of each module in fp32, [out, in] (PEFT's fan_in_fan_out not applied)."""
        tensors = self.read([key for module in modules for key in self.factors[module].values()])
        return {module: (tensors[self.factors[module]["B"]].float() @ tensors[self.factors[module]["A"]].float())
                * self.scaling for module in modules}
