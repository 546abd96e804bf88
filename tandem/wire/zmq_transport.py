"""ZeroMQ transport: the same Request/Reply envelopes over ROUTER (node) and DEALER (client).

A message is the routing frames plus one serialized Request; the reply goes back on the same
route. The auth token is the Request's `auth` field (plain text: use it on trusted links, or
gRPC with TLS). Failures are Reply.error with the gRPC status numbers, and the socket stays up.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from tandem.wire import auth, errors
from tandem.wire.client import NodeClient
from tandem.wire.errors import Code, NodeError
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import MAX_MESSAGE_BYTES, NodeService

INLINE = frozenset({"ping", "info"})  # answered on the receive loop; the rest get a task each


class ZmqServer:
    """A running ZeroMQ node; `port` is the bound port (useful with port 0)."""

    def __init__(self, service: NodeService, host: str, port: int, token: str | None = None) -> None:
        self.service = service
        self.token = token
        self.ctx = zmq.asyncio.Context()
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
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._serve())

    def _reject(self, route: list[bytes], rid: int, err: NodeError) -> None:
        rep = pb.Reply(id=rid, error=err.to_proto())
        self.sock.send_multipart([*route, rep.SerializeToString()])

    async def _serve(self) -> None:
        sock, service = self.sock, self.service
        while True:
            frames = await sock.recv_multipart()
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
                rep = await service.dispatch(req)
                sock.send_multipart([*route, rep.SerializeToString()])
            else:
                task = asyncio.get_running_loop().create_task(self._answer(route, req))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _answer(self, route: list[bytes], req: pb.Request) -> None:
        rep = await self.service.dispatch(req)
        self.sock.send_multipart([*route, rep.SerializeToString()])

    async def stop(self, grace: float = 30.0) -> None:
        """Answer UNAVAILABLE to new requests, let those in flight finish and send, then close."""
        await self.service.drain(grace)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.sock.close()
        self.ctx.term()


async def serve(service: NodeService, host: str, port: int, *, token: str | None = None) -> ZmqServer:
    server = ZmqServer(service, host, port, token)
    server.start()
    return server


class ZmqClient(NodeClient):
    """One DEALER socket per session, plus one for Info/Ping; one request in flight per socket."""

    transport = "zmq"

    def __init__(self, endpoint: str, token: str | None = None) -> None:
        self.endpoint = endpoint
        self.token = token or ""
        self.ctx = zmq.asyncio.Context()
        self._socks: dict[str | None, tuple[zmq.asyncio.Socket, asyncio.Lock]] = {}
        self._ids = itertools.count(1)

    def _socket(self, session: str | None) -> tuple[zmq.asyncio.Socket, asyncio.Lock]:
        if self.ctx.closed:
            raise NodeError(Code.UNAVAILABLE, "client is closed")
        entry = self._socks.get(session)
        if entry is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if self.endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(self.endpoint)
            entry = self._socks[session] = (sock, asyncio.Lock())
        return entry

    async def _call(self, req: pb.Request, session: str | None) -> pb.Reply:
        req.id = rid = next(self._ids)
        req.auth = self.token
        data = req.SerializeToString()
        if len(data) > MAX_MESSAGE_BYTES:
            raise errors.exhausted(f"request of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        sock, lock = self._socket(session)
        async with lock:
            try:
                await sock.send(data)
                while True:
                    rep = pb.Reply.FromString(await sock.recv())
                    if rep.id == rid or rep.id == 0:
                        return rep
                    # A reply to an earlier request whose caller was cancelled: skip it.
            except BaseException:
                self._drop(session, sock)
                raise

    def _drop(self, session: str | None, sock: zmq.asyncio.Socket) -> None:
        if self._socks.get(session, (None,))[0] is sock:
            del self._socks[session]
        sock.close(linger=0)

    async def _end_session(self, session: str) -> None:
        entry = self._socks.pop(session, None)
        if entry is not None:
            async with entry[1]:
                entry[0].close(linger=0)

    async def aclose(self) -> None:
        for sock, _ in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()
        self.ctx.term()
