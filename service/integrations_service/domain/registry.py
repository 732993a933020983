"""The provider catalog: every provider, its fields, env fallbacks and format rules.

The Stripe, Easypay and Ifthenpay fields are the dashboard's (see the seed
design page); Resend, SMTP and Google Analytics 4 are this service's choice.
Format checks sit next to the fields they guard: a check returns a problem
description, or None when the value is fine.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

FormatCheck = Callable[[str], str | None]
# Given an organization's stored clear values after a save, return
# (field key, problem) pairs for rules that span fields.
CrossCheck = Callable[[Mapping[str, str]], list[tuple[str, str]]]


class Category(enum.Enum):
    PAYMENTS = "payments"
    NOTIFICATIONS = "notifications"
    ANALYTICS = "analytics"


@dataclass(frozen=True)
class FieldSpec:
    """One configurable field.

    `binds_secrets` marks a field that decides where the provider's secrets are
    sent or which account they belong to (an endpoint, host, port, account id,
    user name, sender address, publishable key or measurement id). Once an
    organization stores such a field, the provider's secrets never come from
    the environment for it (see resolution.py): otherwise a dashboard save of
    only `baseUrl` would pair the platform's API key with that URL. A secret
    binds too when it authenticates what the provider sends *to* the platform
    about one account (Stripe's webhook signing secret, Ifthenpay's
    anti-phishing key) or is itself the account (Ifthenpay's entity keys): an
    organization's own webhook secret next to the platform's Stripe key would
    let it sign forged payment events about the platform's account.

    `endpoint` marks, among those, a field that names the server itself (a base
    URL, an SMTP host). Once an organization stores one, *no* field of the
    provider comes from the environment for it: the platform's account id,
    user name or sender address would be sent to that server too.
    """

    key: str
    env_var: str
    description: str
    secret: bool
    required: bool
    check: FormatCheck | None = None
    binds_secrets: bool = False
    endpoint: bool = False

    def __post_init__(self) -> None:
        if self.endpoint and not self.binds_secrets:
            raise ValueError(f"{self.key}: an endpoint field binds the provider's secrets")


@dataclass(frozen=True)
class ProviderSpec:
    id: str
    display_name: str
    category: Category
    runtime_supported: bool
    fields: tuple[FieldSpec, ...]
    cross_checks: tuple[CrossCheck, ...] = ()
    # Groups of optional fields of which at least one must resolve for the provider to be ready
    # (Ifthenpay takes no payment without a payment method's key).
    ready_needs_one_of: tuple[frozenset[str], ...] = ()
    # Derived from `fields` once, with the spec: every read asks for them.
    _by_key: dict[str, FieldSpec] = field(init=False, repr=False, compare=False)
    # The provider's field keys: only these are ever decrypted.
    field_keys: frozenset[str] = field(init=False, repr=False, compare=False)
    binding_keys: frozenset[str] = field(init=False, repr=False, compare=False)
    endpoint_keys: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_key", {f.key: f for f in self.fields})
        object.__setattr__(self, "field_keys", frozenset(self._by_key))
        object.__setattr__(self, "binding_keys", frozenset(f.key for f in self.fields if f.binds_secrets))
        object.__setattr__(self, "endpoint_keys", frozenset(f.key for f in self.fields if f.endpoint))

    def field(self, key: str) -> FieldSpec | None:
        return self._by_key.get(key)

    @property
    def env_vars(self) -> tuple[str, ...]:
        return tuple(f.env_var for f in self.fields)


def _prefix(*prefixes: str) -> FormatCheck:
    def check(value: str) -> str | None:
        if value.startswith(prefixes):
            return None
        return "must start with " + " or ".join(repr(p) for p in prefixes)

    return check


# A DNS host name in ASCII (an IDN as its xn-- form): labels of letters, digits and inner hyphens, at least two,
# the last not all digits (so no IPv4 address in any spelling: 127.0.0.1, 2130706433, 0x7f.1).
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})+")
_MAX_HOST_NAME = 253
# Names that only ever mean the platform's own machine or network (RFC 6761, 6762, 8375; ICANN's .internal).
_LOCAL_SUFFIXES = ("localhost", "local", "internal", "localdomain", "home.arpa", "arpa")


def _host_name_problem(host: str) -> str | None:
    if not host.isascii() or len(host) > _MAX_HOST_NAME or not _HOST_NAME.fullmatch(host):
        if _is_ip_address(host):
            return "must be a host name, not an IP address"
        return "must be a DNS host name (letters, digits, hyphens and dots; an IDN as xn--), without port or scheme"
    top = host.rsplit(".", 1)[-1]
    if top.isdigit() or (top.lower().startswith("0x") and all(c in "0123456789abcdefABCDEF" for c in top[2:])):
        return "must be a host name, not an IP address"
    lowered = host.lower()
    if any(lowered == suffix or lowered.endswith("." + suffix) for suffix in _LOCAL_SUFFIXES):
        return "must be a public DNS host name, not a local or internal one"
    return None


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _host(value: str) -> str | None:
    return _host_name_problem(value)


def _https_url(value: str) -> str | None:
    """An https:// URL whose host is a public DNS name: no user info, query, fragment, space or odd port."""
    if any(c.isspace() for c in value):
        return "must be an https:// URL without spaces"
    parts = urlsplit(value)
    if parts.scheme != "https" or not parts.netloc:
        return "must be an https:// URL"
    if "@" in parts.netloc:
        # https://api.easypay.pt@attacker.example/ sends to attacker.example.
        return "must be an https:// URL without a user name or password"
    if parts.query or parts.fragment or "?" in value or "#" in value:
        return "must be an https:// URL without a query or fragment"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or parts.netloc.endswith(":"):
        return "must be an https:// URL with a port from 1 to 65535, if any"
    host = parts.netloc.rsplit(":", 1)[0] if parts.port is not None else parts.netloc
    if host.startswith("[") or _is_ip_address(host):
        return "must be an https:// URL naming a host name, not an IP address"
    if problem := _host_name_problem(host):
        return problem.replace("must be", "must be an https:// URL whose host is", 1)
    return None


def _port(value: str) -> str | None:
    if value.isascii() and value.isdigit() and not value.startswith("0") and int(value) <= 65535:
        return None
    return "must be a port number from 1 to 65535"


# One mailbox: an ASCII dot-atom local part at a DNS host name; the display name, if any, is a phrase without
# RFC 5322 specials (so no second address, group or comment can hide in it) or a quoted string.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDRESS = rf"(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>{_LABEL}(?:\.{_LABEL})+)"
_SENDER = re.compile(rf'{_ADDRESS}|(?:"[^"\\]*"|[^()<>\[\]:;@\\,"]*?)\s*<{_ADDRESS.replace("?P<", "?P<n_")}>')


def _sender(value: str) -> str | None:
    if any(unicodedata.category(char) == "Cf" for char in value):
        # Bidi overrides and invisible characters make a mail client show another sender than the one sent.
        return "must not contain invisible or bidirectional formatting characters"
    match = _SENDER.fullmatch(value)
    if match and not _host_name_problem(match["domain"] or match["n_domain"]):
        return None
    return "must be an e-mail address, optionally as 'Name <address>'"


_MEASUREMENT_ID = re.compile(r"G-[A-Z0-9]{4,20}")


def _measurement_id(value: str) -> str | None:
    return None if _MEASUREMENT_ID.fullmatch(value) else "must look like G-XXXXXXXXXX"


def _stripe_mode(value: str) -> str | None:
    for mode in ("test", "live"):
        if f"_{mode}_" in value[:8]:
            return mode
    return None


def _stripe_keys_share_mode(values: Mapping[str, str]) -> list[tuple[str, str]]:
    """Test and live keys must not mix: the payment would go to the wrong account."""
    secret_mode = _stripe_mode(values.get("secretKey", ""))
    public_mode = _stripe_mode(values.get("publishableKey", ""))
    if secret_mode and public_mode and secret_mode != public_mode:
        problem = f"mixes Stripe modes: secretKey is a {secret_mode} key, publishableKey a {public_mode} key"
        return [("publishableKey", problem), ("secretKey", problem)]
    return []


PROVIDERS: tuple[ProviderSpec, ...] = (
    ProviderSpec(
        id="stripe",
        display_name="Stripe",
        category=Category.PAYMENTS,
        runtime_supported=True,
        fields=(
            FieldSpec(
                "secretKey",
                "STRIPE_SECRET_KEY",
                "Server-side secret key",
                secret=True,
                required=True,
                check=_prefix("sk_test_", "sk_live_", "rk_test_", "rk_live_"),
            ),
            FieldSpec(
                "webhookSecret",
                "STRIPE_WEBHOOK_SECRET",
                "Webhook signing secret",
                secret=True,
                required=True,
                check=_prefix("whsec_"),
                binds_secrets=True,
            ),
            FieldSpec(
                "publishableKey",
                "NEXT_PUBLIC_STRIPE_PUBLISHABLE_KEY",
                "Client-side publishable key",
                secret=False,
                required=True,
                check=_prefix("pk_test_", "pk_live_"),
                binds_secrets=True,
            ),
        ),
        cross_checks=(_stripe_keys_share_mode,),
    ),
    ProviderSpec(
        id="easypay",
        display_name="Easypay",
        category=Category.PAYMENTS,
        runtime_supported=True,
        fields=(
            FieldSpec(
                "accountId", "EASYPAY_ACCOUNT_ID", "Easypay account ID", secret=False, required=True, binds_secrets=True
            ),
            FieldSpec("apiKey", "EASYPAY_API_KEY", "API key", secret=True, required=True),
            FieldSpec(
                "baseUrl",
                "EASYPAY_BASE_URL",
                "API base URL (prod/sandbox)",
                secret=False,
                required=True,
                check=_https_url,
                binds_secrets=True,
                endpoint=True,
            ),
        ),
    ),
    ProviderSpec(
        id="ifthenpay",
        display_name="Ifthenpay",
        category=Category.PAYMENTS,
        runtime_supported=True,
        fields=(
            FieldSpec(
                "antiPhishingKey",
                "IFTHENPAY_ANTIPHISHING_KEY",
                "Anti-phishing key",
                secret=True,
                required=True,
                binds_secrets=True,
            ),
            FieldSpec("mbKey", "IFTHENPAY_MB_KEY", "Multibanco key", secret=True, required=False, binds_secrets=True),
            FieldSpec("mbwayKey", "IFTHENPAY_MBWAY_KEY", "MB WAY key", secret=True, required=False, binds_secrets=True),
            FieldSpec("ccKey", "IFTHENPAY_CC_KEY", "Credit card key", secret=True, required=False, binds_secrets=True),
        ),
        ready_needs_one_of=(frozenset({"mbKey", "mbwayKey", "ccKey"}),),
    ),
    ProviderSpec(
        id="resend",
        display_name="Resend",
        category=Category.NOTIFICATIONS,
        runtime_supported=True,
        fields=(
            FieldSpec("apiKey", "RESEND_API_KEY", "API key", secret=True, required=True),
            FieldSpec(
                "fromAddress",
                "RESEND_FROM_ADDRESS",
                "Sender address, e.g. 'Shop <orders@shop.example>'",
                secret=False,
                required=True,
                check=_sender,
                binds_secrets=True,
            ),
        ),
    ),
    ProviderSpec(
        id="smtp",
        display_name="SMTP",
        category=Category.NOTIFICATIONS,
        runtime_supported=False,
        fields=(
            FieldSpec(
                "host",
                "SMTP_HOST",
                "SMTP server host name",
                secret=False,
                required=True,
                check=_host,
                binds_secrets=True,
                endpoint=True,
            ),
            FieldSpec(
                "port", "SMTP_PORT", "SMTP server port", secret=False, required=True, check=_port, binds_secrets=True
            ),
            FieldSpec("username", "SMTP_USERNAME", "SMTP user name", secret=False, required=False, binds_secrets=True),
            FieldSpec("password", "SMTP_PASSWORD", "SMTP password", secret=True, required=False),
            FieldSpec(
                "fromAddress",
                "SMTP_FROM_ADDRESS",
                "Sender address, e.g. 'Shop <orders@shop.example>'",
                secret=False,
                required=True,
                check=_sender,
                binds_secrets=True,
            ),
        ),
    ),
    ProviderSpec(
        id="google_analytics",
        display_name="Google Analytics 4",
        category=Category.ANALYTICS,
        runtime_supported=False,
        fields=(
            FieldSpec(
                "measurementId",
                "GA4_MEASUREMENT_ID",
                "Measurement ID (G-XXXXXXXXXX)",
                secret=False,
                required=True,
                check=_measurement_id,
                binds_secrets=True,
            ),
            FieldSpec("apiSecret", "GA4_API_SECRET", "Measurement Protocol API secret", secret=True, required=True),
        ),
    ),
)

_BY_ID = {p.id: p for p in PROVIDERS}


def find_provider(provider_id: str) -> ProviderSpec | None:
    return _BY_ID.get(provider_id)


def providers_in(category: Category | None) -> Iterator[ProviderSpec]:
    if category is None:  # what nearly every listing asks for
        return iter(PROVIDERS)
    return (p for p in PROVIDERS if p.category is category)


def all_env_vars() -> tuple[str, ...]:
    return tuple(var for p in PROVIDERS for var in p.env_vars)
