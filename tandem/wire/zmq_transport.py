"""ZeroMQ transport: the same Request/Reply envelopes over ROUTER (node) and DEALER (client).

A message is the routing frames plus one serialized Request; the reply goes back on the same
route. The auth token is the Request's `auth` field (plain text: use it on trusted links, or
gRPC with TLS). Failures are Reply.error with the gRPC status numbers, and the socket stays up.

Both ends drive plain (non-blocking) zmq sockets from the event loop through the socket's FD
instead of zmq.asyncio, whose per-message future bookkeeping costs ~25 µs a side (half the
loopback round trip). The FD is edge-triggered: it signals that the socket's state may have
changed, so every wake-up reads EVENTS (which also clears the signal) and drains what is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

import zmq
from google.protobuf.message import DecodeError

from tandem.wire import auth, errors
from tandem.wire.client import NodeClient
from tandem.wire.errors import Code, NodeError
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import MAX_MESSAGE_BYTES, NodeService

INLINE = frozenset({"ping", "info"})  # answered on the receive callback; the rest get a task each
_EVENTS, _POLLIN, _NOBLOCK = zmq.EVENTS, zmq.POLLIN, zmq.NOBLOCK


class ZmqServer:
    """A running ZeroMQ node; `port` is the bound port (useful with port 0)."""

    def __init__(self, service: NodeService, host: str, port: int, token: str | None = None) -> None:
        self.service = service
        self.token = token
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        # Past twice the limit zmq drops the peer; between the two the sender gets RESOURCE_EXHAUSTED.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 2 * MAX_MESSAGE_BYTES)
        if ":" in host:
            self.sock.setsockopt(zmq.IPV6, 1)
            host = f"[{host}]"
        bind_host = "*" if host in ("0.0.0.0", "") else host
        try:
            if port == 0:
                self.port = self.sock.bind_to_random_port(f"tcp://{bind_host}")
            else:
                self.sock.bind(f"tcp://{bind_host}:{port}")
                self.port = port
        except zmq.ZMQError as exc:
            self.sock.close(linger=0)
            self.ctx.term()
            raise OSError(exc.errno, str(exc)) from exc
        self.fd = self.sock.getsockopt(zmq.FD)
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._receive)
        self._receive()  # requests that came before the reader was registered raise no new edge

    def _send(self, frames: list[bytes]) -> None:
        # ROUTER never blocks: a message to a peer that is gone (or far behind) is dropped.
        self.sock.send_multipart(frames, _NOBLOCK)

    def _reject(self, route: list[bytes], rid: int, err: NodeError) -> None:
        self._send([*route, pb.Reply(id=rid, error=err.to_proto()).SerializeToString()])

    def _receive(self) -> None:
        """Reader callback: answer or start everything that is waiting."""
        sock, service, loop = self.sock, self.service, self._loop
        while sock.getsockopt(_EVENTS) & _POLLIN:
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            route, data = frames[:-1], frames[-1]
            if not route:
                continue  # ROUTER always prefixes the peer's identity; nothing to answer to
            if len(data) > MAX_MESSAGE_BYTES:
                self._reject(route, 0, errors.exhausted(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}"))
                continue
            try:
                req = pb.Request.FromString(data)
            except DecodeError as exc:
                self._reject(route, 0, errors.invalid(f"malformed Request: {exc}"))
                continue
            if self.token is not None and not auth.token_matches(self.token, req.auth):
                self._reject(route, req.id, errors.unauthenticated())
                continue
            if req.WhichOneof("body") in INLINE:
                try:
                    rep = service.dispatch_now(req)
                except Exception as exc:
                    rep = _internal(req.id, exc)
                route.append(rep.SerializeToString())
                self._send(route)
            else:
                task = loop.create_task(self._answer(route, req))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, route: list[bytes], req: pb.Request) -> None:
        try:
            rep = await self.service.dispatch(req)
        except Exception as exc:
            rep = _internal(req.id, exc)
        route.append(rep.SerializeToString())
        self._send(route)
        self._receive()  # the send may have taken the FD's edge for a request that came meanwhile

    async def stop(self, grace: float = 30.0) -> None:
        """Answer UNAVAILABLE to new requests, let those in flight finish and send, then close."""
        await self.service.drain(grace)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
        self.sock.close()
        self.ctx.term()


def _internal(rid: int, exc: Exception) -> pb.Reply:
    """A handler's bug, not a bad request: answer INTERNAL rather than leave the caller waiting."""
    return pb.Reply(id=rid, error=NodeError(Code.INTERNAL, f"{type(exc).__name__}: {exc}").to_proto())


async def serve(service: NodeService, host: str, port: int, *, token: str | None = None) -> ZmqServer:
    server = ZmqServer(service, host, port, token)
    server.start()
    return server


@dataclass
class Dealer:
    """One DEALER socket: one request in flight (the lock), woken through its FD."""

    sock: zmq.Socket
    loop: asyncio.AbstractEventLoop
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiter: asyncio.Future | None = None

    def __post_init__(self) -> None:
        self.fd = self.sock.getsockopt(zmq.FD)
        self.loop.add_reader(self.fd, self._wake)

    def _wake(self) -> None:
        self.sock.getsockopt(_EVENTS)  # clears the FD's signal, so a level-triggered poll stops firing
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = self.loop.create_future()
        await self.waiter

    async def send(self, data: bytes) -> None:
        while True:
            try:
                return self.sock.send(data, _NOBLOCK)
            except zmq.Again:  # the high-water mark: the node is not reading
                await self.wait()

    async def recv(self) -> bytes:
        # Reading EVENTS re-arms the FD: with nothing there yet, the next message signals it.
        while not self.sock.getsockopt(_EVENTS) & _POLLIN:
            await self.wait()
        return self.sock.recv(_NOBLOCK)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError, RuntimeError):  # the loop may be closed already
            self.loop.remove_reader(self.fd)
        self.sock.close(linger=0)


class ZmqClient(NodeClient):
    """One DEALER socket per session, plus one for Info/Ping; one request in flight per socket."""

    transport = "zmq"

    def __init__(self, endpoint: str, token: str | None = None) -> None:
        self.endpoint = endpoint
        self.token = token or ""
        self.ctx = zmq.Context()
        self._socks: dict[str | None, Dealer] = {}
        self._ids = itertools.count(1)

    def _socket(self, session: str | None) -> Dealer:
        if self.ctx.closed:
            raise NodeError(Code.UNAVAILABLE, "client is closed")
        d = self._socks.get(session)
        loop = asyncio.get_running_loop()
        if d is not None and d.loop is not loop:  # used from another event loop: its reader is gone
            self._drop(session, d)
            d = None
        if d is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(self.endpoint)
            d = self._socks[session] = Dealer(sock, loop)
        return d

    async def _call(self, req: pb.Request, session: str | None) -> pb.Reply:
        req.id = rid = next(self._ids)
        req.auth = self.token
        data = req.SerializeToString()
        if len(data) > MAX_MESSAGE_BYTES:
            raise errors.exhausted(f"request of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        d = self._socket(session)
        async with d.lock:
            try:
                await d.send(data)
                while True:
                    rep = pb.Reply.FromString(await d.recv())
                    if rep.id == rid or rep.id == 0:
                        return rep
                    # A reply to an earlier request whose caller was cancelled: skip it.
            except BaseException:
                self._drop(session, d)
                raise

    def _drop(self, session: str | None, d: Dealer) -> None:
        if self._socks.get(session) is d:
            del self._socks[session]
        d.close()

    async def _end_session(self, session: str) -> None:
        d = self._socks.pop(session, None)
        if d is not None:
            async with d.lock:
                d.close()

    async def aclose(self) -> None:
        for d in self._socks.values():
            d.close()
        self._socks.clear()
        self.ctx.term()
