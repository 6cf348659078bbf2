"""Run a command with one loopback Prefect server shared by all its processes.

Without PREFECT_API_URL every Python process that runs a flow starts its own temporary server
(~10 s each here); `dvc repro` starts one process per stage. This starts one server on
127.0.0.1 (state under PREFECT_HOME inside the project, telemetry off), runs the command with
PREFECT_API_URL pointing at it, and stops the server afterwards. Where PREFECT_API_URL is set
already (a team's server), the commands use that one.

The server goes when its user goes: on Linux it gets SIGTERM from the kernel when the process
that started it dies, however it dies (SIGKILL included), so no server outlives a killed
stage. SIGTERM or Ctrl-C to `prunekit run` reaches dvc and the stage it runs (their own process
group), which end with one line; the server is stopped after them.

    prunekit run                        # = python -m flows.server dvc repro
    python -m flows.server prunekit flow
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path


def offline_env(base: dict | None = None) -> dict:
    """Environment for quiet, offline Prefect: state in the project, no analytics."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))  # the project the command runs in
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Run by the server's interpreter before Prefect: ask the kernel for SIGTERM when the parent
# dies (PR_SET_PDEATHSIG = 1; kept across exec), leave if it is already gone, then become
# `prefect server start`. Not a preexec_fn: that is unsafe in a process with threads.
_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != parent:
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "prefect", *sys.argv[2:]])
"""


@contextmanager
def prefect_server(timeout: float = 60.0) -> Iterator[str]:
    """Start `prefect server start` on a free loopback port; yield its API URL. The server
    stops when the block ends and, on Linux, when this process dies without ending it (the
    kernel's signal follows the thread that started it: enter the block from a thread that
    outlives it, such as the main thread)."""
    port = _free_port()
    env = offline_env()
    Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    log = open(Path(env["PREFECT_HOME"]) / "server.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), "server", "start", "--host", "127.0.0.1",
         "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server did not start; see {log.name}") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    return run_commands([argv])


def run_commands(commands: list[list[str]]) -> int:
    """Run the commands one after another under one loopback server; stop at the first that
    fails and return its exit status (0 when all succeed)."""
    env = offline_env()
    # this environment's dvc and prunekit (what dvc.yaml's stages call), also when its bin is not on PATH
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    for program in {argv[0] for argv in commands}:
        if shutil.which(program, path=env["PATH"]) is None:
            print(f"error: {program} not found (install the project: bash scripts/setup)", file=sys.stderr)
            return 2
    with ExitStack() as stack:
        if not env.get("PREFECT_API_URL"):  # else the server it names (a team's, or a test's)
            started = time.monotonic()
            env["PREFECT_API_URL"] = stack.enter_context(prefect_server())
            print(f"prefect server at {env['PREFECT_API_URL']} (started in {time.monotonic() - started:.1f} s)",
                  file=sys.stderr)
        for argv in commands:
            code = run_forwarding_signals(argv, env)
            if code != 0:
                return code
    return 0


def run_forwarding_signals(argv: list[str], env: dict) -> int:
    """Run argv in its own process group and wait for it; SIGINT and SIGTERM sent here go to
    that whole group (dvc and the stage it runs), so the command stops as it would at a
    terminal, and this returns its exit status after it has."""
    proc = subprocess.Popen(argv, env=env, start_new_session=True)

    def forward(signum, frame):
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


@contextmanager
def api_server() -> Iterator[None]:
    """The Prefect API for this process's flows: the one PREFECT_API_URL names (`prunekit run`
    sets it), else a loopback server of its own for the duration of the block (instead of
    Prefect's temporary one, which outlives a killed process and dies on Ctrl-C before the
    flow can report it)."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    # Prefect read its settings when it was imported: the URL goes into its settings context
    # (for this process) and the environment (for the processes a task runner starts).
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        os.environ["PREFECT_API_URL"] = url
        try:
            yield
        finally:
            del os.environ["PREFECT_API_URL"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
