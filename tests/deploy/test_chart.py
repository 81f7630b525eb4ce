"""helm/ztunnel rendered by the real helm: upstream's DaemonSet shape, our additions, the schema.

The expectations come from the upstream chart (istio/istio manifests/charts/ztunnel, described
in the ecosystem notes §1); anything beyond upstream is marked as ours.
"""

from __future__ import annotations

import json
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartkit import (
    CHART,
    NAMESPACE,
    ROOT,
    Doc,
    by_kind,
    container,
    daemonset,
    env_of,
    env_values,
    run_helm,
    set_args,
    template,
    walk,
)

from ztunnel.core.config import ENV_VARS, Config

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("helm")]

KUBE_VERSION = "1.30.0"
ISTIOD = "istiod.istio-system.svc:15012"

# The value sets the issue names, each rendered, validated and asserted on.
MATRIX: dict[str, tuple[str, ...]] = {
    "defaults": (),
    "openshift": ("platform=openshift",),
    "network-policy": ("global.networkPolicy.enabled=true",),
    "resource-quotas": ("resourceQuotas.enabled=true",),
    "cpu-limits": ("resources.limits.cpu=2", "resources.requests.cpu=1"),
    "workers": ("workers=3",),
    "json-logs": ("logAsJson=true",),
    "pod-monitor": ("podMonitor.enabled=true",),
    "revision": ("revision=canary",),
    "cluster-name": ("multiCluster.clusterName=c1",),
    "env": ("env.FOO=bar",),
    "proxy-metadata": ("meshConfig.defaultConfig.proxyMetadata.X=y",),
    "everything": (
        "platform=openshift",
        "global.networkPolicy.enabled=true",
        "resourceQuotas.enabled=true",
        "resources.limits.cpu=2",
        "resources.limits.memory=1Gi",
        "workers=3",
        "logAsJson=true",
        "podMonitor.enabled=true",
        "podMonitor.interval=15s",
        "revision=canary",
        "network=net1",
        "peerCaCrl.enabled=true",
        "env.ENABLE_CLUSTER_TRUST_BUNDLE_API=true",
        "imagePullSecrets[0]=regcred",
        "imagePullPolicy=IfNotPresent",
        "dnsPolicy=ClusterFirst",
        "dnsConfig.searches[0]=example.internal",
        "volumes[0].name=extra",
        "volumes[0].emptyDir.medium=Memory",
        "volumeMounts[0].name=extra",
        "volumeMounts[0].mountPath=/extra",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].key=ambient",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
        ".nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
    ),
}

SECURITY_CONTEXT = {
    "allowPrivilegeEscalation": True,
    "privileged": False,
    "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_RAW"]},
    "readOnlyRootFilesystem": True,
    "runAsGroup": 1337,
    "runAsNonRoot": False,
    "runAsUser": 0,
}
TOLERATIONS = [
    {"effect": "NoSchedule", "operator": "Exists"},
    {"key": "CriticalAddonsOnly", "operator": "Exists"},
    {"effect": "NoExecute", "operator": "Exists"},
]
VOLUME_MOUNTS = [
    {"mountPath": "/var/run/secrets/istio", "name": "istiod-ca-cert"},
    {"mountPath": "/var/run/secrets/tokens", "name": "istio-token"},
    {"mountPath": "/var/run/ztunnel", "name": "cni-ztunnel-sock-dir"},
    {"mountPath": "/tmp", "name": "tmp"},
]
VOLUMES = [
    {
        "name": "istio-token",
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "path": "istio-token",
                        "expirationSeconds": 43200,
                        "audience": "istio-ca",
                    }
                }
            ]
        },
    },
    {"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}},
    {
        "name": "cni-ztunnel-sock-dir",
        "hostPath": {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"},
    },
    {"name": "tmp", "emptyDir": {}},
]
DOWNWARD_API = {
    "POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
    "POD_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    "NODE_NAME": {"fieldRef": {"fieldPath": "spec.nodeName"}},
    "INSTANCE_IP": {"fieldRef": {"fieldPath": "status.podIP"}},
    "SERVICE_ACCOUNT": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}},
    "ZTUNNEL_CPU_LIMIT": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "1"}},
}
DEFAULT_ENV = {
    "CA_ADDRESS": ISTIOD,
    "XDS_ADDRESS": ISTIOD,
    "RUST_LOG": "info",
    "LOG_LEVEL": "info",
    "ISTIO_META_CLUSTER_ID": "Kubernetes",
    "INPOD_ENABLED": "true",
    "TERMINATION_GRACE_PERIOD_SECONDS": "30",
    "ZTUNNEL_RESOURCE_CPU_REQUEST": "200m",
}
# Set by the chart as upstream's does, but not read by this implementation.
UPSTREAM_ONLY_ENV = {"INPOD_ENABLED"}


def pod_spec(*sets: str) -> Doc:
    spec: Doc = daemonset(*sets)["spec"]["template"]["spec"]
    return spec


def helm_fails(command: str, *sets: str) -> str:
    """Run `helm lint --strict` or `helm template` and return stderr+stdout of the failure."""
    extra = ["--strict"] if command == "lint" else ["ztunnel"]
    result = run_helm(command, *extra, str(CHART), "-n", NAMESPACE, *set_args(sets))
    assert result.returncode != 0, f"helm {command} accepted {sets}"
    return result.stdout + result.stderr


# --- lint and schema ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["defaults", "everything"])
def test_lint_strict_passes(name: str) -> None:
    result = run_helm("lint", "--strict", str(CHART), "-n", NAMESPACE, *set_args(MATRIX[name]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("command", ["lint", "template"])
def test_typo_key_fails(command: str) -> None:
    assert "Additional property workerz is not allowed" in helm_fails(command, "workerz=2")


@pytest.mark.parametrize("command", ["lint", "template"])
def test_wrong_type_for_workers_fails(command: str) -> None:
    assert "workers" in helm_fails(command, "workers=abc")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("workers=0", "workers"),
        ("podMonitor.enabld=true", "Additional property enabld is not allowed"),
        ("podMonitor.interval=soon", "interval"),
        ("resources.limit.cpu=1", "Additional property limit is not allowed"),
        ("platform=aws", "platform"),
        ("global.platform=aws", "platform"),
        ("logAsJson=yes", "logAsJson"),
        ("imagePullPolicy=Sometimes", "imagePullPolicy"),
        ("resourceScope=everything", "resourceScope"),
        ("terminationGracePeriodSeconds=-1", "terminationGracePeriodSeconds"),
        ("seLinuxOptions.typo=x", "Additional property typo is not allowed"),
        ("multiCluster.clustername=c1", "Additional property clustername is not allowed"),
        ("updateStrategy.rollingUpdate.maxsurge=1", "Additional property maxsurge"),
    ],
)
def test_schema_rejects_bad_values(bad: str, message: str) -> None:
    assert message in helm_fails("template", bad)


@pytest.mark.parametrize("good", ["workers=4", "global.hub=elsewhere", "meshConfig.trustDomain=x"])
def test_schema_accepts_valid_values(good: str) -> None:
    template(good)


def test_workers_accepts_a_numeric_string() -> None:
    result = run_helm(
        "template", "ztunnel", str(CHART), "-n", NAMESPACE, "--set-string", "workers=4"
    )
    assert result.returncode == 0, result.stderr
    assert "ZTUNNEL_WORKERS" in result.stdout


# --- Kubernetes schema validation ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_rendered_objects_pass_strict_kubernetes_validation(name: str) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate"
    )
    for doc in template(*MATRIX[name]):
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            continue  # a CRD: no bundled schema; test_pod_monitor checks it
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


# --- the DaemonSet as upstream -------------------------------------------------------------


def test_defaults_render_service_account_and_daemonset_only() -> None:
    assert sorted(doc["kind"] for doc in template()) == ["DaemonSet", "ServiceAccount"]


def test_daemonset_metadata_and_selector() -> None:
    ds = daemonset()
    assert ds["metadata"]["name"] == "ztunnel"
    assert ds["metadata"]["namespace"] == NAMESPACE
    assert ds["metadata"]["labels"]["app"] == "ztunnel"
    assert ds["spec"]["selector"] == {"matchLabels": {"app": "ztunnel"}}


def test_pod_labels_and_annotations() -> None:
    meta = daemonset()["spec"]["template"]["metadata"]
    labels = meta["labels"]
    assert labels["app"] == "ztunnel"
    assert labels["app.kubernetes.io/name"] == "ztunnel"
    assert labels["sidecar.istio.io/inject"] == "false"
    assert labels["istio.io/dataplane-mode"] == "none"
    assert labels["app.kubernetes.io/part-of"] == "istio"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"
    assert meta["annotations"] == {
        "sidecar.istio.io/inject": "false",
        "prometheus.io/port": "15020",
        "prometheus.io/scrape": "true",
    }


def test_container_name_args_ports_and_image() -> None:
    ctr = container()
    assert ctr["name"] == "istio-proxy"
    assert ctr["args"] == ["proxy", "ztunnel"]
    assert "command" not in ctr  # the image's ENTRYPOINT is `ztunnel`
    assert ctr["ports"] == [{"containerPort": 15020, "name": "ztunnel-stats", "protocol": "TCP"}]
    assert ctr["image"] == "ztunnel-python:0.1.0"
    assert "imagePullPolicy" not in ctr


def test_readiness_probe_and_no_liveness_probe() -> None:
    ctr = container()
    assert ctr["readinessProbe"] == {"httpGet": {"port": 15021, "path": "/healthz/ready"}}
    assert "livenessProbe" not in ctr
    assert "startupProbe" not in ctr


def test_security_context() -> None:
    assert container()["securityContext"] == SECURITY_CONTEXT


def test_resources_default_requests_only() -> None:
    assert container()["resources"] == {"requests": {"cpu": "200m", "memory": "512Mi"}}


def test_volumes_and_mounts() -> None:
    assert container()["volumeMounts"] == VOLUME_MOUNTS
    assert pod_spec()["volumes"] == VOLUMES


def test_scheduling() -> None:
    spec = pod_spec()
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert spec["tolerations"] == TOLERATIONS
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "ztunnel"
    assert spec["terminationGracePeriodSeconds"] == 30
    assert "affinity" not in spec
    assert "dnsPolicy" not in spec
    assert "dnsConfig" not in spec
    assert "hostNetwork" not in spec


def test_update_strategy() -> None:
    assert daemonset()["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }


def test_default_env_exactly() -> None:
    env = env_of(container())
    literal = {name: e["value"] for name, e in env.items() if "value" in e}
    downward = {name: e["valueFrom"] for name, e in env.items() if "valueFrom" in e}
    assert literal == DEFAULT_ENV
    assert downward == DOWNWARD_API
    assert len(container()["env"]) == len(DEFAULT_ENV) + len(DOWNWARD_API)


def test_chart_env_names_are_known_to_the_runtime() -> None:
    known = {var.name for var in ENV_VARS}
    names = set(env_of(container(*MATRIX["everything"]))) - UPSTREAM_ONLY_ENV
    assert names - {"ENABLE_CLUSTER_TRUST_BUNDLE_API"} <= known


def test_service_account() -> None:
    sa = by_kind(template())["ServiceAccount"]
    assert sa["metadata"]["name"] == "ztunnel"
    assert sa["metadata"]["namespace"] == NAMESPACE
    assert "imagePullSecrets" not in sa
    sa = by_kind(template("imagePullSecrets[0]=a", "imagePullSecrets[1]=b"))["ServiceAccount"]
    assert sa["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]


# --- values ------------------------------------------------------------------------------


def test_workers_sets_ztunnel_workers_only_when_given() -> None:
    assert "ZTUNNEL_WORKERS" not in env_of(container())
    assert env_values("workers=3")["ZTUNNEL_WORKERS"] == "3"


def test_cpu_limit_and_request_env() -> None:
    ctr = container(*MATRIX["cpu-limits"])
    env = env_values(*MATRIX["cpu-limits"])
    assert env["ZTUNNEL_RESOURCE_CPU_LIMIT"] == "2"
    assert env["ZTUNNEL_RESOURCE_CPU_REQUEST"] == "1"
    assert ctr["resources"] == {"limits": {"cpu": 2}, "requests": {"cpu": 1, "memory": "512Mi"}}
    assert env_of(ctr)["ZTUNNEL_CPU_LIMIT"]["valueFrom"] == DOWNWARD_API["ZTUNNEL_CPU_LIMIT"]


def test_null_resources_are_dropped() -> None:
    ctr = container("resources.requests.cpu=null")
    assert ctr["resources"] == {"requests": {"memory": "512Mi"}}
    assert "ZTUNNEL_RESOURCE_CPU_REQUEST" not in env_of(ctr)
    assert "resources" not in container("resources.requests=null")


def test_log_as_json() -> None:
    assert "LOG_FORMAT" not in env_values()
    assert env_values("logAsJson=true")["LOG_FORMAT"] == "json"


def test_log_level_sets_rust_log_and_log_level() -> None:
    env = env_values(r"logLevel=debug\,ztunnel.workers=trace")  # --set splits on bare commas
    assert env["RUST_LOG"] == env["LOG_LEVEL"] == "debug,ztunnel.workers=trace"


def test_revision_changes_istiod_address_and_annotates_pods() -> None:
    env = env_values("revision=canary")
    assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "istiod-canary.istio-system.svc:15012"
    meta = daemonset("revision=canary")["spec"]["template"]["metadata"]
    assert meta["annotations"]["istio.io/rev"] == "canary"


def test_istio_namespace_and_explicit_addresses() -> None:
    env = env_values("istioNamespace=mesh")
    assert env["CA_ADDRESS"] == env["XDS_ADDRESS"] == "istiod.mesh.svc:15012"
    env = env_values("caAddress=ca.example:15012", "xdsAddress=xds.example:15012")
    assert (env["CA_ADDRESS"], env["XDS_ADDRESS"]) == ("ca.example:15012", "xds.example:15012")


def test_cluster_name() -> None:
    assert env_values("multiCluster.clusterName=c1")["ISTIO_META_CLUSTER_ID"] == "c1"


def test_network() -> None:
    assert "NETWORK" not in env_values()
    assert env_values("network=net1")["NETWORK"] == "net1"


def test_env_and_proxy_metadata_become_env_vars() -> None:
    assert env_values("env.FOO=bar")["FOO"] == "bar"
    assert env_values("meshConfig.defaultConfig.proxyMetadata.X=y")["X"] == "y"
    env = env_values("env.N=5", "env.B=true")
    assert (env["N"], env["B"]) == ("5", "true")


def test_user_env_comes_last_and_overrides() -> None:
    names = [e["name"] for e in container("env.LOG_LEVEL=debug")["env"]]
    assert names[-1] == "LOG_LEVEL"
    assert env_values("env.LOG_LEVEL=debug")["LOG_LEVEL"] == "debug"


def test_termination_grace_period() -> None:
    assert pod_spec("terminationGracePeriodSeconds=60")["terminationGracePeriodSeconds"] == 60
    assert env_values("terminationGracePeriodSeconds=60")["TERMINATION_GRACE_PERIOD_SECONDS"] == (
        "60"
    )


def test_peer_ca_crl() -> None:
    sets = ("peerCaCrl.enabled=true",)
    assert env_values(*sets)["CRL_PATH"] == "/var/run/secrets/istio/crl/ca-crl.pem"
    assert container(*sets)["volumeMounts"][-1] == {
        "mountPath": "/var/run/secrets/istio/crl",
        "name": "crl-volume",
        "readOnly": True,
    }
    assert pod_spec(*sets)["volumes"][-1] == {
        "name": "crl-volume",
        "configMap": {"name": "istio-ca-crl", "optional": True},
    }


@pytest.mark.parametrize("option", ["--set", "--set-string"])  # a boolean or a string
def test_cluster_trust_bundle(option: str) -> None:
    def ca_volume(*extra: str) -> Doc:
        args = [option, "env.ENABLE_CLUSTER_TRUST_BUNDLE_API=true", *set_args(extra)]
        result = run_helm("template", "ztunnel", str(CHART), "-n", NAMESPACE, *args)
        assert result.returncode == 0, result.stderr
        ds = by_kind([d for d in yaml.safe_load_all(result.stdout) if d])["DaemonSet"]
        volumes = ds["spec"]["template"]["spec"]["volumes"]
        volume: Doc = next(v for v in volumes if v["name"] == "istiod-ca-cert")
        return volume

    bundle = ca_volume()["projected"]["sources"][0]["clusterTrustBundle"]
    assert bundle == {"name": "istio.io:istiod-ca:root-cert", "path": "root-cert.pem"}
    named = ca_volume("trustBundleName=mine")["projected"]["sources"][0]["clusterTrustBundle"]
    assert named["name"] == "mine"


@pytest.mark.parametrize(
    ("sets", "image"),
    [
        ((), "ztunnel-python:0.1.0"),
        (
            ("hub=registry.example/istio", "tag=1.28.0"),
            "registry.example/istio/ztunnel-python:1.28.0",
        ),
        (("hub=r.example", "tag=1.28.0", "variant=debug"), "r.example/ztunnel-python:1.28.0-debug"),
        (("image=r.example/zt@sha256:abc",), "r.example/zt@sha256:abc"),
    ],
)
def test_image_reference(sets: tuple[str, ...], image: str) -> None:
    assert container(*sets)["image"] == image


def test_image_pull_policy() -> None:
    assert container("imagePullPolicy=Always")["imagePullPolicy"] == "Always"


def test_resource_name_renames_daemonset_and_service_account() -> None:
    kinds = by_kind(template("resourceName=zt"))
    assert kinds["DaemonSet"]["metadata"]["name"] == "zt"
    assert kinds["ServiceAccount"]["metadata"]["name"] == "zt"
    assert kinds["DaemonSet"]["spec"]["template"]["spec"]["serviceAccountName"] == "zt"


def test_labels_and_annotations() -> None:
    ds = daemonset("labels.team=mesh", "annotations.owner=ops", "podLabels.tier=node")
    assert ds["metadata"]["labels"]["team"] == "mesh"
    assert ds["metadata"]["annotations"] == {"owner": "ops"}
    assert ds["spec"]["template"]["metadata"]["labels"]["tier"] == "node"
    assert "annotations" not in daemonset()["metadata"]


def test_pod_annotation_defaults_can_be_removed() -> None:
    meta = daemonset(r"podAnnotations.prometheus\.io/scrape=null")["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in meta["annotations"]


def test_owner_name_label() -> None:
    labels = daemonset("ownerName=installer")["metadata"]["labels"]
    assert labels["install.operator.istio.io/owning-resource"] == "installer"


def test_scheduling_values() -> None:
    spec = pod_spec(*MATRIX["everything"], "nodeSelector.pool=mesh", "tolerations=null")
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "mesh"}
    assert spec["affinity"]["nodeAffinity"]
    assert spec["dnsPolicy"] == "ClusterFirst"
    assert spec["dnsConfig"] == {"searches": ["example.internal"]}
    assert "tolerations" not in spec


def test_update_strategy_override() -> None:
    strategy = daemonset("updateStrategy.rollingUpdate.maxUnavailable=1")["spec"]["updateStrategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 1}


def test_user_volumes_are_appended() -> None:
    spec = pod_spec(*MATRIX["everything"])
    assert spec["volumes"][-1] == {"name": "extra", "emptyDir": {"medium": "Memory"}}
    assert spec["containers"][0]["volumeMounts"][-1] == {"name": "extra", "mountPath": "/extra"}


def test_se_linux_options() -> None:
    assert "seLinuxOptions" not in container()["securityContext"]
    ctx = container("seLinuxOptions.type=container_t")["securityContext"]
    assert ctx["seLinuxOptions"] == {"type": "container_t"}


# --- optional objects --------------------------------------------------------------------


@pytest.mark.parametrize("key", ["platform", "global.platform"])
def test_openshift_rbac_and_spc_t(key: str) -> None:
    docs = template(f"{key}=openshift")
    kinds = by_kind(docs)
    assert sorted(kinds) == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
    assert kinds["ClusterRole"]["rules"] == [
        {
            "apiGroups": ["security.openshift.io"],
            "resources": ["securitycontextconstraints"],
            "resourceNames": ["privileged"],
            "verbs": ["use"],
        }
    ]
    binding = kinds["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "ztunnel",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ztunnel", "namespace": NAMESPACE}
    ]
    ctx = kinds["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert ctx["seLinuxOptions"] == {"type": "spc_t"}


def test_network_policy() -> None:
    policy = by_kind(template("global.networkPolicy.enabled=true"))["NetworkPolicy"]
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app": "ztunnel"}}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ports = [(p["port"], p["protocol"]) for p in spec["ingress"][0]["ports"]]
    assert ports == [
        (15021, "TCP"),
        (15020, "TCP"),
        (15000, "TCP"),
        (15008, "TCP"),
        (15001, "TCP"),
        (15006, "TCP"),
        (15053, "TCP"),
        (15053, "UDP"),
    ]
    assert spec["egress"] == [{}]


@pytest.mark.parametrize("sets", [("resourceQuotas.enabled=true",), ("platform=gke",)])
def test_resource_quota(sets: tuple[str, ...]) -> None:
    quota = by_kind(template(*sets))["ResourceQuota"]
    assert quota["metadata"]["namespace"] == NAMESPACE
    assert quota["spec"] == {
        "hard": {"pods": "5000"},
        "scopeSelector": {
            "matchExpressions": [
                {
                    "operator": "In",
                    "scopeName": "PriorityClass",
                    "values": ["system-node-critical"],
                }
            ]
        },
    }


def test_pod_monitor() -> None:
    monitor = by_kind(template("podMonitor.enabled=true", "podMonitor.labels.release=prom"))[
        "PodMonitor"
    ]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["selector"] == {"matchLabels": {"app": "ztunnel"}}
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert spec["podTargetLabels"] == ["app"]
    assert spec["podMetricsEndpoints"] == [{"port": "ztunnel-stats", "path": "/stats/prometheus"}]
    endpoint = by_kind(template("podMonitor.enabled=true", "podMonitor.interval=15s"))[
        "PodMonitor"
    ]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["interval"] == "15s"


def test_pod_monitor_port_name_matches_the_container_port() -> None:
    docs = by_kind(template("podMonitor.enabled=true"))
    port = docs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"]
    ctr = docs["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    assert port in {p["name"] for p in ctr["ports"]}


@pytest.mark.parametrize(
    ("scope", "kinds"),
    [
        ("all", ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]),
        ("cluster", ["ClusterRole", "ClusterRoleBinding"]),
        ("namespace", ["DaemonSet", "ServiceAccount"]),
    ],
)
def test_resource_scope(scope: str, kinds: list[str]) -> None:
    docs = template("platform=openshift", f"resourceScope={scope}")
    assert sorted(doc["kind"] for doc in docs) == kinds


def test_every_object_is_labelled_for_helm() -> None:
    for doc in template(*MATRIX["everything"]):
        labels = doc["metadata"]["labels"]
        assert labels["app"] == "ztunnel", doc["kind"]
        assert labels["app.kubernetes.io/instance"] == "ztunnel", doc["kind"]


def test_no_template_leaks() -> None:
    for name, sets in MATRIX.items():
        for value in walk(template(*sets)):
            assert not (isinstance(value, str) and "{{" in value), (name, value)
            assert value != "<nil>", name


# --- the runtime accepts what the chart renders --------------------------------------------


def cpu_quantity(value: Any) -> Fraction:
    text = str(value)
    if text.endswith("m"):
        return Fraction(text[:-1]) / 1000
    return Fraction(text)


def pod_environment(sets: tuple[str, ...], node_cpus: int) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it on a node."""
    ctr = container(*sets)
    limit = ctr.get("resources", {}).get("limits", {}).get("cpu")
    resolved = {
        "POD_NAME": "ztunnel-abcde",
        "POD_NAMESPACE": NAMESPACE,
        "NODE_NAME": "node-1",
        "INSTANCE_IP": "10.0.0.7",
        "SERVICE_ACCOUNT": "ztunnel",
        # resourceFieldRef divisor 1 rounds up; without a limit it is the node's allocatable.
        "ZTUNNEL_CPU_LIMIT": str(math.ceil(cpu_quantity(limit)) if limit else node_cpus),
    }
    env: dict[str, str] = {}
    for entry in ctr["env"]:
        env[entry["name"]] = entry["value"] if "value" in entry else resolved[entry["name"]]
    return env


def load_config(env: dict[str, str], host_cpus: int = 128) -> Config:
    return Config.from_env(
        env,
        cpu_count=host_cpus,  # the container sees every host CPU; the env must win
        mesh_config_path="/nonexistent/ztunnel-deploy-test/mesh",
        path_exists=lambda _path: True,
    )


@pytest.mark.parametrize("name", sorted(MATRIX))
def test_runtime_parses_the_rendered_environment(name: str) -> None:
    config = load_config(pod_environment(MATRIX[name], node_cpus=8))
    assert config.workers >= 1


def test_runtime_reads_chart_values() -> None:
    sets = ("revision=canary", "logAsJson=true", "multiCluster.clusterName=c1", "network=n1")
    config = load_config(pod_environment(sets, node_cpus=8))
    assert config.log_format == "json"
    assert config.cluster_id == "c1"
    assert config.network == "n1"
    assert config.node_name == "node-1"
    assert "istiod-canary.istio-system.svc:15012" in str(config.xds_address)
    assert "istiod-canary.istio-system.svc:15012" in str(config.ca_address)


DEPLOY_DOC = ROOT / "docs" / "deploy.md"
UNSET = {"", "-", "—", "unset"}


def sizing_rows(path: Path = DEPLOY_DOC) -> list[tuple[str, str, str, str, int]]:
    """Rows of the worked table after the `sizing-table` marker in docs/deploy.md."""
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if "sizing-table" in line)
    rows: list[tuple[str, str, str, str, int]] = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [re.sub(r"[`*]|\(default\)", "", c).strip() for c in line.strip("|").split("|")]
        if cells[0].startswith("---") or not cells[4].isdigit():
            continue  # the separator and the header
        request, limit, node, workers = cells[:4]
        rows.append((request, limit, node, workers, int(cells[4])))
    assert rows, "no sizing table in docs/deploy.md"
    return rows


def test_sizing_table_in_docs_matches_the_runtime() -> None:
    for request, limit, node, workers, expected in sizing_rows():
        sets = ["resources.requests.cpu=" + ("null" if request in UNSET else request)]
        if limit not in UNSET:
            sets.append(f"resources.limits.cpu={limit}")
        if workers not in UNSET:
            sets.append(f"workers={workers}")
        config = load_config(pod_environment(tuple(sets), node_cpus=int(node)))
        row = (request, limit, node, workers)
        assert config.workers == expected, f"docs row {row}: runtime says {config.workers}"


# --- values.yaml and the schema agree ------------------------------------------------------

UPSTREAM_KEYS = {
    "hub", "tag", "variant", "image", "resourceName", "labels", "annotations",
    "podAnnotations", "podLabels", "resources", "resourceQuotas", "peerCaCrl",
    "imagePullSecrets", "imagePullPolicy", "env", "multiCluster", "meshConfig",
    "terminationGracePeriodSeconds", "revision", "caAddress", "xdsAddress", "istioNamespace",
    "logLevel", "logAsJson", "seLinuxOptions", "resourceScope", "dnsPolicy", "dnsConfig",
    "updateStrategy", "tolerations", "nodeSelector", "affinity", "network", "global",
    "platform", "volumes", "volumeMounts", "profile", "compatibilityVersion", "ownerName",
    "trustBundleName",
}  # fmt: skip
OUR_KEYS = {"workers", "podMonitor"}


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    return values


def chart_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text(encoding="utf-8"))
    return schema


def test_values_are_upstream_keys_plus_ours_at_the_top_level() -> None:
    assert set(chart_values()) == UPSTREAM_KEYS | OUR_KEYS


def test_schema_describes_exactly_the_values() -> None:
    schema = chart_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(chart_values())
    assert schema["properties"]["podMonitor"]["additionalProperties"] is False


def test_upstream_defaults() -> None:
    values = chart_values()
    assert values["podAnnotations"] == {
        "prometheus.io/port": "15020",
        "prometheus.io/scrape": "true",
    }
    assert values["resources"] == {"requests": {"cpu": "200m", "memory": "512Mi"}}
    assert values["resourceQuotas"] == {"enabled": False, "pods": 5000}
    assert values["terminationGracePeriodSeconds"] == 30
    assert values["istioNamespace"] == "istio-system"
    assert values["logLevel"] == "info"
    assert values["resourceScope"] == "all"
    assert values["tolerations"] == TOLERATIONS
    assert values["global"]["networkPolicy"] == {"enabled": False}
    assert values["workers"] == ""
    assert values["podMonitor"]["enabled"] is False
