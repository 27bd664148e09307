"""`llmos user add | list | rm | key | keys | revoke | quota`: the daemon's users, API keys and quotas.

Owns argument parsing and output for these commands; all state lives in `llmos.fs.users`. Never prints a key
except the one just created, and never prints a stored hash.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from llmos.fs.users import UsersError, UserStore, check_label

out = Console(highlight=False, width=None if sys.stdout is None or sys.stdout.isatty() else 400)
err = Console(stderr=True, highlight=False)

user_app = typer.Typer(
    help="Manage the daemon's users, API keys and quotas. These commands edit LLMOS_HOME/llmos.db directly, so "
    "whoever can write that file is an admin. With no users the daemon runs in single-user mode on loopback only; "
    "once a user exists, every request needs an API key.",
    short_help="Manage the daemon's users, API keys and quotas (edits LLMOS_HOME/llmos.db directly).",
    no_args_is_help=True, pretty_exceptions_enable=False)

Name = Annotated[str, typer.Argument(help="A user name: 1 to 64 letters, digits and _ . -", show_default=False)]
Label = Annotated[Optional[str], typer.Option(
    "--label", "-l", help="A note to tell the key apart later (e.g. laptop).", show_default=False)]
Limit = Annotated[Optional[str], typer.Option(
    help="A whole number >= 0, or `unlimited`; left as it is when not given.", show_default=False)]


@user_app.command("add")
def user_add(
    name: Name,
    role: Annotated[Optional[str], typer.Option(
        "--role", "-r", help="admin or user; default: admin for the first user, user after.",
        show_default=False)] = None,
    label: Label = None,
) -> None:
    """Add a user and print its first API key (shown this once only)."""
    store = UserStore()
    label = check_label(label)  # before the user exists: a bad label must not leave a user without a key
    user = store.add_user(name, role)
    key = store.create_key(user.name, label)
    notice(f"added {user.role} {user.name}; its API key follows and will not be shown again")
    print_key(key)


@user_app.command("list")
def user_list() -> None:
    """List the users with their roles, key counts and quotas (never key material)."""
    users = UserStore().list_users()
    if not users:
        notice("no users: the daemon runs in single-user mode on loopback only; `llmos user add NAME` adds the "
               "first (an admin)")
        return
    table = Table("name", "role", "keys", "max processes", "tokens/min", "max KV blocks", "created", box=None,
                  header_style="bold")
    for user in users:
        q = user.quota
        table.add_row(user.name, user.role, str(user.keys), limit_text(q.max_processes),
                      limit_text(q.tokens_per_minute), limit_text(q.max_kv_blocks), when(user.created))
    out.print(table)


@user_app.command("rm")
def user_rm(name: Name) -> None:
    """Remove a user with all of its API keys and its quota (the last admin goes only after everyone else)."""
    user = UserStore().remove_user(name)
    out.print(f"removed {user.role} [bold]{user.name}[/] and its {user.keys} API key(s)")


@user_app.command("key")
def user_key(name: Name, label: Label = None) -> None:
    """Create another API key for a user and print it (shown this once only)."""
    key = UserStore().create_key(name, label)
    notice(f"new API key for {name}, shown this once only; `llmos user revoke ID` ends it")
    print_key(key)


@user_app.command("keys")
def user_keys(name: Annotated[Optional[str], typer.Argument(
        help="Only this user's keys; default: everyone's.", show_default=False)] = None) -> None:
    """List API keys by id, user, label, creation and last use (never the keys themselves)."""
    keys = UserStore().list_keys(name)
    if not keys:
        notice("no API keys")
        return
    table = Table("id", "user", "label", "created", "last used", box=None, header_style="bold")
    for key in keys:
        table.add_row(key.key_id, key.user, key.label or "-", when(key.created), when(key.last_used))
    out.print(table)


@user_app.command("revoke")
def user_revoke(key_id: Annotated[str, typer.Argument(
        help="The key's 8-digit id (`llmos user keys` lists them), or the whole key.", show_default=False)]) -> None:
    """Revoke an API key: it stops working at once, also in a running daemon."""
    key = UserStore().revoke_key(key_id)
    out.print(f"revoked key {key.key_id} of {key.user}")


@user_app.command("quota")
def user_quota(
    name: Name,
    max_processes: Limit = None,
    tokens_per_minute: Limit = None,
    max_kv_blocks: Limit = None,
) -> None:
    """Show a user's limits, or change the ones given (`unlimited` lifts one)."""
    changes = {"max_processes": max_processes, "tokens_per_minute": tokens_per_minute,
               "max_kv_blocks": max_kv_blocks}
    changes = {what: parse_limit(value, what) for what, value in changes.items() if value is not None}
    store = UserStore()
    quota = store.get_quota(name)
    if changes:
        quota = store.set_quota(name, **{**vars(quota), **changes})
    out.print(f"{name}: max processes {limit_text(quota.max_processes)}, tokens/min "
              f"{limit_text(quota.tokens_per_minute)}, max KV blocks {limit_text(quota.max_kv_blocks)}")


def parse_limit(value: str, what: str) -> int | None:
    """`unlimited` (or `none`) -> None, a whole number >= 0 -> itself; raises `UsersError` otherwise."""
    if value.strip().lower() in ("unlimited", "none"):
        return None
    if not (value.isascii() and value.strip().isdigit()):
        raise UsersError(f"invalid --{what.replace('_', '-')} {value!r}: give a whole number >= 0, or unlimited.")
    return int(value)


def limit_text(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


def when(t: float | None) -> str:
    """Unix seconds as local time to the minute; '-' for never."""
    return "-" if t is None else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def print_key(key: str) -> None:
    """The key alone on stdout, so that `KEY=$(llmos user key alice)` works."""
    out.print(key, markup=False, soft_wrap=True)


def notice(message: str) -> None:
    err.print(f"({message})", style="dim", soft_wrap=True, markup=False)

