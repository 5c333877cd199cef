"""deploy/ manifests: Kubernetes core kinds validated against the API schema (kubernetes-validate, strict);
the KubeRay RayJob, whose CRD schema is not available offline, checked for the fields KubeRay requires."""

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = "1.30"


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def test_redis_manifest_is_valid_kubernetes_with_aof_auth_and_a_cluster_internal_port():
    docs = _docs("redis.yaml")
    for d in docs:
        kubernetes_validate.validate(d, K8S, strict=True)  # raises on an unknown or mistyped field
    by_kind = {d["kind"]: d for d in docs}
    svc, sts = by_kind["Service"], by_kind["StatefulSet"]
    assert svc["spec"]["type"] == "ClusterIP"
    port = svc["spec"]["ports"][0]["port"]
    assert port != 6379  # Ray's control store
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    cmd = " ".join(c["command"] + c["args"])
    assert "--appendonly yes" in cmd and f"--port {port}" in cmd and "--requirepass" in cmd
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "diffexp-redis"
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == c["volumeMounts"][0]["name"]


def test_the_validator_catches_a_mistyped_field():
    bad = _docs("redis.yaml")[0]
    bad["spec"]["portz"] = bad["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S, strict=True)


def _pod_template_ok(tpl: dict, where: str) -> None:
    containers = tpl["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert isinstance(c["name"], str) and isinstance(c["image"], str), where
    # the pod template is a core PodTemplateSpec: validate it as a Pod
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": tpl["spec"]},
                                 K8S, strict=True)  # fmt: skip


def test_rayjob_has_what_kuberay_requires():
    (job,) = _docs("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m learner.main")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay: a map of strings
    _pod_template_ok(head["template"], "headGroupSpec")
    for g in cluster["workerGroupSpecs"]:
        assert g["groupName"] and isinstance(g["replicas"], int)
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        _pod_template_ok(g["template"], g["groupName"])
