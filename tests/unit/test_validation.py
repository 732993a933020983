"""Request validation: every bad field named, format rules next to the registry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from integrations_service.domain import validation
from integrations_service.domain.registry import find_provider
from integrations_service.errors import FieldViolation, InvalidArgument, NotFound

STRIPE = find_provider("stripe")
assert STRIPE is not None


def violations_of(provider: str, values: dict[str, str], clear: list[str] | None = None) -> list[FieldViolation]:
    spec = find_provider(provider)
    assert spec is not None
    with pytest.raises(InvalidArgument) as caught:
        validation.check_changes(spec, values, clear or [])
    return list(caught.value.violations)


@pytest.mark.parametrize(
    ("provider", "key", "value"),
    [
        ("stripe", "secretKey", "sk_test_abc"),
        ("stripe", "secretKey", "sk_live_abc"),
        ("stripe", "secretKey", "rk_test_abc"),
        ("stripe", "secretKey", "rk_live_abc"),
        ("stripe", "publishableKey", "pk_test_abc"),
        ("stripe", "publishableKey", "pk_live_abc"),
        ("stripe", "webhookSecret", "whsec_abc"),
        ("easypay", "baseUrl", "https://api.test.easypay.pt/2.0"),
        ("easypay", "accountId", "2b0f63e2-9fb5-4e52-aca0-b4bf0339bbe6"),
        ("smtp", "port", "1"),
        ("smtp", "port", "587"),
        ("smtp", "port", "65535"),
        ("smtp", "fromAddress", "orders@shop.example"),
        ("smtp", "fromAddress", "Shop <orders@shop.example>"),
        ("resend", "fromAddress", "orders@shop.example"),
        ("google_analytics", "measurementId", "G-ABC123XYZ9"),
        ("ifthenpay", "mbKey", "ABC-123456"),
    ],
)
def test_well_formed_values_pass(provider: str, key: str, value: str) -> None:
    spec = find_provider(provider)
    assert spec is not None
    validation.check_changes(spec, {key: value}, [])


@pytest.mark.parametrize(
    ("provider", "key", "value", "says"),
    [
        ("stripe", "secretKey", "pk_test_abc", "must start with 'sk_test_'"),
        ("stripe", "secretKey", "sk_prod_abc", "must start with"),
        ("stripe", "publishableKey", "sk_test_abc", "'pk_test_' or 'pk_live_'"),
        ("stripe", "webhookSecret", "secret", "'whsec_'"),
        ("easypay", "baseUrl", "http://api.easypay.pt", "https"),
        ("easypay", "baseUrl", "api.easypay.pt", "https"),
        ("smtp", "port", "0", "1 to 65535"),
        ("smtp", "port", "65536", "1 to 65535"),
        ("smtp", "port", "25a", "1 to 65535"),
        ("smtp", "port", "٣", "1 to 65535"),
        ("smtp", "fromAddress", "not-an-address", "e-mail address"),
        ("resend", "fromAddress", "Shop <shop.example>", "e-mail address"),
        ("google_analytics", "measurementId", "UA-12345-1", "G-"),
    ],
)
def test_malformed_values_name_the_field(provider: str, key: str, value: str, says: str) -> None:
    [violation] = violations_of(provider, {key: value})
    assert violation.field == f"values.{key}"
    assert says in violation.description
    assert value not in violation.description or len(value) < 4


@pytest.mark.parametrize(
    ("values", "clear", "field", "says"),
    [
        ({"apiKey": "x"}, [], "values.apiKey", "not a field of stripe"),
        ({"secretKey": ""}, [], "values.secretKey", "clear_fields"),
        ({"secretKey": "••••••••4242"}, [], "values.secretKey", "omit the field to keep the stored secret"),
        ({"webhookSecret": "whsec_" + "a" * 4091}, [], "values.webhookSecret", "4096 bytes"),
        ({"secretKey": "sk_test_x"}, ["secretKey"], "clear_fields[0]", "both set in values and cleared"),
        ({}, ["nope"], "clear_fields[0]", "not a field of stripe"),
        ({}, ["secretKey", "secretKey"], "clear_fields[1]", "cleared twice"),
        ({}, [], "values", "at least one"),
    ],
)
def test_bad_changes(values: dict[str, str], clear: list[str], field: str, says: str) -> None:
    [violation] = violations_of("stripe", values, clear)
    assert violation.field == field
    assert says in violation.description


def test_value_of_exactly_4_kib_passes_and_multibyte_counts_bytes() -> None:
    assert STRIPE is not None
    validation.check_changes(STRIPE, {"webhookSecret": "whsec_" + "a" * 4090}, [])
    [violation] = violations_of("stripe", {"webhookSecret": "whsec_" + "é" * 2046})
    assert "4096 bytes" in violation.description


def test_every_violation_is_reported_at_once() -> None:
    found = violations_of("stripe", {"secretKey": "bad", "publishableKey": "bad", "nope": "x"})
    assert sorted(v.field for v in found) == ["values.nope", "values.publishableKey", "values.secretKey"]


@pytest.mark.parametrize(
    ("organization_id", "says"),
    [
        ("", "is required"),
        ("a" * 129, "at most 128"),
        ("org 1", "without whitespace"),
        ("org\t1", "without whitespace"),
        ("org\x00", "printable"),
        ("org\u200b", "printable"),
        ("org\u3000", "printable"),  # an ideographic space, beyond ASCII
    ],
)
def test_bad_organization_ids(organization_id: str, says: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.check_target(organization_id, "stripe")
    [violation] = caught.value.violations
    assert violation.field == "organization_id"
    assert says in violation.description


@pytest.mark.parametrize(
    "organization_id", ["o", "a" * 128, "org_123", "ôrg/é:1", "00000000-0000-0000-0000-000000000000"]
)
def test_good_organization_ids(organization_id: str) -> None:
    assert validation.check_target(organization_id, "stripe") is STRIPE


@given(st.text(max_size=40))
def test_organization_ids_are_judged_as_by_a_scan_of_every_character(organization_id: str) -> None:
    scanned = organization_id.isprintable() and not any(c.isspace() for c in organization_id)
    assert validation._printable_without_whitespace(organization_id) is scanned


def test_missing_organization_and_provider_both_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.check_target("", "")
    assert [v.field for v in caught.value.violations] == ["organization_id", "provider"]


def test_unknown_provider_is_not_found() -> None:
    with pytest.raises(NotFound, match="paypal"):
        validation.check_target("org_1", "paypal")


@pytest.mark.parametrize(
    ("stored", "ok"),
    [
        ({"secretKey": "sk_test_1", "publishableKey": "pk_test_1"}, True),
        ({"secretKey": "rk_live_1", "publishableKey": "pk_live_1"}, True),
        ({"secretKey": "sk_live_1"}, True),
        ({"secretKey": "sk_live_1", "publishableKey": "pk_test_1"}, False),
        ({"secretKey": "rk_test_1", "publishableKey": "pk_live_1"}, False),
    ],
)
def test_stripe_keys_may_not_mix_modes(stored: dict[str, str], ok: bool) -> None:
    assert STRIPE is not None
    if ok:
        validation.check_cross_field_rules(STRIPE, stored)
        return
    with pytest.raises(InvalidArgument) as caught:
        validation.check_cross_field_rules(STRIPE, stored)
    fields = {v.field for v in caught.value.violations}
    assert fields == {"values.publishableKey", "values.secretKey"}
    assert all("mixes Stripe modes" in v.description for v in caught.value.violations)


@pytest.mark.parametrize("control", ["\r", "\n", "\x00", "\t", "\x1b", "\x7f", "\x1f"])
def test_a_value_with_a_control_character_is_refused_naming_the_field_and_the_character(control: str) -> None:
    (violation,) = violations_of("easypay", {"baseUrl": f"https://api.easypay.pt{control}X: y"})
    assert violation.field == "values.baseUrl"
    assert f"U+{ord(control):04X}" in violation.description
    assert "easypay.pt" not in violation.description


@pytest.mark.parametrize("provider", ["stripe", "ga4", "a" * 64, "x_1"])
def test_well_formed_provider_ids(provider: str) -> None:
    assert validation.provider_id_problem(provider) is None


@pytest.mark.parametrize("provider", ["", "Stripe", "a" * 65, "stri pe", "stripe\n", "stripe/x", "é"])
def test_malformed_provider_ids_are_refused_before_the_catalog_is_searched(provider: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validation.check_target("org_1", provider)
    assert [v.field for v in caught.value.violations] == ["provider"]


def test_an_unknown_field_key_is_echoed_bounded_and_escaped() -> None:
    key = "evil\n" + "k" * 10_000
    (set_violation, clear_violation) = violations_of("stripe", {key: "v"}, [key])
    for violation in (set_violation, clear_violation):
        assert len(violation.field) + len(violation.description) < 400
        assert "\n" not in violation.field + violation.description
        assert "evil\\x0a" in violation.description


# --- endpoint, host, port and sender fields of a hostile caller ----------------------------------------


@pytest.mark.parametrize(
    ("provider", "key", "value"),
    [
        ("easypay", "baseUrl", "https://api.prod.easypay.pt/2.0"),
        ("easypay", "baseUrl", "https://api.test.easypay.pt:8443/2.0/"),
        ("smtp", "host", "smtp.example.com"),
        ("smtp", "host", "Mail-1.Shop.example"),
        ("smtp", "host", "xn--bcher-kva.example"),
        ("smtp", "fromAddress", '"Shop, Inc." <orders@shop.example>'),
        ("smtp", "fromAddress", "Loja São João <encomendas@loja.pt>"),
        ("smtp", "fromAddress", "O'Brien Shop <o.brien+orders@shop.example>"),
        ("resend", "fromAddress", "Shop Inc. <orders@mail.shop.example>"),
    ],
)
def test_well_formed_endpoints_hosts_and_senders_pass(provider: str, key: str, value: str) -> None:
    spec = find_provider(provider)
    assert spec is not None
    validation.check_changes(spec, {key: value}, [])


@pytest.mark.parametrize(
    ("provider", "key", "value", "says"),
    [
        # An https URL that sends credentials elsewhere than its host suggests, or into the platform's network.
        ("easypay", "baseUrl", "https://user:pass@api.easypay.pt/2.0", "user name or password"),
        ("easypay", "baseUrl", "https://api.easypay.pt@attacker.example/", "user name or password"),
        ("easypay", "baseUrl", "https://api.easypay.pt\\@attacker.example/", "user name or password"),
        ("easypay", "baseUrl", "https://api.easypay.pt:99999/", "port"),
        ("easypay", "baseUrl", "https://api.easypay.pt:0/", "port"),
        ("easypay", "baseUrl", "https://api.easypay.pt:x/", "port"),
        ("easypay", "baseUrl", "javascript:alert(1)//https://x", "https"),
        ("easypay", "baseUrl", "https:///api.easypay.pt", "https"),
        ("easypay", "baseUrl", "https://127.0.0.1/2.0", "IP address"),
        ("easypay", "baseUrl", "https://[::1]/2.0", "IP address"),
        ("easypay", "baseUrl", "https://169.254.169.254/latest", "IP address"),
        ("easypay", "baseUrl", "https://2130706433/", "host name"),
        ("easypay", "baseUrl", "https://localhost/2.0", "host name"),
        ("easypay", "baseUrl", "https://metadata.internal/", "host name"),
        ("easypay", "baseUrl", "https://api easypay.pt/", "space"),
        ("easypay", "baseUrl", "https://api.easypay.pt/2.0?key=x", "query"),
        ("easypay", "baseUrl", "https://api.easypay.pt/2.0#x", "query"),
        ("easypay", "baseUrl", "https://api.easypay.pt/2 0", "space"),
        # An SMTP host is a DNS name: no port, scheme, IP address or path.
        ("smtp", "host", "mx.attacker.example:25", "host name"),
        ("smtp", "host", "smtp://mx.example", "host name"),
        ("smtp", "host", "10.0.0.1", "IP address"),
        ("smtp", "host", "[::1]", "host name"),
        ("smtp", "host", "localhost", "host name"),
        ("smtp", "host", "mail.localhost", "host name"),
        ("smtp", "host", "mx example.com", "host name"),
        ("smtp", "host", "-mx.example.com", "host name"),
        ("smtp", "host", "mx..example.com", "host name"),
        ("smtp", "host", "a" * 64 + ".example", "host name"),
        ("smtp", "host", "smtp.bücher.example", "host name"),
        ("smtp", "port", "0587", "1 to 65535"),
        # One sender: no second address, group or list hidden in the display name or the address.
        ("smtp", "fromAddress", "evil@x.example, Shop <orders@shop.example>", "e-mail address"),
        ("smtp", "fromAddress", "orders@shop.example,victim@x.example", "e-mail address"),
        ("smtp", "fromAddress", "a@shop.example,d", "e-mail address"),
        ("resend", "fromAddress", "undisclosed:; <orders@shop.example>", "e-mail address"),
        ("resend", "fromAddress", 'Shop" <x@y.example>, "a <orders@shop.example>', "e-mail address"),
        ("resend", "fromAddress", "Shop <orders@127.0.0.1>", "e-mail address"),
        ("resend", "fromAddress", "Shop <orders@shop..example>", "e-mail address"),
        ("resend", "fromAddress", "Shop <(comment)orders@shop.example>", "e-mail address"),
        ("resend", "fromAddress", "Shop \u202egro.etis\u202c <orders@shop.example>", "bidirectional"),
    ],
)
def test_hostile_endpoints_hosts_and_senders_are_refused_naming_the_field(
    provider: str, key: str, value: str, says: str
) -> None:
    [violation] = violations_of(provider, {key: value})
    assert violation.field == f"values.{key}"
    assert says in violation.description
    assert value not in violation.description


@pytest.mark.parametrize("control", ["\x85", "\x9b", "\x80", "\u2028", "\u2029"])
def test_c1_controls_and_unicode_line_separators_are_refused_like_c0(control: str) -> None:
    """NEL and U+2028/U+2029 break lines for str.splitlines() and many parsers; C1 CSI starts terminal escapes."""
    (violation,) = violations_of("smtp", {"fromAddress": f"Shop{control}Bcc: x <orders@shop.example>"})
    assert violation.field == "values.fromAddress"
    assert f"U+{ord(control):04X}" in violation.description
