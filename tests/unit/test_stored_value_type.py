"""The ciphertext boundary is a type: mypy --strict rejects clear text handed to a store.

Each snippet marks with `# rejected` the lines mypy must refuse, and only those:
the sealed path type-checks, every way around the sealing layer does not.
"""

from __future__ import annotations

import re
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parents[2]

PREAMBLE = """\
from collections.abc import Mapping

from integrations_service.sealing import Sealer, Target
from integrations_service.store import IntegrationStore, StoredIntegration, StoredValue
"""

SNIPPETS = {
    "sealed_values_pass": """
async def save(store: IntegrationStore, sealer: Sealer, values: Mapping[str, str]) -> None:
    def merge(current: StoredIntegration | None) -> Mapping[str, StoredValue]:
        kept = dict(current.config) if current else {}
        return kept | sealer.seal(values, Target("org_1", "stripe"))

    await store.upsert("org_1", "stripe", merge)
""",
    "clear_text_mutation": """
async def save(store: IntegrationStore, values: Mapping[str, str]) -> None:
    def merge(current: StoredIntegration | None) -> Mapping[str, str]:
        return values

    await store.upsert("org_1", "stripe", merge)  # rejected
""",
    "clear_text_in_a_sealed_config": """
def merge(current: StoredIntegration | None) -> Mapping[str, StoredValue]:
    return {"secretKey": "sk_live_in_the_clear"}  # rejected
""",
    "clear_text_rewrite": """
async def rotate(store: IntegrationStore) -> None:
    def rewrite(row: StoredIntegration) -> dict[str, str]:
        return {key: value.upper() for key, value in row.config.items()}

    await store.rewrap(["row"], rewrite)  # rejected
""",
    "clear_text_row": """
def forge(row: StoredIntegration) -> StoredIntegration:
    config = {"secretKey": "sk_live_in_the_clear"}
    at = row.updated_at
    return StoredIntegration(row.id, row.organization_id, row.provider, config, 1, at, at)  # rejected
""",
}


def test_mypy_rejects_clear_text_given_to_the_store(tmp_path: Path) -> None:
    expected: dict[str, set[int]] = {}
    for name, body in SNIPPETS.items():
        text = PREAMBLE + body
        (tmp_path / f"{name}.py").write_text(text)
        expected[name] = {n for n, line in enumerate(text.splitlines(), 1) if line.endswith("# rejected")}
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\nstrict = True\npython_version = 3.11\n"
        f"mypy_path = {ROOT / 'clients/python/src'}:{ROOT / 'service'}\ncache_dir = {tmp_path / 'cache'}\n"
        "[mypy-google.rpc.*]\nignore_missing_imports = True\n"
    )

    out, err, _ = api.run(["--config-file", str(config), *(str(tmp_path / f"{name}.py") for name in SNIPPETS)])

    found: dict[str, set[int]] = {name: set() for name in SNIPPETS}
    for match in re.finditer(r"^.*?([a-z_]+)\.py:(\d+): error: .*$", out, re.MULTILINE):
        found[match.group(1)].add(int(match.group(2)))
    assert found == expected, out + err
    assert "StoredValue" in out  # refused for holding clear text, not for some other reason
