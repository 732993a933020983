"""The row <-> record rules both SQL stores share, and the audited statements built from them: without a database."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from integrations_service.store import AuditRecord, UnreadableConfig, postgres, rowmap

RECORD = AuditRecord(
    time=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
    caller="svc-dashboard",
    action="SaveIntegration",
    outcome="OK",
    organization_id="org_1",
    provider="stripe",
    fields=("secretKey",),
    request_id="req-1",
    details={"fingerprint.secretKey": "hmac:ab12"},
)


def test_audit_values_follow_the_column_list() -> None:
    assert dict(zip(rowmap.AUDIT_COLUMNS, rowmap.audit_values(RECORD), strict=True)) == {
        "time": datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        "caller": "svc-dashboard",
        "rpc": "SaveIntegration",
        "outcome": "OK",
        "organization_id": "org_1",
        "provider": "stripe",
        "fields": ["secretKey"],
        "request_id": "req-1",
        "details": {"fingerprint.secretKey": "hmac:ab12"},
    }


def _audit_parameters_of(statement: str) -> dict[str, str]:
    """Column -> parameter of the audit insert within `statement`."""
    match = re.search(r"INSERT INTO audit_events \(([^)]*)\) VALUES \(([^)]*)\)", statement)
    assert match is not None
    return dict(zip(match[1].split(", "), match[2].split(", "), strict=True))


@pytest.mark.parametrize(
    ("statement", "own_parameters"),
    [(postgres._INSERT_AUDITED, 4), (postgres._UPDATE_AUDITED, 2)],
)
def test_the_audited_statements_number_every_audit_column_after_their_own_parameters(
    statement: str, own_parameters: int
) -> None:
    parameters = _audit_parameters_of(statement)
    assert list(parameters) == list(rowmap.AUDIT_COLUMNS)
    assert list(parameters.values()) == [
        f"${own_parameters + n}::jsonb" if column in ("fields", "details") else f"${own_parameters + n}"
        for n, column in enumerate(rowmap.AUDIT_COLUMNS, start=1)
    ]
    numbers = sorted({int(n) for n in re.findall(r"\$(\d+)", statement)})
    assert numbers == list(range(1, own_parameters + len(rowmap.AUDIT_COLUMNS) + 1))


def test_a_naive_time_is_taken_to_be_utc() -> None:
    assert rowmap.utc(datetime(2024, 5, 1, 12, 0)) == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert rowmap.utc(datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))).tzinfo is UTC


def test_a_config_that_is_not_an_object_is_unreadable_and_keeps_its_reason() -> None:
    assert isinstance(rowmap.config_of(["a"]), UnreadableConfig)
    unreadable = UnreadableConfig("is not valid JSON")
    assert rowmap.config_of(unreadable) is unreadable
    assert rowmap.config_of({"n": 1, "s": "é", "o": {"k": [True]}}) == {"n": "1", "s": "é", "o": '{"k":[true]}'}


def test_encryption_counts_are_sorted_without_zeros_and_never_negative() -> None:
    assert rowmap.encryption_counts({"k2": 1, "k1": 7, "k3": 0}) == [("k1", 7), ("k2", 1)]
    with pytest.raises(ValueError, match="cannot go down"):
        rowmap.encryption_counts({"k1": -1})


def test_a_batch_of_audit_records_travels_as_json_of_every_column() -> None:
    record = dataclasses.replace(
        RECORD, time=datetime(2026, 12, 1, 13, 30, 15, 654321, tzinfo=timezone(timedelta(hours=1)))
    )
    as_json = rowmap.audit_json(record)
    assert list(as_json) == list(rowmap.AUDIT_COLUMNS)
    values = dict(zip(rowmap.AUDIT_COLUMNS, rowmap.audit_values(record), strict=True))
    assert as_json == values | {"time": "2026-12-01T12:30:15.654321+00:00"}
    statement = postgres._INSERT_AUDIT
    assert f"INSERT INTO audit_events ({', '.join(rowmap.AUDIT_COLUMNS)}) SELECT" in statement
    assert re.findall(r"\$(\d+)", statement) == ["1"]  # the records are the only parameter
