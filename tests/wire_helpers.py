"""Test helpers for the node tests: a tiny random llama GGUF and real servers on loopback.

A server runs on its own event loop in a background thread, so a test drives it through real
sockets with `asyncio.run(...)` in the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tandem.engine.runtime import Engine, load_engine
from tandem.wire import grpc_transport, zmq_transport
from tandem.wire.service import NodeService

TINY_VOCAB = 48


def write_tiny_llama(
    path: Path,
    vocab: int = TINY_VOCAB,
    dim: int = 32,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ffn: int = 64,
    context: int = 256,
    seed: int = 0,
    scale: float = 1.0,
) -> Path:
    """A random llama-architecture model with a byte-level BPE vocabulary of single characters.

    `scale` sharpens (> 1) or flattens (< 1) the output distribution.
    """
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"tiny-llama-{seed}")
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    letters = [chr(c) for c in (*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1))]
    w.add_token_list([*letters[: vocab - 1], "ab"])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def t(*shape: int, s: float = 0.3) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    hd = dim // n_heads
    w.add_tensor("token_embd.weight", t(vocab, dim, s=1.0))
    w.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    w.add_tensor("output.weight", t(vocab, dim, s=0.5 * scale))
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(dim, np.float32))
        w.add_tensor(p + "attn_q.weight", t(n_heads * hd, dim))
        w.add_tensor(p + "attn_k.weight", t(n_kv_heads * hd, dim))
        w.add_tensor(p + "attn_v.weight", t(n_kv_heads * hd, dim))
        w.add_tensor(p + "attn_output.weight", t(dim, n_heads * hd))
        w.add_tensor(p + "ffn_gate.weight", t(ffn, dim))
        w.add_tensor(p + "ffn_up.weight", t(ffn, dim))
        w.add_tensor(p + "ffn_down.weight", t(dim, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_engine(path: Path) -> Engine:
    return load_engine(path, threads=1)


class NodeThread:
    """A node served on 127.0.0.1 from a background thread's event loop, on a chosen port (0: any free one)."""

    def __init__(
        self, service: NodeService, transport: str = "grpc", port: int = 0, token: str | None = None, **tls: Any
    ) -> None:
        self.service = service
        self.transport = transport
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        started = threading.Event()
        self.error: BaseException | None = None

        async def start() -> None:
            if transport == "grpc":
                self.server = await grpc_transport.serve(service, "127.0.0.1", port, token=token, **tls)
            else:
                self.server = await zmq_transport.serve(service, "127.0.0.1", port, token=token)

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(start())
            except BaseException as exc:
                self.error = exc
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        started.wait(30)
        if self.error is not None:
            raise self.error
        self.port: int = self.server.port
        self.url = f"{transport}://127.0.0.1:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """grace 0 is a kill: requests in flight get no reply."""

        async def halt() -> None:
            with contextlib.suppress(TimeoutError):  # a stop that hangs must not hang the test run
                if self.transport == "grpc" and grace == 0:
                    await asyncio.wait_for(self.server.server.stop(None), 10)
                else:
                    await asyncio.wait_for(self.server.stop(grace), grace + 10)

        asyncio.run_coroutine_threadsafe(halt(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.service.shutdown()


@contextmanager
def running(service: NodeService, transport: str, token: str | None = None, **tls: Any) -> Iterator[NodeThread]:
    node = NodeThread(service, transport, token=token, **tls)
    try:
        yield node
    finally:
        node.stop()
