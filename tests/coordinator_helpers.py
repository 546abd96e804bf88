"""Helpers for the coordinator tests: nodes that can be killed and restarted on their port, node
processes, and a real partial-acceptance draft for SmolLM2 (its own first layers)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf

from tandem.engine.gguf_file import read_gguf
from tools.write_gguf import _value_type

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def truncated_model(src: Path, dst: Path, n_layers: int) -> Path:
    """The first n_layers blocks of src with its norm and head: an early-exit draft sharing src's vocabulary."""
    gf = read_gguf(src)
    arch = gf.arch
    w = gguf.GGUFWriter(str(dst), arch)
    for key, value in gf.metadata.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.alignment"):
            continue
        if key == f"{arch}.block_count":
            value = n_layers
        if key == "general.name":
            value = f"{value} (first {n_layers} layers)"
        if isinstance(value, list):
            if value:
                w.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.get_type(value[0]))
        else:
            w.add_key_value(key, value, _value_type(value))
    for name, t in gf.tensors.items():
        if name.startswith("blk.") and int(name.split(".")[1]) >= n_layers:
            continue
        raw = gf.raw(name)
        rows = 1
        for d in t.shape[:-1]:
            rows *= d
        w.add_tensor(name, raw.reshape(rows, -1) if len(t.shape) > 1 else raw, raw_dtype=t.ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def start_node_process(role: str, model: Path, log: Path, *extra: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    """`{role}-node` as a process; (process, bound port) once it serves."""
    cmd = [sys.executable, "-m", f"{role}_node.cli", "--model", str(model), "--listen", f"127.0.0.1:{port}",
           "--threads", "1", *extra]  # fmt: skip
    start = log.stat().st_size if log.exists() else 0
    out = log.open("ab")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    out.close()
    deadline = time.monotonic() + 120
    pattern = re.compile(rf"{role}-node serving .* address=127\.0\.0\.1:(\d+)")
    while time.monotonic() < deadline:
        text = log.read_bytes()[start:].decode(errors="replace")
        if m := pattern.search(text):
            return proc, int(m.group(1))
        if proc.poll() is not None:
            raise RuntimeError(f"{role} node exited: {text[-2000:]}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{role} node did not start: {log.read_text(errors='replace')[-2000:]}")
