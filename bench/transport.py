"""Round-trip time of the node transports on loopback, beside a bare echo with the same library.

    python bench/transport.py [--n 3000] [--json out.json]

Each server runs in its own process (a target node on a tiny random model, started with its CLI, and
two bare echo servers), so client and server do not share a GIL. Rows per transport:
- bare echo: the floor, using the library as the transport does (ZeroMQ: plain sockets polled through
  their FD on the event loop, as tandem's; not zmq.asyncio, which costs ~25 µs a side more);
- echo after a worker hop: the echo server replies once a worker thread has spun for the node's median
  Verify compute, as a node waits for its forward (never run on the event loop). Less the spin, this is
  what the library plus the hop to a thread and back cost when the server is busy that long;
- Ping and a minimal Verify (one appended token, one draft token) through tandem's client. For Verify:
  the node's compute time (forward + acceptance, in its worker thread), the node's overhead (handling
  time beyond compute: the hop to the worker thread and back, checks, encoding), and the round trip
  less compute, which is what the floors compare with.
Each row is timed twice: back-to-back (its own tight loop: the servers never idle) and interleaved
(one call of each row in turn: every server idles between its calls, as a target node does while the
draft works; load from elsewhere on the machine also falls on all rows alike). On a VM an idle thread
wakes more slowly, so the interleaved floor is the higher one. Figures depend on machine load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import uvloop  # noqa: E402
import zmq  # noqa: E402

ECHO_METHOD = "/bench.Echo/Stream"
WARMUP = 200
MODES = ("back-to-back", "interleaved")


# --- bare echo servers (run in a child process) --------------------------------------------------


def _spin(ns: int) -> None:
    end = time.perf_counter_ns() + ns
    while time.perf_counter_ns() < end:
        pass


def _hold(delay_ns: int) -> Callable[[], Awaitable[None]] | None:
    """With a delay: wait for a worker thread to spin that long, as a node waits for its forward."""
    if not delay_ns:
        return None
    from tandem.wire.service import Worker

    worker = Worker("echo-worker")
    return lambda: worker.run(_spin, delay_ns)


async def _grpc_echo_server(delay_ns: int) -> None:
    hold = _hold(delay_ns)

    async def stream(request_iterator, context):
        while True:
            data = await context.read()
            if data is grpc.aio.EOF:
                return
            if hold is not None:
                await hold()
            await context.write(data)

    handlers = {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    server.add_registered_method_handlers("bench.Echo", handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _zmq_echo_server(delay_ns: int) -> None:
    hold = _hold(delay_ns)
    loop = asyncio.get_running_loop()
    sock = zmq.Context().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    tasks: set[asyncio.Task] = set()

    async def answer(frames: list[bytes]) -> None:
        await hold()
        sock.send_multipart(frames, zmq.NOBLOCK)
        receive()

    def receive() -> None:
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(zmq.NOBLOCK)
            if hold is None:
                sock.send_multipart(frames, zmq.NOBLOCK)
            else:
                task = loop.create_task(answer(frames))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    loop.add_reader(sock.getsockopt(zmq.FD), receive)
    receive()
    print(port, flush=True)
    await asyncio.Event().wait()


# --- clients --------------------------------------------------------------------------------------


def _stats(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    return statistics.median(s) / 1e3, s[min(len(s) - 1, int(0.99 * len(s)))] / 1e3


async def _grpc_echo(port: int) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = ch.stream_stream(ECHO_METHOD, _registered_method=True)()
    payload = b"x" * 16

    async def once() -> None:
        await call.write(payload)
        await call.read()

    async def close() -> None:
        call.cancel()
        await ch.close()

    return once, close


async def _zmq_echo(port: int) -> tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """A DEALER driven as tandem's client drives it (zmq_transport.Dealer)."""
    from tandem.wire.zmq_transport import Dealer

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    dealer = Dealer(sock, asyncio.get_running_loop())
    payload = b"x" * 16

    async def once() -> None:
        await dealer.send(payload)
        await dealer.recv()

    async def close() -> None:
        dealer.close()
        ctx.term()

    return once, close


async def _timed(calls: dict[str, Callable[[], Awaitable[None]]], n: int) -> dict[str, list[int]]:
    """Each call in turn, n rounds after a warm-up; round-trip ns per call."""
    out: dict[str, list[int]] = {name: [] for name in calls}
    for i in range(WARMUP + n):
        for name, fn in calls.items():
            t0 = time.perf_counter_ns()
            await fn()
            if i >= WARMUP:
                out[name].append(time.perf_counter_ns() - t0)
    return out


async def _bench(transport: str, eport: int, node_url: str, n: int, spawn_delayed) -> dict:
    from tandem.wire.client import connect

    node = await connect(node_url)
    await node.prefill("bench", 0, [2, 3, 4, 5])
    compute: list[int] = []
    server: list[int] = []

    async def ping() -> None:
        await node.ping(b"x" * 16)

    async def verify() -> None:
        rep = await node.verify("bench", 4, [6], [7])
        compute.append(rep.timing.compute_ns)
        server.append(rep.timing.server_ns)

    await _timed({"Verify k=1": verify}, 0)  # warm up, and learn how long the node computes
    delay_ns = int(statistics.median(compute))
    delayed, dport = await asyncio.to_thread(spawn_delayed, delay_ns)
    client = _grpc_echo if transport == "grpc" else _zmq_echo
    echo, echo_close = await client(eport)
    held, held_close = await client(dport)
    calls = {"bare echo": echo, "echo after a worker hop": held, "Ping": ping, "Verify k=1": verify}
    out: dict = {"delay_ns": delay_ns}
    try:
        for mode in MODES:
            compute.clear()
            server.clear()
            if mode == "back-to-back":
                res = {name: (await _timed({name: fn}, n))[name] for name, fn in calls.items()}
            else:
                res = await _timed(calls, n)
            res["Verify k=1 compute"] = compute[-n:]
            res["Verify k=1 server"] = server[-n:]
            out[mode] = res
    finally:
        await echo_close()
        await held_close()
        await node.close("bench")
        await node.aclose()
        delayed.terminate()
        delayed.wait(30)
    return out


def _spawn(args: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    port = int(proc.stdout.readline())
    return proc, port


def _spawn_node(model: Path, transport: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "target_node.cli", "--model", str(model), "--listen", "127.0.0.1:0",
         "--transport", transport, "--threads", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    for line in proc.stderr:
        if "serving" in line:
            return proc, int(line.split("address=127.0.0.1:")[1].split()[0])
    raise RuntimeError(f"target-node did not start (exit {proc.wait()})")


def _rows(label: str, mode: str, res: dict[str, list[int]], delay: int) -> list[dict]:
    fmed, fp99 = _stats(res["bare echo"])
    rows = [{"transport": label, "timing": mode, "call": "bare echo", "median_us": fmed, "p99_us": fp99}]
    hmed, hp99 = _stats([s - delay for s in res["echo after a worker hop"]])
    rows.append({"transport": label, "timing": mode, "call": "echo after a worker hop", "delay_us": delay / 1e3,
                 "minus_compute_us": hmed, "minus_compute_p99_us": hp99,
                 "x_floor_minus_compute": hmed / fmed})  # fmt: skip
    med, p99 = _stats(res["Ping"])
    rows.append({"transport": label, "timing": mode, "call": "Ping", "median_us": med, "p99_us": p99,
                 "x_floor": med / fmed})  # fmt: skip
    samples, compute, server = res["Verify k=1"], res["Verify k=1 compute"], res["Verify k=1 server"]
    med, p99 = _stats(samples)
    nmed, np99 = _stats([s - c for s, c in zip(samples, compute, strict=True)])
    rows.append({
        "transport": label, "timing": mode, "call": "Verify k=1", "median_us": med, "p99_us": p99,
        "x_floor": med / fmed, "compute_us": statistics.median(compute) / 1e3,
        "node_overhead_us": statistics.median(s - c for s, c in zip(server, compute, strict=True)) / 1e3,
        "minus_compute_us": nmed, "minus_compute_p99_us": np99, "x_floor_minus_compute": nmed / fmed,
    })  # fmt: skip
    return rows


def run(n: int) -> list[dict]:
    from tests.wire_helpers import write_tiny_llama

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf")
        for transport in ("grpc", "zmq"):
            echo, eport = _spawn([__file__, "--echo-server", transport])
            node, nport = _spawn_node(model, transport)

            def spawn_delayed(delay_ns: int, transport: str = transport) -> tuple[subprocess.Popen, int]:
                return _spawn([__file__, "--echo-server", transport, "--delay-ns", str(delay_ns)])

            try:
                res = uvloop.run(_bench(transport, eport, f"{transport}://127.0.0.1:{nport}", n, spawn_delayed))
            finally:
                for p in (echo, node):
                    p.terminate()
                    p.wait(30)
            label = "gRPC stream" if transport == "grpc" else "ZeroMQ"
            delay = res["delay_ns"]
            for mode in MODES:
                rows += _rows(label, mode, res[mode], delay)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| transport | timing | call | median µs | p99 µs | × floor | node compute µs | node overhead µs "
        "| median − compute µs | p99 − compute µs | × floor |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def f(key: str, fmt: str = "{:.0f}", r: dict = r) -> str:
            return fmt.format(r[key]) if key in r else ""

        compute = f("compute_us") or (f"(spin {f('delay_us')})" if "delay_us" in r else "")
        lines.append(
            f"| {r['transport']} | {r['timing']} | {r['call']} | {f('median_us')} | {f('p99_us')} "
            f"| {f('x_floor', '{:.2f}')} | {compute} | {f('node_overhead_us')} | {f('minus_compute_us')} "
            f"| {f('minus_compute_p99_us')} "
            f"| {f('x_floor_minus_compute', '{:.2f}')} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="timed round trips per row")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--echo-server", choices=("grpc", "zmq"), help=argparse.SUPPRESS)
    p.add_argument("--delay-ns", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    if args.echo_server:
        server = _grpc_echo_server if args.echo_server == "grpc" else _zmq_echo_server
        uvloop.run(server(args.delay_ns))
        return 0
    rows = run(args.n)
    print(f"loopback, n={args.n}, cpus={os.cpu_count()}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
