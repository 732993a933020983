"""Real `integrations-service` processes for the integration tests.

`Processes` starts the console script next to this interpreter in a working
directory of the test's choosing, with a clean environment, waits until
`grpc.health.v1.Health/Check` answers SERVING (failing with the process's
stderr if it dies first), and always stops what it started: SIGTERM, then
SIGKILL if that does not end it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from integrations_service.domain.registry import all_env_vars

BIN = Path(sys.executable).parent
SERVICE = BIN / "integrations-service"
GRPCURL = BIN / "grpcurl"

START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def clean_env(extra: Mapping[str, str] = ()) -> dict[str, str]:  # type: ignore[assignment]
    """os.environ without the service's settings or provider fallbacks, plus `extra`."""
    provider_vars = set(all_env_vars())
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("INTEGRATION") and name != "DATABASE_URL" and name not in provider_vars
    }
    # Many servers run at once in the suite: none of them takes the default metrics port.
    env["INTEGRATIONS_METRICS_ADDRESS"] = ""
    env.update(extra)
    return env


def own_store_location(store_location: tuple[str, str], request: pytest.FixtureRequest) -> tuple[str, str]:
    """`store_location`, but for PostgreSQL a fresh database of the test's own.

    The service checks its keys against those recorded in the store at start-up,
    so a process with a key of its own (a generated development key, a planted
    one) cannot share this run's database with the tests that use TEST_KEY.
    Call from a sync fixture: the factory is the conftest's, which drops the
    database at the end of the run; its coroutine runs on a thread of its own,
    away from the session's event loop.
    """
    kind, where = store_location
    if kind != "postgres":
        return kind, where
    create = request.getfixturevalue("postgres_database_factory")
    with ThreadPoolExecutor(max_workers=1) as pool:
        return kind, str(pool.submit(asyncio.run, create()).result(timeout=60))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(
    args: Sequence[str], cwd: Path, env: Mapping[str, str], timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run `integrations-service <args>` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [str(SERVICE), *args],
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""


def scrape(address: str) -> str:
    """The text of http://<address>/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


class ServeDied(AssertionError):
    """The process ended (or never answered) before health said SERVING."""


@dataclass
class ServeProcess:
    popen: subprocess.Popen[bytes]
    target: str
    cwd: Path
    stdout_path: Path
    stderr_path: Path
    _files: list[object] = field(default_factory=list, repr=False)

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode("utf-8", errors="backslashreplace")

    def stdout(self) -> str:
        return self.stdout_path.read_bytes().decode("utf-8", errors="backslashreplace")

    def output(self) -> str:
        """Everything the process wrote, stdout then stderr."""
        return self.stdout() + self.stderr()

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait_workers_serving(self, count: int, timeout: float = START_TIMEOUT) -> None:
        """Until `count` workers logged that they serve (health answers as soon as the first one does)."""
        deadline = time.monotonic() + timeout
        while len(re.findall(r'event(?:=|": ")serving\b', self.stderr())) < count:
            if not self.running() or time.monotonic() > deadline:
                raise ServeDied(f"{count} workers did not all start serving; stderr:\n{self.stderr()}")
            time.sleep(0.05)

    def worker_pids(self) -> set[int]:
        """The `serve --workers N` supervisor's worker processes (empty for a single-process server)."""
        return {pid for pid in children(self.popen.pid) if b"spawn_main" in _cmdline(pid)}

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL (and fail) if it does not exit in `timeout` seconds."""
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            raise AssertionError(
                f"integrations-service did not exit {timeout} s after SIGTERM; stderr:\n{self.stderr()}"
            ) from None
        finally:
            self._close_files()

    def kill(self) -> None:
        if self.running():
            self.popen.kill()
            self.popen.wait(5)
        self._close_files()

    def _close_files(self) -> None:
        for file in self._files:
            file.close()  # type: ignore[attr-defined]
        self._files.clear()


class Processes:
    """Starts `integrations-service serve` processes; stops every one of them on exit."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._started: list[ServeProcess] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        for process in self._started:
            if process.running():
                # A slow stop ends in SIGKILL; whether that is a failure is the test's to say.
                with contextlib.suppress(AssertionError):
                    process.terminate(timeout=5)
            process.kill()
        self._started.clear()

    def serve(
        self,
        cwd: Path,
        env: Mapping[str, str],
        args: Iterable[str] = (),
        target: str | None = None,
        timeout: float = START_TIMEOUT,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> ServeProcess:
        """Start `serve` and wait until it answers SERVING.

        Without `target`, listens on a free loopback port given in
        INTEGRATIONS_LISTEN_ADDRESS; with one, the caller has arranged the
        address (e.g. by flag) and the health check goes there. The metrics
        endpoint is off unless `env` names an address for it. `credentials`:
        for the health check of a TLS server.
        """
        env = dict(env)
        env.setdefault("INTEGRATIONS_METRICS_ADDRESS", "")
        if target is None:
            target = f"127.0.0.1:{free_port()}"
            env["INTEGRATIONS_LISTEN_ADDRESS"] = target
        cwd.mkdir(parents=True, exist_ok=True)
        number = len(self._started)
        stdout_path = self._log_dir / f"serve-{number}.stdout"
        stderr_path = self._log_dir / f"serve-{number}.stderr"
        stdout = stdout_path.open("wb")
        stderr = stderr_path.open("wb")
        popen = subprocess.Popen(
            [str(SERVICE), "serve", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        process = ServeProcess(popen, target, cwd, stdout_path, stderr_path, [stdout, stderr])
        self._started.append(process)
        wait_serving(process, timeout, credentials)
        return process


def wait_serving(
    process: ServeProcess, timeout: float = START_TIMEOUT, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Until grpc.health.v1 Check says SERVING; ServeDied if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        code = process.popen.poll()
        if code is not None:
            raise ServeDied(f"integrations-service exited with {code} before serving; stderr:\n{process.stderr()}")
        status = health_status(process.target, timeout=1.0, credentials=credentials)
        if status == "SERVING":
            return
        last_error = status
        time.sleep(0.05)
    process.kill()
    raise ServeDied(
        f"integrations-service did not answer SERVING within {timeout} s ({last_error}); stderr:\n{process.stderr()}"
    )


def health_status(
    target: str, service: str = "", timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> str:
    """The health status name, or a description of why the check failed."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)  # type: ignore[attr-defined]
        except grpc.RpcError as error:
            return f"health check failed: {error.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
