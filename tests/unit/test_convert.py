"""Protobuf ↔ domain translation (api/convert.py): what a caller sees of each domain value, and bad enum numbers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api import convert
from integrations_service.domain.registry import PROVIDERS, Category, find_provider
from integrations_service.domain.resolution import ConfigView, EffectiveConfig, EffectiveValue, ValueSource
from integrations_service.domain.service import ProviderStatus
from integrations_service.errors import InvalidArgument
from integrations_service.store import AuditEntry, AuditRecord


@pytest.mark.parametrize(
    ("number", "category"),
    [
        (pb.CATEGORY_UNSPECIFIED, None),
        (pb.CATEGORY_PAYMENTS, Category.PAYMENTS),
        (pb.CATEGORY_NOTIFICATIONS, Category.NOTIFICATIONS),
        (pb.CATEGORY_ANALYTICS, Category.ANALYTICS),
    ],
)
def test_categories_from_the_wire(number: int, category: Category | None) -> None:
    assert convert.category_from_pb(number) is category  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("number", "view"),
    [
        (pb.CONFIG_VIEW_UNSPECIFIED, ConfigView.MASKED),
        (pb.CONFIG_VIEW_MASKED, ConfigView.MASKED),
        (pb.CONFIG_VIEW_DECRYPTED, ConfigView.DECRYPTED),
    ],
)
def test_an_unspecified_view_is_the_masked_one(number: int, view: ConfigView) -> None:
    assert convert.view_from_pb(number) is view  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("convert_number", "field"), [(convert.category_from_pb, "category"), (convert.view_from_pb, "view")]
)
def test_an_unknown_enum_number_is_invalid_argument_naming_the_field(convert_number: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        convert_number(99)  # type: ignore[operator]
    assert [v.field for v in refused.value.violations] == [field]


@pytest.mark.parametrize("spec", PROVIDERS, ids=lambda spec: spec.id)
def test_every_provider_field_reaches_the_wire_with_its_flags(spec: object) -> None:
    status = ProviderStatus(spec, configured=True, ready=False)  # type: ignore[arg-type]
    message = convert.provider_to_pb(status)
    assert (message.id, message.configured, message.ready) == (status.spec.id, True, False)
    assert [(f.key, f.env_var, f.secret, f.required, f.binds_secrets) for f in message.fields] == [
        (f.key, f.env_var, f.secret, f.required, f.binds_secrets) for f in status.spec.fields
    ]


def test_a_catalog_entry_without_an_organization_reads_not_configured_not_ready() -> None:
    spec = find_provider("stripe")
    assert spec is not None
    message = convert.provider_to_pb(ProviderStatus(spec))
    assert (message.configured, message.ready) == (False, False)


def test_a_config_keeps_every_value_its_source_and_its_update_time() -> None:
    when = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)
    config = EffectiveConfig(
        organization_id="org_1",
        provider="stripe",
        values={
            "secretKey": EffectiveValue("••••••••4242", ValueSource.ORGANIZATION, secret=True),
            "publishableKey": EffectiveValue("pk_test_1", ValueSource.ENVIRONMENT, secret=False),
            "webhookSecret": EffectiveValue("", ValueSource.UNSET, secret=True),
        },
        etag="abc",
        update_time=when,
    )
    message = convert.config_to_pb(config)
    assert {k: (v.value, v.source, v.secret) for k, v in message.values.items()} == {
        "secretKey": ("••••••••4242", pb.VALUE_SOURCE_ORGANIZATION, True),
        "publishableKey": ("pk_test_1", pb.VALUE_SOURCE_ENVIRONMENT, False),
        "webhookSecret": ("", pb.VALUE_SOURCE_UNSET, True),
    }
    assert message.etag == "abc"
    assert message.update_time.ToDatetime(tzinfo=UTC) == when


def test_a_config_never_stored_has_no_update_time() -> None:
    message = convert.config_to_pb(EffectiveConfig("org_1", "stripe", {}, etag="", update_time=None))
    assert not message.HasField("update_time")


def test_an_audit_record_reaches_the_wire_whole_with_its_action() -> None:
    when = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    record = AuditRecord(
        time=when,
        caller="spiffe:spiffe://shop.example/admin",
        action="RotateKeys",
        outcome="OK",
        organization_id="org_1",
        provider="stripe",
        fields=("secretKey",),
        request_id="req-1",
        details={"rows": "3"},
    )
    event = convert.audit_to_pb(AuditEntry(7, record))
    assert (event.id, event.caller, event.action, event.outcome) == (7, record.caller, "RotateKeys", "OK")
    assert (event.organization_id, event.provider, list(event.fields), event.request_id) == (
        "org_1",
        "stripe",
        ["secretKey"],
        "req-1",
    )
    assert dict(event.details) == {"rows": "3"}
    assert event.time.ToDatetime(tzinfo=UTC) == when


@pytest.mark.parametrize(
    "when",
    [
        datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 12, 1, 10, 0, 0, 1),  # naive: UTC, as Timestamp.FromDatetime takes it
        datetime.fromisoformat("2026-12-01T12:00:00.5+02:00"),
    ],
)
def test_the_update_time_is_what_timestamp_from_datetime_sets(when: datetime) -> None:
    expected = pb.ProviderConfig()
    expected.update_time.FromDatetime(when)
    message = convert.config_to_pb(EffectiveConfig("org_1", "stripe", {}, etag="e", update_time=when))
    assert (message.update_time.seconds, message.update_time.nanos) == (
        expected.update_time.seconds,
        expected.update_time.nanos,
    )


def test_a_providers_status_is_its_own_though_its_catalog_message_is_built_once() -> None:
    spec = find_provider("stripe")
    assert spec is not None
    response = pb.ListProvidersResponse()
    for configured, ready in ((True, True), (False, False), (True, False)):
        convert.provider_into(response.providers.add(), ProviderStatus(spec, configured=configured, ready=ready))
    assert [(p.id, p.configured, p.ready) for p in response.providers] == [
        ("stripe", True, True),
        ("stripe", False, False),
        ("stripe", True, False),
    ]
    assert convert.provider_to_pb(ProviderStatus(spec)).configured is False
    assert len(response.providers[1].fields) == len(spec.fields)
