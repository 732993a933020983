"""Effective config resolution (organization → environment → unset) and masking."""

from __future__ import annotations

import pytest

from integrations_service.domain.masking import mask_secret
from integrations_service.domain.registry import find_provider
from integrations_service.domain.resolution import ConfigView, ValueSource, is_ready, resolve_values

STRIPE = find_provider("stripe")
assert STRIPE is not None


@pytest.mark.parametrize(
    ("secret", "masked"),
    [
        ("", ""),
        ("short", "••••••••"),
        ("elevenchars", "••••••••"),
        ("twelve_chars", "••••••••hars"),
        ("sk_live_51H8xyzABCDEFGHIJ4242", "••••••••4242"),
        ("pässwörd-long-✓✓✓✓", "••••••••✓✓✓✓"),
    ],
)
def test_mask_shows_at_most_the_last_four(secret: str, masked: str) -> None:
    assert mask_secret(secret) == masked


def test_mask_hides_the_length() -> None:
    assert len(mask_secret("a" * 12)) == len(mask_secret("a" * 400))


ENV = {
    "STRIPE_SECRET_KEY": "sk_test_from_environment_9999",
    "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": "pk_test_env",
    "STRIPE_WEBHOOK_SECRET": "",
}


def test_organization_beats_environment_beats_unset() -> None:
    assert STRIPE is not None
    org = {"publishableKey": "pk_test_org"}
    values = resolve_values(STRIPE, org, ENV, ConfigView.DECRYPTED)
    assert list(values) == ["secretKey", "webhookSecret", "publishableKey"]
    assert (values["publishableKey"].value, values["publishableKey"].source) == (
        "pk_test_org",
        ValueSource.ORGANIZATION,
    )
    assert (values["secretKey"].value, values["secretKey"].source) == (
        ENV["STRIPE_SECRET_KEY"],
        ValueSource.ENVIRONMENT,
    )
    # An empty environment variable counts as unset.
    assert (values["webhookSecret"].value, values["webhookSecret"].source) == ("", ValueSource.UNSET)
    assert [v.secret for v in values.values()] == [True, True, False]


def test_masked_view_masks_organization_and_environment_secrets_alike() -> None:
    assert STRIPE is not None
    org = {"webhookSecret": "whsec_organization_1234"}
    values = resolve_values(STRIPE, org, ENV, ConfigView.MASKED)
    assert values["webhookSecret"].value == "••••••••1234"
    assert values["secretKey"].value == "••••••••9999"
    assert values["publishableKey"].value == "pk_test_env"  # not a secret: in clear


@pytest.mark.parametrize(
    ("stored", "env", "ready"),
    [
        (set(), {}, False),
        ({"secretKey", "webhookSecret", "publishableKey"}, {}, True),
        ({"secretKey"}, {"STRIPE_WEBHOOK_SECRET": "whsec_1", "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": "pk_test_1"}, True),
        ({"secretKey"}, {"STRIPE_WEBHOOK_SECRET": "whsec_1"}, False),
        (
            set(),
            {"STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_WEBHOOK_SECRET": "w", "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": ""},
            False,
        ),
    ],
)
def test_ready_when_every_required_field_resolves(stored: set[str], env: dict[str, str], ready: bool) -> None:
    assert STRIPE is not None
    assert is_ready(STRIPE, frozenset(stored), env) is ready
