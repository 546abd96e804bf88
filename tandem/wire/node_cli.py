"""What `draft-node` and `target-node` share: options, start-up checks, serving until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import uvloop

from tandem.sd_notify import notify
from tandem.wire import auth

if TYPE_CHECKING:
    from tandem.wire.service import NodeService

log = logging.getLogger("tandem.node")


DEFAULT_MAX_K = 64  # tandem.wire.service.DEFAULT_MAX_K; not imported, so --help and bad options skip torch
AUTO_HEAD_ROWS = 16384  # a CPU draft's head rows under --head-rows auto
DEFAULT_POLL_MS = 20.0
MAX_POLL_MS = 1000.0


def build_parser(role: str, default_port: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{role}-node",
        description=f"Serve a GGUF model as the {role} node of speculative decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="GGUF file")
    p.add_argument("--listen", default=f"127.0.0.1:{default_port}", help="HOST:PORT (port 0: any free port)")
    p.add_argument("--transport", choices=("grpc", "zmq"), default="grpc")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or a comma list to split layers")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("float32", "bfloat16", "float16"),
        help="compute dtype (default %(default)s)",
    )
    p.add_argument(
        "--weights",
        default="quantized",
        choices=("dequantized", "quantized"),
        help="quantized: Q4_0/Q4_1/Q4_K/Q8_0 stay 4-bit packed (fast); dequantized: the reference path",
    )
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile each block at load (~20 s; CUDA: inside CUDA graphs); auto = on for CUDA, off on "
        "CPU, where it is ~1.4x faster but compiled verify blocks can round differently from decode steps in "
        "bfloat16 (greedy output may then differ from the target alone at near-ties)",
    )
    p.add_argument(
        "--override-tensor",
        "-ot",
        action="append",
        default=[],
        metavar="REGEX=DEVICE",
        help="put tensors whose name matches REGEX on DEVICE (CPU, CUDA0, cuda:1); repeatable, first match wins, "
        "as llama.cpp's; everything else goes to --device",
    )
    p.add_argument("--cpu-moe", action="store_true", help="keep all routed experts on the CPU (as llama.cpp's)")
    p.add_argument("--n-cpu-moe", type=int, default=None, metavar="N", help="keep those of blocks 0..N-1 on the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all usable cores)")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions kept; the least recently used is evicted")
    p.add_argument("--max-context", type=int, default=None, help="tokens per session (default: the model's)")
    p.add_argument("--max-k", type=int, default=DEFAULT_MAX_K, help="most draft tokens per request")
    p.add_argument(
        "--poll-ms",
        type=float,
        default=DEFAULT_POLL_MS,
        help="after each request, poll this long for the next before sleeping (0: sleep at once). A node idles "
        "while the other computes, and a CPU that went idle runs the next forward slower",
    )
    p.add_argument("--auth-token-file", default=None, help=f"shared token (else ${auth.ENV_VAR})")
    p.add_argument("--tls-cert", default=None, help="PEM certificate (gRPC only)")
    p.add_argument("--tls-key", default=None, help="PEM private key (gRPC only)")
    p.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without a token")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")
    if role == "draft":
        p.add_argument(
            "--head-rows",
            default="auto",
            help="keep only the first N rows of the output head (token ids below N; BPE ids run roughly in "
            "frequency order): a drafted token costs less, at a small cost in acceptance. 0: all rows; auto: "
            f"{AUTO_HEAD_ROWS} on CPU, all on CUDA. The demo draft on one CPU thread: 4.4 -> 2.7 ms a token, "
            "acceptance 0.665 -> 0.643",
        )
    p.add_argument("--log-level", default="INFO")
    return p


def head_rows(args: argparse.Namespace) -> int | None:
    """The draft head's rows to keep (None: all); ValueError on a bad --head-rows."""
    value = getattr(args, "head_rows", "0")
    if value == "auto":
        return None if args.device.startswith("cuda") else AUTO_HEAD_ROWS
    try:
        rows = int(value)
    except ValueError:
        raise ValueError(f"--head-rows must be a number or auto, got {value!r}") from None
    if rows < 0:
        raise ValueError(f"--head-rows must be >= 0, got {rows}")
    return rows or None


def main(role: str, default_port: int, service_class: str, argv: Sequence[str] | None = None) -> int:
    """service_class: "module:Class", imported once the options are known to be good."""
    parser = build_parser(role, default_port)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = auth.load_token(args.auth_token_file)
        host, port = auth.split_hostport(args.listen)
        auth.check_listen(host, token, args.insecure)
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if args.tls_cert is not None and args.transport != "grpc":
            raise ValueError("TLS is offered on the gRPC transport only")
        for name in ("max_sessions", "max_context", "max_k", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not 0 <= args.poll_ms <= MAX_POLL_MS:
            raise ValueError(f"--poll-ms must be in [0, {MAX_POLL_MS}], got {args.poll_ms}")
        if args.n_cpu_moe is not None and args.n_cpu_moe < 0:
            raise ValueError(f"--n-cpu-moe must be >= 0, got {args.n_cpu_moe}")
        if not Path(args.model).is_file():
            raise ValueError(f"--model {args.model}: no such file")
        rows = head_rows(args)
    except ValueError as exc:
        parser.error(str(exc))

    # After argument checks: importing torch takes a while.
    from tandem.engine.runtime import cpu_moe_rules, load_engine, parse_overrides

    rules = list(args.override_tensor)
    if args.cpu_moe:
        rules += cpu_moe_rules()
    if args.n_cpu_moe:
        rules += cpu_moe_rules(args.n_cpu_moe)
    try:
        parse_overrides(rules)  # a bad regex or device is a usage error, reported before loading
    except ValueError as exc:
        parser.error(str(exc))

    module, _, cls = service_class.partition(":")
    make_service = getattr(importlib.import_module(module), cls)

    try:
        engine = load_engine(
            args.model,
            device=args.device,
            dtype=args.dtype,
            weights=args.weights,
            threads=args.threads,
            compile=args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda")),
            override_tensor=rules,
            head_rows=rows,
        )
        service = make_service(
            engine,
            max_sessions=args.max_sessions,
            max_context=args.max_context,
            max_k=args.max_k,
            poll_s=args.poll_ms / 1e3,
        )
    except (OSError, ValueError) as exc:
        log.error("cannot load %s: %s", args.model, exc)
        return 1
    return uvloop.run(_serve(role, args, service, host, port, token))


async def _serve(
    role: str, args: argparse.Namespace, service: NodeService, host: str, port: int, token: str | None
) -> int:
    try:
        if args.transport == "grpc":
            from tandem.wire import grpc_transport

            server = await grpc_transport.serve(
                service, host, port, token=token, tls_cert=args.tls_cert, tls_key=args.tls_key
            )
        else:
            from tandem.wire import zmq_transport

            server = await zmq_transport.serve(service, host, port, token=token)
    except (OSError, RuntimeError) as exc:  # port taken, bad address, unreadable certificate
        log.error("cannot listen on %s with %s: %s", args.listen, args.transport, exc)
        service.shutdown()
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    eng = service.engine
    cfg = eng.config
    kv_mib = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * service.max_context * eng.dtype.itemsize / 2**20
    shown_host = f"[{host}]" if ":" in host else host
    log.info(
        "%s-node serving model=%s arch=%s vocab=%d device=%s dtype=%s weights=%s transport=%s address=%s:%d "
        "load=%.2fs max_sessions=%d max_context=%d kv=%.1fMiB/session auth=%s tls=%s",
        role, eng.name, cfg.arch, cfg.vocab_size, ",".join(map(str, eng.devices)),
        str(eng.dtype).removeprefix("torch."), eng.weights, args.transport, shown_host, server.port,
        eng.load_seconds, service.max_sessions, service.max_context, kv_mib,
        "on" if token else "off", "on" if args.tls_cert else "off",
    )  # fmt: skip
    notify("READY=1")  # systemd Type=notify: dependants start once the model is loaded and the port open
    await stop.wait()
    notify("STOPPING=1")
    log.info("%s-node draining (%d in flight)", role, service.inflight)
    await server.stop(args.drain_timeout)
    service.shutdown()
    log.info("%s-node stopped", role)
    return 0
