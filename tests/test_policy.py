"""Moderation policy files and the decision the rule chain reaches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import resources
from gateway.errors import ConfigError
from gateway.facts import Envelope, SenderFacts, message_facts
from gateway.identity import ListIdentity
from gateway.lists import Member
from gateway.policy import Action, Chain, Policies, Step, _params, decide, load_file, parse
from gateway.rules import RULES, NoParams, Post, loop, non_member
from gateway.schema import Mode

LIST = ListIdentity("discuss", "example.org", "Discuss", "[Discuss]", None)
MEMBER = Member(1, 1, "alice@example.net", "Alice", Mode.REGULAR, True)
SOURCE = "policies/test.toml"


def post(headers: str = "", *, mail_from: str = "alice@example.net",
         member: Member | None = MEMBER, moderator: bool = False, owner: bool = False,
         author: str = "Alice <alice@example.net>") -> Post:
    head = f"From: {author}\r\n" if author else ""
    raw = (head + "To: discuss@example.org\r\nSubject: hi\r\n" + headers
           + "\r\nbody\r\n").encode("utf-8")
    return Post(message=message_facts(raw), envelope=Envelope(mail_from, LIST.post_address),
                sender=SenderFacts(member, moderator, owner), mailing_list=LIST)


STRANGER = dict(member=None, mail_from="stranger@example.com",
                author="Stranger <stranger@example.com>")


# -- parse() errors ----------------------------------------------------------------------

@pytest.mark.parametrize("text, where, what", [
    ("[[chain]\nrule = 'loop'\n", SOURCE, "not valid TOML"),
    ("", SOURCE, "a policy needs at least one [[chain]] entry"),
    ("chain = []\n", SOURCE, "a policy needs at least one [[chain]] entry"),
    ("chain = 'loop'\n", SOURCE, "a policy needs at least one [[chain]] entry"),
    ("[rules]\nx = 1\n", SOURCE, "unknown key 'rules'"),
    ("[[chain]]\nrule = 'loop'\naction = 'discard'\n[[chain]]\nrule = 'no-such-rule'\n"
     "action = 'reject'\n",
     f"{SOURCE}: [[chain]] entry 2",
     f"unknown rule 'no-such-rule'; known rules: {', '.join(sorted(RULES))}"),
    ("[[chain]]\naction = 'reject'\n", f"{SOURCE}: [[chain]] entry 1", "unknown rule None"),
    ("[[chain]]\nrule = 'loop'\naction = 'delete'\n", f"{SOURCE}: [[chain]] entry 1 (loop)",
     "action must be one of accept, hold, reject, discard, not 'delete'"),
    ("[[chain]]\nrule = 'loop'\n", f"{SOURCE}: [[chain]] entry 1 (loop)",
     "action must be one of"),
    ("[[chain]]\nrule = 'loop'\naction = 'discard'\nparam = {}\n",
     f"{SOURCE}: [[chain]] entry 1 (loop)",
     "unknown key 'param'; parameters go under params = { ... }"),
    ("[[chain]]\nrule = 'non-member'\naction = 'reject'\nparams = 'strict'\n",
     f"{SOURCE}: [[chain]] entry 1 (non-member)", "params must be a table"),
    ("[[chain]]\nrule = 'non-member'\naction = 'reject'\nparams = { strict = true }\n",
     f"{SOURCE}: [[chain]] entry 1 (non-member)",
     "unknown parameter 'strict'; known parameters: none"),
])
def test_policy_parse_errors_name_the_file_and_entry(text: str, where: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text, SOURCE)
    message = str(info.value)
    assert message.startswith(where), message
    assert what in message, message


@dataclass(frozen=True)
class Limits:
    """Parameters of the kinds rules take; no shipped rule has parameters yet."""

    max_bytes: int = 0
    ratio: float = 0.5
    label: str = ""
    strict: bool = False
    domains: tuple[str, ...] = ()


@pytest.mark.parametrize("raw, what", [
    ({"max_bytes": "10k"}, "parameter 'max_bytes' must be an integer, not '10k'"),
    ({"max_bytes": True}, "parameter 'max_bytes' must be an integer, not True"),
    ({"max_bytes": 1.5}, "parameter 'max_bytes' must be an integer, not 1.5"),
    ({"ratio": "half"}, "parameter 'ratio' must be a number, not 'half'"),
    ({"ratio": False}, "parameter 'ratio' must be a number, not False"),
    ({"label": 3}, "parameter 'label' must be a string, not 3"),
    ({"strict": "yes"}, "parameter 'strict' must be true or false, not 'yes'"),
    ({"domains": "example.com"}, "parameter 'domains' must be a list, not 'example.com'"),
    ({"domains": ["example.com", 3]}, "parameter 'domains' must be a list, not ['example.com', 3]"),
    ({"nope": 1}, "unknown parameter 'nope'; known parameters: domains, label, max_bytes, "
                  "ratio, strict"),
])
def test_policy_wrong_param_type_names_the_entry_and_parameter(raw: dict[str, object],
                                                               what: str) -> None:
    where = f"{SOURCE}: [[chain]] entry 3 (limits)"
    with pytest.raises(ConfigError) as info:
        _params(Limits, raw, where)
    assert str(info.value) == f"{where}: {what}"


def test_policy_params_of_the_right_types_are_accepted() -> None:
    params = _params(Limits, {"max_bytes": 10, "ratio": 1, "label": "x", "strict": True,
                              "domains": ["a.example", "b.example"]}, "here")
    assert params == Limits(10, 1, "x", True, ("a.example", "b.example"))


def test_policy_hold_hits_are_collected_and_the_chain_goes_on() -> None:
    chain = parse("[[chain]]\nrule = 'non-member'\naction = 'hold'\n"
                  "[[chain]]\nrule = 'loop'\naction = 'hold'\n", SOURCE)
    assert [s.action for s in chain.steps] == [Action.HOLD, Action.HOLD]


def test_policy_parse_builds_the_chain_in_order() -> None:
    chain = parse("[[chain]]\nrule = 'non-member'\naction = 'accept'\nparams = {}\n"
                  "[[chain]]\nrule = 'loop'\naction = 'discard'\n", SOURCE)
    assert chain == Chain(SOURCE, (Step("non-member", Action.ACCEPT, NoParams()),
                                   Step("loop", Action.DISCARD, NoParams())))


def test_policy_shipped_default_parses() -> None:
    path = resources.policies_dir() / "default.toml"
    chain = load_file(path)
    assert chain.source == str(path)
    # Loops are discarded before anything else can answer them (DESIGN invariant 5).
    assert (chain.steps[0].rule, chain.steps[0].action) == ("loop", Action.DISCARD)
    assert "non-member" in [s.rule for s in chain.steps]
    assert all(s.rule in RULES for s in chain.steps)
    assert isinstance(chain.steps[0].params, RULES["loop"].params)
    assert Policies(resources.policies_dir()).default == chain


def test_policy_per_list_override(tmp_path: Path) -> None:
    (tmp_path / "default.toml").write_text("[[chain]]\nrule = 'loop'\naction = 'discard'\n")
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "discuss@example.org.toml").write_text(
        "[[chain]]\nrule = 'non-member'\naction = 'discard'\n")
    policies = Policies(tmp_path)
    assert policies.for_list("Discuss@Example.ORG").steps[0].rule == "non-member"
    assert policies.for_list("other@example.org") is policies.default
    assert policies.files == [str(tmp_path / "default.toml"),
                              str(tmp_path / "lists" / "discuss@example.org.toml")]


def test_policy_bad_per_list_file_is_found_up_front(tmp_path: Path) -> None:
    (tmp_path / "default.toml").write_text("[[chain]]\nrule = 'loop'\naction = 'discard'\n")
    (tmp_path / "lists").mkdir()
    bad = tmp_path / "lists" / "discuss@example.org.toml"
    bad.write_text("[[chain]]\nrule = 'looop'\naction = 'discard'\n")
    with pytest.raises(ConfigError, match=r"discuss@example\.org\.toml: \[\[chain\]\] entry 1: "
                                          r"unknown rule 'looop'"):
        Policies(tmp_path)


def test_policy_missing_default_says_where_to_point(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Policies(tmp_path)
    assert str(tmp_path / "default.toml") in str(info.value)
    assert "[paths] policies" in str(info.value)


# -- decide() ------------------------------------------------------------------------

DEFAULT = parse("[[chain]]\nrule = 'loop'\naction = 'discard'\n"
                "[[chain]]\nrule = 'non-member'\naction = 'reject'\n", SOURCE)


def test_policy_no_hit_means_accept() -> None:
    decision = decide(DEFAULT, post())
    assert decision.action is Action.ACCEPT
    assert decision.hits == ()
    assert decision.reasons == []


def test_policy_reject_decides_at_once() -> None:
    decision = decide(DEFAULT, post(**STRANGER))  # type: ignore[arg-type]
    assert decision.action is Action.REJECT
    assert decision.reasons == ["stranger@example.com is not a member of discuss@example.org"]
    assert [(h.rule, a) for h, a in decision.hits] == [("non-member", Action.REJECT)]


def test_policy_discard_decides_at_once_before_later_rules() -> None:
    looped = post("X-Loop: discuss@example.org\r\n", **STRANGER)  # type: ignore[arg-type]
    decision = decide(DEFAULT, looped)
    assert decision.action is Action.DISCARD
    assert [h.rule for h, _a in decision.hits] == ["loop"]  # non-member never ran


def test_policy_accept_decides_at_once_before_later_rules() -> None:
    chain = parse("[[chain]]\nrule = 'loop'\naction = 'accept'\n"
                  "[[chain]]\nrule = 'non-member'\naction = 'reject'\n", SOURCE)
    decision = decide(chain, post("Auto-Submitted: auto-generated\r\n",
                                  **STRANGER))  # type: ignore[arg-type]
    assert decision.action is Action.ACCEPT
    assert [h.rule for h, _a in decision.hits] == ["loop"]


def test_policy_holds_are_collected_and_the_chain_goes_on() -> None:
    # parse() refuses hold for now; the chain itself already knows what hold means.
    chain = Chain("built", (Step("non-member", Action.HOLD, NoParams()),
                            Step("loop", Action.HOLD, NoParams())))
    both = post("X-Loop: discuss@example.org\r\n", **STRANGER)  # type: ignore[arg-type]
    decision = decide(chain, both)
    assert decision.action is Action.HOLD
    assert [h.rule for h, _a in decision.hits] == ["non-member", "loop"]
    assert len(decision.reasons) == 2
    then_discard = Chain("built", (Step("non-member", Action.HOLD, NoParams()),
                                   Step("loop", Action.DISCARD, NoParams())))
    decision = decide(then_discard, both)
    assert decision.action is Action.DISCARD
    assert [(h.rule, a) for h, a in decision.hits] == [("non-member", Action.HOLD),
                                                      ("loop", Action.DISCARD)]


# -- the rules -------------------------------------------------------------------------

@pytest.mark.parametrize("headers, reason", [
    ("List-Id: Discuss <discuss.example.org>\r\n", "own List-Id <discuss.example.org>"),
    ("List-Id: <DISCUSS.Example.ORG>\r\n", "own List-Id <discuss.example.org>"),
    ("List-Id: <other.example.com>\r\nList-Id: <discuss.example.org>\r\n", "own List-Id"),
    ("X-Loop: discuss@example.org\r\n", "own X-Loop: discuss@example.org"),
    ("X-Loop: Discuss <DISCUSS@example.org>\r\n", "own X-Loop: discuss@example.org"),
    ("Auto-Submitted: auto-replied\r\n", "sent automatically (Auto-Submitted: auto-replied)"),
    ("Auto-Submitted: Auto-Generated\r\n", "(Auto-Submitted: auto-generated)"),
])
def test_policy_loop_rule_hits(headers: str, reason: str) -> None:
    hit = loop(post(headers), NoParams())
    assert hit is not None
    assert hit.rule == "loop"
    assert reason in hit.reason


@pytest.mark.parametrize("headers", [
    "",
    "List-Id: <other.example.com>\r\n",
    "List-Id: discuss.example.org\r\n",  # no angle brackets: not an RFC 2919 id
    "X-Loop: other@example.org\r\n",
    "X-Loop: discuss@example.com\r\n",
    "Auto-Submitted: no\r\n",
    "Precedence: bulk\r\n",
])
def test_policy_loop_rule_misses(headers: str) -> None:
    assert loop(post(headers), NoParams()) is None


@pytest.mark.parametrize("member, moderator, owner", [
    (MEMBER, False, False),
    (Member(2, 1, "alice@example.net", "", Mode.NOMAIL, False), False, False),
    (None, True, False),
    (None, False, True),
])
def test_policy_non_member_rule_lets_members_and_list_staff_through(
        member: Member | None, moderator: bool, owner: bool) -> None:
    assert non_member(post(member=member, moderator=moderator, owner=owner), NoParams()) is None


@pytest.mark.parametrize("author, mail_from, who", [
    ("Eve <EVE@example.com>", "bounce@example.com", "eve@example.com"),
    ("", "bounce@example.com", "bounce@example.com"),
    ("", "", "an unknown sender"),
    ("not an address", "", "an unknown sender"),
])
def test_policy_non_member_rule_names_the_poster(author: str, mail_from: str, who: str) -> None:
    hit = non_member(post(member=None, author=author, mail_from=mail_from), NoParams())
    assert hit is not None
    assert hit.rule == "non-member"
    assert hit.reason == f"{who} is not a member of discuss@example.org"
