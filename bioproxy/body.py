"""An answer of llama.cpp's on its way to the client: one object from first byte to close."""

import contextlib
import json
import logging
import socket
import time

import urllib3

from .errors import UpstreamCut, UpstreamTimeout, UpstreamUnavailable
from .upstream import iter_body

log = logging.getLogger(__name__)

TAIL_BYTES = 16 * 1024  # kept of the body's end, where llama.cpp writes its timings


class AnswerBody:
    """llama.cpp's answer body, streamed as it arrives.

    It owns the first chunk (read by start(), before the response starts, so that a
    failure there can still be answered with an error), the body's last bytes (llama.cpp's
    timings), whether it streamed to its end, and the end of the request's lease: close()
    runs once, whoever calls it (the WSGI server, or the request failing first).
    """

    def __init__(self, answer, metrics, lease=None):
        self.answer = answer
        self.status = answer.status_code
        self.metrics = metrics
        self.lease = lease
        self.chunks = iter_body(answer)
        self.first = b""
        self.tail = b""
        self.complete = False  # streamed to its end: llama-server is done with it
        self.closed = False
        # Only a templated request's timings are read (by its lease, at the end).
        self.keeps_tail = lease is not None and lease.template is not None
        self.read_at = time.monotonic()  # when llama.cpp last sent something
        self.on_close = None  # called once closed (the backend's count of answers)

    def start(self):
        """Read the first chunk; the error to answer instead if llama.cpp failed before it."""
        try:
            self.first = next(self.chunks, b"")
        except UpstreamCut as e:
            error = _first_chunk_error(e)
            log.warning("%s: %s", error.code, e.strerror)
            self.metrics.upstream_errors.labels(error.code).inc()
            self.close()
            raise error from e
        except BaseException:
            self.close()  # thrown into while it waited (Backend.cut_stalled), or killed
            raise

    def __iter__(self):
        try:
            if self.first:
                yield self._kept(self.first)
            for chunk in self.chunks:
                yield self._kept(chunk)
        except UpstreamCut as e:
            log.warning("the answer is cut for the client: %s", e.strerror)
            self.metrics.upstream_errors.labels("upstream_cut").inc()
            raise
        self.complete = True

    def _kept(self, chunk):
        self.read_at = time.monotonic()
        if self.keeps_tail:
            self.tail = (self.tail + chunk)[-TAIL_BYTES:]
        return chunk

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.chunks.close()
            self.answer.close()
        finally:
            if self.on_close is not None:
                self.on_close(self)
            if self.lease is not None:
                self.lease.end(self)

    def cut(self):
        """End the stream from llama.cpp's side, from another greenlet (llama-server hung):
        its reader then fails as on a cut connection, and the client's is cut in turn
        (never a clean end: the body's last chunk never came)."""
        sock = getattr(self.answer.raw.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):  # closed meanwhile
                sock.shutdown(socket.SHUT_RDWR)

    def timings(self):
        """The last "timings" object in the body (the final SSE event's), or None."""
        at = self.tail.rfind(b'"timings":')
        if at < 0:
            return None
        text = self.tail[at + len(b'"timings":') :].decode("utf-8", "replace")
        try:
            timings = json.JSONDecoder().raw_decode(text.lstrip())[0]
        except ValueError:
            return None
        return timings if isinstance(timings, dict) else None


def _first_chunk_error(cut):
    """The error to answer when llama.cpp's body failed before its first byte."""
    if isinstance(cut.__cause__, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
        return UpstreamTimeout(
            "llama.cpp sent its response headers, then nothing within upstream_timeout"
        )
    return UpstreamUnavailable(f"llama.cpp failed before its response body: {cut.strerror}")
