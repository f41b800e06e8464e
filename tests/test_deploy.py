"""The deployment files in deploy/: nginx accepts the shipped config, and the compose file and the
Kubernetes manifests say what the replica setup needs (no Docker engine or cluster here: these
checks read the files; tests/test_replicas_live.py runs the nginx config in front of two servers)."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from tests.replica_support import DEPLOY, nginx_binary, nginx_conf_for


def test_nginx_accepts_the_shipped_config(tmp_path):
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (make system-deps installs it)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx_conf_for([18001, 18002], 18000, tmp_path))
    done = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    proxy = (DEPLOY / "nginx-proxy.conf").read_text()
    for directive in (
        "proxy_set_header Upgrade $http_upgrade;",
        "proxy_set_header Connection $connection_upgrade;",
        "proxy_read_timeout 3600s;",
        "proxy_next_upstream error timeout http_502 http_503;",
    ):
        assert directive in proxy


def test_compose_runs_replicas_behind_nginx_with_redis():
    compose = yaml.safe_load((DEPLOY / "compose.replicas.yml").read_text())
    services = compose["services"]
    server, redis, nginx = services["server"], services["redis"], services["nginx"]
    assert server["image"] == "emotion-server:cpu" and server["deploy"]["replicas"] == 2
    assert "ports" not in server  # only nginx is published: replicas can scale
    env = server["environment"]
    assert env["EMOTION_STORE"] == "redis" and env["EMOTION_REDIS_URL"].startswith("redis://redis:")
    assert "/readyz" in " ".join(server["healthcheck"]["test"])
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    mounts = " ".join(nginx["volumes"])
    assert (
        "./nginx.conf:/etc/nginx/nginx.conf" in mounts
        and "./nginx-proxy.conf:/etc/nginx/emotion-proxy.conf" in mounts
    )
    assert nginx["depends_on"]["server"]["condition"] == "service_healthy"


def test_kubernetes_manifests():
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[(doc["kind"], doc.get("metadata", {}).get("name", path.stem))] = doc
    deployment = docs[("Deployment", "emotion-server")]
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "emotion-server:cpu"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EMOTION_STORE"] == "redis" and env["EMOTION_REDIS_URL"] == "redis://redis:6379/0"
    assert docs[("Service", "emotion-server")]["spec"]["selector"] == {"app": "emotion-server"}
    redis = docs[("StatefulSet", "redis")]
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ("Service", "redis") in docs
    notes = docs[("Ingress", "emotion-server")]["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-read-timeout"] == "3600"
    kustomization = docs[("Kustomization", "kustomization")]
    assert set(kustomization["resources"]) == {"redis.yaml", "server.yaml", "ingress.yaml"}
