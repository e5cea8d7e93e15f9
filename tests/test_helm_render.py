"""What the Helm chart (helm/moe-cluster) renders, piece by piece: the production set from the default values,
the head and GPU worker groups, auth and keys, the model volume, security contexts, monitoring, the
network policy and disruption budget, the switches, the batch RayJob, NOTES.txt, and k8s/'s reference
manifests equal to the render. Rendered with a real helm binary (tests/helm_chart.py).
"""

from __future__ import annotations

import base64
import json
import shlex

import kubernetes_validate
import pytest
import yaml

from tests import helm_chart as chart
from tests.helm_chart import CHART, K8S, NAMESPACE, REFERENCE, REPO, helm, of_kind, one, pods_of, render

# What the default values render: the production set


def test_default_values_render_the_production_set():
    docs = render("default")
    kinds = sorted(d["kind"] for d in docs)
    dashboards = sorted((REPO / "dashboards").glob("*.json"))
    assert dashboards, "dashboards/*.json missing"
    assert kinds == sorted(
        [
            "RayService",
            "Secret",
            "PersistentVolumeClaim",
            "PodMonitor",
            "PrometheusRule",
            "NetworkPolicy",
            "PodDisruptionBudget",
        ]
        + ["ConfigMap"] * len(dashboards)
    )
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "moe-cluster"


def test_head_is_cpu_only_with_dashboard_and_metrics_ports():
    cluster = one(render("default"), "RayService")["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert container["name"] == "ray-head"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080
    assert not any("gpu" in k for part in container["resources"].values() for k in part)


def test_gpu_worker_groups_carry_their_node_shape():
    values = chart.merged_values("trinity-large")
    cluster = one(render("trinity-large"), "RayService")["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    (group,) = cluster["workerGroupSpecs"]
    (wanted,) = values["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert group["rayStartParams"]["num-gpus"] == "8"
    spec = group["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["memory"] == wanted["resources"]["requests"]["memory"]
    assert spec["nodeSelector"] == wanted["nodeSelector"]
    assert spec["tolerations"] == wanted["tolerations"]
    assert spec["affinity"] == wanted["affinity"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "256Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_several_worker_groups_render_one_group_each():
    groups = [
        {"groupName": "h100", "gpus": 8, "replicas": 1, "minReplicas": 0, "maxReplicas": 4,
         "resources": {"requests": {"cpu": "8"}}, "shmSize": "8Gi"},
        {"groupName": "l40s", "gpus": 4, "replicas": 0, "minReplicas": 0, "maxReplicas": 2,
         "resources": {"requests": {"cpu": "8"}}, "shmSize": "8Gi", "nodeSelector": {"gpu": "l40s"}},
    ]  # fmt: skip
    docs = render("default", "--set-json", f"rayClusterConfig.workerGroupSpecs={json.dumps(groups)}")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["h100", "l40s"]
    assert [g["rayStartParams"]["num-gpus"] for g in cluster["workerGroupSpecs"]] == ["8", "4"]
    assert cluster["workerGroupSpecs"][1]["template"]["spec"]["nodeSelector"] == {"gpu": "l40s"}
    assert chart.crd_errors(one(docs, "RayService")) == []
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 0


def test_token_auth_and_api_keys_from_secrets():
    docs = render("default")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    secret = one(docs, "Secret")
    keys = base64.b64decode(secret["data"]["api-keys"]).decode().split(",")
    assert len(keys) == 1 and keys[0].startswith("mc-") and len(keys[0]) == 43
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for _, template in pods_of(cluster):
        env = template["spec"]["containers"][0]["env"]
        assert {"name": "MOE_CLUSTER_API_KEYS", "valueFrom": {"secretKeyRef": {
            "name": secret["metadata"]["name"], "key": "api-keys"}}} in env  # fmt: skip

    existing = render(
        "default",
        "--set",
        "apiKeys.existingSecret=team-keys",
        "--set",
        "rayClusterConfig.authOptions.secretName=ray-token",
    )
    assert not of_kind(existing, "Secret")
    cluster = one(existing, "RayService")["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token", "secretName": "ray-token"}
    env = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"]["name"] == "team-keys"


def test_model_volume_and_fetch_init_container():
    values = chart.merged_values("default")
    docs = render("default")
    claim = one(docs, "PersistentVolumeClaim")
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    (group,) = cluster["workerGroupSpecs"]
    spec = group["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "model")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    (init,) = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["MODEL_DIR"] == values["serve"]["options"]["model"]
    assert env["MODEL_REPO"] == values["model"]["fetch"]["repository"]
    assert {"name": "model", "mountPath": "/models"} in init["volumeMounts"]
    mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "model")
    assert mount == {"name": "model", "mountPath": "/models", "readOnly": True}

    host = render("default", "--set", "model.volume.type=hostPath", "--set", "model.fetch.enabled=false")
    assert not of_kind(host, "PersistentVolumeClaim")
    spec = one(host, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "initContainers" not in spec
    assert next(v for v in spec["volumes"] if v["name"] == "model")["hostPath"]["path"] == "/mnt/models"

    existing = render("default", "--set", "model.volume.persistentVolumeClaim.claimName=weights")
    assert not of_kind(existing, "PersistentVolumeClaim")


def test_model_outside_the_volume_is_refused():
    result = helm("template", "x", str(CHART), "--set", "serve.options.model=/data/model")
    assert result.returncode != 0
    assert "must be a directory under model.mountPath" in result.stderr


def test_security_contexts_everywhere():
    for case in chart.CASES:
        docs = render(case)
        for cluster in chart.ray_clusters(docs):
            assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False
            for _, template in pods_of(cluster):
                spec = template["spec"]
                assert spec["securityContext"]["runAsNonRoot"] is True
                for container in spec["containers"] + spec.get("initContainers", []):
                    context = container["securityContext"]
                    assert context["allowPrivilegeEscalation"] is False, (case, container["name"])
                    assert context["capabilities"]["drop"] == ["ALL"]
    relaxed = render("default", "--set", "containerSecurityContext.readOnlyRootFilesystem=true")
    head = one(relaxed, "RayService")["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


def test_monitoring_objects_come_from_the_dashboards_directory():
    docs = render("default")
    rule = one(docs, "PrometheusRule")
    alerts = yaml.safe_load((REPO / "dashboards" / "alerts.yaml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for entry in group["rules"]:
            assert ("alert" in entry) != ("record" in entry) and entry["expr"]

    maps = of_kind(docs, "ConfigMap")
    shipped = {p.name: json.loads(p.read_text()) for p in (REPO / "dashboards").glob("*.json")}
    found = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        for key, text in cm["data"].items():
            found[key] = json.loads(text)
    assert found == shipped

    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "moe-cluster"
    ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics", "as-metrics", "dash-metrics"]
    # The alerts and dashboards group by the ray_io_cluster label the monitor attaches.
    cluster_label = {
        "sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"],
        "targetLabel": "ray_io_cluster",
    }
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert cluster_label in endpoint["relabelings"]

    extra = render("default", "--set", "monitoring.prometheusRule.additionalLabels.team=inference")
    for group in one(extra, "PrometheusRule")["spec"]["groups"]:
        for entry in group["rules"]:
            if "alert" in entry:
                assert entry["labels"]["team"] == "inference"


def test_service_monitor_variant():
    docs = render("servicemonitor-hostpath-no-auth")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in service["spec"]["ports"]} == {e["port"] for e in monitor["spec"]["endpoints"]}
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert service["metadata"]["labels"][key] == value
    assert "authOptions" not in one(docs, "RayService")["spec"]["rayClusterConfig"]


def test_network_policy_admits_only_the_serve_port_from_outside():
    docs = render("default")
    policy = one(docs, "NetworkPolicy")["spec"]
    selector = policy["podSelector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress"]
    inside, serve, *others = policy["ingress"]
    assert inside == {"from": [{"podSelector": {"matchLabels": selector}}]}
    assert serve == {"ports": [{"port": 8000, "protocol": "TCP"}]}
    # Anything else from outside is limited to named peers: the operator (dashboard), Prometheus.
    assert [[p["port"] for p in rule["ports"]] for rule in others] == [[8265], [8080, 44217, 44227]]
    assert all(rule["from"] for rule in others)
    # Every Ray pod of the release is selected by it.
    for cluster in chart.ray_clusters(docs):
        for _, template in pods_of(cluster):
            labels = template["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in selector.items())


def test_pod_disruption_budget_allows_one_disruption_at_a_time():
    budget = one(render("trinity-large"), "PodDisruptionBudget")["spec"]
    assert budget["minAvailable"] == 2  # head + 2 workers, less one
    assert budget["selector"]["matchLabels"]["moe-cluster/workload"] == "serve"
    fixed = render("default", "--set", "podDisruptionBudget.minAvailable=5")
    assert one(fixed, "PodDisruptionBudget")["spec"]["minAvailable"] == 5


@pytest.mark.parametrize(
    ("switch", "kinds"),
    [
        ("monitoring.enabled", {"PodMonitor", "PrometheusRule"}),
        ("monitoring.prometheusRule.enabled", {"PrometheusRule"}),
        ("grafanaDashboards.enabled", {"ConfigMap"}),
        ("networkPolicy.enabled", {"NetworkPolicy"}),
        ("podDisruptionBudget.enabled", {"PodDisruptionBudget"}),
        ("apiKeys.enabled", {"Secret"}),
    ],
)
def test_each_piece_switches_off(switch, kinds):
    before = {d["kind"] for d in render("default")}
    after = {d["kind"] for d in render("default", "--set", f"{switch}=false")}
    assert kinds <= before
    assert before - after == kinds
    if switch == "apiKeys.enabled":
        cluster = one(render("default", "--set", f"{switch}=false"), "RayService")["spec"]["rayClusterConfig"]
        assert "env" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_autoscaling_switches_off():
    cluster = one(render("default", "--set", "rayClusterConfig.enableInTreeAutoscaling=false"), "RayService")
    spec = cluster["spec"]["rayClusterConfig"]
    assert spec["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in spec


def test_cpu_dev_cluster_asks_for_no_gpu():
    docs = render("cpu-dev")
    text = json.dumps(docs)
    assert "nvidia.com/gpu" not in text
    cluster = one(docs, "RayService")["spec"]["rayClusterConfig"]
    assert "num-gpus" not in cluster["workerGroupSpecs"][0]["rayStartParams"]
    options = yaml.safe_load(one(docs, "RayService")["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert options["device"] == "cpu"
    assert {d["kind"] for d in docs} == {"RayService", "NetworkPolicy"}


# The batch RayJob


def test_batch_rayjob_runs_the_batch_command_and_shuts_down():
    from cluster.cli.main import build_parser

    values = chart.merged_values("default")
    job = one(render("batch"), "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 3600
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["moe-cluster", "batch"]
    args = build_parser().parse_args(argv[1:])
    assert args.run.__name__ == "cmd_batch"
    options = values["serve"]["options"]
    assert (str(args.input), str(args.output)) == ("/data/input.jsonl", "/data/output")
    assert (args.model, args.expert_shards) == (options["model"], options["expert_shards"])
    assert (args.max_num_seqs, args.max_model_len) == (options["max_num_seqs"], options["max_model_len"])
    # The driver runs on the head: it has the data and the model.
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["data"] == "/data" and mounts["model"] == "/models"
    data = next(v for v in head["volumes"] if v["name"] == "data")
    assert data["persistentVolumeClaim"]["claimName"] == "batch-data"
    # Its pods are labelled apart from the serving cluster's (the budget is for serving only).
    for _, template in pods_of(spec["rayClusterSpec"]):
        assert template["metadata"]["labels"]["moe-cluster/workload"] == "batch"
    assert spec["submitterPodTemplate"]["metadata"]["labels"]["moe-cluster/workload"] == "batch"


def test_batch_needs_a_data_volume():
    result = helm("template", "x", str(CHART), "--set", "batch.enabled=true")
    assert result.returncode != 0 and "batch.dataVolume.claimName" in result.stderr


# NOTES.txt


def test_notes_tell_how_to_reach_the_endpoint():
    result = helm("install", "moe-cluster", str(CHART), "--dry-run=client", "--namespace", NAMESPACE)
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "http://moe-cluster-serve-svc.moe-cluster.svc:8000/v1" in notes
    assert "kubectl -n moe-cluster port-forward svc/moe-cluster-serve-svc 8000:8000" in notes
    assert "get secret moe-cluster-api-keys" in notes
    assert "moe-cluster k8s status --name moe-cluster --namespace moe-cluster" in notes


# k8s/: the reference manifests are what the chart renders


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_manifests_equal_the_chart_render(name):
    committed = [d for d in yaml.safe_load_all((K8S / name / "manifests.yaml").read_text()) if d]
    assert committed == render(name), f"k8s/{name}/manifests.yaml is stale: run k8s/render.sh"


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_kustomization(name):
    kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == NAMESPACE
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name / resource).read_text()):
            if doc and doc["apiVersion"] in chart.BUILT_IN_GROUPS:
                kubernetes_validate.validate(doc, chart.KUBERNETES_VERSION, strict=True)
    assert "manifests.yaml" in kustomization["resources"]
