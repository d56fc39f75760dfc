"""The run command: bioproxy under gunicorn, with a local llama-server when none is configured."""

import argparse
import logging
import os
import signal
import subprocess
import sys

import requests

from . import config, llamacpp

log = logging.getLogger("bioproxy")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_examples_without_config(environ):
    """With no config file at all, serve the example templates (and say so)."""
    default = config.config_path(environ)
    if "BIOPROXY_CONFIG" in environ or os.path.exists(default):
        return
    environ["BIOPROXY_CONFIG"] = os.path.join(ROOT, "examples", "config.json")
    print(f"No config file at {default}: serving the examples in {environ['BIOPROXY_CONFIG']}")


def backend_configured(environ):
    """Whether the user named a backend (config file or environment)."""
    if config.env_name("backend_url") in environ:
        return True
    path = config.config_path(environ)
    return "backend_url" in config.read_file(path, required="BIOPROXY_CONFIG" in environ)


def answers(url):
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def start_local_backend(settings):
    """A llama-server with the bundled model at the default backend address."""
    parts = requests.utils.urlparse(settings.backend_url)
    # Beside bioproxy's own record of its saves.
    folder = config.resolve_path(settings.state_dir, config.base_dir())
    os.makedirs(folder, exist_ok=True)
    server = llamacpp.LlamaServer(
        port=parts.port or 80,
        host=parts.hostname,
        slots=2,
        slot_save_path=os.path.join(folder, "slots"),
        log_path=os.path.join(folder, "llama-server.log"),
    )
    print(f"Starting llama-server with {llamacpp.MODEL_FILE} on {server.url}")
    print(f"  its log: {server.log_path}")
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    # bioproxy may then delete the slot files of templates that changed.
    os.environ.setdefault(config.env_name("slot_save_path"), server.slot_save_path)
    return server


def banner(settings):
    proxy = f"http://{settings.proxy_bind}"
    admin = f"http://{settings.admin_bind}"
    lines = [
        "🚀 Starting bioproxy - llama.cpp reverse proxy with KV cache warmup",
        "",
        "Configuration:",
        f"  Proxy listening on: {proxy}",
        f"  Backend llama.cpp:  {settings.backend_url}",
        f"  Admin:              {admin}",
        f"  Warmup interval:    {settings.warmup_check_interval:g} s",
        f"  Templates:          {len(settings.prefixes)}",
    ]
    lines += [f"    {prefix} -> {path}" for prefix, path in sorted(settings.prefixes.items())]
    lines += [
        "",
        "Try these commands:",
        f"  curl {proxy}/health",
        f"  curl {proxy}/v1/models",
        f"  curl {admin}/health",
        f"  curl {admin}/metrics",
        "",
        "Press Ctrl+C to stop...",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="bioproxy", description=__doc__)
    parser.add_argument(
        "--no-local-backend",
        action="store_true",
        help="never start a local llama-server, even when no backend is configured",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    use_examples_without_config(os.environ)
    try:
        settings = config.load()
        local = not args.no_local_backend and not backend_configured(os.environ)
    except config.ConfigError as e:
        sys.exit(f"bioproxy: configuration error: {e}")

    backend = None
    if local and answers(settings.backend_url):
        print(f"Using the llama-server that already answers at {settings.backend_url}")
    elif local:
        try:
            backend = start_local_backend(settings)
        except llamacpp.LlamaServerError as e:
            sys.exit(f"bioproxy: {e}")
    print(banner(settings), flush=True)

    # SIGTERM ends the run like Ctrl+C: gunicorn first, then the local llama-server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
    )
    try:
        return server.wait()
    except (KeyboardInterrupt, SystemExit):
        server.terminate()
        return server.wait()
    finally:
        if backend is not None:
            backend.stop()


if __name__ == "__main__":
    sys.exit(main())
