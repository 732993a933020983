"""What can be checked of the container without a Docker engine: lint, install step, entry point, health command."""

from __future__ import annotations

import asyncio
import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from integrations_service.devcerts import make_dev_certs
from tests.harness import Running, start_service
from tests.tls_fixtures import CertificateAuthority

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
BIN = Path(sys.executable).parent


def instructions(name: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.startswith(f"{name} ")]


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([BIN / "hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignored(path: str) -> bool:
    """Whether the build context leaves `path` out: the last .dockerignore rule matching it or a parent wins."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for rule in (r for r in rules if r and not r.startswith("#")):
        negated, pattern = rule.startswith("!"), rule.removeprefix("!")
        if any(
            fnmatch.fnmatchcase(prefix, pattern) or fnmatch.fnmatchcase(prefix, pattern.removeprefix("**/"))
            for prefix in prefixes
        ):
            ignored = not negated
    return ignored


def test_build_context_has_what_copy_needs_and_nothing_private() -> None:
    sources = [s for line in instructions("COPY") if not line.startswith("--") for s in line.split()[:-1]]
    assert sources, "the Dockerfile copies something"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not dockerignored(source), f"COPY {source} but .dockerignore leaves it out"
    for needed in (
        "service/integrations_service/app.py",
        "clients/python/src/integrations/v1/integrations_pb2.py",
        "service/integrations_service/store/migrations/postgres/0001_integration_config.sql",
    ):
        assert not dockerignored(needed), needed
    for private in (
        ".venv/bin/python",
        ".git/HEAD",
        ".data/dev-encryption.key",
        ".data/dev-certs/ca.key",
        "tools/node_modules/x/index.js",
        "tests/conftest.py",
        "bench/results/run.json",
        "service/integrations_service/__pycache__/app.cpython-311.pyc",
        "deploy/kubernetes/secret.yaml",
    ):
        assert dockerignored(private), private


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


def test_the_build_backend_and_the_pip_that_builds_are_pinned_too() -> None:
    """`pip wheel` builds the two projects in isolated environments with their `[build-system] requires`:
    `-c` does not reach those (pip 25.3+: only `--build-constraint` does), so without it every build took the
    newest setuptools of the day. constraints.txt pins it, and the pip that knows --build-constraint."""
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    for pyproject in (ROOT / "pyproject.toml", ROOT / "clients" / "python" / "pyproject.toml"):
        for requirement in map(Requirement, tomllib.loads(pyproject.read_text())["build-system"]["requires"]):
            assert requirement.name in pins, f"{pyproject.relative_to(ROOT)}: {requirement} is not in constraints.txt"
            assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins[requirement.name])
    assert Version(pins["pip"]) >= Version("25.3")
    [build_run] = [r for r in instructions("RUN") if "pip wheel" in r]
    steps = [shlex.split(step) for step in build_run.split("&&")]
    assert steps[0] == ["python", "-m", "pip", "install", "-c", "constraints.txt", "pip"]
    assert steps[-1][steps[-1].index("--build-constraint") + 1] == "constraints.txt"


def test_runs_as_non_root_and_exposes_the_default_ports() -> None:
    [user] = instructions("USER")
    assert not user.startswith(("root", "0"))
    assert set(instructions("EXPOSE")[0].split()) == {"50051", "9464"}
    assert "INTEGRATIONS_LISTEN_ADDRESS=0.0.0.0:50051" in DOCKERFILE
    assert "INTEGRATIONS_METRICS_ADDRESS=0.0.0.0:9464" in DOCKERFILE


def test_the_image_installs_only_the_service_distribution() -> None:
    [install] = [r for r in instructions("RUN") if "pip install --no-index" in r]
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
async def plaintext_service(tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_service(f"sqlite:///{tmp_path / 's.sqlite3'}", tmp_path)
    yield running
    await running.close()


async def healthcheck(target: str, env: Mapping[str, str] = {}) -> tuple[int, str, str]:
    # Not subprocess.run: the server under test shares this event loop and must keep answering.
    process = await asyncio.create_subprocess_exec(
        str(BIN / "integrations-service"),
        "healthcheck",
        env={"PATH": str(BIN), "INTEGRATIONS_LISTEN_ADDRESS": target, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
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


@dataclass
class ProductionTls:
    running: Running
    env: dict[str, str]  # what the container sets for the service and its HEALTHCHECK


@pytest.fixture
async def dns_named_mtls_service(tmp_path: Path) -> AsyncIterator[ProductionTls]:
    """Mutual TLS with a server certificate that names only `integrations.internal`, as production's do."""
    dev = make_dev_certs(tmp_path / "dev")
    ca = CertificateAuthority.load(dev["ca"].cert, dev["ca"].key)
    server_cert, server_key = ca.issue("integrations.internal", dns=("integrations.internal",), server=True).write(
        tmp_path / "tls", "server"
    )
    health_cert, health_key = ca.issue("healthcheck", dns=("healthcheck.internal",)).write(tmp_path / "tls", "health")
    env = {
        "INTEGRATIONS_TLS_CERT": str(server_cert),
        "INTEGRATIONS_TLS_KEY": str(server_key),
        "INTEGRATIONS_TLS_CLIENT_CA": str(dev["ca"].cert),
        "INTEGRATIONS_AUTHZ_POLICY": str(tmp_path / "dev" / "policy.toml"),
    }
    running = await start_service(f"sqlite:///{tmp_path / 's.sqlite3'}", tmp_path / "data", env)
    env |= {
        "INTEGRATIONS_HEALTHCHECK_CA": str(dev["ca"].cert),
        "INTEGRATIONS_HEALTHCHECK_CERT": str(health_cert),
        "INTEGRATIONS_HEALTHCHECK_KEY": str(health_key),
    }
    yield ProductionTls(running, env)
    await running.close()


async def test_healthcheck_verifies_the_dns_name_of_a_production_certificate(
    dns_named_mtls_service: ProductionTls,
) -> None:
    target, env = dns_named_mtls_service.running.target, dns_named_mtls_service.env
    code, out, err = await healthcheck(target, env)
    assert (code, out) == (0, f"healthcheck: {target}: SERVING"), err
    # The name is still verified: one the certificate does not carry is refused.
    code, _, err = await healthcheck(target, {**env, "INTEGRATIONS_HEALTHCHECK_SERVER_NAME": "other.internal"})
    assert code == 1
    assert "UNAVAILABLE" in err


async def test_healthcheck_names_the_variable_it_cannot_use_and_reports_unhealthy(tmp_path: Path) -> None:
    tls = {"INTEGRATIONS_TLS_CERT": str(tmp_path / "server.crt")}
    code, _, err = await healthcheck("127.0.0.1:1", tls)
    assert code == 1  # not 2, which Docker reserves
    assert "INTEGRATIONS_HEALTHCHECK_CA is required" in err
    assert "Traceback" not in err
    files = {
        name: str(tmp_path / "missing.pem")
        for name in ("INTEGRATIONS_HEALTHCHECK_CA", "INTEGRATIONS_HEALTHCHECK_CERT", "INTEGRATIONS_HEALTHCHECK_KEY")
    }
    code, _, err = await healthcheck("127.0.0.1:1", {**tls, **files})
    assert code == 1
    assert f"INTEGRATIONS_HEALTHCHECK_CA names {tmp_path / 'missing.pem'}, which cannot be read" in err
    assert "Traceback" not in err


def test_wheels_carry_migrations_and_type_markers(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT / "clients" / "python"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
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
    metadata = (
        zipfile.ZipFile(service_wheel)
        .read(next(f for f in service_files if f.endswith(".dist-info/METADATA")))
        .decode()
    )
    assert "Requires-Dist: integrations-client" not in metadata
    assert any(f.endswith("migrations/postgres/0001_integration_config.sql") for f in service_files)
    assert any(f.endswith("migrations/sqlite/0002_keys_and_audit.sql") for f in service_files)
    assert "integrations_service/py.typed" in service_files
    assert {
        "integrations/v1/integrations_pb2.pyi",
        "integrations_client/py.typed",
        "integrations/v1/integrations_descriptor_set.binpb",
    } <= set(client_files)  # reflection serves it


def test_the_docker_run_example_gives_its_mounted_files_to_the_images_user() -> None:
    """docs/operations.md mounts a keyring of mode 0600 (the service refuses one others can read) and TLS keys
    from the host: owned by the host's user, the image's user could not read them, and the container would stop
    at start-up. The example makes them the image's user's first."""
    [user] = instructions("USER")
    uid, _, gid = user.partition(":")
    operations = (ROOT / "docs" / "operations.md").read_text()
    container = operations.split("## Container", 1)[1].split("\n## ", 1)[0]
    [example] = [block for block in re.findall(r"```sh\n(.*?)```", container, re.S) if "docker run" in block]
    chown = example.index(f"chown -R {uid}:{gid} secrets tls")
    assert "chmod 600 secrets/keyring" in example
    assert chown < example.index("docker run")
    assert "-v ./secrets:/run/secrets:ro -v ./tls:/run/tls:ro" in example


def test_the_runtime_image_keeps_no_pip_as_the_docs_say() -> None:
    """docs/operations.md: "no pip". The virtualenv's pip goes, and so must the base image's own
    (/usr/local, python -m pip of the system interpreter), which the PATH still reaches."""
    assert "no pip" in (ROOT / "docs" / "operations.md").read_text()
    runtime = DOCKERFILE.split(" AS runtime", 1)[1]
    steps = [
        shlex.split(step)
        for run in instructions("RUN")
        if run in re.sub(r"\\\n\s*", " ", runtime)
        for step in run.split("&&")
    ]
    uninstalls = [step for step in steps if "uninstall" in step]
    assert any(step[0] == "/opt/venv/bin/pip" and "pip" in step[step.index("uninstall") + 1 :] for step in uninstalls)
    assert any(
        step[:3] == ["/usr/local/bin/python", "-m", "pip"] and "pip" in step[step.index("uninstall") + 1 :]
        for step in uninstalls
    ), uninstalls
