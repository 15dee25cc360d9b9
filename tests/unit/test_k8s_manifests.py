"""The Kubernetes manifests and the compose file: schema-valid and complete for every service."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.30"
SERVICES = {"api", "scheduler", "market-listener", "executor", "kite-sim"}


def _docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _of(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _docs() if d["kind"] == kind}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_validates_strictly_against_the_kubernetes_schema() -> None:
    docs = _docs()
    assert len(docs) > 20
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_deployment() -> None:
    bad = copy.deepcopy(_of("Deployment")["tickwise-executor"])
    bad["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = copy.deepcopy(_of("Deployment")["tickwise-executor"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_service_has_probes_resources_and_a_disruption_budget() -> None:
    deployments = _of("Deployment")
    assert {name.removeprefix("tickwise-") for name in deployments} == SERVICES
    budgets = _of("PodDisruptionBudget")
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        assert _matches(dep["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
        for c in pod["spec"]["containers"]:
            ready, live = c["readinessProbe"]["httpGet"]["path"], c["livenessProbe"]["httpGet"]["path"]
            assert live == "/healthz", name
            assert ready == "/readyz", name
            res = c["resources"]
            assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert any(_matches(b["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
                   for b in budgets.values()), f"no PodDisruptionBudget covers {name}"


def test_executors_autoscale_and_the_migration_job_runs_alembic() -> None:
    (hpa,) = _of("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tickwise-executor"}
    assert hpa["spec"]["minReplicas"] >= 2
    (job,) = _of("Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][-3:] == ["alembic", "upgrade", "head"]


def test_secrets_hold_no_values_and_every_reference_resolves() -> None:
    secrets = _of("Secret")
    for secret in secrets.values():
        assert "data" not in secret
        assert all(v == "" for v in secret["stringData"].values()), secret["metadata"]["name"]
    refs = 0
    for doc in [*_of("Deployment").values(), *_of("Job").values()]:
        for c in doc["spec"]["template"]["spec"]["containers"]:
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs += 1
                    assert ref["key"] in secrets[ref["name"]]["stringData"], ref
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
    assert refs >= 10


def test_network_policies_deny_by_default_and_open_only_what_each_pod_needs() -> None:
    policies = _of("NetworkPolicy")
    deny = policies["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    labels = {name.removeprefix("tickwise-"): d["spec"]["template"]["metadata"]["labels"]
              for name, d in _of("Deployment").items()}

    def egress_ports(service: str) -> set[int]:
        ports: set[int] = set()
        for p in policies.values():
            if "Egress" in p["spec"]["policyTypes"] and _matches(p["spec"]["podSelector"].get("matchLabels", {}),
                                                                 labels[service]):
                ports |= {port["port"] for rule in p["spec"].get("egress", []) for port in rule.get("ports", [])}
        return ports

    assert egress_ports("executor") == {53, 6379, 5432, 443, 8000}
    assert egress_ports("scheduler") == {53, 6379, 5432}
    assert egress_ports("market-listener") == {53, 6379, 443, 8000}
    assert egress_ports("kite-sim") == {53}
    api_in = policies["api-ingress"]["spec"]
    assert _matches(api_in["podSelector"]["matchLabels"], labels["api"])
    assert [p["port"] for p in api_in["ingress"][0]["ports"]] == [8080]


def test_compose_runs_the_same_topology_with_healthchecks() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "kite-sim", "api", "scheduler", "market_listener",
            "executor"} == set(services)
    for name in ("redis", "postgres", "kite-sim", "api", "scheduler", "market_listener", "executor"):
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in ("api", "scheduler", "market_listener", "executor"):
        svc = services[name]
        assert svc["command"] == ["python", "-m", f"services.{name}"]
        assert svc["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        # One Redis ACL user per service, its password from the environment.
        assert svc["environment"]["REDIS_URL"].startswith(f"redis://{name}:${{")
    assert "default" in services["redis"]["command"] and "off" in services["redis"]["command"]
    assert services["executor"]["deploy"]["replicas"] >= 2
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    assert "TICKWISE_SECRET_KEY: ${TICKWISE_SECRET_KEY:?" in text
