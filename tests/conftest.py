"""Fixtures: a store on SQLite and on the real PostgreSQL server, a sink, the gateway."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import lists
from gateway.authentication import Signer, keygen, zone_txt_value
from gateway.clock import SystemClock
from gateway.schema import RoleName
from gateway.store import Store
from tests.support import CORE_POLICY, CORPUS, GatewayProcess, Sink, write_config

PG_ADMIN = os.environ.get("LISTGATE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_REQUIRED = os.environ.get("LISTGATE_TEST_POSTGRES", "") == "required"


def _pg_admin() -> object:
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)


@pytest.fixture(autouse=True)
def _no_daemon_outlives_its_test() -> Iterator[None]:
    yield
    GatewayProcess.reap()


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    try:
        conn = _pg_admin()
    except Exception as exc:  # any failure to reach the server means "absent"
        if PG_REQUIRED:
            pytest.fail(f"LISTGATE_TEST_POSTGRES=required but PostgreSQL at {PG_ADMIN} is not "
                        f"reachable: {exc}")
        return False
    conn.close()  # type: ignore[attr-defined]
    return True


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if not request.getfixturevalue("postgres_available"):
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN}: start it, or point "
                    "LISTGATE_TEST_PG at one (these tests create and drop their own database)")
    name = f"listgate_test_{secrets.token_hex(6)}"
    admin = _pg_admin()
    admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[attr-defined]
    base = PG_ADMIN.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[attr-defined]
        admin.close()  # type: ignore[attr-defined]


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = Store(store_url, clock=SystemClock())
    s.upgrade()
    yield s
    s.dispose()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


LIST = "discuss@example.org"
MEMBERS = ["alice@example.net", "bob@example.net", "carol@example.net"]
NEWBIE = "newbie@example.net"  # a member with no approved post yet: their first is held


def discussion_list(store: Store, *, roles: dict[str, RoleName]) -> lists.MailingList:
    """LIST with MEMBERS (each with an approved post already), NEWBIE, and ``roles``."""
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        for address in MEMBERS:
            lists.add_member(conn, lst, address, now=0.0)
            lists.update_standing(conn, lst.id, address, now=0.0, approved=1)
        lists.add_member(conn, lst, NEWBIE, now=0.0)
        for address, role in roles.items():
            lists.add_role(conn, lst, address, role)
    return lst


@pytest.fixture
def config_path(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    """A gateway configuration whose (migrated) store holds an example list."""
    with store.write() as conn:
        lst = lists.create(conn, LIST, now=0.0, display_name="Discuss")
        for address in MEMBERS:
            lists.add_member(conn, lst, address, now=0.0)
        lists.add_role(conn, lst, MEMBERS[0], RoleName.OWNER)
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                        policy=CORE_POLICY)


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared mail corpus is not at {CORPUS}; these tests need it")
    return CORPUS


@dataclass(frozen=True)
class Keys:
    mods: Signer        # the moderators' own domain
    evil: Signer        # a domain the attacker controls, with a perfectly valid key
    members: Signer     # the members' domain (example.net)
    resolver_records: dict[str, list[str]]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("dkim")
    records: dict[str, list[str]] = {}
    signers = {}
    for domain in ("mods.example", "evil.example", "example.net"):
        path, record = keygen(domain, "sel", directory)
        records[f"sel._domainkey.{domain}."] = [zone_txt_value(record)]
        signers[domain] = Signer(domain, "sel", path.read_bytes())
    return Keys(signers["mods.example"], signers["evil.example"], signers["example.net"],
                records)
