"""The rules, table-driven over .eml fixtures: pure functions of gathered facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import promo
from gateway.authentication import AuthResults
from gateway.facts import Envelope, SenderFacts, message_facts
from gateway.identity import ListIdentity
from gateway.lists import Member
from gateway.policy import Action, Chain, Step, decide
from gateway.replytext import own_text
from gateway.rules import (
    RULES,
    AuthenticationParams,
    BannedParams,
    HeaderRegexParams,
    MaxRecipientsParams,
    MaxSizeParams,
    NoParams,
    Post,
    PromotionalParams,
)
from gateway.schema import Mode

FIXTURES = Path(__file__).parent / "fixtures" / "rules"
LIST = ListIdentity("discuss", "example.org", "Discuss", "[Discuss]", None)
BOB = Member(1, 1, "bob@example.net", "Bob", Mode.REGULAR, True)
MEMBER = SenderFacts(BOB, False, False, approved=3)
NEWCOMER = SenderFacts(BOB, False, False, approved=0)
STRANGER = SenderFacts(None, False, False)
TRUSTED_STRANGER = SenderFacts(None, False, False, trusted=True)
BANNED = SenderFacts(BOB, False, False, banned=True, approved=3)
MODEL = promo.load_model()


def make_post(fixture: str, sender: SenderFacts = MEMBER, *, emergency: bool = False,
              auth: AuthResults | None = None) -> Post:
    raw = (FIXTURES / fixture).read_bytes().replace(b"\n", b"\r\n")
    return Post(message_facts(raw), Envelope("bob@example.net", "discuss@example.org"), sender,
                LIST, emergency=emergency, auth=auth, promo=promo.score(raw, MODEL),
                first_lines=tuple(line for line in own_text(raw)[1] if line.strip()))


def auth(dmarc: str, *, aligned: bool = False) -> AuthResults:
    return AuthResults(from_domain="example.net", dkim=(), dkim_aligned_pass=aligned,
                       dmarc_policy="reject", dmarc=dmarc, arc="none", trusted=None)


CASES = [
    # (rule, params, fixture, sender, extra, expected hit?)
    ("loop", NoParams(), "own-list-id.eml", MEMBER, {}, True),
    ("loop", NoParams(), "auto-submitted.eml", MEMBER, {}, True),
    ("loop", NoParams(), "discussion.eml", MEMBER, {}, False),
    ("banned", BannedParams(), "discussion.eml", BANNED, {}, True),
    ("banned", BannedParams(addresses=("BOB@example.net",)), "discussion.eml", MEMBER, {}, True),
    ("banned", BannedParams(patterns=(r".*@example\.net",)), "discussion.eml", MEMBER, {}, True),
    ("banned", BannedParams(patterns=(r"example\.net",)), "discussion.eml", MEMBER, {}, False),
    ("banned", BannedParams(), "discussion.eml", MEMBER, {}, False),
    ("emergency", NoParams(), "discussion.eml", MEMBER, {"emergency": True}, True),
    ("emergency", NoParams(), "discussion.eml", MEMBER, {}, False),
    ("max-size", MaxSizeParams(bytes=100), "discussion.eml", MEMBER, {}, True),
    ("max-size", MaxSizeParams(), "discussion.eml", MEMBER, {}, False),
    ("max-recipients", MaxRecipientsParams(), "many-recipients.eml", MEMBER, {}, True),
    ("max-recipients", MaxRecipientsParams(count=20), "many-recipients.eml", MEMBER, {}, False),
    ("administrivia", NoParams(), "command.eml", MEMBER, {}, True),
    ("administrivia", NoParams(), "command-in-subject.eml", MEMBER, {}, True),
    ("administrivia", NoParams(), "discussion.eml", MEMBER, {}, False),
    ("non-member", NoParams(), "discussion.eml", STRANGER, {}, True),
    ("non-member", NoParams(), "discussion.eml", MEMBER, {}, False),
    ("non-member", NoParams(), "discussion.eml", TRUSTED_STRANGER, {}, False),
    ("first-post", NoParams(), "discussion.eml", NEWCOMER, {}, True),
    ("first-post", NoParams(), "discussion.eml", MEMBER, {}, False),
    ("first-post", NoParams(), "discussion.eml", STRANGER, {}, False),
    ("header-regex", HeaderRegexParams("X-Spam-Flag", "^yes"), "spam-flagged.eml", MEMBER, {},
     True),
    ("header-regex", HeaderRegexParams("X-Spam-Flag", "^yes"), "discussion.eml", MEMBER, {},
     False),
    ("authentication", AuthenticationParams(), "discussion.eml", MEMBER,
     {"auth": auth("fail")}, True),
    ("authentication", AuthenticationParams(), "discussion.eml", MEMBER,
     {"auth": auth("none")}, False),
    ("authentication", AuthenticationParams(require="dkim"), "discussion.eml", MEMBER,
     {"auth": auth("none")}, True),
    ("authentication", AuthenticationParams(require="dkim"), "discussion.eml", MEMBER,
     {"auth": auth("pass", aligned=True)}, False),
    ("promotional", PromotionalParams(), "advert.eml", STRANGER, {}, True),
    ("promotional", PromotionalParams(), "discussion.eml", MEMBER, {}, False),
    ("promotional", PromotionalParams(), "advert.eml", TRUSTED_STRANGER, {}, False),
]


@pytest.mark.parametrize("rule, params, fixture, sender, extra, hits", CASES,
                         ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_rules_table(rule: str, params: object, fixture: str, sender: SenderFacts,
                     extra: dict[str, object], hits: bool) -> None:
    post = make_post(fixture, sender, **extra)  # type: ignore[arg-type]
    hit = RULES[rule].check(post, params)
    assert (hit is not None) is hits, hit
    if hit is not None:
        assert hit.rule == rule and hit.reason


def test_rules_promotional_reason_names_the_signals() -> None:
    post = make_post("advert.eml", STRANGER)
    hit = RULES["promotional"].check(post, PromotionalParams(signals=3))
    assert hit is not None and post.promo is not None
    top = post.promo.top(3)
    assert len(top) == 3
    assert all(signal.detail in hit.reason for signal in top)


def test_rules_chain_collects_every_hold_reason_and_stops_at_discard() -> None:
    chain = Chain("test", (
        Step("non-member", Action.HOLD, NoParams()),
        Step("promotional", Action.HOLD, PromotionalParams()),
        Step("max-recipients", Action.HOLD, MaxRecipientsParams(count=0)),
    ))
    decision = decide(chain, make_post("advert.eml", STRANGER))
    assert decision.action is Action.HOLD
    assert [h.rule for h, _ in decision.hits] == ["non-member", "promotional", "max-recipients"]
    looped = Chain("test", (Step("non-member", Action.HOLD, NoParams()),
                            Step("loop", Action.DISCARD, NoParams()),
                            Step("promotional", Action.HOLD, PromotionalParams())))
    decision = decide(looped, make_post("own-list-id.eml", STRANGER))
    assert decision.action is Action.DISCARD
    assert [h.rule for h, _ in decision.hits] == ["non-member", "loop"]


def test_rules_every_rule_is_covered_by_the_table() -> None:
    assert {c[0] for c in CASES} == set(RULES)
