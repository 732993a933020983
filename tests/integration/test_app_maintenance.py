"""The wiring of the one-off commands (rotate, retire-key): what `app.maintenance` opens, it saves and closes."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations_service import app
from integrations_service.config import Settings, load_settings
from integrations_service.crypto import ValueContext
from integrations_service.domain.audit import AuditTrail, Caller
from integrations_service.store.factory import open_store
from tests.harness import TEST_KEY


def command_settings(tmp_path: Path) -> Settings:
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path / 'store.sqlite3'}",
        "INTEGRATIONS_DATA_DIR": str(tmp_path / "data"),
        "INTEGRATION_ENCRYPTION_KEYS": f"k1:{TEST_KEY}",
    }
    return load_settings(None, env, serving=False)


async def stored_encryptions(settings: Settings) -> list[tuple[str, int]]:
    store = await open_store(settings.database_url, settings.data_dir)
    try:
        return [(key.key_id, key.encryptions) for key in await store.list_keys()]
    finally:
        await store.close()


async def test_encryption_counts_and_audit_records_are_saved_when_the_command_ends(tmp_path: Path) -> None:
    settings = command_settings(tmp_path)
    async with app.maintenance(settings, pool_size=1) as parts:
        for _ in range(2):
            parts.cipher.encrypt("sk_test_counted", ValueContext("org_1", "stripe", "secretKey"))
        parts.audit.enqueue(parts.audit.record(Caller("cli:test"), "RotateKeys", "OK"))
    # Nothing was flushed by a timer meanwhile: both were saved by the closing steps.
    store = await open_store(settings.database_url, settings.data_dir)
    try:
        assert [(key.key_id, key.encryptions) for key in await store.list_keys()] == [("k1", 2)]
        assert [entry.record.action for entry in await store.list_audit("", 0, 10)] == ["RotateKeys"]
    finally:
        await store.close()


async def test_a_failing_closing_step_does_not_skip_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def audit_close_fails(self: AuditTrail) -> None:
        raise RuntimeError("audit flush failed")

    monkeypatch.setattr(AuditTrail, "close", audit_close_fails)
    settings = command_settings(tmp_path)
    async with app.maintenance(settings, pool_size=1) as parts:
        parts.cipher.encrypt("sk_test_counted", ValueContext("org_1", "stripe", "secretKey"))
    assert await stored_encryptions(settings) == [("k1", 1)]  # the key usage step still ran
    assert [getattr(r, "store", None) for r in caplog.records if getattr(r, "event", None) == "stop_failed"] == [
        "audit"
    ]
