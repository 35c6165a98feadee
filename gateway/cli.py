"""The `listgate` command: run the gateway and manage lists, members, the queue.

Errors say what to do and exit non-zero: 1 for a failed operation, 2 for bad usage.
"""

from __future__ import annotations

import asyncio
import csv
import datetime
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from gateway import addresses, holds, learning, lists, promo, queue, routing, spool
from gateway.clock import SystemClock
from gateway.config import Config, load, store_url
from gateway.errors import AddressError, Conflict, ListgateError, NotFound
from gateway.policy import Policies
from gateway.rules import PromotionalParams
from gateway.schema import (
    QUEUE_TABLES,
    HeldState,
    Mode,
    RoleName,
    State,
    journal,
    messages,
    outbound,
    work,
)
from gateway.signing import LinkSigner
from gateway.store import Store, doorbell_path
from gateway.templates import Templates
from gateway.worker import ring

# Markup off: list names, subject prefixes like "[Discuss]" and config errors naming
# "[delivery]" are data, not styles.
out = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_CONFIG = "listgate.toml"


@dataclass
class Context:
    config_path: Path

    def config(self) -> Config:
        path = self.config_path if self.config_path.exists() else None
        if path is None and self.config_path != Path(DEFAULT_CONFIG):
            load(self.config_path)  # raises: says the file is missing and how to make one
        return load(path)

    @contextmanager
    def store(self, *, check: bool = True) -> Iterator[Store]:
        config = self.config()
        store = Store(store_url(config), clock=SystemClock(), pool_size=2)
        try:
            if check:
                store.check_schema()
            yield store
        finally:
            store.dispose()


def wake_gateway(obj: Context) -> str:
    """Ring the running gateway's doorbell (gateway.worker.Doorbell) after a command
    queued work: when it goes out, in words."""
    if ring(doorbell_path(store_url(obj.config()))):
        return "now"
    return "at its next poll"


def fail_cleanly(fn: F) -> F:
    """Turn our errors into one readable line and exit status 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ListgateError as exc:
            err.print(Text("error: ", style="red") + Text(str(exc)), soft_wrap=True)
            sys.exit(1)
    return wrapper  # type: ignore[return-value]


def now() -> float:
    return SystemClock().now()


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path),
              default=lambda: os.environ.get("LISTGATE_CONFIG", DEFAULT_CONFIG),
              show_default="$LISTGATE_CONFIG or ./listgate.toml",
              help="The configuration file.")
@click.pass_context
def main(ctx: click.Context, config_path: Path) -> None:
    """Listgate: a mailing-list gateway that keeps lists a place for discussion."""
    ctx.obj = Context(config_path)
    for console in (out, err):
        # Wide when piped: a script reading our tables should not get wrapped rows.
        console.width = console.width if console.is_terminal else 1000


# -- set-up and running ----------------------------------------------------------

EXAMPLE_CONFIG = """\
# Listgate configuration. Every key is optional; see deploy/listgate.toml for all of them.

[store]
url = "sqlite:///listgate.db"

[intake]
listen = ["smtp://127.0.0.1:2525", "lmtp://127.0.0.1:2424"]

[delivery]
# With no smarthost, what members would receive is written to the outbox folder.
# smarthost = "smtp://127.0.0.1:25"
outbox = "outbox"
"""

EXAMPLE_LIST = "discuss@example.org"
EXAMPLE_MEMBERS = (("alice@example.net", "Alice"), ("bob@example.net", "Bob"),
                   ("carol@example.net", "Carol"))


@main.command()
@click.option("--example", is_flag=True, help=f"Also create the list {EXAMPLE_LIST} with members.")
@click.pass_obj
@fail_cleanly
def init(obj: Context, example: bool) -> None:
    """Create the configuration file (if missing) and the store, or bring it up to date."""
    path = obj.config_path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(EXAMPLE_CONFIG, encoding="utf-8")
        out.print(f"wrote {path}")
    config = obj.config()
    if not config.web.secret_file.exists():
        LinkSigner.from_file(config.web.secret_file, create=True)
        out.print(f"wrote the link signing key {config.web.secret_file} (mode 0600)")
    with obj.store(check=False) as store:
        store.upgrade()
        out.print(f"store ready: {store.engine.url.render_as_string(hide_password=True)}")
        if example:
            _example(store)


def _example(store: Store) -> None:
    with store.write() as conn:
        try:
            lst = lists.get(conn, EXAMPLE_LIST)
            out.print(f"example list {EXAMPLE_LIST} already exists")
            return
        except NotFound:
            pass
        lst = lists.create(conn, EXAMPLE_LIST, now=now(), display_name="Discuss",
                           description="An example discussion list")
        for address, name in EXAMPLE_MEMBERS:
            lists.add_member(conn, lst, address, now=now(), display_name=name)
        lists.add_role(conn, lst, EXAMPLE_MEMBERS[0][0], RoleName.OWNER)
        lists.add_role(conn, lst, EXAMPLE_MEMBERS[0][0], RoleName.MODERATOR)
    out.print(f"created {EXAMPLE_LIST} with members "
              f"{', '.join(a for a, _n in EXAMPLE_MEMBERS)} (owner: {EXAMPLE_MEMBERS[0][0]})")


@main.command()
@click.option("--processes", "-p", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: [daemon] processes, 1).")
@click.pass_obj
@fail_cleanly
def serve(obj: Context, processes: int | None) -> None:
    """Run the gateway until SIGTERM or Ctrl-C."""
    from gateway.supervisor import announce, configure_logging, pin_to_cpu

    config = obj.config()
    processes = processes or config.daemon.processes
    if processes > 1:
        # The supervisor is this process (same pid) made small again: it keeps none of
        # what this command has loaded, and each worker loads what it runs.
        command = [sys.executable, "-m", "gateway.supervisor", "--processes", str(processes)]
        if obj.config_path.exists():
            command += ["--config", str(obj.config_path)]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, command)
    from gateway.daemon import Daemon

    configure_logging(config, processes)
    if config.daemon.pin_cpus:
        pin_to_cpu(0)
    daemon = Daemon(config)
    asyncio.run(daemon.run(ready=lambda: announce(config, daemon.bound), handle_signals=True))


@main.group()
def db() -> None:
    """The store's schema."""


@db.command("upgrade")
@click.pass_obj
@fail_cleanly
def db_upgrade(obj: Context) -> None:
    """Migrate the store to the newest schema."""
    with obj.store(check=False) as store:
        store.upgrade()
        current, _head = store.revisions()
        out.print(f"store at revision {current}")


@db.command("status")
@click.pass_obj
@fail_cleanly
def db_status(obj: Context) -> None:
    """Show the store's schema revision and whether it needs an upgrade."""
    with obj.store(check=False) as store:
        current, head = store.revisions()
        out.print(f"store revision {current or 'none'}; newest {head}"
                  + ("" if current == head else " -- run `listgate db upgrade`"))
        if current != head:
            sys.exit(1)


# -- lists ------------------------------------------------------------------------------

@main.group("lists")
def lists_group() -> None:
    """Create, show and list mailing lists."""


@lists_group.command("create")
@click.argument("address")
@click.option("--name", "display_name", help="Display name (default: the list name).")
@click.option("--description", default="", help="One line about the list.")
@click.option("--prefix", "subject_prefix", help='Subject prefix (default: "[Name]"; "" for none).')
@click.option("--archive-url", help="URL of the list's archive, for List-Archive.")
@click.option("--owner", "owners", multiple=True, help="An owner's address (repeatable).")
@click.pass_obj
@fail_cleanly
def lists_create(obj: Context, address: str, display_name: str | None, description: str,
                 subject_prefix: str | None, archive_url: str | None,
                 owners: tuple[str, ...]) -> None:
    """Create the list ADDRESS (name@domain)."""
    with obj.store() as store, store.write() as conn:
        lst = lists.create(conn, address, now=now(), display_name=display_name,
                           description=description, subject_prefix=subject_prefix,
                           archive_url=archive_url)
        for owner in owners:
            lists.add_role(conn, lst, owner, RoleName.OWNER)
    out.print(f"created {lst.address}")


@lists_group.command("ls")
@click.pass_obj
@fail_cleanly
def lists_ls(obj: Context) -> None:
    """All lists, with member counts."""
    with obj.store() as store, store.read() as conn:
        table = Table("list", "name", "members", "regular", "digest", "nomail")
        for lst in lists.all_lists(conn):
            counts = lists.count_members(conn, lst)
            digest = sum(n for m, n in counts.items() if m.value.startswith("digest"))
            table.add_row(lst.address, lst.display_name, str(sum(counts.values())),
                          str(counts.get(Mode.REGULAR, 0)), str(digest),
                          str(counts.get(Mode.NOMAIL, 0)))
    out.print(table)


@lists_group.command("show")
@click.argument("address")
@click.pass_obj
@fail_cleanly
def lists_show(obj: Context, address: str) -> None:
    """Everything about one list."""
    with obj.store() as store, store.read() as conn:
        lst = lists.get(conn, address)
        counts = lists.count_members(conn, lst)
        owners = lists.role_holders(conn, lst.id, RoleName.OWNER)
        moderators = lists.role_holders(conn, lst.id, RoleName.MODERATOR)
    table = Table(show_header=False)
    for key, value in (
        ("address", lst.address), ("name", lst.display_name),
        ("description", lst.description or "-"), ("subject prefix", lst.subject_prefix or "-"),
        ("List-Id", f"<{lst.identity.list_id}>"), ("archive", lst.archive_url or "-"),
        ("owners", ", ".join(owners) or "- (none: mail to -owner is not forwarded)"),
        ("moderators", ", ".join(moderators) or "-"),
        ("members", ", ".join(f"{n} {m.value}" for m, n in sorted(
            counts.items(), key=lambda kv: kv[0].value)) or "none"),
        ("personal links", "on (one-click unsubscribe per member)" if lst.personalize
         else "off (bulk delivery, mailto unsubscribe)"),
        ("digest", f"{lst.digest_schedule} ({lst.digest_timezone}); early at "
                   f"{lst.digest_max_posts or '-'} posts or {lst.digest_max_bytes or '-'} bytes; "
                   f"next {when(lst.digest_next_at)}"),
        ("emergency", "ON: every post is held" if lst.emergency else "off"),
        ("created", when(lst.created_at)),
    ):
        table.add_row(key, value)
    out.print(table)


@lists_group.command("set")
@click.argument("address")
@click.option("--emergency", type=click.Choice(["on", "off"]),
              help="Emergency moderation: hold every post (with the emergency rule in the policy).")
@click.option("--personalize", type=click.Choice(["on", "off"]),
              help="Per-member one-click unsubscribe links (RFC 8058): one SMTP transaction "
                   "per member. Off: bulk transactions, mailto unsubscribe only.")
@click.option("--dmarc-mitigation", type=click.Choice(["rewrite", "wrap", "none"]),
              help="Posts from domains with DMARC p=reject/quarantine: rewrite From to the "
                   "list (default), wrap the post as an attachment, or send as is (RFC 7960).")
@click.option("--digest-schedule", metavar="CRON",
              help='When digests go out: a cron expression, e.g. "0 7 * * *" (daily, 07:00).')
@click.option("--digest-timezone", metavar="ZONE", help="Time zone of the schedule, e.g. UTC.")
@click.option("--digest-max-posts", type=click.IntRange(min=0),
              help="Send a digest early once it holds this many posts (0: never).")
@click.option("--digest-max-bytes", type=click.IntRange(min=0),
              help="Send a digest early once its posts add up to this many bytes (0: never).")
@click.pass_obj
@fail_cleanly
def lists_set(obj: Context, address: str, emergency: str | None, personalize: str | None,
              dmarc_mitigation: str | None, digest_schedule: str | None,
              digest_timezone: str | None,
              digest_max_posts: int | None, digest_max_bytes: int | None) -> None:
    """Change a list's settings."""
    from gateway import digest

    changes: dict[str, object] = {}
    if emergency is not None:
        changes["emergency"] = emergency == "on"
    if personalize is not None:
        changes["personalize"] = personalize == "on"
    if dmarc_mitigation is not None:
        changes["dmarc_mitigation"] = dmarc_mitigation
    if digest_schedule is not None:
        changes["digest_schedule"] = digest_schedule
    if digest_timezone is not None:
        changes["digest_timezone"] = digest_timezone
    if digest_max_posts is not None:
        changes["digest_max_posts"] = digest_max_posts
    if digest_max_bytes is not None:
        changes["digest_max_bytes"] = digest_max_bytes
    if not changes:
        raise click.UsageError("nothing to change; see `listgate lists set --help`")
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, address)
        digest.schedule(str(changes.get("digest_schedule", lst.digest_schedule)),
                        str(changes.get("digest_timezone", lst.digest_timezone)))
        if "digest_schedule" in changes or "digest_timezone" in changes:
            changes["digest_next_at"] = None  # recomputed from the new schedule
        lists.update(conn, lst, **changes)
    for key, value in changes.items():
        if key != "digest_next_at":
            out.print(f"{lst.address}: {key.replace('_', ' ')} = {value}")


@lists_group.command("delete")
@click.argument("address")
@click.option("--yes", is_flag=True, help="Really delete the list and its members.")
@click.pass_obj
@fail_cleanly
def lists_delete(obj: Context, address: str, yes: bool) -> None:
    """Delete a list and its members (its stored messages stay)."""
    if not yes:
        raise click.UsageError(f"this deletes {address} and all its members; add --yes to do it")
    with obj.store() as store, store.write() as conn:
        lists.delete(conn, lists.get(conn, address))
    out.print(f"deleted {address}")


# -- members ------------------------------------------------------------------------------

MODES = click.Choice([m.value for m in Mode])


@main.group()
def members() -> None:
    """Add, remove, list and import members."""


@members.command("add")
@click.argument("list_address", metavar="LIST")
@click.argument("member_addresses", metavar="ADDRESS...", nargs=-1, required=True)
@click.option("--name", "display_name", default="", help="Display name (one address only).")
@click.option("--mode", type=MODES, default=Mode.REGULAR.value, show_default=True)
@click.option("--approved", is_flag=True,
              help="Known posters: their first post is not held (the first-post rule).")
@click.pass_obj
@fail_cleanly
def members_add(obj: Context, list_address: str, member_addresses: tuple[str, ...],
                display_name: str, mode: str, approved: bool) -> None:
    """Subscribe addresses to LIST (no confirmation: the operator vouches for them)."""
    added = []
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        for address in member_addresses:
            member = lists.add_member(conn, lst, address, now=now(), display_name=display_name,
                                      mode=Mode(mode))
            if approved:
                lists.update_standing(conn, lst.id, member.address, now=now(), approved=1)
            added.append(member)
    # Reported once committed: one bad address adds nobody.
    for member in added:
        out.print(f"added {member.address} to {lst.address} ({member.mode.value})")


@members.command("remove")
@click.argument("list_address", metavar="LIST")
@click.argument("member_addresses", metavar="ADDRESS...", nargs=-1, required=True)
@click.pass_obj
@fail_cleanly
def members_remove(obj: Context, list_address: str, member_addresses: tuple[str, ...]) -> None:
    """Unsubscribe addresses from LIST."""
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        for address in member_addresses:
            lists.remove_member(conn, lst, address)
    for address in member_addresses:
        out.print(f"removed {addresses.normalise(address)} from {lst.address}")


@members.command("set")
@click.argument("list_address", metavar="LIST")
@click.argument("address")
@click.option("--mode", type=MODES, required=True,
              help="regular, digest-mime, digest-plain, digest-html or nomail.")
@click.pass_obj
@fail_cleanly
def members_set(obj: Context, list_address: str, address: str, mode: str) -> None:
    """Change how a member receives the list."""
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        lists.set_mode(conn, lst, address, Mode(mode))
    out.print(f"{addresses.normalise(address)} now gets {mode} from {lst.address}")


@members.command("ls")
@click.argument("list_address", metavar="LIST")
@click.option("--mode", type=MODES, help="Only members with this delivery mode.")
@click.pass_obj
@fail_cleanly
def members_ls(obj: Context, list_address: str, mode: str | None) -> None:
    """LIST's members, one per line: address, mode, name."""
    with obj.store() as store, store.read() as conn:
        lst = lists.get(conn, list_address)
        for member in lists.iter_members(conn, lst, mode=Mode(mode) if mode else None):
            state = "" if member.enabled else " (disabled)"
            # click.echo, not rich: tab-separated lines are for scripts to split.
            click.echo(f"{member.address}\t{member.mode.value}{state}\t{member.display_name}")


@members.command("import")
@click.argument("list_address", metavar="LIST")
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(exists=True, dir_okay=False,
                                                               path_type=Path))
@click.option("--mode", type=MODES, default=Mode.REGULAR.value, show_default=True,
              help="Mode for rows that do not name one.")
@click.option("--approved", is_flag=True,
              help="Known posters (e.g. moving an existing list): no first-post hold.")
@click.pass_obj
@fail_cleanly
def members_import(obj: Context, list_address: str, csv_file: Path, mode: str,
                   approved: bool) -> None:
    """Import members from a CSV file: address[,name[,mode]] per row, optional header row.

    Addresses already subscribed are left as they are; bad rows are reported
    with their line numbers and skipped. Nobody is sent a welcome message.
    """
    rows, bad = _read_member_csv(csv_file, Mode(mode))
    for line, why in bad[:20]:
        err.print(f"{csv_file}:{line}: skipped: {why}")
    if len(bad) > 20:
        err.print(f"... and {len(bad) - 20} more bad rows")
    added = 0
    existing: list[str] = []
    with obj.store() as store:
        with store.read() as conn:
            lst = lists.get(conn, list_address)
        columns = (TextColumn("importing"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err, transient=False) as progress:
            task = progress.add_task("import", total=len(rows))
            for i in range(0, len(rows), 1000):
                with store.write() as conn:
                    n, already = lists.add_members(conn, lst, rows[i:i + 1000], now=now())
                    if approved:
                        for address, _name, _mode in rows[i:i + 1000]:
                            lists.update_standing(conn, lst.id, addresses.normalise(address),
                                                  now=now(), approved=1)
                added += n
                existing += already
                progress.advance(task, len(rows[i:i + 1000]))
    out.print(f"imported {added} new members into {lst.address}; {len(existing)} were already "
              f"members; {len(bad)} rows skipped")
    if bad and not added:
        sys.exit(1)


def _read_member_csv(path: Path, default_mode: Mode) -> tuple[list[tuple[str, str, Mode]],
                                                               list[tuple[int, str]]]:
    rows: list[tuple[str, str, Mode]] = []
    bad: list[tuple[int, str]] = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ListgateError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8 CSV") from None
    for line, record in enumerate(csv.reader(text.splitlines()), 1):
        if not record or not record[0].strip() or record[0].lstrip().startswith("#"):
            continue
        if line == 1 and record[0].strip().lower() in ("address", "email", "e-mail"):
            continue
        address = record[0].strip()
        name = record[1].strip() if len(record) > 1 else ""
        try:
            row_mode = Mode(record[2].strip()) if len(record) > 2 and record[2].strip() \
                else default_mode
        except ValueError:
            bad.append((line, f"unknown mode {record[2].strip()!r} "
                              f"(one of {', '.join(m.value for m in Mode)})"))
            continue
        try:
            addresses.normalise(address)
        except AddressError as exc:
            bad.append((line, str(exc)))
            continue
        rows.append((address, name, row_mode))
    return rows, bad


# -- roles ------------------------------------------------------------------------------

ROLE_NAMES = click.Choice([r.value for r in RoleName])


@main.group()
def roles() -> None:
    """Owners and moderators of a list."""


@roles.command("add")
@click.argument("list_address", metavar="LIST")
@click.argument("address")
@click.argument("role", type=ROLE_NAMES)
@click.pass_obj
@fail_cleanly
def roles_add(obj: Context, list_address: str, address: str, role: str) -> None:
    """Make ADDRESS an owner or moderator of LIST."""
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        lists.add_role(conn, lst, address, RoleName(role))
    out.print(f"{addresses.normalise(address)} is now a {role} of {lst.address}")


@roles.command("remove")
@click.argument("list_address", metavar="LIST")
@click.argument("address")
@click.argument("role", type=ROLE_NAMES)
@click.pass_obj
@fail_cleanly
def roles_remove(obj: Context, list_address: str, address: str, role: str) -> None:
    """Take the owner or moderator role from ADDRESS."""
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        lists.remove_role(conn, lst, address, RoleName(role))
    out.print(f"{addresses.normalise(address)} is no longer a {role} of {lst.address}")


@roles.command("ls")
@click.argument("list_address", metavar="LIST")
@click.pass_obj
@fail_cleanly
def roles_ls(obj: Context, list_address: str) -> None:
    """LIST's owners and moderators."""
    with obj.store() as store, store.read() as conn:
        lst = lists.get(conn, list_address)
        for role in RoleName:
            for address in lists.role_holders(conn, lst.id, role):
                click.echo(f"{address}\t{role.value}")


# -- routes ------------------------------------------------------------------------------

@main.command()
@click.option("--test", "address", metavar="ADDRESS",
              help="Show which route ADDRESS takes, and why.")
@click.pass_obj
@fail_cleanly
def routes(obj: Context, address: str | None) -> None:
    """The route table; with --test, where one address goes."""
    if address is None:
        table = Table("role", "pattern (local part)", "stage", "for")
        for route in routing.ROUTES:
            table.add_row(route.role.value, route.pattern, route.stage.value, route.purpose)
        out.print(table)
        return
    with obj.store() as store:
        directory = lists.Directory(store)
        directory.refresh()
    found = directory.router().resolve(address)
    if isinstance(found, routing.Hit):
        out.print(f"{address}: {found.route.role.value} -> stage {found.route.stage.value}")
        out.print(f"  because: {found.reason}")
        if found.detail:
            out.print(f"  detail: {found.detail}")
        out.print("  intake answers RCPT with 250 2.1.5")
    else:
        out.print(f"{address}: no route -- intake answers RCPT with 550 5.1.1")
        out.print(f"  because: {found.reason}")
        sys.exit(1)


# -- the queue ------------------------------------------------------------------------------

@main.group("queue")
def queue_group() -> None:
    """What is in flight, waiting, or parked."""


def _queue_ref(ref: str) -> tuple[sa.Table, int]:
    stage, sep, number = ref.partition("/")
    if not sep or not number.isdigit():
        raise click.BadParameter(f"{ref!r}: queue ids look like moderation/12 or delivery/345 "
                                 "(as `listgate queue ls` prints them)")
    if stage == "delivery":
        return outbound, int(number)
    if stage in {s.value for s in routing.Stage}:
        return work, int(number)
    raise click.BadParameter(f"{ref!r}: unknown stage {stage!r}")


def _queue_rows(conn: sa.Connection, state: str | None, stage: str | None) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if stage in (None, "delivery"):
        q = sa.select(outbound)
        if state:
            q = q.where(outbound.c.state == state)
        for r in conn.execute(q.order_by(outbound.c.id)).mappings():
            found.append(dict(r, ref=f"delivery/{r['id']}", stage="delivery",
                              what=f"{r['kind']} to {r['rcpt_count']} rcpt(s)"))
    if stage != "delivery":
        q = sa.select(work)
        if state:
            q = q.where(work.c.state == state)
        if stage:
            q = q.where(work.c.stage == stage)
        for r in conn.execute(q.order_by(work.c.id)).mappings():
            found.append(dict(r, ref=f"{r['stage']}/{r['id']}",
                              what=f"{r['role']} to {r['address']}"))
    return found


@queue_group.command("ls")
@click.option("--state", type=click.Choice([s.value for s in State]))
@click.option("--stage", type=click.Choice([s.value for s in routing.Stage]))
@click.pass_obj
@fail_cleanly
def queue_ls(obj: Context, state: str | None, stage: str | None) -> None:
    """Queue rows: ready, claimed (in flight) and parked."""
    with obj.store() as store:
        in_spool = spool.spooled(store)
        with store.read() as conn:
            rows = _queue_rows(conn, state, stage)
    table = Table("id", "state", "what", "queue id", "attempts", "due", "last error")
    for r in rows:
        table.add_row(r["ref"], r["state"], r["what"], str(r["message_id"] or "-"),
                      str(r["attempts"]), when(r["due_at"]), (r["last_error"] or "")[:60])
    out.print(table)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "the queue is empty")
    if in_spool:
        out.print(f"and {in_spool} post(s) taken in by intake, in its spool, on their way "
                  "into the queue")


@queue_group.command("show")
@click.argument("ref", metavar="STAGE/ID")
@click.pass_obj
@fail_cleanly
def queue_show(obj: Context, ref: str) -> None:
    """One queue row, the message it is about, and that message's journal."""
    table_, row_id = _queue_ref(ref)
    with obj.store() as store, store.read() as conn:
        row = conn.execute(sa.select(table_).where(table_.c.id == row_id)).mappings().first()
        if row is None:
            raise NotFound(f"no queue row {ref} (it may have finished); "
                           "`listgate queue ls` shows what is queued")
        msg = None
        events: list[Any] = []
        if row["message_id"] is not None:
            msg = conn.execute(sa.select(messages.c.id, messages.c.received_at,
                                         messages.c.mail_from, messages.c.rcpt_tos,
                                         messages.c.size, messages.c.message_id, messages.c.peer)
                               .where(messages.c.id == row["message_id"])).mappings().first()
            events = list(conn.execute(sa.select(journal).where(
                journal.c.message_id == row["message_id"]).order_by(journal.c.id)).mappings())
    t = Table(show_header=False)
    for key, value in row.items():
        if key in ("due_at", "lease_until", "created_at", "updated_at", "first_try_at"):
            value = when(value)
        t.add_row(key, str(value))
    out.print(t)
    if msg is not None:
        out.print(f"message {msg['id']}: from <{msg['mail_from']}> to {msg['rcpt_tos']}, "
                  f"{msg['size']} bytes, Message-ID {msg['message_id'] or '-'}, "
                  f"received {when(msg['received_at'])} from {msg['peer']}")
    for e in events:
        out.print(f"  {when(e['at'])} {e['stage']}: {e['event']} -- {e['detail']}")


@queue_group.command("retry")
@click.argument("refs", metavar="STAGE/ID...", nargs=-1)
@click.option("--all-parked", is_flag=True, help="Retry every parked row.")
@click.pass_obj
@fail_cleanly
def queue_retry(obj: Context, refs: tuple[str, ...], all_parked: bool) -> None:
    """Make parked or waiting rows due now, with a fresh attempt count."""
    if not refs and not all_parked:
        raise click.UsageError("name rows (e.g. delivery/12) or use --all-parked")
    with obj.store() as store, store.write() as conn:
        targets = [_queue_ref(r) for r in refs]
        if all_parked:
            for _name, table_ in QUEUE_TABLES.items():
                ids = conn.execute(sa.select(table_.c.id).where(
                    table_.c.state == State.PARKED.value)).scalars().all()
                targets += [(table_, i) for i in ids]
        done = 0
        for table_, row_id in targets:
            if queue.retry(conn, table_, row_id, now=now()):
                done += 1
            else:
                err.print(f"{table_.name} row {row_id}: not found, or in flight right now")
    when = wake_gateway(obj) if done else "now"
    out.print(f"{done} row(s) due now; the running gateway retries them {when}")
    if done < len(targets):
        sys.exit(1)


@queue_group.command("park")
@click.argument("refs", metavar="STAGE/ID...", nargs=-1, required=True)
@click.option("--why", default="parked by the operator", help="Why, for the record.")
@click.pass_obj
@fail_cleanly
def queue_park(obj: Context, refs: tuple[str, ...], why: str) -> None:
    """Set rows aside: parked rows are kept, and are not worked on until retried."""
    with obj.store() as store, store.write() as conn:
        missing = 0
        for ref in refs:
            table_, row_id = _queue_ref(ref)
            if not queue.park(conn, table_, row_id, now=now(), why=why):
                err.print(f"{ref}: no such queue row")
                missing += 1
    out.print(f"{len(refs) - missing} row(s) parked")
    if missing:
        sys.exit(1)


# -- policy ------------------------------------------------------------------------------

@main.group()
def policy() -> None:
    """Moderation policy files."""


@policy.command("check")
@click.pass_obj
@fail_cleanly
def policy_check(obj: Context) -> None:
    """Validate the policy files; name unknown rules and bad parameters."""
    config = obj.config()
    policies = Policies(config.paths.policies)
    for source in policies.files:
        out.print(f"ok: {source}")


# -- held posts -------------------------------------------------------------------------

@main.group()
def held() -> None:
    """Posts waiting for a moderator."""


@held.command("ls")
@click.argument("list_address", metavar="[LIST]", required=False)
@click.pass_obj
@fail_cleanly
def held_ls(obj: Context, list_address: str | None) -> None:
    """Held posts still waiting, oldest first."""
    with obj.store() as store, store.read() as conn:
        list_id = lists.get(conn, list_address).id if list_address else None
        waiting = holds.waiting(conn, list_id)
        names = {lst.id: lst.address for lst in lists.all_lists(conn)}
    table = Table("id", "list", "from", "subject", "held", "expires", "why")
    for h in waiting:
        table.add_row(str(h.id), names.get(h.list_id, "?"), h.poster, h.subject[:40],
                      when(h.created_at), when(h.expires_at), "; ".join(h.reasons)[:70])
    out.print(table)
    out.print(f"{len(waiting)} held post(s)")


@held.command("show")
@click.argument("held_id", type=int)
@click.option("--raw", is_flag=True, help="Print the post exactly as received.")
@click.pass_obj
@fail_cleanly
def held_show(obj: Context, held_id: int, raw: bool) -> None:
    """One held post: why it was held, and the post itself."""
    with obj.store() as store, store.read() as conn:
        record = holds.get(conn, held_id)
        if record is None:
            raise NotFound(f"no held post #{held_id}; `listgate held ls` shows them")
        data = conn.execute(sa.select(messages.c.raw).where(
            messages.c.id == record.message_id)).scalar_one()
    if raw:
        sys.stdout.buffer.write(data)
        return
    t = Table(show_header=False)
    for key, value in (("id", str(record.id)), ("from", record.poster),
                       ("subject", record.subject), ("state", record.state.value),
                       ("held", when(record.created_at)), ("expires", when(record.expires_at)),
                       ("score", f"{record.promo_score:.2f}" if record.promo_score is not None
                        else "-"),
                       ("decided", record.describe_decision()
                        if record.state is not HeldState.HELD else "-")):
        t.add_row(key, value)
    out.print(t)
    for reason in record.reasons:
        out.print(f"  - {reason}")
    out.print("")
    out.print(data[:4000].decode("utf-8", "replace"), markup=False)


def _decide(obj: Context, held_id: int, verb: holds.Verb, reason: str, actor: str) -> None:
    config = obj.config()
    templates = Templates(config.paths.templates)
    policies = Policies(config.paths.policies)
    with obj.store() as store, store.write() as conn:
        record = holds.get(conn, held_id)
        if record is None:
            raise NotFound(f"no held post #{held_id}; `listgate held ls` shows them")
        lst = lists.by_id(conn, record.list_id)
        assert lst is not None
        decided = holds.decide(conn, record, verb, actor=actor, note=reason, now=now(), lst=lst,
                               templates=templates,
                               expiry_action=policies.for_list(lst.address).release.expiry_action)
        if decided is None:
            raise Conflict(f"held post #{held_id} was already {record.describe_decision()}")
    when = wake_gateway(obj)  # a notice to the poster may be queued too
    out.print(f"held post #{held_id} is now {decided.state.value}"
              + (f" (the running gateway sends it {when})"
                 if decided.state is HeldState.APPROVED else ""))


def _held_action(verb: holds.Verb, help_text: str, *, reason: bool = False) -> None:
    @click.argument("held_id", type=int)
    @click.option("--as", "actor", default=f"operator ({os.environ.get('USER', 'cli')})",
                  help="Who decides, for the record.")
    @click.pass_obj
    @fail_cleanly
    def command(obj: Context, /, held_id: int, actor: str, **kwargs: Any) -> None:
        _decide(obj, held_id, verb, kwargs.get("reason", ""), actor)

    if reason:
        command = click.option("--reason", default="", help="Told to the poster.")(command)
    held.command(verb.value, help=help_text)(command)


_held_action(holds.Verb.APPROVE, "Send a held post to the list.")
_held_action(holds.Verb.TRUST, "Send it, and do not hold this sender's posts again.")
_held_action(holds.Verb.REJECT, "Do not send it; tell the poster why.", reason=True)
_held_action(holds.Verb.DISCARD, "Drop it without telling the poster.")
_held_action(holds.Verb.BAN, "Drop it, and discard this sender's future posts.")


# -- the promotional rule ------------------------------------------------------------------

@main.group("promo")
def promo_group() -> None:
    """The promotional rule's scorer."""


@promo_group.command("score")
@click.argument("files", metavar="FILE.eml...", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--list", "list_address", help="Score with this list's model and threshold "
                                             "(default: the shipped model, default policy).")
@click.pass_obj
@fail_cleanly
def promo_score(obj: Context, files: tuple[Path, ...], list_address: str | None) -> None:
    """One line per file: path, score (0-1), hold or pass, the signals that fired.

    A folder is scored file by file.
    """
    config = obj.config()
    policies = Policies(config.paths.policies)
    model = promo.load_model()
    chain = policies.default
    if list_address:
        with obj.store() as store, store.read() as conn:
            lst = lists.get(conn, list_address)
            model = learning.Models(model).for_list(conn, lst.id)
        chain = policies.for_list(lst.address)
    threshold = next((s.params.threshold for s in chain.steps if s.rule == "promotional"
                      and isinstance(s.params, PromotionalParams)), None)
    paths = [p for f in files for p in (sorted(f.rglob("*")) if f.is_dir() else [f])
             if p.is_file()]
    for path in paths:
        result = promo.score(path.read_bytes(), model)
        hold = result.promotional if threshold is None else result.probability >= threshold
        verdict = "hold" if hold else "pass"
        fired = "; ".join(f"{s.name}: {s.detail}" for s in result.signals if s.weight > 0)
        print(f"{path}\t{result.probability:.3f}\t{verdict}\t{fired}")


# -- digests ---------------------------------------------------------------------------------

@main.group("digest")
def digest_group() -> None:
    """Digests: preview the open batch, or send it now."""


@digest_group.command("preview")
@click.argument("list_address", metavar="LIST")
@click.option("--format", "fmt", type=click.Choice(["mime", "plain", "html"]), default="mime",
              show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the message here (default: standard output).")
@click.pass_obj
@fail_cleanly
def digest_preview(obj: Context, list_address: str, fmt: str, output: Path | None) -> None:
    """Render the list's open batch as a digest message, without sending anything."""
    from gateway import digest

    config = obj.config()
    templates = Templates(config.paths.templates)
    with obj.store() as store, store.read() as conn:
        lst = lists.get(conn, list_address)
        shown = digest.preview(conn, lst, fmt, templates, public_url=config.web.public_url,
                               now=now())
    if shown is None:
        raise NotFound(f"{lst.address} has no posts waiting for its next digest")
    if output is None:
        sys.stdout.buffer.write(shown.data)
    else:
        output.write_bytes(shown.data)
        err.print(f"wrote {len(shown.data)} bytes ({shown.posts} posts) to {output}")


@digest_group.command("send")
@click.argument("list_address", metavar="LIST")
@click.pass_obj
@fail_cleanly
def digest_send(obj: Context, list_address: str) -> None:
    """Close the list's open batch now; the running gateway sends it to digest members."""
    from gateway import digest

    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        closed = digest.close(conn, lst, now=now(), why="sent by hand (listgate digest send)")
    if not closed:
        raise NotFound(f"{lst.address} has no posts waiting for its next digest")
    out.print(f"{lst.address}: digest closed; the running gateway sends it {wake_gateway(obj)}")


# -- DKIM -------------------------------------------------------------------------------------

@main.group("dkim")
def dkim_group() -> None:
    """Keys that sign everything the gateway sends."""


@dkim_group.command("keygen")
@click.argument("domain")
@click.option("--selector", help="The DKIM selector (default: [dkim] selector).")
@click.option("--bits", type=click.IntRange(2048, 4096), default=2048, show_default=True)
@click.option("--ed25519", is_flag=True, help="An ed25519 key instead (a second signature).")
@click.pass_obj
@fail_cleanly
def dkim_keygen(obj: Context, domain: str, selector: str | None, bits: int,
                ed25519: bool) -> None:
    """Make a signing key for DOMAIN and print the DNS TXT record to publish."""
    from gateway.authentication import keygen

    config = obj.config()
    selector = selector or (config.dkim.ed25519_selector if ed25519 else config.dkim.selector)
    if not selector:
        raise click.UsageError("give --selector (no [dkim] ed25519_selector is configured)")
    # Private like the keys in it: whoever may write here may swap or delete a key.
    config.dkim.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path, record = keygen(addresses.normalise_domain(domain), selector, config.dkim.directory,
                          bits=bits, ed25519=ed25519)
    err.print(f"wrote {path} (mode 0600); publish this record, then restart the gateway:")
    click.echo(record)


# -- bounces ------------------------------------------------------------------------------

@main.group("bounces")
def bounces_group() -> None:
    """Members whose mail bounces: scores, disabled delivery, enabling it again."""


@bounces_group.command("ls")
@click.argument("list_address", metavar="LIST")
@click.pass_obj
@fail_cleanly
def bounces_ls(obj: Context, list_address: str) -> None:
    """LIST's members with a bounce score or with delivery disabled."""
    from gateway import bounces

    with obj.store() as store, store.read() as conn:
        lst = lists.get(conn, list_address)
        found = bounces.members_with_bounces(conn, lst)
    table = Table("member", "score", "last counted bounce", "delivery", "disabled since",
                  "last probe")
    for m in found:
        table.add_row(m.address, f"{m.bounce_score:g}", when(m.bounce_last_at),
                      "enabled" if m.enabled else "disabled", when(m.disabled_at),
                      when(m.probe_sent_at))
    out.print(table)
    out.print(f"{len(found)} member(s) with bounces on {lst.address}")


@bounces_group.command("show")
@click.argument("list_address", metavar="LIST")
@click.argument("address")
@click.pass_obj
@fail_cleanly
def bounces_show(obj: Context, list_address: str, address: str) -> None:
    """A member's bounce score, state and every bounce recorded (also after removal)."""
    from gateway import bounces

    addr = addresses.normalise(address)
    with obj.store() as store, store.read() as conn:
        lst = lists.get(conn, list_address)
        member = lists.find_member(conn, lst.id, [addr])
        events = bounces.events_of(conn, lst, addr)
    if member is None and not events:
        raise NotFound(f"{addr} is not a member of {lst.address} and has no bounces there")
    t = Table(show_header=False)
    t.add_row("member", addr if member else f"{addr} (not a member now)")
    if member is not None:
        t.add_row("score", f"{member.bounce_score:g}")
        t.add_row("last counted bounce", when(member.bounce_last_at))
        t.add_row("delivery", "enabled" if member.enabled else
                  f"disabled since {when(member.disabled_at)}: {member.disabled_reason or '-'}")
        t.add_row("last probe", when(member.probe_sent_at))
    out.print(t)
    table = Table("when", "kind", "source", "counted", "detail")
    for e in events:
        table.add_row(when(e.at), "hard" if e.permanent else "soft", e.source,
                      "yes" if e.counted else "no", e.detail[:120])
    out.print(table)
    out.print(f"{len(events)} bounce(s)")


@bounces_group.command("reset")
@click.argument("list_address", metavar="LIST")
@click.argument("address")
@click.pass_obj
@fail_cleanly
def bounces_reset(obj: Context, list_address: str, address: str) -> None:
    """Enable delivery to a member again and clear their bounce score."""
    from gateway import bounces

    addr = addresses.normalise(address)
    with obj.store() as store, store.write() as conn:
        lst = lists.get(conn, list_address)
        if not bounces.reenable(conn, lst, addr, now=now(), by="listgate bounces reset"):
            raise NotFound(f"{addr} is not a member of {lst.address}")
    out.print(f"{addr}: delivery from {lst.address} enabled, bounce score cleared")
