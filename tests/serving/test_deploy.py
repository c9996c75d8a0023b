"""deploy/*.yaml validate against Kubernetes' own schemas and KServe's own API models (no cluster
runs here), and the validator refuses what a cluster would refuse."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

SDK = ROOT / "build" / "kserve-sdk"
pytestmark = pytest.mark.skipif(not (SDK / "kserve").is_dir(), reason="make install-test puts KServe's models in build/")


def validate(*files) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "validate_deploy.py"), "--sdk", str(SDK),
                           *map(str, files)], capture_output=True, text=True)


def test_the_manifests_validate():
    r = validate()
    assert r.returncode == 0 and "2 files: valid" in r.stdout, r.stdout + r.stderr


def test_what_the_manifests_promise():
    """Probes on /livez and /readyz, non-root, a read-only root with a writable /tmp, a grace period
    over BentoML's 60 s traffic timeout; KServe speaks v2 with the same image."""
    k8s = list(yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()))
    pod = next(d for d in k8s if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] and c["securityContext"]["readOnlyRootFilesystem"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"} and pod["terminationGracePeriodSeconds"] > 60
    assert {d["kind"] for d in k8s} >= {"Deployment", "Service", "HorizontalPodAutoscaler"}
    ks = list(yaml.safe_load_all((ROOT / "deploy" / "kserve.yaml").read_text()))
    isvc = next(d for d in ks if d["kind"] == "InferenceService")
    runtime = next(d for d in ks if d["kind"] == "ServingRuntime")
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert runtime["spec"]["containers"][0]["image"] == c["image"]


@pytest.mark.parametrize("name,mutate,words", [
    ("kubernetes.yaml", lambda d: d[0]["spec"]["template"]["spec"]["containers"][0].update(readynessProbe={}),
     "readynessProbe"),
    ("kubernetes.yaml", lambda d: d[0]["spec"].update(replicas="two"), "replicas"),
    ("kserve.yaml", lambda d: d[1]["spec"]["predictor"]["model"].update(protocol="v2"), "unknown field 'protocol'"),
    ("kserve.yaml", lambda d: d[0]["spec"]["containers"][0].update(ports=[{"containerPort": "3000"}]), "containerPort"),
])
def test_the_validator_refuses_what_a_cluster_would(tmp_path, name, mutate, words):
    docs = list(yaml.safe_load_all((ROOT / "deploy" / name).read_text()))
    mutate(docs)
    bad = tmp_path / name
    bad.write_text(yaml.safe_dump_all(docs))
    r = validate(bad)
    assert r.returncode == 1 and words in r.stdout, r.stdout + r.stderr
