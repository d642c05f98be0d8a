"""The gRPC server: the services for a mode, one structured log line and one latency sample
per call, errors mapped to the status codes the CSI spec names."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from prometheus_client import Histogram, start_http_server

from vmthunder.csi.controller import ControllerService
from vmthunder.csi.cow import DmSnapshotBackend
from vmthunder.csi.errors import CsiError
from vmthunder.csi.identity import IdentityService
from vmthunder.csi.kube import KubeState
from vmthunder.csi.node import NodeService, Reclaimer, VolumeLocks
from vmthunder.csi.proto import csi_pb2_grpc
from vmthunder.kube import ApiError, Rest

CALL_SECONDS = Histogram(
    "vmthunder_csi_call_seconds", "CSI call latency by method and status code",
    ["method", "code"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
# Request fields worth a log line; secrets and contexts never are.
LOGGED_FIELDS: Final = ("name", "volume_id", "node_id", "staging_target_path", "target_path",
                        "volume_path", "starting_token", "max_entries")
log = logging.getLogger("vmthunder.csi.calls")


def _status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, CsiError):
        return error.code, error.message
    if isinstance(error, NotImplementedError):  # the generated base class's default
        return grpc.StatusCode.UNIMPLEMENTED, "not implemented"
    if isinstance(error, ApiError) and error.transient:
        return grpc.StatusCode.UNAVAILABLE, f"API server: {error}"
    return grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"


class CallInterceptor(grpc.ServerInterceptor):
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.monotonic()
            code, message = grpc.StatusCode.OK, ""
            try:
                return inner(request, context)
            except Exception as e:
                code, message = _status_of(e)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                context.abort(code, message)
            finally:
                seconds = time.monotonic() - start
                CALL_SECONDS.labels(method, code.name).observe(seconds)
                record: dict[str, Any] = {"call": method, "code": code.name,
                                          "ms": round(seconds * 1000, 1)}
                for f in LOGGED_FIELDS:
                    value = getattr(request, f, None)
                    if value:
                        record[f] = value
                if message:
                    record["error"] = message
                log.info(json.dumps(record))

        return grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@dataclass(frozen=True)
class Options:
    mode: str  # controller, node or all
    endpoint: str  # unix:///path/csi.sock
    node_id: str = ""
    state_dir: Path = Path("/var/lib/vmthunder/volumes")
    metrics_port: int = 0
    replica_wait: float = 30.0
    stage_wait: float = 60.0
    workers: int = 8


def build_server(options: Options, state: KubeState) -> tuple[grpc.Server, Callable[[], None]]:
    """The server with the mode's services, and a stop function for its helpers."""
    controller = options.mode in ("controller", "all")
    node = options.mode in ("node", "all")
    if node and not options.node_id:
        raise ValueError("node mode needs a node id")
    server = grpc.server(ThreadPoolExecutor(options.workers, thread_name_prefix="csi"),
                         interceptors=[CallInterceptor()])
    backend = DmSnapshotBackend(options.state_dir) if node else None

    def readiness() -> str | None:
        if not state.reachable():
            return "the API server is unreachable"
        return backend.problem() if backend else None

    csi_pb2_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        IdentityService(controller, readiness), server)
    if controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(  # type: ignore[no-untyped-call]
            ControllerService(state, options.replica_wait), server)
    stop = threading.Event()
    if backend is not None:
        locks = VolumeLocks()
        csi_pb2_grpc.add_NodeServicer_to_server(  # type: ignore[no-untyped-call]
            NodeService(options.node_id, state, backend, locks, options.stage_wait), server)
        reclaimer = Reclaimer(options.node_id, state, backend, locks)
        threading.Thread(target=reclaimer.run, args=(stop,), name="reclaimer",
                         daemon=True).start()
    if not options.endpoint.startswith("unix://"):
        raise ValueError(f"endpoint {options.endpoint!r} is not unix://...")
    socket_path = Path(options.endpoint.removeprefix("unix://"))
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)  # left by a previous run
    server.add_insecure_port(f"unix://{socket_path.absolute()}")
    return server, stop.set


def run(options: Options) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if options.metrics_port:
        start_http_server(options.metrics_port)
    server, stop_helpers = build_server(options, KubeState(Rest.from_environment()))
    server.start()
    logging.getLogger(__name__).info("CSI %s plugin serving on %s (pid %d)", options.mode,
                                     options.endpoint, os.getpid())
    done = threading.Event()

    def shutdown(signum: int, frame: object) -> None:
        stop_helpers()
        server.stop(5).wait()
        done.set()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    done.wait()
    return 0
