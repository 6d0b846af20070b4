"""The `ptq4arvg` console script: the engine's commands plus serve, worker and admin.

quantcore's CLI never imports the service; the service extends it here (imports point app -> quantcore).
"""

from __future__ import annotations

import argparse
import sys

from app.artifacts_cli import add_artifacts_command
from quantcore.cli import main as engine_main


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)")
    return port


def _settings_error() -> str | None:
    """A one-line message when a PTQ4ARVG_* variable does not validate, else None."""
    from pydantic import ValidationError

    from app.config import ENV_PREFIX, get_settings

    try:
        get_settings()
    except ValidationError as e:
        first = e.errors()[0]
        name = ENV_PREFIX + str(first["loc"][0]).upper()
        return f"error: {name}={first.get('input')!r}: {first['msg']}"
    return None


def _serve(args: argparse.Namespace) -> int:
    from app.server import embedded_var_dir, is_configured, serve

    if (message := _settings_error()) is not None:
        print(message, file=sys.stderr)
        return 2

    embedded = not is_configured() and not args.production
    if embedded:
        from quantcore.cli import check_writable
        from quantcore.errors import ConfigError

        try:
            check_writable(
                embedded_var_dir(args.var_dir),
                folder=True,
                flag="--var-dir",
            )
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    serve(args.host, args.port, embedded=embedded, var_dir=args.var_dir, log_level=args.log_level)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from app.worker_cmd import GpuSelectionError, parse_gpus, run_gpu_workers, run_worker

    if (message := _settings_error()) is not None:
        print(message, file=sys.stderr)
        return 2
    if args.gpus is None:
        run_worker(hostname=args.hostname, loglevel=args.log_level)
        return 0
    import torch  # this process only supervises: its children are new processes, not forks

    try:
        gpus = parse_gpus(args.gpus, torch.cuda.device_count())
    except GpuSelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_gpu_workers(gpus, loglevel=args.log_level)


def _admin(args: argparse.Namespace) -> int:
    from app.cli import execute

    if (message := _settings_error()) is not None:
        print(message, file=sys.stderr)
        return 2
    return execute(args)


def add_service_commands(sub) -> None:
    add_artifacts_command(sub)
    p = sub.add_parser(
        "serve",
        help="run the REST API; with no PTQ4ARVG_DATABASE_URL it is the embedded single-machine setup",
        description="Embedded mode: SQLite, artifacts and an admin token under --var-dir, a worker child "
        "process, the registry's models registered. Production: settings from PTQ4ARVG_* variables.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--var-dir", default=None, help="embedded mode's folder (default ./var)")
    p.add_argument("--production", action="store_true", help="refuse the embedded fallback")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_serve)

    p = sub.add_parser("worker", help="run a Celery worker for quantization jobs (solo pool: one per GPU)")
    p.add_argument("--hostname", default=None)
    p.add_argument(
        "--gpus",
        default=None,
        help="`all` or indices like 0,1: one worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES",
    )
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=_worker)

    from app.cli import SUBCOMMANDS, add_admin_commands

    p = sub.add_parser(
        "admin",
        help="API keys and database: " + ", ".join(SUBCOMMANDS),
        description="API keys and the database of `ptq4arvg serve`: PTQ4ARVG_DATABASE_URL when set, "
        "else the embedded SQLite file under --var-dir.",
    )
    add_admin_commands(p)
    p.set_defaults(func=_admin)


def main(argv: list[str] | None = None) -> int:
    return engine_main(argv, extend=add_service_commands)


if __name__ == "__main__":
    sys.exit(main())
