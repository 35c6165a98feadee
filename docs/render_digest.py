"""Render a sample HTML digest and save a picture of it, as a member's mail program shows it.

    .venv/bin/python docs/render_digest.py [--out docs/digest-sample.png] [--html FILE]

The posts are written here (a short thread whose reply quotes the first post, and two
other topics); the digest is made by gateway/digestformats.py from the shipped
templates, personalised as delivery does, and its HTML part is opened in Debian's
headless Chromium (/usr/bin/chromium, driven by Playwright) with scripts off and no
network. The screenshot is the full page, 900 pixels wide.
"""

from __future__ import annotations

import argparse
import email.policy
import email.utils
import sys
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

from gateway import digestformats
from gateway.decorate import ListIdentity
from gateway.resources import templates_dir
from gateway.signing import LinkSigner, personalise
from gateway.templates import Templates

DOCS = Path(__file__).resolve().parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
WIDTH = 900

LIST = ListIdentity(name="discuss", domain="example.org", display_name="Discuss",
                    subject_prefix="[Discuss]",
                    archive_url="https://lists.example.org/archive/discuss/")
LINK_BASE = "https://lists.example.org/l/1"


def _when(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=UTC).timestamp()


def _post(sender: str, subject: str, sent: str, msgid: str, body: str, *,
          reply_to: str | None = None, attachment: tuple[str, str, bytes] | None = None,
          ) -> digestformats.DigestPost:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = LIST.post_address
    msg["Subject"] = subject
    msg["Date"] = email.utils.format_datetime(datetime.fromtimestamp(_when(sent), UTC))
    msg["Message-ID"] = f"<{msgid}@mail.example.net>"
    if reply_to:
        msg["In-Reply-To"] = msg["References"] = f"<{reply_to}@mail.example.net>"
    msg.set_content(body)
    if attachment:
        name, ctype, data = attachment
        maintype, subtype = ctype.split("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return digestformats.DigestPost(msg.as_bytes(policy=email.policy.SMTP), _when(sent))


FIRST = """\
Hi all,

The build server still runs Debian 11, and security support for it ends this
summer. I'd like to move it to Debian 12 next weekend:

  1. Saturday 09:00 UTC: take a snapshot, stop the CI runners.
  2. Upgrade, reboot, run the smoke tests.
  3. Sunday: if anything is off, roll back to the snapshot.

The runbook is at https://wiki.example.org/infra/build-server-upgrade

Any objections, or jobs that must not be interrupted that weekend?

Maria
"""

REPLY = """\
Maria Souza <maria@example.net> wrote:
> The build server still runs Debian 11, and security support for it ends this
> summer. I'd like to move it to Debian 12 next weekend:
>
>   1. Saturday 09:00 UTC: take a snapshot, stop the CI runners.

Fine by me. The nightly release build starts at 02:00 UTC on Saturday and
usually takes three hours, so 09:00 leaves plenty of room.

One thing: the ARM runner has its own disk, so the snapshot won't cover it.
I can take an image of it by hand on Friday evening.

Tomás
"""

SECOND_REPLY = """\
Thanks both. Tomás, yes please, Friday evening is perfect.
I'll post here when the upgrade starts and when it is done.

Maria
"""

MEETUP = """\
Hello everyone,

We have a room for a small meetup in Lisbon on Thursday 14 March, 18:30-21:00,
at the Casa do Impacto (Travessa de São Pedro 8). Talks so far:

  - "Reproducible builds in practice" (Aiko, 20 min)
  - "What we learned moving to PostgreSQL 16" (Jonas, 15 min)

There is space for one more short talk. Reply to me if you'd like to give one.
Please register so we know how much food to order:
https://events.example.org/lisbon-meetup-march

See you there,
Joana
"""

RELEASE = """\
Hi,

The draft release notes for 2.4 are attached. The big items are the new
plugin API and the faster importer; the full list of changes is in the
changelog.

Corrections by Wednesday, please; I plan to tag the release on Thursday.

Aiko
"""


def sample_issue() -> digestformats.DigestIssue:
    posts = (
        _post("Maria Souza <maria@example.net>", "[Discuss] Build server upgrade to Debian 12",
              "2026-03-02 08:14", "upgrade-1", FIRST),
        _post("Joana Ferreira <joana@example.pt>", "[Discuss] Meetup in Lisbon on 14 March",
              "2026-03-02 09:40", "meetup-1", MEETUP),
        _post("Tomás Oliveira <tomas@example.com>",
              "Re: [Discuss] Build server upgrade to Debian 12", "2026-03-02 10:05",
              "upgrade-2", REPLY, reply_to="upgrade-1"),
        _post("Aiko Tanaka <aiko@example.jp>", "[Discuss] Release notes draft for 2.4",
              "2026-03-02 13:22", "release-1", RELEASE,
              attachment=("release-notes-2.4.pdf", "application/pdf", b"%PDF-1.7\n" * 2300)),
        _post("Maria Souza <maria@example.net>",
              "Re: [Discuss] Build server upgrade to Debian 12", "2026-03-02 15:47",
              "upgrade-3", SECOND_REPLY, reply_to="upgrade-2"),
    )
    return digestformats.DigestIssue(LIST, volume=3, number=42, posts=posts,
                                     date=_when("2026-03-03 07:00"))


def html_page(templates: Templates) -> str:
    """The HTML part of the sample digest, with one member's links in it."""
    message = digestformats.render(sample_issue(), "html", templates, link_base=LINK_BASE)
    token = LinkSigner(b"a sample key, not a real one!!!!").member_token(1, 42,
                                                                         "reader@example.net")
    parsed = email.message_from_bytes(personalise(message, token), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    part = parsed.get_body(preferencelist=("html",))
    if part is None:
        raise RuntimeError("the HTML digest has no text/html part")
    content = part.get_content()
    assert isinstance(content, str)
    return content


def screenshot(html: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                    headless=True)
        try:
            # As a careful mail program shows a message: no scripts, nothing fetched.
            context = browser.new_context(java_script_enabled=False, offline=True,
                                          viewport={"width": WIDTH, "height": 800})
            page = context.new_page()
            page.set_content(html, wait_until="load")
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DOCS / "digest-sample.png",
                        help="where to write the PNG (default: %(default)s)")
    parser.add_argument("--html", type=Path, help="also write the HTML part to this file")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 1
    html = html_page(Templates(templates_dir()))
    if args.html:
        args.html.write_text(html, encoding="utf-8")
    screenshot(html, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
