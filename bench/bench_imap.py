"""Section "imap": SETMETADATA + GETMETADATA through a real Dovecot (issue 2).

For each Dovecot major version (2.3 and 2.4: the host's, and the other one from
a Debian tree, see :mod:`devstack.debian_tree`) the same build and shipped config
run three times: our ``chatmail-metadata`` as the proxy dict (notify off) as
shipped and with a connection per command, and Dovecot's built-in ``file:`` dict
(2.3 ``file:%h/dovecot-attributes``, 2.4 ``dict file { path = ... }``) as that
version's same-run baseline.  The same client (one process, one thread per IMAP
session, each session on its own user) does a bounded number of SET+GET pairs per
session.  A version that cannot be had here is reported as skipped, with why.

Each row also says where a pair's CPU went (the sessions' Dovecot ``imap`` processes,
which run the ``file:`` dict themselves; the dict server; the bench client) and file:'s
CPU per pair over ours.  Under load the file: baseline is the noisy side: its imap CPU
per pair is mostly ext4 inode work (a new file and a rename per commit) and moved
635-1702 us within one run while ours moved 600-1000 us plus 175-250 us in the dict.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from pathlib import Path

from bench.common import cpu_by_name, run_child, temp_dir, tree_cpu_by_pid, tree_cpu_seconds
from bench.table import Figure, at_least, print_table
from devstack.debian_tree import TreeUnavailable
from devstack.dovecot import VERSIONS, DovecotBuild, DovecotInstance, build_for
from devstack.imap import RawImap
from devstack.metadata import MetadataServer
from devstack.turn import TurnHelper

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


DC_TOKEN = "openpgp:" + "A" * 924
#: What Delta Chat reads with ``GETMETADATA ""`` on every connect.
DC_KEYS = (
    "/shared/comment",
    "/shared/admin",
    "/shared/vendor/deltachat/irohrelay",
    "/shared/vendor/deltachat/turn",
    "/shared/vendor/deltachat/maxsmtprecipients",
    "/shared/vendor/deltachat/appversions",
)
DC_GET = 'GETMETADATA "" (' + " ".join(DC_KEYS) + ")"
DC_SET = f'SETMETADATA INBOX (/private/devicetoken "{DC_TOKEN}")'


def _generic_pair(imap: RawImap, user: str, i: int) -> bool:
    r1 = imap.command(f'SETMETADATA INBOX ({ENTRY} "value {i} of {user}")')
    r2 = imap.command(f"GETMETADATA INBOX ({ENTRY})")
    want = f"value {i} of {user}".encode()
    return r1.status == "OK" and r2.status == "OK" and r2.metadata().get(ENTRY) == want


def _deltachat_pair(imap: RawImap, user: str, i: int) -> bool:
    r1 = imap.command(DC_SET)
    r2 = imap.command(DC_GET)
    return r1.status == "OK" and r2.status == "OK"


WORKLOADS = {"generic": _generic_pair, "deltachat": _deltachat_pair}


def imap_client(
    port: int,
    users: list[str],
    pairs: int,
    seconds: float,
    workload: str = "generic",
    dovecot_pid: int | None = None,
) -> dict:
    """Child process: one thread per session; each does ``pairs`` SET+GET pairs.

    With ``dovecot_pid``, the CPU of Dovecot's processes by name (``imap``: the sessions'
    own processes) is taken while every session is logged in, before and after the pairs:
    the imap processes exit at LOGOUT, so a later look would miss them.
    """
    ready = threading.Barrier(len(users) + 1)
    end = threading.Barrier(len(users) + 1, timeout=seconds + 60)
    go = threading.Event()
    measured = threading.Event()  # sessions log out only after the last snapshot
    results: list[dict] = []
    lock = threading.Lock()
    pair = WORKLOADS[workload]

    def session(user: str) -> None:
        imap = None
        try:
            try:
                imap = RawImap(port)
                imap.login(user, PASSWORD)
                for i in range(3):  # warm-up: the first SET creates the dict entry/file
                    imap.command(f'SETMETADATA INBOX ({ENTRY} "warm{i}")')
            finally:
                ready.wait()
            go.wait()
            done = failures = 0
            latencies: list[float] = []
            t0 = time.perf_counter()
            deadline = t0 + seconds
            for i in range(pairs):
                s = time.perf_counter()
                ok = pair(imap, user, i)
                latencies.append(time.perf_counter() - s)
                if not ok:
                    failures += 1
                done += 1
                if time.perf_counter() > deadline:
                    break
            elapsed = time.perf_counter() - t0
            with lock:
                results.append(
                    {"pairs": done, "elapsed": elapsed, "failures": failures, "lat": latencies}
                )
        finally:
            with contextlib.suppress(threading.BrokenBarrierError):
                end.wait()
            measured.wait(60)
            if imap is not None:
                imap.close()

    def dovecot_snapshot() -> dict[int, tuple[str, float]]:
        return tree_cpu_by_pid(dovecot_pid) if dovecot_pid is not None else {}

    threads = [threading.Thread(target=session, args=(u,)) for u in users]
    for t in threads:
        t.start()
    ready.wait()
    before = dovecot_snapshot()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    go.set()
    with contextlib.suppress(threading.BrokenBarrierError):
        end.wait()
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    dovecot_cpu = cpu_by_name(before, dovecot_snapshot())
    measured.set()
    for t in threads:
        t.join(60)
    lat = sorted(x for r in results for x in r["lat"])
    return {
        "pairs": sum(r["pairs"] for r in results),
        "elapsed": wall,
        "failures": sum(r["failures"] for r in results),
        "client_cpu": client_cpu,
        "imap_cpu": dovecot_cpu.get("imap", 0.0),
        "dovecot_other_cpu": sum(v for k, v in dovecot_cpu.items() if k != "imap"),
        "median_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
    }


def _turn_line() -> bytes:
    """What chatmail-turn answers: ``<expiry unix time>:<password>`` (5 days ahead)."""
    return f"{int(time.time()) + 5 * 86400}:benchturnsecret\n".encode()


def _run_one(
    build: DovecotBuild,
    users: list[str],
    mode: str,
    pairs: int,
    seconds: float,
    workload: str = "generic",
    turn: bool = False,
) -> dict:
    file_dict = mode == "file"
    with temp_dir("imap") as run_dir:
        dovecot = bench_dovecot(run_dir, build, users, mode)
        metadata = None
        helper = TurnHelper(run_dir / "turn.socket", _turn_line()) if turn else None
        try:
            if not file_dict:
                metadata = MetadataServer(run_dir, dovecot.metadata_socket, "off")
                metadata.log_level = "INFO"  # the production default
                if helper is not None:
                    metadata.params = {"turn_socket_path": str(helper.path)}
                metadata.start()
            dovecot.start()
            assert dovecot.proc is not None
            mcpu0 = cpu_md = 0.0
            if metadata is not None and metadata.proc is not None:
                mcpu0 = tree_cpu_seconds(metadata.proc.pid)
            result = run_child(
                imap_client, dovecot.imap_port, users, pairs, seconds, workload, dovecot.proc.pid
            )
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
            result["turn_asks"] = helper.connections if helper is not None else 0
        finally:
            dovecot.stop()
            if metadata is not None:
                metadata.stop()
            if helper is not None:
                helper.close()
    result["rate"] = result["pairs"] / result["elapsed"]
    return result


SHIPPED_IDLE = {"2.3": "idle_msecs=60000", "2.4": "idle_timeout = 60s"}

#: (label, workload, attribute dict, TURN stand-in running, target ours/file ratio)
CASES = (
    ("Delta Chat, as shipped ({idle}), no TURN helper", "deltachat", "shipped", False, 1.0),
    (
        "Delta Chat, a connection per command, no TURN helper",
        "deltachat",
        "per-command",
        False,
        0.8,
    ),
    ("Delta Chat, as shipped ({idle}), TURN stand-in", "deltachat", "shipped", True, 1.0),
    ("Delta Chat, a connection per command, TURN stand-in", "deltachat", "per-command", True, 0.8),
    ("generic attribute, as shipped ({idle})", "generic", "shipped", False, 0.8),
)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def run(quick: bool) -> list[Figure]:
    """Alternating rounds: file: baselines (one per workload), then every case, then the
    baselines again; each case is judged against the mean of the baselines around it."""
    sessions = 32
    pairs = 300 if quick else 1500
    seconds = float(os.environ.get("CHATMAIL_BENCH_IMAP_SECONDS", 4.0 if quick else 15.0))
    rounds = int(os.environ.get("CHATMAIL_BENCH_ROUNDS", 3))
    versions = os.environ.get("CHATMAIL_BENCH_DOVECOT", ",".join(VERSIONS)).split(",")
    users = _users(sessions)
    figures = []
    for version in versions:
        try:
            build = build_for(version)
        except (LookupError, TreeUnavailable) as exc:
            print(f"Dovecot {version}: {exc}: skipped")
            for label, _w, _m, _t, target in CASES:
                name = f"imap {label.format(idle='shipped')}, ours/file (Dovecot {version})"
                figures.append(Figure(name, None, "", f">= {target:.2f}", None))
            continue
        ratios: dict[int, list[float]] = {i: [] for i in range(len(CASES))}
        cpu_ratios: dict[int, list[float]] = {i: [] for i in range(len(CASES))}
        rows = []

        def baselines(rnd: int, build: DovecotBuild = build, rows: list = rows) -> dict[str, dict]:
            out = {}
            for w, label in (("deltachat", "file: (built-in), Delta Chat"), ("generic", "file:")):
                out[w] = _run_one(build, users, "file", pairs, seconds, w)
                rows.append(_row(f"file: {rnd}", label, out[w], None, None))
            return out

        before = baselines(0)
        for rnd in range(rounds):
            results = [
                _run_one(build, users, mode, pairs, seconds, workload, turn)
                for _label, workload, mode, turn, _target in CASES
            ]
            after = baselines(rnd + 1)  # each case against the mean of the file: runs around it
            for i, ((label, workload, *_), r) in enumerate(zip(CASES, results, strict=True)):
                base = (before[workload]["rate"] + after[workload]["rate"]) / 2
                value = r["rate"] / base if base else 0.0
                ratios[i].append(value)
                # CPU per pair, file:'s over ours: > 1 means ours costs less (less noisy)
                base_cpu = (_cpu_us(before[workload]) + _cpu_us(after[workload])) / 2
                cpu_value = base_cpu / _cpu_us(r) if _cpu_us(r) else 0.0
                cpu_ratios[i].append(cpu_value)
                label_i = label.format(idle=SHIPPED_IDLE[version])
                rows.append(_row(str(rnd + 1), label_i, r, value, cpu_value))
            before = after
        print_table(
            f"imap: SET+GET pairs/s through Dovecot {version}, {sessions} sessions (one user "
            f"each), {rounds} alternating rounds of {seconds:g} s per point",
            [
                "round",
                "attribute dict",
                "pairs/s",
                "ours/file",
                "median ms",
                "p99 ms",
                "dict CPU",
                "CPU us/pair imap+dict+client",
                "file/ours CPU",
                "TURN asks",
                "failures",
            ],
            rows,
        )
        for i, (label, _w, _m, _t, target) in enumerate(CASES):
            values = ratios[i]
            med = statistics.median(values)
            name = (
                f"imap {label.format(idle=SHIPPED_IDLE[version])}, ours/file median "
                f"(spread {_spread(values)}; file/ours CPU per pair "
                f"{statistics.median(cpu_ratios[i]):.2f}, {_spread(cpu_ratios[i])}), "
                f"Dovecot {version}"
            )
            figures.append(at_least(name, med, target, "x"))
    return figures


def _row(
    rnd: str, label: str, r: dict, value: float | None, cpu_value: float | None
) -> list[object]:
    return [
        rnd,
        label,
        r["rate"],
        "-" if value is None else f"{value:.2f}",
        r["median_ms"],
        r["p99_ms"],
        f"{100 * r['metadata_cpu'] / r['elapsed']:.0f}%",
        _cpu_per_pair(r),
        "-" if cpu_value is None else f"{cpu_value:.2f}",
        r.get("turn_asks", 0),
        r["failures"],
    ]


def _cpu_us(r: dict) -> float:
    """CPU microseconds per pair: imap processes, dict server and client together."""
    total = r["imap_cpu"] + r["metadata_cpu"] + r["client_cpu"]
    return 1e6 * total / r["pairs"] if r["pairs"] else 0.0


def _cpu_per_pair(r: dict) -> str:
    """Where a pair's CPU goes: the session's Dovecot imap process, the dict server (0 for
    file:, which runs inside imap), the bench client; Dovecot's other processes only if any."""
    per = 1e6 / r["pairs"] if r["pairs"] else 0.0
    parts = [r["imap_cpu"], r["metadata_cpu"], r["client_cpu"]]
    text = "+".join(f"{per * v:.0f}" for v in parts) + f"={per * sum(parts):.0f}"
    if per * r["dovecot_other_cpu"] >= 1:
        text += f" (+{per * r['dovecot_other_cpu']:.0f} other)"
    return text
