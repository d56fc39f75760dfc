"""Finding a template prefix in a request, and putting the expanded template in its place."""

import json

from .errors import BadRequest
from .templates import match_prefix, strip_prefix

CHAT_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
COMPLETION_PATHS = frozenset({"/completion", "/completions", "/v1/completions"})


class Match:
    """A request whose message starts with a template prefix."""

    def __init__(self, body, prefix, place, chat):
        self.body = body  # the parsed JSON body
        self.prefix = prefix
        self.place = place  # (dict, key) holding the message text
        self.message = strip_prefix(place[0][place[1]], prefix)
        self.chat = chat  # chat requests are the ones whose template cache is warmed

    def expand(self, template, slot=None):
        """The new body: the template around the message, pinned to a slot if given."""
        holder, key = self.place
        holder[key] = template.render(self.message)
        if slot is not None:
            self.body["id_slot"] = slot
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


def find(method, path, raw, prefixes):
    """The Match for a request, or None when it is not templated (forwarded untouched)."""
    chat = path in CHAT_PATHS
    if not prefixes or method != "POST" or not (chat or path in COMPLETION_PATHS):
        return None
    body = _parse(raw)
    place = _last_user_text(body) if chat else (body, "prompt")
    if place is None or not isinstance(place[0].get(place[1]), str):
        return None
    prefix = match_prefix(place[0][place[1]], prefixes)
    return Match(body, prefix, place, chat) if prefix else None


def _parse(raw):
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequest("request body is not valid UTF-8") from None
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


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
