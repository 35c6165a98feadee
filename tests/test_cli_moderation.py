"""The moderation commands of the CLI, and the daemon's handling of policy files."""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.schema import RoleName
from gateway.store import Store
from tests.conftest import LIST, MEMBERS, NEWBIE, discussion_list
from tests.support import (
    CORPUS,
    GatewayProcess,
    Sink,
    free_port,
    gateway,
    post,
    wait_until,
    write_config,
)


@pytest.fixture
def shipped_policy(tmp_path: Path, sink: Sink, store: Store, store_url: str) -> Path:
    discussion_list(store, roles={MEMBERS[0]: RoleName.OWNER})
    return write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url)


def cli(config: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--config", str(config), *args])
    return result.exit_code, result.output


def test_cli_held_ls_show_and_approve_release_a_post(shipped_policy: Path, sink: Sink) -> None:
    with gateway(shipped_policy) as gw:
        gw.send(NEWBIE, LIST, post(NEWBIE, LIST, "Hello from the new one", "Hi all.\n"))
        wait_until(lambda: "1 held post(s)" in cli(shipped_policy, "held", "ls")[1],
                   what="the hold")
        code, listing = cli(shipped_policy, "held", "ls", LIST)
        assert code == 0 and NEWBIE in listing and "first post" in listing
        code, shown = cli(shipped_policy, "held", "show", "1")
        assert code == 0 and "Hello from the new one" in shown and "first post of" in shown
        code, done = cli(shipped_policy, "held", "approve", "1", "--as", "alice")
        assert code == 0 and "now approved" in done
        # (The owner's notice attaches the post too: count the list's copies by subject.)
        wait_until(lambda: sum(1 for r, d in sink.handler.copies() if r in MEMBERS
                               and b"Subject: [Discuss] Hello from the new one" in d)
                   == len(MEMBERS), what="the approved post at every member")
        code, again = cli(shipped_policy, "held", "reject", "1", "--reason", "late")
        assert code == 1 and "already approved by alice" in again
    assert cli(shipped_policy, "held", "ls")[1].strip().endswith("0 held post(s)")


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_cli_held_approve_rings_the_gateway_of_every_process(
        tmp_path: Path, sink: Sink, store: Store, store_url: str) -> None:
    """`held approve` against `serve` with two processes whose stages poll once an hour:
    the doorbell (answered by the stage worker) sends the post on at once."""
    discussion_list(store, roles={MEMBERS[0]: RoleName.OWNER})
    port = free_port()
    config = write_config(tmp_path / "gw", smarthost=sink.url, store_url=store_url,
                          listen=[f"smtp://127.0.0.1:{port}"], poll_interval="1h")
    config.write_text(f"[daemon]\nprocesses = 2\n{config.read_text()}")
    gw = GatewayProcess(config).start(port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(NEWBIE, LIST, post(NEWBIE, LIST, "Rung through", "Hi all.\n"))
        wait_until(lambda: "1 held post(s)" in cli(config, "held", "ls")[1], what="the hold")
        code, done = cli(config, "held", "approve", "1")
        assert code == 0 and "sends it now" in done, done
        wait_until(lambda: sum(1 for r, d in sink.handler.copies() if r in MEMBERS
                               and b"Subject: [Discuss] Rung through" in d) == len(MEMBERS),
                   what="the approved post at every member")
    finally:
        assert gw.terminate() == 0
    text = gw.log.read_text()
    assert text.count("commands that queue work ring it") == 1, text[-2000:]  # worker 1
    assert "cannot be bound" not in text and "another gateway answers" not in text


def test_cli_held_unknown_id_is_a_clear_error(shipped_policy: Path) -> None:
    code, output = cli(shipped_policy, "held", "approve", "999")
    assert code == 1 and "no held post #999" in output


def test_cli_promo_score_prints_one_tab_separated_line_per_file(tmp_path: Path,
                                                               shipped_policy: Path) -> None:
    advert = Path(__file__).parent / "fixtures" / "rules" / "advert.eml"
    discussion = Path(__file__).parent / "fixtures" / "rules" / "discussion.eml"
    code, output = cli(shipped_policy, "promo", "score", str(advert), str(discussion))
    assert code == 0
    lines = [line for line in output.splitlines() if line]
    assert len(lines) == 2
    path, score, verdict, signals = lines[0].split("\t")
    assert path == str(advert) and 0.0 <= float(score) <= 1.0 and verdict == "hold"
    assert signals
    path, score, verdict, _signals = lines[1].split("\t")
    assert verdict == "pass" and float(score) < 0.5


def test_cli_promo_score_walks_a_folder(shipped_policy: Path) -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"the shared mail corpus is not at {CORPUS}")
    folder = Path(__file__).parent / "fixtures" / "rules"
    code, output = cli(shipped_policy, "promo", "score", str(folder))
    assert code == 0
    assert len(output.strip().splitlines()) == len(list(folder.glob("*.eml")))


def test_cli_policy_check_names_the_bad_rule(tmp_path: Path, shipped_policy: Path) -> None:
    folder = shipped_policy.parent / "policies"
    folder.mkdir()
    (folder / "default.toml").write_text('[[chain]]\nrule = "no-such-rule"\naction = "hold"\n')
    shipped_policy.write_text(shipped_policy.read_text() + '\n[paths]\npolicies = "policies"\n')
    code, output = cli(shipped_policy, "policy", "check")
    assert code == 1 and "unknown rule 'no-such-rule'" in output and "default.toml" in output
    # ...and the daemon refuses to start on it, saying the same.
    code, output = cli(shipped_policy, "serve")
    assert code == 1 and "unknown rule 'no-such-rule'" in output


def test_cli_lists_set_emergency_holds_a_members_post(shipped_policy: Path,
                                                       store: Store) -> None:
    assert cli(shipped_policy, "lists", "set", LIST, "--emergency", "on")[0] == 0
    with gateway(shipped_policy) as gw:
        gw.send(MEMBERS[1], LIST, post(MEMBERS[1], LIST, "Normal post"))
        wait_until(lambda: "emergency" in cli(shipped_policy, "held", "ls")[1], what="hold")
    assert cli(shipped_policy, "lists", "set", LIST, "--emergency", "off")[0] == 0


@pytest.mark.slow
def test_cli_sighup_rereads_lists_and_policies(tmp_path: Path, shipped_policy: Path,
                                              store_url: str, sink: Sink) -> None:
    port = free_port()
    config = write_config(tmp_path / "proc", smarthost=sink.url, store_url=store_url,
                          listen=[f"smtp://127.0.0.1:{port}"],
                          sections='[paths]\npolicies = "policies"')
    policies = config.parent / "policies"
    policies.mkdir()
    shipped = (Path(__file__).resolve().parent.parent / "policies" / "default.toml").read_text()
    (policies / "default.toml").write_text(shipped)
    gw = GatewayProcess(config).start(port)
    assert gw.proc is not None
    try:
        assert cli(config, "lists", "create", "fresh@example.org")[0] == 0
        os.kill(gw.proc.pid, signal.SIGHUP)

        def routable() -> bool:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo()
                client.mail(MEMBERS[0])
                return client.rcpt("fresh@example.org")[0] == 250
        wait_until(routable, timeout=4, what="the new list after SIGHUP")
        (policies / "default.toml").write_text("[[chain]]\nrule = 'nope'\naction = 'hold'\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_until(lambda: "policies NOT reloaded" in gw.log.read_text(), what="the refusal")
        assert gw.proc.poll() is None  # still running, on the policies in force
    finally:
        assert gw.terminate() == 0
