"""The environment fallback never pairs a platform secret with an organization's endpoint or account.

The service runs with a platform default for every field of every provider.
An organization that stores only an endpoint or account field (a dashboard
save of `easypay.baseUrl=https://attacker.example`, say) must not make the
commerce service receive the platform's secret next to it; an organization that
stores its own secrets keeps inheriting the platform's non-secret fields, and
one that stores nothing inherits everything. Over a real socket, on both stores.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.harness import Running, new_org, start_service, values_of
from tests.integration.raw_rows import service_url

# The platform's defaults: every field of every provider. Secrets look like secrets (the leak watch knows them).
PLATFORM = {
    "STRIPE_SECRET_KEY": "sk_live_PLATFORM0env0secret0key0001",
    "STRIPE_WEBHOOK_SECRET": "whsec_PLATFORM0env0webhook0secret01",
    "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": "pk_live_PLATFORM0env0publishable01",
    "EASYPAY_ACCOUNT_ID": "platform-easypay-account-0001",
    "EASYPAY_API_KEY": "PLATFORM0easypay0env0apikey0ABC123",
    "EASYPAY_BASE_URL": "https://api.prod.easypay.pt/2.0",
    "IFTHENPAY_ANTIPHISHING_KEY": "PLATFORM0ifthenpay0antiphishing0DEF4",
    "IFTHENPAY_MB_KEY": "PLATFORM0ifthenpay0mb0key0GHI567",
    "IFTHENPAY_MBWAY_KEY": "PLATFORM0ifthenpay0mbway0key0JKL8",
    "IFTHENPAY_CC_KEY": "PLATFORM0ifthenpay0cc0key0MNO901",
    "RESEND_API_KEY": "re_PLATFORM0resend0env0apikey0PQR234",
    "RESEND_FROM_ADDRESS": "Platform <orders@platform.example>",
    "SMTP_HOST": "smtp.platform.example",
    "SMTP_PORT": "587",
    "SMTP_USERNAME": "platform-mailer",
    "SMTP_PASSWORD": "PLATFORM0smtp0env0password0STU567",
    "SMTP_FROM_ADDRESS": "Platform <mail@platform.example>",
    "GA4_MEASUREMENT_ID": "G-PLATFORM01",
    "GA4_API_SECRET": "PLATFORM0ga4env0api0secret0VWX890",
}
ORG = pb.VALUE_SOURCE_ORGANIZATION
ENV = pb.VALUE_SOURCE_ENVIRONMENT
UNSET = pb.VALUE_SOURCE_UNSET
DECRYPTED = pb.CONFIG_VIEW_DECRYPTED

# (provider, what a hostile dashboard save stores, the fields that must then be unset, ready after).
# An endpoint (Easypay's baseUrl, the SMTP host) gets nothing from the platform: not its account id, SMTP user
# name or sender address either. SMTP stays ready without a password: it is optional (a relay that trusts the
# network needs none), and unset.
ATTACKS = [
    ("easypay", {"baseUrl": "https://attacker.example"}, ["accountId", "apiKey"], False),
    ("easypay", {"accountId": "attacker-account-666"}, ["apiKey"], False),
    ("smtp", {"host": "mx.attacker.example"}, ["port", "username", "password", "fromAddress"], False),
    ("smtp", {"port": "2525"}, ["password"], True),
    ("smtp", {"username": "attacker"}, ["password"], True),
    ("smtp", {"fromAddress": "Shop <shop@attacker.example>"}, ["password"], True),
    ("resend", {"fromAddress": "Shop <orders@attacker.example>"}, ["apiKey"], False),
    ("stripe", {"publishableKey": "pk_live_ATTACKER0publishable0666"}, ["secretKey", "webhookSecret"], False),
    ("google_analytics", {"measurementId": "G-ATTACKER66"}, ["apiSecret"], False),
    # A signing secret of its own next to the platform's keys would let it forge the provider's notifications.
    ("stripe", {"webhookSecret": "whsec_ATTACKER0own0webhook0666"}, ["secretKey"], False),
    ("ifthenpay", {"antiPhishingKey": "ATTACKER0antiphishing0666"}, ["mbKey", "mbwayKey", "ccKey"], False),
    ("ifthenpay", {"mbKey": "ATTACKER0mb0key0666"}, ["antiPhishingKey", "mbwayKey", "ccKey"], False),
]

# Which fields ListProviders marks as endpoint/account fields (binds_secrets).
BINDING_FIELDS = {
    "stripe": ["webhookSecret", "publishableKey"],
    "easypay": ["accountId", "baseUrl"],
    "ifthenpay": ["antiPhishingKey", "mbKey", "mbwayKey", "ccKey"],
    "resend": ["fromAddress"],
    "smtp": ["host", "port", "username", "fromAddress"],
    "google_analytics": ["measurementId"],
}


@pytest.fixture
async def svc(store_location: tuple[str, str], tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_service(service_url(*store_location), tmp_path, PLATFORM)
    yield running
    await running.close()


async def save(
    svc: Running, org: str, provider: str, values: Mapping[str, str], clear: tuple[str, ...] = ()
) -> pb.ProviderConfig:
    request = pb.SaveIntegrationRequest(organization_id=org, provider=provider, values=values, clear_fields=clear)
    return (await svc.stub.SaveIntegration(request)).config


async def decrypted(svc: Running, org: str, provider: str) -> dict[str, tuple[str, int]]:
    request = pb.GetProviderConfigRequest(organization_id=org, provider=provider, view=DECRYPTED)
    return values_of((await svc.stub.GetProviderConfig(request)).config)


async def ready(svc: Running, org: str) -> dict[str, bool]:
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest(organization_id=org))
    return {p.id: p.ready for p in reply.providers}


async def catalog(svc: Running) -> dict[str, list[pb.ProviderField]]:
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest())
    return {p.id: list(p.fields) for p in reply.providers}


async def test_an_endpoint_or_account_field_alone_never_receives_the_platform_secret(svc: Running) -> None:
    env_vars = {(provider, f.key): f.env_var for provider, fields in (await catalog(svc)).items() for f in fields}
    leaked: dict[str, dict[str, tuple[str, int]]] = {}
    wrong_ready: dict[str, bool] = {}
    for provider, stored, secrets, ready_after in ATTACKS:
        org = new_org()
        saved = await save(svc, org, provider, stored)
        case = f"{provider} {sorted(stored)}"
        values = await decrypted(svc, org, provider)
        # The secrets are unset, in the decrypted read and in the masked answer the dashboard sees.
        if any(values[key] != ("", UNSET) for key in secrets) or any(
            values_of(saved)[key] != ("", UNSET) for key in secrets
        ):
            leaked[case] = {key: values[key] for key in secrets}
        # The stored field is the organization's; the other non-secret fields still come from the platform.
        for key, (value, source) in values.items():
            if key in stored:
                assert (value, source) == (stored[key], ORG), case
            elif key not in secrets:
                assert (value, source) == (PLATFORM[env_vars[provider, key]], ENV), case
        if (await ready(svc, org))[provider] is not ready_after:
            wrong_ready[case] = not ready_after
    assert leaked == {}
    assert wrong_ready == {}


async def test_own_account_and_secret_still_inherit_the_platform_endpoint(svc: Running) -> None:
    org = new_org()
    await save(svc, org, "easypay", {"accountId": "shop-account-0042", "apiKey": "SHOP0easypay0own0apikey0YZA345"})
    assert await decrypted(svc, org, "easypay") == {
        "accountId": ("shop-account-0042", ORG),
        "apiKey": ("SHOP0easypay0own0apikey0YZA345", ORG),
        "baseUrl": (PLATFORM["EASYPAY_BASE_URL"], ENV),
    }
    assert (await ready(svc, org))["easypay"] is True


async def test_an_organization_with_nothing_stored_inherits_every_field(svc: Running) -> None:
    org = new_org()
    providers = await catalog(svc)
    for provider, fields in providers.items():
        assert await decrypted(svc, org, provider) == {f.key: (PLATFORM[f.env_var], ENV) for f in fields}, provider
    assert await ready(svc, org) == dict.fromkeys(providers, True)


async def test_own_secret_alone_keeps_the_platform_account_fields_and_secrets(svc: Running) -> None:
    """The organization's own secret goes to the platform's configured account: its own choice, nothing leaks."""
    org = new_org()
    await save(svc, org, "stripe", {"secretKey": "sk_live_SHOP0own0secret0key0BCD678"})
    assert await decrypted(svc, org, "stripe") == {
        "secretKey": ("sk_live_SHOP0own0secret0key0BCD678", ORG),
        "webhookSecret": (PLATFORM["STRIPE_WEBHOOK_SECRET"], ENV),
        "publishableKey": (PLATFORM["NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY"], ENV),
    }


async def test_clearing_its_own_password_behind_its_own_host_never_brings_the_platform_account(svc: Running) -> None:
    org = new_org()
    own = {"host": "smtp.shop.example", "port": "2525", "password": "SHOP0smtp0own0password0EFG901"}
    await save(svc, org, "smtp", own)
    saved = await save(svc, org, "smtp", {}, clear=("password",))
    for values in (await decrypted(svc, org, "smtp"), values_of(saved)):
        assert values == {
            "host": ("smtp.shop.example", ORG),
            "port": ("2525", ORG),
            "username": ("", UNSET),
            "password": ("", UNSET),
            "fromAddress": ("", UNSET),
        }
    assert (await ready(svc, org))["smtp"] is False


async def test_clearing_the_endpoint_field_brings_the_platform_secret_back(svc: Running) -> None:
    org = new_org()
    await save(svc, org, "smtp", {"host": "mx.attacker.example"})
    assert (await decrypted(svc, org, "smtp"))["password"] == ("", UNSET)
    await save(svc, org, "smtp", {}, clear=("host",))
    assert (await decrypted(svc, org, "smtp"))["password"] == (PLATFORM["SMTP_PASSWORD"], ENV)


MASK = "••••••••"


async def masked(
    svc: Running, org: str, provider: str, view: pb.ConfigView.ValueType = pb.CONFIG_VIEW_MASKED
) -> pb.ProviderConfig:
    request = pb.GetProviderConfigRequest(organization_id=org, provider=provider, view=view)
    return (await svc.stub.GetProviderConfig(request)).config


async def test_the_masked_view_shows_nothing_of_a_platform_secret(svc: Running) -> None:
    """Every tenant's dashboard reads the masked view: the platform's secret shows as the fixed-width mask alone,
    never its last 4 characters; the organization's own secret keeps its last 4. The save's answer says the same."""
    org = new_org()
    own = "sk_live_SHOP0own0secret0key0HIJ234"
    saved = await save(svc, org, "stripe", {"secretKey": own})
    expected = {
        "secretKey": (MASK + "J234", ORG),
        "webhookSecret": (MASK, ENV),
        "publishableKey": (PLATFORM["NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY"], ENV),  # not a secret: in clear
    }
    for config in (
        saved,
        await masked(svc, org, "stripe"),
        await masked(svc, org, "stripe", pb.CONFIG_VIEW_UNSPECIFIED),
    ):
        assert values_of(config) == expected
    # The commerce service still receives the platform's secret.
    assert (await decrypted(svc, org, "stripe"))["webhookSecret"] == (PLATFORM["STRIPE_WEBHOOK_SECRET"], ENV)


async def test_with_nothing_stored_every_platform_secret_is_the_mask_alone_and_the_rest_in_clear(svc: Running) -> None:
    org = new_org()
    for provider, fields in (await catalog(svc)).items():
        expected = {f.key: (MASK if f.secret else PLATFORM[f.env_var], ENV) for f in fields}
        assert values_of(await masked(svc, org, provider)) == expected, provider


async def test_list_providers_marks_the_endpoint_and_account_fields(svc: Running) -> None:
    reply = await svc.stub.ListProviders(pb.ListProvidersRequest())
    marked = {p.id: [f.key for f in p.fields if f.binds_secrets] for p in reply.providers}
    assert marked == BINDING_FIELDS
    binding_secrets = [(p.id, f.key) for p in reply.providers for f in p.fields if f.binds_secrets and f.secret]
    assert binding_secrets == [("stripe", "webhookSecret")] + [
        ("ifthenpay", key) for key in ("antiPhishingKey", "mbKey", "mbwayKey", "ccKey")
    ]
