"""The configuration file: defaults, validation that names the key, environment, paths."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from gateway import resources
from gateway.config import (
    MIB,
    Config,
    Seconds,
    load,
    parse_duration,
    parse_listener,
    parse_smarthost,
    store_url,
)
from gateway.errors import ConfigError
from tests.support import REPO

NO_ENV: dict[str, str] = {}


def write(tmp_path: Path, text: str, name: str = "listgate.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Config:
    return load(write(tmp_path, text), environ=NO_ENV if environ is None else environ)


def test_config_defaults_load_with_no_file() -> None:
    config = load(None, environ=NO_ENV)
    assert config.source is None
    assert config.store.url == "sqlite:///listgate.db"
    assert config.intake.listen == ("smtp://127.0.0.1:2525",)
    assert config.intake.max_message_size == 10 * MIB
    assert config.queue.lease == 60.0 and isinstance(config.queue.lease, Seconds)
    assert config.queue.max_attempts == 3
    assert config.delivery.smarthost == ""
    assert config.delivery.starttls == "opportunistic"
    assert config.delivery.lifetime == 5 * 86400.0
    assert config.paths.templates == resources.templates_dir()
    assert config.paths.policies == resources.policies_dir()
    assert (config.paths.policies / "default.toml").is_file()


def test_config_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = load_text(tmp_path, "")
    default = load(None, environ=NO_ENV)
    assert config.source == tmp_path / "listgate.toml"
    assert config.intake == default.intake
    assert config.queue == default.queue


def test_config_shipped_example_loads() -> None:
    config = load(REPO / "deploy" / "listgate.toml", environ=NO_ENV)
    assert config.delivery.smarthost == "smtp://127.0.0.1:25"
    assert config.delivery.retry_max == 3600.0
    assert config.intake.listen == ("lmtp://127.0.0.1:2424", "smtp://127.0.0.1:2525")


def test_config_shipped_example_names_every_key() -> None:
    """deploy/listgate.toml says it lists every key: a key added to the code must be
    documented there (paths excepted: their defaults depend on the installation)."""
    shipped = tomllib.loads((REPO / "deploy" / "listgate.toml").read_text())
    for section in dataclasses.fields(Config):
        if section.name in ("source", "paths"):
            continue
        keys = {f.name for f in dataclasses.fields(section.default_factory())}  # type: ignore[misc]
        assert set(shipped.get(section.name, {})) == keys, section.name


def test_config_values_from_the_file_are_used(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[intake]
listen = ["lmtp://127.0.0.1:2424"]
max_recipients = 7
hostname = "lists.example.org"
[queue]
lease = "2m"
[delivery]
smarthost = "smtps://relay.example.org"
starttls = "never"
""")
    assert config.intake.listen == ("lmtp://127.0.0.1:2424",)
    assert config.intake.max_recipients == 7
    assert config.hostname == "lists.example.org"
    assert config.queue.lease == 120.0
    assert config.delivery.starttls == "never"
    assert parse_smarthost(config.delivery.smarthost).port == 465


def test_config_unknown_section_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[stor]\nurl = 'sqlite:///x.db'\n")
    message = str(info.value)
    assert "unknown section [stor]" in message
    assert str(tmp_path / "listgate.toml") in message
    assert "store" in message  # the known sections are listed


def test_config_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[delivery]\nsmart_host = 'smtp://x:25'\n")
    message = str(info.value)
    assert "unknown key 'smart_host' in [delivery]" in message
    assert "smarthost" in message


def test_config_section_that_is_not_a_table_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[queue\] must be a table"):
        load_text(tmp_path, "queue = 3\n")


def test_config_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "[intake\nlisten = \n")
    assert "not valid TOML" in str(info.value)
    assert "listgate.toml" in str(info.value)


@pytest.mark.parametrize("text, key, expected", [
    ('[intake]\nmax_recipients = "100"\n', "[intake] max_recipients", "an integer"),
    ("[intake]\nmax_recipients = true\n", "[intake] max_recipients", "an integer"),
    ("[intake]\nmax_recipients = 1.5\n", "[intake] max_recipients", "an integer"),
    ("[queue]\nmax_attempts = false\n", "[queue] max_attempts", "an integer"),
    ('[queue]\nlease = "5 weeks"\n', "[queue] lease", "a duration"),
    ("[queue]\nlease = true\n", "[queue] lease", "a duration"),
    ("[queue]\nretry_delay = -5\n", "[queue] retry_delay", "a duration that is not negative"),
    ('[delivery]\ntimeout = "m5"\n', "[delivery] timeout", "a duration"),
    ("[delivery]\nsmarthost = 25\n", "[delivery] smarthost", "a string"),
    ("[delivery]\noutbox = 1\n", "[delivery] outbox", "a path"),
    ('[intake]\nlisten = "smtp://127.0.0.1:2525"\n', "[intake] listen", "a list of strings"),
    ("[intake]\nlisten = [2525]\n", "[intake] listen", "a list of strings"),
])
def test_config_wrong_type_names_the_key(tmp_path: Path, text: str, key: str,
                                         expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert key in message, message
    assert f"expected {expected}" in message, message


@pytest.mark.parametrize("text, key", [
    ('[intake]\nlisten = ["http://127.0.0.1:2525"]\n', "[intake] listen"),
    ('[intake]\nlisten = ["smtp://127.0.0.1"]\n', "[intake] listen"),
    ('[intake]\nlisten = ["127.0.0.1:2525"]\n', "[intake] listen"),
    ('[delivery]\nsmarthost = "relay.example.org:25"\n', "[delivery] smarthost"),
    ('[delivery]\nsmarthost = "http://relay.example.org"\n', "[delivery] smarthost"),
    ('[delivery]\nsmarthost = "smtp://relay.example.org:99999"\n', "[delivery] smarthost"),
    ('[delivery]\nstarttls = "always"\n', "[delivery] starttls"),
    ("[intake]\nmax_recipients = 0\n", "[intake] max_recipients"),
    ("[intake]\nmax_message_size = -1\n", "[intake] max_message_size"),
    ("[queue]\nmax_attempts = 0\n", "[queue] max_attempts"),
    ("[delivery]\nconnections = 0\n", "[delivery] connections"),
    ("[delivery]\nmax_recipients = 0\n", "[delivery] max_recipients"),
    ("[fanout]\nchunk = 0\n", "[fanout] chunk"),
    ("[store]\npool_size = 0\n", "[store] pool_size"),
    ("[intake]\nmax_line_length = 999\n", "[intake] max_line_length"),
    ('[queue]\nlease = "500ms"\n', "[queue] lease"),
    ('[log]\nlevel = "LOUD"\n', "[log] level"),
    ('[store]\nurl = "mysql://db/listgate"\n', "[store] url"),
    ("[daemon]\nstage_nice = 20\n", "[daemon] stage_nice"),
    ("[daemon]\nstage_nice = -5\n", "[daemon] stage_nice"),
])
def test_config_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert key in message, message
    assert str(tmp_path / "listgate.toml") in message


@pytest.mark.parametrize("value, seconds", [
    ("90s", 90.0),
    ("5m", 300.0),
    ("2h", 7200.0),
    ("5d", 432000.0),
    (30, 30.0),
    (1.5, 1.5),
    ("250ms", 0.25),
    ("45", 45.0),
    (" 10 s ", 10.0),
    ("0", 0.0),
])
def test_config_durations(value: object, seconds: float) -> None:
    parsed = parse_duration(value)
    assert isinstance(parsed, Seconds)
    assert parsed == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["5w", "m", "", "1h30m", "-5s", True, None, [5]])
def test_config_bad_durations_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


def test_config_durations_in_the_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[queue]
poll_interval = "250ms"
retry_delay = 30
[delivery]
retry_initial = "90s"
retry_max = "2h"
lifetime = "5d"
timeout = "5m"
""")
    assert config.queue.poll_interval == pytest.approx(0.25)
    assert config.queue.retry_delay == 30.0
    assert config.delivery.retry_initial == 90.0
    assert config.delivery.retry_max == 7200.0
    assert config.delivery.lifetime == 432000.0
    assert config.delivery.timeout == 300.0


def test_config_environment_overrides_win_over_the_file(tmp_path: Path) -> None:
    config = load_text(tmp_path, """
[store]
url = "sqlite:///from-file.db"
[intake]
listen = ["smtp://127.0.0.1:2525"]
max_recipients = 10
[delivery]
password = "from-file"
retry_initial = "1m"
""", environ={
        "LISTGATE_STORE_URL": "postgresql+psycopg://gw@db.example.org/listgate",
        "LISTGATE_INTAKE_MAX_RECIPIENTS": "25",
        "LISTGATE_INTAKE_LISTEN": "smtp://127.0.0.1:1025, lmtp://127.0.0.1:1024,",
        "LISTGATE_DELIVERY_PASSWORD": "s3cret",
        "LISTGATE_DELIVERY_RETRY_INITIAL": "2h",
        "LISTGATE_QUEUE_MAX_ATTEMPTS": "5",
        "LISTGATE_UNRELATED": "ignored",
    })
    assert config.store.url == "postgresql+psycopg://gw@db.example.org/listgate"
    assert config.intake.max_recipients == 25
    assert config.intake.listen == ("smtp://127.0.0.1:1025", "lmtp://127.0.0.1:1024")
    assert config.delivery.password == "s3cret"
    assert config.delivery.retry_initial == 7200.0
    assert config.queue.max_attempts == 5  # not in the file at all


def test_config_environment_overrides_apply_with_no_file() -> None:
    config = load(None, environ={"LISTGATE_DELIVERY_SMARTHOST": "smtp://127.0.0.1:2500"})
    assert config.delivery.smarthost == "smtp://127.0.0.1:2500"


@pytest.mark.parametrize("name, value, expected", [
    ("LISTGATE_INTAKE_MAX_RECIPIENTS", "many", "an integer"),
    ("LISTGATE_QUEUE_LEASE", "forever", "a duration"),
])
def test_config_bad_environment_value_names_the_variable(tmp_path: Path, name: str, value: str,
                                                         expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, "", environ={name: value})
    message = str(info.value)
    assert f"environment variable {name}" in message
    assert f"expected {expected}" in message


def test_config_environment_value_is_still_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[delivery\] smarthost"):
        load_text(tmp_path, "", environ={"LISTGATE_DELIVERY_SMARTHOST": "not a url"})


def test_config_relative_paths_resolve_against_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "listgate"
    folder.mkdir(parents=True)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(write(folder, """
[delivery]
outbox = "spool/outbox"
[paths]
templates = "templates"
policies = "/srv/policies"
"""), environ=NO_ENV)
    assert config.delivery.outbox == folder / "spool" / "outbox"
    assert config.paths.templates == folder / "templates"
    assert config.paths.policies == Path("/srv/policies")


def test_config_relative_path_from_the_environment_resolves_against_the_config_folder(
        tmp_path: Path) -> None:
    config = load_text(tmp_path, "", environ={"LISTGATE_DELIVERY_OUTBOX": "out"})
    assert config.delivery.outbox == tmp_path / "out"


def test_config_default_outbox_follows_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    config = load(write(folder, "[delivery]\nconnections = 2\n"), environ=NO_ENV)
    assert config.delivery.outbox == folder / "outbox"


def test_config_store_url_makes_a_relative_sqlite_path_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "conf"
    folder.mkdir()
    config = load(write(folder, '[store]\nurl = "sqlite:///data/listgate.db"\n'), environ=NO_ENV)
    assert store_url(config) == f"sqlite:///{folder / 'data' / 'listgate.db'}"
    assert Path(store_url(config).removeprefix("sqlite:///")).is_absolute()


@pytest.mark.parametrize("url", [
    "sqlite:////var/lib/listgate/listgate.db",
    "sqlite:///:memory:",
    "postgresql+psycopg://gw@db.example.org/listgate",
])
def test_config_store_url_leaves_absolute_and_server_urls_alone(tmp_path: Path, url: str) -> None:
    config = load_text(tmp_path, f'[store]\nurl = "{url}"\n')
    assert store_url(config) == url


def test_config_store_url_without_a_file_is_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert store_url(load(None, environ=NO_ENV)) == f"sqlite:///{tmp_path / 'listgate.db'}"


def test_config_missing_file_named_explicitly_says_how_to_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "listgate.toml"
    with pytest.raises(ConfigError) as info:
        load(missing, environ=NO_ENV)
    message = str(info.value)
    assert str(missing) in message
    assert "no such configuration file" in message
    assert f"listgate --config {missing} init" in message


@pytest.mark.parametrize("url, protocol, host, port", [
    ("smtp://127.0.0.1:2525", "smtp", "127.0.0.1", 2525),
    ("lmtp://[::1]:2424", "lmtp", "::1", 2424),
    ("smtp://localhost:0", "smtp", "localhost", 0),
])
def test_config_parse_listener(url: str, protocol: str, host: str, port: int) -> None:
    listener = parse_listener(url)
    assert (listener.protocol, listener.host, listener.port) == (protocol, host, port)


@pytest.mark.parametrize("url, host, port, tls", [
    ("smtp://relay.example.org", "relay.example.org", 25, False),
    ("smtp://relay.example.org:587", "relay.example.org", 587, False),
    ("smtps://relay.example.org", "relay.example.org", 465, True),
    ("smtps://127.0.0.1:10465", "127.0.0.1", 10465, True),
])
def test_config_parse_smarthost(url: str, host: str, port: int, tls: bool) -> None:
    smarthost = parse_smarthost(url)
    assert (smarthost.host, smarthost.port, smarthost.implicit_tls) == (host, port, tls)
