"""The one client interface the coordinator uses, whatever the transport.

    node = await connect("grpc://10.0.0.2:50051", token=...)   # or zmq://..., or host:port (gRPC)
    rep = await node.verify("s1", base_len, appended, draft_tokens, draft_dists, sampling)
    rep.accepted, rep.next_token, rep.timing.compute_ns

Every method returns the decoded reply message (with the node's Timing) or raises NodeError with
the node's status code; FAILED_PRECONDITION and NOT_FOUND on a session mean "resend the context".
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tandem.sampling import SamplingParams
from tandem.wire import auth
from tandem.wire.errors import Code, NodeError
from tandem.wire.gen import tandem_pb2 as pb

DEFAULT_PORT = 50051

Dists = Iterable[pb.TokenDist] | Iterable[tuple[Sequence[int], Sequence[float]]]


def sampling_proto(sampling: SamplingParams | pb.Sampling | None) -> pb.Sampling | None:
    if sampling is None or isinstance(sampling, pb.Sampling):
        return sampling
    msg = pb.Sampling(temperature=sampling.temperature, top_k=sampling.top_k, min_p=sampling.min_p)
    if sampling.top_p != 1.0:
        msg.top_p = sampling.top_p
    if sampling.seed is not None:
        msg.seed = sampling.seed
    return msg


class NodeClient:
    """Builds the envelopes; a transport subclass implements `_call` (and `aclose`)."""

    transport = ""
    timeout: float | None = None  # seconds per request; None waits as long as the node takes

    async def _call(self, req: pb.Request, session: str | None) -> pb.Reply:
        raise NotImplementedError

    async def _end_session(self, session: str) -> None:
        """Release per-session transport state (a stream or socket) after Close."""

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> NodeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(self, req: pb.Request, session: str | None = None) -> Any:
        """Send an envelope; the reply body, or NodeError."""
        kind = req.WhichOneof("body")
        if self.timeout is None:
            rep = await self._call(req, session)
        else:
            try:
                async with asyncio.timeout(self.timeout):
                    rep = await self._call(req, session)
            except TimeoutError:
                raise NodeError(Code.DEADLINE_EXCEEDED, f"no {kind} reply within {self.timeout} s") from None
        got = rep.WhichOneof("body")
        if got == "error":
            raise NodeError.from_proto(rep.error)
        if got != kind:
            raise NodeError(Code.INTERNAL, f"expected a {kind} reply, got {got}")
        return getattr(rep, kind)

    async def info(self) -> pb.InfoReply:
        req = pb.Request()
        req.info.SetInParent()
        return await self.request(req)

    async def ping(self, payload: bytes = b"") -> pb.PingReply:
        req = pb.Request()
        req.ping.payload = payload
        return await self.request(req)

    async def prefill(self, session: str, base_len: int, tokens: Sequence[int]) -> pb.PrefillReply:
        req = pb.Request()
        m = req.prefill
        m.session = session
        m.commit.base_len = base_len
        m.commit.tokens.extend(tokens)
        return await self.request(req, session)

    async def propose(
        self,
        session: str,
        base_len: int,
        tokens: Sequence[int],
        k: int,
        sampling: SamplingParams | pb.Sampling | None = None,
        draft_top_k: int = 0,
        guess: bool = False,
    ) -> pb.ProposeReply:
        req = pb.Request()
        m = req.propose
        m.session = session
        m.commit.base_len = base_len
        m.commit.tokens.extend(tokens)
        m.k = k
        m.draft_top_k = draft_top_k
        m.guess = guess
        s = sampling_proto(sampling)
        if s is not None:
            m.sampling.CopyFrom(s)
        return await self.request(req, session)

    async def verify(
        self,
        session: str,
        base_len: int,
        tokens: Sequence[int],
        draft_tokens: Sequence[int],
        draft_dists: Dists | None = None,
        sampling: SamplingParams | pb.Sampling | None = None,
    ) -> pb.VerifyReply:
        req = pb.Request()
        m = req.verify
        m.session = session
        m.commit.base_len = base_len
        m.commit.tokens.extend(tokens)
        m.draft_tokens.extend(draft_tokens)
        for d in draft_dists or ():
            if isinstance(d, pb.TokenDist):
                m.draft_dists.append(d)
            else:
                ids, probs = d
                m.draft_dists.add(ids=list(ids), probs=list(probs))
        s = sampling_proto(sampling)
        if s is not None:
            m.sampling.CopyFrom(s)
        return await self.request(req, session)

    async def close(self, session: str) -> pb.CloseReply:
        req = pb.Request()
        req.close.session = session
        try:
            return await self.request(req, session)
        finally:
            await self._end_session(session)


def parse_url(url: str) -> tuple[str, str, int]:
    """'grpc://h:p' | 'zmq://h:p' | 'h:p' -> (scheme, host, port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "grpc", url
    if scheme not in ("grpc", "zmq"):
        raise ValueError(f"unsupported scheme {scheme!r} in {url!r} (use grpc:// or zmq://)")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep:
        host, port = rest.rstrip("/"), str(DEFAULT_PORT)
    if not host:
        raise ValueError(f"no host in {url!r}")
    try:
        return scheme, host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None


async def connect(
    url: str, token: str | None = None, tls_ca: str | Path | None = None, timeout: float | None = None
) -> NodeClient:
    """A client for the node at url; nothing is sent until the first request."""
    scheme, host, port = parse_url(url)
    if token:
        auth.check_token(token)
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    client: NodeClient
    if scheme == "zmq":
        if tls_ca is not None:
            raise ValueError("TLS is offered on gRPC only; use grpc:// with tls_ca")
        from tandem.wire.zmq_transport import ZmqClient

        client = ZmqClient(f"tcp://{hostport}", token=token)
    else:
        from tandem.wire.grpc_transport import GrpcClient

        client = GrpcClient(hostport, token=token, tls_ca=tls_ca)
    client.timeout = timeout
    return client
