"""The moderation rules: pure functions from a post's facts to a hit or nothing.

A rule takes a ``Post`` (message facts, envelope, sender facts, authentication
and promotional scores, the list) and its parameters, and returns a ``RuleHit``
naming why, or None. No I/O, no clock, no mutation: whatever a rule needs is
gathered beforehand by the moderation stage.

A sender a moderator trusted is not held by the rules about who posts and what
(non-member, first-post, administrivia, max-recipients, promotional); the
technical and security rules still apply to everyone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.authentication import AuthResults
from gateway.facts import Envelope, MessageFacts, SenderFacts
from gateway.identity import ListIdentity
from gateway.promo import PromoScore


@dataclass(frozen=True)
class Post:
    message: MessageFacts
    envelope: Envelope
    sender: SenderFacts
    mailing_list: ListIdentity
    emergency: bool = False
    auth: AuthResults | None = None
    promo: PromoScore | None = None
    first_lines: tuple[str, ...] = ()   # the first few non-empty body lines, for administrivia


@dataclass(frozen=True)
class RuleHit:
    rule: str
    reason: str


@dataclass(frozen=True)
class NoParams:
    """For rules that take no parameters."""


def loop(post: Post, _params: NoParams) -> RuleHit | None:
    """Our own mail coming back, or mail a robot sent automatically."""
    lst = post.mailing_list
    if lst.list_id in post.message.list_ids:
        return RuleHit("loop", f"it carries this list's own List-Id <{lst.list_id}>")
    if lst.post_address in post.message.x_loops:
        return RuleHit("loop", f"it carries this list's own X-Loop: {lst.post_address}")
    auto = post.message.auto_submitted
    if auto and auto != "no":
        return RuleHit("loop", f"it was sent automatically (Auto-Submitted: {auto})")
    return None


@dataclass(frozen=True)
class BannedParams:
    addresses: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()  # regular expressions matched against the whole address

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            re.compile(pattern)  # a bad pattern is a policy error, found at load time


def banned(post: Post, params: BannedParams) -> RuleHit | None:
    """A moderator banned the sender, or the policy names the address or a pattern."""
    who = post.message.author or post.envelope.mail_from
    if post.sender.banned:
        return RuleHit("banned", f"a moderator banned {who} from this list")
    candidates = {a for a in (post.message.author, post.envelope.mail_from.lower()) if a}
    for address in candidates:
        if address in {a.lower() for a in params.addresses}:
            return RuleHit("banned", f"{address} is on the list's ban list")
        for pattern in params.patterns:
            if re.fullmatch(pattern, address, re.IGNORECASE):
                return RuleHit("banned", f"{address} matches the banned pattern {pattern!r}")
    return None


def emergency(post: Post, _params: NoParams) -> RuleHit | None:
    """The list is in emergency moderation: every post waits for a moderator."""
    if post.emergency:
        return RuleHit("emergency", "the list is in emergency moderation")
    return None


@dataclass(frozen=True)
class MaxSizeParams:
    bytes: int = 262144


def max_size(post: Post, params: MaxSizeParams) -> RuleHit | None:
    if post.message.size > params.bytes:
        return RuleHit("max-size", f"it is {post.message.size} bytes; the list's limit is "
                                   f"{params.bytes}")
    return None


@dataclass(frozen=True)
class MaxRecipientsParams:
    count: int = 10


def max_recipients(post: Post, params: MaxRecipientsParams) -> RuleHit | None:
    """Too many addressees in To and Cc: often a mass mailing, not a list post."""
    n = len(set(post.message.to_cc))
    if n > params.count and not post.sender.trusted:
        return RuleHit("max-recipients", f"it is addressed to {n} recipients "
                                         f"(more than {params.count})")
    return None


_COMMANDS = re.compile(
    r"^(subscribe|unsubscribe|signoff|sign-off|remove me|help|set\s+(digest|regular|nomail)"
    r"|who|info|join|leave)\b", re.IGNORECASE)


def administrivia(post: Post, _params: NoParams) -> RuleHit | None:
    """A command meant for LIST-request sent to the whole list instead (Mailman's check)."""
    if post.sender.trusted:
        return None
    lines = [post.message.subject, *post.first_lines[:5]]
    for line in lines:
        m = _COMMANDS.match(line.strip())
        if m and len(post.first_lines) <= 10:
            return RuleHit("administrivia",
                           f"it looks like a {m.group(1).lower()!r} command meant for "
                           f"{post.mailing_list.address('request')}, not a post")
    return None


def non_member(post: Post, _params: NoParams) -> RuleHit | None:
    """The poster is not a member (nor a moderator or owner) of the list."""
    s = post.sender
    if s.member is not None or s.is_moderator or s.is_owner or s.trusted:
        return None
    who = post.message.author or post.envelope.mail_from or "an unknown sender"
    return RuleHit("non-member", f"{who} is not a member of {post.mailing_list.post_address}")


def first_post(post: Post, _params: NoParams) -> RuleHit | None:
    """A member's posts wait for a moderator until one of them has been approved."""
    s = post.sender
    if s.member is None or s.trusted or s.is_moderator or s.is_owner or s.approved > 0:
        return None
    return RuleHit("first-post", f"it is the first post of {s.member.address} to this list")


@dataclass(frozen=True)
class HeaderRegexParams:
    header: str = ""
    pattern: str = ""

    def __post_init__(self) -> None:
        if not self.header or not self.pattern:
            raise ValueError("header-regex needs both header and pattern")
        re.compile(self.pattern)


def header_regex(post: Post, params: HeaderRegexParams) -> RuleHit | None:
    """A header field of the post matches the pattern the list owner set."""
    for value in post.message.headers.get(params.header.lower(), ()):
        if re.search(params.pattern, value, re.IGNORECASE):
            return RuleHit("header-regex", f"its {params.header} matches {params.pattern!r}")
    return None


@dataclass(frozen=True)
class AuthenticationParams:
    require: str = "dmarc"  # "dmarc": hit when DMARC fails; "dkim": hit unless authenticated

    def __post_init__(self) -> None:
        if self.require not in ("dmarc", "dkim"):
            raise ValueError(f"require must be \"dmarc\" or \"dkim\", not {self.require!r}")


def authentication(post: Post, params: AuthenticationParams) -> RuleHit | None:
    """The From domain fails authentication: the sender may be forged."""
    auth = post.auth
    if auth is None:
        return None
    if auth.from_domain is None:
        # No single From domain to check (two addresses, or a From written to hide its
        # domain) while the post still names an author: treat it as what it looks like.
        if post.message.author is not None:
            return RuleHit("authentication", "its From has no single domain that could be "
                                             "checked: the From may be forged")
        return None
    if params.require == "dmarc" and auth.dmarc == "fail":
        return RuleHit("authentication", f"it fails DMARC for {auth.from_domain} "
                                         f"(p={auth.dmarc_policy}): the From may be forged")
    if params.require == "dkim" and not auth.authenticated:
        return RuleHit("authentication", f"no valid DKIM signature of {auth.from_domain}")
    return None


@dataclass(frozen=True)
class PromotionalParams:
    # None: the model's own threshold, chosen by cross-validation when it was trained.
    threshold: float | None = None
    signals: int = 3  # how many signals the reason names

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError("threshold must be between 0 and 1")


def promotional(post: Post, params: PromotionalParams) -> RuleHit | None:
    """The post reads like an advert, by explainable signals and the list's learned model."""
    score = post.promo
    if score is None or post.sender.trusted:
        return None
    held = score.promotional if params.threshold is None else \
        score.probability >= params.threshold
    if not held:
        return None
    named = "; ".join(s.detail for s in score.top(params.signals))
    return RuleHit("promotional", f"it looks promotional (score {score.probability:.2f}"
                                  + (f": {named})" if named else ")"))


@dataclass(frozen=True)
class RuleSpec:
    """A rule as the policy file names it: its function and its parameter type."""

    name: str
    check: Callable[[Post, Any], RuleHit | None]
    params: type[Any]
    summary: str
    needs: frozenset[str] = field(default_factory=frozenset)  # facts to gather first


RULES: dict[str, RuleSpec] = {
    spec.name: spec for spec in (
        RuleSpec("loop", loop, NoParams,
                 "this list's own List-Id or X-Loop, or Auto-Submitted mail"),
        RuleSpec("banned", banned, BannedParams,
                 "a sender moderators banned, or an address or pattern the policy names"),
        RuleSpec("emergency", emergency, NoParams,
                 "the list is in emergency moderation (listgate lists set --emergency on)"),
        RuleSpec("max-size", max_size, MaxSizeParams, "the post is larger than bytes"),
        RuleSpec("max-recipients", max_recipients, MaxRecipientsParams,
                 "more than count addresses in To and Cc"),
        RuleSpec("administrivia", administrivia, NoParams,
                 "a subscribe/unsubscribe/help command sent to the post address",
                 frozenset({"lines"})),
        RuleSpec("non-member", non_member, NoParams,
                 "the poster is not a member, moderator or owner"),
        RuleSpec("first-post", first_post, NoParams,
                 "a member none of whose posts a moderator has approved yet"),
        RuleSpec("header-regex", header_regex, HeaderRegexParams,
                 "a header field matches a regular expression"),
        RuleSpec("authentication", authentication, AuthenticationParams,
                 "the From domain fails DMARC (require=\"dmarc\") or has no valid DKIM "
                 "signature (require=\"dkim\")", frozenset({"auth"})),
        RuleSpec("promotional", promotional, PromotionalParams,
                 "the post reads like an advert (signals and the list's learned model)",
                 frozenset({"promo"})),
    )
}
