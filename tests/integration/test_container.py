"""What can be checked of the container without a Docker engine: lint, install step, entry point, health command."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.harness import Running

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
BIN = Path(sys.executable).parent


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{name} ")]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([BIN / "hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned_slim_python() -> None:
    [image] = re.findall(r"ARG PYTHON_IMAGE=(\S+)", DOCKERFILE)
    assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim-\w+", image), image


def test_install_step_is_the_one_make_and_ci_use() -> None:
    [build_run] = [r for r in instructions("RUN") if "pip wheel" in r]
    docker_args = shlex.split(build_run)
    make_install = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "-c constraints.txt" in line)
    make_args = shlex.split(make_install.replace("$(BIN)/python", "python"))
    # Same constraints file and the same two packages (CI adds only editable mode and the dev extras).
    assert docker_args[docker_args.index("-c") + 1] == make_args[make_args.index("-c") + 1] == "constraints.txt"
    assert "./clients/python" in docker_args
    assert "." in docker_args
    assert {"./clients/python", ".[dev]"} <= set(make_args)
    assert "make install" in (ROOT / ".ci" / "run").read_text()


def test_runs_as_non_root_and_exposes_the_default_ports() -> None:
    [user] = instructions("USER")
    assert not user.startswith(("root", "0"))
    assert set(instructions("EXPOSE")[0].split()) == {"50051", "9464"}
    assert "INTEGRATIONS_LISTEN_ADDRESS=0.0.0.0:50051" in DOCKERFILE
    assert "INTEGRATIONS_METRICS_ADDRESS=0.0.0.0:9464" in DOCKERFILE


def test_the_image_installs_only_the_service_distribution() -> None:
    [install] = [r for r in instructions("RUN") if "pip install" in r]
    args = shlex.split(install.split("&&")[1])
    assert args[-1] == "integrations-service"
    assert "--no-index" in args
    assert "integrations-client" not in args


def test_entry_point_and_healthcheck_name_real_commands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert instructions("ENTRYPOINT") == ['["integrations-service"]']
    assert "integrations-service" in scripts
    [healthcheck] = instructions("HEALTHCHECK")
    assert 'CMD ["integrations-service", "healthcheck"]' in healthcheck
    help_text = subprocess.run([BIN / "integrations-service", "--help"], capture_output=True, text=True, check=True)
    assert "healthcheck" in help_text.stdout


@pytest.fixture
async def plaintext_service(tmp_path: Path) -> Running:
    from tests.harness import start_service

    running = await start_service(f"sqlite:///{tmp_path / 's.sqlite3'}", tmp_path)
    yield running  # type: ignore[misc]
    await running.close()


async def healthcheck(target: str) -> tuple[int, str, str]:
    # Not subprocess.run: the server under test shares this event loop and must keep answering.
    process = await asyncio.create_subprocess_exec(
        str(BIN / "integrations-service"), "healthcheck",
        env={"PATH": str(BIN), "INTEGRATIONS_LISTEN_ADDRESS": target},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, out.decode().strip(), err.decode()


async def test_healthcheck_command_says_serving_then_fails_when_the_service_is_gone(plaintext_service: Running) -> None:
    code, out, _ = await healthcheck(plaintext_service.target)
    assert (code, out) == (0, f"healthcheck: {plaintext_service.target}: SERVING")
    await plaintext_service.service.stop(0)
    code, _, err = await healthcheck(plaintext_service.target)
    assert code == 1
    assert "UNAVAILABLE" in err


def test_wheels_carry_migrations_and_type_markers(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT / "clients" / "python"), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    service_wheel = next(tmp_path.glob("integrations_service-*.whl"))
    client_wheel = next(tmp_path.glob("integrations_client-*.whl"))
    service_files = zipfile.ZipFile(service_wheel).namelist()
    client_files = zipfile.ZipFile(client_wheel).namelist()
    # The service carries the generated code itself, every file of it the client ships, and not the client.
    generated = {f for f in client_files if f.startswith("integrations/")}
    assert {"integrations/v1/integrations_pb2.py", "integrations/v1/integrations_pb2_grpc.py"} <= generated
    assert generated <= set(service_files)
    assert not any(f.startswith("integrations_client/") for f in service_files)
    metadata = zipfile.ZipFile(service_wheel).read(
        next(f for f in service_files if f.endswith(".dist-info/METADATA"))
    ).decode()
    assert "Requires-Dist: integrations-client" not in metadata
    assert any(f.endswith("migrations/postgres/0001_integration_config.sql") for f in service_files)
    assert any(f.endswith("migrations/sqlite/0002_keys_and_audit.sql") for f in service_files)
    assert "integrations_service/py.typed" in service_files
    assert {"integrations/v1/integrations_pb2.pyi", "integrations_client/py.typed"} <= set(client_files)
