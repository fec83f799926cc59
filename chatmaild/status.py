"""``chatmail-metadata status CHATMAIL_INI [--json] [--check]``: is push working on this relay?

Everything durable comes from the database, opened read-only (``mode=ro``: a missing
file is an error, never created), so it works with the service stopped: tokens, the
job queue, and the outcome log (:mod:`chatmaild.outcomelog`).  The live part (workers,
Dovecot protocol versions, uptime, the embedded proxy) comes from the running
service's Prometheus listener, found through its row in the database
(:mod:`chatmaild.servicerow`): the metrics already exist, are read-only by nature and
need no second socket in the hardened unit; without ``--metrics`` on the service those
fields are ``null`` and not checked.

``--check`` turns the same facts into one line per problem and exit 1, or one ``ok``
line and exit 0; each probe (dict socket lookup, database write lock, proxy ``GET /``)
is made only there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from chatmail_common.hostport import parse_host_port

from . import outcomelog
from .config import Config, ConfigError, read_config
from .database import schema_version
from .dictproto.versions import DEFAULT_VERSION
from .servicerow import ServiceRow
from .servicerow import read as read_service_row

HOUR = 3600.0
DAY = 86400.0
# A due job waiting this long past its due time means no worker is taking jobs.
DEFAULT_MAX_LATE_MINUTES = 10.0
# "Jobs were due": a failed attempt in the last hour, or a job due for this long.
DUE_GRACE_SECONDS = 60.0


class StatusError(Exception):
    """Status cannot even start (ini, database): one line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatmail-metadata status",
        description="Show whether pushes flow on this relay: tokens, queue, recent push "
        "outcomes from the database, and the running service's workers. With --check: one "
        "line per problem and exit 1, or 'ok' and exit 0.",
    )
    p.add_argument("config", help="chatmail.ini of the relay (the service's own)")
    p.add_argument("--db", type=Path, help="database path, if the service is given --db")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", action="store_true", help="probe everything; exit 1 on a problem")
    p.add_argument(
        "--socket", help="dict socket to probe (default: the one the running service reported)"
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="the service's metrics listener (default: the one it reported)",
    )
    p.add_argument(
        "--max-late",
        type=float,
        metavar="MINUTES",
        default=DEFAULT_MAX_LATE_MINUTES,
        help="--check: a job due for longer than this is a problem (default: %(default)g)",
    )
    p.add_argument(
        "--timeout", type=float, default=5.0, help="seconds per probe (default: %(default)g)"
    )
    return p


# -- the database ---------------------------------------------------------------


def open_read_only(path: Path) -> sqlite3.Connection:
    """The database without creating it or anything next to it that the service needs."""
    if not path.is_file():
        raise StatusError(f"database not found: {path} (wrong ini, or pass --db)")
    # No -wal file: nobody has it open (a clean close removes it).  Even mode=ro would
    # then create -wal and -shm, owned by whoever runs status (root), which the service
    # user could not open later; immutable reads the main file alone and creates nothing.
    wal = Path(f"{path}-wal").exists()
    uri = f"file:{path}?mode=ro" if wal else f"file:{path}?immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
        conn.execute("PRAGMA query_only=ON")
        schema_version(conn)  # reads the header: a non-database fails here
    except sqlite3.DatabaseError as exc:
        raise StatusError(f"cannot read database {path}: {exc}") from None
    return conn


def database_facts(conn: sqlite3.Connection, now: float, max_late: float) -> dict[str, Any]:
    """Tokens, queue and push outcomes as of ``now`` (no writes); jobs due for longer than
    ``max_late`` seconds are counted as overdue."""
    one = conn.execute
    addresses, tokens = one("SELECT count(DISTINCT user), count(*) FROM tokens").fetchone()
    by_attempts = dict(one("SELECT attempts, count(*) FROM jobs GROUP BY attempts").fetchall())
    due_count, oldest_due = one(
        "SELECT count(*), min(due) FROM jobs WHERE due <= ?", (now,)
    ).fetchone()
    facts: dict[str, Any] = {
        "schema_version": schema_version(conn),
        "addresses_with_tokens": addresses,
        "tokens": tokens,
        "jobs": {
            "total": sum(by_attempts.values()),
            "by_attempts": {str(k): v for k, v in sorted(by_attempts.items())},
            "due": due_count,
            "oldest_due": oldest_due,
            "oldest_late_seconds": None if oldest_due is None else round(now - oldest_due, 1),
            "overdue": one("SELECT count(*) FROM jobs WHERE due < ?", (now - max_late,)).fetchone()[
                0
            ],
        },
    }
    try:
        facts["pushes"] = {
            "last_hour": outcomelog.counts_since(conn, now - HOUR),
            "last_day": outcomelog.counts_since(conn, now - DAY),
        }
        facts["last_success"] = outcomelog.last_success(conn)
    except sqlite3.OperationalError:  # version 1: the service has not opened it since
        facts["pushes"] = None
        facts["last_success"] = None
    return facts


# -- the running service --------------------------------------------------------


@dataclass
class Live:
    """What the running service's metrics say (None: not known)."""

    workers_live: int | None = None
    workers_configured: int | None = None
    dovecot_connections: dict[str, int] | None = None
    open_connections: int | None = None
    embedded_proxy_up: bool | None = None
    error: str | None = None
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)


def metrics_url(hostport: str) -> str:
    host, port = parse_host_port(hostport)
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


def scrape(hostport: str, timeout: float) -> Live:
    try:
        url = metrics_url(hostport)
        text = httpx.get(url, timeout=timeout).raise_for_status().text
    except (ValueError, httpx.HTTPError) as exc:
        return Live(error=f"metrics listener {hostport} not answering: {_reason(exc)}")
    live = Live()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            live.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def value(name: str) -> float | None:
        found = live.samples.get(name)
        return found[0][1] if found else None

    def integer(name: str) -> int | None:
        v = value(name)
        return None if v is None else int(v)

    live.workers_live = integer("chatmail_notifier_workers_live")
    live.workers_configured = integer("chatmail_notifier_workers_configured")
    live.open_connections = integer("chatmail_dict_open_connections")
    by_protocol = live.samples.get("chatmail_dict_connections_by_protocol_total", [])
    live.dovecot_connections = {labels["dovecot"]: int(v) for labels, v in by_protocol}
    up = value("chatmail_embedded_proxy_up")
    live.embedded_proxy_up = None if up is None else bool(up)
    return live


def service_facts(row: ServiceRow | None, live: Live | None, now: float) -> dict[str, Any]:
    running = row is not None and row.alive()
    facts: dict[str, Any] = {
        "running": running,
        "pid": row.pid if row else None,
        "started": row.started if row else None,
        "uptime_seconds": round(now - row.started, 1) if running else None,
        "socket": row.socket if row else None,
        "metrics": (row.metrics or None) if row else None,
        "notify_url": row.notify_url if row else None,
        "workers_configured": row.workers if row else None,
        "workers_live": None,
        "dovecot_connections_by_protocol": None,
        "dict_connections_open": None,
        "embedded_proxy_up": None,
        "metrics_error": None,
    }
    if live is not None:
        facts["workers_live"] = live.workers_live
        facts["dovecot_connections_by_protocol"] = live.dovecot_connections
        facts["dict_connections_open"] = live.open_connections
        facts["embedded_proxy_up"] = live.embedded_proxy_up
        facts["metrics_error"] = live.error
    return facts


# -- probes (--check) -------------------------------------------------------------


def probe_socket(path: str, timeout: float) -> str | None:
    """None if the dict socket answers a hello + lookup of a key nobody stores."""
    lookup = b"Lshared/chatmail-status-check\tchatmail-status-check\n"  # a user nobody is
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(DEFAULT_VERSION.hello_line("status-check") + lookup)
            reply = sock.makefile("rb").readline()
    except OSError as exc:
        return f"dict socket {path}: {_reason(exc)}"
    if reply[:1] not in (b"N", b"O"):
        return f"dict socket {path}: unexpected reply to a lookup: {reply[:60]!r}"
    return None


def probe_writable(path: Path, timeout: float) -> str | None:
    """None if a write transaction can be begun (and is rolled back: nothing written)."""
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=rw", uri=True, isolation_level=None, timeout=timeout)
        ) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:  # BEGIN alone passes on a read-only file in WAL mode; a write does not
                conn.execute("DELETE FROM jobs WHERE 0")
            finally:
                conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        return f"database {path} not writable: {exc}"
    return None


def probe_proxy(url: str, timeout: float) -> str | None:
    """None if ``GET /`` on the proxy's origin gets an HTTP answer.

    Any status counts (our proxy says 200, others may not know GET), except a gateway
    error: a reverse proxy in front of a push proxy that is down.
    """
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}/"
    try:
        status = httpx.get(origin, timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return f"push proxy {origin} unreachable: {_reason(exc)}"
    if status in (502, 503, 504):
        return f"push proxy {origin} answers GET / with {status}"
    return None


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


@dataclass
class Report:
    config: Config
    db_path: Path
    facts: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def find_problems(report: Report, args: argparse.Namespace, now: float) -> None:
    """Every probe and rule of --check, in a fixed order, one line per problem."""
    facts, service = report.facts, report.facts["service"]
    add = report.problems.append
    socket_path = args.socket or service["socket"]
    if socket_path:
        if problem := probe_socket(socket_path, args.timeout):
            add(problem)
    else:
        add("dict socket: unknown (the service never ran on this database; pass --socket)")
    if problem := probe_writable(report.db_path, args.timeout):
        add(problem)
    url = service["notify_url"] or report.config.notifier.url
    if not service["running"]:
        pid = service["pid"]
        add(f"service not running (last pid {pid})" if pid else "service not running")
    elif url != "off":
        _check_workers(report, service)
    jobs = facts["jobs"]
    late = jobs["oldest_late_seconds"]
    if late is not None and late > args.max_late * 60:
        overdue = jobs["overdue"]
        add(
            f"jobs: {overdue} due for more than {args.max_late:g} min "
            f"(oldest {late / 60:.0f} min late)"
        )
    _check_success(report, now)
    if url == "off":
        add("notifier is off (notify_url = off): no push is sent")
    elif url == "embedded":
        if service["running"] and service["embedded_proxy_up"] is False:
            add("embedded push proxy is not running")
    elif problem := probe_proxy(url, args.timeout):
        add(problem)


def _check_workers(report: Report, service: dict[str, Any]) -> None:
    if service["metrics_error"]:
        report.problems.append(service["metrics_error"])
    elif service["workers_live"] is None:
        report.notes.append("workers not checked: the service has no --metrics listener")
    elif service["workers_live"] < (service["workers_configured"] or 1):
        report.problems.append(
            f"workers: {service['workers_live']} of {service['workers_configured']} alive"
        )


def _check_success(report: Report, now: float) -> None:
    facts = report.facts
    hour = (facts["pushes"] or {}).get("last_hour")
    if hour is None:
        return
    if outcomelog.total(hour, outcomelog.SENT):
        return
    failed = outcomelog.total(hour, outcomelog.RETRIED, outcomelog.DROPPED)
    late = facts["jobs"]["oldest_late_seconds"]
    if failed or (late is not None and late >= DUE_GRACE_SECONDS):
        last = facts["last_success"]
        since = "none in the last 2 days" if last is None else f"last {_ago(now - last)} ago"
        report.problems.append(
            f"no successful push in the last hour while jobs were due ({since}, "
            f"{failed} failed attempt(s))"
        )


# -- output -------------------------------------------------------------------------


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _counts_line(counts: dict[str, dict[str, int]]) -> str:
    parts = []
    for outcome in outcomelog.OUTCOMES:
        answers = counts.get(outcome, {})
        detail = ", ".join(f"{a}: {n}" for a, n in answers.items())
        parts.append(f"{outcome} {sum(answers.values())}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts)


def render(report: Report, now: float) -> str:
    f, s, jobs = report.facts, report.facts["service"], report.facts["jobs"]
    by_attempts = ", ".join(f"{n} at attempt {k}" for k, n in jobs["by_attempts"].items())
    lines = [
        f"database   {report.db_path} (schema {f['schema_version']})",
        f"tokens     {f['tokens']} for {f['addresses_with_tokens']} address(es)",
        f"jobs       {jobs['total']}" + (f" ({by_attempts})" if by_attempts else ""),
    ]
    if jobs["oldest_due"] is not None:
        lines.append(f"due now    {jobs['due']}, oldest {_ago(jobs['oldest_late_seconds'])} late")
    if f["pushes"] is None:
        lines.append("pushes     not recorded yet (schema 1: start the service once)")
    else:
        lines.append(f"last hour  {_counts_line(f['pushes']['last_hour'])}")
        lines.append(f"last day   {_counts_line(f['pushes']['last_day'])}")
        last = f["last_success"]
        lines.append(
            "last sent  "
            + ("none in the last 2 days" if last is None else f"{_ago(now - last)} ago")
        )
    if s["running"]:
        lines.append(f"service    running, pid {s['pid']}, up {_ago(s['uptime_seconds'])}")
        lines.append(f"socket     {s['socket']}")
        lines.append(f"pushing to {s['notify_url']}")
        if s["metrics_error"]:
            lines.append(f"metrics    {s['metrics_error']}")
        elif s["workers_live"] is None:
            lines.append("workers    unknown (the service has no --metrics listener)")
        else:
            versions = s["dovecot_connections_by_protocol"] or {}
            seen = ", ".join(f"{v}: {n}" for v, n in versions.items()) or "none yet"
            lines.append(f"workers    {s['workers_live']} of {s['workers_configured']} live")
            lines.append(
                f"dovecot    {s['dict_connections_open']} open connection(s); since start by "
                f"protocol: {seen}"
            )
    else:
        lines.append("service    not running")
    return "\n".join(lines)


def gather(args: argparse.Namespace, now: float) -> Report:
    config = read_config(args.config)
    db_path = args.db or config.database_path
    with contextlib.closing(open_read_only(db_path)) as conn:
        try:
            facts = database_facts(conn, now, args.max_late * 60)
            row = read_service_row(conn)
        except sqlite3.DatabaseError as exc:
            raise StatusError(f"cannot read database {db_path}: {exc}") from None
    hostport = args.metrics or (row.metrics if row and row.alive() else "")
    live = scrape(hostport, args.timeout) if hostport else None
    facts["service"] = service_facts(row, live, now)
    return Report(config, db_path, facts)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    now = time.time()
    try:
        report = gather(args, now)
    except (ConfigError, StatusError) as exc:
        print(f"chatmail-metadata status: error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        find_problems(report, args, now)
    if args.json:
        out = dict(report.facts, database=str(report.db_path))
        if args.check:
            out["problems"] = report.problems
        print(json.dumps(out, indent=2, sort_keys=True))
    elif args.check:
        if report.problems:
            print("\n".join(report.problems))
        else:
            print("ok" + (f" ({'; '.join(report.notes)})" if report.notes else ""))
    else:
        print(render(report, now))
    return 1 if report.problems else 0
