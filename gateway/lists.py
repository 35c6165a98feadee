"""Lists, their members and the people who run them (owners, moderators)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import IntegrityError

from gateway import addresses, routing
from gateway.errors import AddressError, Conflict, NotFound
from gateway.identity import ListIdentity
from gateway.schema import Mode, RoleName, lists, members, roles, senders
from gateway.store import Store


@dataclass(frozen=True)
class MailingList:
    id: int
    name: str
    domain: str
    display_name: str
    description: str
    subject_prefix: str
    archive_url: str | None
    created_at: float
    emergency: bool = False
    personalize: bool = True
    digest_schedule: str = "0 7 * * *"
    digest_timezone: str = "UTC"
    digest_max_posts: int = 50
    digest_max_bytes: int = 1_000_000
    digest_next_at: float | None = None
    dmarc_mitigation: str = "rewrite"

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"

    @property
    def identity(self) -> ListIdentity:
        return ListIdentity(self.name, self.domain, self.display_name, self.subject_prefix,
                            self.archive_url)

    @property
    def ref(self) -> routing.ListRef:
        return routing.ListRef(self.id, self.name, self.domain)

    @classmethod
    def from_row(cls, row: Row[tuple[object, ...]]) -> MailingList:
        m = row._mapping
        return cls(m["id"], m["name"], m["domain"], m["display_name"], m["description"],
                   m["subject_prefix"], m["archive_url"], m["created_at"], m["emergency"],
                   m["personalize"], m["digest_schedule"], m["digest_timezone"],
                   m["digest_max_posts"], m["digest_max_bytes"], m["digest_next_at"],
                   m["dmarc_mitigation"])

    def links_base(self, public_url: str) -> str | None:
        """Where this list's per-member links live, or None when links are not personal
        (personalisation off, or no web endpoint)."""
        return f"{public_url}/l/{self.id}" if self.personalize and public_url else None


@dataclass(frozen=True)
class Member:
    id: int
    list_id: int
    address: str
    display_name: str
    mode: Mode
    enabled: bool
    bounce_score: float = 0.0
    bounce_last_at: float | None = None
    disabled_at: float | None = None
    disabled_reason: str | None = None
    probe_sent_at: float | None = None

    @classmethod
    def from_row(cls, row: Row[tuple[object, ...]]) -> Member:
        m = row._mapping
        return cls(m["id"], m["list_id"], m["address"], m["display_name"], Mode(m["mode"]),
                   m["enabled"], m["bounce_score"], m["bounce_last_at"], m["disabled_at"],
                   m["disabled_reason"], m["probe_sent_at"])


def split_list_address(address: str) -> tuple[str, str]:
    local, domain = addresses.split(address)
    name = addresses.check_list_name(local)
    why = routing.list_name_is_free(name)
    if why:
        raise AddressError(f"{address!r}: {why}")
    return name, domain


def create(conn: Connection, address: str, *, now: float, display_name: str | None = None,
           description: str = "", subject_prefix: str | None = None,
           archive_url: str | None = None) -> MailingList:
    name, domain = split_list_address(address)
    display = display_name or name.capitalize()
    prefix = f"[{display}]" if subject_prefix is None else subject_prefix
    try:
        conn.execute(lists.insert().values(
            name=name, domain=domain, display_name=display, description=description,
            subject_prefix=prefix, archive_url=archive_url, created_at=now))
    except IntegrityError:
        raise Conflict(f"list {name}@{domain} already exists") from None
    return get(conn, f"{name}@{domain}")


def get(conn: Connection, address: str) -> MailingList:
    try:
        local, domain = addresses.split(address)
    except AddressError:
        raise NotFound(f"{address!r} is not a list address") from None
    row = conn.execute(sa.select(lists).where(lists.c.name == local.lower(),
                                              lists.c.domain == domain)).first()
    if row is None:
        raise NotFound(f"no list {address}; `listgate lists ls` shows the lists there are")
    return MailingList.from_row(row)


# Statements that every post runs, built once: building a statement costs several times
# what running it does.
_BY_ID = sa.select(lists).where(lists.c.id == sa.bindparam("id"))
_FIND_MEMBER = sa.select(members).where(
    members.c.list_id == sa.bindparam("list_id"),
    members.c.address.in_(sa.bindparam("addresses", expanding=True)))
_ROLES_OF = sa.select(roles.c.role).where(roles.c.list_id == sa.bindparam("list_id"),
                                          roles.c.address == sa.bindparam("address"))
_STANDING = sa.select(senders).where(senders.c.list_id == sa.bindparam("list_id"),
                                     senders.c.address == sa.bindparam("address"))


def by_id(conn: Connection, list_id: int) -> MailingList | None:
    row = conn.execute(_BY_ID, {"id": list_id}).first()
    return MailingList.from_row(row) if row else None


def all_lists(conn: Connection) -> list[MailingList]:
    rows = conn.execute(sa.select(lists).order_by(lists.c.domain, lists.c.name)).all()
    return [MailingList.from_row(r) for r in rows]


def delete(conn: Connection, lst: MailingList) -> None:
    conn.execute(sa.delete(lists).where(lists.c.id == lst.id))


# -- members ------------------------------------------------------------------

def add_member(conn: Connection, lst: MailingList, address: str, *, now: float,
               display_name: str = "", mode: Mode = Mode.REGULAR) -> Member:
    addr = addresses.normalise(address)
    try:
        conn.execute(members.insert().values(
            list_id=lst.id, address=addr, display_name=display_name, mode=mode.value,
            enabled=True, created_at=now))
    except IntegrityError:
        raise Conflict(f"{addr} is already a member of {lst.address}") from None
    member = find_member(conn, lst.id, [addr])
    assert member is not None
    return member


def add_members(conn: Connection, lst: MailingList, rows: Iterable[tuple[str, str, Mode]], *,
                now: float) -> tuple[int, list[str]]:
    """Add many members in one statement; returns (added, addresses already there)."""
    wanted: dict[str, tuple[str, Mode]] = {}
    for address, name, mode in rows:
        wanted.setdefault(addresses.normalise(address), (name, mode))
    if not wanted:
        return 0, []
    # The unique index decides what is new (a lookup first was planned as a scan of the
    # whole list on PostgreSQL while its statistics still said the table was empty).
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)
    statement = insert(members).on_conflict_do_nothing(
        index_elements=[members.c.list_id, members.c.address]).returning(members.c.address)
    added = set(conn.execute(statement, [
        {"list_id": lst.id, "address": a, "display_name": n, "mode": m.value,
         "enabled": True, "created_at": now} for a, (n, m) in wanted.items()]).scalars())
    return len(added), sorted(set(wanted) - added)


def remove_member(conn: Connection, lst: MailingList, address: str) -> None:
    addr = addresses.normalise(address)
    result = conn.execute(sa.delete(members).where(members.c.list_id == lst.id,
                                                   members.c.address == addr))
    if result.rowcount == 0:
        raise NotFound(f"{addr} is not a member of {lst.address}")


def set_mode(conn: Connection, lst: MailingList, address: str, mode: Mode) -> None:
    addr = addresses.normalise(address)
    result = conn.execute(sa.update(members).where(
        members.c.list_id == lst.id, members.c.address == addr).values(mode=mode.value))
    if result.rowcount == 0:
        raise NotFound(f"{addr} is not a member of {lst.address}")


def find_member(conn: Connection, list_id: int, candidates: Iterable[str]) -> Member | None:
    """The first of ``candidates`` (normalised addresses) that is a member, if any."""
    order = [c for c in candidates if c]
    if not order:
        return None
    rows = conn.execute(_FIND_MEMBER, {"list_id": list_id, "addresses": order}).all()
    found = {r.address: Member.from_row(r) for r in rows}
    for c in order:
        if c in found:
            return found[c]
    return None


def member_by_id(conn: Connection, member_id: int) -> Member | None:
    row = conn.execute(sa.select(members).where(members.c.id == member_id)).first()
    return Member.from_row(row) if row else None


def iter_members(conn: Connection, lst: MailingList, *, mode: Mode | None = None,
                 batch: int = 1000) -> Iterator[Member]:
    """Members in address order, fetched a batch at a time (keyset pagination)."""
    last = ""
    while True:
        q = sa.select(members).where(members.c.list_id == lst.id, members.c.address > last)
        if mode is not None:
            q = q.where(members.c.mode == mode.value)
        rows = conn.execute(q.order_by(members.c.address).limit(batch)).all()
        for r in rows:
            yield Member.from_row(r)
        if len(rows) < batch:
            return
        last = rows[-1].address


def count_members(conn: Connection, lst: MailingList) -> dict[Mode, int]:
    rows = conn.execute(sa.select(members.c.mode, sa.func.count()).where(
        members.c.list_id == lst.id).group_by(members.c.mode)).all()
    return {Mode(mode): n for mode, n in rows}


# -- roles ----------------------------------------------------------------------

def add_role(conn: Connection, lst: MailingList, address: str, role: RoleName) -> None:
    addr = addresses.normalise(address)
    try:
        conn.execute(roles.insert().values(list_id=lst.id, address=addr, role=role.value))
    except IntegrityError:
        raise Conflict(f"{addr} is already a {role.value} of {lst.address}") from None


def remove_role(conn: Connection, lst: MailingList, address: str, role: RoleName) -> None:
    addr = addresses.normalise(address)
    result = conn.execute(sa.delete(roles).where(
        roles.c.list_id == lst.id, roles.c.address == addr, roles.c.role == role.value))
    if result.rowcount == 0:
        raise NotFound(f"{addr} is not a {role.value} of {lst.address}")


def role_holders(conn: Connection, list_id: int, role: RoleName) -> list[str]:
    return list(conn.execute(sa.select(roles.c.address).where(
        roles.c.list_id == list_id, roles.c.role == role.value).order_by(roles.c.address)
    ).scalars())


def moderators(conn: Connection, list_id: int) -> list[str]:
    """Who may decide about held posts: moderators and owners."""
    return sorted(set(role_holders(conn, list_id, RoleName.MODERATOR))
                  | set(role_holders(conn, list_id, RoleName.OWNER)))


def set_emergency(conn: Connection, lst: MailingList, on: bool) -> None:
    conn.execute(sa.update(lists).where(lists.c.id == lst.id).values(emergency=on))


SETTINGS = frozenset({"emergency", "personalize", "dmarc_mitigation",
                      "digest_schedule", "digest_timezone",
                      "digest_max_posts", "digest_max_bytes", "digest_next_at",
                      "display_name", "description", "subject_prefix", "archive_url"})


def update(conn: Connection, lst: MailingList, **changes: object) -> None:
    """Change list settings (only the ones named in SETTINGS)."""
    unknown = set(changes) - SETTINGS
    if unknown:
        raise ValueError(f"not list settings: {', '.join(sorted(unknown))}")
    conn.execute(sa.update(lists).where(lists.c.id == lst.id).values(**changes))


def roles_of(conn: Connection, list_id: int, address: str) -> frozenset[RoleName]:
    return frozenset(RoleName(r) for r in conn.execute(
        _ROLES_OF, {"list_id": list_id, "address": address}).scalars())


def has_role(conn: Connection, list_id: int, address: str, *roles_: RoleName) -> bool:
    return conn.execute(sa.select(sa.func.count()).select_from(roles).where(
        roles.c.list_id == list_id, roles.c.address == address,
        roles.c.role.in_([r.value for r in roles_]))).scalar_one() > 0


# -- what moderators decided about senders ---------------------------------------

@dataclass(frozen=True)
class Standing:
    trusted: bool = False
    banned: bool = False
    approved: int = 0
    rejected: int = 0


def standing(conn: Connection, list_id: int, address: str) -> Standing:
    row = conn.execute(_STANDING, {"list_id": list_id, "address": address}).first()
    if row is None:
        return Standing()
    return Standing(row.trusted, row.banned, row.approved, row.rejected)


def update_standing(conn: Connection, list_id: int, address: str, *, now: float,
                    trusted: bool | None = None, banned: bool | None = None,
                    approved: int = 0, rejected: int = 0) -> None:
    """Record a moderator's decision about a sender (created on first use)."""
    values: dict[str, object] = {"updated_at": now,
                                 "approved": senders.c.approved + approved,
                                 "rejected": senders.c.rejected + rejected}
    if trusted is not None:
        values["trusted"] = trusted
    if banned is not None:
        values["banned"] = banned
    where = (senders.c.list_id == list_id, senders.c.address == address)
    if conn.execute(sa.update(senders).where(*where).values(**values)).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(senders.insert().values(
                list_id=list_id, address=address, trusted=bool(trusted), banned=bool(banned),
                approved=approved, rejected=rejected, updated_at=now))
    except IntegrityError:  # another process inserted it first: update theirs
        conn.execute(sa.update(senders).where(*where).values(**values))


def senders_with(conn: Connection, list_id: int, *, trusted: bool | None = None,
                 banned: bool | None = None) -> list[str]:
    q = sa.select(senders.c.address).where(senders.c.list_id == list_id)
    if trusted is not None:
        q = q.where(senders.c.trusted.is_(trusted))
    if banned is not None:
        q = q.where(senders.c.banned.is_(banned))
    return list(conn.execute(q.order_by(senders.c.address)).scalars())


# -- the directory intake routes against ------------------------------------------

class Directory:
    """An in-memory snapshot of which lists exist, so RCPT needs no database I/O.

    Refreshed by the daemon every few seconds, and by intake before it refuses a
    recipient it does not know (at most once a second): a list created by the CLI is
    routable at once.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._lists: dict[tuple[str, str], routing.ListRef] = {}
        self._domains: frozenset[str] = frozenset()

    def refresh(self) -> None:
        with self._store.read() as conn:
            rows = conn.execute(sa.select(lists.c.id, lists.c.name, lists.c.domain)).all()
        found = {(r.name, r.domain): routing.ListRef(r.id, r.name, r.domain) for r in rows}
        with self._lock:
            self._lists = found
            self._domains = frozenset(d for _n, d in found)

    def find(self, name: str, domain: str) -> routing.ListRef | None:
        with self._lock:
            return self._lists.get((name, domain))

    @property
    def domains(self) -> frozenset[str]:
        with self._lock:
            return self._domains

    def serves(self, domain: str) -> bool:
        with self._lock:
            return domain in self._domains

    def router(self) -> routing.Router:
        return routing.Router(self.find, serves_domain=self.serves)
