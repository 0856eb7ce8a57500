"""Settings: defaults, config/settings.toml, files, environment, validation."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from modelfleet.config import Settings, load_settings, settings_from_mapping
from modelfleet.errors import ConfigError

SETTINGS_TOML = Path(__file__).resolve().parents[2] / "config" / "settings.toml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No MODELFLEET_* variable from the caller's shell, and a cwd without config/."""
    for name in list(os.environ):
        if name.upper().startswith("MODELFLEET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- config/settings.toml and the defaults in code ------------------------------------------


def test_settings_toml_holds_every_default_and_nothing_else() -> None:
    in_file = tomllib.loads(SETTINGS_TOML.read_text())
    in_code = Settings().model_dump()
    # Settings whose default is None (unset) cannot be written in TOML, which has no null: the
    # file shows them commented out (checked below).
    assert in_code["routing"].pop("startup_listen_s") is None
    assert in_code["worker"].pop("stuck_exit_s") is None

    assert in_file.keys() == in_code.keys()
    for key, default in in_code.items():
        if isinstance(default, dict):
            assert in_file[key].keys() == default.keys(), f"section [{key}]"
            for name, value in default.items():
                assert in_file[key][name] == value, f"{key}.{name}"
                assert type(in_file[key][name]) is type(value), f"{key}.{name}"
        else:
            assert in_file[key] == default, key
            assert type(in_file[key]) is type(default), key


def test_settings_toml_top_level_keys_come_first() -> None:
    lines = [line.strip() for line in SETTINGS_TOML.read_text().splitlines()]
    first_section = next(i for i, line in enumerate(lines) if line.startswith("["))
    top = [line.split("=")[0].strip() for line in lines[:first_section] if "=" in line]
    assert [k for k in top if not k.startswith("#")] == ["namespace", "log_level", "event_loop"]


def test_settings_toml_comments_every_key() -> None:
    lines = SETTINGS_TOML.read_text().splitlines()
    keys = 0
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith(("#", "[")):
            keys += 1
            assert lines[i - 1].startswith("# "), f"no comment above {line!r}"
    assert (
        keys
        == sum(len(v) if isinstance(v, dict) else 1 for v in Settings().model_dump().values()) - 2
    )  # startup_listen_s and stuck_exit_s are commented out


def test_settings_toml_shows_startup_listen_commented_out() -> None:
    text = SETTINGS_TOML.read_text()
    routing = text[text.index("[routing]") : text.index("[worker]")]
    assert "\n# startup_listen_s = " in routing
    assert "heartbeat.timeout_s" in routing
    assert "startup_listen_s" not in tomllib.loads(text)["routing"]


def test_settings_toml_says_where_credentials_go() -> None:
    head = SETTINGS_TOML.read_text().split("\n\n")[0]
    assert "MODELFLEET_AMQP__URL" in head
    assert "config/.secrets.toml" in head


def test_settings_toml_loads_to_the_defaults() -> None:
    assert load_settings(SETTINGS_TOML) == Settings()


def test_no_file_no_env_gives_defaults() -> None:
    assert load_settings() == Settings()


# --- files ------------------------------------------------------------------------------------


def test_explicit_file_is_read(tmp_path: Path) -> None:
    path = write(
        tmp_path / "elsewhere" / "fleet.toml",
        'namespace = "team-a"\nlog_level = "debug"\n[heartbeat]\ninterval_s = 1.0\n'
        "timeout_s = 4.0\n[worker]\nconcurrency = 16\n",
    )
    settings = load_settings(path)
    assert settings.namespace == "team-a"
    assert settings.log_level == "DEBUG"
    assert settings.heartbeat.interval_s == 1.0
    assert settings.heartbeat.timeout_s == 4.0
    assert settings.worker.concurrency == 16
    # Keys the file does not name keep their defaults.
    assert settings.heartbeat.sweep_interval_s == 0.5
    assert settings.http == Settings().http


def test_file_from_modelfleet_config_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.toml", 'namespace = "from-env-path"\n')
    monkeypatch.setenv("MODELFLEET_CONFIG", str(path))
    assert load_settings().namespace == "from-env-path"


def test_default_file_in_cwd_is_read(clean_env: Path) -> None:
    write(clean_env / "config" / "settings.toml", 'namespace = "from-cwd"\n')
    assert load_settings().namespace == "from-cwd"


def test_explicit_file_beats_default_file(clean_env: Path) -> None:
    write(clean_env / "config" / "settings.toml", 'namespace = "default-file"\n')
    path = write(clean_env / "other.toml", 'namespace = "explicit-file"\n')
    assert load_settings(path).namespace == "explicit-file"


def test_missing_explicit_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(missing)
    assert str(missing) in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file_from_env_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELFLEET_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_settings()


def test_secrets_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write(tmp_path / "settings.toml", "[amqp]\nheartbeat_s = 7\n")
    secrets = write(
        tmp_path / "vault" / "secrets.toml", '[amqp]\nurl = "amqp://admin:s3cret@broker:5672/"\n'
    )
    monkeypatch.setenv("MODELFLEET_SECRETS_FILE", str(secrets))
    settings = load_settings(config)
    assert settings.amqp.url == "amqp://admin:s3cret@broker:5672/"
    # The secrets file merges into the section; it does not replace it.
    assert settings.amqp.heartbeat_s == 7


def test_default_secrets_file_in_cwd(clean_env: Path) -> None:
    write(clean_env / "config" / ".secrets.toml", '[amqp]\nurl = "amqps://u:p@secure:5671/"\n')
    assert load_settings().amqp.url == "amqps://u:p@secure:5671/"


def test_missing_secrets_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELFLEET_SECRETS_FILE", str(tmp_path / "gone.toml"))
    with pytest.raises(ConfigError, match=r"gone\.toml"):
        load_settings()


# --- environment ------------------------------------------------------------------------------


def test_env_amqp_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_AMQP__URL", "amqp://fleet:pw@rabbit.internal:5673/prod")
    settings = load_settings()
    assert settings.amqp.url == "amqp://fleet:pw@rabbit.internal:5673/prod"
    assert settings.amqp.heartbeat_s == 5  # the rest of the section keeps its defaults


def test_env_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_NAMESPACE", "team_b-2")
    assert load_settings().namespace == "team_b-2"


def test_env_heartbeat_short_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_HEARTBEAT__INTERVAL", "0.25")
    monkeypatch.setenv("MODELFLEET_HEARTBEAT__TIMEOUT", "1.0")
    heartbeat = load_settings().heartbeat
    assert heartbeat.interval_s == 0.25
    assert heartbeat.timeout_s == 1.0


def test_env_heartbeat_canonical_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_HEARTBEAT__INTERVAL_S", "1.5")
    monkeypatch.setenv("MODELFLEET_HEARTBEAT__TIMEOUT_S", "9")
    heartbeat = load_settings().heartbeat
    assert heartbeat.interval_s == 1.5
    assert heartbeat.timeout_s == 9.0


def test_env_http_port_is_an_int(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_HTTP__PORT", "0")
    port = load_settings().http.port
    assert port == 0
    assert type(port) is int


def test_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path / "s.toml",
        'namespace = "from-file"\n[http]\nport = 8080\nhost = "0.0.0.0"\n',
    )
    monkeypatch.setenv("MODELFLEET_NAMESPACE", "from-env")
    monkeypatch.setenv("MODELFLEET_HTTP__PORT", "9090")
    settings = load_settings(path)
    assert settings.namespace == "from-env"
    assert settings.http.port == 9090
    assert settings.http.host == "0.0.0.0"  # from the file: env overrides keys, not sections


@pytest.mark.parametrize("suffix", ["", "_S"])
def test_env_heartbeat_beats_file_canonical_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    # The file names the canonical keys; the environment may use either name and must win.
    path = write(tmp_path / "s.toml", "[heartbeat]\ninterval_s = 2.0\ntimeout_s = 6.0\n")
    monkeypatch.setenv(f"MODELFLEET_HEARTBEAT__INTERVAL{suffix}", "0.25")
    monkeypatch.setenv(f"MODELFLEET_HEARTBEAT__TIMEOUT{suffix}", "1.0")
    heartbeat = load_settings(path).heartbeat
    assert (heartbeat.interval_s, heartbeat.timeout_s) == (0.25, 1.0)


def test_env_beats_the_shipped_settings_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_HEARTBEAT__TIMEOUT", "3")
    assert load_settings(SETTINGS_TOML).heartbeat.timeout_s == 3.0


def test_env_beats_secrets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = write(tmp_path / "secrets.toml", '[amqp]\nurl = "amqp://a:b@from-secrets/"\n')
    monkeypatch.setenv("MODELFLEET_SECRETS_FILE", str(secrets))
    monkeypatch.setenv("MODELFLEET_AMQP__URL", "amqp://a:b@from-env/")
    assert load_settings().amqp.url == "amqp://a:b@from-env/"


# --- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[heartbeat]\ntimeout_s = -1\n", "heartbeat.timeout_s"),
        ("[heartbeat]\ninterval_s = 2.0\ntimeout_s = 2.0\n", "heartbeat"),
        ("[heartbeat]\ninterval_s = 5.0\ntimeout_s = 3.0\n", "heartbeat"),
        ('[amqp]\nurl = "http://x"\n', "amqp.url"),
        ('[amqp]\nurl = "amqp://"\n', "amqp.url"),
        ('[amqp]\nurl = "amqp://h:notaport/"\n', "amqp.url"),
        ('namespace = "a.b"\n', "namespace"),
        ('namespace = ""\n', "namespace"),
        ('log_level = "LOUD"\n', "log_level"),
        ("[http]\nport = 70000\n", "http.port"),
        ("[heartbeat]\nbogus = 1\n", "heartbeat.bogus"),
        ('colour = "red"\n', "colour"),
    ],
)
def test_bad_value_in_file_is_one_line_naming_the_key(tmp_path: Path, toml: str, key: str) -> None:
    path = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{key}: "), message
    assert "\n" not in message


def test_timeout_not_above_interval_says_both(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[heartbeat]\ninterval_s = 2.0\ntimeout_s = 2.0\n")
    with pytest.raises(ConfigError, match=r"timeout_s \(2\.0\) must be larger than .*interval_s"):
        load_settings(path)


def test_unknown_key_says_unknown(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", "[worker]\nconcurrancy = 8\n")
    with pytest.raises(ConfigError, match=r"^worker\.concurrancy: unknown setting$"):
        load_settings(path)


def test_bad_value_in_env_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_HEARTBEAT__TIMEOUT_S", "-3")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith("heartbeat.timeout_s: ")
    assert "-3" in str(info.value)


def test_broken_toml_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.toml", "[heartbeat\ninterval_s = \n")
    with pytest.raises(ConfigError):
        load_settings(path)


@pytest.mark.parametrize(
    "data",
    [
        {"heartbeat": {"timeout_s": -1}},
        {"amqp": {"url": "http://x"}},
        {"namespace": "a.b"},
        {"routing": {"max_models": 0}},
    ],
)
def test_settings_from_mapping_raises_config_error(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        settings_from_mapping(data)


# --- shape ------------------------------------------------------------------------------------


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.namespace = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        settings.heartbeat.timeout_s = 1.0  # type: ignore[misc]
    assert settings.namespace == "modelfleet"
    assert settings.heartbeat.timeout_s == 6.0


def test_startup_listen_defaults_to_heartbeat_timeout() -> None:
    settings = settings_from_mapping({"heartbeat": {"interval_s": 1, "timeout_s": 4}})
    assert settings.startup_listen_s == 4.0
    explicit = settings_from_mapping({"routing": {"startup_listen_s": 0}})
    assert explicit.startup_listen_s == 0.0


@pytest.mark.parametrize(
    "url",
    ["http://bob:s3cret@host/", "amqp://bob:s3cret@host:99999/", "amqp://bob:s3cret@/"],
)
def test_a_bad_url_in_an_error_never_shows_its_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"amqp": {"url": url}})
    assert "s3cret" not in str(caught.value)
    assert "bob:***@" in str(caught.value)  # the rest is shown: the user can find the typo


def test_a_bad_api_key_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"gateway": {"api_keys": [12345678]}})
    assert "12345678" not in str(caught.value) and "gateway.api_keys" in str(caught.value)
