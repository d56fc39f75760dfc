"""Finding a template prefix in a request, and putting the expanded template in its place."""

import json

from . import endpoints
from .errors import BadRequest
from .templates import match_prefix, strip_prefix


class Match:
    """A request whose message starts with a template prefix."""

    def __init__(self, body, prefix, place, chat):
        self.body = body  # the parsed JSON body
        self.prefix = prefix
        self.place = place  # (dict, key) holding the message text
        self.message = strip_prefix(place[0][place[1]], prefix)
        self.chat = chat  # chat requests are the ones whose template cache is warmed

    def expand(self, template):
        """The new body: the template around the message, llama-server's cache asked for."""
        holder, key = self.place
        holder[key] = template.render(self.message)
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
    """The Match for a request's parsed body, or None when it is not templated."""
    chat = path in endpoints.CHAT
    if not prefixes or not (chat or path in endpoints.COMPLETION):
        return None
    place = _last_user_text(body) if chat else (body, "prompt")
    if place is None or not isinstance(place[0].get(place[1]), str):
        return None
    prefix = match_prefix(place[0][place[1]], prefixes)
    return Match(body, prefix, place, chat) if prefix else None


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


def _last_user_text(body):
    """(dict, key) holding the last user message's text: its content, or first text part."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list")
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            break
    else:
        return None
    content = message.get("content")
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return (parts[0], "text") if parts else None
    return message, "content"
