# syntax=docker/dockerfile:1
# One image, two targets:
#   docker build --target api    -t ptq4arvg-api .
#   docker build --target worker -t ptq4arvg-worker .
# torch comes from the CUDA base image (2.11.0, CUDA 13.0): the release the GPU tests ran on (an H200
# with torch 2.11, tests/test_real_gpu.py and tests/test_fastgen.py, 2026-12-01; CI tests the CPU
# 2.13.0 wheel).
# Both lie inside pyproject's range, torch>=2.11,<2.14 (tests/test_requirements.py checks this tag
# against it, and the build below refuses a base image outside it). pip must not replace it, so the
# other dependencies are installed explicitly and the project itself with --no-deps.
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime

FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PTQ4ARVG_ARTIFACT_DIR=/var/lib/ptq4arvg/artifacts
WORKDIR /opt/ptq4arvg

# Dependencies first, for the layer cache: every requirement of pyproject.toml except torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(d for d in deps if not d.replace(' ', '').startswith('torch')))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt packaging \
 && python -c "import tomllib, torch; from packaging.requirements import Requirement; \
deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
spec = next(Requirement(d).specifier for d in deps if Requirement(d).name == 'torch'); \
version = torch.__version__.split('+')[0]; print('torch', version, 'cuda', torch.version.cuda); \
assert spec.contains(version), f'the base image has torch {version}, outside the tested range {spec}'"

COPY README.md alembic.ini ./
COPY migrations ./migrations
COPY quantcore ./quantcore
COPY app ./app
COPY worker ./worker
RUN pip install --no-deps -e . \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin ptq4arvg \
 && mkdir -p /var/lib/ptq4arvg/artifacts \
 && chown -R ptq4arvg:ptq4arvg /var/lib/ptq4arvg
USER ptq4arvg
VOLUME ["/var/lib/ptq4arvg/artifacts"]

# ---------------------------------------------------------------------------------------- API
FROM base AS api
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
# The schema changes only through Alembic: migrate, then serve.
CMD ["sh", "-c", "python -m app.cli migrate && exec python -m app.server --host 0.0.0.0 --port 8000"]

# ------------------------------------------------------------------------------------- worker
FROM base AS worker
# One process per GPU, solo pool (no fork: torch and CUDA are never touched before a fork).
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
  CMD celery -A worker.celery_app inspect ping -d "gpu@$(hostname)" --timeout 10 || exit 1
CMD ["python", "-m", "app.worker_cmd", "--hostname", "gpu@%h"]
