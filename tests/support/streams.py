"""A /llm stream read in a thread of its own, for tests that act on a runner while streams are in flight."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

STORY = [{"role": "user", "content": "Tell me a story about a dragon."}]


class StreamInFlight(threading.Thread):
    """One /llm stream (``max_tokens`` tokens at temperature 0), read to its end.

    Afterwards: ``status``, ``events`` (the data documents), ``done`` (it ended with
    [DONE]), ``error`` (its in-band error event's reason, if it had one),
    ``failure`` (what broke the read, if anything) and ``ended_at`` (monotonic).
    """

    def __init__(self, url: str, max_tokens: int, timeout: float = 120) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = {"messages": STORY, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        self.timeout = timeout
        self.status: int | None = None
        self.events: list[dict] = []
        self.done = False
        self.error: str | None = None
        self.failure: BaseException | None = None
        self.ended_at: float | None = None
        self.started_streaming = threading.Event()

    def run(self) -> None:
        request = urllib.request.Request(self.url, data=json.dumps(self.body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                self.status = response.status
                for raw in response:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line.removeprefix("data: ")
                    if data == "[DONE]":
                        self.done = True
                        continue
                    event = json.loads(data)
                    self.events.append(event)
                    self.started_streaming.set()
                    if any(choice.get("finish_reason") == "error" for choice in event.get("choices", [])):
                        self.error = (event.get("error") or {}).get("msg", "")
        except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
            self.failure = exc
        finally:
            self.ended_at = time.monotonic()
            self.started_streaming.set()

    @property
    def finished_normally(self) -> bool:
        return self.status == 200 and self.done and self.error is None and self.failure is None


def start_streams(url: str, count: int, max_tokens: int, first_event: bool = True) -> list[StreamInFlight]:
    """``count`` streams, started together; returns once each has its first event (``first_event``), or at once.

    A runner with a reasoning parser sends a model that only thinks no event until the end: there, wait otherwise.
    """
    streams = [StreamInFlight(url, max_tokens) for _ in range(count)]
    for stream in streams:
        stream.start()
    for stream in streams if first_event else ():
        assert stream.started_streaming.wait(120), "a stream never started"
        assert stream.failure is None, stream.failure
    return streams
