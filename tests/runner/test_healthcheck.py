"""runner.healthcheck, the image's HEALTHCHECK, against a served app."""

from __future__ import annotations

import asyncio

from aiohttp import web

from runner import healthcheck


async def serve_health(aiohttp_server, status: str):
    async def health(_request):
        return web.json_response({"status": status})

    app = web.Application()
    app.router.add_get("/health", health)
    return await aiohttp_server(app)


async def check(monkeypatch, port: int) -> int:
    monkeypatch.setenv("PORT", str(port))
    return await asyncio.to_thread(healthcheck.main)


async def test_loading_idle_and_ok_are_healthy(aiohttp_server, monkeypatch):
    for status in ("LOADING", "IDLE", "OK"):
        server = await serve_health(aiohttp_server, status)
        assert await check(monkeypatch, server.port) == 0


async def test_error_and_silence_are_unhealthy(aiohttp_server, monkeypatch, unused_tcp_port):
    server = await serve_health(aiohttp_server, "ERROR")
    assert await check(monkeypatch, server.port) == 1
    assert await check(monkeypatch, unused_tcp_port) == 1
