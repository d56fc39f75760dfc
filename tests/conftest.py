import os

import pytest
import responses
from flask.testing import FlaskClient

from bioproxy import create_app

BACKEND = "http://llama.test:8081"
PROXY_BASE = "http://localhost:8088"
ADMIN_BASE = "http://localhost:8089"


class ListenerClient(FlaskClient):
    """A test client whose requests arrive on one listener's port (proxy or admin)."""

    def __init__(self, *args, base_url=PROXY_BASE, **kwargs):
        super().__init__(*args, **kwargs)
        self.base_url = base_url

    def open(self, *args, **kwargs):
        if args and isinstance(args[0], str):
            kwargs.setdefault("base_url", self.base_url)
        return super().open(*args, **kwargs)


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    """Never read the developer's own config file or BIOPROXY_* environment."""
    for name in list(os.environ):
        if name.startswith("BIOPROXY_"):
            monkeypatch.delenv(name)
    path = tmp_path / "config.json"
    path.write_text("{}")
    monkeypatch.setenv("BIOPROXY_CONFIG", str(path))
    return path


@pytest.fixture
def make_app(tmp_path):
    def make(**overrides):
        # backend_url, unless the test lists its backends.
        one = {} if "backends" in overrides else {"backend_url": BACKEND}
        settings = {**one, "state_dir": str(tmp_path / "state"), **overrides}
        app = create_app(settings)
        app.test_client_class = ListenerClient
        return app

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def admin(app):
    return app.test_client(base_url=ADMIN_BASE)


@pytest.fixture
def fake_llama():
    """llama-server faked with `responses`: tests/fake_llama.py."""
    from tests.fake_llama import FakeLlama  # it imports this module's BACKEND

    responses.start()
    yield FakeLlama().install()
    responses.stop()
    responses.reset()
