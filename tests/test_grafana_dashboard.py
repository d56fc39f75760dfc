"""The Grafana dashboard in deploy/grafana: well formed, and it only queries real metrics."""

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).parents[1] / "deploy" / "grafana" / "bioproxy.json"
METRIC = re.compile(r"bioproxy_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")

# The issue's topics, each by a series some panel must query.
REQUIRED = (
    "bioproxy_time_to_first_token_seconds_bucket",
    "bioproxy_template_requests_total",
    "bioproxy_queue_length",
    "bioproxy_warmups_total",
    "bioproxy_upstream_errors_total",
    "bioproxy_backend_up",
    "bioproxy_backend_templates_warm",
    "bioproxy_backend_requests_total",
)


@pytest.fixture(scope="module")
def dashboard():
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard):
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def exprs(dashboard):
    """Every PromQL text of the dashboard: panel targets and template variable queries."""
    found = [t["expr"] for p in all_panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
            found.append(variable.get("definition", ""))
    return found


def metric_names(expr):
    """The bioproxy series an expression names, with histogram suffixes cut off."""
    names = set()
    for name in METRIC.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                names.add((name.removesuffix(suffix), suffix))
                break
        else:
            names.add((name, ""))
    return names


def unknown_metrics(expressions, families):
    """The names in expressions that the registry does not export, sorted.

    families maps each family's name as Prometheus scrapes it (a counter's with its
    _total) to its type; a suffixed name must be a histogram's _bucket, _count or _sum.
    """
    unknown = set()
    for expr in expressions:
        for base, suffix in metric_names(expr):
            kind = families.get(base)
            if kind is None or (suffix and kind != "histogram"):
                unknown.add(base + suffix)
    return sorted(unknown)


@pytest.fixture
def families(make_app):
    """{name as scraped: type} from the registry that the app serves at /metrics."""
    registry = make_app().extensions["bioproxy"].metrics.registry
    found = {}
    for family in registry.collect():
        # prometheus_client strips _total from a counter family's name; the series keep it.
        name = family.name + "_total" if family.type == "counter" else family.name
        found[name] = family.type
    return found


def test_it_is_a_dashboard(dashboard):
    assert dashboard["title"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["panels"]


def test_panels_have_unique_ids_and_fit_the_grid(dashboard):
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0, panel["title"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_panel_queries_the_chosen_data_source_and_has_a_unit(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in all_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_metric_the_dashboard_names_exists(dashboard, families):
    assert unknown_metrics(exprs(dashboard), families) == []


def test_rates_use_the_rate_interval_and_only_counters(dashboard):
    for expr in exprs(dashboard):
        for window in re.findall(r"\[[^\]]*\]", expr):
            assert window == "[$__rate_interval]", expr
        for name in re.findall(r"\brate\((bioproxy_[a-z_]+)", expr):
            assert name.endswith(("_total", *HISTOGRAM_SUFFIXES)), expr
        if "histogram_quantile" in expr:
            assert re.search(r"by \([^)]*\ble\b", expr), expr
            assert "_bucket" in expr, expr


def test_the_panels_cover_the_issues_topics(dashboard):
    used = {name for expr in exprs(dashboard) for name in METRIC.findall(expr)}
    assert set(REQUIRED) - used == set()


def test_a_row_shows_each_backend_apart(dashboard):
    panels = dashboard["panels"]
    (start,) = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Backends"]
    below = []
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        below.append(panel)
    shown = {name for p in below for t in p["targets"] for name in METRIC.findall(t["expr"])}
    assert {"bioproxy_backend_up", "bioproxy_queue_length", "bioproxy_slots"} <= shown
    for panel in below:
        for target in panel["targets"]:
            # One series a backend: summed by it, or a gauge that has only that label.
            expr = target["expr"]
            assert "by (backend)" in expr or re.fullmatch(r"bioproxy_backend_[a-z_]+", expr)
            assert "{{backend}}" in target["legendFormat"], panel["title"]


def test_a_made_up_metric_is_reported(families):
    fake = [
        "sum(rate(bioproxy_no_such_thing_total[$__rate_interval]))",
        "histogram_quantile(0.9, sum by (le) (rate(bioproxy_queue_length_bucket[5m])))",
        "bioproxy_upstream_errors",  # a counter without its _total
        "sum(bioproxy_queue_length) + histogram_quantile(0.5, bioproxy_warmup_seconds_bucket)",
    ]
    assert metric_names(fake[0]) == {("bioproxy_no_such_thing_total", "")}
    assert unknown_metrics(fake, families) == [
        "bioproxy_no_such_thing_total",
        "bioproxy_queue_length_bucket",
        "bioproxy_upstream_errors",
    ]
