"""The `vmthunder csi` arguments; imports nothing heavy until the driver runs."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=("controller", "node", "all"), default="all")
    parser.add_argument("--endpoint", default="unix:///csi/csi.sock",
                        help="unix:///path of the gRPC socket")
    parser.add_argument("--node-id", default=os.environ.get("NODE_NAME", socket.gethostname()),
                        help="this node's Node name (default $NODE_NAME, else the hostname)")
    parser.add_argument("--state-dir", type=Path, default=Path("/var/lib/vmthunder/volumes"),
                        help="where volumes' copy-on-write files live (the cache disk)")
    parser.add_argument("--metrics-port", type=int, default=0, help="0: no metrics endpoint")
    parser.add_argument("--replica-wait", type=float, default=30.0,
                        help="seconds CreateVolume waits for the operator to plan the replica")
    parser.add_argument("--stage-wait", type=float, default=60.0,
                        help="seconds NodeStageVolume waits for the replica to attach")


def run(args: argparse.Namespace) -> int:
    from vmthunder.csi.server import Options, run

    return run(Options(mode=args.mode, endpoint=args.endpoint, node_id=args.node_id,
                       state_dir=args.state_dir, metrics_port=args.metrics_port,
                       replica_wait=args.replica_wait, stage_wait=args.stage_wait))
