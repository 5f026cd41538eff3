"""Agreement of the offline judges (`refusal`, the default, and `gcg`, GCG's verbatim list) with labelled
answers: accuracy, and precision / recall / F1 of the harmful class, per source and over all rows.

Labelled rows, from what can be found:
  dev          benchmarks/judge_cases.jsonl, set "dev": hand-written answers in the styles of real models,
               both kinds (refusals after a warning, "As an AI, I cannot ...", compliance that mentions
               illegality or says "I cannot guarantee" later, safe answers with no refusal phrase),
               written alongside the default judge's phrase list: its numbers are optimistic.
  holdout      set "holdout": a second batch in other models' styles, written before it was first
               measured (some phrases were added after; see NOTES-judges.md for the blind numbers).
  beavertails  shared/data/harmful/beavertails_unsafe_pairs.json: BeaverTails responses that human
               annotators labelled harmful (all harmful).
  refusals     shared/data/safety/refusals_adv_training.csv `Safe_Response`: refusals of a safety-tuned
               model (all not harmful); rows that open with "Sure" or "Of course" are compliance with a
               copyright request that the file calls safe, which no refusal judge can tell; left out.
A missing shared file is skipped with a note.

    python benchmarks/judge_agreement.py [--show-errors]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from antidote_llm.evaluation.judges import get_judge

HERE = Path(__file__).resolve().parent
CASES = HERE / "judge_cases.jsonl"
SHARED = HERE.parents[1] / "shared" / "data"
BEAVERTAILS = SHARED / "harmful" / "beavertails_unsafe_pairs.json"
REFUSALS = SHARED / "safety" / "refusals_adv_training.csv"
JUDGE_NAMES = ("refusal", "gcg")


def labelled_rows() -> dict[str, list[tuple[str, bool]]]:
    """(answer, harmful) rows per source; sources whose file is absent are left out with a note."""
    sources: dict[str, list[tuple[str, bool]]] = {}
    with CASES.open(encoding="utf-8") as handle:
        cases = [json.loads(line) for line in handle if line.strip()]
    for name in ("dev", "holdout"):
        sources[name] = [(row["answer"], row["harmful"]) for row in cases if row["set"] == name]
    if BEAVERTAILS.is_file():
        rows = json.loads(BEAVERTAILS.read_text(encoding="utf-8"))
        sources["beavertails"] = [(row["response"], True) for row in rows]
    else:
        print(f"note: {BEAVERTAILS} not found; skipped")
    if REFUSALS.is_file():
        with REFUSALS.open(encoding="utf-8", newline="") as handle:
            answers = [row["Safe_Response"] for row in csv.DictReader(handle)]
        sources["refusals"] = [(a, False) for a in answers if not a.startswith(("Sure", "Of course"))]
    else:
        print(f"note: {REFUSALS} not found; skipped")
    return sources


def agreement(predicted: list[bool], labels: list[bool]) -> dict:
    tp = sum(p and y for p, y in zip(predicted, labels, strict=True))
    fp = sum(p and not y for p, y in zip(predicted, labels, strict=True))
    fn = sum(not p and y for p, y in zip(predicted, labels, strict=True))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else None
    correct = sum(p == y for p, y in zip(predicted, labels, strict=True))
    return {"rows": len(labels), "agreement": correct / len(labels), "precision": precision, "recall": recall,
            "f1": f1, "false_harmful": fp, "missed_harmful": fn}


def _fmt(value) -> str:
    return "  n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show-errors", action="store_true", help="print every answer a judge gets wrong")
    args = parser.parse_args()
    sources = labelled_rows()
    sources["all"] = [row for rows in list(sources.values()) for row in rows]
    judges = {name: get_judge(name) for name in JUDGE_NAMES}
    print(f"{'source':<12} {'judge':<8} {'rows':>5} {'harmful':>7} {'agree':>6} {'prec':>6} {'recall':>6} "
          f"{'f1':>6} {'false+':>6} {'missed':>6}")
    for source, rows in sources.items():
        answers, labels = [a for a, _ in rows], [y for _, y in rows]
        for name, judge in judges.items():
            predicted = [v.harmful for v in judge(["-"] * len(answers), answers)]
            m = agreement(predicted, labels)
            print(f"{source:<12} {name:<8} {m['rows']:>5} {sum(labels):>7} {_fmt(m['agreement']):>6} "
                  f"{_fmt(m['precision']):>6} {_fmt(m['recall']):>6} {_fmt(m['f1']):>6} {m['false_harmful']:>6} "
                  f"{m['missed_harmful']:>6}")
            if args.show_errors and source != "all":
                for answer, p, y in zip(answers, predicted, labels, strict=True):
                    if p != y:
                        print(f"    [{name} says {'harmful' if p else 'refusal'}] {answer[:160]!r}")


if __name__ == "__main__":
    main()
