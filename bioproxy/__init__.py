"""bioproxy: a reverse proxy for llama.cpp's llama-server that keeps templated prompts warm."""

import dataclasses
import time

from flask import Flask, current_app

from . import config


@dataclasses.dataclass
class State:
    """What the views share: settings, metrics, the templates and the llama-servers."""

    settings: config.Settings
    metrics: "metrics.Metrics"  # noqa: F821
    catalog: "catalog.Catalog"  # noqa: F821
    pool: "pool.Pool"  # noqa: F821
    started: float

    @property
    def backend(self):
        """The first backend (the only one, with backend_url)."""
        return self.pool.first


def get_state():
    """The app's State, from a view."""
    return current_app.extensions["bioproxy"]


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
    from .backend import Backend
    from .catalog import Catalog
    from .metrics import Metrics
    from .pool import BackendCollector, Pool

    settings = config.load_or_running(overrides)
    paths = settings.paths
    app = Bioproxy(__name__, host_matching=True, static_folder=None)
    metrics = Metrics(app)
    catalog = Catalog(
        settings.templates(),
        paths.base_dir,
        paths.template_root,
        settings.max_template_bytes,
        metrics,
    )
    pool = Pool(Backend(settings, spec, catalog, metrics) for spec in settings.backends_list())
    metrics.registry.register(BackendCollector(pool))
    # The files bioproxy reads before it serves: the templates, and what it saved.
    pool.first.reload_templates()
    for backend in pool:
        backend.open()
    app.extensions["bioproxy"] = State(
        settings=settings,
        metrics=metrics,
        catalog=catalog,
        pool=pool,
        started=time.monotonic(),
    )
    errors.init_app(app)
    app.register_blueprint(proxy.bp)
    app.register_blueprint(admin.bp)
    return app
