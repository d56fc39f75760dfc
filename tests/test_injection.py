"""Finding a template prefix in a request and expanding the template into it."""

import json

import pytest

from bioproxy import endpoints, injection, templated
from bioproxy.errors import BadRequest
from bioproxy.templates import Template

PREFIXES = ["@code", "@codex"]
TEMPLATE = Template("@code", "t.txt", ("Before. ", " After."), ("/t.txt",), "d" * 64)


def find(method, path, raw, prefixes):
    """What the proxy does: read the body of a request that takes a slot, find its prefix."""
    if not endpoints.is_slotted(method, path):
        return None
    return injection.find(path, injection.read(raw), prefixes)


def chat(*messages, **extra):
    return json.dumps({"messages": list(messages), **extra}).encode()


def user(content):
    return {"role": "user", "content": content}


def expanded(match, slot=None):
    """The body sent: expanded, and pinned to a slot as the scheduler would."""
    data = match.expand(dict.fromkeys(match.prefixes, TEMPLATE))
    if slot is not None:
        data = templated._pin(data, match.body, slot)
    return json.loads(data)


def test_the_last_user_message_is_expanded_and_pinned():
    raw = chat(user("Hello."), {"role": "assistant", "content": "ok"}, user("@code How?"))

    match = find("POST", "/v1/chat/completions", raw, PREFIXES)
    body = expanded(match, slot=1)

    assert (match.prefix, match.message, match.chat) == ("@code", "How?", True)
    assert match.opening is None  # the conversation did not open with the template
    assert body["messages"][0]["content"] == "Hello."
    assert body["messages"][2]["content"] == "Before. How? After."
    assert body["id_slot"] == 1
    assert body["cache_prompt"] is True


def test_a_conversation_keeps_the_template_it_opened_with_on_every_turn():
    # Issue 11.4: from the second turn on, the opening message went raw ("@code How?"):
    # the template was gone from the conversation.
    turns = [user("@code How?"), {"role": "assistant", "content": "Like so."}]
    first = expanded(find("POST", "/v1/chat/completions", chat(turns[0]), PREFIXES))
    follow_ups = [
        chat(*turns, user("And in place?")),
        chat(*turns, user("@code And in place?")),  # the prefix again: not the template again
    ]

    for raw in follow_ups:
        match = find("POST", "/v1/chat/completions", raw, PREFIXES)
        body = expanded(match)
        assert (match.prefix, match.opening) == ("@code", 0)
        assert body["messages"][0] == first["messages"][0]  # word for word as on turn one
        assert body["messages"][1] == turns[1]
        assert body["messages"][2]["content"] == "And in place?"


def test_each_other_templated_message_gets_its_own_template_and_assistants_none():
    templates = {
        "@code": TEMPLATE,
        "@codex": Template("@codex", "x.txt", ("X: ", ""), ("/x.txt",), "e" * 64),
    }
    raw = chat(
        user("@code Write it."),
        {"role": "assistant", "content": "@codex is what you may mean."},
        user("@codex Review it."),
    )

    match = find("POST", "/v1/chat/completions", raw, PREFIXES)
    body = json.loads(match.expand(templates))

    assert (match.prefix, match.prefixes) == ("@code", {"@code", "@codex"})
    contents = [m["content"] for m in body["messages"]]
    assert contents == ["Before. Write it. After.", "@codex is what you may mean.", "X: Review it."]


def test_a_prefix_alone_is_an_empty_message():
    match = find("POST", "/chat/completions", chat(user("@code")), PREFIXES)

    assert match.message == ""
    assert expanded(match)["messages"][0]["content"] == "Before.  After."


def test_the_longest_prefix_wins():
    assert (
        find("POST", "/v1/chat/completions", chat(user("@codex hi")), PREFIXES).prefix == "@codex"
    )
    assert find("POST", "/v1/chat/completions", chat(user("@code hi")), PREFIXES).prefix == "@code"


@pytest.mark.parametrize(
    "content",
    ["@codehi", "hello @code hi", " @code hi", "@CODE hi", "", None, 7],
)
def test_no_prefix_means_no_match(content):
    assert find("POST", "/v1/chat/completions", chat(user(content)), PREFIXES) is None


def test_a_later_assistant_message_does_not_hide_the_last_user_message():
    raw = chat(user("@code hi"), {"role": "assistant", "content": "@code no"})

    assert find("POST", "/v1/chat/completions", raw, PREFIXES).message == "hi"


def test_array_content_uses_its_first_text_part():
    parts = [
        {"type": "image_url", "image_url": {"url": "data:x"}},
        {"type": "text", "text": "@code What is this?"},
        {"type": "text", "text": "more"},
    ]

    match = find("POST", "/v1/chat/completions", chat(user(parts)), PREFIXES)
    body = expanded(match)

    assert match.message == "What is this?"
    assert body["messages"][0]["content"][0] == parts[0]
    assert body["messages"][0]["content"][1] == {
        "type": "text",
        "text": "Before. What is this? After.",
    }
    assert body["messages"][0]["content"][2] == parts[2]


@pytest.mark.parametrize("path", ["/completion", "/completions", "/v1/completions"])
def test_completion_prompts_are_expanded_but_not_pinned(path):
    match = find(
        "POST", path, json.dumps({"prompt": "@code hi", "n_predict": 4}).encode(), PREFIXES
    )

    assert match.chat is False
    assert expanded(match) == {"prompt": "Before. hi After.", "n_predict": 4, "cache_prompt": True}


def test_non_ascii_text_survives_expansion():
    match = find("POST", "/v1/chat/completions", chat(user("@code ¿Cómo? 日本")), PREFIXES)

    assert match.expand({"@code": TEMPLATE}).decode() == (
        '{"messages": [{"role": "user", "content": "Before. ¿Cómo? 日本 After."}], '
        '"cache_prompt": true}'
    )


@pytest.mark.parametrize(
    "method, path", [("GET", "/v1/chat/completions"), ("POST", "/v1/embeddings")]
)
def test_other_requests_are_not_read(method, path):
    # Not even parsed: invalid JSON passes through untouched.
    assert find(method, path, b"{not json", PREFIXES) is None


def test_a_body_that_takes_a_slot_is_read_without_templates_too():
    with pytest.raises(BadRequest, match="not valid JSON"):
        find("POST", "/v1/chat/completions", b"{not json", [])
    assert find("POST", "/v1/chat/completions", chat(user("@code hi")), []) is None


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"{not json", "request body is not valid JSON"),
        (b'"a string"', "request body must be a JSON object"),
        (b"\xff\xfe", "request body is not valid UTF-8"),
        (b'{"messages": "hi"}', "'messages' must be a list"),
        # What Python's parser fails on by itself (a 500 before), or reads otherwise than
        # llama-server does.
        (b'{"messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 128"),
        (b'{"a":' + b"[" * 129 + b"]" * 129 + b"}", "nested more than 128"),
        (b'{"a": NaN}', "holds NaN"),
        (b'{"a": -Infinity}', "holds -Infinity"),
        (b'{"a": 1e400}', "a number too large to read"),
        (b'{"a": -1.5e999}', "a number too large to read"),
        (b'{"a": ' + b"9" * 5000 + b"}", "more than 4300 digits"),
        (b'{"messages": [], "messages": [{"role": "user", "content": "@code x"}]}', "twice"),
        (b'{"a": {"id_slot": 0, "id\\u005fslot": 1}}', "'id_slot' twice"),
    ],
)
def test_bodies_bioproxy_must_read_but_cannot_are_400(raw, message):
    with pytest.raises(BadRequest, match=message):
        find("POST", "/v1/chat/completions", raw, PREFIXES)


def test_a_lone_surrogate_in_a_body_bioproxy_rebuilds_is_a_400():
    from bioproxy.errors import BadRequest
    from bioproxy.injection import dump

    with pytest.raises(BadRequest, match="lone surrogate"):
        dump({"content": "hi \ud800"})
    assert dump({"content": "hi é"}) == '{"content": "hi é"}'.encode()


def test_a_system_message_before_the_template_leaves_it_the_opening_message():
    raw = chat({"role": "system", "content": "Be terse."}, user("@code How?"))

    match = find("POST", "/v1/chat/completions", raw, PREFIXES)

    assert (match.prefix, match.opening) == ("@code", 1)  # a variant's: see test_variants
    assert expanded(match)["messages"][1]["content"] == "Before. How? After."
