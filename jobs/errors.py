"""The two kinds of failure a stage reports, and the exit codes Kubernetes acts on.

A podFailurePolicy fails the Job at once on ``EXIT_BAD_INPUT`` (retrying a bad
config cannot help) and lets ``EXIT_RETRY`` count against backoffLimit (a
flaky endpoint, a preemption after a checkpoint). The numbers follow
sysexits.h: EX_DATAERR and EX_TEMPFAIL.
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 65
EXIT_RETRY = 75


class StageError(Exception):
    """An error meant for a person: one line that says what and where."""

    exit_code = 1


class BadInputError(StageError):
    """Bad config or bad input: the user's to fix, never retried."""

    exit_code = EXIT_BAD_INPUT


class TransientError(StageError):
    """Worth retrying as it is: the network, a throttled endpoint."""

    exit_code = EXIT_RETRY


class Preempted(StageError):
    """SIGTERM arrived; a checkpoint was saved and the restarted pod resumes from it."""

    exit_code = EXIT_RETRY
