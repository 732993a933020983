"""`integrations-service dev-certs`: a local CA, a server certificate and one client certificate per role.

For development and the README's mutual-TLS grpcurl session only: the CA key
sits next to the certificates, and everything is valid for 30 days.
`--if-expiring` (what `make run-mtls` runs) writes a new set only when one is
missing, unreadable, expired or expiring within a day.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("dashboard", "commerce", "admin")
TRUST_DOMAIN = "integrations.local"
VALIDITY = datetime.timedelta(days=30)
RENEW_BEFORE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def spiffe_id(role: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{role}"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    if private:
        path.chmod(0o600)


def _save(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Issued:
    issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key")
    _write(issued.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(issued.key, key_pem, private=True)
    return issued


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    names: list[x509.GeneralName],
    usage: x509.ObjectIdentifier,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), ca_cert.subject, key)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def expiring(directory: Path, margin: datetime.timedelta = RENEW_BEFORE) -> str | None:
    """Why the set in `directory` needs renewing (missing, unreadable, expiring), or None while it is good."""
    deadline = datetime.datetime.now(datetime.UTC) + margin
    for stem in ("ca", "server", *ROLES):
        path = directory / f"{stem}.crt"
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return f"{path} is missing or unreadable"
        if not (directory / f"{stem}.key").is_file():
            return f"{directory / stem}.key is missing"
        if cert.not_valid_after_utc <= deadline:
            return f"{path} expires {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if not (directory / "policy.toml").is_file():
        return f"{directory / 'policy.toml'} is missing"
    return None


def make_dev_certs(directory: Path) -> dict[str, Issued]:
    """Write ca, server and one client pair per role, plus policy.toml naming the clients; return the paths."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("integrations development CA")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    issued = {"ca": _save(directory, "ca", ca_cert, ca_key)}
    server_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    issued["server"] = _save(
        directory, "server", *issue(ca_cert, ca_key, "localhost", server_names, ExtendedKeyUsageOID.SERVER_AUTH)
    )
    for role in ROLES:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(role))]
        pair = issue(ca_cert, ca_key, f"{role}.{TRUST_DOMAIN}", names, ExtendedKeyUsageOID.CLIENT_AUTH)
        issued[role] = _save(directory, role, *pair)
    policy = "".join(f'[[callers]]\nspiffe = "{spiffe_id(role)}"\nrole = "{role}"\n\n' for role in ROLES)
    _write(directory / "policy.toml", policy.encode(), private=False)
    return issued
