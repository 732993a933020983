"""What the database holds: ciphertext only, legacy rows still readable, corrupt rows reported and repairable.

Every row is read or written with raw SQL behind the running service's back,
and every stored value is read the way docs/encryption-format.md describes, by
the tests' own implementation of the format (tests/integration/raw_rows.py),
not by the service's crypto module. Both stores.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.harness import OTHER_KEY, TEST_KEY, Running, get, new_org, refused, rich_error, save, values_of
from tests.integration.raw_rows import (
    V2_PREFIX,
    blob_offset,
    decrypt,
    documented_write_prefix,
    encrypt_v1,
    insert_dashboard_row,
    is_encrypted,
    overwrite_config,
    raw_row,
    reencrypted,
    row_text,
    stored_config,
    tampered,
)

ORG = pb.VALUE_SOURCE_ORGANIZATION
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
MASKED = pb.CONFIG_VIEW_MASKED
SK = "sk_test_51HxAtRestSecret0000004242"
WHSEC = "whsec_atRestWebhookSecret_5555"
PK = "pk_test_51HxAtRestPublishable0001"
# Non-ASCII on purpose: the stored bytes are the UTF-8 encoding.
UNICODE_SECRET = "pässwörd ✓ anti-phishing 9876"
WRITTEN = documented_write_prefix()


# --- ciphertext at rest ----------------------------------------------------------------------------


async def test_saved_values_are_stored_as_documented_ciphertext_only(located: tuple[Running, str, str]) -> None:
    svc, kind, where = located
    org = new_org()
    saved = {
        "stripe": {"secretKey": SK, "webhookSecret": WHSEC, "publishableKey": PK},
        "ifthenpay": {"antiPhishingKey": UNICODE_SECRET, "mbKey": "MB-KEY-000777"},
    }
    for provider, values in saved.items():
        await save(svc, org, provider, **values)

    for provider, values in saved.items():
        row = await raw_row(kind, where, org, provider)
        stored = json.loads(str(row["config"]))
        assert set(stored) == set(values)
        text = row_text(row)
        for key, plaintext in values.items():
            assert is_encrypted(stored[key]), f"{provider}.{key} is stored as {stored[key]!r}"
            assert stored[key].startswith(WRITTEN), f"{provider}.{key} is not in the documented format {WRITTEN}"
            assert plaintext not in text, f"{provider}.{key} appears in clear in the row"
            # Read as docs/encryption-format.md says, with the key the service was given.
            assert decrypt(stored[key], TEST_KEY, org, provider, key) == plaintext

    if kind == "sqlite":
        # At rest means the file too: the database, its WAL and shared memory, not just the query result.
        files = [path for path in Path(where).parent.iterdir() if path.name.startswith(Path(where).name)]
        assert files
        contents = b"".join(path.read_bytes() for path in files)
        for values in saved.values():
            for plaintext in values.values():
                assert plaintext.encode() not in contents


async def test_the_same_value_saved_twice_is_stored_differently(located: tuple[Running, str, str]) -> None:
    svc, kind, where = located
    org, other = new_org(), new_org()
    await save(svc, org, secretKey=SK)
    first = (await stored_config(kind, where, org, "stripe"))["secretKey"]
    await save(svc, org, secretKey=SK)
    second = (await stored_config(kind, where, org, "stripe"))["secretKey"]
    await save(svc, other, secretKey=SK)
    third = (await stored_config(kind, where, other, "stripe"))["secretKey"]

    assert len({first, second, third}) == 3
    # Fresh nonces: the first 12 bytes of the blob differ too, not just the text.
    assert len({value[blob_offset(value) :][:16] for value in (first, second, third)}) == 3
    assert {decrypt(value, TEST_KEY, org, "stripe", "secretKey") for value in (first, second)} == {SK}
    assert decrypt(third, TEST_KEY, other, "stripe", "secretKey") == SK


# --- legacy rows written by the dashboard -----------------------------------------------------------


async def test_dashboard_rows_with_plaintext_and_encrypted_values_are_read(
    located: tuple[Running, str, str],
) -> None:
    svc, kind, where = located
    org = new_org()
    legacy_plain_secret = "sk_test_legacyPlaintextSecret1111"
    legacy_encrypted_webhook = "whsec_legacyEncryptedWebhook2222"
    await insert_dashboard_row(
        kind,
        where,
        org,
        "stripe",
        {
            "secretKey": legacy_plain_secret,  # written before the dashboard encrypted anything
            "webhookSecret": encrypt_v1(legacy_encrypted_webhook, TEST_KEY),  # the dashboard's format
        },
    )

    clear = await get(svc, org, view=DECRYPTED)
    assert values_of(clear)["secretKey"] == (legacy_plain_secret, ORG)
    assert values_of(clear)["webhookSecret"] == (legacy_encrypted_webhook, ORG)
    masked = await get(svc, org, view=MASKED)
    assert values_of(masked)["secretKey"] == ("••••••••1111", ORG)
    assert values_of(masked)["webhookSecret"] == ("••••••••2222", ORG)
    assert masked.etag

    # A save of another field (with the etag read from the legacy row) keeps both legacy values readable.
    after_save = await svc.stub.SaveIntegration(
        pb.SaveIntegrationRequest(
            organization_id=org,
            provider="stripe",
            values={"publishableKey": PK},
            etag=masked.etag,
        )
    )
    assert values_of(after_save.config)["secretKey"] == ("••••••••1111", ORG)
    assert values_of(await get(svc, org, view=DECRYPTED)) == {
        "secretKey": (legacy_plain_secret, ORG),
        "webhookSecret": (legacy_encrypted_webhook, ORG),
        "publishableKey": (PK, ORG),
    }
    stored = await stored_config(kind, where, org, "stripe")
    assert is_encrypted(stored["publishableKey"])
    assert decrypt(stored["publishableKey"], TEST_KEY, org, "stripe", "publishableKey") == PK

    providers = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    stripe = next(p for p in providers.providers if p.id == "stripe")
    assert (stripe.configured, stripe.ready) == (True, True)


async def test_saving_a_legacy_plaintext_field_encrypts_it(located: tuple[Running, str, str]) -> None:
    svc, kind, where = located
    org = new_org()
    await insert_dashboard_row(
        kind, where, org, "easypay", {"accountId": "acc-legacy", "apiKey": "legacy-api-key-0001"}
    )
    await save(svc, org, "easypay", apiKey="replacement-api-key-0002")
    row = await raw_row(kind, where, org, "easypay")
    assert "replacement-api-key-0002" not in row_text(row)
    assert "legacy-api-key-0001" not in row_text(row)
    assert values_of(await get(svc, org, "easypay", view=DECRYPTED))["apiKey"] == ("replacement-api-key-0002", ORG)
    assert values_of(await get(svc, org, "easypay", view=DECRYPTED))["accountId"] == ("acc-legacy", ORG)


# --- corrupt rows: tampered, wrong key, unknown format -------------------------------------------

CORRUPTIONS = {
    "tampered": lambda stored, org: tampered(stored),
    # The same format and key id, but under a key the service does not have.
    "other_key": lambda stored, org: reencrypted(stored, OTHER_KEY, org, "stripe", "secretKey", SK),
    "unknown_version": lambda stored, org: "enc:v9:" + stored[blob_offset(stored) :],
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
async def test_an_undecryptable_value_is_data_loss_naming_where_it_is_and_a_save_repairs_it(
    located: tuple[Running, str, str], corruption: str
) -> None:
    svc, kind, where = located
    org = new_org()
    await save(svc, org, secretKey=SK, publishableKey=PK)
    stored = await stored_config(kind, where, org, "stripe")
    bad_value = CORRUPTIONS[corruption](stored["secretKey"], org)
    assert bad_value != stored["secretKey"]
    await overwrite_config(kind, where, org, "stripe", {**stored, "secretKey": bad_value})

    for view in (DECRYPTED, MASKED, pb.CONFIG_VIEW_UNSPECIFIED):
        error = rich_error(await refused(get(svc, org, view=view)))
        assert error.code is grpc.StatusCode.DATA_LOSS
        assert org in error.message
        assert "'stripe'" in error.message
        assert "'secretKey'" in error.message
        assert error.request_id
        for leaked in (bad_value, bad_value[blob_offset(stored["secretKey"]) :], stored["secretKey"], SK, PK):
            assert leaked not in error.message

    # The server keeps serving everyone else.
    other = new_org()
    await save(svc, other, secretKey="sk_test_unaffectedOrganization77")
    assert values_of(await get(svc, other, view=DECRYPTED))["secretKey"] == ("sk_test_unaffectedOrganization77", ORG)

    # ListProviders only looks at which fields are stored: it does not decrypt, so it still answers.
    providers = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    stripe = next(p for p in providers.providers if p.id == "stripe")
    assert stripe.configured

    # Saving a new value for the broken field repairs the row; the other field is untouched.
    repaired = await save(svc, org, secretKey="sk_test_repairedSecretValue9999")
    assert values_of(repaired)["secretKey"] == ("••••••••9999", ORG)
    assert values_of(await get(svc, org, view=DECRYPTED)) == {
        "secretKey": ("sk_test_repairedSecretValue9999", ORG),
        "webhookSecret": ("", pb.VALUE_SOURCE_UNSET),
        "publishableKey": (PK, ORG),
    }
    repaired_stored = (await stored_config(kind, where, org, "stripe"))["secretKey"]
    assert decrypt(repaired_stored, TEST_KEY, org, "stripe", "secretKey") == "sk_test_repairedSecretValue9999"


async def test_a_value_copied_into_another_organizations_row_does_not_decrypt(
    located: tuple[Running, str, str],
) -> None:
    """enc:v2 binds each value to its organization, provider and field (docs/encryption-format.md)."""
    svc, kind, where = located
    victim, attacker = new_org(), new_org()
    await save(svc, victim, secretKey=SK)
    await save(svc, attacker, secretKey="sk_test_attackersOwnKey00001234", publishableKey=PK)
    stolen = (await stored_config(kind, where, victim, "stripe"))["secretKey"]
    if WRITTEN != V2_PREFIX:
        pytest.skip(f"docs/encryption-format.md says the service writes {WRITTEN}, which is not bound to its row")
    assert stolen.startswith(V2_PREFIX)
    attacker_row = await stored_config(kind, where, attacker, "stripe")
    # Into another organization's row, and into another field of the same row.
    await overwrite_config(kind, where, attacker, "stripe", {**attacker_row, "secretKey": stolen})
    await overwrite_config(kind, where, victim, "stripe", {"secretKey": stolen, "webhookSecret": stolen})
    for org, field in ((attacker, "secretKey"), (victim, "webhookSecret")):
        error = rich_error(await refused(get(svc, org)))
        assert error.code is grpc.StatusCode.DATA_LOSS
        assert f"'{field}'" in error.message
        assert SK not in error.message


async def insert_row_under_other_key(kind: str, where: str, org: str) -> None:
    """A whole row encrypted under a key the service does not have (say, one rotated away)."""
    await insert_dashboard_row(
        kind,
        where,
        org,
        "easypay",
        {
            "accountId": encrypt_v1("acc-under-other-key", OTHER_KEY),
            "apiKey": encrypt_v1("api-key-under-other-key", OTHER_KEY),
        },
    )


EASYPAY_FIELDS = ("accountId", "apiKey", "baseUrl")
NEW_EASYPAY = {"accountId": "acc-new", "apiKey": "api-key-new", "baseUrl": "https://api.test.easypay.pt/2.0"}


async def test_a_row_under_another_key_is_repaired_by_saving_all_its_fields_or_deleting_it(
    located: tuple[Running, str, str],
) -> None:
    svc, kind, where = located
    org, deleted = new_org(), new_org()
    for organization in (org, deleted):
        await insert_row_under_other_key(kind, where, organization)

    error = rich_error(await refused(get(svc, org, "easypay")))
    assert error.code is grpc.StatusCode.DATA_LOSS
    assert org in error.message
    assert "'easypay'" in error.message
    assert "acc-under-other-key" not in error.message

    await save(svc, org, "easypay", accountId="acc-new", apiKey="api-key-new")
    clear = values_of(await get(svc, org, "easypay", view=DECRYPTED))
    assert (clear["accountId"], clear["apiKey"]) == (("acc-new", ORG), ("api-key-new", ORG))

    # DeleteIntegration does not decrypt: it is the other way out.
    await svc.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=deleted, provider="easypay"))
    assert values_of(await get(svc, deleted, "easypay", view=DECRYPTED))["apiKey"] == ("", pb.VALUE_SOURCE_UNSET)


async def test_following_the_data_loss_advice_repairs_a_row_with_several_broken_fields(
    located: tuple[Running, str, str],
) -> None:
    """What an operator does: read the error, save new values for the fields it names, repeat."""
    svc, kind, where = located
    org = new_org()
    await insert_row_under_other_key(kind, where, org)
    for _ in EASYPAY_FIELDS:
        try:
            await get(svc, org, "easypay", view=DECRYPTED)
            break
        except grpc.aio.AioRpcError as failure:
            error = rich_error(failure)
        assert error.code is grpc.StatusCode.DATA_LOSS
        named = {key: NEW_EASYPAY[key] for key in EASYPAY_FIELDS if f"'{key}'" in error.message}
        assert named, error.message
        await save(svc, org, "easypay", **named)  # the advice of the message
    clear = values_of(await get(svc, org, "easypay", view=DECRYPTED))
    assert (clear["accountId"], clear["apiKey"]) == (("acc-new", ORG), ("api-key-new", ORG))
