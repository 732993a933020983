"""The README's configuration table and the code's settings say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from integrations_service.config import SETTINGS, Setting
from integrations_service.domain.registry import PROVIDERS, ProviderSpec, all_env_vars

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONFIG_ROWS = {match.group(1): line for line in README.splitlines() if (match := re.match(r"\| `([A-Z_]+)` \|", line))}


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_every_setting_has_a_readme_row_with_its_flag_and_default(setting: Setting) -> None:
    row = CONFIG_ROWS.get(setting.env)
    assert row is not None, f"{setting.env} is missing from the README's configuration table"
    assert f"`{setting.flag}`" in row
    if setting.default not in (None, "", "false"):
        assert f"`{setting.default}`" in row


def test_every_readme_setting_exists_in_the_code() -> None:
    documented_only = {
        "INTEGRATION_ENCRYPTION_KEY_FILE",
        "INTEGRATION_ENCRYPTION_KEYS",
        "INTEGRATION_ENCRYPTION_KEY",
        "INTEGRATIONS_HEALTHCHECK_CA",
    }
    unknown = set(CONFIG_ROWS) - {s.env for s in SETTINGS} - documented_only
    assert not unknown, f"README documents settings the code does not read: {unknown}"


@pytest.mark.parametrize("env_var", all_env_vars())
def test_every_provider_fallback_is_in_the_readme(env_var: str) -> None:
    assert f"`{env_var}`" in README


def _cells(text: str, first_cell: str) -> list[str]:
    """The cells of the table row of `text` whose first cell is `first_cell`."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"no single table row for {first_cell} in the docs"
    return [cell.strip() for cell in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("provider", PROVIDERS, ids=lambda p: p.id)
def test_docs_mark_exactly_the_endpoint_and_account_fields(provider: ProviderSpec) -> None:
    """README's † marks and docs/api.md's Environment fallback table name the registry's binds_secrets fields."""
    binding = sorted(provider.binding_keys)
    readme_fields = _cells(README, f"`{provider.id}`")[2]
    assert sorted(re.findall(r"`(\w+)`\**†", readme_fields)) == binding
    api_cell = _cells((ROOT / "docs" / "api.md").read_text(), f"`{provider.id}`")[1]
    assert sorted(re.findall(r"`(\w+)`", api_cell)) == binding
