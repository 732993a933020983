"""Both distributions install from the checkout into fresh virtualenvs, as a user would install them.

The service distribution carries the generated integrations.v1 code itself, so
`pip install .` needs no other distribution of this repository (it used to
depend on the name `integrations-client`, which no index has). Slow (two
virtualenvs, dependencies from the index or pip's cache): one test.
"""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def fresh_venv(folder: Path) -> Path:
    venv.create(folder, with_pip=True)
    return folder / "bin"


def test_service_and_client_install_from_the_checkout_into_fresh_virtualenvs(tmp_path: Path) -> None:
    pip = ("-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c", ROOT / "constraints.txt")

    service_bin = fresh_venv(tmp_path / "service")
    run(service_bin / "python", *pip, ROOT, cwd=tmp_path)  # plain `pip install .`
    run(service_bin / "python", "-m", "pip", "check", cwd=tmp_path)
    installed = run(service_bin / "python", "-m", "pip", "list", "--format=freeze", cwd=tmp_path)
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
    run(client_bin / "python", *pip, ROOT / "clients" / "python", cwd=tmp_path)
    run(client_bin / "python", "-m", "pip", "check", cwd=tmp_path)
    where = run(
        client_bin / "python", "-c", "import integrations_client; print(integrations_client.__file__)", cwd=tmp_path
    )
    assert where.startswith(str(tmp_path / "client")), where
