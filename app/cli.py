"""Administration commands: `ptq4arvg admin create-key --owner alice --scopes jobs,generate`.

Commands: create-key, list-keys, revoke-key, migrate, sync-models.
"""

from __future__ import annotations

import argparse
import json
import sys

from app import crud
from app.config import get_settings
from app.db import migrate
from app.db.session import session_scope
from app.schemas import SCOPES


def _scopes(value: str) -> list[str]:
    scopes = [s.strip() for s in value.split(",") if s.strip()]
    unknown = sorted(set(scopes) - set(SCOPES))
    if not scopes or unknown:
        raise argparse.ArgumentTypeError(f"scopes must be a comma list of {', '.join(SCOPES)}; got {value!r}")
    return scopes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptq4arvg admin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create-key", help="create an API key and print its token (shown once)")
    create.add_argument("--owner", required=True, help="who owns the jobs made with this key")
    create.add_argument(
        "--scopes", type=_scopes, default=["jobs", "generate"], help="comma list of " + ",".join(SCOPES)
    )
    create.add_argument("--name", default=None, help="a label for the key")
    create.add_argument("--json", action="store_true", help="print JSON (id, owner, scopes, token)")

    listing = sub.add_parser("list-keys", help="list keys (never their tokens)")
    listing.add_argument("--owner", default=None)

    revoke = sub.add_parser("revoke-key", help="revoke a key by id")
    revoke.add_argument("key_id", type=int)

    up = sub.add_parser("migrate", help="upgrade the database schema (alembic upgrade)")
    up.add_argument("--revision", default="head")

    sub.add_parser("sync-models", help="register the engine's registry (bundled models) in the database")

    args = parser.parse_args(argv)
    settings = get_settings()

    if args.command == "migrate":
        migrate.upgrade(settings.database_url, args.revision)
        print(f"database at {args.revision}", file=sys.stderr)
        return 0

    with session_scope(settings.database_url) as db:
        if args.command == "create-key":
            key, token = crud.create_api_key(db, owner=args.owner, scopes=args.scopes, name=args.name)
            if args.json:
                print(json.dumps({"id": key.id, "owner": key.owner, "scopes": key.scopes, "token": token}))
            else:
                print(token)
                print(
                    f"key {key.id} for {key.owner} (scopes: {','.join(key.scopes)}); the token is shown only once",
                    file=sys.stderr,
                )
        elif args.command == "list-keys":
            for key in crud.list_api_keys(db, owner=args.owner):
                state = "revoked" if key.revoked_at else "active"
                print(
                    f"{key.id}\t{key.prefix}…\t{key.owner}\t{','.join(key.scopes)}\t{state}\t{key.name or ''}"
                )
        elif args.command == "revoke-key":
            if not crud.revoke_api_key(db, args.key_id):
                print(f"no active key {args.key_id}", file=sys.stderr)
                return 1
        elif args.command == "sync-models":
            from app.services import sync_registry

            print(f"{sync_registry(db, settings)} models registered", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
