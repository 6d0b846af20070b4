"""Service settings, read from the environment (prefix ``PTQ4ARVG_``) or given explicitly."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from quantcore.spec import DEVICE_PATTERN  # pydantic only: no torch in the API process

ENV_PREFIX = "PTQ4ARVG_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = Field(
        "sqlite:///./var/ptq4arvg.db",
        description="SQLAlchemy URL: SQLite for embedded mode, postgresql+psycopg2://... in production.",
    )
    broker_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Celery broker: Redis in production, sqla+sqlite:///PATH in embedded mode.",
    )
    result_backend: str | None = Field(
        None, description="Celery result backend; derived from broker_url when unset."
    )
    queue: str = Field("ptq4arvg", description="Celery queue that jobs and pings are sent to.")
    artifact_dir: Path = Field(Path("./var/artifacts"), description="Root folder of job artifacts.")
    visibility_timeout: int = Field(
        43200,
        ge=1,
        description="Seconds before Redis re-delivers an un-acked task; keep above the longest job.",
    )
    job_lease_seconds: float = Field(
        60.0,
        gt=0,
        description="A running job whose heartbeat is older than this is taken over by another worker.",
    )
    engine_module: str = Field(
        "quantcore.api",
        description="Module providing quantize_job/load_generator (the quantcore engine contract).",
    )
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="Where jobs and /v1/generate run: auto (the first visible CUDA device, else the CPU), "
        "cpu, cuda or cuda:N. A GPU worker started by `ptq4arvg worker --gpus` sees only its card.",
    )
    registry_module: str = Field(
        "quantcore.registry", description="Module providing list_models() for the model registry."
    )
    register_models_at_startup: bool = Field(
        True, description="Sync the engine's model registry into the models table when the API starts."
    )
    generator_memory_bytes: int = Field(
        4 << 30,
        ge=1,
        description="Bytes of weights that /v1/generate keeps loaded (least recently used dropped first); "
        "a model larger than this is refused with 503.",
    )
    generate_random_weights: bool = Field(
        False,
        description="Let /v1/generate load models that have no weights here (random init: noise images).",
    )
    max_generate_queue: int = Field(
        64, ge=1, description="Generate requests allowed to wait for the device; more get 503 + Retry-After."
    )
    checkpoint_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Folders (os.pathsep-separated in the environment) that POST /v1/models may register "
        "checkpoints from; empty = registration refused.",
    )
    reconcile_seconds: float = Field(
        5.0,
        gt=0,
        description="How often each worker beats, requeues jobs of lost workers, re-sends lost messages "
        "and removes dead staging folders.",
    )
    broker_timeout_seconds: float = Field(
        1.5, gt=0, description="Longest wait for the broker when a job is submitted (then 503)."
    )
    shutdown_seconds: float = Field(
        5.0, gt=0, description="Grace for in-flight requests on SIGTERM; running jobs are left to the lease."
    )
    max_generate_images: int = Field(64, ge=1, description="Most images one /v1/generate call may ask for.")
    max_request_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted (413 above).")
    artifact_retention_days: float | None = Field(
        None,
        gt=0,
        description="Artifacts older than this are deleted (files and records) by the workers' reconciler; "
        "unset = kept until deleted. The job record stays.",
    )
    webhook_secret: str | None = Field(
        None,
        min_length=16,
        description="The deployment's webhook secret: each owner's signing key is derived from it (GET "
        "/v1/webhooks/default/secret). Unset = jobs with a `webhook` are refused.",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, description="Tries of one webhook call before it is given up (then logged)."
    )
    webhook_retry_seconds: float = Field(
        2.0, gt=0, description="Wait before the first retry of a failed webhook call; doubled each time."
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, description="Longest wait for a webhook receiver.")
    session_secret: str | None = Field(
        None,
        min_length=16,
        description="Signs the dashboard's session cookies; give every API replica the same one. Unset: "
        "a random one per process (sessions end at restart).",
    )
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="How long a dashboard login lasts.")

    @field_validator("checkpoint_roots", mode="before")
    @classmethod
    def _split_roots(cls, value):
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part]
        return value

    def derived_result_backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.broker_url.startswith("sqla+"):
            return "db+" + self.broker_url.removeprefix("sqla+")
        return self.broker_url

    @classmethod
    def embedded(cls, var_dir: str | Path = "./var", **overrides) -> Settings:
        """Settings of the single-machine setup: SQLite, SQLAlchemy broker, local artifact folder."""
        var = Path(var_dir).resolve()
        values = {
            "database_url": embedded_database_url(var),
            "broker_url": f"sqla+sqlite:///{var / 'broker.db'}",
            "result_backend": f"db+sqlite:///{var / 'results.db'}",
            "artifact_dir": var / "artifacts",
            "checkpoint_roots": [var / "checkpoints"],
            "webhook_secret": _embedded_webhook_secret(var),
        }
        values.update(overrides)
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if isinstance(value, list):
                value = os.pathsep.join(map(str, value))
            env[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


def embedded_database_url(var_dir: str | Path) -> str:
    """The embedded setup's database under ``var_dir`` (naming it creates nothing)."""
    return f"sqlite:///{Path(var_dir).resolve() / 'ptq4arvg.db'}"


def _embedded_webhook_secret(var: Path) -> str:
    """The embedded setup's webhook secret: made on first use, kept in <var>/webhook.secret (0600)."""
    path = var / "webhook.secret"
    if not path.exists():
        var.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
