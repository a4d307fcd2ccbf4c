"""The worker manifests (k8s/): the base and each cloud's overlay render with kustomize
(kubectl's, offline), and every rendered resource validates strictly against its schema:
Kubernetes' own (kubernetes-validate) and, for KEDA's resources, the CRDs vendored under
tests/data/keda/ (see its README). Then each pool is checked for what a run needs, and the
run's driver Job (k8s/run/) for what it runs."""

from __future__ import annotations

import copy
import functools
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

K8S = ROOT / "k8s"
KEDA = ROOT / "tests" / "data" / "keda"
TARGETS = {"base": K8S / "base", "gke": K8S / "overlays" / "gke", "eks": K8S / "overlays" / "eks"}
OVERLAYS = ("gke", "eks")
#: the newest Kubernetes whose schemas kubernetes-validate ships (>= 1.37 in pyproject.toml)
KUBERNETES_VERSION = "1.37"
#: the queue each pool drains, and its memory (request = limit)
POOLS = {"inference": "16Gi", "default": "8Gi", "large": "64Gi"}
COMMAND = ["deepem3d", "worker", "$(QUEUE_URL)", "--lease-seconds", "$(LEASE_SECONDS)"]
#: the aws-sqs-queue trigger metadata the pools rely on (in-flight messages counted)
SQS_KEYS = ("queueURL", "queueLength", "awsRegion", "scaleOnInFlight")
KEDA_CRDS = {"ScaledObject": "keda.sh_scaledobjects.yaml",
             "TriggerAuthentication": "keda.sh_triggerauthentications.yaml"}
#: the CEL rules of the KEDA CRDs (x-kubernetes-validations), which jsonschema does not run:
#: keda_errors checks each by hand, and a new one in a newer CRD fails test_keda_cel_rules
KEDA_CEL_RULES = {"!has(self.minReplicaCount) || self.minReplicaCount <= "
                  "(has(self.maxReplicaCount) ? self.maxReplicaCount : 100)"}


def render(target: str | Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: cannot render the kustomize overlays")
    return list(_render(str(TARGETS.get(target, target))))


@functools.cache
def _render(path: str) -> tuple[dict, ...]:
    out = subprocess.run(["kubectl", "kustomize", path], capture_output=True, text=True)
    assert out.returncode == 0, f"kubectl kustomize {path}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


# --- KEDA's schemas ---------------------------------------------------------------------------


def _strict(schema: dict) -> dict:
    """A CRD's structural schema made to reject unknown fields: where it lists properties and
    neither allows others nor preserves unknown fields, add additionalProperties: false."""
    schema = dict(schema)
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    if "properties" in schema:
        schema["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            schema[key] = _strict(schema[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_strict(s) for s in schema[key]]
    return schema


def _cel_rules(schema) -> set[str]:
    if isinstance(schema, dict):
        rules = {r["rule"] for r in schema.get("x-kubernetes-validations", [])}
        return rules.union(*(_cel_rules(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_cel_rules(v) for v in schema))
    return set()


@functools.cache
def keda_schema(kind: str, version: str = "v1alpha1") -> dict:
    crd = yaml.safe_load((KEDA / KEDA_CRDS[kind]).read_text())
    assert crd["spec"]["group"] == "keda.sh" and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return served["schema"]["openAPIV3Schema"]


def keda_errors(doc: dict) -> list[str]:
    """Why a KEDA resource would be refused (or pruned) by the API server: its CRD schema,
    strictly; its metadata as Kubernetes' ObjectMeta, strictly; the CRD's CEL rules."""
    group, _, version = doc["apiVersion"].partition("/")
    assert group == "keda.sh", doc["apiVersion"]
    validator = jsonschema.Draft7Validator(_strict(keda_schema(doc["kind"], version)))
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(doc)]
    try:  # the CRD says only `metadata: {type: object}`: check it as any object's metadata
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": doc["metadata"]}, KUBERNETES_VERSION,
                                     strict=True)
    except kubernetes_validate.ValidationError as err:
        errors.append(f"metadata: {err.message}")
    spec = doc.get("spec", {})
    if doc["kind"] == "ScaledObject" and spec.get("minReplicaCount", 0) > spec.get(
            "maxReplicaCount", 100):
        errors.append("spec: minReplicaCount above maxReplicaCount")
    return errors


def validate(doc: dict) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        errors = keda_errors(doc)
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors}"
    else:  # raises ValidationError, or SchemaNotFoundError for a kind it does not know
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# --- every rendered resource is valid ---------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_rendered_resource_validates_strictly(target):
    docs = render(target)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "ServiceAccount", "TriggerAuthentication"]
                           + ["ConfigMap"] * 4 + ["Deployment", "ScaledObject"] * 3)
    for doc in docs:
        try:
            validate(doc)
        except kubernetes_validate.ValidationError as err:
            path = ".".join(map(str, err.path))
            pytest.fail(f"{target}: {doc['kind']}/{doc['metadata']['name']}: {path}: "
                        f"{err.message}")


def test_validation_is_strict():
    """The checks above catch a misspelt or misplaced field, in both kinds of schema."""
    docs = render("gke")
    deployment = copy.deepcopy(of_kind(docs, "Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["resource"] = {}  # no such field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    scaled = of_kind(docs, "ScaledObject")[0]
    assert not keda_errors(scaled)
    for path, value in ((("spec", "triggers", 0, "queueURL"), "https://x"),  # misplaced
                        (("spec", "minReplicas"), 0),  # not KEDA's spelling
                        (("spec", "scaleTargetRef", "deployment"), "x"),
                        (("spec", "triggers", 0, "metadata", "queueLength"), 1),  # not a string
                        (("metadata", "label"), {})):
        bad = copy.deepcopy(scaled)
        *parents, leaf = path
        node = bad
        for key in parents:
            node = node[key]
        node[leaf] = value
        assert keda_errors(bad), path
    bad = copy.deepcopy(scaled)
    bad["spec"]["minReplicaCount"] = bad["spec"]["maxReplicaCount"] + 1
    assert keda_errors(bad)

    auth = copy.deepcopy(named(docs, "TriggerAuthentication", "deepem3d-aws"))
    auth["spec"]["podIdentity"] = {"provider": "eks"}  # not a provider KEDA knows
    assert keda_errors(auth)


def test_keda_cel_rules_are_all_checked():
    rules = set().union(*(_cel_rules(keda_schema(kind)) for kind in KEDA_CRDS))
    assert rules == KEDA_CEL_RULES


# --- the aws-sqs-queue trigger speaks KEDA's language ------------------------------------------


def test_sqs_trigger_type_and_keys_are_kedas():
    builder = (KEDA / "scalers_builder.go").read_text()
    assert 'case "aws-sqs-queue":' in builder
    scaler = (KEDA / "aws_sqs_queue_scaler.go").read_text()
    keys = set(re.findall(r'keda:"name=(\w+)', scaler))
    assert set(SQS_KEYS) <= keys, set(SQS_KEYS) - keys
    common = (KEDA / "aws_common.go").read_text()
    auth_params = set(re.findall(r'authParams\["(\w+)"\]', common))
    for target in TARGETS:
        docs = render(target)
        for scaled in of_kind(docs, "ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                assert trigger["type"] == "aws-sqs-queue"
                assert set(trigger["metadata"]) <= keys, set(trigger["metadata"]) - keys
                assert set(SQS_KEYS) <= set(trigger["metadata"])
        for auth in of_kind(docs, "TriggerAuthentication"):
            used = {ref["parameter"] for ref in auth["spec"].get("secretTargetRef", [])}
            assert used <= auth_params, used - auth_params


def test_vendored_keda_files_are_recorded():
    readme = (KEDA / "README.md").read_text()
    assert re.search(r"commit: `[0-9a-f]{40}`", readme)
    for path in KEDA.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, path.name


# --- each pool ---------------------------------------------------------------------------------


def gibibytes(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti)?", str(quantity)).groups()
    return float(number) * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, None: 2**-30}[unit]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("pool", POOLS)
def test_pool(target, pool):
    docs = render(target)
    settings = next(d["data"] for d in of_kind(docs, "ConfigMap") if "LEASE_SECONDS" in d["data"])
    deployment = named(docs, "Deployment", f"deepem3d-worker-{pool}")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["deepem3d/pool"] == pool  # pools deployed side by side do not overlap
    assert "replicas" not in deployment["spec"]  # KEDA owns the count
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == COMMAND

    # the queue: its own ConfigMap, whose name ends the URL its ScaledObject watches
    maps = {d["metadata"]["name"]: d["data"] for d in of_kind(docs, "ConfigMap")}
    env = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(maps[source["configMapRef"]["name"]])
    assert env["QUEUE_URL"] == f"sqs://deepem3d-{pool}"
    assert int(env["LEASE_SECONDS"]) > 0
    name = env["QUEUE_URL"].removeprefix("sqs://")
    (scaled,) = [s for s in of_kind(docs, "ScaledObject")
                 if s["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert scaled["spec"]["minReplicaCount"] == 0  # from zero
    assert scaled["spec"]["maxReplicaCount"] >= 1
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    url = urlparse(meta["queueURL"])
    assert url.scheme == "https"
    assert url.netloc == f"sqs.{meta['awsRegion']}.amazonaws.com"
    assert url.path == f"/{settings['AWS_ACCOUNT_ID']}/{name}"
    assert meta["awsRegion"] == settings["AWS_DEFAULT_REGION"]
    assert meta["scaleOnInFlight"] == "true"  # never to zero under a running task
    assert int(meta["queueLength"]) >= 1
    named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])

    # GPU: one per inference pod, on the cloud's GPU nodes; none elsewhere
    resources = container["resources"]
    if pool == "inference":
        assert int(resources["limits"]["nvidia.com/gpu"]) == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"]
        selector = {"base": set(), "gke": {"cloud.google.com/gke-accelerator"},
                    "eks": {"node.kubernetes.io/instance-type"}}[target]
        assert set(pod.get("nodeSelector", {})) == selector
    else:  # on the node pool labelled for it (docs/kubernetes.md), so that the 8Gi pods
        # do not take the room on highmem nodes that the 64Gi ones need
        assert "nvidia.com/gpu" not in resources["limits"]
        assert pod["nodeSelector"] == {"deepem3d/pool": pool} and "tolerations" not in pod
        doc = (ROOT / "docs" / "kubernetes.md").read_text()
        assert doc.count(f"--node-labels=deepem3d/pool={pool}") == 1
        assert doc.count(f"labels: {{deepem3d/pool: {pool}}}") == 1
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == POOLS[pool]
    assert float(resources["requests"]["cpu"]) >= 1

    # /tmp in memory, smaller than the memory limit it counts against
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
    assert gibibytes(volume["emptyDir"]["sizeLimit"]) < gibibytes(POOLS[pool]) / 2

    # SIGTERM lets a task that fits the grace finish: the worker knows the grace
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= (1800 if pool == "inference" else 600)
    assert {"name": "DEEPEM3D_GRACE_SECONDS", "value": str(grace)} in container["env"]
    # a node autoscaler emptying a node grants 10 minutes at most: it leaves workers alone
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"

    # the Dockerfile's target for the pool: CUDA for inference, CPU for the others
    target_image = "cuda" if pool == "inference" else "cpu"
    assert container["image"].split("/")[-1].split(":")[0] == f"deepem3d-{target_image}"

    # not root: the images' user, owner of their numba cache (HOME on the RAM disk)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"name": "HOME", "value": "/tmp"} in container["env"]

    # identity: the shared service account, AWS keys from an optional Secret as a fallback
    assert pod["serviceAccountName"] == of_kind(docs, "ServiceAccount")[0]["metadata"]["name"]
    assert {"secretRef": {"name": "aws-credentials", "optional": True}} in container["envFrom"]
    if target != "base":
        assert "/" in container["image"]  # the overlay's registry


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_identity(overlay):
    docs = render(overlay)
    (account,) = of_kind(docs, "ServiceAccount")
    annotations = account["metadata"].get("annotations", {})
    (auth,) = of_kind(docs, "TriggerAuthentication")
    if overlay == "gke":  # Workload Identity; SQS through AWS keys, for KEDA as for workers
        assert set(annotations) == {"iam.gke.io/gcp-service-account"}
        assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")
        assert "podIdentity" not in auth["spec"]
        refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
        assert refs == {"awsAccessKeyID": ("aws-credentials", "AWS_ACCESS_KEY_ID"),
                        "awsSecretAccessKey": ("aws-credentials", "AWS_SECRET_ACCESS_KEY")}
    else:  # IRSA for the workers; KEDA's operator role for the queue depth
        assert set(annotations) == {"eks.amazonaws.com/role-arn"}
        assert re.fullmatch(r"arn:aws:iam::[^:]+:role/.+",
                            annotations["eks.amazonaws.com/role-arn"])
        assert auth["spec"] == {"podIdentity": {"provider": "aws"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_region_and_account_are_edited_once(overlay, tmp_path):
    """An overlay's AWS region and account, edited in its kustomization.yaml only, reach the
    workers' settings, every ScaledObject and (EKS) the role ARN."""
    shutil.copytree(K8S, tmp_path / "k8s")
    kustomization = tmp_path / "k8s" / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    for placeholder, value in (("AWS_DEFAULT_REGION=REGION", "AWS_DEFAULT_REGION=eu-west-1"),
                               ("AWS_ACCOUNT_ID=ACCOUNT", "AWS_ACCOUNT_ID=123456789012")):
        assert text.count(placeholder) == 1
        text = text.replace(placeholder, value)
    kustomization.write_text(text)
    docs = render(kustomization.parent)
    urls = set()
    for scaled in of_kind(docs, "ScaledObject"):
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["metadata"]["awsRegion"] == "eu-west-1"
        urls.add(trigger["metadata"]["queueURL"])
    assert urls == {f"https://sqs.eu-west-1.amazonaws.com/123456789012/deepem3d-{pool}"
                    for pool in POOLS}
    (settings,) = [d["data"] for d in of_kind(docs, "ConfigMap") if "LEASE_SECONDS" in d["data"]]
    assert settings["AWS_DEFAULT_REGION"] == "eu-west-1"
    # the workers run only tasks writing under the run's bucket
    assert settings["DEEPEM3D_ALLOW_PREFIXES"].startswith("gs://" if overlay == "gke" else "s3://")
    if overlay == "eks":
        (account,) = of_kind(docs, "ServiceAccount")
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == (
            "arn:aws:iam::123456789012:role/deepem3d-worker")
    for doc in docs:
        validate(doc)


#: the workload the pools are sized for: an 8192 x 8192 x 256 voxel volume at 4 x 4 x 50 nm
#: through the whole pipeline with every default (the shipped model, tiles, 512 x 512 x 64
#: segmentation blocks), its tasks on the three queues the pools drain
SIZING_PIPELINE = """\
version: 1
output: {output}
image: {image}
products: [map, segmentation, downsample, meshes, skeletons]
inference:
  model: isbi2012-small-affinity
queues:
  inference: sqs://deepem3d-inference
  default: sqs://deepem3d-default
  large: {{url: sqs://deepem3d-large, min_memory: 6GiB, max_memory: 55GiB}}
"""
ROW = re.compile(r"^(?P<label>.+?)\s+(?P<tasks>\d+)\s+\d+\s+(?P<memory>[\d.]+ \w+)\s+\S+\s+"
                 r"(?:GPU|core)\s+(?:-|[\d.]+ \w+)\s+sqs://deepem3d-(?P<pool>\w+)$")


@pytest.mark.parametrize("cloud", OVERLAYS)
def test_a_run_inside_the_cluster(cloud, tmp_path):
    """k8s/run/CLOUD: the cloud's workers and a Job that runs `deepem3d run` on the folder's
    pipeline file. Every resource validates; the Job runs the default pool's image with the
    workers' identity and settings, mounts the pipeline file, fails at once on exit status 2
    (a bad input, a stage for a person to look at), and the file routes every stage to the
    pools' queues."""
    from deepem3d.run.pipeline import load_pipeline

    docs = render(K8S / "run" / cloud)
    for doc in docs:
        validate(doc)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([d["kind"] for d in render(cloud)] + ["Job", "ConfigMap"])
    job = named(docs, "Job", "deepem3d-run")
    assert job["metadata"]["namespace"] == "deepem3d"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    default = named(docs, "Deployment", "deepem3d-worker-default")["spec"]["template"]["spec"]
    assert container["image"] == default["containers"][0]["image"]
    assert not container["image"].startswith("deepem3d-cpu")  # the overlay's, not the base's
    assert pod["serviceAccountName"] == default["serviceAccountName"]
    assert pod["restartPolicy"] == "Never"
    maps = {d["metadata"]["name"]: d["data"] for d in of_kind(docs, "ConfigMap")}
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert len(refs) == 1 and "AWS_DEFAULT_REGION" in maps[refs[0]]  # the workers' settings
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert container["command"][:3] == ["deepem3d", "run", f"{mount['mountPath']}/pipeline.yaml"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "run", "operator": "In",
                                                 "values": [2]}} in rules
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(maps[volume["configMap"]["name"]]["pipeline.yaml"])
    p = load_pipeline(str(pipeline))
    assert p.output.startswith("gs://" if cloud == "gke" else "s3://")
    pools = {q.url for q in p.queues.values()}
    assert pools == {f"sqs://deepem3d-{pool}" for pool in POOLS}
    assert p.inference["device"] == "cuda"  # `auto` would be decided in the CPU pod


def test_each_pool_holds_the_largest_task_the_planner_routes_to_it(tmp_path):
    """The pools' memory limits come from the stages' own figures: `deepem3d run --dry-run`
    on the sizing workload routes every stage to a pool whose limit holds its largest task
    plus the pool's RAM disk (the inference pool also the model and CUDA's own memory, taken
    as 4 GiB)."""
    from deepem3d.storage.layers import create_layer
    from deepem3d.units import parse_bytes
    from tests.conftest import run_cli

    image = f"file://{tmp_path / 'image'}"  # an info only: the plan reads no voxel
    create_layer(image, layer_type="image", dtype="uint8", resolution=(4, 4, 50),
                 size=(8192, 8192, 256), chunk_size=(256, 256, 16))
    pipeline = tmp_path / "sizing.yaml"
    pipeline.write_text(SIZING_PIPELINE.format(output=tmp_path / "out", image=image))
    table = run_cli("run", pipeline, "--dry-run", check=True).stdout
    rows = [m.groupdict() for m in map(ROW.match, table.splitlines()) if m]
    assert {r["label"] for r in rows} >= {"inference", "supervoxels", "remap",
                                          "downsample segmentation"}, table
    pools = {}
    for doc in render(TARGETS["base"]):
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            (volume,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
            limit = pod["containers"][0]["resources"]["limits"]["memory"]
            pools[doc["metadata"]["name"].rsplit("-", 1)[-1]] = (
                gibibytes(limit) - gibibytes(volume["emptyDir"]["sizeLimit"]))
    for row in rows:
        needed = parse_bytes(row["memory"].replace(" ", "")) / 2**30
        needed += 4 if row["pool"] == "inference" else 0
        assert needed <= pools[row["pool"]], (row, pools)
    assert {r["pool"] for r in rows if r["label"] == "inference"} == {"inference"}
