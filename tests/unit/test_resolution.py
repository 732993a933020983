"""Effective config resolution (organization → environment → unset) and masking."""

from __future__ import annotations

import pytest

from integrations_service.domain.masking import MASK, mask_secret
from integrations_service.domain.registry import PROVIDERS, ProviderSpec, find_provider
from integrations_service.domain.resolution import (
    ConfigView,
    ValueSource,
    is_ready,
    resolve_values,
)

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


@pytest.mark.parametrize("secret", ["short", "twelve_chars", "sk_live_51H8xyzABCDEFGHIJ4242"])
def test_mask_without_tail_is_the_fixed_width_mask_alone(secret: str) -> None:
    assert mask_secret(secret, show_tail=False) == MASK == "••••••••"
    assert mask_secret("", show_tail=False) == ""


ENV = {
    "STRIPE_SECRET_KEY": "sk_test_from_environment_9999",
    "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": "pk_test_env",
    "STRIPE_WEBHOOK_SECRET": "",
}


def test_organization_beats_environment_beats_unset() -> None:
    assert STRIPE is not None
    org = {"secretKey": "sk_test_from_organization_1111"}
    values = resolve_values(STRIPE, org, ENV, ConfigView.DECRYPTED)
    assert list(values) == ["secretKey", "webhookSecret", "publishableKey"]
    assert (values["secretKey"].value, values["secretKey"].source) == (org["secretKey"], ValueSource.ORGANIZATION)
    assert (values["publishableKey"].value, values["publishableKey"].source) == (
        ENV["NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY"],
        ValueSource.ENVIRONMENT,
    )
    # An empty environment variable counts as unset.
    assert (values["webhookSecret"].value, values["webhookSecret"].source) == ("", ValueSource.UNSET)
    assert [v.secret for v in values.values()] == [True, True, False]


def test_masked_view_shows_nothing_of_an_environment_secret() -> None:
    """The organization's own secret keeps its last 4; the platform's, seen by every tenant, shows none."""
    assert STRIPE is not None
    org = {"secretKey": "sk_test_from_organization_1234"}
    env = ENV | {"STRIPE_WEBHOOK_SECRET": "whsec_from_environment_9999"}
    values = resolve_values(STRIPE, org, env, ConfigView.MASKED)
    assert (values["secretKey"].value, values["secretKey"].source) == ("••••••••1234", ValueSource.ORGANIZATION)
    assert (values["webhookSecret"].value, values["webhookSecret"].source) == ("••••••••", ValueSource.ENVIRONMENT)
    # Not a secret: in clear, from the environment too.
    assert (values["publishableKey"].value, values["publishableKey"].source) == ("pk_test_env", ValueSource.ENVIRONMENT)


@pytest.mark.parametrize(
    ("stored", "env", "ready"),
    [
        (set(), {}, False),
        ({"secretKey", "webhookSecret", "publishableKey"}, {}, True),
        ({"secretKey"}, {"STRIPE_WEBHOOK_SECRET": "whsec_1", "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY": "pk_test_1"}, True),
        ({"secretKey"}, {"STRIPE_WEBHOOK_SECRET": "whsec_1"}, False),
        # The organization's publishable key: the environment's secrets no longer count.
        ({"publishableKey"}, {"STRIPE_SECRET_KEY": "sk_test_1", "STRIPE_WEBHOOK_SECRET": "whsec_1"}, False),
        ({"publishableKey", "secretKey"}, {"STRIPE_WEBHOOK_SECRET": "whsec_1"}, False),
        ({"publishableKey", "secretKey", "webhookSecret"}, {"STRIPE_WEBHOOK_SECRET": "whsec_1"}, True),
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


# --- the environment never pairs a platform secret with an organization's endpoint or account ---------

# A platform default for every field of every provider.
PLATFORM = {f.env_var: f"platform0{f.env_var.lower()}0value0XYZ9" for p in PROVIDERS for f in p.fields}
BINDING = [(p, f.key) for p in PROVIDERS for f in p.fields if f.binds_secrets]
# Account fields: binding, but not the endpoint itself (an endpoint withholds everything, see below).
ACCOUNT = [(p, key) for p, key in BINDING if key not in p.endpoint_keys]
ORGANIZATION = ValueSource.ORGANIZATION
ENVIRONMENT = ValueSource.ENVIRONMENT
UNSET = ValueSource.UNSET


def own_value(key: str) -> str:
    return f"own0{key}0value0ABC1"


def sources(spec: ProviderSpec, stored: dict[str, str]) -> dict[str, ValueSource]:
    return {key: v.source for key, v in resolve_values(spec, stored, PLATFORM, ConfigView.DECRYPTED).items()}


@pytest.mark.parametrize(("spec", "key"), ACCOUNT, ids=[f"{p.id}.{key}" for p, key in ACCOUNT])
def test_a_stored_binding_field_withholds_every_environment_secret(spec: ProviderSpec, key: str) -> None:
    values = resolve_values(spec, {key: own_value(key)}, PLATFORM, ConfigView.DECRYPTED)
    expected = {f.key: ORGANIZATION if f.key == key else UNSET if f.secret else ENVIRONMENT for f in spec.fields}
    assert {k: v.source for k, v in values.items()} == expected
    assert not any(v.value for k, v in values.items() if v.secret and k != key)
    assert values[key].value == own_value(key)
    # (The fields of Ifthenpay's one-of group are all secrets: only the stored one can satisfy it.)
    assert is_ready(spec, frozenset({key}), PLATFORM) is (
        not any(f.secret and f.required and f.key != key for f in spec.fields)
        and all(key in group for group in spec.ready_needs_one_of)
    )


@pytest.mark.parametrize(("spec", "key"), BINDING, ids=[f"{p.id}.{key}" for p, key in BINDING])
def test_masked_view_of_a_withheld_secret_is_empty_not_a_mask(spec: ProviderSpec, key: str) -> None:
    values = resolve_values(spec, {key: own_value(key)}, PLATFORM, ConfigView.MASKED)
    assert [(v.value, v.source) for k, v in values.items() if v.secret and k != key] == [("", UNSET)] * sum(
        f.secret and f.key != key for f in spec.fields
    )


@pytest.mark.parametrize("spec", PROVIDERS, ids=[p.id for p in PROVIDERS])
def test_own_secrets_still_inherit_the_platform_endpoint_and_account(spec: ProviderSpec) -> None:
    """An organization's own secret may go to the platform's configured endpoint: it is the organization's choice."""
    stored = {f.key: own_value(f.key) for f in spec.fields if f.secret}
    expected = {f.key: ORGANIZATION if f.secret else ENVIRONMENT for f in spec.fields}
    assert sources(spec, stored) == expected
    assert is_ready(spec, frozenset(stored), PLATFORM)


@pytest.mark.parametrize("spec", PROVIDERS, ids=[p.id for p in PROVIDERS])
def test_nothing_stored_inherits_every_field(spec: ProviderSpec) -> None:
    values = resolve_values(spec, {}, PLATFORM, ConfigView.DECRYPTED)
    assert {k: (v.value, v.source) for k, v in values.items()} == {
        f.key: (PLATFORM[f.env_var], ENVIRONMENT) for f in spec.fields
    }
    assert is_ready(spec, frozenset(), PLATFORM)


@pytest.mark.parametrize("spec", PROVIDERS, ids=[p.id for p in PROVIDERS])
def test_every_binding_field_and_own_secrets_resolve_wholly_from_the_organization(spec: ProviderSpec) -> None:
    stored = {f.key: own_value(f.key) for f in spec.fields if f.binds_secrets or f.secret}
    assert sources(spec, stored) == {f.key: ORGANIZATION if f.key in stored else ENVIRONMENT for f in spec.fields}


def test_an_empty_stored_binding_value_does_not_count_as_stored() -> None:
    easypay = find_provider("easypay")
    assert easypay is not None
    assert sources(easypay, {"baseUrl": ""})["apiKey"] is ENVIRONMENT


def test_a_stored_binding_value_equal_to_the_environment_still_counts() -> None:
    easypay = find_provider("easypay")
    assert easypay is not None
    assert sources(easypay, {"baseUrl": PLATFORM["EASYPAY_BASE_URL"]})["apiKey"] is UNSET
    assert not is_ready(easypay, frozenset({"baseUrl"}), PLATFORM)


# --- every provider of the registry, field by field ----------------------------------------------------

FIELDS = [(p, f.key) for p in PROVIDERS for f in p.fields]
REQUIRED = [(p, f.key) for p in PROVIDERS for f in p.fields if f.required]
OPTIONAL = [(p, f.key) for p in PROVIDERS for f in p.fields if not f.required]


def field_ids(pairs: list[tuple[ProviderSpec, str]]) -> list[str]:
    return [f"{p.id}.{key}" for p, key in pairs]


@pytest.mark.parametrize("view", list(ConfigView), ids=lambda v: v.value)
@pytest.mark.parametrize("spec", PROVIDERS, ids=[p.id for p in PROVIDERS])
def test_every_field_is_answered_in_registry_order_with_its_secrecy(spec: ProviderSpec, view: ConfigView) -> None:
    values = resolve_values(spec, {}, {}, view)
    assert list(values) == [f.key for f in spec.fields]
    assert [v.secret for v in values.values()] == [f.secret for f in spec.fields]
    assert {(v.value, v.source) for v in values.values()} == {("", UNSET)}


@pytest.mark.parametrize("from_organization", [True, False], ids=["organization", "environment"])
@pytest.mark.parametrize(("spec", "key"), FIELDS, ids=field_ids(FIELDS))
def test_the_masked_view_hides_every_secret_and_shows_every_other_field(
    spec: ProviderSpec, key: str, from_organization: bool
) -> None:
    field = spec.field(key)
    assert field is not None
    clear = own_value(key) if from_organization else PLATFORM[field.env_var]
    stored = {key: clear} if from_organization else {}
    masked = resolve_values(spec, stored, PLATFORM, ConfigView.MASKED)[key]
    decrypted = resolve_values(spec, stored, PLATFORM, ConfigView.DECRYPTED)[key]
    assert decrypted.value == clear
    assert masked.source == decrypted.source == (ORGANIZATION if from_organization else ENVIRONMENT)
    if field.secret:
        # The organization's own secret: at most its last 4. The platform's: the fixed-width mask alone.
        assert masked.value == (mask_secret(clear) if from_organization else MASK)
        assert clear[:-4] not in masked.value
    else:
        assert masked.value == clear


@pytest.mark.parametrize(("spec", "key"), REQUIRED, ids=field_ids(REQUIRED))
def test_a_provider_is_not_ready_while_one_required_field_resolves_to_nothing(spec: ProviderSpec, key: str) -> None:
    others = frozenset(f.key for f in spec.fields if f.key != key)
    assert is_ready(spec, others | {key}, {})
    assert not is_ready(spec, others, {})


@pytest.mark.parametrize(("spec", "key"), OPTIONAL, ids=field_ids(OPTIONAL))
def test_an_optional_field_is_not_needed_to_be_ready(spec: ProviderSpec, key: str) -> None:
    # One other field of each one-of group (Ifthenpay: another payment method's key).
    required = frozenset(f.key for f in spec.fields if f.required) | {
        min(group - {key}) for group in spec.ready_needs_one_of
    }
    assert is_ready(spec, required, {})
    assert resolve_values(spec, {k: own_value(k) for k in required}, {}, ConfigView.DECRYPTED)[key].source is UNSET


@pytest.mark.parametrize(("spec", "key"), FIELDS, ids=field_ids(FIELDS))
def test_an_empty_stored_value_falls_back_like_an_absent_one(spec: ProviderSpec, key: str) -> None:
    assert sources(spec, {key: ""}) == sources(spec, {})


@pytest.mark.parametrize("spec", PROVIDERS, ids=[p.id for p in PROVIDERS])
def test_a_stored_key_outside_the_registry_is_never_answered(spec: ProviderSpec) -> None:
    values = resolve_values(spec, {"notAField": "planted"}, {}, ConfigView.DECRYPTED)
    assert "notAField" not in values
    assert "planted" not in [v.value for v in values.values()]


# --- an organization's own endpoint gets nothing at all from the environment ---------------------------

# The fields that name a server the provider's credentials are sent to (an account field only names an account).
ENDPOINTS = [("easypay", "baseUrl"), ("smtp", "host")]


def spec_of(provider: str) -> ProviderSpec:
    spec = find_provider(provider)
    assert spec is not None
    return spec


@pytest.mark.parametrize(("provider", "key"), ENDPOINTS, ids=[f"{p}.{k}" for p, k in ENDPOINTS])
def test_a_stored_endpoint_gets_no_environment_value_at_all(provider: str, key: str) -> None:
    """Not the platform's account id, user name or sender address either: each would be sent to that server."""
    spec = spec_of(provider)
    values = resolve_values(spec, {key: own_value(key)}, PLATFORM, ConfigView.DECRYPTED)
    assert {k: v.source for k, v in values.items()} == {
        f.key: ORGANIZATION if f.key == key else UNSET for f in spec.fields
    }
    assert [v.value for k, v in values.items() if k != key] == [""] * (len(spec.fields) - 1)
    assert not is_ready(spec, frozenset({key}), PLATFORM)


def test_an_organization_smtp_server_with_its_own_password_still_gets_no_platform_account() -> None:
    smtp = spec_of("smtp")
    stored = {"host": "smtp.shop.example", "password": own_value("password")}
    assert sources(smtp, stored) == {
        "host": ORGANIZATION,
        "port": UNSET,
        "username": UNSET,
        "password": ORGANIZATION,
        "fromAddress": UNSET,
    }
    assert not is_ready(smtp, frozenset(stored), PLATFORM)
    complete = stored | {"port": "2525", "fromAddress": "Shop <mail@shop.example>"}
    assert is_ready(smtp, frozenset(complete), PLATFORM)


def test_an_organization_account_on_the_platform_endpoint_keeps_the_endpoint() -> None:
    """The other direction: the organization's account (and own secret) may use the platform's server."""
    easypay = spec_of("easypay")
    assert sources(easypay, {"accountId": own_value("accountId")}) == {
        "accountId": ORGANIZATION,
        "apiKey": UNSET,
        "baseUrl": ENVIRONMENT,
    }


# --- a secret that authenticates the provider's notifications belongs to the account they are about ----


def test_an_own_stripe_webhook_secret_never_verifies_events_for_the_platform_account() -> None:
    """With the platform's secretKey, the organization's whsec would let it sign forged payment events itself."""
    stripe = spec_of("stripe")
    assert sources(stripe, {"webhookSecret": own_value("webhookSecret")}) == {
        "secretKey": UNSET,
        "webhookSecret": ORGANIZATION,
        "publishableKey": ENVIRONMENT,
    }
    assert not is_ready(stripe, frozenset({"webhookSecret"}), PLATFORM)


@pytest.mark.parametrize("key", ["antiPhishingKey", "mbKey", "mbwayKey", "ccKey"])
def test_ifthenpay_keys_never_mix_with_the_platform_ones(key: str) -> None:
    """The anti-phishing key authenticates the callbacks about payments to the entities of the other keys."""
    ifthenpay = spec_of("ifthenpay")
    assert sources(ifthenpay, {key: own_value(key)}) == {
        f.key: ORGANIZATION if f.key == key else UNSET for f in ifthenpay.fields
    }


def test_ifthenpay_is_ready_only_with_a_payment_method_key() -> None:
    """The anti-phishing key alone takes no payment: one of Multibanco, MB WAY or card must resolve too."""
    ifthenpay = spec_of("ifthenpay")
    assert not is_ready(ifthenpay, frozenset({"antiPhishingKey"}), PLATFORM)
    assert not is_ready(ifthenpay, frozenset(), {"IFTHENPAY_ANTIPHISHING_KEY": "k"})
    for method in ("mbKey", "mbwayKey", "ccKey"):
        assert is_ready(ifthenpay, frozenset({"antiPhishingKey", method}), {})
        env_var = f"IFTHENPAY_{method.removesuffix('Key').upper()}_KEY"
        assert is_ready(ifthenpay, frozenset(), {"IFTHENPAY_ANTIPHISHING_KEY": "k", env_var: "m"})
