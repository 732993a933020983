"""Install the lowest versions a distribution declares into a throwaway virtualenv, then import it.

A lower bound that is too low passes `pip check` and fails only at import
(`protobuf>=6.31` was declared while the generated code needs 7.35.1): this
installs exactly the lowest declared version of every direct dependency and
imports the given modules, outside the checkout so nothing is picked up from
it. Usage (CI runs it through `make lowest-deps`):

    python tools/check_lowest_deps.py clients/python integrations_client integrations.v1.integrations_pb2_grpc
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
import venv
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

_LOWER_BOUND_OPERATORS = (">=", "==", "~=")


def lowest_pins(pyproject: Path) -> list[str]:
    """`name==lowest` for each dependency of [project].dependencies; every one must declare a lower bound."""
    pins = []
    for text in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        lows = [Version(spec.version) for spec in requirement.specifier if spec.operator in _LOWER_BOUND_OPERATORS]
        if not lows:
            raise SystemExit(f"{pyproject}: {text!r} declares no lower bound")
        pins.append(f"{requirement.name}=={max(lows)}")
    return pins


def _run(*args: str | Path, cwd: Path) -> None:
    print("+", " ".join(map(str, args)), flush=True)
    subprocess.run([str(arg) for arg in args], cwd=cwd, check=True)  # noqa: S603 (our own arguments)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", type=Path, help="folder of the pyproject.toml to check")
    parser.add_argument("modules", nargs="+", help="modules that must import")
    args = parser.parse_args()
    project = args.project.resolve()
    pins = lowest_pins(project / "pyproject.toml")
    with tempfile.TemporaryDirectory(prefix="lowest-deps-") as folder:
        root = Path(folder)
        venv.create(root / "venv", with_pip=True)
        python = root / "venv" / "bin" / "python"
        constraints = root / "lowest.txt"
        constraints.write_text("\n".join(pins) + "\n")
        print("lowest declared versions:", ", ".join(pins), flush=True)
        _run(
            python,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            constraints,
            project,
            cwd=root,
        )
        _run(python, "-m", "pip", "check", cwd=root)
        _run(python, "-c", "\n".join(f"import {module}" for module in args.modules), cwd=root)
    print(f"{project.name}: imports with the lowest declared versions of its dependencies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
