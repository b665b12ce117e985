"""connmon: the console that shows what connmond knows.

``connmon --once --json`` prints one snapshot as JSON; ``connmon --once``
prints it as a plain table.

Run ``connmon`` or ``python -m connmon_console``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import connmon


class Target:
    """Where the console looks: a service (maybe pinned to a node) or a
    direct ``host:port``."""

    def __init__(self, args: argparse.Namespace):
        if args.host:
            self.address = connmon.parse_address(args.host)
            self.description = connmon.format_address(self.address)
            self.service = None
            self.security = connmon.Security(
                connmon.read_secret(args.secret_file) if args.secret_file
                else None)
        else:
            self.service = connmon.find_service(args.service, args.config)
            self.node = args.node
            self.description = f"service {self.service.name!r}" + (
                f" node {args.node}" if args.node else "")
            if args.node:
                self.service.node(args.node)   # fail now on an unknown node
            self.security = connmon.Security.of_service(self.service,
                                                        args.secret_file)
            self.security.client_context()   # fail now on a bad TLS file

    def addresses(self) -> List[connmon.Address]:
        if self.service is None:
            return [self.address]
        return connmon.candidate_addresses(self.service, self.node)

    def connect(self, timeout: float = 5.0) -> connmon.Connection:
        return connmon.open_connection(self.addresses(), "console",
                                       timeout=timeout,
                                       security=self.security)


def fetch_snapshot(target: Target, timeout: float = 5.0,
                   procs: bool = False) -> Dict[str, Any]:
    conn = target.connect(timeout)
    try:
        snapshot = conn.request({"op": "snapshot", "procs": procs})
    finally:
        conn.close()
    del snapshot["op"]
    return snapshot


COLUMNS = [  # (heading, snapshot key, width)
    ("HOSTNAME", "hostname", 20),
    ("PROGNAME", "progname", 24),
    ("NPROC", "nproc", 6),
    ("CONN", "conn", 6),
    ("CKOUT", "ckout", 6),
    ("MAXNPROC", "maxnproc", 9),
    ("MAXCONN", "maxconn", 8),
    ("MAXCKOUT", "maxckout", 9),
    ("CKOUT/S", "ckout_per_sec", 8),
]


def summary_lines(snapshot: Dict[str, Any]) -> List[str]:
    return [
        f"Hosts       [{snapshot['hosts']} / {snapshot['max_hosts']}]",
        f"Processes   [{snapshot['processes']} / {snapshot['max_processes']}]",
        f"Connections [{snapshot['connections']} / "
        f"{snapshot['max_connections']}]",
        f"Checkouts   [{snapshot['checkouts']} / {snapshot['max_checkouts']}"
        f" / {snapshot['checkouts_per_sec']}/s]",
    ]


def format_row(values: List[Any]) -> str:
    cells = []
    for (_, _, width), value in zip(COLUMNS, values):
        text = str(value)[:width - 1]
        cells.append(text.ljust(width) if isinstance(value, str)
                     else text.rjust(width - 1) + " ")
    return "".join(cells).rstrip()


def format_table(snapshot: Dict[str, Any]) -> str:
    lines = [f"connmon: service {snapshot['service']} node {snapshot['node']}"]
    lines += summary_lines(snapshot)
    lines.append("")
    lines.append(format_row([heading for heading, _, _ in COLUMNS]))
    for row in snapshot["rows"]:
        line = format_row([row[key] for _, key, _ in COLUMNS])
        lines.append(line if row["connected"] else line + "  (gone)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connmon", description="Show the database connections that "
        "connmond knows of.")
    parser.add_argument("-c", "--config", help="config file (default "
                        f"{connmon.DEFAULT_CONFIG_FILE} if present)")
    parser.add_argument("-s", "--service", default=connmon.DEFAULT_SERVICE,
                        help="service name (default: %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-n", "--node", help="attach to this node of the "
                       "service (default: any that answers)")
    where.add_argument("-H", "--host", help="attach to connmond at "
                       "HOST[:PORT] directly, without a config file")
    parser.add_argument("-u", "--secret-file", help="file holding the "
                        "service's shared secret (default: the config's "
                        "auth_secret_file or auth_secret)")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --once: print the snapshot as JSON")
    parser.add_argument("--procs", action="store_true",
                        help="with --once --json: list each row's processes")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not args.once:
        parser.error("--json goes with --once")
    try:
        target = Target(args)
    except connmon.ConfigError as err:
        print(f"connmon: error: {err}", file=sys.stderr)
        return 2
    try:
        snapshot = fetch_snapshot(target, procs=args.procs)
    except (OSError, connmon.ProtocolError) as err:
        print(f"connmon: cannot get a snapshot from {target.description}: "
              f"{err}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(snapshot, sys.stdout, indent=1)
        print()
    else:
        print(format_table(snapshot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
