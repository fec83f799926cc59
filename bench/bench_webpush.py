"""Section "webpush": Web Push sends per second (issue 8).

Two processes on loopback: an HTTPS/1.1 aiohttp endpoint answering 201 without
looking at the body (so the figure is the sender's cost, not the fake's
decryption), and a sender process running ``WebPushProvider`` (aes128gcm with a
fresh ephemeral key per message, the cached VAPID JWT, the endpoint guard with
``allow_loopback``) with ``clients`` concurrent sends to distinct subscriptions
of one push service.  Baseline, same run, same endpoint: the same aiohttp
client POSTing a body of the same size without encryption, VAPID or guard.
Plus ``encrypt()`` alone per second on one core.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.common import ChildServer, median, percentile, run_child, temp_dir, tree_cpu_seconds
from bench.table import Figure, at_least, print_table, ratio


def endpoint_server(ready, stop, workdir: str) -> None:
    """Child: HTTPS on 127.0.0.1 answering 201 to any POST; writes its CA to ``workdir``."""
    import trustme
    from aiohttp import web

    from devstack.fakes.keys import server_context

    ca = trustme.CA()
    ca_path = Path(workdir) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))

    async def push(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=201)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", push)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(ca), backlog=4096)
        await site.start()
        port = runner.addresses[0][1]
        ready.send({"url": f"https://127.0.0.1:{port}", "ca": str(ca_path)})
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await runner.cleanup()

    asyncio.run(main())


def send_load(base_url: str, ca: str, mode: str, concurrency: int, seconds: float) -> dict:
    """Child: ``concurrency`` tasks send pushes for ``seconds``; ``mode`` provider or plain."""
    import base64
    import ssl

    import aiohttp
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from notifiers.providers.base import Outcome
    from notifiers.providers.endpoints import EndpointPolicy
    from notifiers.providers.vapid import Vapid
    from notifiers.providers.webpush import PAYLOAD, WebPushProvider, encrypt
    from notifiers.tokens import parse_token

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    auth = b64(b"a" * 16)
    tokens = [parse_token(f"webpush:{base_url}/push/{i}|{b64(point)}|{auth}") for i in range(1000)]
    body_size = len(encrypt(PAYLOAD, point, b"a" * 16))

    async def main() -> dict:
        lat: list[float] = []
        failed = 0
        if mode == "provider":
            vapid = Vapid(ec.generate_private_key(ec.SECP256R1()))
            provider = WebPushProvider(vapid, policy=EndpointPolicy(allow_loopback=True), verify=ca)

            async def one(i: int) -> bool:
                return (await provider.send(tokens[i % len(tokens)])).outcome is Outcome.SENT

            close = provider.aclose
        else:
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca))
            )
            body = b"x" * body_size

            async def one(i: int) -> bool:
                async with session.post(tokens[i % len(tokens)].device, data=body) as r:
                    await r.read()
                    return r.status == 201

            close = session.close
        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm the pool
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal failed
            i = w
            while time.perf_counter() < deadline:
                s = time.perf_counter()
                ok = await one(i)
                lat.append(time.perf_counter() - s)
                failed += not ok
                i += concurrency

        cpu0 = time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        await close()
        return {
            "sends": len(lat),
            "rate": len(lat) / elapsed,
            "median_ms": 1000 * (median(lat) or 0),
            "p99_ms": 1000 * (percentile(lat, 99) or 0),
            "failed": failed,
            "cpu": cpu / elapsed,
            "elapsed": elapsed,
        }

    return asyncio.run(main())


def encrypt_rate(seconds: float) -> float:
    """Child: ``encrypt()`` calls per second (fresh ephemeral key and ECDH each)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from notifiers.providers.webpush import PAYLOAD, encrypt

    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        encrypt(PAYLOAD, point, b"a" * 16)
        n += 1
    return n / (time.perf_counter() - t0)


def run(quick: bool) -> list[Figure]:
    seconds = 2.0 if quick else 5.0
    levels = (1, 64)
    results: dict[tuple[str, int], dict] = {}
    with temp_dir("webpush") as workdir, ChildServer(endpoint_server, str(workdir)) as server:
        url, ca = server.info["url"], server.info["ca"]
        for conc in levels:
            for mode in ("provider", "plain"):
                cpu0 = tree_cpu_seconds(server.pid)
                r = run_child(send_load, url, ca, mode, conc, seconds)
                r["endpoint_cpu"] = (tree_cpu_seconds(server.pid) - cpu0) / r["elapsed"]
                results[(mode, conc)] = r
    rows = []
    for conc in levels:
        r, b = results[("provider", conc)], results[("plain", conc)]
        rows.append(
            [
                conc,
                r["sends"],
                r["rate"],
                b["rate"],
                ratio(r["rate"], b["rate"]),
                r["median_ms"],
                r["p99_ms"],
                b["p99_ms"],
                f"{100 * r['cpu']:.0f}%",
                f"{100 * b['cpu']:.0f}%",
                f"{100 * r['endpoint_cpu']:.0f}%",
                r["failed"],
            ]
        )
    print_table(
        "webpush: WebPushProvider sends to a local HTTPS endpoint (201) vs. plain aiohttp "
        "POSTs of the same body size to the same endpoint",
        [
            "clients",
            "sends",
            "sends/s",
            "plain POST/s",
            "ratio",
            "median ms",
            "p99 ms",
            "plain p99 ms",
            "sender CPU",
            "plain CPU",
            "endpoint CPU",
            "not 201",
        ],
        rows,
    )
    enc = run_child(encrypt_rate, seconds / 2)
    print_table(
        "webpush: aes128gcm encryption alone (one core)", ["operation", "per s"], [["encrypt", enc]]
    )
    best = max(results[("provider", c)]["rate"] for c in levels)
    return [at_least("Web Push sends/s to a local endpoint (best)", best, 500, "/s")]
