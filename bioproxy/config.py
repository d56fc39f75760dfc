"""Settings: defaults, then the JSON config file, then BIOPROXY_* environment, then overrides."""

import dataclasses
import json
import logging
import os
import re
from urllib.parse import urlsplit

from .validation import ConfigError, check, parse_env

__all__ = ["ConfigError", "Settings", "load", "load_or_running"]

log = logging.getLogger(__name__)

DEFAULT_PATH = "~/.config/bioproxy/config.json"
# Served when there is no config file at all: the example templates of this checkout.
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "config.json")
# Where gunicorn's master keeps the settings it runs with, for a reload that fails.
RUNNING = "BIOPROXY_RUNNING_SETTINGS"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting bioproxy reads; field names are the config file's keys."""

    # Keys carried over from the original Go bioproxy.
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8088
    admin_host: str = "127.0.0.1"
    admin_port: int = 8089
    backend_url: str = "http://localhost:8081"
    warmup_check_interval: float = 30.0
    prefixes: dict = dataclasses.field(default_factory=dict)
    # Several llama-servers (see backends()): each a URL, or an object with its url and
    # optionally its name, backend_api_key and slot_save_path. Empty: backend_url alone.
    backends: list = dataclasses.field(default_factory=list)
    # With several backends: seconds between looks at each one's /health, so that one
    # that stops answering is out of routing within that time (and back once it answers).
    health_check_interval: float = 2.0
    # With several backends: on how many each template is kept warm (0: on all). Which
    # ones is fixed by the template's prefix and the backends' names, among those up.
    warm_backends: int = 0
    # Limits and timeouts of the proxy.
    max_request_bytes: int = 8 * 1024 * 1024
    # Slow clients: whole seconds to send a request's line and headers (and how long an
    # idle keep-alive connection stays open), then seconds to send its body.
    client_header_timeout: int = 5
    client_body_timeout: float = 60.0
    connect_timeout: float = 3.0
    upstream_timeout: float = 600.0
    health_timeout: float = 2.0
    # Templates and their saved KV caches. Relative paths are relative to the folder of
    # the config file (the working directory when there is none).
    template_root: str = ""  # empty: that same folder
    max_template_bytes: int = 1024 * 1024
    state_dir: str = "~/.local/state/bioproxy"
    slot_save_path: str = ""  # llama-server's --slot-save-path, if on this machine
    slot_timeout: float = 30.0
    # Scheduling: the queue for llama-server's slots, and how warmups give way to users.
    queue_max_length: int = 64
    queue_timeout: float = 120.0
    warmup_only_when_idle: bool = True
    warmup_concurrency: int = 1
    warmup_piece_chars: int = 150
    # A second llama-server, started like backend_url's with the same slot folder, that
    # evaluates the warmups (see bioproxy/evaluator.py). Empty: warmups use backend_url's slots.
    warmup_backend_url: str = ""
    # Its process on this machine, if known: stopped while a user's prompt is evaluated
    # in backend_url's (see bioproxy/hold.py). The bioproxy command sets it. 0: never.
    warmup_backend_pid: int = 0
    # Disk space the saved caches of templates' variants (a template with a client's own
    # system message, tools...) may take; the least recently used go first. 0: none saved.
    variant_budget_bytes: int = 2 * 1024**3
    # Security.
    api_key: str = ""  # clients of the proxy port must send "Authorization: Bearer <key>"
    backend_api_key: str = ""  # sent to llama-server (its --api-key) with every request
    trust_forwarded_for: bool = False  # keep a client's X-Forwarded-For (behind nginx)
    # Names the admin port answers to besides localhost and IP addresses, comma-separated
    # (a name a Prometheus server scrapes it by, say): any other Host is a web page's.
    admin_hosts: str = ""
    # Not a key: the folder relative paths are relative to, set by load().
    base_dir: str = dataclasses.field(default="", compare=False, metadata={"key": False})

    @property
    def paths(self):
        """The configured paths resolved: absolute, ~ expanded."""
        base = self.base_dir or os.getcwd()
        return Paths(
            base_dir=base,
            template_root=resolve_path(self.template_root, base),
            state_dir=resolve_path(self.state_dir, base),
            slot_save_path=resolve_path(self.slot_save_path, base) if self.slot_save_path else None,
        )

    def templates(self):
        """{prefix: (file, model)}: each prefix's template file as configured, and the
        model it is for (None: whichever model a llama-server serves)."""
        return {prefix: template_file(value) for prefix, value in self.prefixes.items()}

    def backends_list(self):
        """The llama-servers bioproxy fronts, each a Spec: `backends`, else backend_url.

        With one, its saved caches' record is state_dir itself (as before `backends`);
        with several, each has its own folder in it, state_dir/backends/NAME.
        """
        paths = self.paths
        if not self.backends:
            return [
                Spec(
                    name=default_name(self.backend_url),
                    url=self.backend_url,
                    api_key=self.backend_api_key,
                    slot_save_path=paths.slot_save_path,
                    state_dir=paths.state_dir,
                )
            ]
        specs = []
        for item in self.backends:
            item = {"url": item} if isinstance(item, str) else item
            name = item.get("name") or default_name(item["url"])
            folder = item.get("slot_save_path")
            # A router's models are units of their own, each with its slots and caches.
            for model in item.get("models") or [None]:
                specs.append(
                    Spec(
                        name=name if model is None else f"{name}/{model}",
                        url=item["url"],
                        api_key=item.get("backend_api_key", self.backend_api_key),
                        slot_save_path=resolve_path(folder, paths.base_dir) if folder else None,
                        state_dir=paths.state_dir,
                        model=model,
                    )
                )
        if len(specs) > 1:
            specs = [
                dataclasses.replace(spec, state_dir=backend_state_dir(spec.state_dir, spec.name))
                for spec in specs
            ]
        return specs

    @property
    def proxy_bind(self):
        return _bind_address(self.proxy_host, self.proxy_port)

    @property
    def admin_bind(self):
        return _bind_address(self.admin_host, self.admin_port)


@dataclasses.dataclass(frozen=True)
class Paths:
    base_dir: str
    template_root: str
    state_dir: str
    slot_save_path: str | None  # None: llama-server's slot folder is not known here


@dataclasses.dataclass(frozen=True)
class Spec:
    """One llama-server as configured: what names it, reaches it, and keeps its caches."""

    name: str  # in the X-Bioproxy-Backend header, the access log and metrics labels
    url: str
    api_key: str
    slot_save_path: str | None
    state_dir: str
    model: str | None = None  # the model it is of a router's (backends' models), or None


def template_file(value):
    """(file, model) of a prefixes value: a file path, or {"file": ..., "model": ...}."""
    if isinstance(value, dict):
        return value["file"], value.get("model")
    return value, None


def backend_state_dir(state_dir, name):
    """Where one of several backends keeps its record: state_dir/backends/NAME."""
    return os.path.join(state_dir, "backends", folder_name(name))


def folder_name(name):
    """A backend's name as a folder's: ":" and a model's "/" and other signs replaced."""
    return re.sub(r"[^A-Za-z0-9._\[\]-]", "_", name)


def default_name(url):
    """A backend's name when none is given: host:port of its URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# The config file's keys.
FIELDS = {
    field.name: field for field in dataclasses.fields(Settings) if field.metadata.get("key", True)
}


def env_name(key):
    """The environment variable that overrides a config key."""
    return "BIOPROXY_" + key.upper()


def config_path(environ=None):
    """The config file to read: $BIOPROXY_CONFIG, else the default path if it exists.

    With neither, the examples (examples/config.json: the templates @code and @review),
    so that a first start serves something; the same rule for the `bioproxy` command,
    `gunicorn -c gunicorn.conf.py wsgi:app` and `bioproxy --check-config`.
    """
    environ = os.environ if environ is None else environ
    named = environ.get("BIOPROXY_CONFIG")
    if named:
        return os.path.expanduser(named)
    default = default_path(environ)
    if not os.path.exists(default) and os.path.isfile(EXAMPLES):
        return EXAMPLES
    return default


def default_path(environ):
    home = environ.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, DEFAULT_PATH.removeprefix("~/"))


def describe_source(settings, environ=None):
    """One line: which config file is in use, and its templates."""
    environ = os.environ if environ is None else environ
    path = config_path(environ)
    if path == EXAMPLES and "BIOPROXY_CONFIG" not in environ:
        source = f"{path} (the examples: no config file at {default_path(environ)})"
    elif os.path.isfile(path):
        source = path
    else:
        source = f"none ({path} is absent: defaults and environment)"
    names = ", ".join(sorted(settings.prefixes)) or "none"
    return f"config: {source}; {len(settings.prefixes)} template(s): {names}"


def base_dir(environ=None):
    """The folder that relative paths in the configuration are relative to."""
    path = config_path(environ)
    return os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.getcwd()


def resolve_path(path, base):
    """A configured path made absolute: ~ expanded, relative ones joined to base."""
    return os.path.join(base, os.path.expanduser(path))


def read_file(path, required):
    """The raw key/value pairs of a JSON config file ({} if absent and not required)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a JSON object")
    return values


def read_environ(environ):
    """The BIOPROXY_* overrides found in an environment, parsed to their key's type."""
    values = {}
    for key, field in FIELDS.items():
        name = env_name(key)
        if name in environ:
            values[key] = parse_env(name, environ[name], field.type)
    return values


def load(overrides=None, environ=None):
    """Settings from every source, validated; raises ConfigError on the first problem."""
    environ = os.environ if environ is None else environ
    path = config_path(environ)
    values = {}
    for source, layer in (
        (path, read_file(path, required="BIOPROXY_CONFIG" in environ)),
        ("environment", read_environ(environ)),
        ("overrides", overrides or {}),
    ):
        for key, value in layer.items():
            check(key, value, source, FIELDS)
            values[key] = value
    settings = Settings(**values, base_dir=base_dir(environ))
    if settings.proxy_port == settings.admin_port:
        raise ConfigError(f"proxy_port and admin_port are both {settings.proxy_port}")
    check_backends(settings, values)
    return settings


def check_backends(settings, values):
    """ConfigError for backends that contradict the other keys or each other."""
    if not settings.backends:
        return
    for key in ("backend_url", "slot_save_path"):
        if key in values:
            raise ConfigError(
                f"{key} and backends are both set: with backends, give each llama-server's "
                f"url and slot_save_path in its own entry"
            )
    specs = settings.backends_list()
    if len(specs) > 1 and settings.warmup_backend_url:
        raise ConfigError(
            "warmup_backend_url works with one backend only: with several, each evaluates "
            "its own warmups"
        )
    names, places = set(), set()
    for spec in specs:
        place = (spec.url.rstrip("/"), spec.model)
        if spec.name in names or place in places:
            raise ConfigError(f"backends: {spec.name} ({spec.url}) is there twice")
        names.add(spec.name)
        places.add(place)


def load_or_running(overrides=None, environ=None):
    """load(); but on a reload (SIGHUP) whose configuration is broken, the running one.

    gunicorn's master re-reads gunicorn.conf.py and the new worker calls create_app():
    both keep serving with the settings that ran rather than stop. Without running
    settings (a start), the ConfigError is raised.
    """
    environ = os.environ if environ is None else environ
    try:
        return load(overrides, environ)
    except ConfigError as e:
        if RUNNING not in environ:
            raise
        log.error("configuration error, the running one stays: %s", e)
        return running(environ)


def dump(settings):
    """Settings as JSON, to hand to a reloaded worker (see running())."""
    return json.dumps(dataclasses.asdict(settings))


def running(environ):
    """The settings gunicorn's master ran with before a reload whose configuration fails."""
    return Settings(**json.loads(environ[RUNNING]))


def _bind_address(host, port):
    # gunicorn wants IPv6 literals in brackets.
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
