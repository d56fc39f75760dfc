"""Real components: a llama-server with the bundled model, and bioproxy under gunicorn.

A missing llama-server or model is an error here, never a skip: run scripts/setup.
"""

import pytest

from bioproxy.llamacpp import LlamaServer, LlamaServerError
from tests.servers import Bioproxy, free_port


def pytest_collection_modifyitems(items):
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


def start_llama(folder, slots=2, extra_args=(), ui=None):
    return LlamaServer(
        free_port(),
        slots=slots,
        context=4096 * slots,
        slot_save_path=str(folder / "slots"),
        log_path=str(folder / "llama-server.log"),
        extra_args=extra_args,
        ui=ui,
    )


@pytest.fixture(scope="session", autouse=True)
def llama_server_runs(tmp_path_factory):
    """Before the first integration test: the bundled llama-server starts and computes here.

    If it cannot, no integration test can pass, and the run stops with that one cause
    instead of an error at every fixture.
    """
    try:
        with start_llama(tmp_path_factory.mktemp("llama-check"), slots=1):
            pass
    except LlamaServerError as e:
        pytest.exit(f"no integration test can run: {e}", returncode=1)


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """One llama-server shared by the tests that leave it as they found it."""
    with start_llama(tmp_path_factory.mktemp("llama")) as server:
        yield server


@pytest.fixture(scope="session")
def bioproxy(llama, tmp_path_factory):
    with Bioproxy(llama.url, tmp_path_factory.mktemp("bioproxy")) as server:
        yield server
