"""The real server (`python -m aurora_sgl.launch_server`, uvicorn) as a subprocess on a free loopback
port, for tests and benchmarks. Its output goes to a log file: a pipe nobody reads fills up and
blocks the server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common.paths import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Started by the constructor with `args` after our --port/--threads/--log-level defaults; with
    `wait=False` call `wait_ready()` later (several can start at once). `stop()` ends it."""

    def __init__(
        self,
        *args: str,
        threads: int = 1,
        log_path: str | Path | None = None,
        wait: bool = True,
        startup_timeout: float = 180.0,
        env: dict | None = None,
        start_new_session: bool = False,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="aurora_server_", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        cmd = [
            sys.executable,
            "-m",
            "aurora_sgl.launch_server",
            "--port",
            str(self.port),
            "--threads",
            str(threads),
            "--log-level",
            "warning",
            *args,
        ]
        # The server imports aurora_sgl from this checkout, like the caller.
        env = dict(
            os.environ,
            **(env or {}),
            HF_HUB_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        )
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=start_new_session
        )
        self.pid = self.proc.pid
        if wait:
            self.wait_ready(startup_timeout)

    def wait_ready(self, startup_timeout: float = 180.0) -> None:
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited during startup:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {startup_timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, sig=None, timeout: float = 60.0) -> int:
        """Send `sig` (default SIGTERM) and wait; SIGKILL after `timeout`. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate() if sig is None else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
            if self._own_log:
                os.unlink(self.log_path)
        return self.proc.returncode


def owned_leftovers(pid: int) -> list[str]:
    """Shared-memory segments and trainer spec directories a server with this pid owns (named
    `<prefix>_<pid>_...`): what a SIGKILL leaves behind and the next server sweeps."""
    shm = [f"/dev/shm/{f}" for f in os.listdir("/dev/shm") if f"_{pid}_" in f]
    tmp = tempfile.gettempdir()
    return shm + [os.path.join(tmp, f) for f in os.listdir(tmp) if f.startswith(f"aurora_trainer_{pid}_")]
