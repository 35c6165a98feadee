"""The promotional rule's scorer: signals, the word model, the shipped model, odd mail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import promo
from gateway.errors import ConfigError
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
