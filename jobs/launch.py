"""``python -m jobs.launch <stage> [--config ...]``: a stage in several processes, under torchrun,
with the workers' exit code passed on.

torchrun exits 1 whenever a worker fails, whatever the worker's code, so a bad config or
input (65) looked like a bug: the Job's podFailurePolicy rule on 65 never matched, and a bad
input in a 2-pod gang ran 3 Jobs. The launcher runs torchrun in-process (its options come
from the PET_* variables the chart sets) and exits with the code that says what happened:
65 if any worker said bad input, else 75 if any said retry (or torchrun itself was told to
stop), else 1.
"""

from __future__ import annotations

import sys

from jobs.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRY


def exit_code_of(worker_codes: list[int]) -> int:
    """One exit code for the pod from its workers' codes."""
    failed = [code for code in worker_codes if code != EXIT_OK]
    if not failed:
        return EXIT_OK
    if EXIT_BAD_INPUT in failed:
        return EXIT_BAD_INPUT
    if EXIT_RETRY in failed:
        return EXIT_RETRY
    return 1


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["-m", "jobs", *(sys.argv[1:] if argv is None else argv)])
    except ChildFailedError as exc:
        code = exit_code_of([failure.exitcode for failure in exc.failures.values()])
        print(f"jobs.launch: workers failed; exit code {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # SIGTERM to the pod: the workers checkpoint and stop
        print(f"jobs.launch: {exc}; exit code {EXIT_RETRY}", file=sys.stderr, flush=True)
        return EXIT_RETRY
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
