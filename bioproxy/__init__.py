"""bioproxy: a reverse proxy for llama.cpp's llama-server that keeps templated prompts warm."""

import dataclasses
import time

from flask import Flask

from . import config


@dataclasses.dataclass
class State:
    """What the views share: settings, the upstream and the metrics."""

    settings: config.Settings
    upstream: "upstream.Upstream"  # noqa: F821
    metrics: "metrics.Metrics"  # noqa: F821
    warmer: "warmup.Warmer"  # noqa: F821
    started: float


class Bioproxy(Flask):
    """A Flask app whose routes are matched per listening port, not per Host header.

    One gunicorn worker listens on the proxy and the admin port. Every rule names the
    listener it belongs to as its host ("proxy" or "admin"), so /health on the proxy port
    goes to llama.cpp while /health on the admin port is bioproxy's own.
    """

    def create_url_adapter(self, request):
        if request is None:
            return super().create_url_adapter(request)
        admin_port = str(self.extensions["bioproxy"].settings.admin_port)
        listener = "admin" if request.environ.get("SERVER_PORT") == admin_port else "proxy"
        return self.url_map.bind_to_environ(request.environ, server_name=listener)


def create_app(overrides=None):
    """Build the app from defaults, the config file, BIOPROXY_* environment and overrides."""
    # Imported here, not at the top: gunicorn.conf.py imports bioproxy.config in the
    # master process, and requests must first be imported after gevent's monkey-patching,
    # which happens in the worker.
    from . import admin, errors, proxy
    from .metrics import Metrics
    from .upstream import Upstream
    from .warmup import Warmer

    settings = config.load_or_running(overrides)
    app = Bioproxy(__name__, host_matching=True, static_folder=None)
    upstream = Upstream(
        settings.backend_url,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.upstream_timeout,
        health_timeout=settings.health_timeout,
        api_key=settings.backend_api_key,
    )
    metrics = Metrics(app)
    app.extensions["bioproxy"] = State(
        settings=settings,
        upstream=upstream,
        metrics=metrics,
        warmer=Warmer(settings, config.base_dir(), upstream, metrics),
        started=time.monotonic(),
    )
    errors.init_app(app)
    app.register_blueprint(proxy.bp)
    app.register_blueprint(admin.bp)
    return app
