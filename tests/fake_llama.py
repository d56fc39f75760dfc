"""A small hand-written llama-server for unit tests, served through `responses`."""

import json
import re
from urllib.parse import parse_qs, urlsplit

import responses

from tests.conftest import BACKEND

SYSTEM = "<sys>"
END = "<end><assistant>"


class FakeLlama:
    """Slots with task ids, a slot folder, a chat template; counts what it is asked."""

    def __init__(self, slots=2, model="/models/m.gguf", base=BACKEND):
        self.base = base
        self.model = model
        self.tasks = {i: -1 for i in range(slots)}
        self.contents = dict.fromkeys(range(slots), "")  # text each slot holds
        self.files = {}  # slot file name -> text
        self.next_task = 0
        self.status = {"save": 200, "restore": 200}
        self.error = {}  # action -> exception to raise instead of answering
        self.evaluated = []  # (slot, prompt) of each /completion but restore checks
        self.checks = []  # (slot, prompt) of each completion of what a restore just loaded
        self.restored = set()  # slots whose last action was a restore
        self.actions = []  # (action, slot, filename)
        self.chats = []  # request bodies of chat completions
        self.busy = set()  # slots that GET /slots shows as processing
        self.extra_saved = 0  # tokens a save reports beyond what the slot holds
        self.on_completion = None  # called with each /completion body before it is answered
        self.on_action = None  # called with (action, slot, filename) before it is answered
        self.clears_idle_slots = False
        self.ram = []  # texts in the RAM cache (--cache-ram), which unpinned requests reuse
        self.ram_keeps = True  # False: a --cache-ram too small for any slot's copy
        self.shows_tokens = True  # n_prompt_tokens in GET /slots
        self.hides_slots = False  # started with --no-slots: GET /slots answers 501
        self.folder = None  # where saves also write their file, to be seen on disk
        self.rendered = []  # bodies of /apply-template

    def install(self):
        responses.add_callback("GET", f"{self.base}/props", self.props)
        responses.add_callback("GET", f"{self.base}/slots", self.slots)
        responses.add_callback("POST", f"{self.base}/apply-template", self.apply_template)
        responses.add_callback("POST", f"{self.base}/tokenize", self.tokenize)
        responses.add_callback("POST", f"{self.base}/completion", self.completion)
        actions = re.compile(rf"{self.base}/slots/\d+\?action=\w+")
        responses.add_callback("POST", actions, self.action)
        responses.add_callback("POST", f"{self.base}/v1/chat/completions", self.chat)
        return self

    def restart(self, model=None):
        """A new server: empty slots, task ids from zero; the slot folder stays."""
        self.model = model or self.model
        self.restored.clear()
        self.tasks = dict.fromkeys(self.tasks, -1)
        self.contents = dict.fromkeys(self.contents, "")
        self.next_task = 0

    def run_other_task(self, slot, text="something else"):
        """A request bioproxy did not send lands in the slot."""
        self._task(slot, text)

    def _task(self, slot, text):
        if self.clears_idle_slots:
            # As llama-server with a unified KV cache and --cache-idle-slots (its defaults
            # without -np): a task that starts copies every other idle slot to its RAM
            # cache, and clears it.
            for other in self.contents:
                if other != slot and other not in self.busy and self.contents[other]:
                    self._keep(self.contents[other])
                    self.contents[other] = ""
        self.restored.discard(slot)
        self.tasks[slot] = self.next_task
        self.next_task += 1
        self.contents[slot] = text

    @staticmethod
    def _json(status, body):
        return status, {"Content-Type": "application/json"}, json.dumps(body)

    def props(self, request):
        return self._json(
            200, {"total_slots": len(self.tasks), "model_path": self.model, "build_info": "b1"}
        )

    def slots(self, request):
        if self.hides_slots:  # llama-server's own words
            message = "This server does not support slots endpoint. Start it with `--slots`"
            return self._json(501, {"error": {"code": 501, "message": message}})
        return self._json(200, [self._slot(i, task) for i, task in self.tasks.items()])

    def _slot(self, i, task):
        slot = {"id": i, "n_ctx": 4096, "is_processing": i in self.busy}
        if task >= 0:  # as llama-server: these only for a slot that has run a task
            slot["id_task"] = task
            if self.shows_tokens:
                slot["n_prompt_tokens"] = len(self.contents[i].split())
        return slot

    @staticmethod
    def render(messages, tools=None):
        """A chat rendered to a prompt, as a chat template does (each message then END;
        tools, if any, in the system prompt)."""
        system = SYSTEM + (f"<tools>{json.dumps(tools)}</tools>" if tools else "")
        return system + "".join(_text(m["content"]) + END for m in messages)

    @staticmethod
    def render_system_last(messages, tools=None):
        """As a chat template that puts the system message before the last user turn."""
        others = [m for m in messages if m.get("role") != "system"]
        systems = [m for m in messages if m.get("role") == "system"]
        last = max(i for i, m in enumerate(others) if m.get("role") == "user")
        ordered = others[:last] + systems + others[last:]
        return SYSTEM + "".join(_text(m["content"]) + END for m in ordered)

    def apply_template(self, request):
        body = json.loads(request.body)
        self.rendered.append(body)
        return self._json(200, {"prompt": self.render(body["messages"], body.get("tools"))})

    def tokenize(self, request):
        return self._json(
            200, {"tokens": list(range(len(json.loads(request.body)["content"].split())))}
        )

    def completion(self, request):
        body = json.loads(request.body)
        if self.on_completion is not None:
            self.on_completion(body)
        slot = body.get("id_slot")
        if slot is None or slot == -1:
            slot = self._place(body["prompt"])
        elif self.clears_idle_slots:
            self._pinned(slot, body["prompt"])
        prompt, held = body["prompt"], self.contents[slot]
        n = len(prompt.split())
        # Reused: what the slot holds, if the prompt starts with it; never the last token.
        cached = min(len(held.split()), n - 1) if held and prompt.startswith(held) else 0
        checked = slot in self.restored and cached == n - 1
        (self.checks if checked else self.evaluated).append((slot, prompt))
        self._task(slot, prompt)
        answer = {
            "content": "",
            "stop": True,
            "tokens_evaluated": n,
            "timings": {"cache_n": cached, "prompt_n": n - cached, "predicted_n": 1},
        }
        if body.get("stream"):
            events = f"data: {json.dumps({'content': ''})}\n\ndata: {json.dumps(answer)}\n\n"
            return 200, {"Content-Type": "text/event-stream"}, events
        return self._json(200, answer)

    def action(self, request):
        slot = int(re.search(r"/slots/(\d+)", request.url).group(1))
        action = re.search(r"action=(\w+)", request.url).group(1)
        name = json.loads(request.body)["filename"]
        self.actions.append((action, slot, name))
        if self.on_action is not None:
            self.on_action(action, slot, name)
        if action in self.error:
            raise self.error[action]
        if self.status[action] != 200:
            return self._json(self.status[action], {"error": {"message": f"{action} refused"}})
        if action == "save":
            self.files[name] = self.contents[slot]
            if self.folder is not None:
                (self.folder / name).write_text(self.contents[slot])
            saved = len(self.contents[slot].split()) + self.extra_saved
            return self._json(200, {"id_slot": slot, "n_saved": saved})
        if name not in self.files:
            self.contents[slot] = ""
            return self._json(400, {"error": {"message": "Unable to restore slot"}})
        self.contents[slot] = self.files[name]
        self.restored.add(slot)
        return self._json(200, {"id_slot": slot, "n_restored": len(self.files[name].split())})

    def _place(self, prompt):
        """The slot llama-server runs an unpinned prompt in: one that holds its start, else
        one it loads from its RAM cache (moving the entry out of it), else the first free."""
        free = [s for s in self.contents if s not in self.busy]
        holding = [s for s in free if self.contents[s] and prompt.startswith(self.contents[s])]
        slot = holding[0] if holding else free[0]
        if holding:
            return slot
        self._load(slot, prompt)
        return slot

    def _pinned(self, slot, prompt):
        """A request pinned to a slot that holds other work (it would keep less than half
        of it) has that work kept in the RAM cache and loads from there, as b11434 does;
        pinned to an empty slot, it loads nothing (llama.cpp issue 28139)."""
        held = self.contents[slot]
        if held and _common_words(held, prompt + " .") < max(len(held.split()), 1) / 2:
            self._load(slot, prompt)

    def _load(self, slot, prompt):
        if self.contents[slot]:  # what it held is kept there first
            self._keep(self.contents[slot])
            self.contents[slot] = ""
        # The entry sharing the longest start with the prompt, if it keeps a quarter of
        # itself (llama.cpp's server_prompt_cache::load).
        shared = {text: _common_words(text, prompt + " .") for text in self.ram}
        usable = [t for t in self.ram if shared[t] and shared[t] >= len(t.split()) / 4]
        if usable:
            best = max(usable, key=shared.get)
            self.ram.remove(best)
            self.contents[slot] = best

    def _keep(self, text):
        if self.ram_keeps:
            self.ram.append(text)

    def chat(self, request):
        body = json.loads(request.body)
        self.chats.append(body)
        prompt = self.render(body["messages"], body.get("tools"))
        slot = body.get("id_slot")
        if slot is None:
            slot = self._place(prompt)
        cached = _common_words(self.contents[slot], prompt)  # as llama-server's cache_prompt
        self._task(slot, prompt)
        timings = {"cache_n": cached, "prompt_n": len(prompt.split()) - cached, "predicted_n": 1}
        return self._json(200, {"choices": [{"message": {"content": "ok"}}], "timings": timings})


def _text(content):
    """A message's content as a chat template reads it: a string, or its text parts."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def _common_words(held, prompt):
    """The words a slot holding held reuses of prompt: their common start, never the last."""
    held, new = held.split(), prompt.split()
    n = 0
    while n < min(len(held), len(new) - 1) and held[n] == new[n]:
        n += 1
    return n


# The paths FakeRouter passes on to a model's FakeLlama, and its method for each.
ROUTED = {
    ("GET", "/props"): "props",
    ("GET", "/slots"): "slots",
    ("POST", "/apply-template"): "apply_template",
    ("POST", "/tokenize"): "tokenize",
    ("POST", "/completion"): "completion",
    ("POST", "/v1/chat/completions"): "chat",
}


class FakeRouter:
    """llama-server in router mode: one FakeLlama a model, reached by the model that a GET
    names in its query and a POST in its body; its own /props and /health otherwise."""

    def __init__(self, models, base=BACKEND, max_instances=4):
        self.base = base
        self.models = {name: FakeLlama(model=f"/models/{name}.gguf", base=base) for name in models}
        self.max_instances = max_instances  # its --models-max (0: no limit)
        self.unloaded = set()  # models it does not run now
        self.calls = []  # (method, path, model, autoload) of each call that named a model
        self.loads = []  # the models POST /models/load asked for
        self.aliases = {}  # model -> its other names (--alias, a preset's aliases)

    def install(self):
        for (method, path), handler in ROUTED.items():
            responses.add_callback(method, f"{self.base}{path}", self._routed(handler))
        actions = re.compile(rf"{self.base}/slots/\d+\?action=\w+")
        responses.add_callback("POST", actions, self._routed("action"))
        responses.add("GET", f"{self.base}/health", json={"status": "ok"})
        responses.add_callback("GET", f"{self.base}/models", self.list_models)
        responses.add_callback("POST", f"{self.base}/models/load", self.load)
        return self

    def list_models(self, request):
        data = [
            {
                "id": name,
                "aliases": self.aliases.get(name, []),
                "status": {"value": "unloaded" if name in self.unloaded else "loaded"},
            }
            for name in self.models
        ]
        return FakeLlama._json(200, {"data": data, "object": "list"})

    def load(self, request):
        model = json.loads(request.body)["model"]
        self.loads.append(model)
        self.reload(model)
        return FakeLlama._json(200, {"success": True})

    def _routed(self, handler):
        def handle(request):
            url = urlsplit(request.url)
            query = parse_qs(url.query)
            if request.method == "GET":
                model = query.get("model", [None])[0]
            else:
                model = json.loads(request.body or b"{}").get("model")
            if model is None:
                if handler == "props":
                    answer = {"role": "router", "max_instances": self.max_instances}
                    return FakeLlama._json(200, answer)
                return FakeLlama._json(400, {"error": {"message": "model name is missing"}})
            autoload = query.get("autoload", ["true"])[0]
            self.calls.append((request.method, url.path, model, autoload))
            model = next((m for m, names in self.aliases.items() if model in names), model)
            if model not in self.models:
                return FakeLlama._json(400, {"error": {"message": f"model '{model}' not found"}})
            if model in self.unloaded:
                return FakeLlama._json(400, {"error": {"message": "model is not loaded"}})
            return getattr(self.models[model], handler)(request)

        return handle

    def reload(self, model):
        """The router unloaded the model and loaded it again: a new server for it."""
        self.unloaded.discard(model)
        self.models[model].restart()
