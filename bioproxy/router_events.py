"""A router's model events, followed: its backends look at once, not at their next pass.

llama-server in router mode streams what happens to its models on `GET /models/sse`
(llama.cpp b11434): a model loading, loaded, unloaded or asleep (`model_status`), removed
(`model_remove`), or the whole list read again (`models_reload`). bioproxy otherwise
notices these at each warmer pass (warmup_check_interval): a model the router loaded
again would be warmed up to a pass late, its users evaluating templates from scratch
meanwhile, and one it unloaded would take requests until then. Each event wakes the
warmers of the backends it concerns; their passes do the rest, as always. Events missed
while the stream is down are seen at those passes anyway.
"""

import logging

import gevent

from . import sse
from .upstream import BackendError

log = logging.getLogger(__name__)

RETRY_SECONDS = 5.0  # before following again, once the stream ended or failed
# Events about the whole list: every backend of the router looks.
LIST_EVENTS = frozenset({"model_remove", "models_reload"})


class RouterEvents:
    """Follows one router's /models/sse for the backends at it (backends(): its units,
    and the router itself when bioproxy made units of the models it lists)."""

    def __init__(self, upstream, backends):
        self.upstream = upstream
        self.backends = backends
        self.greenlet = None

    def start(self):
        self.greenlet = gevent.spawn(self.run)

    def stop(self):
        if self.greenlet is not None:
            self.greenlet.kill()

    def run(self):
        while True:
            try:
                self.follow()
            except BackendError as e:
                if e.status in (404, 405):
                    log.info(
                        "%s streams no model events (%s): its models' changes are seen at "
                        "each warmer pass",
                        self.upstream.base_url,
                        e.reason,
                    )
                    return
                log.debug("model events of %s: %s", self.upstream.base_url, e)
            except Exception as e:  # cut, timed out (no event for upstream_timeout), garbled
                log.debug("model events of %s ended: %s", self.upstream.base_url, e)
            gevent.sleep(RETRY_SECONDS)

    def follow(self):
        """Read the stream until it ends, waking the backends each event concerns."""
        with self.upstream.open("GET", "/models/sse", routed=False) as response:
            pending = b""
            for chunk in response.iter_content(chunk_size=None):
                pending += chunk
                *events, pending = pending.split(b"\n\n")
                for event in events:
                    self.seen(event)

    def seen(self, event):
        for data in sse.objects(event):
            self.wake(data.get("event"), data.get("model"))

    def wake(self, kind, model):
        if kind == "download_progress":
            return  # many a second while a model downloads, and nothing to look at yet
        everyone = kind in LIST_EVENTS or not isinstance(model, str) or model == "*"
        for backend in self.backends():
            if everyone or backend.router or backend.named(model):
                backend.warmer.wake.set()
