"""Which name `integrations-service healthcheck` verifies when INTEGRATIONS_HEALTHCHECK_SERVER_NAME is unset."""

from __future__ import annotations

from pathlib import Path

from integrations_service.healthcheck import server_dns_name
from tests.tls_fixtures import CertificateAuthority


def test_first_dns_name_of_the_server_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    cert, _ = ca.issue("svc", dns=("integrations.internal", "other.internal"), ips=("10.0.0.1",), server=True).write(
        tmp_path, "a"
    )
    assert server_dns_name(cert) == "integrations.internal"


def test_a_wildcard_stands_for_one_label_under_it(tmp_path: Path) -> None:
    cert, _ = CertificateAuthority.create().issue("svc", dns=("*.integrations.svc",), server=True).write(tmp_path, "w")
    assert server_dns_name(cert) == "healthcheck.integrations.svc"


def test_no_dns_name_or_no_readable_certificate_leaves_the_dialled_host(tmp_path: Path) -> None:
    cert, _ = CertificateAuthority.create().issue("svc", ips=("127.0.0.1",), server=True).write(tmp_path, "ip")
    assert server_dns_name(cert) is None
    assert server_dns_name(tmp_path / "missing.crt") is None
    (tmp_path / "garbage.crt").write_text("not a certificate")
    assert server_dns_name(tmp_path / "garbage.crt") is None
