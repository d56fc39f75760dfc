"""The admin port's status page, and llama-server's chat page through the proxy port, in
headless Chromium, against bioproxy under real gunicorn.

The first tests need no llama-server: the backend is a closed port, so the page shows it
down and the templates never warm. The last ones start their own. Chromium and
chromedriver come from Debian's packages, the chat page from scripts/setup; a missing one
is an error here, never a skip: run scripts/setup --dev.
"""

import os
import shutil
from pathlib import Path

import pytest

from bioproxy import llamacpp
from tests.integration.conftest import start_llama
from tests.servers import Bioproxy, free_port, wait_until

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the browser fixture, as a failure
    webdriver = None

EXAMPLES = Path(__file__).parents[2] / "examples"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT = 15  # seconds any wait in the page may take
ODD_PREFIX = '@x<b>&"'  # markup in a prefix must show as text
ODD_FILE = "templates/<i>&'.txt"  # missing: its error message names it, markup and all


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("status-page")
    (folder / "templates").mkdir()
    for name in ("code", "review"):
        (folder / "templates" / f"{name}.txt").write_text(f"You {name}.\n<{{message}}>\n")
    config = {
        "prefixes": {
            "@code": "templates/code.txt",
            "@review": "templates/review.txt",
            ODD_PREFIX: ODD_FILE,
        },
        "warmup_check_interval": 0.5,
    }
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: llama-server is down
    with Bioproxy(closed, str(folder), config, health_timeout=1.0) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if webdriver is None:
        pytest.fail("selenium is not installed: run scripts/setup --dev", pytrace=False)
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is not installed: run scripts/setup --dev", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # Chromium refuses to run as root with its sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-sync",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):
        options.add_argument(argument)
    # Everything the page logs to the console, readable with get_log("browser").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


# What the page shows, read in one go: it rebuilds its elements at every refresh, so an
# element found first and read later may be gone by then.
SNAPSHOT = """
const node = (id) => document.getElementById(id);
const shown = (id) => node(id).checkVisibility();
return {
    refreshes: Number(document.body.dataset.refreshes || 0),
    backend: node("backend-status").textContent,
    backend_url: node("backend-url").textContent,
    banner: shown("banner") ? node("banner").textContent : null,
    templates: Object.fromEntries(
        Array.from(document.querySelectorAll("#templates tbody tr"), (row) => [
            row.dataset.prefix,
            row.innerText,
        ]),
    ),
    sections: Object.fromEntries(
        ["slots", "queue", "warmups"].map((id) => [id, node(id).innerText]),
    ),
    backends: shown("backends-section")
        ? Object.fromEntries(
              Array.from(document.querySelectorAll("#backends tbody tr"), (row) => [
                  row.dataset.backend,
                  row.innerText,
              ]),
          )
        : null,
    ttft_chart: shown("ttft-chart"),
    ttft_empty: shown("ttft-empty") ? node("ttft-empty").textContent : null,
    text: document.body.innerText,
    markup: document.querySelectorAll("body b, body i").length,
    resources: performance.getEntriesByType("resource").map((entry) => entry.name),
};
"""


def snapshot(driver):
    return driver.execute_script(SNAPSHOT)


def open_page(driver, server, refreshes=1):
    """Load the status page and wait until it has shown fresh data `refreshes` times."""
    # Leave the page a test before may have left polling (a gunicorn since stopped), then
    # start from an empty console log: its last failed fetches must not count here.
    driver.get("about:blank")
    driver.get_log("browser")
    driver.get(server.admin_url + "/")
    WebDriverWait(driver, WAIT).until(
        lambda d: snapshot(d)["refreshes"] >= refreshes, "the status page never showed data"
    )
    return snapshot(driver)


def console_problems(driver):
    """The console's errors and warnings: failed loads, uncaught exceptions, console.warn()."""
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def test_page_shows_templates_and_backend_down_without_console_errors(browser, server):
    # Two refreshes: the first load and one of the page's own, 2 s later.
    page = open_page(browser, server, refreshes=2)

    assert page["backend"] == "down"
    assert page["backend_url"].startswith("http://127.0.0.1:")
    assert page["banner"] is None
    rows = page["templates"]
    assert set(rows) == {"@code", "@review", ODD_PREFIX}
    for prefix in ("@code", "@review"):
        assert prefix in rows[prefix]
        assert any(state in rows[prefix] for state in ("pending", "stale")), rows[prefix]
    assert "broken" in rows[ODD_PREFIX]
    assert all(text.strip() for text in page["sections"].values()), page["sections"]
    assert page["ttft_empty"]  # no requests: a sentence instead of a chart
    assert page["ttft_chart"] is False

    assert console_problems(browser) == []
    # Nothing but the admin port: no CDN, font or image, no favicon from anywhere.
    resources = page["resources"]
    assert {"/health", "/templates", "/status"} <= {
        name.removeprefix(server.admin_url).split("?")[0] for name in resources
    }
    assert [name for name in resources if not name.startswith(server.admin_url + "/")] == []


def test_page_shows_markup_in_config_as_text(browser, server):
    page = open_page(browser, server)

    row = page["templates"][ODD_PREFIX]
    assert ODD_PREFIX in row
    assert "<i>&'.txt" in row  # the file, and the error that names it
    assert ODD_PREFIX in page["text"]
    assert page["markup"] == 0  # no <b> or <i> element made of them
    assert console_problems(browser) == []


def test_page_says_when_the_admin_port_is_unreachable(browser, tmp_path):
    with Bioproxy(f"http://127.0.0.1:{free_port()}", str(tmp_path)) as server:
        open_page(browser, server)
    # gunicorn is gone; the page's next refresh fails and says so, without throwing.
    WebDriverWait(browser, WAIT).until(
        lambda d: "admin port unreachable" in (snapshot(d)["banner"] or ""),
        "the page does not say the admin port is unreachable",
    )
    # Chromium logs the failed fetches themselves; nothing else may be logged.
    problems = console_problems(browser)
    assert all(e["source"] == "network" and "net::ERR_" in e["message"] for e in problems), problems


def warm_bioproxy(llama, folder):
    """bioproxy with the example templates in front of llama, once both are warm."""
    if not (folder / "templates").exists():
        shutil.copytree(EXAMPLES / "templates", folder / "templates")
    config = {
        "prefixes": {"@code": "templates/code.txt", "@review": "templates/review.txt"},
        "warmup_check_interval": 0.5,
    }
    server = Bioproxy(llama.url, str(folder), config, slot_save_path=llama.slot_save_path)
    server.start().wait_ready()
    wait_until(
        server.all_warm,
        what="templates warm",
        describe=server.templates,
    )
    return server


def test_page_shows_what_it_last_saw_of_a_llama_server_that_went_down(browser, tmp_path):
    with start_llama(tmp_path / "llama") as llama:
        first = warm_bioproxy(llama, tmp_path)
        first.stop()
        # A new bioproxy finds the saved caches and restores them: that is its last warmup.
        server = warm_bioproxy(llama, tmp_path)
        try:
            page = open_page(browser, server)
            for prefix in ("@code", "@review"):
                assert "restored" in page["templates"][prefix], page["templates"][prefix]
                assert "saved" in page["templates"][prefix]
                assert "never" not in page["templates"][prefix]

            llama.kill()
            wait_until(
                lambda: (
                    snapshot(browser)["backend"] == "down"
                    and "unknown" in snapshot(browser)["sections"]["slots"]
                ),
                timeout=WAIT,
                what="the page showing llama-server down",
            )
            page = snapshot(browser)
            for prefix in ("@code", "@review"):
                assert "as last seen" in page["templates"][prefix], page["templates"][prefix]
            assert "busy" not in page["sections"]["slots"]
            assert "other" not in page["sections"]["slots"]
            assert console_problems(browser) == []
        finally:
            server.stop()


def test_page_shows_each_backend_when_there_are_several(browser, tmp_path):
    shutil.copytree(EXAMPLES / "templates", tmp_path / "templates")
    closed = f"http://127.0.0.1:{free_port()}"
    with start_llama(tmp_path / "llama") as llama:
        config = {
            "prefixes": {"@code": "templates/code.txt", "@review": "templates/review.txt"},
            "warmup_check_interval": 0.5,
            "backends": [
                {"url": llama.url, "name": "real", "slot_save_path": llama.slot_save_path},
                {"url": closed, "name": "gone"},
            ],
        }
        with Bioproxy(None, str(tmp_path), config, health_timeout=1.0) as server:
            # The top level of /templates is the first backend's: "real".
            wait_until(server.all_warm, what="templates warm on real", describe=server.templates)
            page = open_page(browser, server)
            assert page["backends"] is not None, "no Backends section"
            assert set(page["backends"]) == {"real", "gone"}
            assert "up" in page["backends"]["real"] and llama.url in page["backends"]["real"]
            assert "2 / 2" in page["backends"]["real"]  # both templates warm there
            assert "out" in page["backends"]["gone"] and "0 / 2" in page["backends"]["gone"]
            assert console_problems(browser) == []


def test_one_backend_shows_no_backends_section(browser, server):
    assert open_page(browser, server)["backends"] is None


def test_llama_server_s_chat_page_through_bioproxy_answers_a_templated_message_warm(
    browser, tmp_path
):
    ui = llamacpp.ui_path()
    if ui is None:
        pytest.fail("llama-server's chat page is not built: run scripts/setup --dev", pytrace=False)
    with start_llama(tmp_path / "llama", ui=ui) as llama:
        server = warm_bioproxy(llama, tmp_path)
        try:
            browser.get(server.proxy_url + "/")
            box = WebDriverWait(browser, WAIT).until(
                lambda d: next(
                    (t for t in d.find_elements(By.TAG_NAME, "textarea") if t.is_displayed()), None
                ),
                "the chat page shows no message box",
            )
            box.send_keys("@code How do I reverse a list?", Keys.ENTER)
            # The UI's stream starts with progress events; the first token comes after them.
            wait_until(
                lambda: (
                    server.metric("bioproxy_time_to_first_token_seconds_count", template="@code")
                    == 1
                ),
                timeout=120,
                what="the answer's first token",
            )
            assert "How do I reverse a list?" in browser.find_element(By.TAG_NAME, "body").text
            # The UI asks for no length limit, so the answer may run on for minutes: leaving
            # the page ends it, and with it the request, which is then counted.
            browser.get("about:blank")
            wait_until(
                lambda: server.metric("bioproxy_template_requests_total", template="@code") == 1,
                timeout=60,
                what="the chat page's request ended",
            )
            # Expanded and sent to the slot that holds @code.
            requests_in_slot = server.metric(
                "bioproxy_template_requests_total", template="@code", cache="slot"
            )
            assert requests_in_slot == 1
        finally:
            server.stop()
