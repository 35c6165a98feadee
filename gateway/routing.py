"""The route table: which role an address plays for which list, and why.

Routes are an explicit literal, tried in order; each is a readable pattern with
named captures. The plain list address comes last, and list names may not end
in a reserved suffix, so no address can mean two things.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

from gateway import addresses
from gateway.errors import AddressError


class Role(enum.Enum):
    """What mail to a list address is for."""

    POST = "post"
    REQUEST = "request"
    JOIN = "join"
    LEAVE = "leave"
    OWNER = "owner"
    CONFIRM = "confirm"
    BOUNCES = "bounces"


class Stage(enum.Enum):
    """The stages that take work from the store; the value names the queue."""

    MODERATION = "moderation"
    COMMANDS = "commands"
    OWNER = "owner"
    BOUNCES = "bounces"
    FANOUT = "fanout"
    DELIVERY = "delivery"
    DIGEST = "digest"
    # Moves posts from the intake spool into the store (SQLite); it has no work rows.
    INTAKE = "intake"


@dataclass(frozen=True)
class Route:
    role: Role
    pattern: str
    stage: Stage
    purpose: str

    def match(self, local: str) -> re.Match[str] | None:
        # Suffixes match in any case; captures keep theirs (tokens are case-sensitive).
        return _compiled(self.pattern).fullmatch(local)


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


ROUTES: tuple[Route, ...] = (
    Route(Role.REQUEST, r"(?P<list>.+)-request", Stage.COMMANDS,
          "commands in the subject or body: subscribe, set digest, help, ..."),
    Route(Role.JOIN, r"(?P<list>.+)-(?:join|subscribe)", Stage.COMMANDS,
          "subscribe, confirmed by reply"),
    Route(Role.LEAVE, r"(?P<list>.+)-(?:leave|unsubscribe)", Stage.COMMANDS,
          "unsubscribe, confirmed by reply"),
    Route(Role.OWNER, r"(?P<list>.+)-owner", Stage.OWNER,
          "forwarded to the list's owners"),
    # A list name never holds '+': what follows the first '+' is the route's detail,
    # whatever it contains (a VERP-encoded member may hold "-bounces+" itself).
    Route(Role.CONFIRM, r"(?P<list>[^+]+)-confirm\+(?P<detail>[A-Za-z0-9_-]{16,128})",
          Stage.COMMANDS,
          "replies to confirmations and to held-message notices"),
    Route(Role.BOUNCES, r"(?P<list>[^+]+)-bounces(?:\+(?P<detail>.+))?", Stage.BOUNCES,
          "delivery status notifications, VERP-encoded"),
    Route(Role.POST, r"(?P<list>.+)", Stage.MODERATION,
          "a post to the list"),
)

RESERVED_SUFFIXES = ("-request", "-join", "-subscribe", "-leave", "-unsubscribe",
                     "-owner", "-confirm", "-bounces")


@dataclass(frozen=True)
class ListRef:
    """The identity of a list, enough to route to it."""

    id: int
    name: str
    domain: str

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


@dataclass(frozen=True)
class Hit:
    """An address that routes to a list."""

    address: str
    route: Route
    mailing_list: ListRef
    detail: str | None

    @property
    def reason(self) -> str:
        return (f"{self.route.role.value} route of list {self.mailing_list.address} "
                f"(pattern {self.route.pattern!r}): {self.route.purpose}")


@dataclass(frozen=True)
class Miss:
    """An address that routes nowhere; the reason says why."""

    address: str
    reason: str


def list_name_is_free(name: str) -> str | None:
    """Why ``name`` cannot be a list name, or None if it can."""
    for suffix in RESERVED_SUFFIXES:
        if name.endswith(suffix):
            return (f"list names may not end in {suffix!r}: "
                    f"it would clash with the {suffix[1:]} address")
    return None


class Router:
    """Resolves recipient addresses against the route table and the known lists."""

    def __init__(self, find_list: Callable[[str, str], ListRef | None],
                 *, serves_domain: Callable[[str], bool]) -> None:
        self._find_list = find_list
        self._serves_domain = serves_domain

    def resolve(self, address: str) -> Hit | Miss:
        try:
            local, domain = addresses.split(address)
        except AddressError as exc:
            return Miss(address, str(exc))
        if not self._serves_domain(domain):
            return Miss(address, f"no list is served at {domain}; the gateway never relays")
        for route in ROUTES:
            m = route.match(local)
            if m is None:
                continue
            found = self._find_list(m.group("list").lower(), domain)
            if found is not None:
                return Hit(address, route, found, m.groupdict().get("detail"))
        return Miss(address, f"{local!r} is neither a list nor a list's -request, -join, -leave, "
                             f"-owner, -confirm+TOKEN or -bounces address at {domain}")
