"""Server subprocesses for the benchmark: start on a free loopback port, wait for health, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BENCH_DIR = Path(__file__).resolve().parent
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    target: str
    log_path: Path
    metrics_address: str = ""  # host:port of its /metrics, when it has one

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A loopback port free right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_command() -> list[str]:
    script = Path(sys.executable).with_name("integrations-service")
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "integrations_service", "serve"]


def empty_server_command() -> list[str]:
    return [sys.executable, str(BENCH_DIR / "empty_server.py")]


# Only what a process needs to run: no service setting, provider default or credential leaks in.
_PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "PYTHONPATH")


def clean_environment() -> dict[str, str]:
    """A minimal environment for the servers: none of the service's settings or provider defaults."""
    return {key: os.environ[key] for key in _PASSED_ENV if key in os.environ}


def service_environment(target: str, database_url: str, key: str, data_dir: Path) -> dict[str, str]:
    """Development mode: plaintext on loopback, like the baseline (production mode requires mutual TLS)."""
    return {
        **clean_environment(),
        "INTEGRATIONS_MODE": "development",
        "INTEGRATIONS_LISTEN_ADDRESS": target,
        "INTEGRATIONS_METRICS_ADDRESS": f"127.0.0.1:{free_port()}",  # on, as in production; one port each
        "DATABASE_URL": database_url,
        "INTEGRATION_ENCRYPTION_KEY": key,
        "INTEGRATIONS_DATA_DIR": str(data_dir),
        "INTEGRATIONS_LOG_FORMAT": "json",
        "INTEGRATIONS_SHUTDOWN_GRACE": "1",
    }


def spawn(name: str, command: Sequence[str], env: Mapping[str, str], log_dir: Path, target: str) -> Server:
    """Start `command`, its stdout and stderr going to `log_dir/<name>.log`."""
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            list(command), env=dict(env), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    return Server(name, process, target, log_path)


async def wait_serving(server: Server, timeout: float = READY_TIMEOUT_S) -> None:  # noqa: ASYNC109
    """Poll grpc.health.v1 until SERVING; RuntimeError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                break
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{server.name} did not become healthy; last log lines:\n{server.log_tail()}")


def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()
