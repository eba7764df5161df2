"""deploy/helm/livestt: linted by helm 4 and rendered manifests validated against Kubernetes' schemas, offline.

No cluster runs here: these tests check what a chart can promise before one runs it.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from config import ENV_PREFIX, Config
from podman import ROOT, require

CHART = ROOT / "deploy" / "helm" / "livestt"
HELM = ROOT / ".tools" / "helm"  # from npm (make deploy-deps)
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
AUTH = ["--set", "auth.apiKeys[0]=key-one", "--set", "auth.tokenSecret=one-secret-for-all-replicas"]
EVERYTHING = [*AUTH, "--set", "ingress.enabled=true", "--set", "autoscaling.enabled=true",
              "--set", "serviceMonitor.enabled=true", "--set", "storage.existingClaim=livestt-data"]
VALUE_SETS = {
    "defaults": [],
    "everything": EVERYTHING,
    "host-network": ["--set", "hostNetwork=true", "--set", "auth.existingSecret=mine",
                     "--set", "iceServersSecret=livestt-ice"],
    "s3": ["--set", "storage.url=s3://transcripts/stt", "--set", "storage.s3Secret=livestt-s3"],
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    require(str(HELM))
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    assert not check or result.returncode == 0, result.stderr + result.stdout
    return result


def render(*values: str) -> dict[str, dict]:
    text = helm("template", "stt", str(CHART), *values).stdout
    return {doc["kind"]: doc for doc in yaml.safe_load_all(text) if doc}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_lints_strictly(values):
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), *values).stdout


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_are_valid_kubernetes(values, tmp_path):
    require(str(VALIDATE))
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(helm("template", "stt", str(CHART), *values).stdout)
    result = subprocess.run([str(VALIDATE), "--strict", str(manifests)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    kinds = {k for k in render(*values) if k != "ServiceMonitor"}  # a CRD: no schema offline
    assert result.stdout.count("passed for resource") == len(kinds), result.stdout


def test_pods_drain_on_sigterm_and_are_probed():
    deployment = render()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # preStop waits, then SIGTERM gives the server its 20 s to finalize speech in flight, within the grace.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 20
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert render()["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_every_variable_is_a_setting_and_secrets_stay_secret():
    manifests = render(*EVERYTHING)
    env = {e["name"]: e for e in manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = {ENV_PREFIX + f.name.upper() for f in fields(Config)}
    assert set(env) <= settings, set(env) - settings
    assert env["STT_TOKEN_SECRET"]["valueFrom"]["secretKeyRef"]["key"] == "token-secret"
    assert env["STT_API_KEY_FILE"]["value"] == "/etc/livestt/api-keys"
    secret = manifests["Secret"]["stringData"]
    assert secret["api-keys"].split() == ["key-one"] and secret["token-secret"] == "one-secret-for-all-replicas"
    # Keys without the shared token secret would give each replica a random one: refused.
    refused = helm("template", "stt", str(CHART), "--set", "auth.apiKeys[0]=k", check=False)
    assert refused.returncode != 0 and "tokenSecret" in refused.stderr


def test_routing_media_and_monitoring():
    manifests = render(*EVERYTHING)
    assert manifests["Service"]["spec"]["sessionAffinity"] == "ClientIP"
    assert manifests["Ingress"]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/affinity"] == "cookie"
    assert manifests["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    endpoint = manifests["ServiceMonitor"]["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    volumes = manifests["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "livestt-data"}} in volumes
    host = render(*VALUE_SETS["host-network"])["Deployment"]["spec"]["template"]["spec"]
    assert host["hostNetwork"] and host["affinity"]["podAntiAffinity"]
    env = {e["name"]: e for e in host["containers"][0]["env"]}
    assert env["STT_ICE_SERVERS"]["valueFrom"]["secretKeyRef"]["name"] == "livestt-ice"


def test_s3_storage_takes_its_credentials_from_a_secret():
    container = render(*VALUE_SETS["s3"])["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["STT_STORAGE_URL"]["value"] == "s3://transcripts/stt"
    assert container["envFrom"] == [{"secretRef": {"name": "livestt-s3"}}]
    assert not any(name.startswith("AWS_") for name in env)  # credentials never in the manifest
    defaults = render()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "envFrom" not in defaults and "STT_STORAGE_URL" not in {e["name"] for e in defaults["env"]}
