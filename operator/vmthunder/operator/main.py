"""Runs the kopf operator in this process."""

from __future__ import annotations

import logging

import kopf
from prometheus_client import start_http_server


def run_operator(priority: int = 0, metrics_port: int = 9090, liveness_port: int = 0) -> int:
    import vmthunder.operator.handlers  # noqa: F401 - registers the handlers with kopf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # kopf logs every handler call at INFO: thousands of lines per boot storm, none useful.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if metrics_port:
        start_http_server(metrics_port)
    kopf.run(
        clusterwide=True,
        peering_name="vmthunder",
        priority=priority,
        liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
    )
    return 0
