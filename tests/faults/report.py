"""The table of faults the last run of the fault suite tried and what became of each:
``python -m tests.faults.report`` after ``make test`` (or ``pytest tests/faults``)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from tests.faults.conftest import RECORD


def rows() -> list[dict]:
    if not RECORD.is_file():
        sys.exit(f"{RECORD}: no record; run `pytest tests/faults` first")
    return [json.loads(line) for line in RECORD.read_text().splitlines() if line.strip()]


def table(records: list[dict]) -> str:
    """A Markdown table; the store's rows, one per fault and operation, folded into one row
    per fault with the operations it met."""
    folded: dict[tuple[str, str], list[str]] = defaultdict(list)
    lines = ["| fault | where | outcome |", "|---|---|---|"]
    for row in records:
        if row["where"].startswith("store."):
            outcome = row["outcome"]
            if outcome.startswith("exit 75:"):  # the message names a bucket of the run
                outcome = "exit 75 (TransientError naming the object)"
            folded[(row["fault"], outcome)].append(row["where"].removeprefix("store."))
        else:
            lines.append(f"| {row['fault']} | {row['where']} | {row['outcome']} |")
    store_lines = [
        f"| {fault} | store: {', '.join(where)} | {outcome} |"
        for (fault, outcome), where in folded.items()
    ]
    return "\n".join(lines[:2] + store_lines + lines[2:])


def main() -> None:
    records = rows()
    print(table(records))
    # a test writes its row only after its checks on that fault have passed
    print(f"\n{len(records)} fault checks passed (the store's folded above, one per operation).")


if __name__ == "__main__":
    main()
