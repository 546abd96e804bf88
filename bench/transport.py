"""Round-trip time of the node transports on loopback, beside a bare echo with the same library.

    python bench/transport.py [--n 3000] [--json out.json]

Each server runs in its own process (a target node on a tiny random model, started with its CLI, and
a bare echo server), so client and server do not share a GIL. Rows: the bare echo (the floor),
Ping and a minimal Verify (one appended token, one draft token) through tandem's client. For
Verify: the node's compute time (forward + acceptance, in its worker thread), the node's overhead
(handling time beyond compute: the hop to the worker thread and back, checks, encoding), and the
round trip less compute, which is what the floor compares with. Figures depend on machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import uvloop  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402

ECHO_METHOD = "/bench.Echo/Stream"


# --- bare echo servers (run in a child process) --------------------------------------------------


async def _grpc_echo_server() -> None:
    async def stream(request_iterator, context):
        while True:
            data = await context.read()
            if data is grpc.aio.EOF:
                return
            await context.write(data)

    handlers = {"Stream": grpc.stream_stream_rpc_method_handler(stream)}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    server.add_registered_method_handlers("bench.Echo", handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _zmq_echo_server() -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(port, flush=True)
    while True:
        frames = await sock.recv_multipart()
        sock.send_multipart(frames)


# --- clients --------------------------------------------------------------------------------------


def _stats(samples_ns: list[int]) -> tuple[float, float]:
    s = sorted(samples_ns)
    return statistics.median(s) / 1e3, s[min(len(s) - 1, int(0.99 * len(s)))] / 1e3


async def _time(fn, n: int, warmup: int = 200) -> list[int]:
    for _ in range(warmup):
        await fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await fn()
        out.append(time.perf_counter_ns() - t0)
    return out


async def _bench_grpc_echo(port: int, n: int) -> list[int]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_stream(ECHO_METHOD, _registered_method=True)()
        payload = b"x" * 16

        async def once() -> None:
            await call.write(payload)
            await call.read()

        samples = await _time(once, n)
        call.cancel()
        return samples


async def _bench_zmq_echo(port: int, n: int) -> list[int]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    payload = b"x" * 16

    async def once() -> None:
        await sock.send(payload)
        await sock.recv()

    samples = await _time(once, n)
    sock.close(linger=0)
    ctx.term()
    return samples


async def _bench_node(url: str, n: int) -> dict[str, tuple[list[int], list[int], list[int]]]:
    from tandem.wire.client import connect

    node = await connect(url)
    await node.prefill("bench", 0, [2, 3, 4, 5])
    compute: list[int] = []
    server: list[int] = []

    async def ping() -> None:
        await node.ping(b"x" * 16)

    async def verify() -> None:
        rep = await node.verify("bench", 4, [6], [7])
        compute.append(rep.timing.compute_ns)
        server.append(rep.timing.server_ns)

    out = {"Ping": (await _time(ping, n), [], [])}
    samples = await _time(verify, n)
    out["Verify k=1"] = (samples, compute[-n:], server[-n:])
    await node.close("bench")
    await node.aclose()
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


def run(n: int) -> list[dict]:
    from tests.wire_helpers import write_tiny_llama

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf")
        for transport in ("grpc", "zmq"):
            echo, eport = _spawn([__file__, "--echo-server", transport])
            node, nport = _spawn_node(model, transport)
            try:
                bench_echo = _bench_grpc_echo if transport == "grpc" else _bench_zmq_echo
                floor = uvloop.run(bench_echo(eport, n))
                results = uvloop.run(_bench_node(f"{transport}://127.0.0.1:{nport}", n))
            finally:
                for p in (echo, node):
                    p.terminate()
                    p.wait(30)
            fmed, fp99 = _stats(floor)
            label = "gRPC stream" if transport == "grpc" else "ZeroMQ"
            rows.append({"transport": label, "call": "bare echo", "median_us": fmed, "p99_us": fp99})
            for call, (samples, compute, server) in results.items():
                med, p99 = _stats(samples)
                row = {"transport": label, "call": call, "median_us": med, "p99_us": p99, "x_floor": med / fmed}
                if compute:
                    cmed = statistics.median(compute) / 1e3
                    net = [s - c for s, c in zip(samples, compute, strict=True)]
                    nmed, np99 = _stats(net)
                    hop = statistics.median(s - c for s, c in zip(server, compute, strict=True)) / 1e3
                    row |= {"compute_us": cmed, "node_overhead_us": hop, "minus_compute_us": nmed,
                            "minus_compute_p99_us": np99, "x_floor_minus_compute": nmed / fmed}  # fmt: skip
                rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| transport | call | median µs | p99 µs | × floor | node compute µs | node overhead µs "
        "| median − compute µs | × floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def f(key: str, fmt: str = "{:.0f}", r: dict = r) -> str:
            return fmt.format(r[key]) if key in r else ""

        lines.append(
            f"| {r['transport']} | {r['call']} | {f('median_us')} | {f('p99_us')} | {f('x_floor', '{:.2f}')} "
            f"| {f('compute_us')} | {f('node_overhead_us')} | {f('minus_compute_us')} "
            f"| {f('x_floor_minus_compute', '{:.2f}')} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000, help="timed round trips per row")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--echo-server", choices=("grpc", "zmq"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.echo_server:
        uvloop.run(_grpc_echo_server() if args.echo_server == "grpc" else _zmq_echo_server())
        return 0
    rows = run(args.n)
    print(f"loopback, n={args.n}, cpus={os.cpu_count()}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
