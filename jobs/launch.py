"""``python -m jobs.launch <stage> [--config ...]``: a stage in several processes, under torchrun,
with the workers' exit code passed on.

torchrun exits 1 whenever a worker fails, whatever the worker's code, so a bad config or
input (65) looked like a bug: the Job's podFailurePolicy rule on 65 never matched, and a bad
input in a 2-pod gang ran 3 Jobs. The launcher runs torchrun in-process (its options come
from the PET_* variables the chart sets) and exits with the code that says what happened:
65 if any worker said bad input, else 75 if any said retry (or torchrun itself was told to
stop), else 1.

A worker that ends with a code of its own also writes it to a file (``WORKER_EXITS``): in a
gang, another pod's workers can fail first (their peer's connection dropped), the Job
controller then stops this pod while torchrun is still stopping its other workers, and the
signal would otherwise hide this pod's 65 behind a 75.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

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


WORKER_EXITS = "KUBERLHF_WORKER_EXITS"  # the folder where workers leave their exit codes


def record_exit(code: int) -> None:
    """A worker's exit code, for the launcher that started it (none: nothing to do)."""
    folder = os.environ.get(WORKER_EXITS)
    if folder and code != EXIT_OK:
        name = f"rank-{os.environ.get('RANK', '0')}"
        Path(folder, f".{name}").write_text(str(code))
        os.replace(Path(folder, f".{name}"), Path(folder, name))  # whole, or not there


def recorded_exits(folder: str) -> list[int]:
    return [int(path.read_text()) for path in Path(folder).glob("rank-*")]


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    exits = os.environ.setdefault(WORKER_EXITS, tempfile.mkdtemp(prefix="kuberlhf-exits-"))
    try:
        torchrun(["-m", "jobs", *(sys.argv[1:] if argv is None else argv)])
    except ChildFailedError as exc:
        code = exit_code_of([failure.exitcode for failure in exc.failures.values()])
        print(f"jobs.launch: workers failed; exit code {code}", file=sys.stderr, flush=True)
        return code
    except SignalException as exc:  # SIGTERM to the pod: the workers checkpoint and stop
        bad = EXIT_BAD_INPUT in recorded_exits(exits)  # unless one had already said bad input
        code = EXIT_BAD_INPUT if bad else EXIT_RETRY
        print(f"jobs.launch: {exc}; exit code {code}", file=sys.stderr, flush=True)
        return code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
