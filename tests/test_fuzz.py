"""Fuzzing: no request body and no template text makes bioproxy fail with a 500."""

import json

import pytest
import responses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bioproxy import templates
from tests.conftest import BACKEND
from tests.fake_llama import FakeLlama

PREFIXES = ["@code", "@review"]

# Text that reaches the edge cases: prefixes, placeholders, surrogates, controls, BOMs.
# Lone surrogates are rare among all code points: drawn on purpose.
SURROGATE = st.integers(0xD800, 0xDFFF).map(chr)
ANY_TEXT = st.lists(st.characters() | SURROGATE, max_size=12).map("".join)
TEXT = st.one_of(
    st.text(),
    ANY_TEXT,
    st.builds(
        lambda prefix, rest: prefix + rest,
        st.sampled_from(["@code ", "@review ", "@code", "@cod ", "@code\t", "@codex ", "<{x}>"]),
        ANY_TEXT,
    ),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "user", "system", "assistant", 3, None]),
        "content": TEXT
        | JSON
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})),
    }
)
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=3) | JSON},
    optional={"stream": st.booleans(), "id_slot": JSON, "prompt": JSON | TEXT},
)


def encoded(value):
    text = json.dumps(value)  # escapes lone surrogates as \udxxx, which JSON allows
    return text.encode()


KEY = st.sampled_from([b"messages", b"prompt", b"id_slot", b"x"])
USER = b'{"role": "user", "content": "@code hi"}'
# What Python's parser alone fails on or reads otherwise than llama-server: nesting deep
# enough to exhaust its stack, wide bodies, numbers beyond a double or 4,300 digits, the
# constants JSON does not have, and a key given twice.
HOSTILE = st.one_of(
    st.builds(
        lambda key, n: b'{"%s": %s%s}' % (key, b"[" * n, b"]" * n),
        KEY,
        st.integers(100, 200_000),
    ),
    st.builds(
        lambda key, n: b'{"%s": %s"x"%s}' % (key, b'{"a":' * n, b"}" * n),
        KEY,
        st.integers(100, 5_000),
    ),
    st.builds(lambda n: b'{"messages": [%s]}' % b",".join([USER] * n), st.integers(1, 20_000)),
    st.builds(
        lambda key, number: b'{"%s": %s}' % (key, number),
        KEY,
        st.one_of(
            st.integers(300, 100_000).map(lambda e: b"1e%d" % e),
            st.integers(300, 100_000).map(lambda e: b"-2.5E+%d" % e),
            st.integers(4_000, 20_000).map(lambda n: b"9" * n),
            st.sampled_from([b"NaN", b"Infinity", b"-Infinity"]),
        ),
    ),
    st.builds(
        lambda key, first, second: b'{"%s": %s, "%s": %s}' % (key, first, key, second),
        KEY,
        st.sampled_from([b"[]", b"0", b"[%s]" % USER]),
        st.sampled_from([b"[%s]" % USER, b'"@code hi"', b"1"]),
    ),
)
BODIES = st.one_of(
    st.builds(encoded, CHAT),
    st.builds(encoded, JSON),
    st.binary(max_size=64),
    st.builds(lambda b: b"\xef\xbb\xbf" + b, st.builds(encoded, CHAT)),  # a UTF-8 BOM
    HOSTILE,
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "code.txt").write_text("Code.\n<{message}>\nEnd.")
    (folder / "review.txt").write_text("Review <{message}> twice: <{message}>")
    (folder / "config.json").write_text(
        json.dumps({"prefixes": {"@code": "code.txt", "@review": "review.txt"}})
    )
    return folder


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=BODIES, path=st.sampled_from(["/v1/chat/completions", "/completion", "/completions"]))
def test_no_request_body_gets_a_500(fuzzed, monkeypatch, tmp_path, body, path):
    monkeypatch.setenv("BIOPROXY_CONFIG", str(fuzzed / "config.json"))
    from bioproxy import create_app
    from tests.conftest import ListenerClient

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        llama = FakeLlama()
        mock.add_callback("GET", f"{BACKEND}/props", llama.props)
        mock.add_callback("GET", f"{BACKEND}/slots", llama.slots)
        for upstream in ("/v1/chat/completions", "/completion", "/completions"):
            mock.post(f"{BACKEND}{upstream}", json={"ok": True})
        app = create_app({"backend_url": BACKEND, "state_dir": str(tmp_path / "state")})
        app.test_client_class = ListenerClient
        backend = app.extensions["bioproxy"].backend
        backend.slots.refresh()
        users = []  # each request that held warmups off
        user_started = backend.gate.user_started
        backend.gate.user_started = lambda: (users.append(1), user_started())

        answer = app.test_client().post(path, data=body)
        answer.close()  # the slot is given back when the response is closed

        assert answer.status_code in (200, 400), (answer.status_code, answer.get_data()[:300])
        if answer.status_code == 400:
            assert answer.json["error"]["type"] == "invalid_request_error"
            # Refused before it counted as a user: no slot taken, no warmup held off.
            assert (backend.scheduler.used, users) == ({}, [])
        assert backend.scheduler.busy == {}
        assert backend.gate.users == 0


@settings(max_examples=300, deadline=None)
@given(text=TEXT, include=TEXT, message=TEXT)
def test_no_template_text_breaks_loading_or_rendering(tmp_path_factory, text, include, message):
    folder = tmp_path_factory.mktemp("t")
    (folder / "inc.txt").write_text(include, errors="surrogatepass")
    (folder / "t.txt").write_bytes(
        text.replace("<{x}>", "<{inc.txt}>").encode("utf-8", "surrogatepass")
    )
    try:
        template = templates.load("@t", "t.txt", str(folder), str(folder), 1 << 20)
    except templates.TemplateError:
        return  # refused, with a message: fine
    rendered = template.render(message)
    assert message in rendered
    assert rendered.startswith(template.head)
