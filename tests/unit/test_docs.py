"""The README's configuration table and the code's settings say the same thing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from integrations_service.config import SETTINGS, Setting
from integrations_service.domain.registry import all_env_vars

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
CONFIG_ROWS = {
    match.group(1): line
    for line in README.splitlines()
    if (match := re.match(r"\| `([A-Z_]+)` \|", line))
}


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.env)
def test_every_setting_has_a_readme_row_with_its_flag_and_default(setting: Setting) -> None:
    row = CONFIG_ROWS.get(setting.env)
    assert row is not None, f"{setting.env} is missing from the README's configuration table"
    assert f"`{setting.flag}`" in row
    if setting.default not in (None, "", "false"):
        assert f"`{setting.default}`" in row


def test_every_readme_setting_exists_in_the_code() -> None:
    documented_only = {"INTEGRATION_ENCRYPTION_KEY_FILE", "INTEGRATION_ENCRYPTION_KEYS", "INTEGRATION_ENCRYPTION_KEY",
                       "INTEGRATIONS_HEALTHCHECK_CA"}
    unknown = set(CONFIG_ROWS) - {s.env for s in SETTINGS} - documented_only
    assert not unknown, f"README documents settings the code does not read: {unknown}"


@pytest.mark.parametrize("env_var", all_env_vars())
def test_every_provider_fallback_is_in_the_readme(env_var: str) -> None:
    assert f"`{env_var}`" in README
