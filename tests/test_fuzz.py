"""The fuzz target (fuzz/fuzz_parse.py) for a bounded time, and what it has found so far.

The run needs atheris (``pip install atheris``: wheels for CPython 3.11 on Linux x86-64);
without it that test is skipped and says so. Seeds: a few written here, plus the shared
mail corpus's odd and bounce messages when it is there (read in place, never copied).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import facts, promo, selfservice
from gateway.message import content_charset, parse
from gateway.replytext import find_command
from tests.support import CORPUS, REPO

TARGET = REPO / "fuzz" / "fuzz_parse.py"
SECONDS = 20

SEEDS = {
    "post.eml": b"From: Bob <bob@example.net>\r\nTo: discuss@example.org\r\nSubject: Hi\r\n"
                b"Message-ID: <1@example.net>\r\n\r\nHello.\r\n",
    "request.eml": b"From: new@example.com\r\nSubject: set digest plain\r\n\r\nsubscribe\r\n"
                   b"set regular\r\nend\r\n",
    "reply.eml": b"From: mod@mods.example\r\nSubject: Re: held\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n"
                 b"Content-Type: text/html; charset=utf-8\r\n\r\n<p>reject spam</p>\r\n--b--\r\n",
    "address.txt": b"discuss-confirm+abcdefghijklmnopqrstuvwxyz234567@example.org\n"
                   b"<@a.example:bob@b.example>\nbob%other.example@example.org\n",
    "verp.txt": b"discuss-bounces+bob=example.net@example.org\n",
}


def test_fuzz_parse_target_survives_a_bounded_run(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed: `pip install atheris` (CPython 3.11 wheels for "
                    "Linux x86-64) to run the fuzz target")
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    for name, data in SEEDS.items():
        (seeds / name).write_bytes(data)
    found = tmp_path / "found"   # libFuzzer writes what it finds to the first folder
    found.mkdir()
    shared = [CORPUS / "odd", CORPUS / "bounces"]
    dirs = [found, seeds, *(d for d in shared if d.is_dir())]
    nice = ["nice", "-n", "5"] if shutil.which("nice") else []  # others share this machine
    command = [*nice, sys.executable, str(TARGET), f"-max_total_time={SECONDS}", "-max_len=65536",
               "-timeout=10", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/",
               *map(str, dirs)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, timeout=SECONDS + 90,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    output = result.stderr.decode("utf-8", "replace")
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(
        ("crash-", "timeout-", "oom-", "leak-", "slow-unit-")))
    assert result.returncode == 0 and not crashes, (
        f"the fuzzer found {crashes}; rerun one with `python {TARGET.relative_to(REPO)} "
        f"FILE`:\n{output[-4000:]}")
    assert "Done" in output and " runs in " in output, output[-2000:]


# -- what the fuzzer found, fixed: each stays as a regression test ------------------------


def test_fuzz_finding_content_type_with_mixed_bytes() -> None:
    raw = (b"From: bob@example.net\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: text/plain; name="\xd0\xae\xd0\xbd\xf1.txt"\r\n\r\nHello.\r\n')
    assert facts.message_facts(raw).content_type == "text/plain"


def test_fuzz_finding_8bit_content_disposition() -> None:
    raw = (b"From: new@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain\r\n"
           b'Content-Disposition: inline; filename="\xe9t\xe9.txt"\r\n\r\nsubscribe\r\n')
    assert [c.verb for c in selfservice.commands_in(raw)] == ["subscribe"]
    assert find_command(raw, frozenset({"approve"})) is None


def test_fuzz_finding_nul_in_charset() -> None:
    raw = (b"From: new@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: text/plain; charset="utf\x00-8"\r\n\r\nsubscribe\r\n')
    assert [c.verb for c in selfservice.commands_in(raw)] == ["subscribe"]


def test_fuzz_finding_rfc2231_charset_whose_charset_has_a_nul() -> None:
    """The stdlib's get_content_charset raises on it; every reader of a part's text
    falls back to UTF-8 instead."""
    raw = (b"From: new@example.com\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset*=\x00\x00si-x3.4-1968''us-ascii\r\n\r\n"
           b"subscribe\r\n")
    assert content_charset(parse(raw)) is None
    assert [c.verb for c in selfservice.commands_in(raw)] == ["subscribe"]
    assert "subscribe" in promo.tokens(raw)
