"""The run command: bioproxy under gunicorn, with a local llama-server when none is configured."""

import argparse
import logging
import os
import signal
import subprocess
import sys

import requests

from . import config, llamacpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def backend_configured(environ):
    """Whether the user named a backend (config file or environment): backend_url, or a
    list of backends that is not empty."""
    if (
        config.env_name("backend_url") in environ
        or environ.get(config.env_name("backends"), "[]") != "[]"
    ):
        return True
    path = config.config_path(environ)
    values = config.read_file(path, required="BIOPROXY_CONFIG" in environ)
    return "backend_url" in values or bool(values.get("backends"))


def answers(url):
    try:
        return requests.get(url + "/health", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def start_local_backend(settings, binary=None):
    """A llama-server with the bundled model at the backend address."""
    parts = requests.utils.urlparse(settings.backend_url)
    # Beside bioproxy's own record of its saves.
    folder = settings.paths.state_dir
    os.makedirs(folder, exist_ok=True)
    server = llamacpp.LlamaServer(
        port=parts.port or 80,
        host=parts.hostname,
        slots=2,
        slot_save_path=os.path.join(folder, "slots"),
        log_path=os.path.join(folder, "llama-server.log"),
        binary=binary,
        ui=llamacpp.ui_path(),
        ram_cache=False,  # its copies would serve nobody (LlamaServer.ram_cache)
    )
    print(f"Starting llama-server with {llamacpp.MODEL_FILE} on {server.url}")
    print(f"  its log: {server.log_path}")
    if server.ui:
        os.environ["BIOPROXY_CHAT_PAGE"] = "1"  # for the banner
    else:
        print("  no chat page: scripts/setup builds it when Node.js 20+ and npm are there")
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    # bioproxy may then delete the slot files of templates that changed.
    os.environ.setdefault(config.env_name("slot_save_path"), server.slot_save_path)
    return server


def start_evaluator(server):
    """The warmup llama-server (bioproxy/evaluator.py): started as server was, on a port of
    its own, at the lowest CPU priority; None, said, if it does not start."""
    evaluator = llamacpp.LlamaServer(
        port=llamacpp.free_port(server.host or "127.0.0.1"),
        host=server.host,
        slots=server.slots,
        context=server.context,
        slot_save_path=server.slot_save_path,
        log_path=os.path.join(os.path.dirname(server.log_path), "warmup-llama-server.log"),
        binary=server.binary,
        nice=19,
        ram_cache=server.ram_cache,
    )
    print(f"Starting the warmup llama-server on {evaluator.url} (its log: {evaluator.log_path})")
    try:
        evaluator.start().wait_ready()
    except (llamacpp.LlamaServerError, OSError, subprocess.SubprocessError) as e:
        evaluator.stop()
        print(f"  not started ({e}): warmups are evaluated in llama-server's own slots")
        return None
    except BaseException:  # Ctrl+C while it loads
        evaluator.stop()
        raise
    os.environ[config.env_name("warmup_backend_url")] = evaluator.url
    os.environ[config.env_name("warmup_backend_pid")] = str(evaluator.process.pid)
    return evaluator


# Flags of the original bioproxy, and the config key each sets.
FLAGS = {
    "host": "proxy_host",
    "port": "proxy_port",
    "admin_host": "admin_host",
    "admin_port": "admin_port",
    "backend": "backend_url",
}


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bioproxy",
        description="A reverse proxy for llama.cpp's llama-server that keeps templated "
        "prompts warm. Runs gunicorn with bioproxy's settings; with no backend configured "
        "it first starts a local llama-server with the bundled model.",
        epilog="Every config key can also be set with an environment variable "
        "BIOPROXY_<KEY>; flags win over both.",
    )
    # Single-dash long flags as the original had; the double-dash forms work too.
    parser.add_argument("-config", "--config", metavar="PATH", help="config file (JSON)")
    parser.add_argument("-host", "--host", help="address the proxy listens on (proxy_host)")
    parser.add_argument("-port", "--port", type=int, help="proxy port (proxy_port)")
    parser.add_argument("-admin-host", "--admin-host", help="admin address (admin_host)")
    parser.add_argument("-admin-port", "--admin-port", type=int, help="admin port (admin_port)")
    parser.add_argument("-backend", "--backend", metavar="URL", help="llama-server's URL")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="read the configuration and the templates, say what is wrong, and exit",
    )
    parser.add_argument(
        "--llama-port",
        type=int,
        metavar="N",
        help="port of the local llama-server started when no backend is configured (8081)",
    )
    parser.add_argument(
        "--no-local-backend",
        action="store_true",
        help="never start a local llama-server, even when no backend is configured",
    )
    return parser.parse_args(argv)


def apply_flags(args, environ):
    """Flags become BIOPROXY_* variables, which gunicorn and the app read."""
    if args.config:
        environ["BIOPROXY_CONFIG"] = os.path.abspath(os.path.expanduser(args.config))
    for flag, key in FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            environ[config.env_name(key)] = str(value)


def check_config(environ):
    """Print what the configuration and its templates hold; 0 when all are usable."""
    from . import templates

    try:
        settings = config.load(environ=environ)
    except config.ConfigError as e:
        print(f"bioproxy: configuration error: {e}")
        return 1
    paths = settings.paths
    print(config.describe_source(settings, environ))
    urls = ", ".join(spec.url for spec in settings.backends_list())
    print(f"proxy {settings.proxy_bind}, admin {settings.admin_bind}, backend {urls}")
    broken = 0
    for prefix, (file, _) in sorted(settings.templates().items()):
        try:
            template = templates.load(
                prefix, file, paths.base_dir, paths.template_root, settings.max_template_bytes
            )
        except templates.TemplateError as e:
            broken += 1
            print(f"  {prefix}: BROKEN: {e}")
            continue
        size = sum(map(len, template.pieces))
        print(f"  {prefix}: {file}, {size:,} characters, {len(template.files)} file(s), ok")
    if broken:
        print(f"bioproxy: {broken} template(s) cannot be used")
        return 1
    print("configuration ok")
    return 0


def gunicorn_command():
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        os.path.join(ROOT, "gunicorn.conf.py"),
        "--pythonpath",
        ROOT,
        "wsgi:app",
    ]


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    apply_flags(args, os.environ)
    if args.check_config:
        return check_config(os.environ)
    try:
        local = not args.no_local_backend and not backend_configured(os.environ)
        if args.llama_port is not None:
            if not local:
                raise config.ConfigError(
                    "--llama-port is the port of the local llama-server, which is not "
                    "started when a backend is configured or with --no-local-backend"
                )
            os.environ[config.env_name("backend_url")] = f"http://127.0.0.1:{args.llama_port}"
        settings = config.load()
    except config.ConfigError as e:
        sys.exit(f"bioproxy: configuration error: {e}")

    # gunicorn's master prints the banner once it listens (gunicorn.conf.py, when_ready).
    os.environ["BIOPROXY_BANNER"] = "1"
    if local and answers(settings.backend_url):
        print(f"Using the llama-server that already answers at {settings.backend_url}")
    elif local:
        try:
            backend = start_local_backend(settings)
        except llamacpp.LlamaServerError as e:
            sys.exit(f"bioproxy: {e}")
        try:
            evaluator = None if settings.warmup_backend_url else start_evaluator(backend)
        except BaseException:
            backend.stop()
            raise
        return run_beside(backend, evaluator)
    # Nothing of ours to stop afterwards: gunicorn takes this process over, so a service
    # manager's signals (SIGTERM, SIGHUP) reach gunicorn's master directly.
    sys.stdout.flush()
    os.execv(sys.executable, gunicorn_command())


def run_beside(backend, evaluator=None):
    """Run gunicorn as a child, passing signals on, and stop the local llama-server after.

    If the local llama-server ends on its own, bioproxy says why and stops too: it has
    nothing to serve with.
    """
    server = subprocess.Popen(gunicorn_command())
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: server.send_signal(number))
    try:
        while True:
            try:
                return server.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                server.send_signal(signal.SIGINT)
                continue
            try:
                backend.check_running()
            except llamacpp.LlamaServerError as e:
                print(f"bioproxy: the local {e}", file=sys.stderr)
                server.terminate()
                server.wait()
                return 1
    finally:
        try:
            if evaluator is not None:
                evaluator.stop()
        finally:
            backend.stop()


if __name__ == "__main__":
    sys.exit(main())
