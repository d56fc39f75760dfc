"""A template after a client's own system message, or with tools: its variants, saved."""

import json

import pytest

from bioproxy.slot_table import variant_key
from tests.conftest import ADMIN_BASE, BACKEND
from tests.fake_llama import END, SYSTEM
from tests.test_warmup import CODE, backend, sample, templates_folder, warmer

SYSTEM_MESSAGE = {"role": "system", "content": "Answer in French."}


@pytest.fixture
def folder(isolated_config):
    return templates_folder(isolated_config)


@pytest.fixture
def llama(fake_llama, folder):
    fake_llama.folder = folder / "slots"  # its saves are files bioproxy can measure
    return fake_llama


def settings(folder, **more):
    return {
        "prefixes": {"@code": "code.txt", "@review": "review.txt"},
        "slot_save_path": str(folder / "slots"),
        **more,
    }


@pytest.fixture
def app(make_app, folder, llama):
    app = make_app(**settings(folder))
    warmer(app).check()
    return app


def chat(client, words, *before, **extra):
    """A chat opened by `@code words`, after the messages before (a system message)."""
    messages = [*before, {"role": "user", "content": f"@code {words}"}]
    body = {"messages": messages, **extra}
    return client.post("/v1/chat/completions", data=json.dumps(body), buffered=True)


def head_words(*before):
    """The tokens (words, in the fake) of a variant's head: what renders before the words."""
    return len((SYSTEM + "".join(m["content"] + END for m in before) + CODE.split("<")[0]).split())


def saved_variants(app):
    entries = backend(app).caches.registry.entries
    return {key: entry for key, entry in entries.items() if "template" in entry}


def test_a_system_message_s_first_request_is_cold_then_saved_and_warm(app, llama, client, admin):
    first = chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)
    second = chat(client, "How do I reverse a list?", SYSTEM_MESSAGE)

    assert first.headers["X-Bioproxy-Cache"] == "cold"
    assert second.headers["X-Bioproxy-Cache"] == "slot"
    assert first.headers["X-Bioproxy-Variant"] == second.headers["X-Bioproxy-Variant"]
    timings = second.get_json()["timings"]
    assert timings["cache_n"] >= head_words(SYSTEM_MESSAGE)
    assert timings["prompt_n"] <= 6  # the words, "Be exact." and the chat's end
    (key,) = saved_variants(app)
    assert key.startswith("@code ") and key.endswith(first.headers["X-Bioproxy-Variant"])
    assert (llama.folder / saved_variants(app)[key]["file"]).exists()
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="cold") == 1
    assert sample(admin, "bioproxy_template_requests_total", template="@code", cache="slot") == 1
    assert (
        sample(admin, "bioproxy_template_cache_misses_total", template="@code", expected="slot")
        == 0
    )


def test_a_variant_is_restored_once_its_slot_ran_other_work(app, llama, client):
    first = chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)
    slot = llama.chats[-1]["id_slot"]
    llama.run_other_task(slot)

    answer = chat(client, "How do I reverse a list?", SYSTEM_MESSAGE)

    assert first.headers["X-Bioproxy-Cache"] == "cold"
    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] >= head_words(SYSTEM_MESSAGE)


def test_a_variant_stays_warm_across_restarts_of_llama_server_and_bioproxy(
    app, make_app, llama, folder, client
):
    chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)
    llama.restart()
    again = make_app(**settings(folder))
    warmer(again).check()

    answer = chat(again.test_client(), "How do I reverse a list?", SYSTEM_MESSAGE)

    assert answer.headers["X-Bioproxy-Cache"] == "restored"
    assert answer.get_json()["timings"]["cache_n"] >= head_words(SYSTEM_MESSAGE)


def test_another_system_message_is_another_variant(app, llama, client):
    chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)

    other = chat(client, "How do I sort a dict?", {"role": "system", "content": "Be terse."})

    assert other.headers["X-Bioproxy-Cache"] == "cold"
    assert len(saved_variants(app)) == 2


def test_tools_make_a_variant_even_without_a_system_message(app, llama, client):
    tools = [{"type": "function", "function": {"name": "run", "parameters": {}}}]

    plain = chat(client, "How do I reverse a list?", temperature=0.5, max_tokens=8)
    first = chat(client, "How do I sort a dict?", tools=tools)
    second = chat(client, "How do I reverse a list?", tools=tools)

    assert first.headers["X-Bioproxy-Cache"] == "cold"
    assert second.headers["X-Bioproxy-Cache"] == "slot"
    # Sampling keys render nothing: the template's own warm slot, with no variant.
    assert plain.headers["X-Bioproxy-Cache"] == "slot"
    assert "X-Bioproxy-Variant" not in plain.headers


def test_a_body_whose_head_renders_as_the_template_s_own_is_the_template(app, llama, client):
    answer = chat(client, "Why?", chat_template_kwargs={"unused": True})

    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert "X-Bioproxy-Variant" not in answer.headers
    assert any(body.get("chat_template_kwargs") == {"unused": True} for body in llama.rendered)


def test_a_request_s_head_is_asked_of_llama_server_once_per_shape(app, llama, client):
    chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)
    asked = len(llama.rendered)

    chat(client, "How do I reverse a list?", SYSTEM_MESSAGE, temperature=0)

    assert len(llama.rendered) == asked


def test_a_follow_up_in_a_variant_reuses_the_earlier_turns(app, llama, client):
    chat(client, "How do I reverse a list?", SYSTEM_MESSAGE)
    history = [
        SYSTEM_MESSAGE,
        {"role": "user", "content": "@code How do I reverse a list?"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "And in place?"},
    ]

    answer = client.post(
        "/v1/chat/completions", data=json.dumps({"messages": history}), buffered=True
    )

    assert answer.headers["X-Bioproxy-Cache"] == "slot"
    assert answer.get_json()["timings"]["prompt_n"] <= 4


def test_array_content_after_a_system_message_is_a_variant_too(app, llama, client):
    def ask(words):
        content = [{"type": "text", "text": f"@code {words}"}]
        body = {"messages": [SYSTEM_MESSAGE, {"role": "user", "content": content}]}
        return client.post("/v1/chat/completions", data=json.dumps(body), buffered=True)

    first, second = ask("Why?"), ask("How?")

    assert (first.headers["X-Bioproxy-Cache"], second.headers["X-Bioproxy-Cache"]) == (
        "cold",
        "slot",
    )
    assert llama.chats[-1]["messages"][1]["content"][0]["text"].startswith("You answer")


def test_an_edited_template_never_restores_its_old_variants(app, llama, folder, client):
    first = chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)
    (old,) = saved_variants(app).values()
    (folder / "code.txt").write_text("New instructions.\n<{message}>")
    warmer(app).check()

    answer = chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)

    assert answer.headers["X-Bioproxy-Cache"] == "cold"
    assert answer.headers["X-Bioproxy-Variant"] != first.headers["X-Bioproxy-Variant"]
    assert not (folder / "slots" / old["file"]).exists()
    assert old["file"] not in [e["file"] for e in saved_variants(app).values()]


def test_variants_beyond_the_budget_are_evicted_least_recently_used_first(make_app, folder, llama):
    # Each variant's file holds its head alone: room for two, not three.
    size = len((SYSTEM + "Persona 0." + END + CODE.split("<")[0]).encode())
    budget = 2 * size + size // 2
    app = make_app(**settings(folder, variant_budget_bytes=budget))
    warmer(app).check()
    client, admin = app.test_client(), app.test_client(base_url=ADMIN_BASE)
    systems = [{"role": "system", "content": f"Persona {n}."} for n in range(3)]
    keys = [chat(client, "Why?", system).headers["X-Bioproxy-Variant"] for system in systems[:2]]
    llama.run_other_task(0)
    llama.run_other_task(1)
    again = chat(client, "How?", systems[0])  # restored: now the most recently used

    keys.append(chat(client, "Why?", systems[2]).headers["X-Bioproxy-Variant"])

    assert again.headers["X-Bioproxy-Cache"] == "restored"
    kept = {key.split(" ")[1] for key in saved_variants(app)}
    assert kept == {keys[0], keys[2]}
    sizes = [entry["size"] for entry in saved_variants(app).values()]
    assert sizes == [size, size]
    on_disk = {path.name for path in llama.folder.glob("*.bin")}
    assert {entry["file"] for entry in saved_variants(app).values()} <= on_disk
    assert len(on_disk) == 4  # the two templates' files and the two variants kept
    assert sample(admin, "bioproxy_variant_evictions_total", template="@code") == 1


def test_a_budget_of_zero_saves_no_variant(make_app, folder, llama):
    app = make_app(**settings(folder, variant_budget_bytes=0))
    warmer(app).check()
    client = app.test_client()

    chat(client, "Why?", SYSTEM_MESSAGE)
    again = chat(client, "How?", SYSTEM_MESSAGE)

    assert saved_variants(app) == {}
    assert again.headers["X-Bioproxy-Cache"] == "slot"  # still reused while its slot holds it


def test_templates_lists_each_template_s_variants(app, llama, client, admin):
    first = chat(client, "Why?", SYSTEM_MESSAGE)
    chat(client, "How?", SYSTEM_MESSAGE)

    listed = {t["prefix"]: t for t in admin.get("/templates").get_json()["templates"]}

    (variant,) = listed["@code"]["variants"]
    assert variant["key"] == "@code " + first.headers["X-Bioproxy-Variant"]
    assert variant["tokens"] == head_words(SYSTEM_MESSAGE)
    assert variant["saved_file"] and variant["bytes"] > 0
    assert variant["requests"] == {"slot": 1, "restored": 0, "server": 0, "cold": 1}
    assert listed["@review"]["variants"] == []


def test_a_head_llama_server_cannot_render_is_served_as_plain(app, llama, client):
    import responses

    responses.replace("POST", f"{BACKEND}/apply-template", status=500, json={"error": {}})

    answer = chat(client, "Why?", SYSTEM_MESSAGE)

    assert answer.status_code == 200
    assert answer.headers["X-Bioproxy-Cache"] == "cold"
    assert "id_slot" in llama.chats[-1]


def test_variant_keys_tell_heads_and_models_apart():
    keys = {variant_key("@code", head, model) for head in ("a", "b") for model in ("m1", "m2")}

    assert len(keys) == 4
    assert all(key.startswith("@code ") for key in keys)


def test_the_first_request_saves_the_head_alone_then_reuses_it(app, llama, client):
    answer = chat(client, "How do I sort a dict?", SYSTEM_MESSAGE)

    (entry,) = saved_variants(app).values()
    saved = (llama.folder / entry["file"]).read_text()
    assert saved == SYSTEM + SYSTEM_MESSAGE["content"] + END + CODE.split("<")[0]
    assert "sort a dict" not in saved  # no user's words on disk
    assert llama.evaluated[-1] == (llama.chats[-1]["id_slot"], saved)  # in the request's slot
    assert answer.headers["X-Bioproxy-Cache"] == "cold"  # the head was evaluated for it
    assert answer.get_json()["timings"]["cache_n"] >= head_words(SYSTEM_MESSAGE)


def test_a_chat_template_that_moves_the_system_message_later_gets_no_variant(
    app, llama, client, caplog
):
    llama.render = llama.render_system_last  # the head would not begin a later turn

    answers = [chat(client, words, SYSTEM_MESSAGE) for words in ("Why?", "How?")]

    assert [a.headers["X-Bioproxy-Cache"] for a in answers] == ["cold", "cold"]
    assert all("X-Bioproxy-Variant" not in a.headers for a in answers)
    assert saved_variants(app) == {}
    assert "served as plain" in caplog.text


def test_a_variant_larger_than_the_budget_alone_is_not_saved_and_others_stay(
    make_app, folder, llama
):
    size = len((SYSTEM + "Short." + END + CODE.split("<")[0]).encode())
    app = make_app(**settings(folder, variant_budget_bytes=size + 5))
    warmer(app).check()
    client = app.test_client()
    chat(client, "Why?", {"role": "system", "content": "Short."})
    long_system = {"role": "system", "content": "A much longer persona than the budget holds."}

    chat(client, "Why?", long_system)
    actions = len(llama.actions)
    chat(client, "How?", long_system)

    assert [e["template"] for e in saved_variants(app).values()] == ["@code"]
    (kept,) = saved_variants(app).values()
    assert kept["size"] == size  # the short one, saved first, stays
    assert [a for a, _, _ in llama.actions[actions:]].count("save") == 0  # not tried again


def test_at_start_up_variants_of_edited_templates_and_beyond_the_budget_go(
    app, make_app, llama, folder, client
):
    chat(client, "Why?", SYSTEM_MESSAGE)
    chat(client, "Why?", {"role": "system", "content": "Be terse."})
    files = [e["file"] for e in saved_variants(app).values()]
    assert len(files) == 2

    smaller = make_app(**settings(folder, variant_budget_bytes=1))
    assert saved_variants(smaller) == {}
    assert not any((llama.folder / name).exists() for name in files)


def test_variants_of_a_template_edited_while_bioproxy_was_stopped_are_deleted(
    app, make_app, llama, folder, client
):
    chat(client, "Why?", SYSTEM_MESSAGE)
    (old,) = saved_variants(app).values()
    (folder / "code.txt").write_text("New instructions.\n<{message}>")

    again = make_app(**settings(folder))

    assert saved_variants(again) == {}
    assert not (llama.folder / old["file"]).exists()


def test_an_entry_of_saved_json_bioproxy_cannot_read_is_left_out(app, make_app, folder, llama):
    state = backend(app).caches.registry.path
    with open(state) as f:
        entries = json.load(f)
    entries["@code x"] = ["not", "an", "entry"]
    entries["@review y"] = {"file": 3}
    entries["@code z"] = {"file": "f.bin", "digest": "d", "model": "m", "size": "big"}
    with open(state, "w") as f:
        json.dump(entries, f)

    again = make_app(**settings(folder))

    assert not {"@code x", "@review y", "@code z"} & set(backend(again).caches.registry.entries)
    assert "@code" in backend(again).caches.registry.entries


def test_a_failed_save_is_not_tried_again_at_once(app, llama, client):
    llama.status["save"] = 500

    first = chat(client, "Why?", SYSTEM_MESSAGE)
    llama.run_other_task(llama.chats[-1]["id_slot"])
    saves = [a for a, _, _ in llama.actions].count("save")
    again = chat(client, "How?", SYSTEM_MESSAGE)

    assert first.status_code == again.status_code == 200
    assert first.headers["X-Bioproxy-Cache"] == "cold"
    assert saved_variants(app) == {}
    assert [a for a, _, _ in llama.actions].count("save") == saves  # within SAVE_RETRY
    assert again.headers["X-Bioproxy-Cache"] == "server"  # to llama-server's own cache
    assert "id_slot" not in llama.chats[-1]


def test_a_request_s_head_not_rendered_keeps_the_template_when_nothing_is_before_it(
    app, llama, client
):
    import responses

    responses.replace("POST", f"{BACKEND}/apply-template", status=500, json={"error": {}})

    answer = chat(client, "Why?", tools=[{"type": "function", "function": {"name": "f"}}])

    assert answer.headers["X-Bioproxy-Cache"] == "slot"  # its timings then tell
    assert "X-Bioproxy-Variant" not in answer.headers
