"""Near-duplicate removal at cosine >= 0.5 on 10k and 100k synthetic rows.

A method whose cost grows near-linearly takes about 10x longer on 10x the rows;
comparing all pairs would take 100x. Run: ``python -m bench.dedup``.
"""

from __future__ import annotations

import argparse
import random
import time

from bench.common import report
from jobs.data.filters import near_duplicates


def synthetic_rows(n: int, seed: int = 0, duplicate_share: float = 0.2) -> list[str]:
    """Sentences over a 20k-word vocabulary; a share of them are lightly edited copies."""
    rng = random.Random(seed)
    vocabulary = [
        f"{rng.choice('bcdfghjklmnprstvz')}{rng.choice('aeiou')}"
        f"{rng.choice('bcdfghjklmnprstvz')}{rng.choice('aeiou')}{i}"
        for i in range(20000)
    ]
    rows: list[str] = []
    for _ in range(n):
        if rows and rng.random() < duplicate_share:
            words = rng.choice(rows).split()
            for _ in range(2):
                words[rng.randrange(len(words))] = rng.choice(vocabulary)
            rows.append(" ".join(words))
        else:
            rows.append(" ".join(rng.choices(vocabulary, k=rng.randint(12, 40))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    figures: dict = {"threshold": 0.5, "runs": []}
    for n in args.sizes:
        rows = synthetic_rows(n)
        started = time.perf_counter()
        dropped = near_duplicates(rows, 0.5)
        seconds = time.perf_counter() - started
        figures["runs"].append({"rows": n, "seconds": round(seconds, 3), "dropped": sum(dropped)})
        print(f"{n:>7} rows: {seconds:7.2f} s, {sum(dropped)} near-duplicates dropped", flush=True)
    if len(figures["runs"]) >= 2:
        small, large = figures["runs"][0], figures["runs"][-1]
        figures["size_ratio"] = large["rows"] / small["rows"]
        figures["time_ratio"] = round(large["seconds"] / small["seconds"], 2)
        print(
            f"time ratio {figures['time_ratio']} for {figures['size_ratio']:.0f}x the rows "
            f"(linear: {figures['size_ratio']:.0f}, quadratic: {figures['size_ratio'] ** 2:.0f})"
        )
    report("dedup", figures)


if __name__ == "__main__":
    main()
