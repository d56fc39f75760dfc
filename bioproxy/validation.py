"""Checking config values: each key's type and range, and values read from the environment."""

import json
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A configuration problem, described in one line that names it."""


def parse_env(name, text, kind):
    if kind is bool:
        word = text.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected {_describe(kind)}, got {text!r}")
    try:
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is dict:
            return json.loads(text)
    except ValueError:
        raise ConfigError(f"{name}: expected {_describe(kind)}, got {text!r}") from None
    return text


def check(key, value, source, fields):
    """ConfigError unless value is one config key's, of its type and in its range."""
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(fields)})")
    kind = fields[key].type
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise ConfigError(f"{source}: {key} must be {_describe(kind)}, got {value!r}")
    problem = _problem(key, value)
    if problem:
        raise ConfigError(f"{source}: {key} {problem}, got {value!r}")


def _problem(key, value):
    """What is wrong with a value of the right type, or None."""
    if key.endswith("_port") and not 1 <= value <= 65535:
        return "must be a port number from 1 to 65535"
    if key.endswith("_host") and not value.strip():
        return "must not be empty"
    if key == "backend_url" or (key == "warmup_backend_url" and value):
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return "must be an http:// or https:// URL with a host"
        try:
            parts.port  # noqa: B018 - reading it validates it
        except ValueError:
            return "has an invalid port"
        if parts.query or parts.fragment:
            return "must not have a query or fragment"
    positive = key.endswith(("_timeout", "_bytes")) or key == "warmup_check_interval"
    if positive and key != "variant_budget_bytes" and value <= 0:
        return "must be greater than 0"
    if key in ("queue_max_length", "variant_budget_bytes", "warmup_backend_pid") and value < 0:
        return "must be 0 or more"
    if key in ("warmup_concurrency", "warmup_piece_chars") and value < 1:
        return "must be 1 or more"
    if key == "prefixes":
        for prefix, template in value.items():
            if not prefix or prefix != prefix.strip() or " " in prefix:
                return f"has a prefix {prefix!r} that is empty or holds spaces"
            if not isinstance(template, str) or not template:
                return f"maps {prefix!r} to {template!r}, which is not a file path"
    return None


def _describe(kind):
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a JSON object",
        bool: "true or false",
    }[kind]
