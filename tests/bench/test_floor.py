"""The bench's per-event floor: four real servers on loopback, each stream read to its end."""

from __future__ import annotations

from bench.floor import KINDS, measure


async def test_every_server_streams_every_event_and_its_cpu_is_measured():
    found = await measure(rounds=1, streams=4, tokens=8)
    assert list(found) == list(KINDS)
    for result in found.values():
        assert len(result.cpu_us_per_event) == 1 and result.cpu_us_per_event[0] >= 0
