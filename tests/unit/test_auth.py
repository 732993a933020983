"""Typed caller names: what a certificate is called, how a policy names callers, and which role matches."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from integrations_service.api.auth import Authorizer, Identified, Policy
from integrations_service.api.identity import (
    DEVELOPMENT,
    CallerName,
    NameKind,
    common_name,
    dns_name,
    fingerprint_name,
    names_from_pem,
    spiffe_id_problem,
    spiffe_name,
)
from integrations_service.errors import ConfigurationError, PermissionDenied
from tests.tls_fixtures import CertificateAuthority

COMMERCE = "spiffe://shop.example/commerce"
ADMIN = "spiffe://shop.example/admin"
AUDIT = "/integrations.v1.IntegrationService/ListAuditEvents"

CA = CertificateAuthority.create()


@pytest.mark.parametrize(
    ("uri", "valid"),
    [
        (COMMERCE, True),
        ("spiffe://shop.example/ns/prod/sa/commerce", True),
        ("spiffe://shop-1.example_x/a.b-c_D", True),
        ("spiffe://shop.example", False),  # a trust domain, no workload
        ("spiffe://shop.example/", False),
        ("spiffe://shop.example/commerce/", False),
        ("spiffe://shop.example//commerce", False),
        ("spiffe://shop.example/./commerce", False),
        ("spiffe://shop.example/../admin", False),
        ("spiffe://Shop.example/commerce", False),  # trust domains are lower case
        ("SPIFFE://shop.example/commerce", False),
        ("spiffe://shop.example:443/commerce", False),
        ("spiffe://user@shop.example/commerce", False),
        ("spiffe://shop.example/commerce?x=1", False),
        ("spiffe://shop.example/commerce#x", False),
        ("spiffe://shop.example/comm%65rce", False),
        ("spiffe://shop.example/commerce\n", False),
        ("spiffe://" + "a" * 256 + "/x", False),
        ("spiffe://shop.example/" + "a" * 2048, False),
        ("https://shop.example/commerce", False),
    ],
)
def test_spiffe_ids_follow_the_spiffe_id_format(uri: str, valid: bool) -> None:
    assert (spiffe_id_problem(uri) is None) is valid


@pytest.mark.parametrize(
    ("issued", "names"),
    [
        # CN only: a common name, whatever it spells.
        ({"common_name": COMMERCE}, [common_name(COMMERCE)]),
        # A DNS SAN spelling a SPIFFE ID is a DNS name.
        ({"dns": (ADMIN,)}, [dns_name(ADMIN)]),
        # One URI SAN that is a SPIFFE ID, then DNS SANs (lower-cased, in order), then the CN.
        (
            {"common_name": "Ops", "uris": (COMMERCE,), "dns": ("B.example", "a.example")},
            [spiffe_name(COMMERCE), dns_name("b.example"), dns_name("a.example"), common_name("Ops")],
        ),
        # Two URI SANs: no SPIFFE ID at all.
        ({"uris": (ADMIN, COMMERCE)}, []),
        ({"uris": (ADMIN, "https://shop.example/x"), "dns": ("a.example",)}, [dns_name("a.example")]),
        # One URI SAN that is no valid SPIFFE ID.
        ({"uris": ("spiffe://shop.example/admin/",)}, []),
        ({"uris": ("urn:example:admin",), "common_name": "x"}, [common_name("x")]),
        # Nothing at all: only the fingerprint.
        ({}, []),
    ],
)
def test_names_of_a_certificate(issued: dict[str, object], names: list[CallerName]) -> None:
    pair = CA.issue(**issued)  # type: ignore[arg-type]
    assert list(names_from_pem(pair.cert_pem)) == [*names, fingerprint_name(pair.fingerprint)]


def test_a_certificate_is_parsed_once() -> None:
    pem = CA.issue("cached").cert_pem
    assert names_from_pem(pem) is names_from_pem(pem)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (spiffe_name(COMMERCE), f"spiffe:{COMMERCE}"),
        (dns_name("Commerce.Internal."), "dns:commerce.internal"),
        (common_name("Commerce Service"), "cn:Commerce Service"),
        (fingerprint_name("sha256:" + "AB" * 32), "sha256:" + "ab" * 32),
        (DEVELOPMENT, "development-plaintext"),
        # A common name cannot forge a log line or an audit column.
        (
            common_name("x\ncaller=spiffe:spiffe://shop.example/admin"),
            "cn:x\\x0acaller=spiffe:spiffe://shop.example/admin",
        ),
    ],
)
def test_names_are_shown_with_their_kind(name: CallerName, shown: str) -> None:
    assert str(name) == shown


def policy(*entries: str) -> Policy:
    return Policy.from_document(tomllib.loads("".join(f"[[callers]]\n{e}\n\n" for e in entries)))


FP = "sha256:" + "0f" * 32


@pytest.mark.parametrize(
    ("entry", "name"),
    [
        (f'spiffe = "{COMMERCE}"', spiffe_name(COMMERCE)),
        (f'identity = "{COMMERCE}"', spiffe_name(COMMERCE)),  # the shape before typed names
        ('dns = "Commerce.Internal"', dns_name("commerce.internal")),
        ('common_name = "Commerce Service"', common_name("Commerce Service")),
        (f'fingerprint = "{FP.upper().replace("SHA256", "sha256")}"', fingerprint_name(FP)),
    ],
)
def test_policy_entries_name_their_kind(entry: str, name: CallerName) -> None:
    assert policy(f'{entry}\nrole = "commerce"').roles_by_name == {name: "commerce"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('identity = "commerce.internal"', 'write dns = "commerce.internal"'),
        ('identity = "commerce.internal"', 'or common_name = "commerce.internal"'),
        ('identity = "Commerce Service"', 'write common_name = "Commerce Service"'),
        ('identity = "x509-sha256:' + "0f" * 32 + '"', f'write fingerprint = "{FP}"'),
        ('identity = "development-plaintext"', "trusted without a policy"),
        ('identity = "SPIFFE://shop.example/admin"', "is not a valid SPIFFE ID"),
        (f'identity = "{COMMERCE}/"', "not a valid SPIFFE ID"),
        ('spiffe = "commerce.internal"', 'spiffe = "commerce.internal" is invalid: a SPIFFE ID is spiffe://'),
        (f'spiffe = "{COMMERCE}?x"', "is invalid"),
        (f'dns = "{COMMERCE}"', "a DNS name is"),
        ('dns = "*.shop.example"', "no wildcard"),
        ('common_name = "a\\nb"', "printable"),
        (f'common_name = "{"x" * 65}"', "1 to 64"),
        ('fingerprint = "' + "0f" * 32 + '"', "sha256: and the 64 hex digits"),
        ('fingerprint = "sha256:abc"', "sha256: and the 64 hex digits"),
        ('dns = ""', "dns must be a non-empty string"),
        ("dns = 7", "dns must be a non-empty string"),
        (f'dns = "a.example"\nspiffe = "{COMMERCE}"', "needs exactly one of spiffe, dns, common_name, fingerprint"),
        ("", "needs exactly one of"),
        ('dsn = "a.example"', "unknown keys 'dsn'"),
    ],
)
def test_bad_policy_entries_stop_the_start(entry: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        policy(f'spiffe = "{ADMIN}"\nrole = "admin"', f'{entry}\nrole = "commerce"')
    text = str(caught.value)
    assert text.startswith("INTEGRATIONS_AUTHZ_POLICY: policy: callers[1]"), text
    assert message in text, text


def test_one_name_given_two_roles_is_refused_but_repeating_it_is_fine() -> None:
    same = policy(f'spiffe = "{COMMERCE}"\nrole = "commerce"', f'identity = "{COMMERCE}"\nrole = "commerce"')
    assert same.roles_by_name == {spiffe_name(COMMERCE): "commerce"}
    with pytest.raises(ConfigurationError) as caught:
        policy(f'spiffe = "{COMMERCE}"\nrole = "commerce"', f'identity = "{COMMERCE}"\nrole = "admin"')
    assert "callers[1]: spiffe:spiffe://shop.example/commerce is given two roles" in str(caught.value)
    # The same text under two kinds is two names, and may have two roles.
    both = policy('dns = "ops.example"\nrole = "commerce"', 'common_name = "ops.example"\nrole = "dashboard"')
    assert len(both.roles_by_name) == 2


TYPED = policy(
    f'spiffe = "{ADMIN}"\nrole = "admin"',
    f'spiffe = "{COMMERCE}"\nrole = "commerce"',
    'dns = "commerce.internal"\nrole = "commerce"',
    'common_name = "ops"\nrole = "dashboard"',
)


@pytest.mark.parametrize(
    ("names", "shown", "role", "ambiguous"),
    [
        ([common_name(COMMERCE)], common_name(COMMERCE), None, False),
        ([dns_name(ADMIN)], dns_name(ADMIN), None, False),
        ([dns_name("commerce.internal"), common_name("ops")], None, None, True),
        ([spiffe_name(ADMIN), dns_name("commerce.internal")], None, None, True),
        ([spiffe_name(COMMERCE), dns_name("commerce.internal")], spiffe_name(COMMERCE), "commerce", False),
        (
            [spiffe_name("spiffe://shop.example/x"), dns_name("commerce.internal")],
            dns_name("commerce.internal"),
            "commerce",
            False,
        ),
        ([dns_name("x.internal"), common_name("ops")], common_name("ops"), "dashboard", False),
        ([dns_name("x.internal"), common_name("y")], dns_name("x.internal"), None, False),
    ],
)
def test_matching(names: list[CallerName], shown: CallerName | None, role: str | None, ambiguous: bool) -> None:
    identified = TYPED.identify(names)
    assert identified.name == (shown or names[0])  # ambiguous: shown by the first name
    assert identified.role == role
    assert bool(identified.conflicts) is ambiguous


def test_an_ambiguous_caller_gets_no_permission_at_all() -> None:
    authorizer = Authorizer(TYPED)
    caller = authorizer.identify([spiffe_name(ADMIN), dns_name("commerce.internal")])
    with pytest.raises(PermissionDenied, match="ambiguous"):
        authorizer.check(caller, AUDIT, None)


def test_only_a_connection_without_certificate_is_the_development_caller() -> None:
    assert Authorizer(TYPED).identify([]) == Identified(DEVELOPMENT)
    nameless = CA.issue().cert_pem
    identified = Authorizer(TYPED).identify(names_from_pem(nameless))
    assert identified.name.kind is NameKind.FINGERPRINT
    assert str(identified.name).startswith("sha256:")
    # No policy entry can name the development caller.
    with pytest.raises(ConfigurationError):
        policy('identity = "development-plaintext"\nrole = "admin"')


def test_the_example_policy_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "authz-policy.example.toml"
    assert Policy.load(example).roles_by_name == {
        spiffe_name("spiffe://shop.example/dashboard"): "dashboard",
        spiffe_name(COMMERCE): "commerce",
        dns_name("oncall.shop.example"): "admin",
    }
