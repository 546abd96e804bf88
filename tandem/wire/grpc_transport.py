"""gRPC transport (grpc.aio): unary calls, one bidirectional Session stream per session, health, reflection.

Handlers take raw bytes and parse them here, so malformed input is INVALID_ARGUMENT (gRPC's own
deserializer would make it INTERNAL) and replies are serialized once, without wrapper objects.
Errors on the stream travel as Reply.error and keep the stream open; unary calls get the status.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.wire import auth, errors
from tandem.wire.client import NodeClient
from tandem.wire.errors import Code, NodeError
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import MAX_MESSAGE_BYTES, NodeService

SERVICE = "tandem.v1.Node"
SESSION_METHOD = f"/{SERVICE}/Session"
UNARY = {  # method -> (handler name, request type, reply type)
    "Info": ("info", pb.InfoRequest, pb.InfoReply),
    "Ping": ("ping", pb.PingRequest, pb.PingReply),
    "Prefill": ("prefill", pb.PrefillRequest, pb.PrefillReply),
    "Propose": ("propose", pb.ProposeRequest, pb.ProposeReply),
    "Verify": ("verify", pb.VerifyRequest, pb.VerifyReply),
    "Close": ("close", pb.CloseRequest, pb.CloseReply),
}
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _authorized(context: grpc.aio.ServicerContext, token: str | None) -> bool:
    if token is None:
        return True
    for key, value in context.invocation_metadata() or ():
        if key == auth.METADATA_KEY:
            given = value.removeprefix("Bearer ") if isinstance(value, str) else value
            return auth.token_matches(token, given)
    return False


def _unary_handler(service: NodeService, token: str | None, kind: str, req_type: Any, rep_type: Any):
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        if not _authorized(context, token):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")
        try:
            req = req_type.FromString(data)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed {req_type.__name__}: {exc}")
        out = rep_type()
        try:
            await service.call(kind, req, out)
        except NodeError as exc:
            await context.abort(exc.code, exc.message)
        return out.SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handle)


def _stream_handler(service: NodeService, token: str | None):
    async def handle(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        if not _authorized(context, token):
            # Take the first request before refusing: a client write racing an early abort
            # would otherwise fail as INTERNAL instead of reporting UNAUTHENTICATED.
            await context.read()
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")
        while True:
            data = await context.read()
            if data is grpc.aio.EOF:
                return
            try:
                req = pb.Request.FromString(data)
            except DecodeError as exc:
                rep = pb.Reply(error=errors.invalid(f"malformed Request: {exc}").to_proto())
            else:
                rep = await service.dispatch(req)
            await context.write(rep.SerializeToString())

    return grpc.stream_stream_rpc_method_handler(handle)


class GrpcServer:
    """A running gRPC node; `port` is the bound port (useful with port 0)."""

    def __init__(self, server: grpc.aio.Server, health_servicer: Any, port: int, service: NodeService) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.service = service

    async def stop(self, grace: float = 30.0) -> None:
        """Stop taking requests, let those in flight finish, then close (idle streams are cancelled)."""
        await self.health.enter_graceful_shutdown()
        await self.service.drain(grace)
        await self.server.stop(1.0)


async def serve(
    service: NodeService,
    host: str,
    port: int,
    *,
    token: str | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
) -> GrpcServer:
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    handlers = {m: _unary_handler(service, token, *spec) for m, spec in UNARY.items()}
    handlers["Session"] = _stream_handler(service, token)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if tls_cert is not None:
        creds = grpc.ssl_server_credentials([(Path(tls_key).read_bytes(), Path(tls_cert).read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return GrpcServer(server, health_servicer, bound, service)


def _error(exc: grpc.aio.AioRpcError) -> NodeError:
    return NodeError(exc.code(), exc.details() or exc.code().name)


class _Stream:
    """One Session stream, used by one request at a time (the lock keeps replies in order)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.lock = asyncio.Lock()


class GrpcClient(NodeClient):
    """Requests go over a Session stream: one per session, plus one for Info/Ping."""

    transport = "grpc"

    def __init__(self, target: str, token: str | None = None, tls_ca: str | Path | None = None) -> None:
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.target = target
        self.metadata = ((auth.METADATA_KEY, auth.bearer(token)),) if token else None
        self._open = self.channel.stream_stream(SESSION_METHOD, _registered_method=True)
        self._streams: dict[str | None, _Stream] = {}
        self._ids = itertools.count(1)

    async def _call(self, req: pb.Request, session: str | None) -> pb.Reply:
        st = self._streams.get(session)
        if st is None:
            st = self._streams[session] = _Stream(self._open(metadata=self.metadata))
        req.id = rid = next(self._ids)
        data = req.SerializeToString()
        if len(data) > MAX_MESSAGE_BYTES:
            raise errors.exhausted(f"request of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        async with st.lock:
            try:
                await st.call.write(data)
                while True:
                    raw = await st.call.read()
                    if raw is grpc.aio.EOF:
                        raise NodeError(await st.call.code(), await st.call.details() or "stream ended")
                    rep = pb.Reply.FromString(raw)
                    if rep.id == rid or rep.id == 0:
                        return rep
                    # A reply to an earlier request whose caller was cancelled: skip it.
            except grpc.aio.AioRpcError as exc:
                self._drop(session, st)
                raise _error(exc) from None
            except NodeError:
                self._drop(session, st)
                raise
            except asyncio.InvalidStateError:  # the server already ended this stream (e.g. it restarted)
                self._drop(session, st)
                raise NodeError(Code.UNAVAILABLE, "the node closed the session stream") from None
            except BaseException:
                self._drop(session, st)  # cancelled mid-request: the stream may hold a stray reply
                raise

    def _drop(self, session: str | None, st: _Stream) -> None:
        if self._streams.get(session) is st:
            del self._streams[session]
        st.call.cancel()

    async def _end_session(self, session: str) -> None:
        st = self._streams.pop(session, None)
        if st is not None:
            async with st.lock:
                await st.call.done_writing()
                st.call.cancel()

    async def unary(self, method: str, req: Any) -> Any:
        """A plain unary call (for tools and tests); NodeError on failure."""
        _, _, rep_type = UNARY[method]
        fn: Callable[..., Awaitable[Any]] = self.channel.unary_unary(
            f"/{SERVICE}/{method}",
            request_serializer=type(req).SerializeToString,
            response_deserializer=rep_type.FromString,
            _registered_method=True,
        )
        try:
            return await fn(req, metadata=self.metadata)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc) from None

    async def aclose(self) -> None:
        for st in self._streams.values():
            st.call.cancel()
        self._streams.clear()
        await self.channel.close()
