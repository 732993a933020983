"""The provider registry against the dashboard's design page, field for field."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from integrations_service.domain.registry import PROVIDERS, Category, find_provider, providers_in

# (provider, field key, env fallback, description, secret, required, binds_secrets), as the seed's tables
# have them for Stripe, Easypay and Ifthenpay, and as this service chose for the others. binds_secrets marks
# the fields that decide where a secret is sent or which account it belongs to (issue 7 §2).
SENDER = "Sender address, e.g. 'Shop <orders@shop.example>'"
EXPECTED_FIELDS = [
    ("stripe", "secretKey", "STRIPE_SECRET_KEY", "Server-side secret key", True, True, False),
    ("stripe", "webhookSecret", "STRIPE_WEBHOOK_SECRET", "Webhook signing secret", True, True, True),
    (
        "stripe",
        "publishableKey",
        "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY",
        "Client-side publishable key",
        False,
        True,
        True,
    ),
    ("easypay", "accountId", "EASYPAY_ACCOUNT_ID", "Easypay account ID", False, True, True),
    ("easypay", "apiKey", "EASYPAY_API_KEY", "API key", True, True, False),
    ("easypay", "baseUrl", "EASYPAY_BASE_URL", "API base URL (prod/sandbox)", False, True, True),
    ("ifthenpay", "antiPhishingKey", "IFTHENPAY_ANTIPHISHING_KEY", "Anti-phishing key", True, True, True),
    ("ifthenpay", "mbKey", "IFTHENPAY_MB_KEY", "Multibanco key", True, False, True),
    ("ifthenpay", "mbwayKey", "IFTHENPAY_MBWAY_KEY", "MB WAY key", True, False, True),
    ("ifthenpay", "ccKey", "IFTHENPAY_CC_KEY", "Credit card key", True, False, True),
    ("resend", "apiKey", "RESEND_API_KEY", "API key", True, True, False),
    ("resend", "fromAddress", "RESEND_FROM_ADDRESS", SENDER, False, True, True),
    ("smtp", "host", "SMTP_HOST", "SMTP server host name", False, True, True),
    ("smtp", "port", "SMTP_PORT", "SMTP server port", False, True, True),
    ("smtp", "username", "SMTP_USERNAME", "SMTP user name", False, False, True),
    ("smtp", "password", "SMTP_PASSWORD", "SMTP password", True, False, False),
    ("smtp", "fromAddress", "SMTP_FROM_ADDRESS", SENDER, False, True, True),
    ("google_analytics", "measurementId", "GA4_MEASUREMENT_ID", "Measurement ID (G-XXXXXXXXXX)", False, True, True),
    ("google_analytics", "apiSecret", "GA4_API_SECRET", "Measurement Protocol API secret", True, True, False),
]

EXPECTED_PROVIDERS = [
    ("stripe", "Stripe", Category.PAYMENTS, True),
    ("easypay", "Easypay", Category.PAYMENTS, True),
    ("ifthenpay", "Ifthenpay", Category.PAYMENTS, True),
    ("resend", "Resend", Category.NOTIFICATIONS, True),
    ("smtp", "SMTP", Category.NOTIFICATIONS, False),
    ("google_analytics", "Google Analytics 4", Category.ANALYTICS, False),
]

SEED = Path(__file__).resolve().parents[3] / "shared" / "seed" / "integrations-dashboard.md"


def test_catalog_order_names_categories_and_runtime_support() -> None:
    actual = [(p.id, p.display_name, p.category, p.runtime_supported) for p in PROVIDERS]
    assert actual == EXPECTED_PROVIDERS


def test_every_field_matches_the_table_in_order() -> None:
    actual = [
        (p.id, f.key, f.env_var, f.description, f.secret, f.required, f.binds_secrets)
        for p in PROVIDERS
        for f in p.fields
    ]
    assert actual == EXPECTED_FIELDS


@pytest.mark.parametrize(
    ("provider", "key", "env_var", "description", "secret", "required", "binds_secrets"), EXPECTED_FIELDS
)
def test_field_lookup(
    provider: str, key: str, env_var: str, description: str, secret: bool, required: bool, binds_secrets: bool
) -> None:
    spec = find_provider(provider)
    assert spec is not None
    field = spec.field(key)
    assert field is not None
    assert (field.env_var, field.description, field.secret, field.required, field.binds_secrets) == (
        env_var,
        description,
        secret,
        required,
        binds_secrets,
    )
    assert (key in spec.binding_keys) is binds_secrets


def test_the_binding_secrets_are_stripes_webhook_secret_and_ifthenpays_keys() -> None:
    """A stored binding secret withholds the environment's *other* secrets; it is the organization's own."""
    assert [(p.id, f.key) for p in PROVIDERS for f in p.fields if f.secret and f.binds_secrets] == [
        ("stripe", "webhookSecret"),
        ("ifthenpay", "antiPhishingKey"),
        ("ifthenpay", "mbKey"),
        ("ifthenpay", "mbwayKey"),
        ("ifthenpay", "ccKey"),
    ]


def test_env_vars_are_unique_across_the_catalog() -> None:
    env_vars = [f.env_var for p in PROVIDERS for f in p.fields]
    assert len(env_vars) == len(set(env_vars))


@pytest.mark.parametrize(
    ("category", "ids"),
    [
        (None, ["stripe", "easypay", "ifthenpay", "resend", "smtp", "google_analytics"]),
        (Category.PAYMENTS, ["stripe", "easypay", "ifthenpay"]),
        (Category.NOTIFICATIONS, ["resend", "smtp"]),
        (Category.ANALYTICS, ["google_analytics"]),
    ],
)
def test_providers_by_category(category: Category | None, ids: list[str]) -> None:
    assert [p.id for p in providers_in(category)] == ids


def test_unknown_provider_is_none() -> None:
    assert find_provider("paypal") is None
    assert find_provider("Stripe") is None


def _seed_rows() -> list[tuple[str, str, str, str]]:
    """(provider, key, env, description) rows of the seed page's field tables."""
    rows, provider = [], ""
    for line in SEED.read_text().splitlines():
        if line.strip() in ("Stripe", "Easypay", "Ifthenpay"):
            provider = line.strip().lower()
        match = re.fullmatch(r"(\w+) \| ([A-Z_]+) \| (.+) \|", line.strip())
        if provider and match:
            rows.append((provider, *match.groups()))
    return rows


@pytest.mark.skipif(not SEED.exists(), reason=f"the seed design page is not beside the repo at {SEED}")
def test_registry_matches_the_seed_design_page() -> None:
    seed = _seed_rows()
    assert len(seed) == 10
    ours = [(p, k, e, d) for p, k, e, d, *_ in EXPECTED_FIELDS if p in ("stripe", "easypay", "ifthenpay")]
    assert ours == seed


def test_the_endpoint_fields_are_the_base_url_and_the_smtp_host() -> None:
    """An endpoint names the server itself; every endpoint field also binds the provider's secrets."""
    endpoints = [(p.id, f.key) for p in PROVIDERS for f in p.fields if f.endpoint]
    assert endpoints == [("easypay", "baseUrl"), ("smtp", "host")]
    assert all(f.binds_secrets for p in PROVIDERS for f in p.fields if f.endpoint)
