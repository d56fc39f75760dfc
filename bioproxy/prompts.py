"""The prompts bioproxy itself has llama-server evaluate: a template's head, in a slot."""

import json

from .upstream import BackendError

# Stands in for the user's message when asking llama-server how it renders a template.
SENTINEL = "\u2063bioproxy-message\u2063"


class Prompts:
    """Rendering a template's head as llama-server renders chat, and completing it."""

    def __init__(self, upstream, timeout, quick_timeout=None):
        self.upstream = upstream
        self.timeout = timeout  # for an evaluation
        self.quick_timeout = quick_timeout or timeout  # for a call that evaluates nothing

    def fetch_head(self, template):
        """The prompt text before the user's message, exactly as llama-server renders it."""
        return self.render_head(template_body(template))

    def render_head(self, body):
        """The prompt text llama-server renders before SENTINEL for a chat body holding it
        (the template's own message, or a variant's shape: see variants.py)."""
        answer = self.upstream.call("POST", "/apply-template", body, self.quick_timeout)
        prompt = answer.get("prompt") if isinstance(answer, dict) else None
        if not isinstance(prompt, str):
            raise BackendError("POST /apply-template", "the answer holds no prompt")
        cut = prompt.find(SENTINEL)
        if cut < 0:
            raise BackendError("POST /apply-template", "the chat template dropped the message")
        return prompt[:cut]

    def count(self, text):
        """How many tokens llama-server makes of a prompt's text."""
        body = {"content": text, "add_special": True}
        answer = self.upstream.call("POST", "/tokenize", body, self.quick_timeout)
        tokens = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(tokens, list):
            raise BackendError("POST /tokenize", "the answer holds no tokens")
        return len(tokens)

    def complete(self, slot, text):
        """Evaluate text into the slot, reusing what it holds; llama-server's answer."""
        return self.upstream.call("POST", "/completion", _body(slot, text), self.timeout)

    def open_completion(self, slot, text):
        """complete(), streamed: shutting its connection down stops llama-server at once."""
        body = {**_body(slot, text), "stream": True}
        return self.upstream.open("POST", "/completion", body, self.timeout)


def template_body(template):
    """A chat body that holds nothing but the template's message, around SENTINEL."""
    return {"messages": [{"role": "user", "content": template.render(SENTINEL)}]}


def _body(slot, text):
    return {"prompt": text, "n_predict": 0, "id_slot": slot, "cache_prompt": True}


def final_event(body):
    """The last `data:` event of a server-sent event stream, decoded."""
    events = [line[6:] for line in body.splitlines() if line.startswith(b"data: {")]
    if not events:
        raise BackendError("POST /completion", "the stream held no event")
    return json.loads(events[-1])
