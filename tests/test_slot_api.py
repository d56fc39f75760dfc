"""The slot API's client: its timeout, against a real (tiny) server whose restore hangs,
and the named errors it maps llama-server's answers to."""

import threading
import time

import pytest
import responses

from bioproxy.slot_api import SlotApi, SlotBusy, SlotFileRejected, SlotsUnsupported
from bioproxy.slot_table import model_identity
from bioproxy.upstream import BackendError, Upstream
from tests.conftest import BACKEND
from tests.servers import JSONHandler, serve_http


class BusySlotServer(JSONHandler):
    """Answers /props and /slots at once; a restore waits as if the slot were busy."""

    release = threading.Event()

    def do_GET(self):
        if self.path == "/props":
            self.send_json({"model_path": "m.gguf", "build_info": "b1", "total_slots": 1})
        else:
            self.send_json([{"id": 0, "n_ctx": 4096, "id_task": 3, "is_processing": True}])

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.release.wait(30)
        self.send_json({"id_slot": 0, "n_restored": 10})


@pytest.fixture
def busy_server():
    server = serve_http(BusySlotServer)
    yield server.url
    BusySlotServer.release.set()
    server.shutdown()


def test_a_restore_on_a_busy_slot_gives_up_after_slot_timeout(busy_server):
    api = SlotApi(Upstream(busy_server, 1, 600, 1), timeout=0.5)
    api.fetch_slots()

    start = time.monotonic()
    with pytest.raises(SlotBusy, match="timed out"):
        api.restore(0, "bioproxy-code-x.bin")

    assert 0.5 <= time.monotonic() - start < 3


def test_the_model_identity_covers_what_makes_a_saved_cache_incompatible():
    props = {
        "model_path": "/m.gguf",
        "model_ftype": "Q4_1",
        "build_info": "b0-unknown",
        "chat_template": "{{ messages }}",
        "total_slots": 2,
        "default_generation_settings": {"params": {"temperature": 0.8}},
    }
    slots = [{"id": 0, "n_ctx": 4096}, {"id": 1, "n_ctx": 4096}]
    same = model_identity(props, slots)
    assert model_identity({**props, "default_generation_settings": {}}, slots) == same
    # Issue 16.9: a changed chat template, or -np, restored a cache that did not match.
    for changed in (
        {"chat_template": "{{ messages | tojson }}"},
        {"total_slots": 4},
        {"model_path": "/other.gguf"},
        {"model_ftype": "Q8_0"},
    ):
        assert model_identity({**props, **changed}, slots) != same, changed
    assert model_identity(props, [{"id": 0, "n_ctx": 8192}]) != same


@pytest.mark.parametrize(
    ("status", "named"),
    [(501, SlotsUnsupported), (400, SlotFileRejected), (500, BackendError), (503, BackendError)],
)
@responses.activate
def test_slot_api_answers_are_mapped_to_named_errors_once(status, named):
    message = {"error": {"message": "no"}}
    responses.post(f"{BACKEND}/slots/0?action=restore", json=message, status=status)
    api = SlotApi(Upstream(BACKEND, 1, 600, 1), timeout=1)

    with pytest.raises(BackendError) as raised:
        api.restore(0, "bioproxy-code-x.bin")

    assert type(raised.value) is named
    assert raised.value.status == status
