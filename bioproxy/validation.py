"""Checking config values: each key's type and range, and values read from the environment."""

import json
import re
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
        if kind in (dict, list):
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
        problem = _url_problem(value)
        if problem:
            return problem
    if key == "backends":
        return _backends_problem(value)
    positive = key.endswith(("_timeout", "_bytes")) or key == "warmup_check_interval"
    if positive and key != "variant_budget_bytes" and value <= 0:
        return "must be greater than 0"
    zero_or_more = (
        "queue_max_length",
        "variant_budget_bytes",
        "warmup_backend_pid",
        "warm_backends",
    )
    if key in zero_or_more and value < 0:
        return "must be 0 or more"
    if key in ("warmup_concurrency", "warmup_piece_chars") and value < 1:
        return "must be 1 or more"
    if key == "prefixes":
        for prefix, template in value.items():
            if not prefix or prefix != prefix.strip() or " " in prefix:
                return f"has a prefix {prefix!r} that is empty or holds spaces"
            problem = _template_problem(template)
            if problem:
                return f"maps {prefix!r} to {template!r}: {problem}"
    return None


def _template_problem(value):
    """What is wrong with a prefix's template: a file path, or {"file": ..., "model": ...}."""
    if isinstance(value, dict):
        unknown = set(value) - {"file", "model"}
        if unknown:
            return f"unknown key {sorted(unknown)[0]!r} (known: file, model)"
        model = value.get("model")
        if model is not None and (not isinstance(model, str) or not MODEL.fullmatch(model)):
            return "its model must be a model's name, 1 to 128 characters without spaces"
        value = value.get("file")
    if not isinstance(value, str) or not value:
        return "not a file path (or an object with its file and model)"
    return None


def _url_problem(value):
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    try:
        parts.port  # noqa: B018 - reading it validates it
    except ValueError:
        return "has an invalid port"
    if parts.query or parts.fragment:
        return "must not have a query or fragment"
    return None


# What an entry of backends may hold besides its url, and the type of each.
BACKEND_KEYS = {"name": str, "backend_api_key": str, "slot_save_path": str, "models": list}


def _backends_problem(value):
    """What is wrong with a list of backends (each a URL or {"url": ..., ...}), or None."""
    for index, item in enumerate(value):
        where = f"entry {index}"
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or not isinstance(item.get("url"), str):
            return f"{where} must be a URL, or an object with a url"
        problem = _url_problem(item["url"])
        if problem:
            return f"{where}: url {problem}"
        for name, got in item.items():
            if name != "url" and name not in BACKEND_KEYS:
                known = ", ".join(["url", *BACKEND_KEYS])
                return f"{where}: unknown key {name!r} (known: {known})"
            if name != "url" and not isinstance(got, BACKEND_KEYS[name]):
                return f"{where}: {name} must be {_describe(BACKEND_KEYS[name])}"
        name = item.get("name")
        if name is not None and not NAME.fullmatch(name):
            return f"{where}: name must be 1 to 64 letters, digits or . _ - : [ ]"
        models = item.get("models")
        named = models is None or all(isinstance(m, str) and MODEL.fullmatch(m) for m in models)
        if not named or models == [] or (models and len(set(models)) < len(models)):
            return (
                f"{where}: models must be a list of model names as the router serves them "
                f"(each once, 1 to 128 characters without spaces)"
            )
    return None


# A backend's name goes into a response header and metrics labels: kept to plain ASCII.
NAME = re.compile(r"[A-Za-z0-9._:\[\]-]{1,64}")
# A model's name as a router lists it (an HF repo and tag, a file name): printable ASCII.
MODEL = re.compile(r"[!-~]{1,128}")


def _describe(kind):
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a JSON object",
        list: "a JSON array",
        bool: "true or false",
    }[kind]
