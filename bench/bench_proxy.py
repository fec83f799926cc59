"""Section "proxy": the standalone push proxy (issue 4).

Three processes on loopback: the fake APNs of devstack/fakes (HTTP/2 over TLS with
client-certificate auth, not recording requests here), the proxy (aiohttp app
from ``notifiers.app`` around a ``NotifyService`` with an ``ApnsProvider`` from a
.p12, wrapped in the default per-provider limiter as ``build_service`` does), and
an aiohttp client process.  Baseline: the same client against a trivial aiohttp
endpoint answering 200.  In the same run: ``openpgp:`` tokens made like the
clients' (devstack/openpgp_tokens.py) through a proxy holding the key, distinct
ciphertexts (each decrypted, then sent) and one resent ciphertext (cache hit,
then debounced); and forwarding: a proxy without the key forwarding distinct
``openpgp:`` tokens to an upstream (the trivial endpoint).  Plus the memory of
a ``Debouncer`` holding 1,000,000 distinct tokens, against a plain ``dict`` of
the same tokens.

uvloop (0.23.0) as the proxy child's loop was measured against the stock loop in
alternating rounds (issue 11) and not adopted: CPU per request 0.97x of the stock
loop's (median of 26 rounds, spread 0.70-1.17x), proxy/trivial unchanged at 0.35x on
either loop (the trivial endpoint gains more from uvloop than the proxy does); the
dict server's CPU per operation moved by -9% to +5% by mode.  The proxy's CPU is aiohttp, h2
and its own Python code; it makes ~1 send and ~1 recv per request, so little loop
work is left for a faster loop to save.

The figure is set by the CPU per request of all three processes together (two cores), so
the fake's CPU counts as much as the proxy's.  Both ends decode HPACK with
``notifiers.hpackmemo.MemoDecoder`` (one-byte indexed fields remembered: the fake's h2 work
per request fell by about a quarter), and the proxy sends the device's ``:path`` as a plain
literal (no Huffman coding to make here or to undo at the server).
"""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

from bench.common import ChildServer, median, percentile, run_child, temp_dir, tree_cpu_seconds
from bench.rounds import Ratios, alternate, ratio_figure
from bench.table import Figure, at_least, at_most, print_table, ratio

P12_PASSWORD = b"bench-secret"
TOPIC = "chat.delta"


# -- child processes -------------------------------------------------------------------


def fake_apns_server(ready, stop, workdir: str) -> None:
    """Fake APNs (mTLS); writes the server CA and a client .p12 into ``workdir``."""
    import threading

    import trustme

    from devstack.fakes.apns import FakeApns
    from devstack.fakes.keys import write_client_p12

    class CountingApns(FakeApns):
        """Answers like FakeApns but only counts requests (memory stays flat).  It still
        checks every request's headers as RFC 9113 demands of a server (h2's inbound
        validation): a fake doing less than Apple must would flatter the proxy."""

        count = 0

        def _answer(self, request):  # type: ignore[override]
            with self._lock:
                self.count += 1
            return self._check(request) or self.default

    tls_ca, client_ca = trustme.CA(), trustme.CA()
    ca_path = Path(workdir) / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_path))
    p12 = Path(workdir) / "apns.p12"
    write_client_p12(client_ca, p12, P12_PASSWORD)
    server = CountingApns(tls_ca, client_ca=client_ca).start()
    ready.send({"url": server.url, "ca": str(ca_path), "p12": str(p12)})
    done = threading.Event()
    while not stop.wait(0.1):
        pass
    done.set()
    ready.send(server.count)
    server.stop()


def _serve_app(ready, stop, make) -> None:
    from aiohttp import web

    async def main() -> None:
        app = await make()
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        ready.send({"url": f"http://127.0.0.1:{port}/notify"})
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    asyncio.run(main())


def proxy_server(ready, stop, apns: dict, window: float, keyring: str | None = None) -> None:
    """The proxy as ``notifiers`` serves it, pointed at the fake APNs (``keyring``: the
    armored secret key that opens ``openpgp:`` tokens)."""
    import logging

    from notifiers.app import tune_gc_for_serving

    logging.basicConfig(level=logging.WARNING)
    tune_gc_for_serving()  # as notifiers.cli does

    async def make():
        from notifiers.app import make_app
        from notifiers.debounce import Debouncer
        from notifiers.providers.apns import ApnsProvider
        from notifiers.ratelimit import RateLimitedProvider
        from notifiers.service import NotifyService
        from notifiers.settings import LimitSettings
        from notifiers.tokens import Kind

        limit = LimitSettings()  # the defaults build_service applies
        provider = ApnsProvider.from_p12(
            Path(apns["p12"]),
            P12_PASSWORD,
            topic=TOPIC,
            sandbox=False,
            base_url=apns["url"],
            verify=apns["ca"],
        )
        limited = RateLimitedProvider(
            provider,
            concurrency=limit.concurrency,
            rps=limit.rps or None,
            max_wait=limit.max_wait,
        )
        from notifiers.openpgp import Keyring, OpenPgpDecryptor

        decryptor = OpenPgpDecryptor(Keyring.parse(keyring, "bench")) if keyring else None
        service = NotifyService(
            {Kind.APNS: limited}, debouncer=Debouncer(window), decryptor=decryptor
        )
        return make_app(service)

    _serve_app(ready, stop, make)


def forwarding_server(ready, stop, upstream: str, window: float) -> None:
    """A proxy with no keyring: every ``openpgp:`` token is forwarded to ``upstream``."""
    import logging

    from notifiers.app import tune_gc_for_serving

    logging.basicConfig(level=logging.WARNING)
    tune_gc_for_serving()  # as notifiers.cli does

    async def make():
        from notifiers.app import make_app
        from notifiers.debounce import Debouncer
        from notifiers.forwarding import Upstream
        from notifiers.service import NotifyService

        service = NotifyService({}, debouncer=Debouncer(window), upstream=Upstream(upstream))
        return make_app(service)

    _serve_app(ready, stop, make)


def trivial_server(ready, stop) -> None:
    """Baseline: aiohttp answering 200 to POST /notify after reading the body."""

    async def make():
        from aiohttp import web

        async def notify(request: web.Request) -> web.Response:
            await request.read()
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/notify", notify)
        return app

    _serve_app(ready, stop, make)


def http_load(
    url: str,
    concurrency: int,
    total: int,
    seconds: float,
    tokens: str,
    base: int,
    public_key: str | None = None,
):
    """Child process: ``concurrency`` tasks post tokens until ``total`` or ``seconds``.

    With ``public_key`` every token is encrypted to it the way clients do
    (made before the clock starts); "same" then resends one ciphertext.
    """
    import aiohttp

    per_task = max(1, total // concurrency)
    encrypted: list[bytes] = []
    if public_key is not None:
        from openpgp.composed import SignedPublicKey

        from devstack.openpgp_tokens import encrypt_token

        key, _ = SignedPublicKey.from_armor(public_key)
        count = 1 if tokens == "same" else concurrency * (per_task + 1)
        encrypted = [encrypt_token(f"{base + i:064x}", key).encode() for i in range(count)]

    async def main() -> dict:
        lat: list[float] = []
        statuses: dict[int, int] = {}
        counter = [0]
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:

            def token() -> bytes:
                counter[0] += 1
                if encrypted:
                    return encrypted[0 if tokens == "same" else counter[0] % len(encrypted)]
                if tokens == "same":
                    return f"{base:064x}".encode()
                return f"{base + counter[0]:064x}".encode()

            async def warm() -> None:
                async with session.post(url, data=token()) as r:
                    await r.read()

            await asyncio.gather(*(warm() for _ in range(concurrency)))
            counter[0] = concurrency
            deadline = time.perf_counter() + seconds

            async def worker() -> None:
                for _ in range(per_task):
                    s = time.perf_counter()
                    async with session.post(url, data=token()) as r:
                        await r.read()
                    lat.append(time.perf_counter() - s)
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if s > deadline:
                        return

            cpu0 = time.process_time()
            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        return {
            "requests": len(lat),
            "elapsed": elapsed,
            "rate": len(lat) / elapsed,
            "median_ms": 1000 * (median(lat) or 0),
            "p99_ms": 1000 * (percentile(lat, 99) or 0),
            "statuses": statuses,
            "client_cpu": cpu / elapsed,
        }

    return asyncio.run(main())


def debounce_memory(n: int, mode: str) -> dict:
    """Child process: memory of ``n`` distinct tokens in a Debouncer (or a plain dict)."""
    import tracemalloc

    from notifiers.debounce import Debouncer

    def rss() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0.0

    tokens = (f"{i:064x}" for i in range(n))
    gc.collect()
    traced = mode.endswith("+tracemalloc")
    if traced:
        tracemalloc.start()
    before = rss()
    t0 = time.perf_counter()
    if mode.startswith("debouncer"):
        d = Debouncer(window=3600.0, max_entries=n)
        sent = 0
        for i, tok in enumerate(tokens):
            sent += d.hit(tok, i * 1e-6)
        entries = len(d)
        assert sent == n
    else:
        d = {tok: i * 1e-6 for i, tok in enumerate(tokens)}  # type: ignore[assignment]
        entries = len(d)
    elapsed = time.perf_counter() - t0
    gc.collect()
    after = rss()
    traced_bytes = tracemalloc.get_traced_memory()[0] if traced else None
    return {
        "entries": entries,
        "rss_mb": (after - before) / 2**20,
        "traced_mb": None if traced_bytes is None else traced_bytes / 2**20,
        "hits_per_s": n / elapsed,
    }


# -- the section -----------------------------------------------------------------------


def _load(
    server: ChildServer,
    conc: int,
    total: int,
    seconds: float,
    tokens: str,
    base: int,
    public_key: str | None = None,
):
    cpu0 = tree_cpu_seconds(server.pid)
    r = run_child(http_load, server.info["url"], conc, total, seconds, tokens, base, public_key)
    r["server_cpu"] = (tree_cpu_seconds(server.pid) - cpu0) / r["elapsed"]
    return r


PAIR_CLIENTS = 64  # the pair judged in alternating rounds


def _apns_rounds(proxy: ChildServer, trivial: ChildServer, total: int, seconds: float) -> Ratios:
    """Distinct tokens through the proxy to fake APNs vs. the trivial endpoint, alternating."""
    bases = iter(range(1 << 210, 1 << 211, 10_000_000))

    def ours() -> float:
        return _load(proxy, PAIR_CLIENTS, total, seconds, "distinct", next(bases))["rate"]

    def base() -> float:
        return _load(trivial, PAIR_CLIENTS, total * 2, seconds, "distinct", 0)["rate"]

    return alternate(ours, base)


def run(quick: bool) -> list[Figure]:
    seconds = 2.0 if quick else 6.0
    levels = (1, 64, 512)
    totals = {1: 1500, 64: 6000, 512: 8000} if quick else {1: 6000, 64: 30_000, 512: 40_000}
    results: dict[tuple[str, str, int], dict] = {}
    apns_cpu: dict[int, float] = {}
    from devstack.openpgp_tokens import generate_key

    key = generate_key()
    secret, public = key.to_armored(), key.to_public_key().to_armored()
    with temp_dir("proxy") as workdir, ChildServer(trivial_server) as trivial:
        apns = ChildServer(fake_apns_server, str(workdir))
        try:
            with ChildServer(proxy_server, apns.info, 10.0, secret) as proxy:
                pair = _apns_rounds(proxy, trivial, totals[PAIR_CLIENTS], seconds)
                base = 1 << 200
                for conc in levels:
                    a0 = tree_cpu_seconds(apns.pid)
                    r = _load(proxy, conc, totals[conc], seconds, "distinct", base)
                    apns_cpu[conc] = (tree_cpu_seconds(apns.pid) - a0) / r["elapsed"]
                    results[("proxy", "distinct", conc)] = r
                    base += 10_000_000
                for conc in levels:
                    r = _load(proxy, conc, totals[conc] * 2, seconds, "same", base + conc)
                    results[("proxy", "same", conc)] = r
                for conc in levels:
                    base += 10_000_000
                    r = _load(proxy, conc, totals[conc], seconds, "distinct", base, public)
                    results[("openpgp", "distinct", conc)] = r
                for conc in levels:
                    r = _load(proxy, conc, totals[conc] * 2, seconds, "same", base + 1, public)
                    results[("openpgp", "same", conc)] = r
        finally:
            apns._stop.set()
            apns_requests = apns._parent.recv() if apns._parent.poll(15) else None
            apns.close()
        for conc in levels:
            r = _load(trivial, conc, totals[conc] * 2, seconds, "distinct", 0)
            results[("trivial", "distinct", conc)] = r
        with ChildServer(forwarding_server, trivial.info["url"], 10.0) as forwarder:
            for conc in levels:
                r = _load(forwarder, conc, totals[conc], seconds, "distinct", conc << 100, public)
                results[("forward", "distinct", conc)] = r

    print("proxy -> fake APNs vs trivial endpoint, 64 clients, by round: " + pair.shown())
    rows = []
    for source, kind, label in (
        ("proxy", "distinct", "sent to fake APNs"),
        ("proxy", "same", "debounced (same token)"),
        ("openpgp", "distinct", "openpgp: decrypted, sent to fake APNs"),
        ("openpgp", "same", "openpgp: cached, debounced (same ciphertext)"),
        ("forward", "distinct", "openpgp: forwarded to upstream (trivial)"),
    ):
        for conc in levels:
            r = results[(source, kind, conc)]
            b = results[("trivial", "distinct", conc)]
            bad = sum(v for k, v in r["statuses"].items() if k != 200)
            rows.append(
                [
                    label,
                    conc,
                    r["requests"],
                    r["rate"],
                    b["rate"],
                    ratio(r["rate"], b["rate"]),
                    r["median_ms"],
                    r["p99_ms"],
                    b["p99_ms"],
                    f"{100 * r['server_cpu']:.0f}%",
                    f"{100 * apns_cpu[conc]:.0f}%"
                    if (source, kind) == ("proxy", "distinct")
                    else "",
                    f"{100 * r['client_cpu']:.0f}%",
                    bad,
                ]
            )
    print_table(
        "proxy: POST /notify through the standalone proxy vs. a trivial aiohttp 200 endpoint "
        f"(same client process); fake APNs answered {apns_requests} requests",
        [
            "requests",
            "clients",
            "count",
            "req/s",
            "trivial req/s",
            "ratio",
            "median ms",
            "p99 ms",
            "trivial p99 ms",
            "proxy CPU",
            "APNs CPU",
            "client CPU",
            "non-200",
        ],
        rows,
    )

    n = 1_000_000
    mem = {"debouncer": run_child(debounce_memory, n, "debouncer")}
    mem["dict"] = run_child(debounce_memory, n, "dict")
    if not quick:
        mem["debouncer+tracemalloc"] = run_child(debounce_memory, n, "debouncer+tracemalloc")
    mrows = []
    for name, m in mem.items():
        mrows.append(
            [
                {
                    "debouncer": "Debouncer (RSS delta)",
                    "dict": "baseline: dict[str, float] of the tokens (RSS delta)",
                    "debouncer+tracemalloc": "Debouncer (tracemalloc)",
                }[name],
                m["entries"],
                m["traced_mb"] if m["traced_mb"] is not None else m["rss_mb"],
                ratio(m["rss_mb"], mem["dict"]["rss_mb"]) if name == "debouncer" else "",
                m["hits_per_s"],
            ]
        )
    print_table(
        f"proxy: memory of {n:,} distinct 64-hex-digit tokens",
        ["structure", "entries", "MB", "vs dict", "inserts/s"],
        mrows,
    )

    def best(source: str, kind: str) -> float:
        return max(results[(source, kind, c)]["rate"] for c in levels)

    return [
        ratio_figure("proxy /notify to fake APNs vs trivial, 64 clients", pair, 0.5),
        at_least(
            "proxy notifications/s to fake APNs (best)", best("proxy", "distinct"), 2000, "/s"
        ),
        # What the issue keeps: debounced requests at the trivial endpoint's rate.  Both
        # are bound by the one client process here, so an absolute 10,000/s (the figure
        # once judged) only followed the machine: 7,150/s for the trivial endpoint itself.
        at_least(
            "proxy debounced vs trivial, 64 clients",
            results[("proxy", "same", 64)]["rate"] / results[("trivial", "distinct", 64)]["rate"],
            0.8,
            "x",
        ),
        at_least(
            "proxy openpgp: notifications/s to fake APNs (best)",
            best("openpgp", "distinct"),
            2000,
            "/s",
        ),
        at_least("proxy openpgp: forwarded/s (best)", best("forward", "distinct"), 2000, "/s"),
        at_most("memory of 1,000,000 debounce entries", mem["debouncer"]["rss_mb"], 200, "MB"),
    ]
