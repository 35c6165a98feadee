"""The moderation rules: pure functions from a post's facts to a hit or nothing.

A rule takes a ``Post`` (message facts, envelope, sender facts, list) and its
parameters, and returns a ``RuleHit`` naming why, or None. No I/O, no clock,
no mutation: everything a rule needs is gathered beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gateway.decorate import ListIdentity
from gateway.facts import Envelope, MessageFacts, SenderFacts


@dataclass(frozen=True)
class Post:
    message: MessageFacts
    envelope: Envelope
    sender: SenderFacts
    mailing_list: ListIdentity


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


def non_member(post: Post, _params: NoParams) -> RuleHit | None:
    """The poster is not a member (nor a moderator or owner) of the list."""
    if post.sender.member is not None or post.sender.is_moderator or post.sender.is_owner:
        return None
    who = post.message.author or post.envelope.mail_from or "an unknown sender"
    return RuleHit("non-member",
                   f"{who} is not a member of {post.mailing_list.post_address}")


@dataclass(frozen=True)
class RuleSpec:
    """A rule as the policy file names it: its function and its parameter type."""

    name: str
    check: Callable[[Post, Any], RuleHit | None]
    params: type[Any]
    summary: str


RULES: dict[str, RuleSpec] = {
    spec.name: spec for spec in (
        RuleSpec("loop", loop, NoParams,
                 "this list's own List-Id or X-Loop, or Auto-Submitted mail"),
        RuleSpec("non-member", non_member, NoParams,
                 "the poster is not a member, moderator or owner"),
    )
}
