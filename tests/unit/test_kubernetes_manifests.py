"""deploy/kubernetes: valid for the API, and right where the schemas cannot tell (security, probes, paths, grace)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from integrations_service.api.auth import Policy
from integrations_service.config import (
    ENCRYPTION_KEY_FILE_ENV,
    HEALTHCHECK_FILE_ENVS,
    SETTINGS,
    SHUTDOWN_GRACE,
)
from integrations_service.supervisor import STOP_MARGIN

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
MAKEFILE = (ROOT / "Makefile").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()
FILE_SETTINGS = {
    ENCRYPTION_KEY_FILE_ENV,
    "INTEGRATIONS_TLS_CERT",
    "INTEGRATIONS_TLS_KEY",
    "INTEGRATIONS_TLS_CLIENT_CA",
    "INTEGRATIONS_AUTHZ_POLICY",
    *HEALTHCHECK_FILE_ENVS,
}


def documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (path.name, doc)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def one(kind: str) -> dict[str, Any]:
    [found] = [doc for _, doc in documents() if doc["kind"] == kind]
    return found


def pod() -> dict[str, Any]:
    return one("Deployment")["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def container() -> dict[str, Any]:
    [only] = pod()["containers"]
    return only  # type: ignore[no-any-return]


def env() -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container()["env"]}


def test_the_makefile_validates_against_pinned_kubernetes_versions() -> None:
    [versions] = re.findall(r"^KUBERNETES_VERSIONS := (.+)$", MAKEFILE, re.M)
    assert all(re.fullmatch(r"1\.\d+\.\d+", v) for v in versions.split()), versions
    assert "kubernetes-validate --strict" in MAKEFILE
    assert re.search(r"^lint:.*\bkubernetes-validate\b", MAKEFILE, re.M)


@pytest.mark.parametrize("version", re.findall(r"^KUBERNETES_VERSIONS := (.+)$", MAKEFILE, re.M)[0].split())
def test_every_manifest_validates_offline_and_strictly(version: str) -> None:
    assert {doc["kind"] for _, doc in documents()} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "NetworkPolicy",
    }
    for name, doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any error
        assert doc["metadata"]["name"], name


def test_a_typo_in_a_manifest_is_caught() -> None:
    deployment = one("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.30.0", strict=True)


def test_the_pod_runs_unprivileged_with_a_read_only_root() -> None:
    security = pod()["securityContext"]
    [user] = re.findall(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    assert security["runAsNonRoot"] is True
    assert (str(security["runAsUser"]), str(security["runAsGroup"])) == user
    assert security["fsGroup"] == security["runAsGroup"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod()["automountServiceAccountToken"] is False
    own = container()["securityContext"]
    assert own["readOnlyRootFilesystem"] is True
    assert own["allowPrivilegeEscalation"] is False
    assert own["capabilities"] == {"drop": ["ALL"]}
    resources = container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    # Python writes only to /tmp (read-only root): an in-memory emptyDir.
    tmp = next(m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in next(v for v in pod()["volumes"] if v["name"] == tmp["name"])


def test_probes_use_the_healthcheck_command() -> None:
    assert container()["readinessProbe"]["exec"]["command"] == ["integrations-service", "healthcheck", "--ready"]
    assert container()["livenessProbe"]["exec"]["command"] == ["integrations-service", "healthcheck"]
    startup = container()["startupProbe"]
    assert startup["exec"]["command"] == ["integrations-service", "healthcheck"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        # Python starts in ~1 s; the checks' own gRPC timeout is 3 s.
        assert container()[probe]["timeoutSeconds"] >= 4, probe


def test_termination_grace_covers_pre_stop_and_the_shutdown_grace() -> None:
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    shutdown_grace = float(env().get(SHUTDOWN_GRACE.env, SHUTDOWN_GRACE.default or "0"))
    # After the in-flight calls: the audit buffer and key counts are written, the pool closed. With
    # INTEGRATIONS_WORKERS above 1 the supervisor allows that STOP_MARGIN, kills a worker still running after
    # grace + margin and exits: the kubelet's SIGKILL must not come before (5 s for it to reap and exit).
    assert pod()["terminationGracePeriodSeconds"] >= float(pre_stop[1]) + shutdown_grace + STOP_MARGIN + 5
    readme = " ".join((MANIFESTS / "README.md").read_text().split())
    assert f"`terminationGracePeriodSeconds: {pod()['terminationGracePeriodSeconds']}`" in readme
    assert f"`INTEGRATIONS_SHUTDOWN_GRACE` ({env()[SHUTDOWN_GRACE.env]} s)" in readme


def test_every_variable_is_a_setting_and_every_file_is_mounted() -> None:
    known = {s.env for s in SETTINGS} | FILE_SETTINGS
    assert set(env()) <= known, set(env()) - known
    assert env()["INTEGRATIONS_MODE"] == "production"
    assert set(env()) >= FILE_SETTINGS, "key, TLS, policy and the probes' certificate all come from mounts"
    mounts = {m["mountPath"]: m for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod()["volumes"]}
    for name in sorted(FILE_SETTINGS):
        path = Path(env()[name])
        mount = mounts.get(str(path.parent))
        assert mount is not None, f"{name}={path}: no volume mounted at {path.parent}"
        assert mount["readOnly"] is True
        source = volumes[mount["name"]].get("secret") or volumes[mount["name"]]["configMap"]
        assert path.name in {item["path"] for item in source["items"]}, f"{name}: {path.name} is not projected"


def test_key_and_certificates_come_from_secrets_readable_by_the_group_only() -> None:
    volumes = {v["name"]: v for v in pod()["volumes"]}
    secrets = [v["secret"] for v in volumes.values() if "secret" in v]
    assert {s["secretName"] for s in secrets} == {
        "integrations-keyring",
        "integrations-tls",
        "integrations-healthcheck-tls",
    }
    assert all(s["defaultMode"] == 0o440 for s in secrets)
    tls = next(s for s in secrets if s["secretName"] == "integrations-tls")
    assert {item["key"] for item in tls["items"]} == {"tls.crt", "tls.key", "ca.crt"}  # cert-manager's keys
    database = next(item for item in container()["env"] if item["name"] == "DATABASE_URL")
    assert "secretKeyRef" in database["valueFrom"]


def test_the_policy_config_map_loads(tmp_path: Path) -> None:
    text = one("ConfigMap")["data"]["policy.toml"]
    (tmp_path / "policy.toml").write_text(text)
    policy = Policy.load(tmp_path / "policy.toml")
    assert policy is not None
    assert "spiffe://shop.example/commerce" in text


def test_service_ports_and_disruption_budget_match_the_pod() -> None:
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    exposed = {int(p) for p in re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.M)[0].split()}
    assert set(ports.values()) == exposed
    assert env()["INTEGRATIONS_LISTEN_ADDRESS"].endswith(f":{ports['grpc']}")
    assert env()["INTEGRATIONS_METRICS_ADDRESS"].endswith(f":{ports['metrics']}")
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = one("Service")["spec"]
    assert {p["targetPort"] for p in service["ports"]} == set(ports)
    assert service["selector"].items() <= labels.items()
    budget = one("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] < one("Deployment")["spec"]["replicas"]


def test_the_network_policy_admits_the_callers_to_grpc_prometheus_to_metrics_and_nothing_else() -> None:
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    service_ports = {p["targetPort"]: p["port"] for p in one("Service")["spec"]["ports"]}
    labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["podSelector"]["matchLabels"] == one("Deployment")["spec"]["selector"]["matchLabels"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"]  # deny by default, both ways
    ingress = {rule["ports"][0]["port"]: rule for rule in policy["ingress"]}
    assert len(ingress) == len(policy["ingress"])
    # One rule per port, every port the pod and the Service expose, and only those (the Service maps the
    # ports one to one, so the policy's port numbers are the container's and the Service's both).
    assert [len(rule["ports"]) for rule in policy["ingress"]] == [1] * len(policy["ingress"])
    assert set(ingress) == set(ports.values()) == set(service_ports.values())
    assert all(service_ports[name] == port for name, port in ports.items())
    assert all(rule["ports"][0]["protocol"] == "TCP" for rule in policy["ingress"])
    callers = [peer["podSelector"]["matchLabels"] for peer in ingress[ports["grpc"]]["from"]]
    assert all(set(peer) == {"podSelector"} for peer in ingress[ports["grpc"]]["from"])
    assert callers == [
        {"app.kubernetes.io/name": "merchant-dashboard"},
        {"app.kubernetes.io/name": "commerce"},
    ]
    assert ingress[ports["metrics"]]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]
    egress = policy["egress"]
    assert len(egress) == 2
    [database] = [rule for rule in egress if rule["ports"] == [{"port": 5432, "protocol": "TCP"}]]
    assert database["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgresql"}}}]
    [dns] = [rule for rule in egress if rule is not database]
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    readme = " ".join((MANIFESTS / "README.md").read_text().split())
    for label in ("app.kubernetes.io/name: merchant-dashboard", "app.kubernetes.io/name: commerce"):
        assert f"`{label}`" in readme, label
    assert "`app.kubernetes.io/name: postgresql`" in readme
    assert "`networkpolicy.yaml`" in readme


def test_readme_secret_commands_name_the_secrets_the_pod_mounts() -> None:
    readme = (MANIFESTS / "README.md").read_text()
    for line in readme.splitlines():
        if line.startswith("kubectl create secret"):
            name = shlex.split(line)[4]
            assert name in {"integrations-keyring", "integrations-database"}, name
    assert "secretName: integrations-tls" in readme
    assert "secretName: integrations-healthcheck-tls" in readme
