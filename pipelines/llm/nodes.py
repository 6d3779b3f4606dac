"""The lines between the nodes of one engine: which worker nodes have joined, and which went away.

Each worker node (NODE_RANK > 0) keeps one TCP connection, its line, to the
serving node (NODE_RANK=0) at MASTER_ADDR:NODE_LINE_PORT (MASTER_PORT + 1 by
default). The port listens on every address, so a line counts only once its
node has proved that it knows NODE_SECRET, the secret every node of the engine
is given: the serving node writes a challenge, fresh for each connection, and
the worker node answers with an HMAC of it under the secret (the secret itself
never crosses the network; compared in constant time). A connection that does
not prove itself (a stranger, a scan, a node with another secret) changes
nothing: it is logged (``serving_node.line_refused``), told why and closed, and
the serving node keeps waiting for its real worker nodes. The JSON lines:

    serving node: {"challenge": "<hex>"}        on accepting a connection
    worker node:  {"node": 1, "joined": false, "proof": "<hex>"}
                                                its hello, while its ranks start
    serving node: {"refused": "<why>"}          then closes, for a line that did not prove itself
    worker node:  {"joined": true}              once its ranks have joined the engine's master
    worker node:  {"beat": <time>}              every BEAT_INTERVAL seconds, for as long as it runs them

The serving node reads every line. At start it tells a node that has not
joined (no line, or ranks not joined yet: a join timeout, MASTER_WAIT_TIMEOUT)
from an engine that is still starting once all have (no timeout of its own).
A line that closes (the node's runner died: its kernel closes the connection at
once) is a lost worker node; once the engine runs, so is a line silent for
BEAT_TIMEOUT seconds (the node hangs, or the network between the two does);
either way, whatever the
engine's layout: the engine's own connections differ between tensor and
pipeline parallelism, these lines do not. A worker node reads its line too:
the serving node closing it means the serving node went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable

import structlog

from pipelines.llm.settings import LLMSettings

log = structlog.get_logger(__name__)

BEAT_INTERVAL = 0.5  # seconds between a worker node's beats
BEAT_TIMEOUT = 3.0  # seconds of silence on a line that mean its node is lost (within the 5 s the README promises)
CONNECT_RETRY = 0.5  # seconds between a worker node's attempts to reach the serving node's line
CHALLENGE_BYTES = 32


def proof(secret: str, challenge: str, node: int) -> str:
    """What worker node ``node`` answers to ``challenge``: an HMAC-SHA256 under NODE_SECRET, bound to its rank."""
    return hmac.new(secret.encode(), f"{challenge}:{node}".encode(), hashlib.sha256).hexdigest()


def node_secret(settings: LLMSettings) -> str:
    return settings.node_secret.get_secret_value() if settings.node_secret is not None else ""


def node_ranks(settings: LLMSettings, node: int) -> range:
    """The engine's ranks on ``node`` (vLLM gives each node an equal, consecutive share of the world)."""
    local = settings.local_world_size
    return range(node * local, (node + 1) * local)


def describe_node(settings: LLMSettings, node: int) -> str:
    ranks = node_ranks(settings, node)
    listed = ", ".join(str(rank) for rank in ranks)
    return f"worker node NODE_RANK={node} (engine rank{'s' if len(ranks) > 1 else ''} {listed})"


class WorkerNodeLines:
    """On the serving node: the line of every worker node, from the engine's start to the runner's stop."""

    def __init__(self, settings: LLMSettings, on_lost: Callable[[str], None]) -> None:
        self.settings = settings
        self.on_lost = on_lost  # called once, with the reason, when a worker node that had joined is lost
        self.expected = set(range(1, settings.nnodes))
        self.connected: dict[int, asyncio.StreamWriter] = {}  # node -> its line
        self.heard: dict[int, float] = {}  # node -> when its line last said something (loop time)
        self.silent: dict[int, str] = {}  # node -> why its line was closed for silence
        self.silence_watch: asyncio.Task | None = None
        self.joined: set[int] = set()
        self.all_joined = asyncio.Event()
        self.lost: str | None = None
        self.server: asyncio.Server | None = None
        self.lines: set[asyncio.StreamWriter] = set()
        self.refused = 0  # connections that did not prove themselves
        self.closing = False

    async def open(self) -> None:
        """Listen on NODE_LINE_PORT, on every address (the worker nodes reach it at MASTER_ADDR)."""
        try:
            self.server = await asyncio.start_server(self.serve_line, port=self.settings.node_line_port,
                                                     reuse_address=True)
        except OSError as exc:
            raise ValueError(f"cannot listen for the worker nodes' lines at NODE_LINE_PORT="
                             f"{self.settings.node_line_port} ({exc.strerror or exc}): free that port or set "
                             "NODE_LINE_PORT to another one, the same on every node") from None
        log.info("serving_node.lines_open", port=self.settings.node_line_port, worker_nodes=sorted(self.expected))

    async def serve_line(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.lines.add(writer)
        try:
            admitted = await self.admit(reader, writer)
            if admitted is not None:
                await self.follow(*admitted, reader, writer)
        finally:
            self.lines.discard(writer)
            writer.close()

    async def admit(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, dict] | None:
        """The worker node at the other end and its hello, once it proved itself; None for any other connection.

        A connection refused changes nothing but the count of refusals: it is
        logged, told why, and closed.
        """
        peer = writer.get_extra_info("peername")
        challenge = secrets.token_hex(CHALLENGE_BYTES)
        claimed = None
        try:
            writer.write(json.dumps({"challenge": challenge}).encode() + b"\n")
            async with asyncio.timeout(BEAT_TIMEOUT):
                hello = json.loads(await reader.readline())
            claimed, refusal = self.check_hello(hello, challenge)
        except TimeoutError:
            refusal = f"it sent no hello within {BEAT_TIMEOUT:g} s of connecting"
        except (ConnectionError, OSError) as exc:
            refusal = f"it broke off before its hello ({exc})"
        except ValueError as exc:  # not JSON, not UTF-8, or a line past the reader's limit
            refusal = f"its hello is not a line of JSON ({exc})"
        if refusal is None:
            self.connected[claimed] = writer
            self.heard[claimed] = asyncio.get_running_loop().time()
            log.info("serving_node.worker_node_connected", node=claimed,
                     ranks=list(node_ranks(self.settings, claimed)), peer=peer)
            return claimed, hello
        self.refused += 1
        log.warning("serving_node.line_refused", peer=peer, claimed_node=claimed, reason=refusal,
                    effect="closed; this node keeps waiting for its worker nodes")
        with contextlib.suppress(ConnectionError, OSError, TimeoutError):
            writer.write(json.dumps({"refused": refusal}).encode() + b"\n")
            async with asyncio.timeout(1.0):
                await writer.drain()
        return None

    async def follow(self, node: int, hello: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read a proven node's line until it ends: its end is a lost node."""
        reason = "its line closed (its runner stopped or died)"
        try:
            message = hello
            while True:
                if message.get("joined"):
                    self.join(node)
                line = await reader.readline()
                if not line:
                    break
                self.heard[node] = asyncio.get_running_loop().time()
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError(f"a line that is not a JSON object: {line[:80]!r}")
        except (ConnectionError, OSError) as exc:
            reason = f"its line broke ({exc})"
        except ValueError as exc:
            reason = f"its line said something this runner cannot read ({exc})"
        finally:
            if self.connected.get(node) is writer:
                del self.connected[node]
                self.heard.pop(node, None)
                self.lose(node, self.silent.get(node, reason))

    def check_hello(self, hello: object, challenge: str) -> tuple[int | None, str | None]:
        """The node a line's hello claims to be, and why the line is refused (None: it proved itself)."""
        if not (isinstance(hello, dict) and isinstance(hello.get("node"), int) and isinstance(hello.get("proof"), str)):
            return None, "its first line is not a worker node's hello ({\"node\", \"proof\"})"
        node = hello["node"]
        if not hmac.compare_digest(proof(node_secret(self.settings), challenge, node).encode(),
                                   hello["proof"].encode(errors="replace")):
            return node, "its proof does not match this node's NODE_SECRET (a stranger, or a node given another secret)"
        if node not in self.expected:
            return node, f"NODE_RANK={node} is not a worker node of this engine (NNODES={self.settings.nnodes})"
        if node in self.connected:
            return node, f"worker node NODE_RANK={node} is connected already"
        return node, None

    def watch_silence(self) -> None:
        """From now on (the engine runs), a line silent for BEAT_TIMEOUT seconds is a lost node too.

        Not during the start: a loaded machine's start (imports, compiles) may hold
        either runner's event loop for seconds; a line that closes counts at once,
        start or not. A pause of this runner's own loop is no one's silence: after
        one, the count starts again.
        """
        self.silence_watch = asyncio.create_task(self.judge_silence(), name="worker-node-silence")

    async def judge_silence(self) -> None:
        loop = asyncio.get_running_loop()
        ticked = loop.time()
        while True:
            await asyncio.sleep(BEAT_INTERVAL)
            now = loop.time()
            if now - ticked > 2 * BEAT_INTERVAL:  # this loop itself was held: what it missed is not silence
                for node in self.heard:
                    self.heard[node] = now
            ticked = now
            for node, heard in list(self.heard.items()):
                if now - heard > BEAT_TIMEOUT and node not in self.silent:
                    self.silent[node] = (f"its line fell silent: no beat for {BEAT_TIMEOUT:g} s (the node hangs, "
                                         "or the network does)")
                    self.connected[node].close()  # its serve_line ends, and reports the loss with this reason

    def join(self, node: int) -> None:
        if node in self.joined:
            return
        self.joined.add(node)
        log.info("serving_node.worker_node_joined", node=node, ranks=list(node_ranks(self.settings, node)),
                 joined=len(self.joined), of=len(self.expected))
        if self.joined == self.expected:
            self.all_joined.set()

    def lose(self, node: int, reason: str) -> None:
        if self.closing or self.lost is not None:
            return
        self.lost = (f"{describe_node(self.settings, node)} went away: {reason}; restart the worker nodes, "
                     "then this runner")
        log.error("serving_node.worker_node_lost", node=node, ranks=list(node_ranks(self.settings, node)),
                  reason=reason)
        self.on_lost(self.lost)

    def missing(self) -> str:
        """Which worker nodes have not joined, and how far each got: for the join timeout's message."""
        parts = []
        for node in sorted(self.expected - self.joined):
            how = ("connected, but its ranks have not joined the engine's master yet" if node in self.connected
                   else f"never reached this node's line at NODE_LINE_PORT={self.settings.node_line_port}")
            parts.append(f"{describe_node(self.settings, node)} {how}")
        if self.refused:
            many = self.refused > 1
            parts.append(f"{self.refused} connection{'s' if many else ''} to NODE_LINE_PORT did not prove to know "
                         f"NODE_SECRET and {'were' if many else 'was'} refused (serving_node.line_refused in the log: "
                         "a worker node given another NODE_SECRET, or a stranger)")
        return "; ".join(parts)

    async def close(self) -> None:
        """Stop listening and close every line: each worker node sees its serving node go, and stops."""
        self.closing = True
        if self.silence_watch is not None:
            self.silence_watch.cancel()
        if self.server is not None:
            self.server.close()  # stops listening; the lines it accepted stay open until closed here
            self.server = None
        for writer in list(self.lines):
            writer.close()


class ServingNodeLine:
    """On a worker node: its line to the serving node, from its ranks' start to its runner's stop."""

    def __init__(self, settings: LLMSettings) -> None:
        self.settings = settings
        self.writer: asyncio.StreamWriter | None = None
        self.joined = False
        self.lost = asyncio.Event()  # the serving node closed the line (it stopped or died, or refused the line)
        self.refused: str | None = None  # why the serving node refused this node's line, if it did
        self.task: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.master_addr}:{self.settings.node_line_port}"

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name="serving-node-line")

    def mark_joined(self) -> None:
        """This node's ranks have joined the master: say so now if the line is up, or in its hello."""
        self.joined = True
        self.send({"joined": True})

    def send(self, message: dict) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")

    async def run(self) -> None:
        """Connect (retrying while the serving node starts), prove this node, then beat until the line closes.

        The line is never re-opened.
        """
        while True:
            try:
                reader, writer = await asyncio.open_connection(self.settings.master_addr, self.settings.node_line_port)
                break
            except OSError:
                await asyncio.sleep(CONNECT_RETRY)
        try:
            async with asyncio.timeout(BEAT_TIMEOUT):
                challenge = json.loads(await reader.readline())["challenge"]
            if not isinstance(challenge, str):
                raise TypeError("the challenge is not a string")
        except (TimeoutError, ConnectionError, OSError, ValueError, KeyError, TypeError) as exc:
            self.refused = (f"what answers at {self.address} (NODE_LINE_PORT) sent no challenge ({exc!r}): is it the "
                            "serving node of this engine?")
            writer.close()
        else:
            node = self.settings.node_rank
            writer.write(json.dumps({"node": node, "joined": self.joined,
                                     "proof": proof(node_secret(self.settings), challenge, node)}).encode() + b"\n")
            self.writer = writer
            log.info("worker_node.line_connected", serving_node=self.address)
            beats = asyncio.create_task(self.beat())
            try:
                await self.read_answers(reader)  # returns when the serving node closes the line
            except (ConnectionError, OSError):
                pass
            finally:
                beats.cancel()
        if self.refused is not None:
            log.error("worker_node.line_refused", serving_node=self.address, reason=self.refused)
        else:
            log.warning("worker_node.line_closed", serving_node=self.address)
        self.lost.set()

    async def read_answers(self, reader: asyncio.StreamReader) -> None:
        """The serving node writes nothing more to a line it took; a line it refused gets why, then closes."""
        while line := await reader.readline():
            with contextlib.suppress(ValueError, AttributeError):
                refused = json.loads(line).get("refused")
                if refused:
                    self.refused = f"the serving node at {self.address} refused this node's line: {refused}"

    async def beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT_INTERVAL)
            self.send({"beat": round(time.time(), 3)})
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.drain()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.writer is not None:
            self.writer.close()
