"""Finding a template prefix in a request, and putting the expanded template in its place."""

import json

from . import endpoints
from .errors import BadRequest
from .templates import match_prefix, strip_prefix


class Match:
    """A request with template prefixes: where each one's message is, and the template
    whose cache the request can reuse.

    prefix is the request's template: its opening user message's in a conversation that
    opened with one (a warmed cache then applies: the template's own, or a variant's when
    other messages or tools render before it, see variants.py), else its newest user
    message's. opening: that opening message's index in the messages, else None.
    """

    def __init__(self, body, prefix, places, chat, opening=None):
        self.body = body  # the parsed JSON body
        self.prefix = prefix
        self.places = places  # [(holder, key, prefix, expand)] for each templated message
        self.chat = chat
        self.opening = opening
        # The user's own words in each, read now: expand() writes over the messages.
        self.words = [strip_prefix(holder[key], p) for holder, key, p, _ in places]

    @property
    def message(self):
        """The user's own words in the message that carries the request's template."""
        return next(
            w for (_, _, p, _), w in zip(self.places, self.words, strict=True) if p == self.prefix
        )

    @property
    def prefixes(self):
        """Every template the request needs."""
        return {prefix for _, _, prefix, expand in self.places if expand}

    def expand(self, templates):
        """The new body: each message in its template (templates: prefix -> Template), and
        llama-server's cache asked for."""
        for (holder, key, prefix, expand), words in zip(self.places, self.words, strict=True):
            holder[key] = templates[prefix].render(words) if expand else words
        self.body["cache_prompt"] = True
        return dump(self.body)


def dump(body):
    """A body bioproxy rebuilt, as UTF-8 JSON; BadRequest if it cannot be valid Unicode."""
    try:
        return json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # JSON lets a string hold a lone UTF-16 surrogate escape ("\ud800"), which no UTF-8
        # text can; bioproxy does not send llama.cpp a body it made invalid.
        raise BadRequest(
            "request body holds a lone surrogate escape (such as \\ud800): not valid Unicode"
        ) from None


def find(path, body, prefixes):
    """The Match for a request's parsed body, or None when it is not templated.

    A completion's prompt that starts with a prefix is expanded. In a chat, each user
    message that starts with a prefix is expanded with its template, on every turn alike,
    so a conversation that opened with one keeps it, word for word, and llama-server
    reuses the earlier turns' cache; a later message with the opening message's own prefix
    has the prefix taken off, not the template repeated. Other roles are never read.
    """
    chat = path in endpoints.CHAT
    if not prefixes or not (chat or path in endpoints.COMPLETION):
        return None
    if not chat:
        prompt = body.get("prompt")
        prefix = match_prefix(prompt, prefixes) if isinstance(prompt, str) else None
        return Match(body, prefix, [(body, "prompt", prefix, True)], False) if prefix else None
    users = _user_texts(body)
    found = [(place, match_prefix(place[1][place[2]], prefixes)) for place in users]
    found = [(place, prefix) for place, prefix in found if prefix]
    if not found:
        return None
    opening = found[0][0] is users[0] and found[0][1]  # the conversation's template, if any
    places = [
        (holder, key, prefix, not (opening == prefix and place is not users[0]))
        for place, prefix in found
        for _, holder, key in [place]
    ]
    prefix = opening or found[-1][1]
    return Match(body, prefix, places, True, users[0][0] if opening else None)


# Deeper than any request llama-server is sent in practice (a JSON schema in a tool or a
# response_format nests a few dozen levels at most), and far from where Python's parser
# runs out of stack (about 900 levels), so the limit does not depend on the stack.
MAX_DEPTH = 128
# Python refuses longer integers (sys.int_max_str_digits); llama-server reads any integer
# beyond 64 bits as a floating-point number anyway.
MAX_DIGITS = 4300


def read(raw):
    """A request body as bioproxy must read it: a JSON object, or BadRequest saying why.

    Stricter than Python's parser where it would read something else than llama-server
    does (NaN and Infinity, numbers too large for a double, a key given twice), and bounded
    where it would fail on its own (nesting, long integers).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    try:
        body = json.loads(
            text,
            object_pairs_hook=_object,
            parse_constant=_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except RecursionError:
        raise _too_deep() from None
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _depth_beyond(body, MAX_DEPTH):
        raise _too_deep()
    return body


def _too_deep():
    return BadRequest(f"request body is nested more than {MAX_DEPTH} levels deep")


def _object(pairs):
    body = dict(pairs)
    if len(body) < len(pairs):
        seen = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))
        # JSON parsers disagree on which one counts: bioproxy cannot know what was meant.
        raise BadRequest(f"request body has the key {key[:80]!r} twice in one object")
    return body


def _constant(name):
    raise BadRequest(f"request body holds {name}, which JSON does not allow")


def _float(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadRequest(f"request body holds a number too large to read: {text[:40]}...")
    return value


def _int(text):
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise BadRequest(f"request body holds an integer of more than {MAX_DIGITS} digits")
    return int(text)


def _depth_beyond(value, limit):
    """Whether containers nest deeper than limit levels (the outermost one is level 1)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _user_texts(body):
    """(index, dict, key) for each user message with text, in order: the message's index,
    and what holds its text: its content if a string, else its first text part."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list")
    places = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, list):
            parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if parts and isinstance(parts[0].get("text"), str):
                places.append((index, parts[0], "text"))
        elif isinstance(content, str):
            places.append((index, message, "content"))
    return places
