"""Key rotation and key retirement on the in-memory store, with the real cipher and audit trail."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from integrations_service import app, cli
from integrations_service.crypto import ValueCipher, seal_v1
from integrations_service.domain.audit import OUTCOME_OK, AuditTrail
from integrations_service.domain.resolution import ConfigView
from integrations_service.domain.rotation import RETIRE_ACTION, ROTATE_ACTION, RotationReport, Rotator
from integrations_service.domain.service import ReadRequest, etag_of
from integrations_service.errors import FailedPrecondition, Unavailable
from integrations_service.sealing import LegacyValues, Sealer
from integrations_service.store import StoredIntegration, UnreadableConfig
from integrations_service.store.memory import MemoryDatabase, MemoryStore
from tests.unit.seam import (
    CALLER,
    FIXED_TIME,
    NEW_KEY_ID,
    OLD_KEY,
    OLD_KEY_ID,
    ServiceFactory,
    audit_records,
    cipher_of,
    listed_status,
    old_cipher,
    put_row,
    sealed,
    stored_clear,
    stored_config,
)

SECRET = "sk_test_RotationUnit000000001"
WEBHOOK = "whsec_RotationUnit000000001"
PUBLISHABLE = "pk_test_RotationUnit000000001"
RESEND_KEY = "re_RotationUnit000000001"
SENDER = "Shop <orders@shop.example>"
FIXED_NONCE = bytes(range(12))


def rotator(store: MemoryStore, cipher: ValueCipher, audit: AuditTrail, **options: object) -> Rotator:
    return Rotator(store, Sealer(cipher), audit, CALLER, **options)  # type: ignore[arg-type]


def plant_mixed_rows(database: MemoryDatabase, cipher: ValueCipher) -> dict[str, str]:
    """Every format rotation meets; returns the row ids by organization."""
    stripe = {
        "secretKey": SECRET,  # legacy plaintext
        "webhookSecret": seal_v1(OLD_KEY, WEBHOOK, FIXED_NONCE),  # the dashboard's enc:v1
        **sealed(old_cipher(), "org-a", "stripe", {"publishableKey": PUBLISHABLE}),  # enc:v2 under the old key
    }
    resend = sealed(cipher, "org-b", "resend", {"apiKey": RESEND_KEY}) | sealed(
        old_cipher(), "org-b", "resend", {"fromAddress": SENDER}
    )
    broken = {
        # Moved from another organization: its associated data no longer matches.
        "apiKey": sealed(old_cipher(), "org-a", "easypay", {"apiKey": "moved"})["apiKey"],
        # Under a key that is not configured.
        "accountId": sealed(cipher_of(("gone", OLD_KEY)), "org-c", "easypay", {"accountId": "acct"})["accountId"],
    }
    return {
        "org-a": put_row(database, "org-a", "stripe", stripe),
        "org-b": put_row(database, "org-b", "resend", resend),
        "org-c": put_row(database, "org-c", "easypay", broken),
    }


async def test_rotation_rewraps_plaintext_v1_and_older_key_values_under_the_active_key(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    ids = plant_mixed_rows(database, cipher)
    current_resend_key = stored_config(database, "org-b", "resend")["apiKey"]
    broken_before = stored_config(database, "org-c", "easypay")

    report = await rotator(store, cipher, audit).rotate()

    assert (report.rows_scanned, report.rows_rewrapped, report.values_rewrapped) == (3, 2, 4)
    assert report.from_keys == Counter({OLD_KEY_ID: 3, "plaintext": 1})
    assert sorted(report.undecryptable) == [(ids["org-c"], "accountId"), (ids["org-c"], "apiKey")]
    assert report.legacy_found == Counter({"plaintext": 1, "v1": 1})
    assert report.legacy_remaining == 0
    assert not report.complete  # the undecryptable values still need the old data or a new save
    for organization_id, provider in (("org-a", "stripe"), ("org-b", "resend")):
        assert all(map(cipher.is_current, stored_config(database, organization_id, provider).values()))
    assert stored_clear(database, cipher, "org-a", "stripe") == {
        "secretKey": SECRET,
        "webhookSecret": WEBHOOK,
        "publishableKey": PUBLISHABLE,
    }
    assert stored_clear(database, cipher, "org-b", "resend") == {"apiKey": RESEND_KEY, "fromAddress": SENDER}
    # A value already under the active key is not re-encrypted; undecryptable values are left as they were.
    assert stored_config(database, "org-b", "resend")["apiKey"] == current_resend_key
    assert stored_config(database, "org-c", "easypay") == broken_before


async def test_a_second_run_changes_nothing(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    put_row(
        database,
        "org-a",
        "stripe",
        {"secretKey": SECRET} | sealed(old_cipher(), "org-a", "stripe", {"webhookSecret": WEBHOOK}),
    )
    first = await rotator(store, cipher, audit).rotate()
    after_first = stored_config(database, "org-a", "stripe")
    audited = len(database.audit)

    second = await rotator(store, cipher, audit).rotate()

    assert (first.values_rewrapped, first.complete) == (2, True)
    assert (second.rows_scanned, second.rows_rewrapped, second.values_rewrapped, second.batches) == (1, 0, 0, 0)
    assert second.complete
    assert stored_config(database, "org-a", "stripe") == after_first
    assert len(database.audit) == audited  # no batch, no audit record


async def test_rotation_keeps_the_etag_and_the_values_a_read_returns(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail, make_service: ServiceFactory
) -> None:
    plant_mixed_rows(database, cipher)
    service = make_service()
    before = await service.get_config(ReadRequest("org-a", "stripe", ConfigView.DECRYPTED), CALLER)
    row_before = database.rows[("org-a", "stripe")]

    await rotator(store, cipher, audit).rotate()

    after = await service.get_config(ReadRequest("org-a", "stripe", ConfigView.DECRYPTED), CALLER)
    row_after = database.rows[("org-a", "stripe")]
    assert after.values == before.values
    assert (after.etag, row_after.version, row_after.updated_at) == (
        before.etag,
        row_before.version,
        row_before.updated_at,
    )
    assert etag_of(row_after) == before.etag


async def test_with_legacy_values_refused_rotation_leaves_them_and_reports_them_remaining(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    plant_mixed_rows(database, cipher)
    planted = stored_config(database, "org-a", "stripe")

    report = await rotator(store, cipher, audit, rewrap_legacy=False).rotate()

    after = stored_config(database, "org-a", "stripe")
    assert (after["secretKey"], after["webhookSecret"]) == (planted["secretKey"], planted["webhookSecret"])
    assert cipher.is_current(after["publishableKey"])  # enc:v2 under an older key is still rewrapped
    assert report.legacy_found == Counter({"plaintext": 1, "v1": 1})
    assert report.legacy_remaining == 2
    assert report.from_keys == Counter({OLD_KEY_ID: 2})


async def test_an_undecryptable_legacy_value_counts_as_remaining(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    row_id = put_row(database, "org-a", "stripe", {"webhookSecret": "enc:v1:bm90IGEgdjEgdmFsdWUgYXQgYWxsIQ=="})

    report = await rotator(store, cipher, audit).rotate()

    assert report.undecryptable == [(row_id, "webhookSecret")]
    assert (report.legacy_found, report.legacy_remaining) == (Counter({"plaintext": 0, "v1": 1}), 1)
    assert not report.complete


async def test_rotation_goes_in_batches_each_audited_and_reported_as_it_goes(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    for n in range(5):
        put_row(database, f"org-{n}", "resend", sealed(old_cipher(), f"org-{n}", "resend", {"apiKey": RESEND_KEY}))
    seen: list[int] = []

    def progress(report: RotationReport) -> None:
        seen.append(report.rows_scanned)

    report = await rotator(store, cipher, audit, batch_size=2, progress=progress).rotate()

    assert (report.rows_scanned, report.rows_rewrapped, report.batches) == (5, 5, 3)
    assert seen == [2, 4, 5]
    records = audit_records(database, ROTATE_ACTION)
    assert [r.details for r in records] == [
        {"rows": "2", "active_key_id": NEW_KEY_ID},
        {"rows": "2", "active_key_id": NEW_KEY_ID},
        {"rows": "1", "active_key_id": NEW_KEY_ID},
    ]
    assert {(r.caller, r.request_id, r.outcome) for r in records} == {(CALLER.identity, CALLER.request_id, OUTCOME_OK)}


# --- retiring a key -------------------------------------------------------------------------------------


async def test_retire_is_refused_while_a_stored_value_needs_the_key(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    await store.register_keys(cipher.check_values())
    put_row(database, "org-a", "resend", sealed(old_cipher(), "org-a", "resend", {"apiKey": RESEND_KEY}))
    put_row(database, "org-b", "stripe", {"webhookSecret": seal_v1(OLD_KEY, WEBHOOK, FIXED_NONCE)})

    with pytest.raises(FailedPrecondition) as refused:
        await rotator(store, cipher, audit).retire(OLD_KEY_ID)

    assert "2 stored values" in refused.value.message
    assert not database.keys[OLD_KEY_ID].retired
    assert audit_records(database, RETIRE_ACTION) == []


@pytest.mark.parametrize(
    ("key_id", "why"),
    [(NEW_KEY_ID, "active key"), ("never-registered", "no key 'never-registered' is registered")],
    ids=["active", "unknown"],
)
async def test_retire_is_refused_for_the_active_key_and_for_unknown_ids(
    key_id: str, why: str, database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    await store.register_keys(cipher.check_values())

    with pytest.raises(FailedPrecondition, match=why):
        await rotator(store, cipher, audit).retire(key_id)

    assert not any(record.retired for record in database.keys.values())
    assert audit_records(database, RETIRE_ACTION) == []


async def test_after_rotation_the_old_key_retires_and_the_retirement_is_audited(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    await store.register_keys(cipher.check_values())
    put_row(database, "org-a", "resend", sealed(old_cipher(), "org-a", "resend", {"apiKey": RESEND_KEY}))
    put_row(database, "org-b", "stripe", {"webhookSecret": seal_v1(OLD_KEY, WEBHOOK, FIXED_NONCE)})
    await rotator(store, cipher, audit).rotate()

    scanned = await rotator(store, cipher, audit).retire(OLD_KEY_ID)

    assert scanned == 2
    assert database.keys[OLD_KEY_ID].retired
    assert not database.keys[NEW_KEY_ID].retired
    [record] = audit_records(database, RETIRE_ACTION)
    assert (record.caller, record.outcome, dict(record.details)) == (
        CALLER.identity,
        OUTCOME_OK,
        {"key_id": OLD_KEY_ID},
    )


async def test_an_empty_value_stays_unset_through_rotation(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail, make_service: ServiceFactory
) -> None:
    put_row(database, "org-a", "ifthenpay", {"antiPhishingKey": ""})  # the only required field, unset
    service = make_service()
    before = await listed_status(service, "org-a", "ifthenpay")

    report = await rotator(store, cipher, audit).rotate()

    after = await listed_status(service, "org-a", "ifthenpay")
    assert before == after == (False, False)
    assert report.values_rewrapped == 0


async def test_retire_is_refused_while_a_row_cannot_be_read(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    # A config that is not a JSON object (say, one double-encoded by a hand-written fix) may well hold values
    # under the key, and a repair can get them back only while the key is still there: the store cannot tell.
    await store.register_keys(cipher.check_values())
    row_id = put_row(database, "org-a", "stripe", {})
    row = database.rows[("org-a", "stripe")]
    database.rows[("org-a", "stripe")] = dataclasses.replace(row, config=UnreadableConfig("is not a JSON object"))

    with pytest.raises(FailedPrecondition) as refused:
        await rotator(store, cipher, audit).retire(OLD_KEY_ID)

    assert "1 stored rows have a config that is not a JSON object" in refused.value.message
    assert row_id in refused.value.message
    assert not database.keys[OLD_KEY_ID].retired
    assert audit_records(database, RETIRE_ACTION) == []


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_rotator_needs_at_least_one_row_per_batch(
    batch_size: int, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        rotator(store, cipher, audit, batch_size=batch_size)


async def test_a_value_that_is_not_valid_text_is_reported_and_the_rest_of_its_batch_still_rotates(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    # A lone surrogate: SQLite's JSON text can hold "\ud800" (PostgreSQL's jsonb refuses it). Sealing it raised
    # UnicodeEncodeError out of the batch: every run stopped there, the rows after it never rotated.
    bad = put_row(database, "org-a", "stripe", {"secretKey": "sk_test_\ud800", "publishableKey": PUBLISHABLE})
    put_row(database, "org-b", "stripe", {"secretKey": SECRET})

    report = await rotator(store, cipher, audit, batch_size=2).rotate()

    assert report.undecryptable == [(bad, "secretKey")]
    # Its row is left whole (a store cannot write the lone surrogate back), the next row rotates.
    assert (report.rows_rewrapped, report.values_rewrapped, report.legacy_remaining) == (1, 1, 1)
    assert not report.complete
    assert stored_config(database, "org-a", "stripe") == {"secretKey": "sk_test_\ud800", "publishableKey": PUBLISHABLE}
    assert stored_clear(database, cipher, "org-b", "stripe") == {"secretKey": SECRET}


# --- values under the active key are verified, not trusted by their prefix ---------------------------


def damaged(stored: str) -> str:
    """The stored string with one base64 character of its nonce changed: well-formed, but its tag fails."""
    position = len(f"enc:v2:{NEW_KEY_ID}:") + 8
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    new = alphabet[(alphabet.index(stored[position]) + 1) % len(alphabet)]
    return stored[:position] + new + stored[position + 1 :]


async def test_a_damaged_value_under_the_active_key_is_reported_undecryptable_and_left_as_it_is(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    good = sealed(cipher, "org-a", "stripe", {"secretKey": SECRET, "publishableKey": PUBLISHABLE})
    ids = [
        # Wrong tag: one nonce character changed.
        put_row(database, "org-a", "stripe", good | {"secretKey": damaged(good["secretKey"])}),
        # Moved from another row: genuine, but bound to org-a.
        put_row(database, "org-b", "stripe", {"secretKey": good["secretKey"]}),
        # Not base64 at all.
        put_row(database, "org-c", "resend", {"apiKey": f"enc:v2:{NEW_KEY_ID}:not*base64!"}),
        # A row that is rewrapped anyway (an old-key value) and also holds a damaged current value.
        put_row(
            database,
            "org-d",
            "stripe",
            sealed(old_cipher(), "org-d", "stripe", {"publishableKey": PUBLISHABLE})
            | {
                "webhookSecret": damaged(sealed(cipher, "org-d", "stripe", {"webhookSecret": WEBHOOK})["webhookSecret"])
            },
        ),
        # Intact: counted current, untouched.
        put_row(database, "org-e", "resend", sealed(cipher, "org-e", "resend", {"apiKey": RESEND_KEY})),
    ]
    before = {row.id: dict(row.config) for row in database.rows.values()}

    report = await rotator(store, cipher, audit, batch_size=2).rotate()

    assert report.undecryptable == [
        (ids[0], "secretKey"),
        (ids[1], "secretKey"),
        (ids[2], "apiKey"),
        (ids[3], "webhookSecret"),
    ]
    assert not report.complete
    assert (report.rows_scanned, report.rows_rewrapped, report.values_rewrapped) == (5, 1, 1)
    after = {row.id: dict(row.config) for row in database.rows.values()}
    for row_id in (ids[0], ids[1], ids[2], ids[4]):
        assert after[row_id] == before[row_id]  # never written
    assert after[ids[3]]["webhookSecret"] == before[ids[3]]["webhookSecret"]
    assert cipher.is_current(after[ids[3]]["publishableKey"])
    assert after[ids[3]]["publishableKey"] != before[ids[3]]["publishableKey"]


async def test_a_second_run_still_reports_a_damaged_value_under_the_active_key(
    database: MemoryDatabase, store: MemoryStore, cipher: ValueCipher, audit: AuditTrail
) -> None:
    good = sealed(cipher, "org-a", "stripe", {"secretKey": SECRET})
    row_id = put_row(database, "org-a", "stripe", {"secretKey": damaged(good["secretKey"])})
    for _ in range(2):
        report = await rotator(store, cipher, audit).rotate()
        assert report.undecryptable == [(row_id, "secretKey")]
        assert report.rows_rewrapped == 0


# --- the store lost in the middle of `integrations-service rotate` ----------------------------------


# What `_rotate` reads of the settings (the store comes from `app.maintenance`, replaced here).
SETTINGS: Any = SimpleNamespace(legacy_values=LegacyValues.READ)


class StoreLostAfter(MemoryStore):
    """A store whose scans answer Unavailable once `scans` of them have succeeded: an outage mid-run."""

    def __init__(self, database: MemoryDatabase, scans: int) -> None:
        super().__init__(database)
        self._scans = scans

    async def scan(self, after_id: str, limit: int) -> list[StoredIntegration]:
        if self._scans == 0:
            raise Unavailable("the store cannot be reached")
        self._scans -= 1
        return await super().scan(after_id, limit)


async def test_rotate_cut_off_by_an_outage_says_it_stopped_part_way_and_can_be_resumed(
    database: MemoryDatabase,
    cipher: ValueCipher,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for i in range(5):
        put_row(database, f"org-{i}", "stripe", sealed(old_cipher(), f"org-{i}", "stripe", {"secretKey": SECRET}))
    store = StoreLostAfter(database, scans=2)

    @contextlib.asynccontextmanager
    async def maintenance(settings: object, pool_size: int) -> AsyncIterator[app.Maintenance]:
        yield app.Maintenance(store, cipher, AuditTrail(store, clock=lambda: FIXED_TIME))

    monkeypatch.setattr(app, "maintenance", maintenance)
    with caplog.at_level(logging.INFO, logger="integrations"):
        code = await cli._rotate(SETTINGS, batch_size=2)

    assert code == 1
    [stopped] = [r for r in caplog.records if getattr(r, "event", "") == "rotation_interrupted"]
    message = stopped.getMessage()
    assert "stopped part-way" in message
    assert "run `integrations-service rotate` again" in message
    assert "4 rows scanned, 4 rewrapped" in message
    assert "cannot start" not in caplog.text
    assert (stopped.rows_scanned, stopped.rows_rewrapped) == (4, 4)  # type: ignore[attr-defined]
    assert capsys.readouterr().out == ""  # no report: it is not one of a finished run
    assert SECRET not in caplog.text
    # The four rows of the two batches that committed are rewrapped; the fifth is left for the next run.
    assert sum(cipher.is_current(row.config["secretKey"]) for row in database.rows.values()) == 4


async def test_rotate_that_cannot_reach_the_store_at_all_still_fails_as_before_it_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @contextlib.asynccontextmanager
    async def maintenance(settings: object, pool_size: int) -> AsyncIterator[app.Maintenance]:
        raise Unavailable("the store cannot be reached")
        yield  # pragma: no cover

    monkeypatch.setattr(app, "maintenance", maintenance)
    with pytest.raises(Unavailable):  # main() logs it as "cannot start"
        await cli._rotate(SETTINGS, batch_size=2)
