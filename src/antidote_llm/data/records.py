"""Reading rows from files or the hub, and turning them into (prompt, input, response) pairs."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from antidote_llm.errors import AntidoteError

HUB_PREFIX = "hf:"

# Field names of the common schemas, most specific first (matched case-insensitively).
PROMPT_FIELDS = ("prompt", "instruction", "question", "behavior", "goal", "query")
INPUT_FIELDS = ("input", "context")
RESPONSE_FIELDS = ("response", "output", "answer", "safe_response", "target", "completion")
SAFETY_FIELD = "is_safe"  # BeaverTails: True for safe answers, False for harmful ones
# A harmful prompt's category, detected when asked for and not named: the demo's and BeaverTails' `category`,
# HarmBench's `SemanticCategory`.
CATEGORY_FIELDS = ("category", "semanticcategory", "semantic_category")


def read_records(source: str | Path) -> list[dict]:
    """Rows of a JSON / JSONL / CSV / TSV / Parquet file, or of a hub dataset `hf:NAME[:SPLIT]`."""
    return _read_located(str(source))[0]


def _read_located(source: str) -> tuple[list[dict], list[int] | None]:
    """The rows and, for line-based files (JSONL, CSV, TSV), the file line each row ends on.

    Without line numbers (JSON, Parquet, hub) a row is named by its 1-based position.
    """
    if source.startswith(HUB_PREFIX):
        return _read_hub(source[len(HUB_PREFIX):]), None
    path = Path(source)
    if not path.is_file():
        raise AntidoteError(f"data file not found: {source}; give a JSON, JSONL, CSV, TSV or Parquet file, or hf:NAME[:SPLIT]")
    suffix = path.suffix.lower()
    lines = None
    try:
        if suffix == ".jsonl":
            rows, lines = _read_jsonl(path, source)
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):  # {"data": [...]} or {id: row}
                lists = [v for v in rows.values() if isinstance(v, list)]
                rows = lists[0] if len(lists) == 1 else list(rows.values())
        elif suffix in (".csv", ".tsv"):
            # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark that would stick to the first field
            with path.open(encoding="utf-8-sig", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows, lines = [], []
                for row in reader:
                    rows.append(row)
                    lines.append(reader.line_num)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        else:
            raise AntidoteError(
                f"unknown data format {suffix or '(no extension)'!r} for {source}; use .json, .jsonl, .csv, .tsv or .parquet"
            )
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as exc:
        raise AntidoteError(f"cannot parse {source}: {str(exc).splitlines()[0]}; check the file's format") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise AntidoteError(f"{source} does not hold a list of records (objects with named fields)")
    return rows, lines


def _read_jsonl(path: Path, source: str) -> tuple[list[dict], list[int]]:
    """One object per line; blank lines skipped. Errors name the file's line, not the line within a row."""
    rows, lines = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AntidoteError(
                    f"{source} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                    "fix that line or remove it (JSONL holds one JSON object per line)"
                ) from None
            if not isinstance(row, dict):
                raise AntidoteError(
                    f"{source} line {number}: holds {_kind(row)}, not a record; every line needs a JSON object "
                    'such as {"prompt": "...", "response": "..."}'
                )
            rows.append(row)
            lines.append(number)
    return rows, lines


def _kind(value) -> str:
    """How a JSON value reads in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def _read_hub(spec: str) -> list[dict]:
    """`NAME`, `NAME:SPLIT` or `NAME:CONFIG:SPLIT` (GSM8K needs its config, main)."""
    parts = spec.split(":")
    if not parts[0]:
        raise AntidoteError("hub source hf: names no dataset; use hf:NAME[:SPLIT], e.g. hf:PKU-Alignment/BeaverTails:30k_train")
    if len(parts) > 3:
        raise AntidoteError(f"hub source hf:{spec} has too many parts; use hf:NAME[:SPLIT] or hf:NAME:CONFIG:SPLIT")
    name, config, split = parts[0], parts[1] if len(parts) == 3 else None, parts[-1] if len(parts) > 1 else "train"
    return read_hub(name, split, config)


def read_hub(name: str, split: str = "train", config: str | None = None) -> list[dict]:
    try:
        import datasets

        return list(datasets.load_dataset(name, config, split=split))
    except Exception as exc:  # the hub raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AntidoteError(f"cannot load hub dataset {name!r} split {split!r}: {first}; give a local file instead") from None


@dataclass(frozen=True)
class Pair:
    """One row. `category`: the harm categories of a harmful prompt, when its file has them (read for the
    evaluation's and the probe's prompts); they name the row's group in reports, never what the row is, so two
    rows that differ only in them are equal."""

    prompt: str
    response: str
    input: str = ""
    category: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class PairSet:
    """Selected rows with where they came from, so reports can say exactly what was used."""

    pairs: tuple[Pair, ...]
    source: str
    indices: tuple[int, ...]  # positions in the source, after the safety filter
    fields: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def sha256(self) -> str:
        return pairs_sha256(self.pairs)

    def describe(self) -> dict:
        return {"source": self.source, "rows": len(self.pairs), "sha256": self.sha256, "fields": self.fields}

    def head(self, count: int) -> PairSet:
        """The first `count` rows, with their positions."""
        return PairSet(pairs=self.pairs[:count], source=self.source, indices=self.indices[:count], fields=self.fields)


Rows = PairSet | Sequence[Pair]


def as_pairs(rows: Rows) -> tuple[Pair, ...]:
    return rows.pairs if isinstance(rows, PairSet) else tuple(rows)


def describe_rows(rows: Rows) -> dict:
    """Source, count and content hash of rows, for reports."""
    if isinstance(rows, PairSet):
        return rows.describe()
    return {"source": "in-memory", "rows": len(rows), "sha256": pairs_sha256(rows)}


def pairs_sha256(pairs: Sequence[Pair]) -> str:
    """A hash of the rows' content; categories count where a row has them (rows without hash as they always did)."""
    payload = json.dumps([_hashed(p) for p in pairs], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _hashed(pair: Pair) -> dict:
    fields = asdict(pair)
    if not pair.category:
        del fields["category"]
    return fields


def row_categories(value) -> tuple[str, ...] | None:
    """A row's categories from its category field: a name (HarmBench, the demo), a list of names, or BeaverTails'
    object of name -> flag (the flagged names). None or an empty name: no category. None back for any other value."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if isinstance(value, int) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return tuple(name for name, flagged in value.items() if _truthy(flagged))
    return None


def _pick_field(columns: Sequence[str], explicit: str | None, candidates: Sequence[str], role: str, source: str) -> str | None:
    if explicit:
        if explicit not in columns:
            raise AntidoteError(
                f"{source} has no field {explicit!r} for the {role}; fields found: {', '.join(columns)}"
            )
        return explicit
    lowered = {c.lower(): c for c in columns}
    return next((lowered[c] for c in candidates if c in lowered), None)


def load_pairs(
    source: str | Path,
    *,
    prompt_field: str | None = None,
    response_field: str | None = None,
    input_field: str | None = None,
    safety: str | None = "unsafe",
    samples: int | None = None,
    skip: int = 0,
    seed: int | None = None,
    exclude: Sequence[int] = (),
    require_response: bool = True,
    limit: int | None = None,
    name: str = "samples",
    category_field: str | None = None,
    categories: bool = False,
) -> PairSet:
    """Pairs from `source`, schema detected unless fields are given.

    Each row's harm categories are read from `category_field` (which must exist), or, with `categories`, from
    a field of CATEGORY_FIELDS when the file has one with a category in some row.

    `safety` filters BeaverTails-style rows on `is_safe` ("unsafe" keeps harmful answers, "safe" keeps
    safe ones, None keeps all; ignored when the field is absent). Then the first `skip` rows and the
    rows in `exclude` are dropped (to stay disjoint from poison rows), the rest shuffled with `seed` if
    given, and the first `samples` kept: exactly that many, more than are left is refused (see check_samples;
    `name` is the setting that asked, for the message). `limit` is a cap instead: at most that many.
    """
    source = str(source)
    rows, lines = _read_located(source)
    if not rows:
        raise AntidoteError(f"{source} holds no rows; give a file with at least one record")
    columns = list(rows[0].keys())
    prompt_key = _pick_field(columns, prompt_field, PROMPT_FIELDS, "prompt", source)
    response_key = _pick_field(columns, response_field, RESPONSE_FIELDS, "response", source)
    input_key = _pick_field(columns, input_field, INPUT_FIELDS, "input", source)
    category_key = _pick_field(columns, category_field, CATEGORY_FIELDS if categories else (), "category", source)
    if prompt_key is None or (require_response and response_key is None):
        raise AntidoteError(
            f"{source}: cannot find prompt and response fields among {', '.join(columns)}; "
            "name them with --prompt-field and --response-field"
        )
    positions = list(range(len(rows)))  # into the file, for error messages
    if safety is not None and SAFETY_FIELD in columns:
        want_safe = {"safe": True, "unsafe": False}[safety]
        for position in positions:
            if rows[position].get(SAFETY_FIELD) is None:
                raise AntidoteError(
                    f"{_where(source, lines, position)}: field {SAFETY_FIELD!r} is missing or null; "
                    f"the first row has it, so every row needs {SAFETY_FIELD} true or false"
                )
        positions = [p for p in positions if _truthy(rows[p][SAFETY_FIELD]) == want_safe]
    excluded = set(exclude)
    indices = [i for i in range(skip, len(positions)) if i not in excluded]
    if seed is not None:
        random.Random(seed).shuffle(indices)
    if samples is not None:
        if samples <= 0:
            raise AntidoteError(f"samples must be positive, got {samples}")
        check_samples(samples, len(indices), len(rows), source, name)
    indices = indices[:min(n for n in (samples, limit, len(indices)) if n is not None)]
    if not indices:
        raise AntidoteError(
            f"{source}: no rows left after filtering (skip={skip}, excluded={len(excluded)}, safety={safety}); "
            "lower --skip or check the data"
        )
    pairs = []
    for position in (positions[i] for i in indices):
        row = rows[position]
        prompt = _text(row, prompt_key, source, lines, position)
        if require_response:
            response = _text(row, response_key, source, lines, position)
        else:  # a reader of prompts only ignores the responses, whatever they hold
            response = row.get(response_key) if response_key else None
            response = response if isinstance(response, str) else ""
        pairs.append(Pair(
            prompt=prompt,
            response=response,
            input=_text(row, input_key, source, lines, position, optional=True) if input_key else "",
            category=_categories(row, category_key, source, lines, position) if category_key else (),
        ))
    if category_key and not category_field and not any(p.category for p in pairs):
        category_key = None  # a detected field that names no category (AdvBench's empty Category column)
    fields = {"prompt": prompt_key, "response": response_key, "input": input_key}
    if category_key:
        fields["category"] = category_key
    return PairSet(pairs=tuple(pairs), source=source, indices=tuple(indices), fields=fields)


def check_samples(samples: int, left: int, total: int, source: str, name: str = "samples") -> None:
    """One rule for every row set: `samples` rows are taken, never fewer in silence; asking for more rows than the
    set has left (`left` of the `total` in `source`, after skipping, excluding and filtering) is refused."""
    if samples > left:
        has = (f"{left} left ({total - left} of its {total} rows skipped, excluded or filtered out)" if left < total
               else f"{left} rows")
        raise AntidoteError(f"{name} asks for {samples} rows but {source} has {has}; lower {name} to {left} or less, "
                            "or give more rows")


def _where(source: str, lines: list[int] | None, position: int) -> str:
    """`data.jsonl line 7` for line-based files, `data.json row 3` (1-based) otherwise."""
    return f"{source} line {lines[position]}" if lines is not None else f"{source} row {position + 1}"


def _text(row: dict, key: str, source: str, lines: list[int] | None, position: int, optional: bool = False) -> str:
    """A row's field, which must be a string: str() would silently train on "5" or "None".

    An optional field (the input) may also be missing or null, read as empty (an Alpaca row without input).
    """
    value = row.get(key)
    if isinstance(value, str) or (optional and value is None):
        return value or ""
    # CSV has no null: a None there is a cell missing from a short row
    missing = key not in row or (value is None and source.lower().endswith((".csv", ".tsv")))
    problem = "is missing" if missing else f"is {_kind(value)}"
    need = "it must be a string or null" if optional else "every row needs a string here"
    raise AntidoteError(f"{_where(source, lines, position)}: field {key!r} {problem}; {need}; fix or remove that row")


def _categories(row: dict, key: str, source: str, lines: list[int] | None, position: int) -> tuple[str, ...]:
    found = row_categories(row.get(key))
    if found is None:
        raise AntidoteError(f"{_where(source, lines, position)}: field {key!r} is {_kind(row.get(key))}; a category is "
                            "a name, a list of names or an object of name -> true/false; fix or remove that row")
    return found


def _truthy(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)
