"""Section "imap": SETMETADATA + GETMETADATA through a real Dovecot (issue 2).

For each Dovecot major version (2.3 and 2.4: the host's, and the other one from
a Debian tree, see :mod:`devstack.debian_tree`) the same build and shipped config
run three times: our ``chatmail-metadata`` as the proxy dict (notify off) as
shipped and with a connection per command, and Dovecot's built-in ``file:`` dict
(2.3 ``file:%h/dovecot-attributes``, 2.4 ``dict file { path = ... }``) as that
version's same-run baseline.  The same client (one process, one thread per IMAP
session, each session on its own user) does a bounded number of SET+GET pairs per
session.  A version that cannot be had here is reported as skipped, with why.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from bench.common import run_child, temp_dir, tree_cpu_seconds
from bench.table import Figure, at_least, print_table, ratio
from devstack.debian_tree import TreeUnavailable
from devstack.dovecot import VERSIONS, DovecotBuild, DovecotInstance, build_for
from devstack.imap import RawImap
from devstack.metadata import MetadataServer

PASSWORD = "benchpass"
ENTRY = "/private/vendor/bench/key"


def _users(n: int) -> list[str]:
    return [f"bench{i}@example.org" for i in range(n)]


def bench_dovecot(
    run_dir: Path, build: DovecotBuild, users: list[str], mode: str
) -> DovecotInstance:
    """The shipped test instance with the bench users; ``mode`` is the attribute dict:
    ``shipped`` (our dict, one connection per session as dovecot/ ships it), ``per-command``
    (our dict, a new connection per IMAP command: Dovecot's default, as upstream
    chatmail configures it) or ``file`` (Dovecot's built-in file: dict, the baseline).
    """
    users_db = {u: PASSWORD for u in users}
    return DovecotInstance.from_build(run_dir, build, users=users_db, attribute_dict=mode)


def imap_client(port: int, users: list[str], pairs: int, seconds: float) -> dict:
    """Child process: one thread per session; each does ``pairs`` SET+GET pairs."""
    barrier = threading.Barrier(len(users) + 1)
    results: list[dict] = []
    lock = threading.Lock()

    def session(user: str) -> None:
        done = failures = 0
        latencies: list[float] = []
        try:
            imap = RawImap(port)
            imap.login(user, PASSWORD)
            for i in range(3):  # warm-up: the first SET creates the dict entry/file
                imap.command(f'SETMETADATA INBOX ({ENTRY} "warm{i}")')
        finally:
            barrier.wait()
        t0 = time.perf_counter()
        deadline = t0 + seconds
        for i in range(pairs):
            s = time.perf_counter()
            r1 = imap.command(f'SETMETADATA INBOX ({ENTRY} "value {i} of {user}")')
            r2 = imap.command(f"GETMETADATA INBOX ({ENTRY})")
            latencies.append(time.perf_counter() - s)
            want = f"value {i} of {user}".encode()
            if r1.status != "OK" or r2.status != "OK" or r2.metadata().get(ENTRY) != want:
                failures += 1
            done += 1
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - t0
        imap.close()
        with lock:
            results.append(
                {"pairs": done, "elapsed": elapsed, "failures": failures, "lat": latencies}
            )

    threads = [threading.Thread(target=session, args=(u,)) for u in users]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    for t in threads:
        t.join(seconds + 60)
    wall = time.perf_counter() - t0
    lat = sorted(x for r in results for x in r["lat"])
    return {
        "pairs": sum(r["pairs"] for r in results),
        "elapsed": wall,
        "failures": sum(r["failures"] for r in results),
        "client_cpu": time.process_time() - cpu0,
        "median_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
    }


def _run_one(build: DovecotBuild, users: list[str], mode: str, pairs: int, seconds: float) -> dict:
    file_dict = mode == "file"
    with temp_dir("imap") as run_dir:
        dovecot = bench_dovecot(run_dir, build, users, mode)
        metadata = None
        try:
            if not file_dict:
                metadata = MetadataServer(run_dir, dovecot.metadata_socket, "off")
                metadata.log_level = "INFO"  # the production default
                metadata.start()
            dovecot.start()
            assert dovecot.proc is not None
            cpu0 = tree_cpu_seconds(dovecot.proc.pid)
            mcpu0 = cpu_md = 0.0
            if metadata is not None and metadata.proc is not None:
                mcpu0 = tree_cpu_seconds(metadata.proc.pid)
            result = run_child(imap_client, dovecot.imap_port, users, pairs, seconds)
            # imap processes that already exited are not counted: indicative only
            result["dovecot_cpu"] = tree_cpu_seconds(dovecot.proc.pid) - cpu0
            if metadata is not None and metadata.proc is not None:
                cpu_md = tree_cpu_seconds(metadata.proc.pid) - mcpu0
            result["metadata_cpu"] = cpu_md
            if file_dict:  # make sure the file: dict really was the one in use
                files = list((run_dir / "mail").glob("*/dovecot-attributes"))
                if len(files) != len(users):
                    print(f"file: dict wrote {len(files)} attribute files, not {len(users)}")
                    result["failures"] += 1
            crashes = dovecot.crash_lines()
            if crashes:
                print("Dovecot log shows crashes:\n" + "\n".join(crashes[:5]))
                result["failures"] += len(crashes)
        finally:
            dovecot.stop()
            if metadata is not None:
                metadata.stop()
    result["rate"] = result["pairs"] / result["elapsed"]
    return result


SHIPPED_IDLE = {"2.3": "idle_msecs=60000", "2.4": "idle_timeout = 60s"}


def run(quick: bool) -> list[Figure]:
    sessions = 8 if quick else 16
    pairs = 300 if quick else 1500
    seconds = 8.0 if quick else 30.0
    users = _users(sessions)
    rows = []
    ratios = []
    figures = []
    for version in VERSIONS:
        name = f"imap SET+GET pairs/s, ours/file ratio (Dovecot {version})"
        try:
            build = build_for(version)
        except (LookupError, TreeUnavailable) as exc:
            print(f"Dovecot {version}: {exc}: skipped")
            figures.append(Figure(name, None, "", ">= 0.80", None))
            continue
        ours = _run_one(build, users, "shipped", pairs, seconds)
        per_command = _run_one(build, users, "per-command", pairs, seconds)
        base = _run_one(build, users, "file", pairs, seconds)
        for label, r in (
            (f"proxy: chatmail-metadata, as shipped ({SHIPPED_IDLE[version]})", ours),
            ("proxy: chatmail-metadata, a connection per command", per_command),
            ("file: (built-in)", base),
        ):
            rows.append(
                [
                    version,
                    label,
                    sessions,
                    r["pairs"],
                    r["rate"],
                    r["median_ms"],
                    r["p99_ms"],
                    f"{100 * r['metadata_cpu'] / r['elapsed']:.0f}%",
                    r["failures"],
                ]
            )
        ratios.append(f"{version}: {ratio(ours['rate'], base['rate'])}")
        value = ours["rate"] / base["rate"] if base["rate"] else None
        figures.append(at_least(name, value, 0.8, ""))
    if rows:
        print_table(
            f"imap: SETMETADATA+GETMETADATA pairs/s through Dovecot, {sessions} sessions "
            f"(one user each), up to {pairs} pairs per session; ours/file = " + ", ".join(ratios),
            [
                "Dovecot",
                "attribute dict",
                "sessions",
                "pairs",
                "pairs/s",
                "median ms",
                "p99 ms",
                "dict server CPU",
                "failures",
            ],
            rows,
        )
    return figures
