"""Typed caller names: what a verified client certificate calls its holder, and by which kind of name.

A name of one kind never passes for a name of another, so a certificate whose
common name spells `spiffe://…/commerce`, or whose DNS SAN does, is not that
SPIFFE ID. The kinds, and how every log line, error and audit record shows a
name:

    spiffe:spiffe://shop.example/commerce  the SPIFFE ID: only from a URI SAN, only when the
                                           certificate has exactly one URI SAN and it is a valid
                                           SPIFFE ID (as gRPC's peer_spiffe_id)
    dns:commerce.internal                  a DNS SAN (lower-cased: DNS names ignore case)
    cn:Commerce Service                    a common name of the subject
    sha256:<64 hex>                        the SHA-256 of the certificate's DER (always present)
    development-plaintext                  a plaintext caller in development mode (no certificate)

The prefixes differ from each other and from the CLI's `cli:<command>@<user>`.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import re
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from integrations_service.untrusted import bounded

log = logging.getLogger("integrations.auth")


class NameKind(enum.Enum):
    """Declared in precedence order: the first name of a certificate shows it when no policy entry picks one."""

    SPIFFE = "spiffe"
    DNS = "dns"
    COMMON_NAME = "cn"
    FINGERPRINT = "sha256"
    DEVELOPMENT = "development-plaintext"


@dataclass(frozen=True)
class CallerName:
    kind: NameKind
    value: str

    def __str__(self) -> str:
        if self.kind is NameKind.DEVELOPMENT:
            return NameKind.DEVELOPMENT.value
        # Certificate text is the CA's, not ours: bounded keeps a newline in a CN out of the log's structure.
        return f"{self.kind.value}:{bounded(self.value)}"


DEVELOPMENT = CallerName(NameKind.DEVELOPMENT, "")

# SPIFFE ID format (spiffe.io, "SPIFFE-ID"): lower-case trust domain, then at least one path segment.
_SPIFFE_ID = re.compile(r"spiffe://(?P<domain>[a-z0-9._-]+)(?P<path>(?:/[A-Za-z0-9._-]+)+)")
_SPIFFE_MAX_BYTES = 2048
_TRUST_DOMAIN_MAX = 255
_DNS_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_DNS_MAX = 253
_COMMON_NAME_MAX = 64  # ub-common-name, RFC 5280
_FINGERPRINT = re.compile(r"sha256:[0-9a-fA-F]{64}")


def spiffe_id_problem(uri: str) -> str | None:
    """Why `uri` is not a SPIFFE ID; None when it is one."""
    match = _SPIFFE_ID.fullmatch(uri)
    if match is None:
        return (
            "a SPIFFE ID is spiffe://<trust domain>/<path>: a lower-case trust domain of [a-z0-9._-] and "
            "at least one path segment of [A-Za-z0-9._-], no empty segment, no port, query or fragment"
        )
    if any(segment in (".", "..") for segment in match["path"].split("/")):
        return "a SPIFFE ID has no '.' or '..' path segment"
    if len(match["domain"]) > _TRUST_DOMAIN_MAX or len(uri.encode()) > _SPIFFE_MAX_BYTES:
        return f"a SPIFFE ID is at most {_SPIFFE_MAX_BYTES} bytes, its trust domain at most {_TRUST_DOMAIN_MAX}"
    return None


def dns_name_problem(name: str) -> str | None:
    if len(name) > _DNS_MAX or not _DNS_NAME.fullmatch(name.lower()):
        return "a DNS name is dot-separated labels of [a-z0-9_-], at most 253 characters, no wildcard"
    return None


def common_name_problem(name: str) -> str | None:
    if not 0 < len(name) <= _COMMON_NAME_MAX or not name.isprintable():
        return f"a common name is 1 to {_COMMON_NAME_MAX} printable characters"
    return None


def fingerprint_problem(text: str) -> str | None:
    if not _FINGERPRINT.fullmatch(text):
        return "a fingerprint is sha256: and the 64 hex digits of the SHA-256 of the certificate's DER"
    return None


def spiffe_name(uri: str) -> CallerName:
    return CallerName(NameKind.SPIFFE, uri)


def dns_name(name: str) -> CallerName:
    return CallerName(NameKind.DNS, name.lower().removesuffix("."))


def common_name(name: str) -> CallerName:
    return CallerName(NameKind.COMMON_NAME, name)


def fingerprint_name(text: str) -> CallerName:
    """From `sha256:<hex>` (policy) or bare hex (a certificate)."""
    return CallerName(NameKind.FINGERPRINT, text.removeprefix("sha256:").lower())


@functools.lru_cache(maxsize=256)
def names_from_pem(pem: bytes) -> tuple[CallerName, ...]:
    """Every name a verified certificate gives its holder, in precedence order; parsed once per certificate.

    Never empty: the fingerprint names even a certificate without SAN or subject, so such a certificate
    can never read as the development caller.
    """
    der = ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))
    fingerprint = fingerprint_name(hashlib.sha256(der).hexdigest())
    try:
        certificate = x509.load_der_x509_certificate(der)
        names = [*_san_names(certificate), *_common_names(certificate)]
    except ValueError:
        # OpenSSL verified it, but cryptography cannot read its names: only its fingerprint names it.
        log.warning(
            "a client certificate's names cannot be read; it is named by its fingerprint only",
            extra={"event": "unreadable_certificate", "caller": str(fingerprint)},
        )
        names = []
    return tuple(dict.fromkeys((*names, fingerprint)))  # a name listed twice is one name


def _san_names(certificate: x509.Certificate) -> list[CallerName]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    # Several URI SANs name no SPIFFE ID at all, even if one of them is one (gRPC's peer_spiffe_id rule).
    spiffe = [spiffe_name(uris[0])] if len(uris) == 1 and spiffe_id_problem(uris[0]) is None else []
    return [*spiffe, *(dns_name(name) for name in san.get_values_for_type(x509.DNSName) if name)]


def _common_names(certificate: x509.Certificate) -> list[CallerName]:
    attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return [common_name(value) for a in attributes if isinstance(value := a.value, str) and value]
