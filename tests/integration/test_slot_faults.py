"""llama-server's slot API failing around warmups, with a real llama-server.

Each case: what /templates, /status and /metrics say, and that a templated request is
answered (warm once bioproxy has recovered).
"""

import os
import shutil
import subprocess
import threading
import time

import pytest
import requests

from bioproxy.llamacpp import LlamaServer
from tests.servers import Bioproxy, JSONHandler, free_port, serve_http

# About 200 tokens: evaluated in well under a second here.
CODE = """You are a senior software engineer who answers programming questions.
Follow these rules in every answer:
- Answer briefly, and exactly what was asked.
- Show code in fenced blocks, with the language named after the fence.
- Prefer the standard library over third-party packages.
- Name the complexity of any algorithm you propose.
- When a question is ambiguous, say which reading you answer.
- Never invent functions that do not exist; say when you are unsure.
- Mention one pitfall that people often meet with the answer.
- Keep the answer under ten lines unless code needs more.
The question follows.
<{message}>"""
QUESTION = "How do I reverse a list in Python?"


def wait_until(check, timeout=120, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def workdir(folder, slot_folder, interval):
    """bioproxy's folder with @code, and its config."""
    work = folder / "bioproxy"
    (work / "templates").mkdir(parents=True, exist_ok=True)
    (work / "templates" / "code.txt").write_text(CODE)
    config = {
        "prefixes": {"@code": "templates/code.txt"},
        "template_root": "templates",
        "warmup_check_interval": interval,
        "slot_save_path": str(slot_folder),
    }
    return work, config


def llama_server(folder, slot_folder):
    """One slot; slot_folder None: started without --slot-save-path."""
    return LlamaServer(
        free_port(),
        slots=1,
        context=4096,
        slot_save_path=str(slot_folder) if slot_folder else None,
        log_path=str(folder / "llama-server.log"),
    )


def code(bioproxy):
    return bioproxy.templates()["@code"]


def counts(bioproxy, name):
    return {
        outcome: bioproxy.metric(name, template="@code", outcome=outcome)
        for outcome in ("ok", "failed")
    }


def recent(bioproxy):
    status = requests.get(bioproxy.admin_url + "/status", timeout=10).json()
    return status["warmups"]["recent"]


def ask(bioproxy):
    body = {
        "messages": [{"role": "user", "content": f"@code {QUESTION}"}],
        "temperature": 0,
        "max_tokens": 8,
    }
    answer = requests.post(bioproxy.proxy_url + "/v1/chat/completions", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return answer


def assert_warm(answer):
    """Only the question and the chat template's few tokens around it were evaluated."""
    timings = answer.json()["timings"]
    assert answer.headers["X-Bioproxy-Cache"] in ("slot", "restored")
    assert timings["cache_n"] > 150 and timings["prompt_n"] < 40, timings


class HookProxy:
    """HTTP between bioproxy and llama-server: hook(method, path) runs before each request
    is forwarded; llama-server unreachable is a 502. Counts the requests by path."""

    def __init__(self, target, hook=None):
        outer = self
        self.target, self.hook = target, hook
        self.seen = []  # (method, path)

        class Handler(JSONHandler):
            def do_GET(self):
                outer.forward(self)

            do_POST = do_GET

        self.server = serve_http(Handler)
        self.url = self.server.url

    def forward(self, handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        self.seen.append((handler.command, handler.path))
        if self.hook:
            self.hook(handler.command, handler.path)
        headers = {"Content-Type": handler.headers.get("Content-Type", "application/json")}
        try:
            answer = requests.request(
                handler.command, self.target + handler.path, data=body, headers=headers, timeout=120
            )
        except requests.RequestException:
            handler.send_json({"error": {"message": "llama-server unreachable"}}, 502)
            return
        content_type = answer.headers.get("Content-Type", "application/json")
        handler.send_json(answer.content, answer.status_code, content_type)

    def count(self, path_part):
        return sum(1 for _, path in self.seen if path_part in path)

    def close(self):
        self.server.shutdown()


@pytest.fixture
def hook_proxy():
    proxies = []

    def make(target, hook=None):
        proxies.append(HookProxy(target, hook))
        return proxies[-1]

    yield make
    for proxy in proxies:
        proxy.close()


def test_without_slot_save_path_the_template_warms_in_its_slot_and_its_file_is_kept(
    tmp_path, hook_proxy
):
    slot_folder = tmp_path / "slots"
    interval = 0.5
    work, config = workdir(tmp_path, slot_folder, interval)
    # A llama-server with a slot folder saves @code...
    with llama_server(tmp_path, slot_folder) as llama, Bioproxy(llama.url, work, config) as bp:
        wait_until(lambda: code(bp)["saved_file"], what="@code saved")
        saved = code(bp)["saved_file"]
    # ...then the same model without one: every slot action answers 501.
    with llama_server(tmp_path, None) as llama:
        proxy = hook_proxy(llama.url)
        with Bioproxy(proxy.url, work, config) as bp:
            wait_until(lambda: code(bp)["state"] == "warm", what="@code warm")
            assert_warm(ask(bp))
            passes = proxy.count("/props")
            wait_until(lambda: proxy.count("/props") >= passes + 4, what="four more passes")

            assert code(bp)["saved_file"] == saved  # kept for a server that can read it
            assert (slot_folder / saved).exists()
            assert counts(bp, "bioproxy_slot_restores_total") == {"ok": 0, "failed": 1}
            assert counts(bp, "bioproxy_slot_saves_total") == {"ok": 0, "failed": 1}
            assert counts(bp, "bioproxy_warmups_total") == {"ok": 1, "failed": 0}
            # Warm in its slot: not evaluated, restored or saved again, pass after pass.
            assert (proxy.count("action=restore"), proxy.count("action=save")) == (1, 1)
            assert "no --slot-save-path?" in bp.log()


def test_a_save_answering_500_is_tried_again_after_a_pause_and_then_saved(tmp_path):
    slot_folder = tmp_path / "slots"
    interval = 2.0  # the pause after the first failure: 4 s, to see it failed and heal it
    work, config = workdir(tmp_path, slot_folder, interval)
    with llama_server(tmp_path, slot_folder) as llama:
        shutil.rmtree(slot_folder)  # llama-server cannot write its file: 500
        with Bioproxy(llama.url, work, config) as bp:
            wait_until(lambda: counts(bp, "bioproxy_slot_saves_total")["failed"] == 1)
            failed = code(bp)
            slot_folder.mkdir()
            wait_until(lambda: code(bp)["state"] == "warm", what="@code warm")
            warm = code(bp)
            answer = ask(bp)
            saves = counts(bp, "bioproxy_slot_saves_total")
            warmups = counts(bp, "bioproxy_warmups_total")

    assert (failed["state"], failed["saved_file"]) == ("failed", None)
    assert "500 Unable to save slot" in failed["last_warmup"]["error"]
    assert (slot_folder / warm["saved_file"]).exists()
    assert saves == {"ok": 1, "failed": 1}
    assert warmups == {"ok": 1, "failed": 1}
    assert warm["last_warmup"]["at"] - failed["last_warmup"]["at"] >= 2 * interval - 0.1
    # The slot still held the evaluation (llama-server answered): the retry reused it.
    assert warm["last_warmup"]["tokens_evaluated"] < 30
    assert_warm(answer)


def test_a_restart_between_evaluation_and_save_is_a_failed_warmup_tried_again_later(
    tmp_path, hook_proxy
):
    slot_folder = tmp_path / "slots"
    interval = 1.0
    work, config = workdir(tmp_path, slot_folder, interval)
    restarted = threading.Event()
    with llama_server(tmp_path, slot_folder) as llama:

        def restart_at_the_first_save(method, path):
            if "action=save" in path and not restarted.is_set():
                llama.stop()
                llama.start().wait_ready()
                restarted.set()

        proxy = hook_proxy(llama.url, restart_at_the_first_save)
        # The save waits for the restart: however slow, it must not time out.
        with Bioproxy(proxy.url, work, config, slot_timeout=300) as bp:
            seen = []

            def warm():
                entry = code(bp)
                seen.append((entry["state"], entry["saved_file"]))
                return entry["state"] == "warm"

            wait_until(warm, what="@code warm")
            answer = ask(bp)
            warmups = [(w["outcome"], w["at"]) for w in recent(bp)]
            log = bp.log()
            saved = code(bp)["saved_file"]

            assert restarted.is_set()
            # The new server saved its empty slot, without an error: 0 tokens.
            assert "saved 0 tokens, evaluated" in log
            assert [outcome for outcome, _ in warmups] == ["failed", "ok"]
            assert warmups[1][1] - warmups[0][1] >= 2 * interval - 0.1  # after the pause
            assert all(saved_file for state, saved_file in seen if state == "warm"), seen
            assert counts(bp, "bioproxy_warmups_total") == {"ok": 1, "failed": 1}
            assert counts(bp, "bioproxy_slot_saves_total") == {"ok": 1, "failed": 1}
            assert (slot_folder / saved).exists()
            assert_warm(answer)


def test_a_restore_blocked_behind_another_generation_gives_up_and_the_request_goes_cold(
    llama, tmp_path
):
    work, config = workdir(tmp_path, llama.slot_save_path, 600)  # no pass after the first
    with Bioproxy(llama.url, work, config, slot_timeout=1) as bp:
        wait_until(lambda: code(bp)["state"] == "warm", what="@code warm")
        status = requests.get(bp.admin_url + "/status", timeout=10).json()
        (slot,) = [s["id"] for s in status["slots"] if s["template"] == "@code"]
        # A request bioproxy did not schedule (a client of llama-server's own) generates in
        # that slot until the test hangs up.
        other = generate_forever(llama, slot)
        asked = {}
        user = threading.Thread(target=lambda: asked.update(answer=ask(bp), at=time.monotonic()))
        start = time.monotonic()
        user.start()

        wait_until(
            lambda: counts(bp, "bioproxy_slot_restores_total")["failed"] == 1,
            timeout=60,
            what="the restore given up",
        )
        still_waiting = user.is_alive()  # queued in llama-server behind the generation
        other.close()
        user.join(120)

        answer = asked["answer"]
        assert still_waiting
        assert answer.headers["X-Bioproxy-Cache"] == "cold"
        assert answer.json()["choices"][0]["message"]["content"]
        assert asked["at"] - start >= 1  # slot_timeout
        assert counts(bp, "bioproxy_slot_restores_total") == {"ok": 0, "failed": 1}
        assert code(bp)["state"] == "warm"  # its file is fine: kept, and used next time
        assert "timed out" in bp.log()


def generate_forever(llama, slot):
    """A streamed generation in the slot, under way once this returns; close() ends it."""
    body = {"prompt": "Write a long story.", "n_predict": 100_000, "ignore_eos": True}
    answer = requests.post(
        llama.url + "/completion",
        json={**body, "id_slot": slot, "stream": True},
        stream=True,
        timeout=60,
    )
    # Kept: a generator dropped here would close the stream, and end the generation.
    answer.events = answer.iter_lines()
    next(answer.events)  # the first token
    assert busy(llama, slot)
    return answer


def busy(llama, slot):
    slots = requests.get(llama.url + "/slots", timeout=10).json()
    return slots[slot]["is_processing"]


@pytest.fixture
def full_disk(tmp_path):
    """A slot folder on a 1 MiB filesystem: a save of @code (a few MB) fills it."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}", pytrace=False)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_save_that_fills_the_disk_leaves_no_partial_file(tmp_path, full_disk):
    # Issue 16.6: llama-server writes what fits, then answers 500 "Unable to save slot".
    work, config = workdir(tmp_path, full_disk, interval=60)
    with (
        llama_server(tmp_path, full_disk) as llama,
        Bioproxy(llama.url, work, config) as bioproxy,
    ):
        wait_until(lambda: code(bioproxy)["state"] == "failed", what="the save to fail")
        assert "Unable to save slot" in code(bioproxy)["last_warmup"]["error"]
        assert list(full_disk.iterdir()) == []  # the partial file is gone: the disk has room
        assert counts(bioproxy, "bioproxy_slot_saves_total") == {"ok": 0, "failed": 1}
        # Still warm in its slot: the user's request is answered from it.
        body = {"messages": [{"role": "user", "content": f"@code {QUESTION}"}], "max_tokens": 8}
        answer = requests.post(bioproxy.proxy_url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200


def test_a_saved_cache_with_corrupted_kv_data_is_never_restored(tmp_path):
    # Issue 16.4: 8 KB of random bytes in the middle of a slot file: llama-server restored
    # it without a word, and the answer was '......' with X-Bioproxy-Cache: slot.
    slot_folder = tmp_path / "slots"
    work, config = workdir(tmp_path, slot_folder, interval=0.5)
    with llama_server(tmp_path, slot_folder) as llama:
        with Bioproxy(llama.url, work, config) as bp:
            wait_until(lambda: code(bp)["state"] == "warm", what="@code warm")
            good = ask(bp).json()["choices"][0]["message"]["content"]
            saved = slot_folder / code(bp)["saved_file"]
        size = saved.stat().st_size
        with open(saved, "r+b") as f:
            # Inside the V data of a layer, away from the per-layer headers (llama-server
            # refuses a file whose headers are spoiled, but not one whose data is).
            f.seek(size * 5 // 8)
            f.write(os.urandom(1024))
        llama.stop()
        llama.start().wait_ready()  # empty slots: the next bioproxy restores from the file
        with Bioproxy(llama.url, work, config) as bp:
            wait_until(lambda: code(bp)["state"] == "warm", what="@code warm again")
            assert bp.metric("bioproxy_warmups_total", template="@code", outcome="ok") == 1
            assert "content is not what was saved" in bp.log()
            answer = ask(bp)
            assert_warm(answer)
            assert answer.json()["choices"][0]["message"]["content"] == good
        # The spoiled file was replaced by a good one.
        assert saved.stat().st_size == size


def test_a_restart_after_bioproxy_only_restored_into_the_slots_is_noticed(tmp_path):
    # Issue 16.5: GET /slots shows a task only for a slot whose last task was a completion,
    # and a restore is none: a slot only restored looked just like a new server's, so a
    # restart between two passes went unnoticed and the next request was sent to an
    # empty slot as warm.
    slot_folder = tmp_path / "slots"
    work, config = workdir(tmp_path, slot_folder, interval=0.5)
    with llama_server(tmp_path, slot_folder) as llama:
        with Bioproxy(llama.url, work, config) as bp:
            wait_until(lambda: code(bp)["state"] == "warm", what="@code warm")
        llama.stop()
        llama.start().wait_ready()
        # One pass only, at start-up: none sees llama-server down while it restarts.
        with Bioproxy(llama.url, work, {**config, "warmup_check_interval": 600}) as bp:
            wait_until(lambda: code(bp)["state"] == "warm", what="@code restored")
            assert code(bp)["last_warmup"]["outcome"] == "restored"
            slots = requests.get(llama.url + "/slots", timeout=10).json()
            # The restore was proven by a completion, whose task the slot now shows.
            assert slots[0].get("id_task", -1) >= 0, slots
            llama.stop()
            llama.start().wait_ready()
            answer = ask(bp)
            assert answer.headers["X-Bioproxy-Cache"] == "restored"
            assert_warm(answer)
            assert bp.metric("bioproxy_warmups_total", template="@code", outcome="ok") == 0
