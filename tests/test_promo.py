"""The promotional rule's scorer: signals, the word model, the shipped model, odd mail."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from gateway import learning, lists, promo
from gateway.errors import ConfigError
from gateway.store import Store
from tests.support import CORPUS

LABELED = CORPUS / "labeled"
ODD_DIR = CORPUS / "odd"
NO_CORPUS = f"the shared mail corpus is not at {CORPUS}; these tests need it"

ADVERT_SIGNALS = {s.name for s in promo.SIGNALS if s.direction > 0}


def mail(body: str = "", *, subject: str = "Re: build failure on arm64",
         headers: str = "", html: str | None = None, to: str | None = "dev@lists.example.org",
         ) -> bytes:
    """A small message as a member's mail client would send it."""
    head = ("From: Ann Poster <ann@example.net>\r\n"
            + (f"To: {to}\r\n" if to is not None else "")
            + f"Subject: {subject}\r\nMessage-ID: <1@example.net>\r\n"
            "Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n" + headers)
    if html is None:
        head += "Content-Type: text/plain; charset=utf-8\r\n"
        text = body
    elif body:
        head += 'Content-Type: multipart/alternative; boundary="b1"\r\n'
        text = ("--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + body
                + "\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html
                + "\r\n--b1--\r\n")
    else:
        head += "Content-Type: text/html; charset=utf-8\r\n"
        text = html
    return (head + "\r\n" + text).replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")


DISCUSSION = (
    "On Sat, Bob wrote:\n"
    "> The linker fails with 'relocation truncated to fit' on arm64.\n"
    "> Any idea?\n\n"
    "That is the large code model issue. Building with -mcmodel=large, or splitting the\n"
    "generated tables into their own section, fixed it for me. I will send a patch to\n"
    "the build scripts tomorrow so the release branch gets it too.\n\nAnn\n"
)
REPLY = "In-Reply-To: <0@example.net>\r\nReferences: <0@example.net>\r\n"

ADVERT_HTML = (
    "<html><body><h1>SUMMER SALE</h1>"
    "<p>Save up to 50% on every plan. Only $19.99 per month, limited time only!</p>"
    '<p><a href="http://198.51.100.7/offer?id=8812">Click here</a> to order now.</p>'
    '<img src="https://cdn.example.com/banner.jpg" width="600" height="300">'
    '<img src="https://trk.example.com/o.gif?u=8812" width="1" height="1">'
    "<p><small>You are receiving this email because you signed up at our store. "
    '<a href="https://example.com/u?id=8812">Unsubscribe here</a>.</small></p>'
    "</body></html>"
)

MAILMAN_FOOTER = (
    "\n_______________________________________________\n"
    "Dev mailing list\nDev@lists.example.org\n"
    "https://lists.example.org/mailman/listinfo/dev\n"
)
YAHOO_FOOTER = (
    "\n------------------------ Yahoo! Groups Sponsor ---------------------~-->\n"
    "4 DVDs Free +s&p Join Now\nhttp://us.click.yahoo.com/pt6YBB/NXiEAA/mG3HAA/7gSolB/TM\n"
    "---------------------------------------------------------------------~->\n\n"
    "To unsubscribe from this group, send an email to:\nforteana-unsubscribe@egroups.com\n\n"
    "Your use of Yahoo! Groups is subject to http://docs.yahoo.com/info/terms/\n"
)


@pytest.fixture(scope="module")
def shipped() -> promo.Model:
    return promo.load_model()


def names(signals: tuple[promo.Signal, ...]) -> set[str]:
    return {s.name for s in signals}


# --------------------------------------------------------------------- clear cases


CLEAR_CASES = [
    pytest.param(mail(DISCUSSION, headers=REPLY), False, id="reply-in-thread"),
    pytest.param(mail(DISCUSSION.replace("On Sat, Bob wrote:\n> ", "").replace("> ", ""),
                      subject="Linker errors on arm64"), False, id="new-thread"),
    pytest.param(mail(DISCUSSION + MAILMAN_FOOTER, headers=REPLY), False,
                 id="discussion-with-a-list-footer"),
    pytest.param(mail(subject="SUMMER SALE - 50% OFF EVERYTHING!!!", html=ADVERT_HTML), True,
                 id="html-advert"),
    pytest.param(mail("Our spring newsletter is out. Visit our website and learn more about "
                      "the new range. Order today: free shipping on every order over $50!\n\n"
                      "You are receiving this email because you subscribed to our newsletter. "
                      "To opt out, manage your email preferences.\n",
                      subject="Spring news from Example Outdoor",
                      headers="List-Unsubscribe: <https://example.com/u/1>\r\n"
                              "X-Mailer: MailChimp Mailer - **CID1234**\r\n"),
                 True, id="newsletter"),
    pytest.param(mail("Dear friend,\n\nWORK FROM HOME and earn $5,000 per week! No experience "
                      "needed. Make money fast with our proven system. This is a one-time "
                      "mailing, it is not spam. Act now, this offer expires soon: call toll "
                      "free 1-888-555-0199 or reply with REMOVE in the subject to be removed.\n",
                      subject="Make $5000 a week from home", to="undisclosed-recipients:;"),
                 True, id="money-scheme"),
]


@pytest.mark.parametrize(("raw", "promotional"), CLEAR_CASES)
def test_score_clear_cases(shipped: promo.Model, raw: bytes, promotional: bool) -> None:
    result = promo.score(raw, shipped)
    assert result.promotional is promotional, (result.probability, result.signals)
    if promotional:
        assert result.probability > 0.9
        assert result.top(), "a held message names at least one reason"
    else:
        assert result.probability < result.threshold / 2
        assert not names(result.signals) & ADVERT_SIGNALS


def test_score_unfamiliar_language_is_judged_by_its_signals(shipped: promo.Model) -> None:
    # The base model saw German only in spam, and knows few of these words: its lean
    # must not hold a discussion post, nor may a price alone.
    body = ("Hallo zusammen,\n\nich habe das Gehäuse für 45 € gebraucht gekauft und die "
            "Lüfter getauscht. Jetzt läuft der Rechner leise, auch unter Last. Hat jemand "
            "Erfahrung mit den neuen Netzteilen?\n\nGrüße, Jörg\n")
    raw = mail(body, subject="Leiser Rechner")
    verdict = shipped.judge(promo.tokens(raw))
    assert verdict.probability > 0.5 and verdict.coverage < promo.FULL_COVERAGE
    result = promo.score(raw, shipped)
    assert names(result.signals) == {"price"}
    assert not result.promotional, result
    assert not verdict.familiar and result.threshold == shipped.floor > shipped.threshold


@pytest.mark.parametrize(("body", "subject"), [("hi\n", "Hello"),
                                               ("I am away.\n", "Out of office")])
def test_score_a_few_known_words_are_judged_at_the_floor(
        shipped: promo.Model, body: str, subject: str) -> None:
    # The model knows these words, and saw them in spam more than in discussion: too few
    # to judge a post by, so the post is judged as one in an unfamiliar language.
    verdict = shipped.judge(promo.tokens(mail(body, subject=subject)))
    assert verdict.coverage >= promo.FULL_COVERAGE and verdict.probability > 0.5
    assert 0 < verdict.known < promo.MIN_KNOWN_WORDS and not verdict.familiar
    result = promo.score(mail(body, subject=subject), shipped)
    assert result.threshold == shipped.floor
    assert shipped.threshold <= result.probability and not result.promotional, result


def test_score_familiar_words_and_one_signal_hold_a_pitch(shipped: promo.Model) -> None:
    # The model knows these words and leans promotional; with one price that is enough
    # where the words are familiar, though not where they are not (the floor).
    raw = mail("Our company offers professional hosting. It runs on Linux and the source is "
               "on the project page. Thousands of satisfied customers use it every day. The "
               "kernel module compiles with gcc 3.2. Prices start at $19.95.\n",
               subject="New hosting plans")
    verdict = shipped.judge(promo.tokens(raw))
    assert verdict.familiar and 0.5 < verdict.probability < 0.9
    result = promo.score(raw, shipped)
    assert names(result.signals) & ADVERT_SIGNALS == {"price"}
    assert result.threshold == shipped.threshold
    assert result.promotional and result.probability < shipped.floor, result
    assert result.top()[0].name == "price"


UNDECIDED = [
    pytest.param("The upgrade costs $49.95.\n", False, id="one-signal"),
    pytest.param("Click here to buy now! Only $49.95.\n", True, id="two-signals"),
]


@pytest.mark.parametrize(("body", "held"), UNDECIDED)
def test_score_undecided_model_needs_more_than_one_signal(
        shipped: promo.Model, body: str, held: bool) -> None:
    knows_nothing = promo.Model(weights=shipped.weights, threshold=shipped.threshold)
    result = promo.score(mail(body, subject="Upgrade"), knows_nothing)
    assert result.model_probability == 0.5
    assert result.promotional is held, result


def test_score_threshold_hint_replaces_the_default(shipped: promo.Model) -> None:
    raw = mail(DISCUSSION, headers=REPLY)
    assert promo.score(raw, shipped).threshold == shipped.threshold
    strict = promo.score(raw, shipped, threshold_hint=1e-9)
    assert strict.threshold == 1e-9 and strict.promotional


def test_promo_score_top_names_only_what_pushed_towards_promotional() -> None:
    s = promo.PromoScore(probability=0.9, model_probability=0.8, signals=(
        promo.Signal("price", 2.0, "prices"), promo.Signal("urgency", 1.0, "urgency"),
        promo.Signal("discount", 0.5, "offers"), promo.Signal("reply", -1.0, "reply")))
    assert [x.name for x in s.top()] == ["price", "urgency", "discount"]
    assert [x.name for x in s.top(1)] == ["price"]
    assert promo.PromoScore(0.1, (promo.Signal("reply", -1.0, "r"),), 0.1).top() == ()


# ------------------------------------------------------------------------- signals


SIGNAL_CASES = [
    ("call-to-action", mail("Great tool. Click here to buy now!\n", subject="Tool")),
    ("call-to-action", mail("Questions? Call 1-800-555-0142 any time.\n", subject="Tool")),
    ("price", mail("The upgrade costs $49.95 and the bundle €120.\n", subject="Upgrade")),
    ("discount", mail("Get 30% off with coupon SPRING, free shipping included.\n")),
    ("urgency", mail("Hurry up, this is a limited-time deal while supplies last.\n")),
    ("money", mail("Lower interest rates! Consolidate your debt and refinance today.\n")),
    ("link-density", mail("See http://a.example/1 http://b.example/2 http://c.example/3 "
                          "http://d.example/4 http://e.example/5 http://f.example/6\n")),
    ("image-density", mail(html='<p>Hi</p><img src="https://x.example/a.jpg">'
                                '<img src="https://x.example/b.jpg">')),
    ("tracking-pixel", mail("Hello.\n", html='<p>Hello.</p><img src="https://t.example/p.gif" '
                                            'width="1" height="1" alt="">')),
    ("url-shortener", mail("Details at https://bit.ly/3xYzAbc for everyone.\n")),
    ("obscured-link", mail(html='<p>Log in at <a href="http://203.0.113.9/login">'
                                "www.yourbank.com</a> to confirm your details.</p>")),
    ("obscured-link", mail("Go to http://www.example.com@evil.example/login please.\n")),
    ("hidden-text", mail("Hi.\n", html='<p>Hi.</p><font color="#ffffff">lorem ipsum dolor '
                                       "amet random words</font>")),
    ("bulk-mailer", mail("Hi.\n", headers="X-Mailer: Group Mail 4.0\r\n")),
    ("bulk-mailer", mail("Hi.\n", headers="X-Campaign-Id: 4411\r\n")),
    ("bulk-mailer", mail("Hi.\n", headers="List-Unsubscribe: <mailto:u@example.com>\r\n")),
    ("html-only", mail(html="<p>The meeting moved to Thursday, same room.</p>")),
    ("shouting-subject", mail("Hi.\n", subject="AMAZING NEWS FOR YOU TODAY")),
    ("shouting-subject", mail("Hi.\n", subject="You won't believe this!!!")),
    ("unsubscribe-footer", mail("News.\n\nTo be removed from our mailing list, reply with "
                                "remove in the subject.\n")),
    ("not-spam-claim", mail("Offer.\n\nThis is not spam: it is sent in compliance with "
                            "the law.\n")),
    ("undisclosed-recipients", mail("Hi.\n", to="undisclosed-recipients:;")),
    ("undisclosed-recipients", mail("Hi.\n", to=None)),
    ("discount", mail("Kostenloser Zugang für alle, jetzt mit Rabatt!\n", subject="Neu")),
    ("unsubscribe-footer", mail("Neu im Handel.\n\nKein Interesse mehr? Dann trage dich "
                                "bitte hier aus.\n", subject="Neu")),
    ("money", mail("Nebenverdienst gesucht? Geld verdienen von zu Hause.\n")),
    ("discount", mail("Yeni sezonda ücretsiz kargo ve indirimli fiyatlar.\n")),
    ("not-spam-claim", mail("出会いの広場\n", subject="未承諾広告※出会いの広場")),
    ("discount", mail("女性無料、男性にはポイントをプレゼント\n", subject="出会い")),
    ("unsubscribe-footer", mail("今後この広告がご不要な方は配信停止の旨をお送り下さい\n")),
    ("call-to-action", mail("限时优惠，立即订购！\n", subject="优惠")),
    ("reply", mail("Yes.\n", headers=REPLY)),
    ("quotes-earlier-post", mail("Bob wrote:\n> one\n> two\n\nAgreed.\n")),
]


@pytest.mark.parametrize(("name", "raw"), [pytest.param(n, r, id=f"{n}-{i}")
                                           for i, (n, r) in enumerate(SIGNAL_CASES)])
def test_signal_fires_on_what_it_names(name: str, raw: bytes) -> None:
    fired = {s.name: s for s in promo.signals(raw)}
    assert name in fired, fired
    assert fired[name].detail
    assert (fired[name].weight > 0) == (name in ADVERT_SIGNALS)


def test_signal_cjk_phrases_found_anywhere_only_in_cjk_text() -> None:
    assert promo._cjk_phrases("未承諾広告※灼熱！女性無料は当たり前、今直ぐアクセス") == {
        "not-spam-claim": ["未承諾広告"], "discount": ["無料"], "call-to-action": ["今直ぐ"]}
    assert promo._cjk_phrases("no such text here, free of charge") == {}


def test_signal_every_one_has_a_case() -> None:
    assert {n for n, _raw in SIGNAL_CASES} == set(promo.SIGNAL_NAMES)


NEUTRAL = [
    pytest.param(mail(DISCUSSION.replace("> ", "")), id="plain-discussion"),
    pytest.param(mail("The script uses $1 and $2, then exits 0.\n"), id="shell-variables"),
    pytest.param(mail("I signed up for the conference; the talk is online, see "
                      "https://example.org/talks/42 for slides.\n"), id="one-link"),
    pytest.param(mail("Patch attached. I don't want to wait for 2.0, so I'll merge "
                      "it into the 1.9 branch after the review.\n"), id="release-talk"),
    pytest.param(mail("Fixed, thanks.\n", html="<p>Fixed, <b>thanks</b>.</p>"),
                 id="both-alternatives"),
    pytest.param(mail("Thanks for the report." + MAILMAN_FOOTER), id="mailman-footer"),
    pytest.param(mail("Interesting." + YAHOO_FOOTER), id="yahoo-groups-footer-and-sponsor"),
    pytest.param(mail("Hallo,\n\nder Kostenvoranschlag kam heute; das Austragen der alten "
                      "Einträge dauert noch. Jetzt geht der Build wieder.\n"),
                 id="german-discussion"),
    pytest.param(mail("这个补丁修复了内核的内存泄漏，请大家测试一下。\n", subject="内核补丁"),
                 id="chinese-discussion"),
]


@pytest.mark.parametrize("raw", NEUTRAL)
def test_signal_quiet_on_neutral_text(raw: bytes) -> None:
    assert not names(promo.signals(raw)) & ADVERT_SIGNALS, promo.signals(raw)


def test_signal_details_say_what_was_found() -> None:
    fired = {s.name: s for s in promo.signals(mail(subject="Deal", html=ADVERT_HTML))}
    assert '"click here"' in fired["call-to-action"].detail
    assert "$19.99" in fired["price"].detail
    assert "198.51.100.7" in fired["obscured-link"].detail
    assert "1 invisible image" in fired["tracking-pixel"].detail


def test_signal_footer_is_stripped_but_quoted_footer_is_kept() -> None:
    footer = promo.tokens(mail("Thanks." + MAILMAN_FOOTER))
    assert "listinfo" not in " ".join(footer) and "mailing" not in footer
    quoted = "> old text\n" + MAILMAN_FOOTER.replace("\n", "\n> ") + "\n" + "More " * 200
    assert "mailing" in promo.tokens(mail(quoted))


# -------------------------------------------------------------------------- tokens


def test_tokens_subject_words_links_and_addresses() -> None:
    toks = promo.tokens(mail("Mail ann@example.net or see https://example.org/x\n",
                             subject="Re: [dev] Release Plans"))
    assert toks[:2] == ["subject:release", "subject:plans"]
    assert "<url>" in toks and "<email>" in toks
    assert not any("example" in t for t in toks)


def test_tokens_are_unique_and_bounded() -> None:
    body = " ".join(f"word{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)}"
                    for i in range(5000))
    toks = promo.tokens(mail(body))
    assert len(toks) == promo.MAX_TOKENS == len(set(toks))


def test_tokens_decode_mime_and_strip_html() -> None:
    raw = (b"Subject: =?utf-8?q?Caf=C3=A9?=\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/html; charset=iso-8859-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"<style>p {color: red}</style><p>Cr=E8me br=FBl=E9e<!-- x --> tonight</p>\r\n")
    assert promo.tokens(raw) == ["subject:café", "crème", "brûlée", "tonight"]



@pytest.mark.parametrize("footer", [b"", b"\r\n-----\r\nlist footer appended\r\n"])
def test_tokens_base64_body_with_a_footer_a_list_appended(footer: bytes) -> None:
    # A list server that appends its footer to a base64 body leaves it undecodable as a
    # whole; the words are still what a mail client shows.
    encoded = base64.encodebytes("<p>Günstige Kredite sofort</p>".encode("cp1254"))
    raw = (b"Subject: Fiyat\r\nContent-Type: text/html; charset=windows-1254\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded.replace(b"\n", b"\r\n")
           + footer)
    words = ["subject:fiyat", "günstige", "kredite", "sofort"]
    assert promo.tokens(raw) == words + (["list", "footer", "appended"] if footer else [])


# --------------------------------------------------------------------------- model


def test_model_round_trips_through_json(shipped: promo.Model) -> None:
    model = promo.Model.empty()
    model.learn(["cheap", "pills", "subject:offer"], promotional=True)
    model.learn(["patch", "review", "café"], promotional=False)
    again = promo.Model.from_json(model.to_json())
    assert again.to_json() == model.to_json()
    assert again.counts("café") == (0, 1) and again.counts("pills") == (1, 0)
    assert (again.promotional, again.ham) == (1, 1)
    copy = promo.Model.from_json(shipped.to_json())
    assert copy.weights == shipped.weights and copy.threshold == shipped.threshold
    assert copy.floor == shipped.floor
    assert len(copy) == len(shipped)


def test_model_merged_adds_counts_and_keeps_the_base_weights(shipped: promo.Model) -> None:
    local = promo.Model.empty()
    local.learn(["patch", "zorblax"], promotional=True)
    local.learn(["patch"], promotional=False)
    merged = shipped.merged(local)
    base_patch = shipped.counts("patch")
    assert merged.counts("patch") == (base_patch[0] + 1, base_patch[1] + 1)
    assert merged.counts("zorblax") == (1, 0)
    assert (merged.promotional, merged.ham) == (shipped.promotional + 1, shipped.ham + 1)
    assert merged.weights == shipped.weights and merged.threshold == shipped.threshold
    assert merged.floor == shipped.floor
    assert shipped.counts("zorblax") == (0, 0), "merging does not change the base"


def test_model_learns_from_moderator_decisions(shipped: promo.Model) -> None:
    # Self-promotion the base model does not call an advert: moderators teach their list.
    offer = mail("I am available for contract work on Linux kernel drivers and embedded "
                 "boards. Rates are negotiable, write to me off list if your team needs "
                 "help.\n", subject="Available for contract work")
    words = promo.tokens(offer)
    before = shipped.probability(words)
    assert not promo.score(offer, shipped).promotional

    held = promo.Model.empty()
    for _ in range(2):
        held.learn(words, promotional=True)
    assert shipped.merged(held).probability(words) > before + 0.3
    assert promo.score(offer, shipped.merged(held)).promotional

    released = promo.Model.empty()
    for _ in range(2):
        released.learn(words, promotional=False)
    assert shipped.merged(released).probability(words) < before - 0.1


def test_model_without_a_floor_holds_unfamiliar_mail_to_two_pieces_of_evidence() -> None:
    # A model written before there were two thresholds: its one threshold for all mail,
    # and no lower than MIN_EVIDENCE beyond the prior where the words are unfamiliar.
    doc = {"format": promo.MODEL_FORMAT, "version": 1, "threshold": 0.2,
           "weights": {"bias": -3.0, "model": 1, "signals": {}},
           "messages": {"promotional": 1, "ham": 1}, "tokens": {}}
    model = promo.Model.from_json(json.dumps(doc))
    assert model.threshold == 0.2
    assert model.floor == promo.evidence_floor(-3.0) > promo.sigmoid(-3.0 + promo.MIN_EVIDENCE)
    familiar = promo.Verdict(0.9, promo.FULL_COVERAGE, (), promo.MIN_KNOWN_WORDS)
    assert model.threshold_for(familiar) == 0.2
    assert model.threshold_for(promo.Verdict(0.9, 0.3, (), 100)) == model.floor
    # A floor below the threshold would let unfamiliar mail be held more easily.
    assert promo.Model.from_json(json.dumps({**doc, "floor": 0.1})).floor == 0.2


def test_model_empty_cannot_tell() -> None:
    assert promo.Model.empty().probability(["anything", "at", "all"]) == 0.5


BAD_MODELS = [
    pytest.param("not json", id="not-json"),
    pytest.param(json.dumps({"format": "something-else", "version": 1}), id="wrong-format"),
    pytest.param(json.dumps({"format": promo.MODEL_FORMAT, "version": 1}), id="missing-parts"),
    pytest.param(json.dumps({"format": promo.MODEL_FORMAT, "version": 1, "threshold": 0.3,
                             "weights": {"bias": 0, "model": 1, "signals": {}},
                             "messages": {"promotional": 1, "ham": 1},
                             "tokens": {"x": [1, -1]}}), id="negative-count"),
    pytest.param(json.dumps({"format": promo.MODEL_FORMAT, "version": 1, "threshold": 2,
                             "weights": {"bias": 0, "model": 1, "signals": {}},
                             "messages": {"promotional": 1, "ham": 1}, "tokens": {}}),
                 id="threshold-out-of-range"),
    pytest.param(json.dumps({"format": promo.MODEL_FORMAT, "version": 1, "threshold": 0.3,
                             "floor": 1.5, "weights": {"bias": 0, "model": 1, "signals": {}},
                             "messages": {"promotional": 1, "ham": 1}, "tokens": {}}),
                 id="floor-out-of-range"),
]


@pytest.mark.parametrize("text", BAD_MODELS)
def test_model_from_json_rejects_what_it_cannot_use(text: str) -> None:
    with pytest.raises(ConfigError):
        promo.Model.from_json(text)


def test_load_model_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        promo.load_model(tmp_path / "nope.json")


def test_load_model_shipped_is_small_and_trained(shipped: promo.Model) -> None:
    assert promo.DEFAULT_MODEL_PATH.stat().st_size < 512 * 1024
    assert shipped.promotional > 100 and shipped.ham > 100 and len(shipped) > 1000
    assert 0.0 < shipped.threshold < 1.0
    for spec in promo.SIGNALS:
        assert shipped.weights.of(spec.name) * spec.direction > 0, spec.name
        # No one signal reaches the floor that mail with unfamiliar words must pass.
        assert shipped.weights.of(spec.name) <= promo.MIN_EVIDENCE, spec.name
    assert shipped.floor >= promo.evidence_floor(shipped.weights.bias) > shipped.threshold


# -------------------------------------------------------------------------- corpus


def _odd_params() -> list[object]:
    if not ODD_DIR.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=NO_CORPUS), id="no-corpus")]
    return [pytest.param(p, id=p.name) for p in sorted(ODD_DIR.glob("*.eml"))]


@pytest.mark.parametrize("path", _odd_params())
def test_score_odd_corpus_file_without_an_exception(shipped: promo.Model, path: Path) -> None:
    result = promo.score(path.read_bytes(), shipped)
    assert 0.0 <= result.probability <= 1.0
    assert 0.0 <= result.model_probability <= 1.0
    assert len(promo.tokens(path.read_bytes())) <= promo.MAX_TOKENS


def _labeled(folder: str, *names: tuple[str, set[str]]) -> list[object]:
    if not (LABELED / folder).is_dir():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=NO_CORPUS),
                             id="no-corpus")]
    return [pytest.param(LABELED / folder / n, e, id=n) for n, e in names]


# Signals are not learned from the corpus, so these are checks on mail the code never
# saw when it was written (the word model, trained on this corpus, is measured by
# bench/promo_eval.py with cross-validation instead).
CORPUS_SIGNALS = [
    *_labeled("promo", ("sa__spam-1__00001.eml", {"html-only", "call-to-action", "discount",
                                                  "money", "unsubscribe-footer"}),
              ("sa__spam-1__00010.eml", {"html-only", "shouting-subject", "price"})),
    # Yahoo! Groups' sponsor advert and unsubscribe lines, a SourceForge sponsor block and
    # a Mailman footer: none of it is the poster's.
    *_labeled("ham", ("sa__easy-ham-1__00002.eml", set()), ("sa__easy-ham-1__00010.eml", set()),
              ("sa__easy-ham-1__02435.eml", set())),
]


@pytest.mark.parametrize(("path", "expected"), CORPUS_SIGNALS)
def test_signal_on_corpus_files(path: Path, expected: set[str]) -> None:
    assert names(promo.signals(path.read_bytes())) & ADVERT_SIGNALS == expected


def test_score_corpus_sample_regression(shipped: promo.Model) -> None:
    """Every 10th labeled file, scored by the shipped model: a guard against a broken
    model file or tokenizer, not a measure (the model was trained on these files)."""
    if not LABELED.is_dir():
        pytest.skip(NO_CORPUS)
    held = {"ham": 0, "promo": 0}
    seen = {"ham": 0, "promo": 0}
    for folder in held:
        for path in sorted((LABELED / folder).glob("*.eml"))[::10]:
            seen[folder] += 1
            held[folder] += promo.score(path.read_bytes(), shipped).promotional
    assert held["promo"] >= 0.9 * seen["promo"], (held, seen)
    assert held["ham"] <= 0.02 * seen["ham"], (held, seen)


# ------------------------------------------------------------------- fast paths
# Scoring reads a message through shortcuts that must give exactly what the plain way
# (gateway.message.split/parse, one regex over the whole text) gives; each is checked
# against that plain way here, on the inputs that take a shortcut's edge cases.

READ_CASES = [
    pytest.param(mail(DISCUSSION, headers=REPLY), id="plain-post"),
    pytest.param(mail(subject="Deal", html=ADVERT_HTML), id="html-only"),
    pytest.param(mail("Both.\n", html="<p>Both.</p>"), id="alternative"),
    pytest.param(b"From ann@example.net Sun Nov 22 10:00:00 2026\nSubject: mbox\n\nBody\n",
                 id="mbox-from-line"),
    pytest.param(b"Subject: one\r\n  two\r\n\tthree\r\nsubject: second\r\nTO: a@b.example\r\n"
                 b"\r\nBody\r\n", id="folded-and-repeated"),
    pytest.param(b" leading continuation\r\nSubject: after it\r\n\r\nBody\r\n",
                 id="continuation-first"),
    pytest.param(b"Subject: cr only\rTo: x@y.example\r\rBody\r", id="cr-line-ends"),
    pytest.param(b"Subject: no blank line\r\nthis line starts the body\r\n", id="no-blank-line"),
    pytest.param(b"Date  : Sun, 22 Nov 2026 10:00:00 +0000\r\nSubject: obsolete\r\n\r\nx\r\n",
                 id="blank-before-colon"),
    pytest.param(b"Subject: nameless next\r\n: value\r\n\r\nBody\r\n", id="nameless-field"),
    pytest.param(b"Subject: s\r\nContent-Type: text/plain;\r\n charset=iso-8859-1\r\n"
                 b"content-transfer-encoding: QUOTED-PRINTABLE\r\n\r\nCr=E8me\r\n",
                 id="folded-content-type-qp"),
    pytest.param(b"Subject: s\r\nCONTENT-TYPE: text/html\r\nContent-Disposition: inline\r\n"
                 b"\r\n<p>Hi</p>\r\n", id="upper-case-mime-fields"),
    pytest.param(b"Subject: s\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n"
                 b"Inner body\r\n", id="nested-message"),
    pytest.param(b"Subject: caf\xc3\xa9 \xff\r\nX-Key: \xe9t\xe9\r\n\r\n\xe9t\xe9\r\n",
                 id="raw-8bit-headers"),
    pytest.param(b"", id="empty"),
]


@pytest.mark.parametrize("raw", READ_CASES)
def test_read_fields_as_split_reads_them(raw: bytes) -> None:
    from gateway.message import split

    if raw.startswith(b"From "):
        raw = raw.partition(b"\n")[2]
    expected: dict[str, str] = {}
    for f in split(raw).fields[:promo.MAX_FIELDS]:
        expected.setdefault(f.name.lower(), f.value)
    got = {n: promo._value(v) for n, v in promo._fields(raw).items()}
    assert got == expected


@pytest.mark.parametrize("raw", READ_CASES)
def test_read_body_as_the_feedparser_reads_it(raw: bytes) -> None:
    from gateway.message import parse

    fast, full = promo._parse(raw), parse(raw)
    assert fast.get_content_type() == full.get_content_type()
    assert fast.get_content_charset() == full.get_content_charset()
    assert fast.get("content-transfer-encoding") == full.get("content-transfer-encoding")
    assert fast.get("content-disposition") == full.get("content-disposition")
    assert fast.is_multipart() == full.is_multipart()
    if not full.is_multipart():
        assert fast.get_payload(decode=True) == full.get_payload(decode=True)


TEXTS = [
    pytest.param(DISCUSSION, id="discussion"),
    pytest.param("Mail ann@example.net, bob.smith+list@mail.example.co.uk or a@b@c.example, "
                 "not user@localhost nor @example.org or x@.example.", id="addresses"),
    pytest.param("See https://example.org/a?b=1, www.Example.com/x, HTTP://UPPER.example, "
                 "ftp://files.example/f, xhttp://no.example, _www.no.example and "
                 "Https\u017f://long-s.example (see http://paren.example/x).", id="links"),
    pytest.param("Crème brûlée, naïve café — the co-op's Straße, ſtrange K-\u212aelvin, "
                 "İstanbul ıi, Ελληνικά, 日本語のテキストです, x2y3 ab1 a1b2c3 it’s "
                 "'quoted' -dash- ___under a" + "b" * 30, id="unicode-words"),
    pytest.param("ascii only: don't re-read 'quotes' -- a-b-c 9lives R2D2 abc123def x_y_z "
                 "ok" + " word" * 50, id="ascii-words"),
    pytest.param("", id="empty"),
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_addresses_found_as_the_pattern_finds_them(text: str) -> None:
    assert list(promo._emails(text)) == [m.span() for m in promo._EMAIL.finditer(text)]


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_links_found_as_the_plain_pattern_finds_them(text: str) -> None:
    plain = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"'()\[\]{}]+", re.I)
    assert [m.span() for m in promo._URL.finditer(text)] == \
        [m.span() for m in plain.finditer(text)]


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_words_as_the_word_pattern_finds_them(text: str) -> None:
    expected: list[str] = []
    for word in dict.fromkeys(promo._WORD.findall(text.lower())):
        if 3 <= len(word) <= 20:
            if sum(c.isdigit() for c in word) < 2:
                expected.append(word.strip("'’-").replace("’", "'"))
        elif len(word) > 20 and promo._CJK.search(word):
            expected.extend(word[i:i + 2] for i in range(min(len(word) - 1, 40)))
    assert promo._words(text) == expected


FOOTER_TEXTS = [
    pytest.param("Thanks." + MAILMAN_FOOTER, id="mailman"),
    pytest.param("Interesting." + YAHOO_FOOTER, id="yahoo-and-sponsor"),
    # re.I takes the long s for an s: that footer is found by the case-blind patterns.
    pytest.param("Thanks.\n_____\nDev mailing liſt\nhttps://lists.example.org/mailman/",
                 id="long-s-takes-the-regex-path"),
    pytest.param("> quoted" + MAILMAN_FOOTER.replace("\n", "\n> ") + "\n" + "More " * 200,
                 id="quoted-footer"),
    pytest.param("x" * 5000 + "\nThe Mailing List of nothing\n", id="beyond-the-span"),
    pytest.param("Plain text, no footer at all.", id="none"),
]


@pytest.mark.parametrize("text", FOOTER_TEXTS)
def test_footer_stripped_as_the_case_blind_patterns_strip_it(text: str) -> None:
    expected, marker = text, promo._FOOTER_MARKER
    for _round in range(3):
        matches = list(marker.finditer(expected, max(0, len(expected) - promo._FOOTER_SPAN)))
        found = matches[-1] if matches else None
        if found is None or len(expected) - found.end() > promo._FOOTER_REACH:
            break
        cut = expected.rfind("\n", 0, found.start()) + 1
        for sep in promo._FOOTER_SEPARATOR.finditer(
                expected, max(0, found.start() - promo._FOOTER_REACH), found.start() + 1):
            cut = sep.start()
        expected, marker = expected[:cut].rstrip(), promo._FOOTER_OR_SPONSOR
    assert promo._strip_list_footer(text) == expected


PHRASE_TEXTS = [
    "click here to buy now! order now, act now. pre-order now. limited time only",
    "call now toll free 1-888-555-0199 or (800) 555-0100; 18005550100 is no number",
    "save 50% off! $19.99, 49.95 €, 20 dollars, usd 5, eur 10 euros — $1 and $2 in sh",
    "this is not spam. to be removed from our mailing list reply remove. unsubscribe here",
    "work from home and earn $5,000 per week; lower interest rates, refinance today",
    "no phrase at all in this ordinary sentence about linkers",
    "kostenloser zugang, sonderangebote; nur heute: jetzt bestellen! trage dich bitte aus",
    "der kostenvoranschlag, die rabattierung und hemenway: keine treffer als ganze wörter",
]


@pytest.mark.parametrize("text", PHRASE_TEXTS)
def test_signal_phrases_found_as_each_pattern_finds_them(text: str) -> None:
    scanned = promo._Text(text)
    prefixes = frozenset(w[:4] for w in promo._WORD.findall(text))
    for family in (promo._CALL_TO_ACTION, promo._DISCOUNT, promo._URGENCY, promo._MONEY,
                   promo._OPT_OUT, promo._NOT_SPAM):
        expected: list[str] = []
        for phrase in family.items:
            if phrase.key is not None and phrase.key not in prefixes:
                continue
            if phrase.needs is not None and not any(c in text for c in phrase.needs):
                continue
            for m in phrase.pattern.finditer(text):
                before = text[m.start() - 1:m.start()]
                if not (before.isalnum() or before in ("_", "$")):
                    expected.append(" ".join(m.group().split()))
        assert family.find(scanned) == expected
    assert promo._toll_free(text) == [
        f"toll-free {m.group()}" for m in promo._TOLL_FREE.finditer(text)
        if not text[m.start() - 1:m.start()].isdigit()][:promo.MAX_DETAIL_ITEMS]
    price = promo._price(text)
    found = [" ".join(m.group().split()) for m in promo._PRICE.finditer(text)
             if any(c in text for c in promo._CURRENCY_HINTS)]
    found = [f for f in found if not promo._SHELL_VAR.match(f)]
    assert (price.detail if price else None) == \
        (f"prices: {promo._quoted(found)}" if found else None)


def test_model_clue_table_follows_what_it_learns() -> None:
    model = promo.Model.empty()
    model.learn(["cheap", "pills"], promotional=True)
    model.learn(["patch", "review"], promotional=False)
    before = model.probability(["cheap", "patch"])
    for _ in range(5):
        model.learn(["cheap", "patch"], promotional=True)
    assert model.probability(["cheap", "patch"]) > before
    assert model.judge(["cheap"]).clues == ("cheap",)


def test_models_per_list_read_the_list_model_only_when_it_has_learned(store: Store) -> None:
    """A list that never learned scores with the shipped model; one that did, with the
    merge, made once and kept until the list learns again (each post reads only when
    the list last learned, not its counts)."""
    base = promo.Model.empty()
    models = learning.Models(base)
    offer = mail("Buy now, limited offer.\n", subject="Offer")
    with store.write() as conn:
        lst = lists.create(conn, "promo@example.org", now=0.0)
    with store.read() as conn:
        assert models.for_list(conn, lst.id) is base
    with store.write() as conn:
        learning.learn(conn, lst.id, offer, promotional=True, now=10.0)
    with store.read() as conn:
        first = models.for_list(conn, lst.id)
        assert first is not base and first.promotional == 1
        assert models.for_list(conn, lst.id) is first  # cached: nothing learned since
    with store.write() as conn:
        learning.learn(conn, lst.id, offer, promotional=True, now=20.0)
    with store.read() as conn:
        again = models.for_list(conn, lst.id)
    assert again is not first and again.promotional == 2
