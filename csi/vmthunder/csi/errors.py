"""The one error the services raise: a gRPC status code and a message for the CO."""

from __future__ import annotations

import grpc


class CsiError(Exception):
    """Raised inside an RPC; the server interceptor turns it into the call's status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)
