"""Regenerate the committed Python stubs from proto/: `python -m tools.gen_proto`.

protoc names the gRPC module's import after the proto path (`from tandem.v1 import ...`); the
stubs live in tandem/wire/gen, so that import is rewritten to a package import.
tests/test_proto_stubs.py fails when the committed stubs are stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
PROTO = "tandem/v1/tandem.proto"
GEN_DIR = ROOT / "tandem" / "wire" / "gen"
GEN_FILES = ("tandem_pb2.py", "tandem_pb2.pyi", "tandem_pb2_grpc.py")


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # grpcio-tools: a test/dev dependency only

    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", *args, PROTO])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")


def generate(out_dir: Path) -> list[Path]:
    """Write the three stub files into out_dir, with the package import fixed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}"])
        written = []
        for name in GEN_FILES:
            text = (Path(tmp) / "tandem" / "v1" / name).read_text()
            text = text.replace("from tandem.v1 import tandem_pb2", "from tandem.wire.gen import tandem_pb2")
            dest = out_dir / name
            dest.write_text(text)
            written.append(dest)
    return written


def descriptor_set() -> bytes:
    """The proto's FileDescriptorSet as protoc compiles it now (no source info)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        _protoc([f"--descriptor_set_out={out}"])
        return out.read_bytes()


def main() -> int:
    written = generate(GEN_DIR)
    init = GEN_DIR / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated from proto/tandem/v1/tandem.proto by tools/gen_proto.py; do not edit."""\n')
    for path in written:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
