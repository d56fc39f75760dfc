"""Settings: sources, precedence and the one-line errors that stop start-up."""

import json
import os
import subprocess
import sys

import pytest

from bioproxy import config
from bioproxy.config import ConfigError, Settings, load
from tests.servers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, values):
    path.write_text(json.dumps(values))
    return {"BIOPROXY_CONFIG": str(path)}


def test_defaults_when_the_config_file_named_is_empty(tmp_path):
    settings = load(environ=write(tmp_path / "c.json", {}))

    assert settings == Settings()
    assert (settings.proxy_port, settings.admin_port) == (8088, 8089)
    assert settings.admin_host == settings.proxy_host == "127.0.0.1"  # loopback only
    assert settings.backend_url == "http://localhost:8081"


def test_without_any_config_file_the_examples_are_served_and_said(tmp_path):
    environ = {"HOME": str(tmp_path)}

    assert config.config_path(environ) == config.EXAMPLES
    settings = load(environ=environ)

    assert sorted(settings.prefixes) == ["@code", "@review"]
    line = config.describe_source(settings, environ)
    assert line == (
        f"config: {config.EXAMPLES} (the examples: no config file at "
        f"{tmp_path}/.config/bioproxy/config.json); 2 template(s): @code, @review"
    )


def test_the_default_file_is_read(tmp_path):
    folder = tmp_path / ".config/bioproxy"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"proxy_port": 9000}')

    assert load(environ={"HOME": str(tmp_path)}).proxy_port == 9000


def test_keys_of_the_original_go_bioproxy_are_read(tmp_path):
    values = {
        "proxy_host": "0.0.0.0",
        "proxy_port": 18088,
        "admin_host": "::1",
        "admin_port": 18089,
        "backend_url": "http://gpu-box:8081",
        "warmup_check_interval": 5,
        "prefixes": {"@code": "templates/code.txt"},
    }

    settings = load(environ=write(tmp_path / "c.json", values))

    for key, value in values.items():
        assert getattr(settings, key) == value
    assert settings.admin_bind == "[::1]:18089"


def test_environment_beats_file_and_overrides_beat_environment(tmp_path):
    environ = write(tmp_path / "c.json", {"proxy_port": 9000, "backend_url": "http://a:1"})
    environ.update(
        BIOPROXY_PROXY_PORT="9001",
        BIOPROXY_WARMUP_CHECK_INTERVAL="2.5",
        BIOPROXY_PREFIXES='{"@x": "x.txt"}',
        BIOPROXY_WARMUP_ONLY_WHEN_IDLE="off",
    )

    settings = load({"backend_url": "http://b:2"}, environ=environ)

    assert settings.proxy_port == 9001
    assert settings.warmup_check_interval == 2.5
    assert settings.prefixes == {"@x": "x.txt"}
    assert settings.backend_url == "http://b:2"
    assert settings.warmup_only_when_idle is False


@pytest.mark.parametrize(
    "values, message",
    [
        ({"proxy_prot": 1}, "unknown key 'proxy_prot'"),
        ({"proxy_port": "8088"}, "proxy_port must be an integer"),
        ({"proxy_port": True}, "proxy_port must be an integer"),
        ({"proxy_port": 70000}, "proxy_port must be a port number"),
        ({"admin_port": 8088}, "proxy_port and admin_port are both 8088"),
        ({"backend_url": "localhost:8081"}, "backend_url must be an http:// or https:// URL"),
        ({"backend_url": "http://"}, "backend_url must be an http:// or https:// URL"),
        ({"backend_url": "http://h:99999"}, "backend_url has an invalid port"),
        ({"warmup_check_interval": 0}, "warmup_check_interval must be greater than 0"),
        ({"upstream_timeout": "slow"}, "upstream_timeout must be a number"),
        ({"prefixes": ["@code"]}, "prefixes must be a JSON object"),
        ({"prefixes": {"@my code": "a.txt"}}, "prefix '@my code'"),
        ({"prefixes": {"@code": 3}}, "maps '@code' to 3"),
        ({"proxy_host": " "}, "proxy_host must not be empty"),
        ({"warmup_only_when_idle": 1}, "warmup_only_when_idle must be true or false"),
        ({"queue_max_length": -1}, "queue_max_length must be 0 or more"),
        ({"variant_budget_bytes": -1}, "variant_budget_bytes must be 0 or more"),
        ({"queue_timeout": 0}, "queue_timeout must be greater than 0"),
        ({"warmup_concurrency": 0}, "warmup_concurrency must be 1 or more"),
        # 0 would turn gunicorn's keep-alive off, and with it the limit on slow headers.
        ({"client_header_timeout": 0}, "client_header_timeout must be greater than 0"),
        ({"client_header_timeout": 2.5}, "client_header_timeout must be an integer"),
        ({"client_body_timeout": 0}, "client_body_timeout must be greater than 0"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load(environ=write(tmp_path / "c.json", values))


def test_unparseable_json_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"proxy_port": 8088,}')

    with pytest.raises(ConfigError, match=f"config file {path} is not valid JSON"):
        load(environ={"BIOPROXY_CONFIG": str(path)})


def test_a_named_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(environ={"BIOPROXY_CONFIG": str(tmp_path / "missing.json")})


def test_a_bad_environment_value_is_refused():
    with pytest.raises(ConfigError, match="BIOPROXY_ADMIN_PORT: expected an integer, got 'x'"):
        load(environ={"HOME": "/nonexistent", "BIOPROXY_ADMIN_PORT": "x"})


def test_a_bad_boolean_in_the_environment_is_refused():
    with pytest.raises(ConfigError, match="BIOPROXY_WARMUP_ONLY_WHEN_IDLE: expected true or false"):
        load(environ={"HOME": "/nonexistent", "BIOPROXY_WARMUP_ONLY_WHEN_IDLE": "maybe"})


def run_gunicorn_check(environ, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIOPROXY_")}
    env.update(environ)
    args = args or ("--check-config",)
    return subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *args, "wsgi:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gunicorn_stops_at_a_bad_config_with_one_clear_line(tmp_path):
    environ = write(tmp_path / "c.json", {"backend_url": "ftp://x"})

    result = run_gunicorn_check(environ)

    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "bioproxy: configuration error: "
        f"{tmp_path / 'c.json'}: backend_url must be an http:// or https:// URL with a host, "
        "got 'ftp://x'"
    ]


def test_gunicorn_accepts_a_good_config(tmp_path):
    result = run_gunicorn_check(write(tmp_path / "c.json", {"proxy_port": 18088}))

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args, named", [(["-w", "2"], "workers = 2"), (["-k", "sync"], "worker_class = 'sync'")]
)
def test_gunicorn_refuses_more_workers_or_another_worker_class(tmp_path, args, named):
    ports = {"proxy_port": free_port(), "admin_port": free_port()}

    result = run_gunicorn_check(write(tmp_path / "c.json", ports), *args)

    assert result.returncode != 0
    assert "runs with exactly one gevent worker" in result.stderr
    assert named in result.stderr
