"""Both distributions install from the checkout into fresh virtualenvs, as a user would install them.

The service distribution carries the generated integrations.v1 code itself, so
`pip install .` needs no other distribution of this repository (it used to
depend on the name `integrations-client`, which no index has). Slow (two
virtualenvs, dependencies from the index or pip's cache): one test. The
virtualenvs are made without a pip of their own (ensurepip took a third of the
test's time); this suite's pip installs into each (`pip --python`).
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def fresh_venv(folder: Path) -> Path:
    venv.create(folder, with_pip=False)
    return folder / "bin"


def pip(target: Path, *args: str | Path) -> str:
    """This interpreter's pip, working on the virtualenv whose bin folder is `target`."""
    return run(
        sys.executable, "-m", "pip", "--python", target / "python", "--disable-pip-version-check", *args, cwd=target
    )


def install(target: Path, source: Path) -> None:
    # --no-compile: byte-compiling every installed module is much of an install's time, and says nothing
    # about whether the distributions install and import.
    pip(target, "install", "--quiet", "--no-compile", "-c", ROOT / "constraints.txt", source)


# Two whole installs; on a loaded two-core machine beyond the suite's default of 120 s.
@pytest.mark.timeout(400)
def test_service_and_client_install_from_the_checkout_into_fresh_virtualenvs(tmp_path: Path) -> None:
    service_bin = fresh_venv(tmp_path / "service")
    install(service_bin, ROOT)  # plain `pip install .`
    pip(service_bin, "check")
    installed = pip(service_bin, "list", "--format=freeze")
    assert "integrations-client" not in installed
    assert "integrations_client" not in installed
    assert "healthcheck" in run(service_bin / "integrations-service", "--help", cwd=tmp_path)
    # Outside the checkout, so the installed copy is the one imported.
    run(
        service_bin / "python",
        "-c",
        "import integrations.v1.integrations_pb2_grpc, integrations_service.cli",
        cwd=tmp_path,
    )

    client_bin = fresh_venv(tmp_path / "client")
    install(client_bin, ROOT / "clients" / "python")
    pip(client_bin, "check")
    where = run(
        client_bin / "python", "-c", "import integrations_client; print(integrations_client.__file__)", cwd=tmp_path
    )
    assert where.startswith(str(tmp_path / "client")), where
