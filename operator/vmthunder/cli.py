"""The `vmthunder` command: one entry point for every role and for humans."""

from __future__ import annotations

import argparse
import sys


def _operator(args: argparse.Namespace) -> int:
    from vmthunder.operator.main import run_operator

    return run_operator(priority=args.priority, metrics_port=args.metrics_port,
                        liveness_port=args.liveness_port)


def _demo(args: argparse.Namespace) -> int:
    from vmthunder.lab.demo import run_demo

    return run_demo(args)


def _csi(args: argparse.Namespace) -> int:
    from vmthunder.csi.cli import run

    return run(args)


def _status(args: argparse.Namespace) -> int:
    from vmthunder.operator.status import run_status

    return run_status(args.imagecache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmthunder", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("version", help="print the version").set_defaults(
        func=lambda _: print("vmthunder 0.1.0") or 0
    )

    op = sub.add_parser("operator", help="run the operator (kopf; replicas elect one leader)")
    op.add_argument("--priority", type=int, default=0,
                    help="peering priority: the highest active replica works, others wait")
    op.add_argument("--metrics-port", type=int, default=9090)
    op.add_argument("--liveness-port", type=int, default=0, help="0: no liveness endpoint")
    op.set_defaults(func=_operator)

    status = sub.add_parser("status", help="an ImageCache's tree: each node's phase and hydration")
    status.add_argument("imagecache", help="the ImageCache's name")
    status.set_defaults(func=_status)

    from vmthunder.lab.demo import add_arguments as add_demo_arguments

    demo = sub.add_parser("demo", help="the main job: N VMs from one image in the qemu lab")
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    from vmthunder.csi.cli import add_arguments as add_csi_arguments

    csi = sub.add_parser("csi", help="run the CSI driver (controller, node or both)")
    add_csi_arguments(csi)
    csi.set_defaults(func=_csi)

    from vmthunder.node.cli import add_arguments as add_agent_arguments
    from vmthunder.node.cli import run as run_agent

    agent = sub.add_parser("agent", help="run the node agent (the node's block stack)")
    add_agent_arguments(agent)
    agent.set_defaults(func=run_agent)

    from vmthunder.lab.cli import add_arguments as add_lab_arguments
    from vmthunder.lab.cli import run as run_lab

    lab = sub.add_parser("lab", help="the qemu lab: origin + N node guests (up, down, status)")
    add_lab_arguments(lab)
    lab.set_defaults(func=run_lab)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
