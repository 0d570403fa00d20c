"""deploy/kubernetes validated against the Kubernetes schemas; deploy/docker linted; the pieces agree.

The Docker engine cannot run here, so the images are not built in tests: hadolint checks the Dockerfiles,
and what they and the manifests ask of the package (health command, settings, ports) is checked against
the package itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pickscore.server.app import LIVENESS_SERVICE
from pickscore.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOCKER = ROOT / "deploy" / "docker"
# Kinds whose schemas are not Kubernetes' own (CRDs, kustomize): checked by the cross-reference tests.
NOT_IN_KUBERNETES_SCHEMAS = {"ServiceMonitor", "Kustomization"}


def bin_tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is a dev dependency: pip install -e '.[dev]'"
    return found


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        (doc,) = yaml.safe_load_all(path.read_text())
        docs[doc["kind"]] = doc
    return docs


def test_manifests_validate_against_the_kubernetes_schemas():
    result = subprocess.run(
        [bin_tool("kubernetes-validate"), "--strict", *map(str, sorted(K8S.glob("*.yaml")))],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    passed = {line.split()[1] for line in result.stdout.splitlines() if " passed for resource " in line}
    assert {Path(p).name for p in passed} == {
        p.name for p in K8S.glob("*.yaml") if yaml.safe_load(p.read_text())["kind"] not in NOT_IN_KUBERNETES_SCHEMAS
    }


def test_the_validator_rejects_a_broken_manifest(tmp_path):
    bad = tmp_path / "pdb.yaml"
    bad.write_text((K8S / "pdb.yaml").read_text().replace("maxUnavailable", "maxUnavailabel"))
    result = subprocess.run([bin_tool("kubernetes-validate"), "--strict", str(bad)], capture_output=True, text=True)
    assert result.returncode != 0 and "maxUnavailabel" in result.stdout + result.stderr


def test_kustomization_lists_every_manifest():
    docs = manifests()
    assert sorted(docs["Kustomization"]["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_selectors_ports_and_probes_agree():
    docs = manifests()
    deployment, service, pdb, monitor = (
        docs["Deployment"],
        docs["Service"],
        docs["PodDisruptionBudget"],
        docs["ServiceMonitor"],
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
        pdb["spec"]["selector"]["matchLabels"],
    ]
    assert all(s.items() <= pod_labels.items() for s in selectors)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None"  # headless: client-side load balancing

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"

    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings.from_env(env)  # every name is a setting and every value parses
    settings.validate()
    # Kubernetes would otherwise add PICKSCORE_PORT=tcp://... etc. once any Service named pickscore has a
    # cluster IP, and the server refuses to start on variables it does not know or cannot parse.
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert ports == {"grpc": settings.port, "http": settings.http_port, "metrics": settings.metrics_port}

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port, probe
    assert container["readinessProbe"]["grpc"].get("service", "") == ""  # readiness: NOT_SERVING while draining
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE  # liveness: alive while draining
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings.grace_period_s + pre_stop


def test_autoscaler_reads_the_adapter_metric():
    docs = manifests()
    hpa = docs["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])["rules"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"] == "pickscore_queue_depth"


def test_dockerfiles_pass_hadolint():
    dockerfiles = sorted(DOCKER.glob("Dockerfile.*"))
    assert [p.name for p in dockerfiles] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    result = subprocess.run(
        [bin_tool("hadolint"), "--config", str(DOCKER / "hadolint.yaml"), *map(str, dockerfiles)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /tmp && pip install pickscore\nUSER root\n")
    result = subprocess.run(
        [bin_tool("hadolint"), "--config", str(DOCKER / "hadolint.yaml"), str(bad)], capture_output=True, text=True
    )
    assert result.returncode != 0 and "DL3007" in result.stdout  # the :latest tag


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_run_as_non_root_and_check_health_through_grpc(name):
    text = (DOCKER / name).read_text()
    stages = text.count("\nFROM ") + text.startswith("FROM ")
    assert stages >= 2, "multi-stage"
    assert "USER 10001:10001" in text
    assert "HEALTHCHECK" in text and 'CMD ["pickscore", "health"]' in text
    assert 'ENTRYPOINT ["pickscore"]' in text and 'CMD ["serve"]' in text


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_images_expose_the_servers_ports_triton_style(name):
    """HTTP 8000, gRPC 8001, metrics 8002, as Triton: not 9090, which is Prometheus' own port."""
    settings = Settings()
    (expose,) = [line.split()[1:] for line in (DOCKER / name).read_text().splitlines() if line.startswith("EXPOSE ")]
    assert sorted(map(int, expose)) == sorted([settings.http_port, settings.port, settings.metrics_port])
    assert (settings.http_port, settings.port, settings.metrics_port) == (8000, 8001, 8002)


def test_compose_wires_the_repository_files():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"pickscore", "prometheus", "grafana"}
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).resolve().exists(), volume
    assert (DOCKER / services["pickscore"]["build"]["context"] / services["pickscore"]["build"]["dockerfile"]).exists()
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == [f"pickscore:{Settings().metrics_port}"]
    provider = yaml.safe_load(
        (ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "pickscore.yml").read_text()
    )
    mounted = {v.split(":")[1] for v in services["grafana"]["volumes"] if ":" in v}
    assert provider["providers"][0]["options"]["path"] in mounted


def _json_patch(doc: dict, operations: list[dict]) -> dict:
    """The RFC 6902 operations kustomize applies (add, replace), enough for the overlays here."""
    import copy

    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = op["path"].lstrip("/").split("/")
        target = doc
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if op["op"] == "add" and last == "-":
            target.append(op["value"])
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or last in target, op["path"]
            target[last] = op["value"]
        else:
            raise AssertionError(f"unsupported op {op['op']}")
    return doc


def test_tls_overlay_validates_and_its_probes_speak_tls(tmp_path):
    """deploy/kubernetes/tls: the base Deployment patched for TLS, mutual TLS and a token file."""
    from pickscore.cli import build_parser

    overlay = K8S / "tls"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../"]
    (patch,) = kustomization["patches"]
    assert (
        patch["target"]["kind"] == "Deployment"
        and patch["target"]["name"] == manifests()["Deployment"]["metadata"]["name"]
    )
    deployment = _json_patch(manifests()["Deployment"], yaml.safe_load((overlay / patch["path"]).read_text()))
    patched = tmp_path / "deployment.yaml"
    patched.write_text(yaml.safe_dump(deployment))
    result = subprocess.run([bin_tool("kubernetes-validate"), "--strict", str(patched)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = Settings.from_env({e["name"]: e["value"] for e in container["env"]})
    settings.validate()
    assert settings.tls_cert and settings.tls_key and settings.tls_client_ca and settings.auth_token_file
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    secrets = {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    assert {"tls", "tokens"} <= secrets and not any("subPath" in m for m in container["volumeMounts"])
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca, settings.auth_token_file):
        assert any(path.startswith(mounts[name] + "/") for name in secrets), path

    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        args = build_parser().parse_args(command[1:])
        assert command[0] == "pickscore" and args.command == "health", probe
        assert args.server.endswith(f":{settings.port}") and args.tls_ca == settings.tls_client_ca, probe
        assert (args.tls_cert, args.tls_key) == (settings.tls_cert, settings.tls_key), probe  # mutual TLS
        assert args.service == ("" if probe == "readinessProbe" else LIVENESS_SERVICE), probe
        assert container[probe]["timeoutSeconds"] >= 5, probe
