"""Stage processes for the tests, forked from a warm interpreter.

A stage process spends 4-5 s of its CPU importing PyTorch, transformers' GPT-NeoX and
DeepSpeed before its first line of work (measured on the 2-core machine: a 2-step SFT
stage, 6.9 s fresh and 2.5 s forked), and the suite starts some hundred of them. So each
test worker keeps a fork server (``multiprocessing``'s, the standard library's) that has
imported those once, and ``python -m jobs STAGE ...`` is run as a fork of it: a process of
its own, with the given environment, folder, argument list, file descriptors and session,
whose exit code, signals and output are those of the fresh process (the stage code is
``jobs.__main__.main``, the container's entrypoint, unchanged). ``python -m pipeline.cli``
(`rlhf run`) runs warm the same way, and its local backend then starts each stage through
the same server: the demo pipeline, the fault suite's and the tiny recipes' are run so.

Where a fork still differs from a fresh interpreter: every fork of one server has the same
string-hash seed (a fresh process draws its own), so a test that compares two runs starts
one of them fresh (``fresh=True``: the fault suite's uninterrupted runs, a preempted run's
resumption), and output that depended on set order would differ there; numpy's global
generator is drawn anew in each fork, as in a fresh process. The child's ``sys.path`` is
the test worker's (which holds the repository, as ``python -m`` from it does), and for
``multiprocessing`` it is a forkserver child (no stage uses ``multiprocessing``).

What a fork cannot give is what the libraries read from the environment while they are
imported (thread counts, Hugging Face's folders, ``PYTHONPATH``). So a process runs warm
only when its environment differs from the server's in variables read at run time, the
ones ``RUN_TIME`` lists, in ``PYTHONUNBUFFERED`` (whose effect on the output streams the
child sets up itself), in the interpreter's own folder in front of ``PATH`` (where the
local backend puts it) and in variables the server's own start-up set where they were
unset, given the value it set (``python -m jobs``'s settings, DeepSpeed's import-time
one: a fresh process sets the same). The server starts with the worker's environment as
the test that starts it found it (tests/conftest.py restores it after every test); any
other difference, any other command, a CUDA machine (CUDA
cannot be used in a child forked after its initialisation) and
``KUBERLHF_TEST_FRESH_PROCESSES=1`` start a fresh interpreter with ``subprocess``, as
before; so does Python 3.13, whose fork server drops the ``atexit`` handlers the preloaded
libraries registered. ``tests/integration/test_warm.py`` shows the two give the same stage
outputs.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import reduction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Read when the stage runs, not when a library is imported: the store's S3 settings
# (botocore reads them per client), the stage's own settings (jobs reads none at import),
# the trackers' (MLflow and W&B are imported by their sinks, never by the server), pytest's
# note of the running test, the tokenizers library's thread switch (its Rust side reads
# the variable each time it decides, from the process's environment, which the child sets)
# and inductor's cache folder and pointer note (read when it compiles, which the server
# never does; inductor sets them in the process that compiled, a test worker among them).
RUN_TIME = (
    "KUBERLHF_",
    "AWS_",
    "MLFLOW_",
    "WANDB_",
    "PYTEST_CURRENT_TEST",
    "TOKENIZERS_PARALLELISM",
    "TORCHINDUCTOR_CACHE_DIR",
    "_TORCHINDUCTOR_",
)
# What the warm processes are: the container's entrypoint, and the submitter (whose local
# backend then starts its stages warm as well).
MODULES = ("jobs", "pipeline.cli")

# The worker's environment between tests (tests/conftest.py's fixture tells it), until the
# server starts with it: not as the test that starts it has changed it
_between_tests = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
_server_env: dict[str, str] | None = None  # what the server started with
# and what it runs with once started: ``python -m jobs``'s own settings and the variables
# its imports set (DeepSpeed's PYTORCH_NVML_BASED_CUDA_CHECK), all where they are unset
_server_started: dict[str, str] = {}
_lock = threading.Lock()
_forked = False  # a process has started warm: from then on a failed start is a failure
_refused: str | None = None  # why this worker's server could not serve: stages start fresh
_in_fork = False  # this process is itself a warm one (`rlhf run`), served by its server


def preload() -> None:
    """In the server, once: what ``python -m jobs`` sets before any import, by its own
    functions, then the imports every stage pays for."""
    from jobs.__main__ import configure_cuda_allocator, quiet_libraries

    configure_cuda_allocator()
    quiet_libraries()

    import torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: F401

    from jobs.engine import import_deepspeed
    from jobs.stages import STAGES

    import_deepspeed()
    for module in STAGES.values():
        importlib.import_module(module)

    # nothing buffered here may reach a child's output
    sys.stdout.flush()
    sys.stderr.flush()
    report = Path(os.environ["KUBERLHF_WARM_SERVER_REPORT"])
    report.with_suffix(".tmp").write_text(json.dumps(dict(os.environ)))
    report.with_suffix(".tmp").replace(report)
    # forking is safe only from a process of one thread: a thread an import started would
    # be missing in every child, with whatever lock it held
    threads = len(os.listdir("/proc/self/task"))
    if threading.active_count() != 1 or threads != 1:
        # (PyTorch starts its OpenMP pool while it is imported unless OMP_NUM_THREADS=1,
        # the suite's setting on two cores): the server leaves, and stages start fresh
        raise SystemExit(f"the warm stage server runs {threads} threads; it forks with one only")


if os.environ.get("KUBERLHF_WARM_SERVER") == "1" and multiprocessing.parent_process() is None:
    preload()  # imported by the fork server (its environment names it), not by a test


class _Fd:
    """A file descriptor handed to the child through the fork server's socket."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self):
        return _detach, (reduction.DupFd(self.fd),)


def _detach(duplicate) -> int:
    return duplicate.detach()


def _child(module, argv, env, cwd, fds, new_session, server_env, started) -> None:
    """The process, in the fork: as ``python -m MODULE ...`` would start it."""
    import fcntl

    if new_session:  # before anything else: the caller may signal the group at once
        os.setsid()

    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]  # clear of 0-2 before the moves
    for fd in fds:
        os.close(fd)
    for target, fd in enumerate(high):
        os.dup2(fd, target)
        os.close(fd)
    if env.get("PYTHONUNBUFFERED"):
        # as near ``-u`` as the same stream objects go (handlers made at import hold them:
        # DeepSpeed's logger's): each line written out as it ends (a partial line waits for
        # its end, which under ``-u`` it would not)
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True, write_through=True)
    else:
        # as the interpreter sets it up: stdout line-buffered only to a terminal
        sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "numpy" in sys.modules:  # a fresh process seeds numpy's global generator anew
        sys.modules["numpy"].random.seed()
    if module == "pipeline.cli":
        _serve_stages(server_env, started)
    entry = importlib.import_module("jobs.__main__" if module == "jobs" else module)
    sys.argv = [entry.__file__, *argv]
    try:
        code = entry.main(argv)
    finally:
        # what the interpreter does on its way out, in its order: join the threads that are
        # not daemons, then run the exit handlers
        threading._shutdown()
        atexit._run_exitfuncs()
    sys.exit(code)


def _serve_stages(server_env: dict[str, str], started: dict[str, str]) -> None:
    """In a warm ``rlhf run``: its local backend starts each stage with ``run`` below, so
    through the server that forked this process (whose address and liveness pipe it holds
    already), compared with that server's environment."""
    global _server_env, _server_started, _forked, _in_fork
    _server_env, _server_started, _forked, _in_fork = server_env, started, True, True
    # multiprocessing would start a server of its own here, since it knows the one that
    # forked this process by its address only: that one serves
    multiprocessing.forkserver._forkserver.ensure_running = lambda: None
    import pipeline.backends.local as local

    local.LocalBackend = functools.partial(local.LocalBackend, runner=run)


def _server_alive() -> bool:
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    if pid is None:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return False


def _context():
    """The fork server, started on first use with the worker's environment between tests."""
    global _server_env
    context = multiprocessing.get_context("forkserver")
    if _in_fork:
        return context
    with _lock:
        if _server_env is not None and not _server_alive():
            # multiprocessing would start another, silently, without the preload and with
            # this moment's environment: a failure to see instead
            raise RuntimeError("the warm stage server has died; see the worker's stderr")
        if _server_env is None:
            # not as the test that happens to start the server has changed it (a variable
            # it set would make every later test's processes differ from the server's, and
            # start fresh)
            _server_env = dict(_between_tests)
            context.set_forkserver_preload(["tests.warm"])
            saved, cwd = dict(os.environ), os.getcwd()
            report = Path(tempfile.gettempdir()) / f"kuberlhf-warm-{os.getpid()}.json"
            report.unlink(missing_ok=True)
            set_environment(
                {
                    **_server_env,
                    "KUBERLHF_WARM_SERVER": "1",
                    "KUBERLHF_WARM_SERVER_REPORT": str(report),
                }
            )
            os.chdir(ROOT)  # where the server finds the tests package
            try:
                multiprocessing.forkserver.ensure_running()
            finally:
                os.chdir(cwd)
                set_environment(saved)
            # its environment once its imports are done (a server that refused to serve
            # writes none: the first start then fails, and stages start fresh)
            while not report.exists() and _server_alive():
                time.sleep(0.05)
            if report.exists():
                _server_started.update(json.loads(report.read_text()))
                report.unlink()
    return context


def between_tests(env: dict[str, str]) -> None:
    """The worker's environment as a test found it (the server, not started yet, will
    start with it)."""
    global _between_tests
    if _server_env is None:
        _between_tests = {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


def set_environment(env: dict[str, str]) -> None:
    """``os.environ`` made ``env``: what it lacks removed, the rest set."""
    for name in os.environ.keys() - env.keys():
        del os.environ[name]
    os.environ.update(env)


def available(env: dict[str, str] | None = None) -> bool:
    """Whether stages may run warm here: not where CUDA is (the GPU suite starts each
    stage fresh), not under Python 3.13 or later (its fork server clears the exit handlers
    the preload registered), nor when ``KUBERLHF_TEST_FRESH_PROCESSES=1`` (in the process's
    environment or this one's) asks for fresh ones."""
    if "1" in (
        os.environ.get("KUBERLHF_TEST_FRESH_PROCESSES"),
        (env or {}).get("KUBERLHF_TEST_FRESH_PROCESSES"),
    ):
        return False
    if sys.version_info >= (3, 13):
        return False
    import torch

    return not torch.cuda.is_available()


def _own_path(path: str | None) -> list[str]:
    """PATH without the interpreter's own folder in front, which the local backend puts
    there so that ``python`` is this one. The preload's imports look no program up on PATH
    (checked with an audit hook and ``shutil.which`` watched: under 3.12 they run
    ``/sbin/ldconfig`` by its full path, and nothing else)."""
    entries = (path or "").split(os.pathsep)
    own = str(Path(sys.executable).parent)
    while entries and entries[0] == own:
        entries.pop(0)
    return entries


def _warm_command(args: list[str], env: dict[str, str]) -> tuple[str, list[str]] | None:
    """The module and its arguments when ``args`` may run warm in ``env``, else None."""
    if len(args) < 3 or args[1] != "-m" or args[2] not in MODULES or not available(env):
        return None
    # this venv's interpreter itself, by any of its names there (``python``,
    # ``python3.11``), not a link's target elsewhere: the bare Python, without the venv
    python = shutil.which(args[0], path=env.get("PATH"))
    ours = os.path.abspath(sys.executable)
    if python is None or os.path.dirname(os.path.abspath(python)) != os.path.dirname(ours):
        return None
    if not os.path.samefile(python, ours):
        return None
    server = _between_tests if _server_env is None else _server_env
    changed = {k for k in env.keys() | server.keys() if env.get(k) != server.get(k)}
    if _own_path(env.get("PATH")) == _own_path(server.get("PATH")):
        changed.discard("PATH")
    changed.discard("PYTHONUNBUFFERED")  # the child sets its output up as ``-u`` does
    # set by the server's start-up where it was unset, as a fresh process's start-up sets
    # it: the same whether the process is given that value or none
    changed -= {
        name
        for name, value in _server_started.items()
        if name not in server and env.get(name, value) == value
    }
    if any(not name.startswith(RUN_TIME) for name in changed):
        return None
    return args[2], [str(a) for a in args[3:]]


def _fileno(stream, default: int) -> int:
    if stream is None:
        return default
    return stream if isinstance(stream, int) else stream.fileno()


class WarmProcess:
    """The part of ``subprocess.Popen`` the tests use, for a stage forked warm."""

    def __init__(self, args, command, env, cwd, stdout, stderr, text, start_new_session):
        self.args, self.returncode = args, None
        self.stdout = self.stderr = None
        readers, child_fds, ours = [], [], []
        for which, stream in (("stdout", stdout), ("stderr", stderr)):
            if stream == subprocess.PIPE:
                read, write = os.pipe()
                readers.append((which, read))
                child_fds.append(write)
                ours.append(write)
            elif stream == subprocess.STDOUT:
                child_fds.append(child_fds[0])
            else:
                child_fds.append(_fileno(stream, 1 if which == "stdout" else 2))
        devnull = os.open(os.devnull, os.O_RDONLY)
        ours.append(devnull)
        fds = [devnull, *child_fds]
        context = _context()  # which sets the server's environment on its first start
        self.process = context.Process(
            target=_child,
            args=(
                *command,
                dict(env),
                str(cwd or os.getcwd()),
                [_Fd(fd) for fd in fds],
                start_new_session,
                _server_env,
                _server_started,
            ),
        )
        try:
            self.process.start()
        except BaseException:
            for _, read in readers:
                os.close(read)
            raise
        finally:
            for fd in ours:  # the child has its copies
                os.close(fd)
        # as for a subprocess child, the worker does not wait for it when it exits
        multiprocessing.process._children.discard(self.process)
        for which, read in readers:
            setattr(self, which, open(read, "r" if text else "rb"))  # noqa: SIM115
        self.pid = self.process.pid
        if start_new_session:  # its own group before the caller may signal it
            with contextlib.suppress(ProcessLookupError):  # or it has ended already
                while os.getpgid(self.pid) != self.pid:
                    time.sleep(0.001)

    def poll(self) -> int | None:
        if self.returncode is None and not self.process.is_alive():
            self.process.join()
            if self.process.exitcode == 255 and not _in_fork and not _server_alive():
                # the server's end of the status pipe closed: no exit code came back
                raise RuntimeError(f"the warm stage server died while {self.args} ran")
            self.returncode = self.process.exitcode
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):
        """Both pipes read to their end (a thread each, so neither fills), then the exit."""
        results: dict[str, object] = {}
        deadline = None if timeout is None else time.monotonic() + timeout

        def drain(which: str) -> None:
            stream = getattr(self, which)
            results[which] = stream.read()
            stream.close()

        threads = [
            threading.Thread(target=drain, args=(w,), daemon=True)
            for w in ("stdout", "stderr")
            if getattr(self, w) is not None and not getattr(self, w).closed
        ]
        for thread in threads:
            thread.start()
        self.wait(timeout)
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # a grandchild keeps the pipe open
                raise subprocess.TimeoutExpired(self.args, timeout)
        return results.get("stdout"), results.get("stderr")

    def send_signal(self, sig: int) -> None:
        # the server reaps the child at once: one that just ended is gone, not a zombie
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def Popen(
    args,
    *,
    env=None,
    cwd=None,
    stdout=None,
    stderr=None,
    text=False,
    start_new_session=False,
    fresh=False,
):
    """``subprocess.Popen``, forked warm where that gives the same process (``fresh``: a
    fresh interpreter in any case)."""
    global _forked, _refused
    env = dict(os.environ if env is None else env)
    command = None if fresh else _warm_command(list(args), env)
    if command is not None and _refused is None:
        try:
            process = WarmProcess(args, command, env, cwd, stdout, stderr, text, start_new_session)
        except (EOFError, ConnectionError) as exc:
            if _forked:  # it served, then died: not to be passed over
                raise RuntimeError("the warm stage server has died; see its stderr") from exc
            _refused = "the warm stage server did not start (its reason is on stderr)"
            print(f"tests/warm.py: {_refused}; stages start fresh", file=sys.stderr)
        else:
            _forked = True
            _note("warm", args, env)
            return process
    _note("fresh", args, env)
    return subprocess.Popen(
        args,
        env=env,
        cwd=cwd,
        stdout=stdout,
        stderr=stderr,
        text=text,
        start_new_session=start_new_session,
    )


def _note(kind: str, args, env: dict[str, str]) -> None:
    """One line for each process started, in the file ``KUBERLHF_TEST_WARM_LOG`` names, so
    that a test can see how the processes of another (a warm ``rlhf run``) started."""
    if log := env.get("KUBERLHF_TEST_WARM_LOG"):
        with open(log, "a") as out:
            out.write(f"{kind} {' '.join(str(a) for a in args[1:])}\n")


def refused() -> str | None:
    """Why this worker's warm server could not serve, if it could not."""
    return _refused


def run(args, *, env=None, cwd=None, capture_output=False, text=False, timeout=None, fresh=False):
    """``subprocess.run``, forked warm where that gives the same process."""
    pipe = subprocess.PIPE if capture_output else None
    process = Popen(args, env=env, cwd=cwd, stdout=pipe, stderr=pipe, text=text, fresh=fresh)
    try:
        out, err = process.communicate(timeout=timeout)
    except BaseException:  # as subprocess.run: a timeout, an interrupt, an error
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(args, process.poll(), out, err)
