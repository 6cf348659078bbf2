"""Stopping is clean: SIGTERM and SIGINT end a stage within seconds with one line (exit 143 and
130), SIGKILL takes the stage's own Prefect server with it, `python -m flows.server CMD` (what
`prunekit run` is) passes the signal on to CMD's process group and stops its server after, and
every server the project starts listens on loopback only.

The stage is the real command (`prunekit stage check` through `flows.cli.main`, with its real
Prefect server and flow run) whose work is replaced by a sleep, so that a signal finds it inside
its flow run; benchmarks/kill_resume.py and tests/test_kill_resume.py kill real work.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, tiny_params

pytestmark = [pytest.mark.pipeline,  # Prefect servers and flow runs
              pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="reads /proc; the server's parent-death signal is Linux's")]

SLEEPING_STAGE = """
import signal, sys, time
# as a terminal starts it: a pytest-xdist worker ignores SIGINT, and a child inherits that
signal.signal(signal.SIGINT, signal.default_int_handler)
import stages.check
def run(params, step):
    sys.stdout.write("in the flow run\\n")  # not print: the flow sends prints to its log
    sys.stdout.flush()
    time.sleep(120)
stages.check.run = run
from flows.cli import main
sys.exit(main(["stage", "check"]))
"""


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # the stage starts its own
    return dict(env, PREFECT_HOME=str(tmp / ".prefect"), PYTHONPATH=str(ROOT))


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_gone(pid: int, seconds: float = 15) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of sockets listening on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def _start_stage(tmp: Path, tiny_models) -> tuple[subprocess.Popen, int]:
    """The sleeping stage, once it is inside its flow run; and its Prefect server's pid."""
    (tmp / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_models["llama"])))
    proc = subprocess.Popen([sys.executable, "-c", SLEEPING_STAGE], cwd=tmp, env=_env(tmp), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "in the flow run", proc.stderr.read()[-2000:]
    children = _children(proc.pid)
    # one child, the server the stage started: not also Prefect's temporary one (uvicorn)
    assert len(children) == 1 and _cmdline(children[0])[1:4] == ["-m", "prefect", "server"], \
        [" ".join(_cmdline(pid)) for pid in children]
    return proc, children[0]


def test_the_stage_server_listens_on_loopback_and_dies_with_a_killed_stage(tmp_path, tiny_models):
    proc, server = _start_stage(tmp_path, tiny_models)
    args = _cmdline(server)
    port = int(args[args.index("--port") + 1])
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert _listening(port) == ["0100007F"]  # 127.0.0.1, and on no other address
    proc.kill()  # SIGKILL: no handler runs in the stage
    proc.wait(timeout=10)
    assert _wait_gone(server), f"the Prefect server {server} outlived the killed stage"


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_a_stage_with_one_line(tmp_path, tiny_models, signum, code):
    proc, server = _start_stage(tmp_path, tiny_models)
    started = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=90)
    seconds = time.monotonic() - started
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == code, stderr[-2000:]
    assert errors == [f"error: stopped by {signal.Signals(signum).name} before the end; run the command again "
                      f"(or `dvc repro`) to finish"], stderr[-2000:]
    assert "Traceback" not in stderr
    assert seconds < 30, f"{seconds:.1f} s to stop"  # about 2 s on an idle 2-core machine; the suite loads it
    assert _wait_gone(server)
    assert not (tmp_path / "data" / "params.checked").exists()  # the stage did not get to write


def test_the_server_command_passes_a_signal_on_and_stops_its_server(tmp_path):
    """`python -m flows.server CMD` (prunekit run = CMD dvc repro): SIGTERM reaches CMD's whole
    process group (dvc and the stage it runs), then the server is stopped."""
    child = "import os, sys, time; print(os.getpid(), flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-m", "flows.server", sys.executable, "-c", child], cwd=tmp_path,
                            env=_env(tmp_path), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command = int(proc.stdout.readline())
    server = next(pid for pid in _children(proc.pid) if "server" in _cmdline(pid))
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 143  # the command's status: killed by SIGTERM
    assert _wait_gone(command) and _wait_gone(server)
