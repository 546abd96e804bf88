"""One typed error for both transports: a gRPC status code and a message.

The numbers are gRPC's (tandem.v1.Code mirrors them), so a node raises NodeError once and the
gRPC transport turns it into a call status while ZeroMQ sends it as an Error reply.
"""

from __future__ import annotations

import grpc

from tandem.wire.gen import tandem_pb2 as pb

Code = grpc.StatusCode
_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


class NodeError(Exception):
    """A request failed with a status code the caller can act on (e.g. FAILED_PRECONDITION: resend)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    def to_proto(self) -> pb.Error:
        return pb.Error(code=self.code.value[0], message=self.message)

    @classmethod
    def from_proto(cls, err: pb.Error) -> NodeError:
        return cls(code_from_number(err.code), err.message)


def code_from_number(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def invalid(message: str) -> NodeError:
    return NodeError(Code.INVALID_ARGUMENT, message)


def not_found(message: str) -> NodeError:
    return NodeError(Code.NOT_FOUND, message)


def precondition(message: str) -> NodeError:
    return NodeError(Code.FAILED_PRECONDITION, message)


def exhausted(message: str) -> NodeError:
    return NodeError(Code.RESOURCE_EXHAUSTED, message)


def unauthenticated(message: str = "missing or wrong auth token") -> NodeError:
    return NodeError(Code.UNAUTHENTICATED, message)


def unimplemented(message: str) -> NodeError:
    return NodeError(Code.UNIMPLEMENTED, message)


def unavailable(message: str) -> NodeError:
    return NodeError(Code.UNAVAILABLE, message)
