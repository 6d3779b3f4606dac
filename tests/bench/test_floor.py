"""The bench's per-event floor: four real servers on loopback, each stream read to its end."""

from __future__ import annotations

from bench.floor import KINDS, measure, own_layers_us


async def test_every_server_streams_every_event_and_its_cpu_is_measured():
    found = await measure(rounds=1, streams=4, tokens=8)
    assert list(found) == list(KINDS)
    for result in found.values():
        assert len(result.cpu_us_per_event) == 1 and result.cpu_us_per_event[0] >= 0


async def test_the_own_layers_microbenchmark_streams_through_the_runner_and_a_bare_handler(monkeypatch):
    monkeypatch.setattr("bench.floor.OWN_REPEATS", 1)
    monkeypatch.setattr("bench.floor.OWN_STREAMS", 4)
    runner, bare = await own_layers_us(bare=False), await own_layers_us(bare=True)
    assert runner > 0 and bare > 0
