"""The slot API's own timeout, against a real (tiny) server whose restore hangs."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bioproxy.slots import Slots
from bioproxy.upstream import BackendError, Upstream


class BusySlotServer(BaseHTTPRequestHandler):
    """Answers /props and /slots at once; a restore waits as if the slot were busy."""

    release = threading.Event()

    def do_GET(self):
        if self.path == "/props":
            self.answer({"model_path": "m.gguf", "build_info": "b1", "total_slots": 1})
        else:
            self.answer([{"id": 0, "n_ctx": 4096, "id_task": 3, "is_processing": True}])

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.release.wait(30)
        self.answer({"id_slot": 0, "n_restored": 10})

    def answer(self, body):
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def busy_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BusySlotServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    BusySlotServer.release.set()
    server.shutdown()


def test_a_restore_on_a_busy_slot_gives_up_after_slot_timeout(busy_server):
    slots = Slots(Upstream(busy_server, 1, 600, 1), timeout=0.5)
    slots.refresh()

    start = time.monotonic()
    with pytest.raises(BackendError, match="timed out"):
        slots.restore(0, "bioproxy-code-x.bin")

    assert 0.5 <= time.monotonic() - start < 3
