"""The worker manifests render with kustomize (kubectl's, offline) into what a cluster needs."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

OVERLAYS = {"cpu": False, "gke-gpu": True, "eks-gpu": True}


@pytest.mark.parametrize("overlay,gpu", OVERLAYS.items())
def test_overlay_renders_a_worker_deployment(overlay, gpu):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: cannot render the kustomize overlays")
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, check=True,
    ).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(out)}
    deployment = docs["Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"][:2] == ["deepem3d", "worker"]
    assert "$(QUEUE_URL)" in container["command"]
    assert spec["terminationGracePeriodSeconds"] >= 600  # SIGTERM finishes the task at hand
    assert spec["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector["deepem3d/pool"] == overlay  # pools deployed side by side do not overlap
    assert docs["ConfigMap"]["data"]["QUEUE_URL"].startswith(("sqs://", "fq://"))
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == gpu
