"""Legacy stored values (plaintext, `enc:v1:`) and stored configs that are not JSON objects.

Rows are written with raw SQL behind the running service's back, the way the
old dashboard (or an attacker with write access to the table) writes them.
Both stores; the metrics are read from the service's real /metrics endpoint.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.harness import TEST_KEY, Running, get, new_org, refused, rich_error, save, start_service, values_of
from tests.integration.raw_rows import (
    DEFAULT_KEY_ID,
    V2_PREFIX,
    encrypt_v1,
    encrypt_v2,
    insert_dashboard_row,
    insert_raw_config,
    service_url,
    stored_config,
)
from tests.integration.test_metrics import sample, scrape
from tests.processes import clean_env, own_store_location, run_cli

DECRYPTED = pb.CONFIG_VIEW_DECRYPTED
MASKED = pb.CONFIG_VIEW_MASKED
ORG = pb.VALUE_SOURCE_ORGANIZATION
PLAIN_SECRET = "sk_test_plantedInClear_0000123456"
V1_WEBHOOK = "whsec_legacyDashboardV1_98765"
NEW_SECRET = "sk_test_51NewGenuineSecret0000777"
NEW_WEBHOOK = "whsec_newGenuineWebhook_4444"
REFUSE = {"INTEGRATIONS_LEGACY_VALUES": "refuse"}

Location = tuple[str, str]


@pytest.fixture
def own_store(store_location: Location, request: pytest.FixtureRequest) -> Location:
    """A store of the test's own: rotate rewraps every row, so its report counts must be exact."""
    return own_store_location(store_location, request)


async def running(location: Location, tmp_path: Path, env: dict[str, str] | None = None) -> Running:
    return await start_service(service_url(*location), tmp_path, env or {})


@pytest.fixture
async def reading(own_store: Location, tmp_path: Path) -> AsyncIterator[Running]:
    svc = await running(own_store, tmp_path)
    yield svc
    await svc.close()


@pytest.fixture
async def refusing(own_store: Location, tmp_path: Path) -> AsyncIterator[Running]:
    svc = await running(own_store, tmp_path, REFUSE)
    yield svc
    await svc.close()


async def plant_legacy_row(location: Location, org: str) -> None:
    """secretKey in clear (what an attacker with table access writes), webhookSecret in the dashboard's v1."""
    await insert_dashboard_row(
        *location,
        org,
        "stripe",
        {
            "secretKey": PLAIN_SECRET,
            "webhookSecret": encrypt_v1(V1_WEBHOOK, TEST_KEY),
        },
    )


def legacy_sample(text: str, name: str, fmt: str) -> float:
    """The series exists before its first value (at 0): `sample` fails on a missing one."""
    return sample(text, name, format=fmt, provider="stripe")


# --- read (the default): served, and counted -------------------------------------------------------


async def test_legacy_values_are_served_and_counted_by_default(reading: Running, own_store: Location) -> None:
    org = new_org()
    await plant_legacy_row(own_store, org)

    config = await get(reading, org, view=DECRYPTED)

    assert values_of(config)["secretKey"] == (PLAIN_SECRET, ORG)
    assert values_of(config)["webhookSecret"] == (V1_WEBHOOK, ORG)
    metrics = await scrape(reading)
    assert legacy_sample(metrics, "integrations_legacy_values_read_total", "plaintext") == 1
    assert legacy_sample(metrics, "integrations_legacy_values_read_total", "v1") == 1
    assert legacy_sample(metrics, "integrations_legacy_values_refused_total", "plaintext") == 0


async def test_a_row_holding_plaintext_is_never_kept_in_the_row_cache(reading: Running, own_store: Location) -> None:
    """No clear text cached in the service: each read of a legacy plaintext row reads the store (a miss); a row
    the service sealed is read once, then from memory (a hit)."""
    legacy, sealed = new_org(), new_org()
    await plant_legacy_row(own_store, legacy)
    await save(reading, sealed, secretKey=NEW_SECRET)
    for org in (legacy, legacy, sealed, sealed):
        await get(reading, org, view=DECRYPTED)
    metrics = await scrape(reading)
    assert sample(metrics, "integrations_cache_requests_total", result="hit") == 1
    assert sample(metrics, "integrations_cache_requests_total", result="miss") == 3


# --- refuse: DATA_LOSS naming organization, provider and field ---------------------------------------


@pytest.mark.parametrize("view", [DECRYPTED, MASKED])
async def test_refused_legacy_values_answer_data_loss_naming_where_never_what(
    refusing: Running, own_store: Location, view: int
) -> None:
    org = new_org()
    await plant_legacy_row(own_store, org)

    error = rich_error(await refused(get(refusing, org, view=view)))

    assert error.code is grpc.StatusCode.DATA_LOSS
    for name in (org, "stripe", "secretKey", "webhookSecret", "INTEGRATIONS_LEGACY_VALUES=refuse"):
        assert name in error.message
    assert PLAIN_SECRET not in error.message
    assert PLAIN_SECRET[-4:] not in error.message
    metrics = await scrape(refusing)
    assert legacy_sample(metrics, "integrations_legacy_values_refused_total", "plaintext") == 1
    assert legacy_sample(metrics, "integrations_legacy_values_refused_total", "v1") == 1
    assert legacy_sample(metrics, "integrations_legacy_values_read_total", "plaintext") == 0
    listing = await refusing.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    assert {p.id: (p.configured, p.ready) for p in listing.providers}["stripe"] == (True, False)


async def test_a_save_of_other_fields_never_blesses_a_refused_value(refusing: Running, own_store: Location) -> None:
    org = new_org()
    await plant_legacy_row(own_store, org)
    before = await stored_config(*own_store, org, "stripe")

    save = refusing.stub.SaveIntegration(
        pb.SaveIntegrationRequest(
            organization_id=org, provider="stripe", values={"publishableKey": "pk_test_51OtherField000001"}
        )
    )
    error = rich_error(await refused(save))

    assert error.code is grpc.StatusCode.DATA_LOSS
    assert "secretKey" in error.message
    assert await stored_config(*own_store, org, "stripe") == before  # nothing re-encrypted as genuine


async def test_saving_new_values_repairs_a_refused_row(refusing: Running, own_store: Location) -> None:
    org = new_org()
    await plant_legacy_row(own_store, org)

    await refusing.stub.SaveIntegration(
        pb.SaveIntegrationRequest(
            organization_id=org, provider="stripe", values={"secretKey": NEW_SECRET, "webhookSecret": NEW_WEBHOOK}
        )
    )

    config = await get(refusing, org, view=DECRYPTED)
    assert values_of(config)["secretKey"] == (NEW_SECRET, ORG)
    assert values_of(config)["webhookSecret"] == (NEW_WEBHOOK, ORG)
    stored = await stored_config(*own_store, org, "stripe")
    assert all(value.startswith(V2_PREFIX) for value in stored.values())


async def test_an_empty_dashboard_field_is_not_a_refused_value(refusing: Running, own_store: Location) -> None:
    org = new_org()
    genuine = encrypt_v2(NEW_SECRET, TEST_KEY, DEFAULT_KEY_ID, org, "stripe", "secretKey")
    await insert_dashboard_row(*own_store, org, "stripe", {"secretKey": genuine, "publishableKey": ""})

    config = await get(refusing, org, view=DECRYPTED)

    assert values_of(config)["secretKey"] == (NEW_SECRET, ORG)


# --- a stored config that is not a JSON object ---------------------------------------------------------


@pytest.mark.parametrize("text", ['["sk_test_inAnArray"]', '"sk_test_aBareString"', "42"])
async def test_a_config_that_is_not_an_object_is_data_loss_and_the_listing_still_answers(
    reading: Running, own_store: Location, text: str
) -> None:
    org = new_org()
    await insert_raw_config(*own_store, org, "stripe", text)
    resend = {"apiKey": "re_test_fineKey_000111", "fromAddress": "Shop <orders@shop.example>"}
    await reading.stub.SaveIntegration(pb.SaveIntegrationRequest(organization_id=org, provider="resend", values=resend))

    error = rich_error(await refused(get(reading, org)))
    assert error.code is grpc.StatusCode.DATA_LOSS
    assert org in error.message
    assert "stripe" in error.message
    assert "sk_test" not in error.message

    listing = await reading.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    status = {p.id: (p.configured, p.ready) for p in listing.providers}
    assert status["stripe"] == (True, False)  # stored, but nothing in it can be used
    assert status["resend"] == (True, True)
    assert status["easypay"] == (False, False)

    # Deleting the row is the repair; then the provider saves as new.
    await reading.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=org, provider="stripe"))
    await reading.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": NEW_SECRET})
    )
    assert values_of(await get(reading, org, view=DECRYPTED))["secretKey"] == (NEW_SECRET, ORG)


# --- rotate tells the operator when to switch ----------------------------------------------------------


def rotate(location: Location, workdir: Path, extra: dict[str, str] | None = None) -> tuple[int, dict[str, object]]:
    env = clean_env({"DATABASE_URL": service_url(*location), "INTEGRATION_ENCRYPTION_KEY": TEST_KEY, **(extra or {})})
    result = run_cli(["rotate"], workdir, env, timeout=60)
    assert PLAIN_SECRET not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert isinstance(report, dict), result.stderr
    return result.returncode, report


async def test_rotate_reports_the_legacy_values_it_found_and_how_many_remain(
    own_store: Location, tmp_path: Path
) -> None:
    svc = await running(own_store, tmp_path)
    org, broken_org = new_org(), new_org()
    await plant_legacy_row(own_store, org)
    undecryptable_v1 = "enc:v1:bm90IGEgdmFsaWQgdmFsdWUhISEhISEhISE="
    await insert_dashboard_row(*own_store, broken_org, "resend", {"apiKey": undecryptable_v1})
    await insert_raw_config(*own_store, broken_org, "stripe", '["not", "an", "object"]')
    await svc.close()

    code, report = rotate(own_store, tmp_path)
    assert report["legacy_values"] == {"plaintext": 1, "v1": 2}
    assert report["legacy_values_remaining"] == 1  # the v1 value that does not decrypt
    assert len(report["unreadable_rows"]) == 1  # type: ignore[arg-type]
    assert code == 1

    code, report = rotate(own_store, tmp_path)
    assert report["legacy_values"] == {"plaintext": 0, "v1": 1}
    assert report["legacy_values_remaining"] == 1


async def test_rotate_with_refuse_leaves_legacy_values_as_they_are(own_store: Location, tmp_path: Path) -> None:
    svc = await running(own_store, tmp_path)
    org = new_org()
    await plant_legacy_row(own_store, org)
    await svc.close()
    before = await stored_config(*own_store, org, "stripe")

    code, report = rotate(own_store, tmp_path, REFUSE)

    assert report["legacy_values"] == {"plaintext": 1, "v1": 1}
    assert report["legacy_values_remaining"] == 2
    assert code == 1
    assert await stored_config(*own_store, org, "stripe") == before


# --- the setting -------------------------------------------------------------------------------------------


def test_an_unknown_setting_value_stops_the_start_naming_the_variable(tmp_path: Path) -> None:
    env = clean_env({"INTEGRATIONS_LEGACY_VALUES": "ignore", "INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:0"})
    for args in (["serve", "--check"], ["serve"]):
        result = run_cli(args, tmp_path, env, timeout=30)
        assert result.returncode == 2
        assert "INTEGRATIONS_LEGACY_VALUES" in result.stderr
        assert "read, refuse" in result.stderr


# --- the dashboard's empty (unset) values --------------------------------------------------------------


async def listed(svc: Running, org: str, provider: str) -> tuple[bool, bool]:
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    return next((p.configured, p.ready) for p in reply.providers if p.id == provider)


async def test_an_empty_dashboard_value_stays_unset_through_rotate_and_a_save_of_another_field(
    own_store: Location, tmp_path: Path
) -> None:
    org = new_org()
    await (await running(own_store, tmp_path)).close()  # creates the schema
    await insert_dashboard_row(*own_store, org, "ifthenpay", {"antiPhishingKey": "", "mbKey": ""})

    code, _ = rotate(own_store, tmp_path)
    assert code == 0
    assert await stored_config(*own_store, org, "ifthenpay") == {"antiPhishingKey": "", "mbKey": ""}
    svc = await running(own_store, tmp_path)
    try:
        assert await listed(svc, org, "ifthenpay") == (False, False)
        await svc.stub.SaveIntegration(
            pb.SaveIntegrationRequest(organization_id=org, provider="ifthenpay", values={"mbwayKey": "mbway-0001"})
        )
        # Configured by mbwayKey alone: the required antiPhishingKey is as unset as the read says, so not ready.
        assert await listed(svc, org, "ifthenpay") == (True, False)
        values = values_of(await get(svc, org, "ifthenpay", view=pb.CONFIG_VIEW_DECRYPTED))
        assert values["mbKey"] == values["antiPhishingKey"] == ("", pb.VALUE_SOURCE_UNSET)
        assert values["mbwayKey"] == ("mbway-0001", ORG)
    finally:
        await svc.close()
    stored = await stored_config(*own_store, org, "ifthenpay")
    assert (stored["antiPhishingKey"], stored["mbKey"]) == ("", "")
