"""The credential service's use cases on the in-memory store, through the real cipher and audit trail.

What an RPC would answer and what the store holds afterwards: resolution and
masking of reads, merging, clearing and etags of saves, refusals that change
nothing, and the audit records of changes.
"""

from __future__ import annotations

import pytest

from integrations_service.crypto import ValueCipher, legacy_format
from integrations_service.domain.audit import OUTCOME_OK, AuditTrail
from integrations_service.domain.masking import MASK
from integrations_service.domain.registry import PROVIDERS, Category
from integrations_service.domain.resolution import ConfigView, EffectiveConfig, ValueSource
from integrations_service.domain.service import (
    RPC_DELETE,
    RPC_GET,
    RPC_SAVE,
    DeleteRequest,
    ReadRequest,
    SaveRequest,
    etag_of,
)
from integrations_service.domain.validation import INTEGRATION_RESOURCE, PROVIDER_RESOURCE
from integrations_service.errors import Conflict, CorruptCredential, InvalidArgument, NotFound
from integrations_service.sealing import LegacyPolicy, LegacyValues
from integrations_service.store.memory import MemoryDatabase
from tests.unit.seam import (
    CALLER,
    FIXED_TIME,
    ServiceFactory,
    audit_records,
    listed_status,
    put_row,
    sealed,
    stored_clear,
    stored_config,
)

ORG = "org-unit-1"
SECRET = "sk_test_ServiceUnit00000000001"
WEBHOOK = "whsec_ServiceUnit000000001"
PUBLISHABLE = "pk_test_ServiceUnit0001"
STRIPE = {"secretKey": SECRET, "webhookSecret": WEBHOOK, "publishableKey": PUBLISHABLE}
ENV = {
    "STRIPE_SECRET_KEY": "sk_test_PlatformDefault000000001",
    "STRIPE_WEBHOOK_SECRET": "whsec_PlatformDefault0000001",
    "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": "pk_test_PlatformDefault01",
    "RESEND_API_KEY": "re_PlatformDefault00000001",
    "RESEND_FROM_ADDRESS": "Platform <mail@platform.example>",
    "EASYPAY_API_KEY": "easypay-platform-api-key-0001",
    "EASYPAY_ACCOUNT_ID": "platform-account",
    "EASYPAY_BASE_URL": "https://api.easypay.example",
}


def shown(config: EffectiveConfig) -> dict[str, tuple[str, ValueSource]]:
    return {key: (value.value, value.source) for key, value in config.values.items()}


# --- ListProviders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("category", [None, *Category], ids=lambda c: c.value if c else "all")
async def test_the_catalog_without_an_organization(make_service: ServiceFactory, category: Category | None) -> None:
    listed = await make_service().list_providers("", category)
    assert [status.spec for status in listed] == [p for p in PROVIDERS if category in (None, p.category)]
    assert {(status.configured, status.ready) for status in listed} == {(None, None)}


async def test_listing_an_organization_says_what_is_configured_and_ready(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "stripe", sealed(cipher, ORG, "stripe", STRIPE))
    # Its own API key with the platform's sender: ready.
    put_row(database, ORG, "resend", sealed(cipher, ORG, "resend", {"apiKey": "re_OwnKey000000000001"}))
    # Its own endpoint: the platform's API key is withheld, so not ready.
    put_row(database, ORG, "easypay", sealed(cipher, ORG, "easypay", {"baseUrl": "https://own.example"}))
    put_row(database, "another-org", "ifthenpay", sealed(cipher, "another-org", "ifthenpay", {"mbKey": "x"}))

    listed = await make_service(ENV).list_providers(ORG, None)

    assert {s.spec.id: (s.configured, s.ready) for s in listed} == {
        "stripe": (True, True),
        "easypay": (True, False),
        "ifthenpay": (False, False),
        "resend": (True, True),
        "smtp": (False, False),
        "google_analytics": (False, False),
    }


async def test_a_legacy_value_refused_by_policy_is_configured_but_never_ready(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    put_row(
        database,
        ORG,
        "stripe",
        {"secretKey": SECRET}
        | sealed(cipher, ORG, "stripe", {"webhookSecret": WEBHOOK, "publishableKey": PUBLISHABLE}),
    )
    refusing = make_service(legacy=LegacyPolicy(LegacyValues.REFUSE))
    assert await listed_status(refusing, ORG, "stripe") == (True, False)
    assert await listed_status(make_service(), ORG, "stripe") == (True, True)


async def test_listing_a_malformed_organization_names_the_field(make_service: ServiceFactory) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await make_service().list_providers("org with spaces", None)
    assert [v.field for v in refused.value.violations] == ["organization_id"]


# --- GetProviderConfig ------------------------------------------------------------------------------------


async def test_a_masked_read_resolves_each_field_and_masks_secrets(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "stripe", sealed(cipher, ORG, "stripe", {"secretKey": SECRET}))

    config = await make_service(ENV).get_config(ReadRequest(ORG, "stripe", ConfigView.MASKED), CALLER)

    assert shown(config) == {
        "secretKey": (MASK + SECRET[-4:], ValueSource.ORGANIZATION),
        # The platform's secret: nothing of it, not even its last 4 characters.
        "webhookSecret": (MASK, ValueSource.ENVIRONMENT),
        "publishableKey": (ENV["NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY"], ValueSource.ENVIRONMENT),
    }
    row = database.rows[(ORG, "stripe")]
    assert (config.etag, config.update_time) == (etag_of(row), FIXED_TIME)


async def test_a_decrypted_read_returns_the_clear_values(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "stripe", sealed(cipher, ORG, "stripe", STRIPE))

    config = await make_service(ENV).get_config(ReadRequest(ORG, "stripe", ConfigView.DECRYPTED), CALLER)

    assert shown(config) == {key: (value, ValueSource.ORGANIZATION) for key, value in STRIPE.items()}


async def test_decrypted_reads_are_audited_and_masked_reads_are_not(
    database: MemoryDatabase, cipher: ValueCipher, audit: AuditTrail, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "stripe", sealed(cipher, ORG, "stripe", STRIPE))
    service = make_service()

    await service.get_config(ReadRequest(ORG, "stripe", ConfigView.MASKED), CALLER)
    await audit.flush()
    assert audit_records(database, RPC_GET) == []

    await service.get_config(ReadRequest(ORG, "stripe", ConfigView.DECRYPTED), CALLER)
    await audit.flush()
    [record] = audit_records(database, RPC_GET)
    assert (record.caller, record.request_id, record.outcome) == (CALLER.identity, CALLER.request_id, OUTCOME_OK)
    assert (record.organization_id, record.provider) == (ORG, "stripe")
    assert set(record.fields) == set(STRIPE)


async def test_reading_what_was_never_stored_is_the_environment(make_service: ServiceFactory) -> None:
    config = await make_service(ENV).get_config(ReadRequest(ORG, "resend", ConfigView.DECRYPTED), CALLER)
    assert shown(config) == {
        "apiKey": (ENV["RESEND_API_KEY"], ValueSource.ENVIRONMENT),
        "fromAddress": (ENV["RESEND_FROM_ADDRESS"], ValueSource.ENVIRONMENT),
    }
    assert (config.etag, config.update_time) == ("", None)


async def test_a_value_moved_from_another_organization_is_refused_naming_the_field(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    moved = sealed(cipher, "another-org", "stripe", {"secretKey": SECRET})
    put_row(database, ORG, "stripe", moved | sealed(cipher, ORG, "stripe", {"webhookSecret": WEBHOOK}))

    for view in ConfigView:
        with pytest.raises(CorruptCredential) as refused:
            await make_service().get_config(ReadRequest(ORG, "stripe", view), CALLER)
        assert (refused.value.organization_id, refused.value.provider, refused.value.fields) == (
            ORG,
            "stripe",
            ("secretKey",),
        )
        assert SECRET not in refused.value.message


async def test_legacy_plaintext_is_served_and_counted_or_refused_by_policy(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "stripe", {"secretKey": SECRET})
    read: list[tuple[str, str]] = []
    refused: list[tuple[str, str]] = []

    def count_read(legacy: str, provider: str) -> None:
        read.append((legacy, provider))

    def count_refused(legacy: str, provider: str) -> None:
        refused.append((legacy, provider))

    reading = make_service(legacy=LegacyPolicy(LegacyValues.READ, count_read, count_refused))
    config = await reading.get_config(ReadRequest(ORG, "stripe", ConfigView.DECRYPTED), CALLER)
    assert config.values["secretKey"].value == SECRET
    assert (read, refused) == ([("plaintext", "stripe")], [])

    refusing = make_service(legacy=LegacyPolicy(LegacyValues.REFUSE, count_read, count_refused))
    with pytest.raises(CorruptCredential) as caught:
        await refusing.get_config(ReadRequest(ORG, "stripe", ConfigView.DECRYPTED), CALLER)
    assert caught.value.fields == ("secretKey",)
    assert refused == [("plaintext", "stripe")]


async def test_an_unknown_provider_is_not_found(make_service: ServiceFactory) -> None:
    with pytest.raises(NotFound) as missing:
        await make_service().get_config(ReadRequest(ORG, "paypal", ConfigView.MASKED), CALLER)
    assert (missing.value.resource_type, missing.value.resource_name) == (PROVIDER_RESOURCE, "paypal")


# --- SaveIntegration --------------------------------------------------------------------------------------


async def test_a_save_stores_ciphertext_bound_to_each_field_and_answers_masked(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    config = await make_service().save(SaveRequest(ORG, "stripe", STRIPE, (), ""), CALLER)

    stored = stored_config(database, ORG, "stripe")
    assert set(stored) == set(STRIPE)
    assert all(map(cipher.is_current, stored.values()))
    assert not any(value in "".join(stored.values()) for value in STRIPE.values())
    assert stored_clear(database, cipher, ORG, "stripe") == STRIPE
    assert shown(config) == {
        "secretKey": (MASK + SECRET[-4:], ValueSource.ORGANIZATION),
        "webhookSecret": (MASK + WEBHOOK[-4:], ValueSource.ORGANIZATION),
        "publishableKey": (PUBLISHABLE, ValueSource.ORGANIZATION),
    }
    assert config.etag == etag_of(database.rows[(ORG, "stripe")])


async def test_a_save_is_audited_in_its_own_write_with_fingerprints_never_values(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    await make_service().save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    await make_service().save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, ("secretKey",), ""), CALLER)

    # Written with the change (no flush needed).
    first, second = audit_records(database, RPC_SAVE)
    assert (first.caller, first.outcome, first.fields) == (CALLER.identity, OUTCOME_OK, ("secretKey",))
    assert dict(first.details) == {"fingerprint.secretKey": cipher.fingerprint(SECRET)}
    assert second.fields == ("secretKey", "webhookSecret")
    assert dict(second.details) == {
        "fingerprint.webhookSecret": cipher.fingerprint(WEBHOOK),
        "cleared.secretKey": "true",
    }
    assert not any(value in str(record) for record in (first, second) for value in (SECRET, WEBHOOK))


async def test_a_save_merges_with_what_is_stored_and_leaves_untouched_ciphertext_alone(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    service = make_service()
    both = {"secretKey": SECRET, "publishableKey": PUBLISHABLE}
    first = await service.save(SaveRequest(ORG, "stripe", both, (), ""), CALLER)
    kept = stored_config(database, ORG, "stripe")["secretKey"]

    second = await service.save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), first.etag), CALLER)

    assert stored_config(database, ORG, "stripe")["secretKey"] == kept
    assert stored_clear(database, cipher, ORG, "stripe") == STRIPE
    assert database.rows[(ORG, "stripe")].version == 2
    assert second.etag not in ("", first.etag)
    assert {key: value.source for key, value in second.values.items()} == dict.fromkeys(
        STRIPE, ValueSource.ORGANIZATION
    )


async def test_clearing_a_field_removes_it_and_the_environment_shows_through(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    service = make_service(ENV)
    await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET, "webhookSecret": WEBHOOK}, (), ""), CALLER)

    config = await service.save(SaveRequest(ORG, "stripe", {}, ("webhookSecret",), ""), CALLER)

    assert set(stored_config(database, ORG, "stripe")) == {"secretKey"}
    assert shown(config)["webhookSecret"] == (MASK, ValueSource.ENVIRONMENT)


async def test_a_save_of_one_field_encrypts_a_kept_legacy_plaintext_value(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "stripe", {"secretKey": SECRET})

    await make_service().save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), ""), CALLER)

    stored = stored_config(database, ORG, "stripe")
    assert [legacy_format(v) for v in stored.values()] == [None, None]
    assert stored_clear(database, cipher, ORG, "stripe") == {"secretKey": SECRET, "webhookSecret": WEBHOOK}


async def test_a_save_of_one_field_leaves_a_kept_empty_value_unset(
    database: MemoryDatabase, make_service: ServiceFactory
) -> None:
    put_row(database, ORG, "ifthenpay", {"antiPhishingKey": ""})  # the only required field, unset
    service = make_service()

    await service.save(SaveRequest(ORG, "ifthenpay", {"mbKey": "mb-key-0001"}, (), ""), CALLER)

    assert await listed_status(service, ORG, "ifthenpay") == (True, False)
    read = await service.get_config(ReadRequest(ORG, "ifthenpay", ConfigView.DECRYPTED), CALLER)
    assert read.values["antiPhishingKey"].source is ValueSource.UNSET


@pytest.mark.parametrize(
    ("etag_of_state", "why"),
    [("changed", "changed"), ("deleted", "deleted")],
)
async def test_a_stale_etag_is_a_conflict_and_changes_nothing(
    etag_of_state: str, why: str, database: MemoryDatabase, audit: AuditTrail, make_service: ServiceFactory
) -> None:
    service = make_service()
    read = await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    if etag_of_state == "changed":
        await service.save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), ""), CALLER)
    else:
        await service.delete(DeleteRequest(ORG, "stripe", allow_missing=False, etag=""), CALLER)
    before = dict(database.rows)
    saves = len(audit_records(database, RPC_SAVE))

    with pytest.raises(Conflict, match=why):
        await service.save(SaveRequest(ORG, "stripe", {"publishableKey": PUBLISHABLE}, (), read.etag), CALLER)

    assert database.rows == before
    await audit.flush()
    assert [r.outcome for r in audit_records(database, RPC_SAVE)][saves:] == ["Conflict"]


async def test_a_save_with_the_current_etag_goes_through(
    database: MemoryDatabase, make_service: ServiceFactory
) -> None:
    service = make_service()
    read = await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    await service.save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), read.etag), CALLER)
    assert set(stored_config(database, ORG, "stripe")) == {"secretKey", "webhookSecret"}


INVALID_SAVES = [
    pytest.param({"nope": "x"}, [], ["values.nope"], id="unknown field"),
    pytest.param({"secretKey": ""}, [], ["values.secretKey"], id="empty value"),
    pytest.param({"secretKey": MASK + "0001"}, [], ["values.secretKey"], id="a masked value sent back"),
    pytest.param({"secretKey": "pk_test_wrongKind000001"}, [], ["values.secretKey"], id="wrong format"),
    pytest.param({"secretKey": "sk_test_" + "x" * 5000}, [], ["values.secretKey"], id="too long"),
    pytest.param({}, ["nope"], ["clear_fields[0]"], id="clearing an unknown field"),
    pytest.param({"secretKey": SECRET}, ["secretKey"], ["clear_fields[0]"], id="set and cleared"),
    pytest.param({}, ["secretKey", "secretKey"], ["clear_fields[1]"], id="cleared twice"),
    pytest.param({}, [], ["values"], id="nothing to do"),
    pytest.param(
        {"secretKey": "sk_live_MixedModes0000000001", "publishableKey": "pk_test_Mixed0001"},
        [],
        ["values.publishableKey", "values.secretKey"],
        id="stripe test and live keys mixed",
    ),
    pytest.param(
        {"nope": "x", "webhookSecret": "not-a-webhook-secret"},
        ["other"],
        ["values.nope", "values.webhookSecret", "clear_fields[0]"],
        id="every problem at once",
    ),
]


@pytest.mark.parametrize(("values", "clear_fields", "fields"), INVALID_SAVES)
async def test_an_invalid_save_names_every_bad_field_and_changes_nothing(
    values: dict[str, str],
    clear_fields: list[str],
    fields: list[str],
    database: MemoryDatabase,
    make_service: ServiceFactory,
) -> None:
    service = make_service()
    await service.save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), ""), CALLER)
    before = dict(database.rows)

    with pytest.raises(InvalidArgument) as refused:
        await service.save(SaveRequest(ORG, "stripe", values, tuple(clear_fields), ""), CALLER)

    assert sorted(v.field for v in refused.value.violations) == sorted(fields)
    assert database.rows == before
    assert len(audit_records(database, RPC_SAVE)) == 1  # the first save only: a refusal is no change


async def test_a_cross_field_rule_is_checked_against_what_is_already_stored(
    database: MemoryDatabase, make_service: ServiceFactory
) -> None:
    service = make_service()
    await service.save(SaveRequest(ORG, "stripe", {"secretKey": "sk_live_StoredLiveKey00000001"}, (), ""), CALLER)
    before = dict(database.rows)

    with pytest.raises(InvalidArgument) as refused:
        await service.save(SaveRequest(ORG, "stripe", {"publishableKey": "pk_test_NewTestKey01"}, (), ""), CALLER)

    assert sorted(v.field for v in refused.value.violations) == ["values.publishableKey", "values.secretKey"]
    assert database.rows == before


@pytest.mark.parametrize(
    ("organization_id", "provider", "error", "field"),
    [
        ("", "stripe", InvalidArgument, "organization_id"),
        ("org with spaces", "stripe", InvalidArgument, "organization_id"),
        ("x" * 129, "stripe", InvalidArgument, "organization_id"),
        (ORG, "", InvalidArgument, "provider"),
        (ORG, "paypal", NotFound, None),
    ],
    ids=["no organization", "spaces", "too long", "no provider", "unknown provider"],
)
async def test_a_save_to_a_bad_target_is_refused_and_stores_nothing(
    organization_id: str,
    provider: str,
    error: type[Exception],
    field: str | None,
    database: MemoryDatabase,
    make_service: ServiceFactory,
) -> None:
    with pytest.raises(error) as refused:
        await make_service().save(SaveRequest(organization_id, provider, {"secretKey": SECRET}, (), ""), CALLER)
    if isinstance(refused.value, InvalidArgument):
        assert [v.field for v in refused.value.violations] == [field]
    assert database.rows == {}


async def test_a_save_keeping_an_undecryptable_field_is_refused_and_one_replacing_it_succeeds(
    database: MemoryDatabase, cipher: ValueCipher, make_service: ServiceFactory
) -> None:
    moved = sealed(cipher, "another-org", "stripe", {"secretKey": SECRET})
    put_row(database, ORG, "stripe", moved)
    service = make_service()

    with pytest.raises(CorruptCredential) as refused:
        await service.save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), ""), CALLER)
    assert refused.value.fields == ("secretKey",)
    assert stored_config(database, ORG, "stripe") == moved

    await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    assert stored_clear(database, cipher, ORG, "stripe") == {"secretKey": SECRET}


# --- DeleteIntegration ------------------------------------------------------------------------------------


async def test_a_delete_with_the_current_etag_removes_the_row_and_is_audited(
    database: MemoryDatabase, make_service: ServiceFactory
) -> None:
    service = make_service()
    read = await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)

    await service.delete(DeleteRequest(ORG, "stripe", allow_missing=False, etag=read.etag), CALLER)

    assert (ORG, "stripe") not in database.rows
    [record] = audit_records(database, RPC_DELETE)
    assert (record.caller, record.outcome, record.organization_id, record.provider) == (
        CALLER.identity,
        OUTCOME_OK,
        ORG,
        "stripe",
    )


async def test_a_delete_with_a_stale_etag_keeps_the_row(database: MemoryDatabase, make_service: ServiceFactory) -> None:
    service = make_service()
    read = await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    await service.save(SaveRequest(ORG, "stripe", {"webhookSecret": WEBHOOK}, (), ""), CALLER)
    before = dict(database.rows)

    with pytest.raises(Conflict):
        await service.delete(DeleteRequest(ORG, "stripe", allow_missing=False, etag=read.etag), CALLER)

    assert database.rows == before
    assert [r.outcome for r in audit_records(database, RPC_DELETE)] == []


async def test_deleting_what_is_not_there(database: MemoryDatabase, make_service: ServiceFactory) -> None:
    service = make_service()
    with pytest.raises(NotFound) as missing:
        await service.delete(DeleteRequest(ORG, "stripe", allow_missing=False, etag=""), CALLER)
    assert (missing.value.resource_type, missing.value.resource_name) == (
        INTEGRATION_RESOURCE,
        f"organizations/{ORG}/integrations/stripe",
    )

    await service.delete(DeleteRequest(ORG, "stripe", allow_missing=True, etag=""), CALLER)  # no error
    assert [r for r in audit_records(database, RPC_DELETE) if r.outcome == OUTCOME_OK] == []


async def test_a_delete_then_save_gets_a_new_etag(database: MemoryDatabase, make_service: ServiceFactory) -> None:
    service = make_service()
    first = await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    await service.delete(DeleteRequest(ORG, "stripe", allow_missing=False, etag=first.etag), CALLER)
    again = await service.save(SaveRequest(ORG, "stripe", {"secretKey": SECRET}, (), ""), CALLER)
    assert again.etag != first.etag
