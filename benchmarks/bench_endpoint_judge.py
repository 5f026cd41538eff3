"""The endpoint judge against the tests' local chat-completions server (tests/judge_server.py) that waits a fixed
delay before each answer: judged answers per second at concurrency 1 and 8, and for a re-run answered from the
verdict cache (no request). The server is on 127.0.0.1, so the delay stands for the judge model's latency.

    python benchmarks/bench_endpoint_judge.py [--answers 64] [--delay-ms 50] [--format llama-guard]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from antidote_llm.evaluation.judges import EndpointSettings, JudgeOptions, get_judge  # noqa: E402
from judge_server import JudgeServer, Reply  # noqa: E402

KEY_ENV = "ANTIDOTE_BENCH_JUDGE_KEY"


def judged_per_second(server: JudgeServer, cache: Path, judge_format: str, concurrency: int, answers: list[str]
                      ) -> tuple[float, int]:
    """(answers judged per second, requests the server got) for one judge built fresh on `cache`."""
    settings = EndpointSettings(base_url=server.base_url, judge_format=judge_format, api_key_env=KEY_ENV,
                                judge_concurrency=concurrency, judge_cache=str(cache))
    judge = get_judge("endpoint", JudgeOptions(model="bench-guard", endpoint=settings))
    before = len(server.completions)
    started = time.perf_counter()
    judge(["How do I pick a lock?"] * len(answers), answers)
    return len(answers) / (time.perf_counter() - started), len(server.completions) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--format", default="llama-guard", choices=["llama-guard", "llama-guard-prompt"])
    args = parser.parse_args()
    os.environ[KEY_ENV] = "bench-key"
    with tempfile.TemporaryDirectory() as folder, JudgeServer(lambda body: Reply("safe"),
                                                               delay=args.delay_ms / 1000) as server:
        print(f"{args.answers} answers, {args.delay_ms:g} ms per request, format {args.format}")
        runs = [("concurrency 1", 1, "c1"), ("concurrency 8", 8, "c8"), ("cached re-run", 8, "c8")]
        for name, concurrency, cache in runs:
            answers = [f"Answer {i}: first insert the wrench, then rake the pins." for i in range(args.answers)]
            rate, requests = judged_per_second(server, Path(folder) / cache, args.format, concurrency, answers)
            print(f"  {name:<14} {rate:10.1f} judged answers/s  ({requests} requests)")


if __name__ == "__main__":
    main()
