"""Draft and target nodes behind real servers on loopback, over both transports.

Sessions and rollback, greedy losslessness, seeds, eviction, limits, auth, TLS, health, draining
and the CLIs. The statistical test of sampling is tests/test_sampling_exact.py; malformed input
is tests/test_wire_fuzz.py.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from draft_node.service import DraftService
from tandem.engine.runtime import Engine
from tandem.sampling import SamplingParams
from tandem.wire import auth
from tandem.wire.client import connect, parse_url
from tandem.wire.errors import Code, NodeError
from tandem.wire.gen import tandem_pb2 as pb
from tandem.wire.service import Worker
from target_node.service import TargetService
from tests.wire_helpers import TINY_VOCAB, NodeThread, running, tiny_engine, write_tiny_llama

TRANSPORTS = ("grpc", "zmq")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Engine, Engine]:
    d = tmp_path_factory.mktemp("models")
    target = tiny_engine(write_tiny_llama(d / "target.gguf", seed=1, scale=3.0))
    draft = tiny_engine(write_tiny_llama(d / "draft.gguf", seed=2, n_layers=1, scale=3.0))
    return target, draft


def greedy_reference(engine: Engine, prompt: list[int], n: int) -> list[int]:
    seq = engine.new_sequence()
    logits = seq.forward(prompt, all_logits=False)
    out = []
    for _ in range(n):
        tok = int(logits[-1].argmax())
        out.append(tok)
        logits = seq.forward([tok], all_logits=False)
    return out


async def raises(code: grpc.StatusCode, awaitable: Awaitable[object]) -> NodeError:
    try:
        await awaitable
    except NodeError as exc:
        assert exc.code == code, exc
        return exc
    raise AssertionError(f"expected {code.name}")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_random_commits_and_rollbacks_match_a_fresh_prefill(models: tuple[Engine, Engine], transport: str) -> None:
    target, draft = models
    tsvc, dsvc = TargetService(target), DraftService(draft)
    rng = random.Random(7)
    with running(tsvc, transport) as tn, running(dsvc, transport) as dn:

        async def drive() -> tuple[list[int], list[int]]:
            t, d = await connect(tn.url), await connect(dn.url)
            tctx = [rng.randrange(TINY_VOCAB) for _ in range(5)]  # what each node's cache must hold
            dctx = list(tctx)
            assert (await t.prefill("s", 0, tctx)).cache_len == 5
            assert (await d.prefill("s", 0, dctx)).cache_len == 5
            for _ in range(40):
                base = rng.randint(0, len(tctx))
                appended = [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(0 if base else 1, 3))]
                op = rng.choice(("prefill", "verify", "verify", "propose", "beyond"))
                if op == "beyond":  # refused, and the session is left as it was
                    await raises(Code.FAILED_PRECONDITION, t.verify("s", len(tctx) + 1, appended, [1]))
                    await raises(Code.FAILED_PRECONDITION, d.propose("s", len(dctx) + 1, appended, 2))
                elif op == "prefill":
                    if not appended:
                        appended = [3]
                    tctx = tctx[:base] + appended
                    assert (await t.prefill("s", base, appended)).cache_len == len(tctx)
                elif op == "verify":
                    draft_tokens = [rng.randrange(TINY_VOCAB) for _ in range(rng.randint(0, 4))]
                    rep = await t.verify("s", base, appended, draft_tokens)
                    tctx = tctx[:base] + appended + draft_tokens[: rep.accepted]
                    assert rep.cache_len == len(tctx) and rep.committed_len == len(tctx) + 1
                else:
                    base = min(base, len(dctx))
                    k = rng.randint(1, 4)
                    rep = await d.propose("s", base, appended, k)
                    dctx = dctx[:base] + appended + list(rep.tokens[:-1])
                    assert len(rep.tokens) == k and rep.cache_len == len(dctx)
            await t.aclose()
            await d.aclose()
            return tctx, dctx

        tctx, dctx = asyncio.run(drive())
    for svc, ctx in ((tsvc, tctx), (dsvc, dctx)):
        seq = svc.sessions["s"].seq
        assert seq.tokens == ctx
        fresh = svc.engine.new_sequence()
        want = fresh.forward([*ctx, 5])
        got = seq.forward([5])
        torch.testing.assert_close(got, want[-1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("same_model", [False, True], ids=["other-draft", "same-model-draft"])
def test_greedy_speculation_equals_target_argmax_decoding(
    models: tuple[Engine, Engine], transport: str, same_model: bool
) -> None:
    target, draft = models
    prompt, n = [4, 9, 17, 2], 40
    want = greedy_reference(target, prompt, n)
    rng = random.Random(3)
    with (
        running(TargetService(target), transport) as tn,
        running(DraftService(target if same_model else draft), transport) as dn,
    ):

        async def decode() -> tuple[list[int], int]:
            t, d = await connect(tn.url), await connect(dn.url)
            ctx = list(prompt)
            await t.prefill("g", 0, ctx[:-1])
            t_held, d_held, accepted = len(ctx) - 1, 0, 0
            while len(ctx) < len(prompt) + n:
                k = rng.randint(1, 5)
                prop = await d.propose("g", d_held, ctx[d_held:], k)
                ver = await t.verify("g", t_held, ctx[t_held:], list(prop.tokens))
                accepted += ver.accepted
                new = [*prop.tokens[: ver.accepted], ver.next_token]
                d_held = min(prop.cache_len, len(ctx) + ver.accepted)
                ctx += new
                t_held = ver.cache_len
                assert ver.committed_len == len(ctx)
            await t.aclose()
            await d.aclose()
            return ctx[len(prompt) : len(prompt) + n], accepted

        got, accepted = asyncio.run(decode())
    assert got == want
    if same_model:
        assert accepted >= n - 10  # the draft is the target: everything but the bonus tokens is accepted


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_seeded_sampling_is_deterministic_and_draft_dists_are_exact(
    models: tuple[Engine, Engine], transport: str
) -> None:
    target, draft = models
    sp = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=1234)
    with running(TargetService(target), transport) as tn, running(DraftService(draft), transport) as dn:

        async def run(sid: str) -> list[tuple[list[int], int, int]]:
            t, d = await connect(tn.url), await connect(dn.url)
            ctx, out = [5, 6, 7], []
            await t.prefill(sid, 0, ctx[:-1])
            for _ in range(6):
                prop = await d.propose(sid, 0, ctx, 3, sp, draft_top_k=6)
                assert len(prop.dists) == 3
                for tok, dist in zip(prop.tokens, prop.dists, strict=True):
                    assert len(dist.ids) == 6 and tok in dist.ids
                    assert abs(sum(dist.probs) - 1) < 1e-5 and list(dist.probs) == sorted(dist.probs, reverse=True)
                ver = await t.verify(sid, len(ctx) - 1, ctx[-1:], list(prop.tokens), prop.dists, sp)
                ctx += [*prop.tokens[: ver.accepted], ver.next_token]
                out.append((list(prop.tokens), ver.accepted, ver.next_token))
            await t.aclose()
            await d.aclose()
            return out

        a, b = asyncio.run(run("a")), asyncio.run(run("b"))
    assert a == b


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_evicted_and_closed_sessions_and_limits(models: tuple[Engine, Engine], transport: str) -> None:
    target, _ = models
    svc = TargetService(target, max_sessions=2, max_context=32, max_k=4)
    with running(svc, transport) as tn:

        async def go() -> None:
            t = await connect(tn.url)
            info = await t.info()
            assert (info.role, info.vocab_size, info.context_length, info.max_sessions) == ("target", TINY_VOCAB, 32, 2)
            assert info.tokenizer_fingerprint == target.tokenizer.fingerprint and info.protocol == "tandem.v1"
            await raises(Code.NOT_FOUND, t.verify("nope", 3, [1], []))
            for sid in ("s1", "s2"):
                await t.prefill(sid, 0, [1, 2, 3])
            await t.verify("s1", 3, [4], [])  # s1 is now the most recently used
            await t.prefill("s3", 0, [1, 2])  # evicts s2
            await raises(Code.NOT_FOUND, t.verify("s2", 3, [4], []))
            assert (await t.verify("s1", 4, [5], [])).cache_len == 5
            await t.close("s1")
            await raises(Code.NOT_FOUND, t.verify("s1", 1, [5], []))
            await raises(Code.NOT_FOUND, t.close("s1"))
            await raises(Code.RESOURCE_EXHAUSTED, t.prefill("s3", 2, list(range(31))))
            await raises(Code.INVALID_ARGUMENT, t.verify("s3", 2, [1], [1] * 5))  # k above max_k
            await raises(Code.INVALID_ARGUMENT, t.verify("s3", 2, [TINY_VOCAB], []))
            await raises(Code.INVALID_ARGUMENT, t.verify("s3", -1, [1], []))
            await raises(Code.INVALID_ARGUMENT, t.verify("s3", 2, [1], [], sampling=pb.Sampling(temperature=-1)))
            await raises(
                Code.INVALID_ARGUMENT, t.verify("s3", 2, [1], [], sampling=pb.Sampling(temperature=1, top_p=0))
            )
            bad_dist = [([1, 2], [0.5, 0.6])]
            await raises(Code.INVALID_ARGUMENT, t.verify("s3", 2, [1], [1], bad_dist, SamplingParams(1.0)))
            await raises(Code.INVALID_ARGUMENT, t.verify("s3", 2, [1], [1, 2], [([1], [1.0])], SamplingParams(1.0)))
            await raises(Code.UNIMPLEMENTED, t.propose("s3", 2, [1], 2))
            await raises(Code.INVALID_ARGUMENT, t.prefill("", 0, [1]))
            await raises(Code.INVALID_ARGUMENT, t.prefill("s4", 0, []))
            assert (await t.verify("s3", 2, [], [])).cache_len == 2  # nothing appended: the last token is recomputed
            await t.aclose()

        asyncio.run(go())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_auth_token_is_required_on_every_path(models: tuple[Engine, Engine], transport: str) -> None:
    target, _ = models
    with running(TargetService(target), transport, token="s3cret") as tn:

        async def go() -> None:
            for token in (None, "wrong", "s3cret-but-longer", ""):
                c = await connect(tn.url, token=token)
                await raises(Code.UNAUTHENTICATED, c.ping(b"x"))
                await raises(Code.UNAUTHENTICATED, c.prefill("a", 0, [1, 2]))
                await raises(Code.UNAUTHENTICATED, c.info())
                await c.aclose()
            c = await connect(tn.url, token="s3cret")
            assert (await c.ping(b"ok")).payload == b"ok"
            assert (await c.prefill("a", 0, [1, 2])).cache_len == 2
            await c.aclose()
            if transport == "grpc":  # the unary methods check the token too
                from tandem.wire.grpc_transport import GrpcClient

                for token in (None, "wrong"):
                    g = GrpcClient(f"127.0.0.1:{tn.port}", token=token)
                    await raises(Code.UNAUTHENTICATED, g.unary("Ping", pb.PingRequest(payload=b"x")))
                    await g.aclose()
                g = GrpcClient(f"127.0.0.1:{tn.port}", token="s3cret")
                assert (await g.unary("Info", pb.InfoRequest())).role == "target"
                await g.aclose()

        asyncio.run(go())


def test_grpc_health_reflection_and_ping_during_a_forward(models: tuple[Engine, Engine]) -> None:
    target, _ = models
    svc = TargetService(target)
    with running(svc, "grpc", token="tok") as tn:

        async def go() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{tn.port}") as ch:
                health = health_pb2_grpc.HealthStub(ch)
                for name in ("", "tandem.v1.Node"):  # health needs no token: probes carry none
                    rep = await health.Check(health_pb2.HealthCheckRequest(service=name))
                    assert rep.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                async for rep in refl.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                ):
                    names = {s.name for s in rep.list_services_response.service}
                    assert {"tandem.v1.Node", "grpc.health.v1.Health"} <= names
                # Occupy the worker thread as a long forward would: Ping and health still answer.
                blocked = svc.worker.submit(time.sleep, 1.5)
                c = await connect(tn.url, token="tok")
                slow = asyncio.ensure_future(c.prefill("p", 0, [1, 2, 3]))
                t0 = time.perf_counter()
                assert (await c.ping(b"x")).payload == b"x"
                await health.Check(health_pb2.HealthCheckRequest(service=""))
                assert time.perf_counter() - t0 < 0.5 and not slow.done()
                assert (await slow).cache_len == 3
                blocked.result()
                await c.aclose()

        asyncio.run(go())


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_grpc_tls(models: tuple[Engine, Engine], tmp_path: Path) -> None:
    target, _ = models
    cert, key = _self_signed(tmp_path)
    with running(TargetService(target), "grpc", token="tok", tls_cert=cert, tls_key=key) as tn:

        async def go() -> None:
            c = await connect(tn.url, token="tok", tls_ca=cert)
            assert (await c.ping(b"tls")).payload == b"tls"
            await c.aclose()
            plain = await connect(tn.url, token="tok", timeout=5)
            await raises(Code.UNAVAILABLE, plain.ping())
            await plain.aclose()

        asyncio.run(go())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_stop_drains_requests_in_flight(models: tuple[Engine, Engine], transport: str) -> None:
    target, _ = models
    svc = TargetService(target)
    node = NodeThread(svc, transport)
    try:

        async def go() -> None:
            c = await connect(node.url)
            blocked = svc.worker.submit(time.sleep, 1.0)
            inflight = asyncio.ensure_future(c.prefill("d", 0, [1, 2, 3]))
            for _ in range(200):
                if svc.inflight:
                    break
                await asyncio.sleep(0.01)
            assert svc.inflight == 1
            stopping = asyncio.get_running_loop().run_in_executor(None, node.stop)
            assert (await inflight).cache_len == 3  # answered although the stop began first
            await stopping
            blocked.result()
            await c.aclose()

        asyncio.run(go())
    finally:
        if node.thread.is_alive():
            node.stop()


@pytest.mark.parametrize(("role", "transport"), [("target", "grpc"), ("draft", "zmq")])
def test_cli_serves_logs_one_line_and_exits_0_on_sigterm(tmp_path: Path, transport: str, role: str) -> None:
    model = write_tiny_llama(tmp_path / "m.gguf")
    env = {**os.environ, auth.ENV_VAR: "tok"}
    proc = subprocess.Popen(
        [sys.executable, "-m", f"{role}_node.cli", "--model", str(model), "--listen", "127.0.0.1:0",
         "--transport", transport, "--threads", "1", "--max-sessions", "3"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert f"{role}-node serving model=tiny-llama-0" in line and f"transport={transport}" in line, line
        assert "device=cpu dtype=bfloat16" in line and "load=" in line and "auth=on" in line
        port = int(line.split("address=127.0.0.1:")[1].split()[0])

        async def go() -> None:
            c = await connect(f"{transport}://127.0.0.1:{port}", token="tok", timeout=20)
            info = await c.info()
            assert info.role == role and info.max_sessions == 3
            await c.prefill("x", 0, [1, 2])  # leave a session (and its stream or socket) open
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            await c.aclose()

        asyncio.run(go())
        rest = proc.stdout.read()
        assert "stopped" in rest and "Traceback" not in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()


def test_cli_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != auth.ENV_VAR}
    cmd = [sys.executable, "-m", "target_node.cli", "--model", str(tmp_path / "absent.gguf"), "--listen", "0.0.0.0:0"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--insecure" in res.stderr
    res = subprocess.run([*cmd, "--insecure"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "absent.gguf: no such file" in res.stderr  # past the auth check


def test_cli_refuses_a_bad_poll(tmp_path: Path) -> None:
    model = tmp_path / "absent.gguf"
    for bad in ("-1", "1001", "nan"):
        cmd = [sys.executable, "-m", "draft_node.cli", "--model", str(model), "--poll-ms", bad]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and "--poll-ms must be in [0, 1000" in res.stderr, res.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread's CPU time from /proc")
def test_worker_polls_for_its_next_item_then_sleeps(models: tuple[Engine, Engine]) -> None:
    worker = Worker("poll-test", poll_s=0.3)
    try:
        assert worker.submit(lambda: 1).result(timeout=5) == 1
        stat = Path(f"/proc/self/task/{worker._thread.native_id}/schedstat")

        def cpu_s() -> float:
            return int(stat.read_text().split()[0]) / 1e9

        c0 = cpu_s()
        time.sleep(0.15)
        assert cpu_s() - c0 > 0.01  # polling (a sleeping thread takes ~0)
        assert worker.submit(lambda: 2).result(timeout=5) == 2  # taken while it polls
        time.sleep(0.5)  # past the poll that followed it
        c1 = cpu_s()
        time.sleep(0.2)
        assert cpu_s() - c1 < 0.005  # asleep
        assert worker.submit(lambda: 3).result(timeout=5) == 3  # and woken by the next item
    finally:
        worker.shutdown()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="poll_s"):
            TargetService(models[0], poll_s=bad)


def test_auth_rules() -> None:
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("localhost")
    assert not auth.is_loopback("0.0.0.0") and not auth.is_loopback("10.1.2.3") and not auth.is_loopback("myhost")
    auth.check_listen("127.0.0.1", None, False)
    auth.check_listen("0.0.0.0", "t", False)
    auth.check_listen("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="insecure"):
        auth.check_listen("0.0.0.0", None, False)
    assert auth.token_matches("a", "a") and not auth.token_matches("a", "b") and not auth.token_matches("a", None)
    assert auth.load_token(env={auth.ENV_VAR: " t \n"}) == "t" and auth.load_token(env={}) is None
    assert auth.split_hostport("[::1]:5") == ("::1", 5) and auth.split_hostport(":7") == ("0.0.0.0", 7)
    assert parse_url("h:1") == ("grpc", "h", 1) and parse_url("zmq://[::1]:9") == ("zmq", "::1", 9)
    with pytest.raises(ValueError):
        parse_url("http://h:1")
