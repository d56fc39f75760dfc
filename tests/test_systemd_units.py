"""deploy/systemd: the units pass `systemd-analyze verify`, and keep bioproxy's stop graceful.

`systemd-analyze verify` checks a unit's sections, directives and values, but it reports
unknown directives and unparsable values as warnings and still exits 0; only a program
that does not exist makes it fail. So these tests give each missing program a stand-in
and fail on any line of its output that names one of the units.
"""

import ast
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
UNIT_FOLDER = ROOT / "deploy" / "systemd"
UNITS = ("llama-server.service", "bioproxy.service")
ENV_FILE = UNIT_FOLDER / "bioproxy.env"
GUNICORN_CONF = ROOT / "gunicorn.conf.py"

# An Exec*= line whose program is an absolute path, after systemd's prefixes (-, @, :, +, !).
EXEC_LINE = re.compile(r"^(Exec[A-Za-z]+=[-@:+!]*)(/\S+)", re.MULTILINE)


def systemd_analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is not installed, so the systemd units cannot be checked: "
            "run scripts/setup --dev"
        )
    return path


def read_unit(text):
    """A unit file's settings as {section: [(key, value), ...]}, in the file's order."""
    sections = {}
    entries = None
    # systemd joins a line ending in a backslash to the next, with a space.
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            entries = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            entries.append((key.strip(), value.strip()))
    return sections


def settings(name, section, key):
    """Every value of key in one section of a unit in deploy/systemd."""
    unit = read_unit((UNIT_FOLDER / name).read_text())
    return [value for k, value in unit.get(section, []) if k == key]


def with_stand_ins(text, folder):
    """The unit's text, with each program it runs that does not exist on this machine
    replaced by an executable stand-in at the same path under folder. Arguments, prefixes
    and every other line stay as they are."""

    def replace(match):
        start, program = match.groups()
        if os.access(program, os.X_OK):
            return match.group(0)
        stand_in = folder / program.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
        return f"{start}{stand_in}"

    return EXEC_LINE.sub(replace, text)


def verify(folder, texts):
    """Run `systemd-analyze verify` on units given as {file name: text}.

    Returns its exit status, the lines of its output that name one of these units (every
    warning about them does), and the whole output.
    """
    units = folder / "units"
    units.mkdir()
    for name, text in texts.items():
        (units / name).write_text(with_stand_ins(text, folder / "stand-ins"))
    result = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", *(str(units / name) for name in texts)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if any(name in line for name in texts)]
    return result.returncode, problems, output


def shipped_units():
    return {name: (UNIT_FOLDER / name).read_text() for name in UNITS}


def seconds(timespan):
    """A systemd time span (`75`, `75s`, `1min 15s`) in seconds, as systemd reads it."""
    result = subprocess.run(
        [systemd_analyze(), "timespan", timespan], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{timespan!r} is not a time span: {result.stderr}"
    micro = re.search(r"^\s*(?:μs|us):\s*(\d+)\s*$", result.stdout, re.MULTILINE)
    assert micro, result.stdout
    return int(micro.group(1)) / 1_000_000


def gunicorn_setting(name):
    """A constant that gunicorn.conf.py assigns at module level."""
    tree = ast.parse(GUNICORN_CONF.read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
            and isinstance(node.value, ast.Constant)
        ):
            return node.value.value
    raise AssertionError(f"gunicorn.conf.py assigns no constant {name}")


def test_units_pass_systemd_analyze_verify(tmp_path):
    status, problems, output = verify(tmp_path, shipped_units())

    assert status == 0 and not problems, output


@pytest.mark.parametrize(
    ("name", "old", "new", "reported"),
    [
        ("bioproxy.service", "TimeoutStopSec=75", "TimeoutStopSecs=75", "Unknown key"),
        ("bioproxy.service", "KillMode=mixed", "KillMode=gentle", "Failed to parse"),
        ("bioproxy.service", "RestartSec=5", "RestartSec=five", "Failed to parse"),
        ("llama-server.service", "[Service]", "[Servcie]", "Unknown section"),
        ("llama-server.service", "Restart=on-failure", "Restart=on-crash", "Failed to parse"),
    ],
)
def test_verify_reports_a_broken_unit(tmp_path, name, old, new, reported):
    texts = shipped_units()
    assert texts[name].count(old) == 1, f"{name} no longer has one {old!r} to break"
    texts[name] = texts[name].replace(old, new)

    _, problems, output = verify(tmp_path, texts)

    assert problems, f"systemd-analyze verify did not report {new!r}:\n{output}"
    assert reported in output, output


def test_bioproxy_waits_longer_than_gunicorns_graceful_timeout():
    graceful = gunicorn_setting("graceful_timeout")
    stops = settings("bioproxy.service", "Service", "TimeoutStopSec")
    assert len(stops) == 1, "bioproxy.service must set TimeoutStopSec= once"
    [stop] = stops

    # Otherwise systemd kills the streams that gunicorn lets finish on SIGTERM.
    assert seconds(stop) > graceful, (
        f"TimeoutStopSec={stop} must be longer than gunicorn's graceful_timeout = {graceful}"
    )


def test_bioproxy_reloads_with_sighup_to_gunicorns_master():
    reload_commands = settings("bioproxy.service", "Service", "ExecReload")

    assert reload_commands and reload_commands[-1] == "/bin/kill -HUP $MAINPID"


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_as_an_unprivileged_user(name):
    users = settings(name, "Service", "User")

    assert len(users) == 1, f"{name} must set User= once"
    assert users[0] not in ("", "root", "0"), f"{name} runs as {users[0]!r}"


def test_both_units_share_the_user_that_owns_the_slot_folder():
    assert settings("llama-server.service", "Service", "User") == settings(
        "bioproxy.service", "Service", "User"
    )


def test_env_file_sets_what_llama_server_needs():
    [command] = settings("llama-server.service", "Service", "ExecStart")
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", command))
    defined = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)=", ENV_FILE.read_text(), re.MULTILINE))

    assert used, command
    assert used <= defined, f"{ENV_FILE.name} does not set {sorted(used - defined)}"
