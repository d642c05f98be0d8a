"""`vmthunder agent`: the node agent's command line (wired into vmthunder.cli)."""

from __future__ import annotations

import argparse

from vmthunder.node.cache import BACKENDS, DEFAULT_BACKEND


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node", required=True, help="this node's name (the replicas' spec.node)")
    p.add_argument("--export-ip", required=True, help="address children log in to")
    p.add_argument("--cache-dir", default="/var/lib/vmthunder")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=DEFAULT_BACKEND)
    p.add_argument("--interval", type=float, default=None,
                   help="seconds between rounds without news (default: 5, the agent's "
                        "ROUND_INTERVAL)")
    p.add_argument("--no-multipath", action="store_true",
                   help="-src as dm-linear (the SCSI layer queues I/O of a dead parent)")
    p.add_argument("--replacement-timeout", type=int, default=None)
    p.add_argument("--profile-file", default=None,
                   help="boot profile to use instead of the ImageCache's ConfigMap")
    p.add_argument("--once", action="store_true", help="one round, then exit")
    p.add_argument("--metrics-port", type=int, default=0, help="0: no metrics endpoint")


def run(args: argparse.Namespace) -> int:
    from vmthunder.node.agent import run_agent

    return run_agent(args.node, export_ip=args.export_ip, cache_dir=args.cache_dir,
                     backend=args.backend, interval=args.interval,
                     multipath=not args.no_multipath,
                     replacement_timeout=args.replacement_timeout,
                     profile_file=args.profile_file, once=args.once,
                     metrics_port=args.metrics_port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vmthunder-agent", description="the VMThunder node agent")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
