"""Every RPC and every error case, over a real socket, against both stores."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.harness import Running, get, new_org, refused, rich_error, save, values_of

ENV_DEFAULTS = {
    "STRIPE_WEBHOOK_SECRET": "whsec_environment_default_7777",
    "EASYPAY_BASE_URL": "https://api.test.easypay.pt/2.0",
}
ORG = pb.VALUE_SOURCE_ORGANIZATION
ENV = pb.VALUE_SOURCE_ENVIRONMENT
UNSET = pb.VALUE_SOURCE_UNSET
SK = "sk_test_51HxAbCdEfGhIjKlMn4242"
PK = "pk_test_51HxPublishable0001"


@pytest.fixture
def service_env() -> dict[str, str]:
    return ENV_DEFAULTS


# --- ListProviders -----------------------------------------------------------------------------------


async def test_list_providers_is_the_whole_catalog_in_order(svc: Running) -> None:
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest())
    assert [p.id for p in reply.providers] == ["stripe", "easypay", "ifthenpay", "resend", "smtp", "google_analytics"]
    stripe = reply.providers[0]
    assert (stripe.display_name, stripe.category, stripe.runtime_supported) == ("Stripe", pb.CATEGORY_PAYMENTS, True)
    assert [(f.key, f.env_var, f.secret, f.required) for f in stripe.fields] == [
        ("secretKey", "STRIPE_SECRET_KEY", True, True),
        ("webhookSecret", "STRIPE_WEBHOOK_SECRET", True, True),
        ("publishableKey", "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY", False, True),
    ]
    assert {p.id: p.runtime_supported for p in reply.providers}["smtp"] is False
    assert not any(p.configured or p.ready for p in reply.providers)


@pytest.mark.parametrize(
    ("category", "ids"),
    [
        (pb.CATEGORY_PAYMENTS, ["stripe", "easypay", "ifthenpay"]),
        (pb.CATEGORY_NOTIFICATIONS, ["resend", "smtp"]),
        (pb.CATEGORY_ANALYTICS, ["google_analytics"]),
    ],
)
async def test_list_providers_by_category(svc: Running, category: int, ids: list[str]) -> None:
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest(category=category))  # type: ignore[arg-type]
    assert [p.id for p in reply.providers] == ids


async def test_list_providers_with_organization_status(svc: Running) -> None:
    org = new_org()
    await save(svc, org, secretKey=SK)  # webhookSecret comes from the environment, publishableKey from nowhere
    await save(svc, org, "easypay", accountId="acc-1")  # apiKey missing: configured, not ready
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    status = {p.id: (p.configured, p.ready) for p in reply.providers}
    assert status["stripe"] == (True, False)
    await save(svc, org, publishableKey=PK)  # its own account: the environment's webhookSecret no longer counts
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    assert {p.id: p.ready for p in reply.providers}["stripe"] is False
    await save(svc, org, webhookSecret="whsec_organization_own_5678")
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    status = {p.id: (p.configured, p.ready) for p in reply.providers}
    assert status["stripe"] == (True, True)
    assert status["easypay"] == (True, False)
    assert status["resend"] == (False, False)
    other = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=new_org()))
    assert not any(p.configured for p in other.providers)


async def test_list_providers_rejects_bad_organization_and_category(svc: Running) -> None:
    error = rich_error(await refused(svc.stub.ListProviders(pb.ListProvidersRequest(organization_id="has space"))))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "organization_id" in error.violations
    error = rich_error(await refused(svc.stub.ListProviders(pb.ListProvidersRequest(category=99))))  # type: ignore[arg-type]
    assert (error.code, list(error.violations)) == (grpc.StatusCode.INVALID_ARGUMENT, ["category"])


# --- SaveIntegration / GetProviderConfig -----------------------------------------------------------------


async def test_save_then_get_masked_and_decrypted(svc: Running) -> None:
    org = new_org()
    saved = await save(svc, org, secretKey=SK, publishableKey=PK)
    # The organization's publishableKey names its Stripe account: the environment's webhook secret is withheld.
    assert values_of(saved) == {
        "secretKey": ("••••••••4242", ORG),
        "webhookSecret": ("", UNSET),
        "publishableKey": (PK, ORG),
    }
    assert saved.etag
    assert saved.HasField("update_time")
    masked = await get(svc, org)
    assert values_of(masked) == values_of(saved)
    assert masked.etag == saved.etag
    assert masked.update_time == saved.update_time
    assert all(v.secret == (k != "publishableKey") for k, v in masked.values.items())
    clear = await get(svc, org, view=pb.CONFIG_VIEW_DECRYPTED)
    assert values_of(clear) == {
        "secretKey": (SK, ORG),
        "webhookSecret": ("", UNSET),
        "publishableKey": (PK, ORG),
    }
    explicit_masked = await get(svc, org, view=pb.CONFIG_VIEW_MASKED)
    assert values_of(explicit_masked) == values_of(masked)


async def test_get_without_stored_credentials_is_environment_or_unset(svc: Running) -> None:
    config = await get(svc, new_org(), "easypay", view=pb.CONFIG_VIEW_DECRYPTED)
    assert values_of(config) == {
        "accountId": ("", UNSET),
        "apiKey": ("", UNSET),
        "baseUrl": (ENV_DEFAULTS["EASYPAY_BASE_URL"], ENV),
    }
    assert config.etag == ""
    assert not config.HasField("update_time")


async def test_save_keeps_fields_not_named_and_clears_named_ones(svc: Running) -> None:
    org = new_org()
    await save(svc, org, secretKey=SK, webhookSecret="whsec_organization_own_1234", publishableKey=PK)
    await save(svc, org, publishableKey="pk_test_replaced_0002")
    after = values_of(await get(svc, org, view=pb.CONFIG_VIEW_DECRYPTED))
    assert after["secretKey"] == (SK, ORG)
    assert after["publishableKey"] == ("pk_test_replaced_0002", ORG)
    cleared = await save(svc, org, clear=("webhookSecret",))
    # Not to the environment: the stored publishableKey withholds the environment's secrets.
    assert values_of(cleared)["webhookSecret"] == ("", UNSET)
    await save(svc, org, clear=("publishableKey",))
    # Falls back to the environment: masked without its last 4 characters, since it is the platform's.
    assert values_of(await get(svc, org))["webhookSecret"] == ("••••••••", ENV)
    assert values_of(await get(svc, org, view=pb.CONFIG_VIEW_DECRYPTED))["secretKey"] == (SK, ORG)


async def test_etag_guards_concurrent_changes(svc: Running) -> None:
    org = new_org()
    first = await save(svc, org, secretKey=SK)
    second = await save(svc, org, etag=first.etag, publishableKey=PK)
    assert second.etag != first.etag
    error = rich_error(await refused(save(svc, org, etag=first.etag, publishableKey="pk_test_lost_update")))
    assert error.code is grpc.StatusCode.ABORTED
    assert "etag" in error.message
    assert values_of(await get(svc, org))["publishableKey"] == (PK, ORG)


async def test_etag_of_a_deleted_row_does_not_match_a_recreated_one(svc: Running) -> None:
    org = new_org()
    old = await save(svc, org, secretKey=SK)
    await svc.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=org, provider="stripe"))
    error = rich_error(await refused(save(svc, org, etag=old.etag, secretKey=SK)))
    assert error.code is grpc.StatusCode.ABORTED
    fresh = await save(svc, org, secretKey=SK)
    assert fresh.etag != old.etag


@pytest.mark.parametrize(
    ("request_fields", "field", "says"),
    [
        ({"organization_id": "", "values": {"secretKey": SK}}, "organization_id", "is required"),
        ({"provider": "", "values": {"secretKey": SK}}, "provider", "is required"),
        ({"values": {"nope": "x"}}, "values.nope", "not a field of stripe"),
        ({"values": {"secretKey": ""}}, "values.secretKey", "clear_fields"),
        ({"values": {"secretKey": "sk_test_" + "a" * 4089}}, "values.secretKey", "4096 bytes"),
        ({"values": {"secretKey": "••••••••4242"}}, "values.secretKey", "omit the field"),
        ({"values": {"secretKey": SK}, "clear_fields": ["secretKey"]}, "clear_fields[0]", "both set"),
        ({"values": {"secretKey": "pk_test_wrong"}}, "values.secretKey", "must start with"),
        ({"values": {"secretKey": "sk_live_51HxLiveKey", "publishableKey": PK}}, "values.publishableKey", "mixes"),
        ({"organization_id": "x" * 129, "values": {"secretKey": SK}}, "organization_id", "at most 128"),
        ({}, "values", "at least one"),
    ],
)
async def test_save_rejects_bad_input_naming_the_field_and_changes_nothing(
    svc: Running, request_fields: dict[str, object], field: str, says: str
) -> None:
    org = new_org()
    before = await save(svc, org, secretKey=SK)
    fields: dict[str, object] = {"organization_id": org, "provider": "stripe", **request_fields}
    error = rich_error(await refused(svc.stub.SaveIntegration(pb.SaveIntegrationRequest(**fields))))  # type: ignore[arg-type]
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert says in error.violations[field]
    assert error.request_id
    after = await get(svc, org, view=pb.CONFIG_VIEW_DECRYPTED)
    assert after.etag == before.etag
    assert values_of(after)["secretKey"] == (SK, ORG)


async def test_mixed_stripe_modes_against_the_stored_key_are_refused(svc: Running) -> None:
    org = new_org()
    await save(svc, org, secretKey="sk_live_51HxLiveKey00000")
    error = rich_error(await refused(save(svc, org, publishableKey="pk_test_51HxTest")))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "mixes Stripe modes" in error.violations["values.publishableKey"]
    await save(svc, org, publishableKey="pk_live_51HxLive")  # same mode: fine


async def test_unknown_provider_is_not_found(svc: Running) -> None:
    org = new_org()
    for call in (
        save(svc, org, "paypal", apiKey="x"),
        get(svc, org, "paypal"),
        svc.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=org, provider="paypal")),
    ):
        error = rich_error(await refused(call))
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert "paypal" in error.message
        assert error.resource == ("integrations.v1.Provider", "paypal")


async def test_get_rejects_missing_fields_and_unknown_view(svc: Running) -> None:
    error = rich_error(await refused(get(svc, "", "")))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.violations) == {"organization_id", "provider"}
    error = rich_error(await refused(get(svc, new_org(), view=7)))
    assert error.violations.keys() == {"view"}


async def test_organizations_never_see_each_other(svc: Running) -> None:
    alice, bob = new_org(), new_org()
    await save(svc, alice, secretKey=SK)
    await save(svc, bob, secretKey="sk_test_bobs_own_key_9876")
    assert values_of(await get(svc, alice, view=pb.CONFIG_VIEW_DECRYPTED))["secretKey"] == (SK, ORG)
    await svc.stub.DeleteIntegration(pb.DeleteIntegrationRequest(organization_id=bob, provider="stripe"))
    assert values_of(await get(svc, alice, view=pb.CONFIG_VIEW_DECRYPTED))["secretKey"] == (SK, ORG)
    assert values_of(await get(svc, bob))["secretKey"] == ("", UNSET)


async def test_concurrent_saves_of_different_fields_lose_nothing(svc: Running) -> None:
    org = new_org()
    keys = {
        "antiPhishingKey": "anti-phishing-0001",
        "mbKey": "MB-000002",
        "mbwayKey": "MBWAY-000003",
        "ccKey": "CC-000004",
    }
    saves = [
        save(svc, org, "ifthenpay", **{key: f"{value}-{round_}"}) for round_ in range(10) for key, value in keys.items()
    ]
    await asyncio.gather(*saves)
    final = values_of(await get(svc, org, "ifthenpay", view=pb.CONFIG_VIEW_DECRYPTED))
    assert {key: source for key, (_, source) in final.items()} == dict.fromkeys(keys, ORG)
    assert all(final[key][0].startswith(value) for key, value in keys.items())


# --- DeleteIntegration --------------------------------------------------------------------------------


async def test_delete_falls_back_to_environment(svc: Running) -> None:
    org = new_org()
    saved = await save(svc, org, secretKey=SK, webhookSecret="whsec_own_value_12345")
    await svc.stub.DeleteIntegration(
        pb.DeleteIntegrationRequest(organization_id=org, provider="stripe", etag=saved.etag)
    )
    config = await get(svc, org, view=pb.CONFIG_VIEW_DECRYPTED)
    assert values_of(config) == {
        "secretKey": ("", UNSET),
        "webhookSecret": (ENV_DEFAULTS["STRIPE_WEBHOOK_SECRET"], ENV),
        "publishableKey": ("", UNSET),
    }


async def test_delete_missing_is_not_found_unless_allowed(svc: Running) -> None:
    org = new_org()
    request = pb.DeleteIntegrationRequest(organization_id=org, provider="stripe")
    error = rich_error(await refused(svc.stub.DeleteIntegration(request)))
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert org in error.message
    assert error.resource == ("integrations.v1.Integration", f"organizations/{org}/integrations/stripe")
    await svc.stub.DeleteIntegration(
        pb.DeleteIntegrationRequest(organization_id=org, provider="stripe", allow_missing=True)
    )


async def test_delete_with_stale_etag_is_aborted_and_keeps_the_row(svc: Running) -> None:
    org = new_org()
    first = await save(svc, org, secretKey=SK)
    await save(svc, org, publishableKey=PK)
    request = pb.DeleteIntegrationRequest(organization_id=org, provider="stripe", etag=first.etag)
    assert rich_error(await refused(svc.stub.DeleteIntegration(request))).code is grpc.StatusCode.ABORTED
    assert values_of(await get(svc, org))["publishableKey"] == (PK, ORG)


async def test_delete_rejects_missing_fields(svc: Running) -> None:
    error = rich_error(await refused(svc.stub.DeleteIntegration(pb.DeleteIntegrationRequest())))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert set(error.violations) == {"organization_id", "provider"}


async def test_a_request_id_from_the_caller_comes_back_on_an_error_and_a_success_answers_none(svc: Running) -> None:
    metadata = (("x-request-id", "trace-abc-123"),)
    call = svc.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=new_org(), provider="stripe"), metadata=metadata
    )
    await call
    assert [key for key, _ in await call.trailing_metadata() or () if key == "x-request-id"] == []
    refused = svc.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=new_org(), provider="no_such_provider"), metadata=metadata
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await refused
    assert ("x-request-id", "trace-abc-123") in tuple(raised.value.trailing_metadata() or ())
