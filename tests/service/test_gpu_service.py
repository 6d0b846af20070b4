"""The embedded service on a GPU, with no device configured: the job calibrates and the endpoint
generates on CUDA (PTQ4ARVG_DEVICE=auto), the manifest names the card and the real kernel paths."""

from __future__ import annotations

import sys
import time

import httpx
import pytest
import torch

from .helpers import free_port, python_env, start_process, stop_process, tail, wait_http

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_embedded_service_runs_jobs_and_generation_on_the_gpu(tmp_path):
    var, port = tmp_path / "var", free_port()
    env = python_env({})
    env.pop("PTQ4ARVG_DEVICE", None)
    process = start_process(
        [sys.executable, "-m", "app.server", "--embedded", "--var-dir", str(var), "--port", str(port)],
        env,
        tmp_path / "server.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", process, timeout=120)
        headers = {"Authorization": f"Bearer {(var / 'admin.token').read_text().strip()}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            spec = {
                "model": "tiny-llamagen",
                "recipe": "ptq4arvg",
                "calibration": {"num_samples": 16, "batch_size": 16},
                "evaluation": {"num_images": 8},
            }
            job = client.post("/v1/jobs", json=spec).json()
            for _ in range(600):
                job = client.get(f"/v1/jobs/{job['id']}").json()
                if job["state"] in ("succeeded", "failed", "canceled"):
                    break
                time.sleep(0.5)
            assert job["state"] == "succeeded", (job, tail(tmp_path / "server.log"))
            name = torch.cuda.get_device_name(0)
            assert job["device"]["device"] == "cuda:0" and job["device"]["name"] == name
            manifest = client.get(f"/v1/artifacts/{job['artifact_id']}").json()["manifest"]
            execution = manifest["execution"]
            assert execution["device"] == "cuda:0" and execution["name"] == name
            paths = {layer["path"] for layer in execution["layers"].values()}
            assert paths - {"simulated"}, paths  # real low-bit kernels on the GPU
            r = client.post(
                "/v1/generate", json={"artifact_id": job["artifact_id"], "classes": [1, 2], "seed": 5}
            )
            assert r.status_code == 200, r.text
            assert [im["seed"] for im in r.json()["images"]] == [5, 6]
    finally:
        stop_process(process, timeout=20)
