"""The sealing layer is the only way between clear text and the store (docs/architecture.md).

Read from the source: no module outside `sealing/` and `crypto/` calls the
cipher, and only `sealing/` and the stores' row decoding make a `StoredValue`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "service" / "integrations_service"
CIPHER_CALLS = {"encrypt", "decrypt", "encrypt_with_nonce"}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _called(path: Path) -> set[str]:
    """Names of the functions and methods a module calls."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
            elif isinstance(node.func, ast.Name):
                names.add(node.func.id)
    return names


def _layer(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0]


def test_the_modules_are_found() -> None:
    layers = {_layer(path) for path in _modules()}
    assert {"api", "domain", "sealing", "crypto", "store"} <= layers


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_sealing_and_crypto_call_the_cipher(path: Path) -> None:
    if _layer(path) in {"sealing", "crypto"}:
        return
    assert not _called(path) & CIPHER_CALLS, f"{path.name} calls the cipher: go through sealing.Sealer"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_sealing_and_the_stores_make_stored_values(path: Path) -> None:
    if _layer(path) in {"sealing", "store"}:
        return
    assert "StoredValue" not in _called(path), f"{path.name} makes a StoredValue: only sealing.Sealer may"
