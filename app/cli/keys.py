"""mlserve keys create|list|revoke: the API keys a server with security.api_keys
requires. With --url (or MLSERVE_URL) through that server's admin API; without,
in this host's keys file (security.keys_file), which running servers re-read
within a second (every host, through Redis, when redis.url is set)."""
from __future__ import annotations

import sys

from app.cli.context import Context
from app.keys import SCOPES, KeyFile


def add_commands(sub, add_url) -> None:
    group = sub.add_parser("keys", help="API keys: issue, list, revoke")
    verbs = group.add_subparsers()
    remote = ("the server whose keys to change, through its admin API (default: MLSERVE_URL; "
              "with neither, the keys file security.keys_file)",
              "an admin key or the server's admin token (default: MLSERVE_API_KEY, else server.admin_token)")

    create = verbs.add_parser("create", help="issue a key; it is printed once, on stdout, and stored only as a hash")
    create.add_argument("name", help="what the key is for, unique among active keys (e.g. checkout-service)")
    create.add_argument("--scope", action="append", choices=SCOPES, required=True, dest="scopes",
                        help="what the key may do (repeat for more): predict, read (listings, metrics), "
                             "admin (everything)")
    create.add_argument("--models", type=model_list, help="comma-separated models the key may use (default: all)")
    create.add_argument("--rate", type=int, help="requests per second for this key (default: the server's limit)")
    add_url(create, *remote)
    create.set_defaults(run=cmd_create)

    listing = verbs.add_parser("list", help="every key issued, revoked ones too (never the keys themselves)")
    add_url(listing, *remote)
    listing.set_defaults(run=cmd_list)

    revoke = verbs.add_parser("revoke", help="stop a key working, on every worker within a second")
    revoke.add_argument("key", help="the key's name or id")
    add_url(revoke, *remote)
    revoke.set_defaults(run=cmd_revoke)


def model_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def cmd_create(args, ctx: Context) -> int:
    with ctx.admin_client(args) as client:
        if client:
            record = client.create_key(args.name, args.scopes, args.models, args.rate)
            key = record.pop("key")
        else:
            key, record = KeyFile(ctx.settings.keys_path).create(args.name, args.scopes, args.models, args.rate)
            ctx.keys_changed()
    print(key)
    sys.stdout.flush()
    print(f"created key {record['name']} (id {record['id']}, {describe(record)}); it is shown only this once",
          file=sys.stderr)
    return 0


def cmd_list(args, ctx: Context) -> int:
    with ctx.admin_client(args) as client:
        records = client.list_keys() if client else KeyFile(ctx.settings.keys_path).listing()
    if not records:
        print("no keys (create one with: mlserve keys create NAME --scope predict)")
    for record in records:
        status = f"revoked {record['revoked']}" if record.get("revoked") else "active"
        print(f"{record['id']}  {record['name']:<24} {describe(record):<40} created {record['created']}  {status}")
    return 0


def cmd_revoke(args, ctx: Context) -> int:
    with ctx.admin_client(args) as client:
        if client:
            record = client.revoke_key(args.key)
        else:
            record = KeyFile(ctx.settings.keys_path).revoke(args.key)
            ctx.keys_changed()
    print(f"revoked key {record['name']} (id {record['id']})")
    return 0


def describe(record: dict) -> str:
    parts = ["scopes " + ",".join(record["scopes"])]
    if record.get("models"):
        parts.append("models " + ",".join(record["models"]))
    if record.get("rate"):
        parts.append(f"{record['rate']} req/s")
    return ", ".join(parts)
