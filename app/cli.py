"""Administration commands: `ptq4arvg admin create-key --owner alice --scopes jobs,generate`
(also `python -m app.cli ...`).

Commands: create-key, list-keys, revoke-key, migrate, sync-models. They act on the database `ptq4arvg
serve` uses: PTQ4ARVG_DATABASE_URL when it is set (production), else the embedded setup's SQLite file
under --var-dir (PTQ4ARVG_VAR_DIR, default ./var). Only `migrate` creates a database; the others say
where they looked when there is none.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from app.schemas import SCOPES

SUBCOMMANDS = {
    "create-key": "create an API key and print its token (shown once)",
    "list-keys": "list keys (never their tokens)",
    "revoke-key": "revoke a key by id",
    "migrate": "create or upgrade the database schema (alembic upgrade)",
    "sync-models": "register the engine's registry (bundled models) in the database",
}


class AdminError(Exception):
    """A mistake or an unusable database: one line on stderr, exit 2."""


def _scopes(value: str) -> list[str]:
    scopes = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise argparse.ArgumentTypeError(f"scopes must be a comma list of {', '.join(SCOPES)}; got {value!r}")
    return scopes


def add_admin_commands(parser: argparse.ArgumentParser) -> None:
    """The admin subcommands, on `parser` (`ptq4arvg admin` or `python -m app.cli`)."""
    parser.add_argument(
        "--var-dir",
        default=None,
        help="the embedded setup's folder when PTQ4ARVG_DATABASE_URL is unset (default: PTQ4ARVG_VAR_DIR or ./var)",
    )
    sub = parser.add_subparsers(
        dest="admin_command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}"
    )

    create = sub.add_parser(
        "create-key", help=SUBCOMMANDS["create-key"], description=SUBCOMMANDS["create-key"]
    )
    create.add_argument("--owner", required=True, help="who owns the jobs made with this key")
    create.add_argument(
        "--scopes", type=_scopes, default=["jobs", "generate"], help="comma list of " + ",".join(SCOPES)
    )
    create.add_argument("--name", default=None, help="a label for the key")
    create.add_argument("--json", action="store_true", help="print JSON (id, owner, scopes, token)")

    listing = sub.add_parser("list-keys", help=SUBCOMMANDS["list-keys"], description=SUBCOMMANDS["list-keys"])
    listing.add_argument("--owner", default=None)
    listing.add_argument("--json", action="store_true", help="print a JSON list")

    revoke = sub.add_parser(
        "revoke-key", help=SUBCOMMANDS["revoke-key"], description=SUBCOMMANDS["revoke-key"]
    )
    revoke.add_argument("key_id", type=int)

    up = sub.add_parser("migrate", help=SUBCOMMANDS["migrate"], description=SUBCOMMANDS["migrate"])
    up.add_argument("--revision", default="head")

    sub.add_parser("sync-models", help=SUBCOMMANDS["sync-models"], description=SUBCOMMANDS["sync-models"])


def database_url(var_dir: str | None) -> str:
    """The database `ptq4arvg serve` would use with the same environment and --var-dir."""
    from app.config import embedded_database_url, get_settings
    from app.server import embedded_var_dir, is_configured

    if is_configured():
        return get_settings().database_url
    return embedded_database_url(embedded_var_dir(var_dir))


def _where(url: str) -> str:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"the SQLite database {parsed.database}"
    return f"the database {parsed.render_as_string(hide_password=True)}"


def _check_exists(url: str) -> None:
    """Commands other than migrate never create a SQLite file where none is."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        raise AdminError(
            f"no database at {parsed.database}: run `ptq4arvg serve` (embedded) or `ptq4arvg admin migrate` "
            "there first, pass --var-dir, or set PTQ4ARVG_DATABASE_URL"
        )


def run(args: argparse.Namespace) -> int:
    from app import crud
    from app.db import migrate
    from app.db.session import session_scope

    url = database_url(args.var_dir)
    if args.admin_command == "migrate":
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite" and parsed.database:
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise AdminError(f"cannot create {Path(parsed.database).parent} ({exc.strerror})") from None
        migrate.upgrade(url, args.revision)
        print(f"{_where(url)} is at {args.revision}", file=sys.stderr)
        return 0
    _check_exists(url)
    with session_scope(url) as db:
        if args.admin_command == "create-key":
            key, token = crud.create_api_key(db, owner=args.owner, scopes=args.scopes, name=args.name)
            if args.json:
                print(json.dumps({"id": key.id, "owner": key.owner, "scopes": key.scopes, "token": token}))
            else:
                print(token)
                print(
                    f"key {key.id} for {key.owner} (scopes: {','.join(key.scopes)}) in {_where(url)}; "
                    "the token is shown only once",
                    file=sys.stderr,
                )
        elif args.admin_command == "list-keys":
            keys = crud.list_api_keys(db, owner=args.owner)
            if args.json:
                print(json.dumps([_key_record(key) for key in keys]))
            else:
                for key in keys:
                    state = "revoked" if key.revoked_at else "active"
                    print(
                        f"{key.id}\t{key.prefix}…\t{key.owner}\t{','.join(key.scopes)}\t{state}\t{key.name or ''}"
                    )
        elif args.admin_command == "revoke-key":
            if not crud.revoke_api_key(db, args.key_id):
                print(f"error: no active key {args.key_id} in {_where(url)}", file=sys.stderr)
                return 1
        elif args.admin_command == "sync-models":
            from app.config import get_settings
            from app.services import sync_registry

            print(f"{sync_registry(db, get_settings())} models registered in {_where(url)}", file=sys.stderr)
    return 0


def _key_record(key) -> dict:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "owner": key.owner,
        "scopes": key.scopes,
        "name": key.name,
        "revoked": key.revoked_at is not None,
    }


def execute(args: argparse.Namespace) -> int:
    """Run a parsed admin command; a bad database or a mistake is one line and exit 2, never a traceback."""
    try:
        return run(args)
    except AdminError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except SQLAlchemyError as exc:
        url = database_url(args.var_dir)
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        unmigrated = "no such table" in reason or "does not exist" in reason
        hint = "; run `ptq4arvg admin migrate` first" if unmigrated else ""
        print(f"error: {_where(url)} cannot be used ({reason}){hint}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__.splitlines()[0])
    add_admin_commands(parser)
    return execute(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
