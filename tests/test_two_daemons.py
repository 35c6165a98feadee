"""Two gateway processes sharing one store: one PostgreSQL (as two machines would run
them), or one SQLite file (as two processes on one machine would).

Each daemon is its own process with its own SMTP port; they share the store, the
link-signing key and the smarthost (one sink). Under load split between the two
ports, every post reaches every member exactly once; digest issues closed by the
size threshold (both fanouts racing), by `listgate digest send`, and by the
schedule coming due in both daemons at once while the CLI closes it too, each go
out exactly once; a post held through one daemon is released by a moderator's
reply through the other, another by `listgate held approve` on the shared store,
and each is delivered once.
"""

from __future__ import annotations

import collections
import email
import email.policy
import re
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from gateway import lists
from gateway.cli import main
from gateway.schema import (
    BatchState,
    Mode,
    RoleName,
    State,
    digest_batches,
    digest_entries,
    held,
    journal,
    outbound,
    work,
)
from gateway.store import Store
from tests.conftest import LIST, MEMBERS
from tests.support import (
    CORE_POLICY,
    REPO,
    GatewayProcess,
    Sink,
    free_port,
    post,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow

DIGEST_MEMBERS = ["d1@example.net", "d2@example.net"]
NEWBIES = ["new1@example.net", "new2@example.net"]
MODERATOR = "mod@mods.example"
FRONT_MTA = "mx.example.org"
RELEASED = ("First, through the first gateway.", "Second, through the second gateway.")
POSTS = 200            # the load, split between the two daemons
DIGEST_MAX_POSTS = 50  # so the load alone closes four issues
NEVER_SOON = "0 0 1 1 *"  # the schedule: the test makes it come due, the calendar does not

# `listgate digest send`, held at the starting line until told to go.
RACER = "import sys; from gateway.cli import main; print('ready', flush=True); " \
        "sys.stdin.readline(); main()"

POLICY = CORE_POLICY + """
[[chain]]
rule = "first-post"
action = "hold"

[release]
# No DNS here for the moderators' DKIM keys: the front MTA's verdict is believed.
authentication = "trusted-ar"
"""


@pytest.fixture
def shared(tmp_path: Path, store: Store, store_url: str) -> str:
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        for address in MEMBERS:
            lists.add_member(conn, lst, address, now=0.0)
            lists.update_standing(conn, lst.id, address, now=0.0, approved=1)
        for address in DIGEST_MEMBERS:
            lists.add_member(conn, lst, address, now=0.0, mode=Mode.DIGEST_PLAIN)
        for address in NEWBIES:
            lists.add_member(conn, lst, address, now=0.0, mode=Mode.NOMAIL)
        lists.add_role(conn, lst, MODERATOR, RoleName.MODERATOR)
        lists.update(conn, lst, digest_schedule=NEVER_SOON, digest_timezone="UTC",
                     digest_max_posts=DIGEST_MAX_POSTS)
    return store_url


@pytest.fixture
def two(tmp_path: Path, shared: str, sink: Sink) -> Iterator[list[tuple[GatewayProcess, int]]]:
    """Both daemons, started; stopped with SIGTERM (which must succeed) at the end."""
    secret = tmp_path / "secret.key"  # one key for both: links made by one verify on the other
    running = []
    try:
        for name in ("gw1", "gw2"):
            port = free_port()
            config = write_config(
                tmp_path / name, smarthost=sink.url, store_url=shared, policy=POLICY,
                listen=[f"smtp://127.0.0.1:{port}"],
                extra='retry_initial = "1s"\nretry_max = "2s"',
                sections=f'[web]\nlisten = "http://127.0.0.1:0"\nsecret_file = "{secret}"\n\n'
                         f'[digest]\ntick = "100ms"\n\n'
                         f'[moderation]\ntrusted_authserv_ids = ["{FRONT_MTA}"]\n')
            running.append((GatewayProcess(config).start(port), port))
        yield running
    finally:
        codes = [gw.terminate() for gw, _port in running if gw.proc and gw.proc.poll() is None]
    assert codes == [0] * len(running)


def cli(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    return result.exit_code, result.output


def send_many(port: int, mids: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for i, mid in enumerate(mids):
            sender = MEMBERS[i % len(MEMBERS)]
            client.sendmail(sender, LIST, post(sender, LIST, f"load {mid}", message_id=mid))


def send_split(ports: list[int], mids: list[str]) -> None:
    """Two client threads per daemon, the posts dealt out between all four."""
    shares = [(ports[i % len(ports)], mids[i::2 * len(ports)]) for i in range(2 * len(ports))]
    errors: list[BaseException] = []

    def send(port: int, share: list[str]) -> None:
        try:
            send_many(port, share)
        except BaseException as exc:  # surfaced below: a post that got no 250
            errors.append(exc)

    threads = [threading.Thread(target=send, args=s) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def idle(store: Store) -> bool:
    with store.read() as conn:
        return all(conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one() == 0
                   for t in (work, outbound))


def open_posts(store: Store) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(digest_batches.c.posts),
                                                             0))
                                .where(digest_batches.c.state == BatchState.OPEN.value))
                   .scalar_one())


def batches(store: Store) -> list[tuple[str, int]]:
    with store.read() as conn:
        return [(r.state, r.posts) for r in conn.execute(
            sa.select(digest_batches).where(digest_batches.c.posts > 0)
            .order_by(digest_batches.c.id))]


def event_count(store: Store, event: str) -> int:
    with store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(journal)
                                .where(journal.c.event == event)).scalar_one())


def parsed(sink: Sink, rcpt: str) -> list[email.message.EmailMessage]:
    return [email.message_from_bytes(d, policy=email.policy.default)
            for r, d in sink.handler.copies() if r == rcpt]


def copies_by_message_id(sink: Sink) -> collections.Counter[tuple[str, str]]:
    counter: collections.Counter[tuple[str, str]] = collections.Counter()
    for rcpt, data in sink.handler.copies():
        if rcpt in MEMBERS:
            counter[(str(email.message_from_bytes(data)["Message-ID"]), rcpt)] += 1
    return counter


def held_ids(store: Store) -> list[int]:
    with store.read() as conn:
        return list(conn.execute(sa.select(held.c.id).where(held.c.state == "held")
                                 .order_by(held.c.id)).scalars())


def hold(port: int, sink: Sink, newbie: str, body: str) -> str:
    """A newcomer's first post through this daemon; returns the confirm address from
    the moderator's notice (which encloses the post)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(newbie, LIST, post(newbie, LIST, "Hello from a newcomer", body))

    def notices() -> list[email.message.EmailMessage]:
        return [m for m in parsed(sink, MODERATOR)
                if m["Reply-To"] and body.strip() in m.as_string()]

    wait_until(lambda: bool(notices()), what=f"the moderator's notice of {newbie}'s post")
    assert len(notices()) == 1
    reply_to = str(notices()[0]["Reply-To"])
    assert re.fullmatch(r"discuss-confirm\+[a-z2-7]{32}@example\.org", reply_to), reply_to
    return reply_to


def copies_of(sink: Sink, text: str) -> collections.Counter[str]:
    return collections.Counter(r for r, d in sink.handler.copies() if text.encode() in d)


@pytest.mark.parametrize("store_url", [
    "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_two_daemons_share_one_store_without_loss_or_duplicates(
        two: list[tuple[GatewayProcess, int]], sink: Sink, store: Store) -> None:
    (gw1, port1), (gw2, port2) = two
    config = gw1.config_path

    # -- load, split between the two daemons; both fanouts race on the open digest batch
    mids = [f"<two.{i}@example.net>" for i in range(POSTS)]
    send_split([port1, port2], mids)
    wait_until(lambda: idle(store) and sum(copies_by_message_id(sink).values())
               >= POSTS * len(MEMBERS), timeout=60, what="the load delivered")
    copies = copies_by_message_id(sink)
    assert set(copies) == {(mid, rcpt) for mid in mids for rcpt in MEMBERS}
    assert max(copies.values()) == 1, [k for k, n in copies.items() if n > 1][:5]
    wait_until(lambda: batches(store) == [("sent", DIGEST_MAX_POSTS)] * 4,
               what="four issues closed by the size threshold, and sent")
    # Both daemons did the work: neither idled while the other delivered everything.
    for gw in (gw1, gw2):
        assert "INFO gateway.delivery: delivered" in gw.log.read_text()

    # -- a post held through one daemon, released by a reply through the other
    confirm = hold(port1, sink, NEWBIES[0], RELEASED[0] + "\n")
    approval = post(MODERATOR, confirm, "Re: held", "approve\n", extra_headers=(
        f"Authentication-Results: {FRONT_MTA}; dkim=pass header.d=mods.example; "
        "dmarc=pass header.from=mods.example\r\n"))
    with smtplib.SMTP("127.0.0.1", port2, timeout=30) as client:
        client.sendmail(MODERATOR, confirm, approval)
    # -- and one held through the second, released with the CLI on the shared store
    hold(port2, sink, NEWBIES[1], RELEASED[1] + "\n")
    wait_until(lambda: len(held_ids(store)) == 1, what="the first release")
    code, output = cli(config, "held", "approve", str(held_ids(store)[0]))
    assert code == 0, output
    wait_until(lambda: all(copies_of(sink, t)[m] for t in RELEASED for m in MEMBERS),
               what="both released posts delivered")
    assert held_ids(store) == []

    # -- an issue closed by `listgate digest send` (with the two released posts in it)
    mids2 = [f"<two.b{i}@example.net>" for i in range(10)]
    send_split([port1, port2], mids2)
    wait_until(lambda: open_posts(store) == len(mids2) + 2, what="the posts in the open batch")
    code, output = cli(config, "digest", "send", LIST)
    assert code == 0, output

    # -- the schedule comes due in both daemons while an operator closes it by hand
    mids3 = [f"<two.c{i}@example.net>" for i in range(10)]
    send_split([port1, port2], mids3)
    wait_until(lambda: open_posts(store) == len(mids3), what="the posts in the open batch")
    # The CLI is started and waits, imported, for a go; then it and the schedule's due
    # time are let loose together, and each daemon's tick (100 ms) and the CLI race.
    by_hand = subprocess.Popen(
        [sys.executable, "-c", RACER, "--config", str(config), "digest", "send", LIST],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert by_hand.stdin is not None and by_hand.stdout is not None
    assert by_hand.stdout.readline() == b"ready\n"
    by_hand.stdin.write(b"go\n")
    by_hand.stdin.flush()
    with store.write() as conn:
        lists.update(conn, lists.get(conn, LIST), digest_next_at=time.time() - 1)
    output_bytes, _ = by_hand.communicate(timeout=60)
    # Whoever won, the loser found nothing to close: 0 (the CLI won) or 1 ("no posts").
    assert by_hand.returncode in (0, 1), output_bytes
    wait_until(lambda: idle(store) and open_posts(store) == 0 and batches(store) == [
        ("sent", DIGEST_MAX_POSTS)] * 4 + [("sent", len(mids2) + 2), ("sent", len(mids3))],
               what="six issues, each sent")

    assert event_count(store, "digest-closed") == 6
    assert event_count(store, "digest-sent") == 6
    with store.read() as conn:
        entries = conn.execute(sa.select(digest_entries.c.message_id)).scalars().all()
    assert len(entries) == len(set(entries)) == POSTS + len(mids2) + 2 + len(mids3)
    for member in DIGEST_MEMBERS:
        subjects = collections.Counter(str(m["Subject"]) for m in parsed(sink, member))
        assert subjects == {f"Discuss Digest, Vol 1, Issue {n}": 1 for n in range(1, 7)}
    copies = copies_by_message_id(sink)
    assert max(copies.values()) == 1
    for text in RELEASED:
        # each member's copy, and the moderator's notice (which encloses the held post)
        counts = copies_of(sink, text)
        assert {a: counts[a] for a in [*MEMBERS, MODERATOR]} == dict.fromkeys(
            [*MEMBERS, MODERATOR], 1)
    with store.read() as conn:
        parked = conn.execute(sa.select(sa.func.count()).select_from(outbound).where(
            outbound.c.state == State.PARKED.value)).scalar_one()
    assert parked == 0
