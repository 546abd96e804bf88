"""Bad input against running nodes, generated with hypothesis, on both transports.

Every bad request must get a clear status (never INTERNAL or UNKNOWN, never a dropped connection),
after which the node still answers Ping and a bystander session's result is unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from draft_node.service import DraftService
from tandem.wire.client import NodeClient, connect
from tandem.wire.errors import Code, NodeError, code_from_number
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import MAX_MESSAGE_BYTES
from target_node.service import TargetService
from tests.wire_helpers import TINY_VOCAB, running, tiny_engine, write_tiny_llama

TOKEN = "fuzz-token"
CLEAR = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED, Code.UNIMPLEMENTED}
WITNESS = [1, 2, 3, 4, 5]
FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)  # fmt: skip


class Harness:
    """One node, one event loop and one client for the whole module; raw senders for garbage."""

    def __init__(self, url: str, port: int, transport: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.transport, self.port = transport, port
        self.client: NodeClient = self.run(connect(url, token=TOKEN, timeout=20))
        if transport == "grpc":
            opts = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)]
            self.channel = self.run(self._channel(opts))
        else:
            self.ctx = zmq.asyncio.Context()
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.run(self.client.prefill("witness", 0, WITNESS))
        for sid in ("a", "b"):  # sessions the fuzzer's requests find (and may change)
            self.run(self.client.prefill(sid, 0, [7] * 8))
        self.role = self.run(self.client.info()).role
        self.witness = self.run(self.witness_token())

    async def _channel(self, opts: list[tuple[str, int]]) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.port}", options=opts)

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def raw(self, method: str, data: bytes, token: str | None = TOKEN) -> grpc.StatusCode:
        """Send bytes as they are; the status code the node answers with."""
        if self.transport == "grpc":
            md = (("authorization", f"Bearer {token}"),) if token is not None else None
            if method == "Session":
                call = self.channel.stream_stream("/tandem.v1.Node/Session")(metadata=md)
                try:
                    await call.write(data)
                    rep = pb.Reply.FromString(await asyncio.wait_for(call.read(), 20))
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                finally:
                    call.cancel()
                return code_from_number(rep.error.code) if rep.HasField("error") else Code.OK
            try:
                await asyncio.wait_for(self.channel.unary_unary(f"/tandem.v1.Node/{method}")(data, metadata=md), 20)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return Code.OK
        await self.sock.send(data)
        rep = pb.Reply.FromString(await asyncio.wait_for(self.sock.recv(), 20))
        return code_from_number(rep.error.code) if rep.HasField("error") else Code.OK

    async def witness_token(self) -> int:
        if self.role == "target":
            rep = await self.client.verify("witness", 5, [6], [])
            assert rep.cache_len == 6
            return rep.next_token
        rep = await self.client.propose("witness", 5, [6], 1)
        assert rep.cache_len == 6
        return rep.tokens[0]

    def healthy(self) -> None:
        """Ping answers and the bystander session gives the same token from the same state."""

        async def check() -> None:
            assert (await self.client.ping(b"alive")).payload == b"alive"
            assert await self.witness_token() == self.witness

        self.run(check())

    def close(self) -> None:
        self.run(self.client.aclose())
        if self.transport == "grpc":
            self.run(self.channel.close())
        else:
            self.sock.close()
            self.ctx.term()
        self.loop.close()


@pytest.fixture(scope="module", params=["grpc-target", "zmq-target", "grpc-draft", "zmq-draft"])
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    transport, role = request.param.split("-")
    path = write_tiny_llama(Path(tmp_path_factory.mktemp("fuzz")) / "t.gguf", seed=5)
    service = TargetService if role == "target" else DraftService
    svc = service(tiny_engine(path), max_sessions=100_000, max_context=64, max_k=8)
    with running(svc, transport, token=TOKEN) as n:
        h = Harness(n.url, n.port, transport)
        yield h
        h.close()


METHODS = ["Info", "Ping", "Prefill", "Propose", "Verify", "Close", "Session"]


@FUZZ
@given(data=st.binary(max_size=300), method=st.sampled_from(METHODS))
def test_malformed_bytes(node: Harness, data: bytes, method: str) -> None:
    if node.transport == "zmq":  # a valid token first, so the garbage reaches the parser and past it
        data = pb.Request(auth=TOKEN).SerializeToString() + data
    code = node.run(node.raw(method, data))
    assert code in CLEAR | {Code.OK, Code.UNAUTHENTICATED}, code
    node.healthy()


ints = st.integers(-(2**31), 2**31 - 1)
valid = st.integers(0, TINY_VOCAB - 1)
near = st.one_of(valid, valid, valid, st.integers(-3, TINY_VOCAB + 3), ints)  # mostly valid: get past the first check
tokens = st.one_of(st.lists(valid, max_size=6), st.lists(valid, max_size=6), st.lists(near, max_size=12))
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
ascii_token = st.characters(min_codepoint=0x21, max_codepoint=0x7E)  # what gRPC metadata can carry
sessions = st.sampled_from(["a", "a", "a", "b", "b", "", "x" * 300])


@st.composite
def commits(draw: st.DrawFn) -> pb.Commit:
    return pb.Commit(base_len=draw(st.one_of(st.integers(0, 12), st.integers(-2, 12), ints)), tokens=draw(tokens))


@st.composite
def samplings(draw: st.DrawFn) -> pb.Sampling | None:
    if draw(st.booleans()):
        return None
    unit = st.one_of(st.floats(0, 1, width=32), st.floats(0, 1, width=32), floats)
    temperature = draw(st.one_of(st.floats(0, 3, width=32), st.floats(0, 3, width=32), floats))
    s = pb.Sampling(temperature=temperature, top_k=draw(st.one_of(st.integers(0, 60), ints)), min_p=draw(unit))
    if draw(st.booleans()):
        s.top_p = draw(unit)
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, 2**64 - 1))
    return s


@st.composite
def dists(draw: st.DrawFn) -> list[pb.TokenDist]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        n = draw(st.integers(0, 5))
        probs = draw(st.one_of(st.lists(floats, min_size=n, max_size=n), st.just([1.0 / max(n, 1)] * n)))
        out.append(
            pb.TokenDist(ids=draw(st.lists(near, min_size=n, max_size=n + draw(st.integers(0, 1)))), probs=probs)
        )
    return out


@st.composite
def requests(draw: st.DrawFn) -> pb.Request:
    req = pb.Request()
    kind = draw(st.sampled_from(["prefill", "propose", "verify", "close"]))
    if kind == "close":
        req.close.session = draw(sessions)
        return req
    body = getattr(req, kind)
    body.session = draw(sessions)
    body.commit.CopyFrom(draw(commits()))
    if kind == "propose":
        body.k = draw(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(-2, 10), ints))
        body.draft_top_k = draw(st.one_of(st.integers(0, 60), st.integers(0, 60), ints))
    if kind == "verify":
        body.draft_tokens.extend(draw(st.one_of(st.lists(valid, max_size=4), tokens)))
        how = draw(st.sampled_from(["none", "matching", "random"]))
        if how == "matching":  # well-formed dists, so a sampled verify can get through
            body.draft_dists.extend(
                pb.TokenDist(ids=[t, (t + 1) % TINY_VOCAB], probs=[0.75, 0.25]) for t in body.draft_tokens
            )
        elif how == "random":
            body.draft_dists.extend(draw(dists()))
    if kind in ("propose", "verify") and (s := draw(samplings())) is not None:
        body.sampling.CopyFrom(s)
    return req


@FUZZ
@given(req=requests())
def test_bad_fields_get_clear_statuses(node: Harness, req: pb.Request) -> None:
    session = getattr(req, req.WhichOneof("body")).session
    try:
        rep = node.run(node.client.request(req, session))
    except NodeError as exc:
        assert exc.code in CLEAR, exc
    else:  # accepted: then it was a valid request, and the reply says so
        if req.HasField("verify"):
            assert 0 <= rep.accepted <= len(req.verify.draft_tokens) and 0 <= rep.next_token < TINY_VOCAB
        if req.HasField("propose"):
            assert len(rep.tokens) == req.propose.k and all(0 <= t < TINY_VOCAB for t in rep.tokens)
    node.healthy()


@FUZZ
@given(token=st.one_of(st.none(), st.text(ascii_token, max_size=40)).filter(lambda t: t != TOKEN))
def test_wrong_token_is_unauthenticated(node: Harness, token: str | None) -> None:
    req = pb.Request(auth=token or "")
    req.ping.payload = b"x"
    code = node.run(node.raw("Ping", pb.PingRequest(payload=b"x").SerializeToString(), token=token))
    if node.transport == "zmq":
        code = node.run(node.raw("Ping", req.SerializeToString()))
    assert code == Code.UNAUTHENTICATED
    node.healthy()


def test_oversized_messages_are_resource_exhausted(node: Harness) -> None:
    big = pb.PingRequest(payload=b"x" * (MAX_MESSAGE_BYTES + 10)).SerializeToString()
    if node.transport == "zmq":
        req = pb.Request(auth=TOKEN)
        req.ping.payload = b"x" * (MAX_MESSAGE_BYTES + 10)
        big = req.SerializeToString()
    assert node.run(node.raw("Ping", big)) == Code.RESOURCE_EXHAUSTED
    with pytest.raises(NodeError) as info:  # the client refuses before sending
        node.run(node.client.ping(b"x" * (MAX_MESSAGE_BYTES + 10)))
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    node.healthy()
