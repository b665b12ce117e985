"""connmond: the daemon that application processes report to.

One ``socketserver.ThreadingTCPServer``, one handler thread per connection,
and one ``connmon.Picture`` behind one lock.  An application's connection
carries its pool events; when it closes, the process leaves the current
counts at once (its host+program row stays, with its maxima).  A console's
connection asks for snapshots.

Run ``connmond`` or ``python -m connmon_server``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import socketserver
import sys
import threading
import time
from typing import Any, Dict, Optional

import connmon
from connmon import ProtocolError, read_message

log = logging.getLogger("connmond")

HELLO_TIMEOUT = 10.0      # seconds a new connection has to say hello
MAX_TEXT = 255            # longest hostname / progname accepted


class ConnmonServer(socketserver.ThreadingTCPServer):
    """Listens on a node's bind address and keeps the picture."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, service: connmon.Service, node: connmon.Node):
        self.service = service
        self.node = node
        self.picture = connmon.Picture()
        self.lock = threading.Lock()
        if ":" in node.bind[0]:
            self.address_family = socket.AF_INET6
        super().__init__(node.bind, ConnmonHandler)

    def snapshot(self, procs: bool = False) -> Dict[str, Any]:
        with self.lock:
            snapshot = self.picture.snapshot(time.monotonic(), procs)
        return {"service": self.service.name, "node": self.node.name,
                **snapshot}

    def welcome(self) -> Dict[str, Any]:
        return {"op": "welcome", "version": connmon.PROTOCOL_VERSION,
                "service": self.service.name, "node": self.node.name}


class ConnmonHandler(socketserver.StreamRequestHandler):
    """One client connection: an application process or a console."""

    server: ConnmonServer

    def setup(self) -> None:
        super().setup()
        self.request.settimeout(HELLO_TIMEOUT)
        self.peer = connmon.format_address(self.client_address[:2])

    def send(self, message: Dict[str, Any]) -> None:
        self.wfile.write(connmon.encode(message))

    def handle(self) -> None:
        try:
            self.send(self.server.welcome())
            hello = connmon.expect(read_message(self.rfile), "hello")
            if hello.get("version") != connmon.PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {hello.get('version')!r}"
                                    f" not supported (this daemon speaks "
                                    f"{connmon.PROTOCOL_VERSION})")
            role = hello.get("role")
            serve = {"app": self.serve_app,
                     "console": self.serve_console}.get(role)
            if serve is None:
                raise ProtocolError(f"unknown role {role!r}")
            self.request.settimeout(None)
            serve(hello)
        except ProtocolError as err:
            log.warning("%s: %s; closing the connection", self.peer, err)
            try:
                self.send({"op": "error", "error": str(err)})
            except OSError:
                pass
        except OSError as err:
            log.info("%s: connection lost: %s", self.peer, err)

    # -- applications ---------------------------------------------------------

    def serve_app(self, hello: Dict[str, Any]) -> None:
        proc = process_from_hello(hello)
        name = f"{proc.progname}[{proc.pid}] on {proc.hostname}"
        proc.update(connmon.expect(read_message(self.rfile), "state"),
                    time.monotonic())
        lock, picture = self.server.lock, self.server.picture
        with lock:
            picture.attach(proc, self)
        log.info("%s: app %s connected (%d connections)", self.peer, name,
                 len(proc.conns))
        try:
            while True:
                message = read_message(self.rfile)
                if message is None:
                    break
                connmon.expect(message, "update")
                with lock:
                    picture.update(proc.ident, self, message,
                                   time.monotonic())
        finally:
            with lock:
                picture.detach(proc.ident, self)
            log.info("%s: app %s disconnected", self.peer, name)

    # -- consoles -------------------------------------------------------------

    def serve_console(self, hello: Dict[str, Any]) -> None:
        log.info("%s: console connected", self.peer)
        while True:
            request = read_message(self.rfile)
            if request is None:
                break
            if request["op"] == "snapshot":
                self.send({"op": "snapshot", **self.server.snapshot(
                    procs=request.get("procs") is True)})
            elif request["op"] == "clear_maxima":
                with self.server.lock:
                    self.server.picture.clear_maxima()
                self.send({"op": "clear_maxima"})
            else:
                raise ProtocolError(f"unknown console request "
                                    f"{request['op']!r}")
        log.info("%s: console disconnected", self.peer)


def process_from_hello(hello: Dict[str, Any]) -> connmon.ProcessState:
    """A ProcessState for an app's hello, checking every field."""
    proc = hello.get("proc")
    if not isinstance(proc, dict):
        raise ProtocolError("app hello needs a 'proc' object")
    fields = []
    for key in ("id", "hostname", "progname"):
        value = proc.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
            raise ProtocolError(f"app hello: 'proc.{key}' must be a string "
                                f"of 1 to {MAX_TEXT} characters")
        fields.append(value)
    pid = proc.get("pid")
    if type(pid) is not int or not 0 < pid < 1 << 32:
        raise ProtocolError("app hello: 'proc.pid' must be a positive integer")
    return connmon.ProcessState(*fields, pid)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def choose_node(service: connmon.Service, name: Optional[str]) -> connmon.Node:
    if name:
        return service.node(name)
    if len(service.nodes) > 1:
        names = ", ".join(node.name for node in service.nodes)
        raise connmon.ConfigError(f"{service.source}: service {service.name!r}"
                                  f" has several nodes ({names}); say which "
                                  "one this is with --node")
    return service.nodes[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connmond", description="Collect database connection events "
        "from connmon-enabled SQLAlchemy applications.")
    parser.add_argument("-c", "--config", help="config file (default "
                        f"{connmon.DEFAULT_CONFIG_FILE} if present, else a "
                        "single node on localhost:5800)")
    parser.add_argument("-s", "--service", default=connmon.DEFAULT_SERVICE,
                        help="service name (default: %(default)s)")
    parser.add_argument("-n", "--node", help="which node of the service this "
                        "daemon is (required when there are several)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="(default: %(default)s)")
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s")
    try:
        service = connmon.find_service(args.service, args.config)
        node = choose_node(service, args.node)
    except connmon.ConfigError as err:
        print(f"connmond: error: {err}", file=sys.stderr)
        return 2
    try:
        server = ConnmonServer(service, node)
    except OSError as err:
        print(f"connmond: error: cannot listen on "
              f"{connmon.format_address(node.bind)}: {err}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log.info("connmond %s: service %r node %s listening on %s",
             connmon.__version__, service.name, node.name,
             connmon.format_address(server.server_address[:2]))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("connmond stopping")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
