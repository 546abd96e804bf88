"""The committed stubs in tandem/wire/gen must match proto/ (regenerate: python -m tools.gen_proto)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import grpc_tools
import pytest
from google.protobuf import descriptor_pb2

from tandem.wire.gen import tandem_pb2, tandem_pb2_grpc
from tools import gen_proto

STALE = "stubs are stale against proto/: run `python -m tools.gen_proto` and commit tandem/wire/gen"


def _strip_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for m in messages:  # protoc's descriptor set has them, the Python plugin's output does not
        for f in m.field:
            f.ClearField("json_name")
        _strip_json_names(m.nested_type)


def test_committed_descriptor_equals_the_proto() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(gen_proto.descriptor_set())
    (fresh,) = [f for f in fds.file if f.name == gen_proto.PROTO]
    _strip_json_names(fresh.message_type)
    committed = descriptor_pb2.FileDescriptorProto.FromString(tandem_pb2.DESCRIPTOR.serialized_pb)
    assert committed == fresh, STALE


def test_committed_files_equal_a_fresh_generation(tmp_path: Path) -> None:
    committed = (gen_proto.GEN_DIR / "tandem_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed).group(1)
    installed = getattr(grpc_tools, "__version__", None)
    if installed is None:
        from importlib.metadata import version

        installed = version("grpcio-tools")
    if installed != made_with:
        pytest.skip(f"stubs made with grpcio-tools {made_with}, {installed} installed: text differs by version")
    gen_proto.generate(tmp_path)
    for name in gen_proto.GEN_FILES:
        assert (tmp_path / name).read_text() == (gen_proto.GEN_DIR / name).read_text(), f"{name}: {STALE}"


def test_stubs_import_as_a_package_and_name_every_method() -> None:
    service = tandem_pb2.DESCRIPTOR.services_by_name["Node"]
    methods = {m.name for m in service.methods}
    assert methods == {"Info", "Ping", "Prefill", "Propose", "Verify", "Close", "Session"}
    stub_source = Path(tandem_pb2_grpc.__file__).read_text()
    assert "from tandem.wire.gen import tandem_pb2" in stub_source
    for name in methods:
        assert f"'/tandem.v1.Node/{name}'" in stub_source
