"""Start the API: `serve(host, port, embedded)`.

Embedded mode (no configuration): SQLite + a local artifact folder under ``var_dir`` (default
``./var``), the schema migrated, the engine's registry (bundled models) registered, and a Celery
worker started as a child process (solo pool, SQLAlchemy broker). The first start also creates an
admin key and writes its token to ``<var_dir>/admin.token`` (mode 0600).

Production: settings come from the environment (PTQ4ARVG_DATABASE_URL, PTQ4ARVG_BROKER_URL, ...);
run `ptq4arvg admin migrate` before, and workers separately (app.worker_cmd).
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
from pathlib import Path

import uvicorn

from app import crud
from app.config import Settings, get_settings
from app.db import migrate
from app.db.session import session_scope

log = logging.getLogger("app.server")


def is_configured() -> bool:
    """True when the environment names a database (production); otherwise `serve` should be embedded."""
    return bool(os.environ.get("PTQ4ARVG_DATABASE_URL"))


def embedded_var_dir(var_dir: str | Path | None = None) -> Path:
    """The embedded setup's folder: --var-dir, else PTQ4ARVG_VAR_DIR, else ./var."""
    return Path(var_dir or os.environ.get("PTQ4ARVG_VAR_DIR", "./var")).resolve()


def prepare_embedded(var_dir: str | Path = "./var") -> Settings:
    """Make the embedded setup ready (settings, folders, schema, admin key); returns its settings."""
    settings = Settings.embedded(var_dir)
    var = Path(var_dir).resolve()
    var.mkdir(parents=True, exist_ok=True)
    settings.artifact_dir.mkdir(parents=True, exist_ok=True)
    for root in settings.checkpoint_roots:
        root.mkdir(parents=True, exist_ok=True)
    os.environ.update(settings.to_env())  # the worker child and anything reading get_settings() agree
    get_settings.cache_clear()
    migrate.upgrade(settings.database_url)
    with session_scope(settings.database_url) as db:
        if crud.count_api_keys(db) == 0:
            _, token = crud.create_api_key(
                db, owner="admin", scopes=["admin", "jobs", "generate"], name="embedded"
            )
            token_file = var / "admin.token"
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
            log.warning("created an admin API key; its token is in %s", token_file)
    return settings


class _Server(uvicorn.Server):
    """uvicorn that, on SIGTERM/SIGINT, also fails the generate requests waiting for the device (503),
    so that their connections close at once instead of holding the shutdown."""

    def handle_exit(self, sig, frame) -> None:
        generators = getattr(getattr(self.config.app, "state", None), "generators", None)
        if generators is not None:
            generators.close()
        super().handle_exit(sig, frame)


def _run(app, settings: Settings, host: str, port: int, log_level: str) -> None:
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=settings.shutdown_seconds
    )
    _Server(config).run()
    # Every request ended or was dropped; a thread still blocked in a handler (a database call
    # that hangs) would keep the interpreter alive past the shutdown budget: leave without it.
    exit_anyway = threading.Timer(1.0, os._exit, args=(0,))
    exit_anyway.daemon = True
    exit_anyway.start()


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    embedded: bool = False,
    *,
    var_dir: str | Path | None = None,
    log_level: str = "info",
) -> None:
    """Run the API until SIGTERM (stopped within 10 s: requests get ``shutdown_seconds``, running jobs
    are left to the lease); in embedded mode also run (and finally stop) a supervised worker child."""
    from app.main import create_app

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not embedded:
        settings = get_settings()
        _run(create_app(settings), settings, host, port, log_level)
        return
    var = embedded_var_dir(var_dir)
    settings = prepare_embedded(var)
    app = create_app(settings, run_worker=True)  # the app's lifespan starts and stops the worker
    _run(app, settings, host, port, log_level)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app.server", description="Run the ptq4arvg API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="SQLite + local folder + a worker child (default: when PTQ4ARVG_DATABASE_URL is unset)",
    )
    parser.add_argument("--var-dir", default=None, help="embedded mode's data folder (default ./var)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    embedded = args.embedded if args.embedded is not None else not is_configured()
    serve(args.host, args.port, embedded, var_dir=args.var_dir, log_level=args.log_level)


if __name__ == "__main__":
    main()
