"""The `listgate` command, run in-process with click's CliRunner on a real store."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from gateway import journal, lists
from gateway.cli import EXAMPLE_LIST, main
from gateway.clock import SystemClock
from gateway.routing import ROUTES, Stage
from gateway.schema import Mode, RoleName, State, messages, outbound, work
from gateway.store import Store, doorbell_path
from gateway.worker import Doorbell, ring
from tests.helpers_unit import add_rows

LIST = "news@example.org"


def run(config: Path, *args: str) -> Result:
    # A wide terminal, so that rich does not wrap or cut table cells.
    result = CliRunner().invoke(main, ["--config", str(config), *args],
                                env={"COLUMNS": "250", "LISTGATE_CONFIG": None})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def ok(config: Path, *args: str) -> str:
    result = run(config, *args)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def fails(config: Path, *args: str, code: int = 1) -> str:
    """Run a command that must fail; returns what it said on stderr."""
    result = run(config, *args)
    assert result.exit_code == code, (args, result.exit_code, result.output)
    return " ".join(result.stderr.split())  # rich may wrap long messages


def write_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "etc" / "listgate.toml"
    path.parent.mkdir()
    path.write_text(f'[store]\nurl = "{url}"\n', encoding="utf-8")
    return path


def initialise(config: Path) -> Path:
    ok(config, "init")
    ok(config, "lists", "create", LIST, "--owner", "owner@example.net")
    return config


# Most commands are the same whatever the database (the store's own tests cover both);
# those whose SQL differs run on SQLite and PostgreSQL (`store_url`).

@pytest.fixture
def config(tmp_path: Path, store_url: str) -> Path:
    """A configuration file for an empty, never initialised store: SQLite and PostgreSQL."""
    return write_config(tmp_path, store_url)


@pytest.fixture
def ready_any(config: Path) -> Path:
    """An initialised store with one list, on SQLite and on PostgreSQL."""
    return initialise(config)


@pytest.fixture
def ready(tmp_path: Path) -> Path:
    """An initialised SQLite store (relative to the config file) with one list."""
    return initialise(write_config(tmp_path, "sqlite:///listgate.db"))


@pytest.fixture
def store(ready_any: Path, store_url: str) -> Iterator[Store]:  # shadows conftest's: same db
    s = Store(store_url, clock=SystemClock())
    yield s
    s.dispose()


def cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]]
            for line in table.splitlines() if line.startswith("│")]


def member_lines(config: Path, *args: str, list_address: str = LIST) -> list[list[str]]:
    """`members ls` output as [address, mode, name?] (rich prints the tabs as spaces)."""
    out = ok(config, "members", "ls", list_address, *args)
    return [line.split(None, 2) for line in out.splitlines()]


def role_lines(config: Path, list_address: str = LIST) -> list[list[str]]:
    return sorted(line.split() for line in ok(config, "roles", "ls", list_address).splitlines())


# -- set-up ---------------------------------------------------------------------------

def test_cli_init_writes_a_config_and_store_and_is_idempotent(tmp_path: Path) -> None:
    config = tmp_path / "new" / "listgate.toml"
    first = ok(config, "init")
    assert f"wrote {config}" in first
    assert "store ready" in first
    assert config.is_file()
    assert (config.parent / "listgate.db").is_file()  # relative to the config, not the cwd
    text = config.read_text()
    second = ok(config, "init")
    assert "wrote" not in second and "store ready" in second
    assert config.read_text() == text
    status = ok(config, "db", "status")
    assert "run `listgate db upgrade`" not in status


def test_cli_init_example_creates_a_list_once(tmp_path: Path) -> None:
    config = tmp_path / "listgate.toml"
    out = ok(config, "init", "--example")
    assert f"created {EXAMPLE_LIST}" in out
    again = ok(config, "init", "--example")
    assert f"example list {EXAMPLE_LIST} already exists" in again
    assert member_lines(config, list_address=EXAMPLE_LIST) == [
        ["alice@example.net", "regular", "Alice"], ["bob@example.net", "regular", "Bob"],
        ["carol@example.net", "regular", "Carol"]]
    assert role_lines(config, EXAMPLE_LIST) == [["alice@example.net", "moderator"],
                                                ["alice@example.net", "owner"]]


def test_cli_store_never_initialised_says_what_to_run(config: Path) -> None:
    for args in (("lists", "ls"), ("members", "ls", LIST), ("queue", "ls"),
                 ("routes", "--test", LIST)):
        said = fails(config, *args)
        assert "error:" in said
        assert "listgate db upgrade" in said and "listgate init" in said, said


def test_cli_db_status_and_upgrade(config: Path, store_url: str) -> None:
    empty = Store(store_url, clock=SystemClock())
    try:
        _current, head = empty.revisions()
    finally:
        empty.dispose()
    status = run(config, "db", "status")
    assert status.exit_code == 1
    assert f"store revision none; newest {head} -- run `listgate db upgrade`" in " ".join(
        status.stdout.split())
    assert f"store at revision {head}" in ok(config, "db", "upgrade")
    assert f"store revision {head}; newest {head}" in ok(config, "db", "status")
    assert f"store at revision {head}" in ok(config, "db", "upgrade")  # again: no change
    ok(config, "lists", "ls")


def test_cli_missing_config_named_explicitly(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    said = fails(missing, "lists", "ls")
    assert f"no such configuration file; create one with `listgate --config {missing} init`" \
        in said


def test_cli_bad_config_is_reported_cleanly(tmp_path: Path) -> None:
    config = tmp_path / "listgate.toml"
    config.write_text("[delivery]\nsmart_host = 'x'\n")
    said = fails(config, "lists", "ls")
    assert said.startswith("error:")
    assert str(config) in said and "unknown key 'smart_host'" in said


@pytest.mark.parametrize("text, expected", [
    ("[delivery]\nsmart_host = 'x'\n", "unknown key 'smart_host' in [delivery]"),
    ("[stor]\n", "unknown section [stor]"),
    ("[delivery]\nsmarthost = 'nonsense'\n", "[delivery] smarthost 'nonsense' must look like"),
])
def test_cli_error_messages_keep_square_brackets(tmp_path: Path, text: str,
                                                 expected: str) -> None:
    config = tmp_path / "listgate.toml"
    config.write_text(text)
    assert expected in fails(config, "lists", "ls")


# -- lists --------------------------------------------------------------------------------

REFUSED = [
    ("bad name@example.org", "not accepted"),
    ("-dash@example.org", "a list name is 1-64"),
    ("under_@example.org", "a list name is 1-64"),
    ("x" * 65 + "@example.org", "a list name is 1-64"),
    ("plain@localhost", "not a valid domain name"),
    ("nodomain", "not of the form local@domain"),
    ('"quoted"@example.org', "quoted local parts are not accepted"),
    ("news-request@example.org", "list names may not end in '-request'"),
    ("news-subscribe@example.org", "list names may not end in '-subscribe'"),
    ("news-owner@example.org", "list names may not end in '-owner'"),
    ("news-bounces@example.org", "list names may not end in '-bounces'"),
    ("news-confirm@example.org", "list names may not end in '-confirm'"),
    (LIST, f"list {LIST} already exists"),
    ("NEWS@EXAMPLE.ORG", f"list {LIST} already exists"),
]


def test_cli_lists_create_refuses(ready: Path) -> None:
    for address, why in REFUSED:
        said = fails(ready, "lists", "create", "--", address)
        assert "error:" in said and why in said, (address, said)
    assert len(cells(ok(ready, "lists", "ls"))) == 1


def test_cli_lists_create_ls_show(ready_any: Path) -> None:
    ready = ready_any
    out = ok(ready, "lists", "create", "Python-Dev@Example.ORG", "--name", "Python Dev",
             "--description", "Core development", "--prefix", "", "--archive-url",
             "https://example.org/archive/", "--owner", "guido@example.net",
             "--owner", "barry@example.net")
    assert "created python-dev@example.org" in out
    ok(ready, "members", "add", "python-dev@example.org", "a@example.net", "b@example.net")
    ok(ready, "members", "add", "python-dev@example.org", "c@example.net", "--mode",
       "digest-plain")
    ok(ready, "members", "add", "python-dev@example.org", "d@example.net", "--mode", "nomail")
    table = ok(ready, "lists", "ls")
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in table.splitlines() if line.startswith("│")}
    assert rows["python-dev@example.org"] == ["Python Dev", "4", "2", "1", "1"]
    assert rows[LIST] == ["News", "0", "0", "0", "0"]
    show = ok(ready, "lists", "show", "python-dev@example.org")
    for text in ("Python Dev", "Core development", "<python-dev.example.org>",
                 "https://example.org/archive/", "barry@example.net, guido@example.net",
                 "1 digest-plain, 1 nomail, 2 regular"):
        assert text in show, text
    news = ok(ready, "lists", "show", LIST)
    assert "[News]" in news and "owner@example.net" in news
    said = fails(ready, "lists", "show", "nosuch@example.org")
    assert "no list nosuch@example.org" in said


def test_cli_lists_delete_needs_yes(ready: Path) -> None:
    result = run(ready, "lists", "delete", LIST)
    assert result.exit_code == 2
    assert "add --yes to do it" in " ".join(result.output.split())
    ok(ready, "lists", "show", LIST)
    ok(ready, "members", "add", LIST, "a@example.net")
    assert f"deleted {LIST}" in ok(ready, "lists", "delete", LIST, "--yes")
    assert "no list" in fails(ready, "lists", "show", LIST)
    assert "no list" in fails(ready, "lists", "delete", LIST, "--yes")
    ok(ready, "lists", "create", LIST)  # the name is free again, with no members
    assert member_lines(ready) == []


# -- members ---------------------------------------------------------------------------

def test_cli_members_add_ls_remove(ready: Path) -> None:
    out = ok(ready, "members", "add", LIST, "Alice@Example.NET", "bob@example.net")
    assert f"added alice@example.net to {LIST} (regular)" in out
    ok(ready, "members", "add", LIST, "carol@example.net", "--name", "Carol C",
       "--mode", "digest-mime")
    assert member_lines(ready) == [["alice@example.net", "regular"],
                                   ["bob@example.net", "regular"],
                                   ["carol@example.net", "digest-mime", "Carol C"]]
    assert member_lines(ready, "--mode", "digest-mime") == [
        ["carol@example.net", "digest-mime", "Carol C"]]
    assert "already a member" in fails(ready, "members", "add", LIST, "ALICE@example.net")
    assert "not accepted" in fails(ready, "members", "add", LIST, "al ice@example.net")
    assert "no list" in fails(ready, "members", "add", "nosuch@example.org", "x@example.net")
    fails(ready, "members", "add", LIST, "x@example.net", "--mode", "weekly", code=2)
    out = ok(ready, "members", "remove", LIST, "BOB@example.net")
    assert f"removed bob@example.net from {LIST}" in out
    assert "is not a member" in fails(ready, "members", "remove", LIST, "bob@example.net")
    assert [m[0] for m in member_lines(ready)] == ["alice@example.net", "carol@example.net"]


def test_cli_members_add_reports_only_what_it_added(ready: Path) -> None:
    ok(ready, "members", "add", LIST, "old@example.net")
    result = run(ready, "members", "add", LIST, "new@example.net", "old@example.net")
    assert result.exit_code == 1
    assert "old@example.net is already a member" in result.stderr
    # One bad address adds nobody, and nobody is reported as added.
    assert "added" not in result.stdout
    assert [m[0] for m in member_lines(ready)] == ["old@example.net"]


def test_cli_members_import_csv(ready_any: Path, tmp_path: Path) -> None:
    ready = ready_any
    ok(ready, "members", "add", LIST, "already@example.net")
    csv_file = tmp_path / "members.csv"
    csv_file.write_text(
        "address,name,mode\n"                       # 1: header
        "ann@example.net,Ann Example,regular\n"     # 2
        "ben@example.net,\"Ben, Jr.\",digest-mime\n"  # 3
        "not an address,Nobody,regular\n"           # 4: bad address
        "cat@example.net,Cat,weekly\n"              # 5: bad mode
        "\n"                                        # 6: blank
        "# a comment\n"                             # 7
        "dan@example.net\n"                         # 8: address only -> default mode
        "ALREADY@example.net,Dup,regular\n"         # 9: already a member
        "ann@example.net,Ann Again,nomail\n"        # 10: twice in the file
        "eve@example.net,Eve,nomail\n",             # 11
        encoding="utf-8")
    result = run(ready, "members", "import", LIST, str(csv_file), "--mode", "digest-plain")
    assert result.exit_code == 0, result.output
    err = result.stderr
    assert f"{csv_file}:4: skipped:" in err and "not an address" in err
    assert f"{csv_file}:5: skipped: unknown mode 'weekly'" in err
    assert ":2:" not in err and ":8:" not in err
    summary = " ".join(result.stdout.split())
    # ann twice in the file counts once (her first row wins); already@ was there before.
    assert f"imported 4 new members into {LIST}; 1 were already members; 2 rows skipped" \
        in summary
    assert member_lines(ready) == [
        ["already@example.net", "regular"],
        ["ann@example.net", "regular", "Ann Example"],
        ["ben@example.net", "digest-mime", "Ben, Jr."],
        ["dan@example.net", "digest-plain"],
        ["eve@example.net", "nomail", "Eve"],
    ]


def test_cli_members_import_without_header_and_all_bad(ready: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    good.write_text("\ufeffzed@example.net,Zed\n")  # a byte-order mark, as Excel writes
    assert "imported 1 new members" in ok(ready, "members", "import", LIST, str(good))
    bad = tmp_path / "bad.csv"
    bad.write_text("address\nnope\nalso nope@x\n")
    said = fails(ready, "members", "import", LIST, str(bad))
    assert f"{bad}:2: skipped" in said and f"{bad}:3: skipped" in said
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("j\xfcrgen@example.net,J\xfcrgen\n".encode("latin-1"))
    assert "not UTF-8 text" in fails(ready, "members", "import", LIST, str(latin1))


# -- roles -------------------------------------------------------------------------------

def test_cli_roles_add_ls_remove(ready: Path) -> None:
    assert f"mod@example.net is now a moderator of {LIST}" in ok(
        ready, "roles", "add", LIST, "MOD@example.net", "moderator")
    ok(ready, "roles", "add", LIST, "mod@example.net", "owner")
    assert role_lines(ready) == [["mod@example.net", "moderator"], ["mod@example.net", "owner"],
                                 ["owner@example.net", "owner"]]
    assert "already a moderator" in fails(ready, "roles", "add", LIST, "mod@example.net",
                                          "moderator")
    fails(ready, "roles", "add", LIST, "mod@example.net", "admin", code=2)
    assert "no longer a owner" in ok(ready, "roles", "remove", LIST, "mod@example.net", "owner")
    assert "is not a owner" in fails(ready, "roles", "remove", LIST, "mod@example.net", "owner")
    assert role_lines(ready) == [["mod@example.net", "moderator"],
                                 ["owner@example.net", "owner"]]


# -- routes ---------------------------------------------------------------------------------

def test_cli_routes_table(ready: Path) -> None:
    table = ok(ready, "routes")
    for route in ROUTES:
        assert route.pattern in table
        assert route.stage.value in table


@pytest.mark.parametrize("address, role, stage, detail", [
    (LIST, "post", "moderation", None),
    ("news-request@example.org", "request", "commands", None),
    ("NEWS-leave@Example.org", "leave", "commands", None),
    ("news-owner@example.org", "owner", "owner", None),
    ("news-confirm+Abcdefghijklmnop_-12@example.org", "confirm", "commands",
     "Abcdefghijklmnop_-12"),
    ("news-bounces+bob=example.net@example.org", "bounces", "bounces", "bob=example.net"),
])
def test_cli_routes_test_hit(ready: Path, address: str, role: str, stage: str,
                             detail: str | None) -> None:
    out = " ".join(ok(ready, "routes", "--test", address).split())
    assert f"{address}: {role} -> stage {stage}" in out
    assert f"because: {role} route of list {LIST}" in out
    assert "250 2.1.5" in out
    assert (f"detail: {detail}" in out) == (detail is not None)


@pytest.mark.parametrize("address, reason", [
    ("nosuch@example.org", "'nosuch' is neither a list"),
    ("news@elsewhere.example", "no list is served at elsewhere.example"),
    ("news-confirm+short@example.org", "'news-confirm+short' is neither a list"),
    ("news%x@example.org", "the local part has characters that are not accepted"),
])
def test_cli_routes_test_miss(ready: Path, address: str, reason: str) -> None:
    result = run(ready, "routes", "--test", address)
    assert result.exit_code == 1
    out = " ".join(result.stdout.split())
    assert f"{address}: no route -- intake answers RCPT with 550 5.1.1" in out
    assert f"because: {reason}" in out or f"because: {address!r}: {reason}" in out, out


# -- the queue --------------------------------------------------------------------------------

@pytest.fixture
def queued(store: Store) -> dict[str, int]:
    """A post with its journal, one moderation row and one outbound row for it."""
    now = SystemClock().now()
    with store.write() as conn:
        lst = lists.get(conn, LIST)
        msg_id = conn.execute(messages.insert().values(
            received_at=now, mail_from="alice@example.net", rcpt_tos=LIST, peer="192.0.2.1",
            helo="mx.example.net", protocol="smtp", size=5, message_id="<q1@example.net>",
            raw=b"x\r\n").returning(messages.c.id)).scalar_one()
        journal.record(conn, now=now, stage=Stage.MODERATION, event="accept",
                       message_id=msg_id, list_id=lst.id, detail="no rule hit")
        [work_id] = add_rows(conn, work, 1, due_at=now, message_id=msg_id, list_id=lst.id,
                             address=LIST)
        [out_id] = add_rows(conn, outbound, 1, due_at=now, message_id=msg_id, list_id=lst.id,
                            recipients="a@example.net\nb@example.net", rcpt_count=2)
    return {"message": msg_id, "work": work_id, "outbound": out_id}


def test_cli_queue_ls_and_show(ready_any: Path, queued: dict[str, int]) -> None:
    ready = ready_any
    out = ok(ready, "queue", "ls")
    rows = cells(out)
    refs = {r[0]: r for r in rows}
    assert set(refs) == {f"delivery/{queued['outbound']}", f"moderation/{queued['work']}"}
    assert refs[f"delivery/{queued['outbound']}"][1:4] == ["ready", "post to 2 rcpt(s)",
                                                          str(queued["message"])]
    assert refs[f"moderation/{queued['work']}"][1:3] == ["ready", f"post to {LIST}"]
    assert out.strip().endswith("2 ready")
    assert "the queue is empty" in ok(ready, "queue", "ls", "--state", "parked")
    assert [r[0] for r in cells(ok(ready, "queue", "ls", "--stage", "delivery"))] == [
        f"delivery/{queued['outbound']}"]
    show = " ".join(ok(ready, "queue", "show", f"delivery/{queued['outbound']}").split())
    assert "a@example.net" in show and "envelope_from" in show
    assert (f"message {queued['message']}: from <alice@example.net> to {LIST}, 5 bytes, "
            "Message-ID <q1@example.net>") in show
    assert "moderation: accept -- no rule hit" in show
    assert "no queue row delivery/999999" in fails(ready, "queue", "show", "delivery/999999")
    assert "queue ids look like" in run(ready, "queue", "show", "delivery").output
    fails(ready, "queue", "show", "nostage/1", code=2)


def test_cli_queue_park_and_retry(ready_any: Path, store: Store,
                                  queued: dict[str, int]) -> None:
    ready = ready_any
    ref = f"delivery/{queued['outbound']}"
    assert "1 row(s) parked" in ok(ready, "queue", "park", ref, "--why", "poison message")
    parked = cells(ok(ready, "queue", "ls", "--state", "parked"))
    assert [(r[0], r[1], r[-1]) for r in parked] == [(ref, "parked", "poison message")]
    assert "no such queue row" in fails(ready, "queue", "park", "delivery/999999")
    fails(ready, "queue", "retry", code=2)
    # No gateway runs here to ring: the command says the poll will find them.
    assert "1 row(s) due now; the running gateway retries them at its next poll" in ok(
        ready, "queue", "retry", ref)
    with store.read() as conn:
        row = conn.execute(sa.select(outbound).where(outbound.c.id == queued["outbound"])).one()
    assert (row.state, row.attempts) == (State.READY.value, 0)
    assert "not found" in fails(ready, "queue", "retry", "moderation/999999")
    ok(ready, "queue", "park", ref, f"moderation/{queued['work']}")
    assert "2 row(s) due now" in ok(ready, "queue", "retry", "--all-parked")
    assert "the queue is empty" in ok(ready, "queue", "ls", "--state", "parked")


# -- policy ----------------------------------------------------------------------------------

def test_cli_policy_check(ready: Path, tmp_path: Path) -> None:
    assert "ok: " in ok(ready, "policy", "check")
    assert "default.toml" in ok(ready, "policy", "check")
    policies = tmp_path / "policies"
    (policies / "lists").mkdir(parents=True)
    (policies / "default.toml").write_text("[[chain]]\nrule = 'loop'\naction = 'discard'\n")
    (policies / "lists" / f"{LIST}.toml").write_text(
        "[[chain]]\nrule = 'non-member'\naction = 'reject'\nparams = { strict = true }\n")
    text = ready.read_text() + f'[paths]\npolicies = "{policies}"\n'
    ready.write_text(text)
    said = fails(ready, "policy", "check")
    assert str(policies / "lists" / f"{LIST}.toml") in said
    assert "entry 1 (non-member): unknown parameter 'strict'" in said
    (policies / "lists" / f"{LIST}.toml").write_text(
        "[[chain]]\nrule = 'non-member'\naction = 'discard'\n")
    out = ok(ready, "policy", "check")
    assert f"ok: {policies / 'default.toml'}" in out
    assert f"ok: {policies / 'lists' / (LIST + '.toml')}" in out


def test_cli_lists_created_by_the_cli_are_in_the_store(ready_any: Path, store: Store) -> None:
    ready = ready_any
    with store.read() as conn:
        lst = lists.get(conn, LIST)
        assert lists.role_holders(conn, lst.id, RoleName.OWNER) == ["owner@example.net"]
        assert lists.count_members(conn, lst) == {}
    ok(ready, "members", "add", LIST, "m@example.net", "--mode", "digest-html")
    with store.read() as conn:
        assert lists.count_members(conn, lst) == {Mode.DIGEST_HTML: 1}


# -- the doorbell that commands ring --------------------------------------------------------


def test_cli_doorbell_ring_with_nobody_there_is_false(tmp_path: Path) -> None:
    not_a_socket = tmp_path / "db-doorbell"
    not_a_socket.write_text("")
    assert ring(None) is False
    assert ring(tmp_path / "nothing-here") is False
    assert ring(not_a_socket) is False
    assert doorbell_path("postgresql+psycopg://u@h/listgate") is None
    assert doorbell_path(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db-doorbell"


def test_cli_doorbell_wakes_its_gateway_and_only_one_gateway_answers(tmp_path: Path) -> None:
    path = tmp_path / "db-doorbell"
    loop = asyncio.new_event_loop()
    try:
        first = Doorbell.hang(path)
        assert first is not None
        assert path.stat().st_mode & 0o777 == 0o600  # only the owner rings
        rang = asyncio.Event()
        woken: set[Stage] = set()
        first.listen(loop, lambda *stages: (woken.update(stages), rang.set()))
        assert ring(path) is True
        loop.run_until_complete(asyncio.wait_for(rang.wait(), 10))
        assert woken == set(Stage)  # a ring wakes every stage
        assert Doorbell.hang(path) is None  # a second gateway on the store polls
        first.close(loop)
        assert not path.exists()
        assert ring(path) is False
    finally:
        loop.close()


def test_cli_doorbell_a_dead_gateways_bell_is_taken_over_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "db-doorbell"
    loop = asyncio.new_event_loop()
    try:
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        dead.bind(str(path))
        dead.close()  # as a gateway killed with SIGKILL leaves it
        assert ring(path) is False
        bell = Doorbell.hang(path)
        assert bell is not None and ring(path) is True
        # A bell closed after its successor took the path leaves the successor's alone.
        path.unlink()
        successor = Doorbell.hang(path)
        assert successor is not None
        bell.close(loop)
        assert ring(path) is True
        successor.close(loop)
    finally:
        loop.close()


def test_cli_doorbell_on_a_path_too_long_for_a_socket_is_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / ("d" * 120 + "-doorbell")  # unix sockets take at most 107 bytes
    assert Doorbell.hang(path) is None
    assert "cannot be bound" in caplog.text and "next poll" in caplog.text
    assert ring(path) is False
