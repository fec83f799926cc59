"""TURN credentials are remembered for a short time, so GETMETADATA costs no I/O (issue 11)."""

from __future__ import annotations

import asyncio

from helpers_chatmaild import Clock, make_config

from chatmaild import serverkeys

WALL = 1_800_000_000.0


def _keys(tmp_path, sock_path, clock):
    return serverkeys.ServerKeys(
        make_config(tmp_path, f"turn_socket_path = {sock_path}\n"),
        clock=clock,
        wall_clock=lambda: WALL + clock.now,
    )


async def _serve(sock_path, line: bytes, asks: list[int], delay: float = 0.0):
    async def handle(reader, writer):
        asks.append(1)
        await asyncio.sleep(delay)
        writer.write(line)
        await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path=str(sock_path))


def test_credentials_with_an_expiry_are_answered_from_memory(tmp_path):
    sock_path = tmp_path / "turn.socket"
    clock = Clock(0.0)
    keys = _keys(tmp_path, sock_path, clock)
    line = f"{int(WALL) + 86400}:secret\n".encode()
    want = f"example.org:3478:{int(WALL) + 86400}:secret".encode()
    asks: list[int] = []

    async def main():
        async with await _serve(sock_path, line, asks):
            assert await keys.turn() == want
            assert keys.cached_turn() == want  # no I/O needed now
            assert [await keys.turn() for _ in range(100)] == [want] * 100
            assert len(asks) == 1
            clock.advance(serverkeys.TURN_CACHE_SECONDS)
            assert keys.cached_turn() is serverkeys.TURN_UNKNOWN
            assert await keys.turn() == want
            assert len(asks) == 2

    asyncio.run(main())


def test_credentials_close_to_their_expiry_are_not_kept(tmp_path):
    sock_path = tmp_path / "turn.socket"
    clock = Clock(0.0)
    keys = _keys(tmp_path, sock_path, clock)
    line = f"{int(WALL + serverkeys.TURN_EXPIRY_MARGIN) - 1}:secret\n".encode()
    asks: list[int] = []

    async def main():
        async with await _serve(sock_path, line, asks):
            await keys.turn()
            assert keys.cached_turn() is serverkeys.TURN_UNKNOWN
            await keys.turn()
            assert len(asks) == 2

    asyncio.run(main())


def test_credentials_without_an_expiry_are_asked_for_each_time(tmp_path):
    sock_path = tmp_path / "turn.socket"
    clock = Clock(0.0)
    keys = _keys(tmp_path, sock_path, clock)
    asks: list[int] = []

    async def main():
        async with await _serve(sock_path, b"user:pass\n", asks):
            assert await keys.turn() == b"example.org:3478:user:pass"
            assert keys.cached_turn() is serverkeys.TURN_UNKNOWN
            assert await keys.turn() == b"example.org:3478:user:pass"
            assert len(asks) == 2

    asyncio.run(main())


def test_concurrent_lookups_share_one_ask(tmp_path):
    sock_path = tmp_path / "turn.socket"
    clock = Clock(0.0)
    keys = _keys(tmp_path, sock_path, clock)
    asks: list[int] = []

    async def main():
        async with await _serve(sock_path, b"user:pass\n", asks, delay=0.05):
            answers = await asyncio.gather(*(keys.turn() for _ in range(32)))
            assert answers == [b"example.org:3478:user:pass"] * 32
            assert len(asks) == 1

    asyncio.run(main())


def test_expiry_parsing():
    assert serverkeys.turn_expiry("1800000000:pw") == 1800000000
    assert serverkeys.turn_expiry("user:pass") is None
    assert serverkeys.turn_expiry("1800000000") is None
