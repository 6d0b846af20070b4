"""`ptq4arvg artifacts list|show|rm`: the artifacts of a server (``--server URL --token KEY``, or
PTQ4ARVG_SERVER / PTQ4ARVG_TOKEN) or of a local folder of artifact folders (``--dir``: where
`ptq4arvg quantize --out` wrote them). A server's own artifact folder goes through --server, so that
its records and files stay consistent."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx

SERVER_ENV = "PTQ4ARVG_SERVER"
TOKEN_ENV = "PTQ4ARVG_TOKEN"
COLUMNS = ("id", "model", "recipe", "w_bits", "a_bits", "total_bytes", "created_at")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


# ------------------------------------------------------------------------------------- the server


class _Server:
    def __init__(self, url: str, token: str | None):
        if not token:
            raise CommandError(f"--server needs an API key: give --token or set {TOKEN_ENV}")
        self.client = httpx.Client(
            base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise CommandError(f"cannot reach {self.client.base_url}: {e}") from e
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:200]
            raise CommandError(f"{method} {path}: {response.status_code}: {detail}")
        return response

    def list(self, args) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("model", args.model), ("recipe", args.recipe)) if v is not None}
        items, offset = [], 0
        while True:  # every page, up to --limit
            page = self._call(
                "GET", "/v1/artifacts", params={**params, "limit": 100, "offset": offset}
            ).json()
            items += page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"] or len(items) >= args.limit:
                return items[: args.limit]

    def show(self, artifact_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/artifacts/{artifact_id}").json()

    def rm(self, artifact_id: str) -> None:
        self._call("DELETE", f"/v1/artifacts/{artifact_id}")


# ------------------------------------------------------------------------------------ the folder


class _Folder:
    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CommandError(f"--dir {root}: no such folder")

    def _manifest(self, folder: Path) -> dict[str, Any] | None:
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and "files" in manifest else None

    def _summary(self, folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        recipe = manifest.get("recipe") or {}
        model = manifest.get("model")
        return {
            "id": folder.name,
            "model": model.get("name") if isinstance(model, dict) else model,
            "recipe": recipe.get("name") if isinstance(recipe, dict) else recipe,
            "w_bits": recipe.get("w_bits") if isinstance(recipe, dict) else manifest.get("w_bits"),
            "a_bits": recipe.get("a_bits") if isinstance(recipe, dict) else manifest.get("a_bits"),
            "total_bytes": sum(int(f.get("size", 0)) for f in manifest["files"].values()),
            "created_at": manifest.get("created_at"),
        }

    def _folder(self, artifact_id: str) -> tuple[Path, dict[str, Any]]:
        folder = self.root / artifact_id
        if "/" in artifact_id or artifact_id.startswith(".") or not folder.is_dir():
            raise CommandError(f"no artifact '{artifact_id}' in {self.root}")
        manifest = self._manifest(folder)
        if manifest is None:
            raise CommandError(f"{folder} is not an artifact (no readable manifest.json)")
        return folder, manifest

    def list(self, args) -> list[dict[str, Any]]:
        items = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = self._manifest(folder)
            if manifest is None:
                continue
            item = self._summary(folder, manifest)
            if (args.model is None or item["model"] == args.model) and (
                args.recipe is None or item["recipe"] == args.recipe
            ):
                items.append(item)
        items.sort(key=lambda i: str(i["created_at"] or ""), reverse=True)
        return items[: args.limit]

    def show(self, artifact_id: str) -> dict[str, Any]:
        folder, manifest = self._folder(artifact_id)
        return {**self._summary(folder, manifest), "path": str(folder), "manifest": manifest}

    def rm(self, artifact_id: str) -> None:
        folder, _ = self._folder(artifact_id)
        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------- commands


def _store(args) -> _Server | _Folder:
    server = args.server or os.environ.get(SERVER_ENV)
    if (server is None) == (args.dir is None):
        raise CommandError(f"give one of --server URL (or {SERVER_ENV}) and --dir FOLDER")
    if args.dir is not None:
        return _Folder(args.dir)
    return _Server(server, args.token or os.environ.get(TOKEN_ENV))


def _print_table(items: list[dict[str, Any]]) -> None:
    rows = [[str(i.get(c) if i.get(c) is not None else "-") for c in COLUMNS] for i in items]
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(COLUMNS)]
    for row in [list(COLUMNS), *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _run(args: argparse.Namespace) -> int:
    try:
        store = _store(args)
        if args.action == "list":
            items = store.list(args)
            if args.json:
                print(json.dumps(items, indent=2))
            else:
                _print_table(items)
        elif args.action == "show":
            print(json.dumps(store.show(args.artifact_id), indent=2))
        else:
            store.rm(args.artifact_id)
            print(f"deleted artifact {args.artifact_id}", file=sys.stderr)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def add_artifacts_command(sub) -> None:
    p = sub.add_parser(
        "artifacts",
        help="list, show or delete artifacts of a server or of a local folder",
        description=__doc__,
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="{list,show,rm}")
    for name, help_text in (
        ("list", "artifacts, newest first (filter by --model/--recipe)"),
        ("show", "one artifact: its files and manifest (JSON)"),
        ("rm", "delete one artifact (files and, on a server, its record)"),
    ):
        a = actions.add_parser(name, help=help_text, description=help_text)
        source = a.add_argument_group("where")
        source.add_argument("--server", default=None, help=f"API base URL (default ${SERVER_ENV})")
        source.add_argument("--token", default=None, help=f"API key (default ${TOKEN_ENV})")
        source.add_argument("--dir", default=None, help="a local folder of artifact folders instead")
        if name == "list":
            a.add_argument("--model", default=None, help="only this model's artifacts")
            a.add_argument("--recipe", default=None, help="only this recipe's artifacts")
            a.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
            a.add_argument("--json", action="store_true", help="print JSON instead of a table")
        else:
            a.add_argument("artifact_id", help="the artifact's id (on a server) or folder name (--dir)")
        a.set_defaults(func=_run)
