"""The Grafana dashboard and the Prometheus alert rules in ``deploy/monitoring/`` name only
metrics the programs actually export, so a renamed metric cannot silently blank a panel or
mute an alert.

The exported names come from the running programs: ``chatmail-metadata`` (with ``--metrics``
and the embedded proxy's own metrics listener) and the standalone ``notifiers`` proxy are
started and scraped with the OpenMetrics ``Accept`` header Prometheus sends.  A family that
has no sample yet (a labelled counter nobody incremented) still counts: its type says which
sample names Prometheus will store (``_total`` for a counter, ``_bucket``/``_sum``/``_count``
for a histogram).  The metric names in each PromQL expression come from a small tokenizer
that drops functions, aggregation keywords and their label lists, label matchers, ranges,
durations, numbers and Grafana variables.

The rule file is JSON-compatible YAML (PyYAML is not a dependency): Prometheus reads it as
YAML, the test with :func:`json.loads`, strictly.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from chatmaild.jobqueue import RetryPolicy
from chatmaild.notifier import Notifier
from chatmaild.relaymetrics import RelayMetrics
from devstack.dovecot import make_run_dir
from devstack.loopback import free_ports, wait_until
from devstack.metadata import MetadataServer
from devstack.process import running, stop_process

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "monitoring" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "monitoring" / "prometheus-alerts.yml"
OPERATIONS = ROOT / "docs" / "operations.md"

ACCEPT = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"

# Sample names Prometheus stores for a family of each type (``_created`` is left out: the
# proxy drops it, and no panel should depend on it).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}

# --- PromQL: metric names in an expression -----------------------------------------------

AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
FUNCTIONS = AGGREGATIONS | {
    "abs", "absent", "absent_over_time", "ceil", "changes", "clamp", "clamp_max", "clamp_min",
    "day_of_month", "day_of_week", "day_of_year", "days_in_month", "delta", "deriv", "exp",
    "floor", "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "double_exponential_smoothing", "hour", "idelta", "increase", "irate", "label_join",
    "label_replace", "ln", "log2", "log10", "minute", "month", "predict_linear", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sort_by_label",
    "sort_by_label_desc", "sqrt", "time", "timestamp", "vector", "year", "avg_over_time",
    "min_over_time", "max_over_time", "sum_over_time", "count_over_time",
    "quantile_over_time", "stddev_over_time", "stdvar_over_time", "last_over_time",
    "present_over_time", "mad_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh",
    "cos", "cosh", "sin", "sinh", "tan", "tanh", "deg", "pi", "rad",
}  # fmt: skip
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
WORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
_TOKEN = re.compile(
    rf"""
    (?P<space>\s+)
    |(?P<string>{_STRING})
    |(?P<matchers>\{{(?:[^{{}}"'`]|{_STRING})*\}})
    |(?P<range>\[[^\]]*\])
    |(?P<number>(?:0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
        (?:(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)?)
    |(?P<variable>\$\{{?\w+\}}?)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>(),=@])
    """,
    re.X,
)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 20]!r} in {expr!r}")
        pos = match.end()
        if match.lastgroup != "space":
            out.append((str(match.lastgroup), match.group()))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects; ValueError for an unknown function."""
    tokens = _tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        i += 1
        if kind != "ident":
            continue
        word = text.lower()
        if word in LABEL_LIST_KEYWORDS:
            if following == "(":  # skip the label list: by (le, provider)
                while tokens[i][1] != ")":
                    i += 1
                i += 1
            continue
        if word in WORDS:
            continue
        called = following == "(" or (
            text in AGGREGATIONS and following.lower() in {"by", "without"}
        )
        if called and text not in FUNCTIONS:
            raise ValueError(f"unknown PromQL function {text}() in {expr!r}")
        if not called:
            names.add(text)
    return names


# --- what the programs export ---------------------------------------------------------------


def _scrape(url: str) -> str:
    response = httpx.get(url, headers={"Accept": ACCEPT}, timeout=5)
    response.raise_for_status()
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    return response.text


def _sample_names(text: str) -> dict[str, str]:
    """Sample name -> family name, for every family in an OpenMetrics exposition."""
    names: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                names[sample.name] = family.name
    return names


def _scrape_when(url: str, needle: str) -> str:
    """The exposition once it contains ``needle`` (the relay registers some late in startup)."""
    texts: list[str] = []

    def ready() -> bool:
        try:
            texts.append(_scrape(url))
        except httpx.TransportError:
            return False
        return needle in texts[-1]

    wait_until(ready, 30, f"{needle} at {url}", interval=0.1)
    return texts[-1]


@pytest.fixture(scope="module")
def exported() -> dict[str, str]:
    """Every sample name the relay, its embedded proxy and the standalone proxy export."""
    run_dir = make_run_dir()
    relay_port, embedded_port, proxy_port, proxy_metrics_port = free_ports(4)
    metadata = MetadataServer(run_dir, run_dir / "metadata.socket", "embedded")
    metadata.notifiers = {"log_provider": "true", "metrics": f"127.0.0.1:{embedded_port}"}
    metadata.extra_args = ["--metrics", f"127.0.0.1:{relay_port}"]
    proxy = subprocess.Popen(
        [sys.executable, "-m", "notifiers.cli", "--log-provider", "--port", str(proxy_port)]
        + ["--metrics", f"127.0.0.1:{proxy_metrics_port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    names: dict[str, str] = {}
    try:
        with running(metadata):
            # The dict server's families are registered right before its socket serves.
            texts = [_scrape_when(f"http://127.0.0.1:{relay_port}/metrics", "chatmail_dict_")]
            texts.append(_scrape_when(f"http://127.0.0.1:{embedded_port}/metrics", "# EOF"))
        texts.append(_scrape_when(f"http://127.0.0.1:{proxy_metrics_port}/metrics", "# EOF"))
        for text in texts:
            names.update(_sample_names(text))
    finally:
        stop_process(proxy)
        shutil.rmtree(run_dir, ignore_errors=True)
    return names


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) of every panel target, nested rows included."""
    out = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            where = f"panel {panel['id']} {panel['title']!r} {target['refId']}"
            out.append((where, target["expr"]))
    return out


def _panels(panels: list[dict]) -> list[dict]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def rule_exprs(rules: dict) -> list[tuple[str, str]]:
    return [
        (f"alert {rule['alert']}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def unknown_metrics(exprs: list[tuple[str, str]], exported: dict[str, str]) -> list[str]:
    return [
        f"{where}: {name}"
        for where, expr in exprs
        for name in sorted(metric_names(expr))
        if name not in exported
    ]


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def load_rules() -> dict:
    return json.loads(ALERTS.read_text())


# --- the tests ------------------------------------------------------------------------------


def test_every_dashboard_metric_is_exported(exported):
    exprs = dashboard_exprs(load_dashboard())
    assert exprs
    assert unknown_metrics(exprs, exported) == []


def test_every_alert_metric_is_exported(exported):
    exprs = rule_exprs(load_rules())
    assert exprs
    assert unknown_metrics(exprs, exported) == []


def test_a_renamed_metric_is_caught(exported):
    dashboard = copy.deepcopy(load_dashboard())
    target = next(t for p in _panels(dashboard["panels"]) for t in p.get("targets", []))
    target["expr"] = target["expr"].replace("chatmail_push_jobs_sent_total", "chatmail_push_sent")
    assert any(
        line.endswith(": chatmail_push_sent")
        for line in unknown_metrics(dashboard_exprs(dashboard), exported)
    )


def test_every_exported_family_is_on_the_dashboard(exported):
    """A new metric gets a panel (or a reason here why not)."""
    exprs = dashboard_exprs(load_dashboard())
    shown = {exported.get(n) for _, expr in exprs for n in metric_names(expr)}
    assert sorted(set(exported.values()) - shown) == []


def test_dashboard_structure():
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert all(isinstance(pos[k], int) and pos[k] >= 0 for k in ("h", "w", "x", "y")), panel
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                other = cells.setdefault((x, y), panel["id"])
                assert other == panel["id"], f"panels {other} and {panel['id']} overlap"
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in targets), panel["title"]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_alert_rules_structure():
    rules = load_rules()
    assert set(rules) == {"groups"}
    anchors = _anchors(OPERATIONS.read_text())
    alerts = []
    for group in rules["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"], group
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            alerts.append(rule["alert"])
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"])
            assert re.fullmatch(r"(\d+[smhd])+", rule.get("for", "0s")), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
            notes = rule["annotations"]
            assert notes["summary"] and notes["description"], rule["alert"]
            page, _, anchor = notes["runbook"].partition("#")
            assert page == "docs/operations.md" and anchor in anchors, rule["alert"]
    assert len(alerts) == len(set(alerts)), "alert names must be unique"


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (le) (rate(a_bucket{job="x", le=~"1|2"}[5m]))', {"a_bucket"}),
        ("histogram_quantile(0.9, sum(rate(b[$__rate_interval])) by (le, provider))", {"b"}),
        ("increase(c[1h]) == 0 and (d > 0 or e unless on (instance) f)", set("cdef")),
        ("rate(g_total[1d] offset 30m) > 3 * h", {"g_total", "h"}),
        ("x / ignoring (reason) group_left (key) y", {"x", "y"}),
        ('label_replace(z, "dst", "$1", "src", "(.*)")', {"z"}),
        ('sum(i{reason="a}b"}) by (reason)', {"i"}),
        ("max(j) - 1e3 + 0.5", {"j"}),
    ],
)
def test_metric_names_of_promql(expr, names):
    """The tokenizer finds exactly the selected metrics, whatever surrounds them."""
    assert metric_names(expr) == names


def test_an_unknown_function_is_refused():
    with pytest.raises(ValueError, match=r"unknown PromQL function raet\(\)"):
        metric_names("raet(a_total[5m])")


def test_the_gauges_the_alerts_compare_with():
    """Workers configured and the first retry delay come from the settings; the earliest due
    job's wait is measured on the queue's clock (0 while nothing is due)."""
    now = [1000.0]
    metrics = RelayMetrics()
    notifier = Notifier(
        lambda: None,  # type: ignore[arg-type,return-value]
        lambda: None,  # type: ignore[arg-type,return-value]
        workers=3,
        policy=RetryPolicy(delays=(5.0, 50.0)),
        metrics=metrics,
        clock=lambda: now[0],
    )
    value = metrics.registry.get_sample_value
    assert value("chatmail_notifier_workers_configured") == 3
    assert value("chatmail_push_retry_first_delay_seconds") == 5
    assert value("chatmail_push_queue_overdue_seconds") == 0
    notifier.queue.put(1010.0, (1, "a@example.org", "t1"))
    notifier.queue.put(990.0, (2, "b@example.org", "t2"))
    assert value("chatmail_push_queue_overdue_seconds") == 10
    now[0] = 1030.0
    assert value("chatmail_push_queue_overdue_seconds") == 40
    notifier.queue.get(), notifier.queue.get()
    assert value("chatmail_push_queue_overdue_seconds") == 0


def test_every_panel_and_alert_is_explained():
    """docs/operations.md says what each panel shows (``*Title*``) and each alert means."""
    text = OPERATIONS.read_text()
    panels = [p["title"] for p in _panels(load_dashboard()["panels"]) if p["type"] != "row"]
    assert [title for title in panels if f"*{title}*" not in text] == []
    alerts = [where.removeprefix("alert ") for where, _ in rule_exprs(load_rules())]
    assert [alert for alert in alerts if f"### {alert}\n" not in text] == []
