"""The torch requirement is a range that the test runs cover: the CPU wheel CI installs, and the CUDA
build the Docker image runs (its base image's torch)."""

import re
import tomllib
from pathlib import Path

import torch
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _torch_requirement() -> Requirement:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "torch")


def test_the_torch_running_these_tests_is_inside_the_declared_range():
    running = Version(torch.__version__.split("+")[0])
    assert _torch_requirement().specifier.contains(running), (running, _torch_requirement())


def test_bootstrap_installs_the_cpu_wheel_first_and_exactly():
    script = (REPO / "scripts" / "bootstrap.sh").read_text()
    pinned = re.search(r"pip install -q torch==([\d.]+)\n", script)
    assert pinned, "bootstrap.sh must install an exact torch before the project"
    assert script.index(pinned.group(0)) < script.index("pip install -q -e")
    assert _torch_requirement().specifier.contains(Version(pinned.group(1)))


def test_the_docker_image_runs_a_torch_inside_the_range():
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"ARG BASE_IMAGE=pytorch/pytorch:([\d.]+)-cuda", dockerfile)
    assert base, "the Docker image's torch comes from a pytorch/pytorch base image tag"
    assert _torch_requirement().specifier.contains(Version(base.group(1)))
