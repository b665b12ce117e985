"""connmond: the daemon that application processes report to.

One ``socketserver.ThreadingTCPServer``, one handler thread per connection,
and one ``connmon.Picture`` behind one lock.  An application's connection
carries its pool state; when it closes, the process leaves the current
counts at once (its host+program row stays, with its maxima).  A console's
connection asks for snapshots.

With several nodes in the service, every node links to every other node
(full mesh, one link a pair, dialled by the node whose name sorts first)
and forwards what its own applications say; each node holds the whole
cluster's picture.  See ``Cluster``.

Run ``connmond`` or ``python -m connmon_server``.
"""

from __future__ import annotations

import argparse
import collections
import logging
import random
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
MAX_OUTBOX = 100_000      # messages queued for a peer before the link is cut


class ConnmonServer(socketserver.ThreadingTCPServer):
    """Listens on a node's bind address and keeps the picture."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = socket.SOMAXCONN   # a whole cloud reconnects at once

    def __init__(self, service: connmon.Service, node: connmon.Node):
        self.service = service
        self.node = node
        self.picture = connmon.Picture()
        self.lock = threading.Lock()
        self.cluster = Cluster(self)
        if ":" in node.bind[0]:
            self.address_family = socket.AF_INET6
        super().__init__(node.bind, ConnmonHandler)

    def snapshot(self, procs: bool = False) -> Dict[str, Any]:
        with self.lock:
            snapshot = self.picture.snapshot(time.monotonic(), procs)
            peers = self.cluster.status()
        return {"service": self.service.name, "node": self.node.name,
                "peers": peers, **snapshot}

    def welcome(self) -> Dict[str, Any]:
        return {"op": "welcome", "version": connmon.PROTOCOL_VERSION,
                "service": self.service.name, "node": self.node.name}


class ConnmonHandler(socketserver.StreamRequestHandler):
    """One client connection: an application process, a console or a peer
    node."""

    server: ConnmonServer

    def setup(self) -> None:
        super().setup()
        self.request.settimeout(HELLO_TIMEOUT)
        self.peer = connmon.format_address(self.client_address[:2])

    def send(self, message: Dict[str, Any]) -> None:
        self.wfile.write(connmon.encode(message, connmon.MAX_REPLY_BYTES))

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
                     "console": self.serve_console,
                     "peer": self.serve_peer}.get(role)
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
        proc = process_from(hello.get("proc"))
        name = f"{proc.progname}[{proc.pid}] on {proc.hostname}"
        proc.update(connmon.expect(read_message(self.rfile), "state"),
                    time.monotonic())
        lock, picture, cluster = (self.server.lock, self.server.picture,
                                  self.server.cluster)
        with lock:
            if picture.attach(proc, self.server.node.name):
                cluster.broadcast(attach_message(proc))
        log.info("%s: app %s connected (%d connections)", self.peer, name,
                 len(proc.conns))
        try:
            while True:
                message = read_message(self.rfile)
                if message is None:
                    break
                connmon.expect(message, "update")
                with lock:
                    if picture.update(proc.ident, proc.session, message,
                                      time.monotonic()):
                        cluster.broadcast({
                            "op": "forward", "id": proc.ident,
                            "session": proc.session, "update": message})
        finally:
            with lock:
                if picture.detach(proc.ident, proc.session):
                    cluster.broadcast({"op": "detach", "id": proc.ident,
                                       "session": proc.session})
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
                    self.server.cluster.broadcast({"op": "clear_maxima"})
                self.send({"op": "clear_maxima"})
            else:
                raise ProtocolError(f"unknown console request "
                                    f"{request['op']!r}")
        log.info("%s: console disconnected", self.peer)

    # -- peer nodes -----------------------------------------------------------

    def serve_peer(self, hello: Dict[str, Any]) -> None:
        link = self.server.cluster.link_for(hello)
        link.run(self.request, self.rfile)


def process_from(proc: Any) -> connmon.ProcessState:
    """A ProcessState for the "proc" of an app's hello, checking every
    field."""
    if not isinstance(proc, dict):
        raise ProtocolError("app hello needs a 'proc' object")
    fields = []
    for key in ("id", "hostname", "progname"):
        value = proc.get(key)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
            raise ProtocolError(f"app hello: 'proc.{key}' must be a string "
                                f"of 1 to {MAX_TEXT} characters")
        fields.append(value)
    pid, session = proc.get("pid"), proc.get("session")
    if type(pid) is not int or not 0 < pid < 1 << 32:
        raise ProtocolError("app hello: 'proc.pid' must be a positive integer")
    if type(session) is not int or not 0 <= session < 1 << 62:
        raise ProtocolError("app hello: 'proc.session' must be a count")
    return connmon.ProcessState(*fields, pid, session)


def attach_message(proc: connmon.ProcessState) -> Dict[str, Any]:
    """What tells a peer about one of our processes, whole."""
    return {"op": "attach", "proc": proc.describe(),
            "state": proc.message(time.monotonic())}


# ---------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------


class Cluster:
    """This node's links to the other nodes of its service."""

    def __init__(self, server: ConnmonServer):
        self.server = server
        me = server.node.name
        self.links = {node.name: PeerLink(server, node)
                      for node in server.service.nodes if node.name != me}

    def start(self) -> None:
        for link in self.links.values():
            link.start()

    def broadcast(self, message: Dict[str, Any]) -> None:
        """Queue a message for every peer that is up (caller holds the
        picture lock, so peers see our changes in the order we made them).
        """
        for link in self.links.values():
            link.enqueue(message)

    def status(self) -> Dict[str, bool]:
        return {name: link.sock is not None
                for name, link in sorted(self.links.items())}

    def link_for(self, hello: Dict[str, Any]) -> "PeerLink":
        """The link an incoming peer's hello is for, or a clear refusal."""
        service, node = hello.get("service"), hello.get("node")
        if service != self.server.service.name:
            raise ProtocolError(f"peer is of service {service!r}, this node "
                                f"of {self.server.service.name!r}")
        if node not in self.links:
            raise ProtocolError(f"peer node {node!r} is not in service "
                                f"{self.server.service.name!r}")
        return self.links[node]


class PeerLink:
    """The link to one other node.

    While it is up, everything our own applications say is queued for the
    peer and written by this link's writer thread; the peer's news is read
    by whichever thread runs ``run`` (the dialling thread, or the handler
    of the peer's incoming connection).  When it goes down, the processes
    attached to the peer leave our picture, and on every new link each side
    first sends its maxima and all its own processes, whole.
    """

    def __init__(self, server: ConnmonServer, node: connmon.Node):
        self.server = server
        self.node = node
        self.sock: Optional[socket.socket] = None
        self.generation = 0
        self.outbox: collections.deque = collections.deque()
        self.ready = threading.Condition(threading.Lock())

    def start(self) -> None:
        threading.Thread(target=self._write_loop, daemon=True,
                         name=f"peer-{self.node.name}-writer").start()
        if self.server.node.name < self.node.name:
            threading.Thread(target=self._dial_loop, daemon=True,
                             name=f"peer-{self.node.name}-dialer").start()

    def enqueue(self, message: Dict[str, Any]) -> None:
        if self.sock is None:
            return   # the peer gets everything again when the link is up
        with self.ready:
            self.outbox.append(message)
            if len(self.outbox) > MAX_OUTBOX:
                log.warning("peer %s: %d messages behind; cutting the link",
                            self.node.name, len(self.outbox))
                self._cut(self.sock)
            self.ready.notify()

    def run(self, sock: socket.socket, rfile) -> None:
        """Serve a new link until it ends."""
        server = self.server
        origin = self.node.name
        with server.lock:
            if self.sock is not None:
                self._cut(self.sock)   # a newer link replaces a stale one
            server.picture.detach_origin(origin)
            self.generation += 1
            generation = self.generation
            with self.ready:
                self.sock = sock
                self.outbox.clear()
                self.outbox.append({"op": "maxima",
                                    **server.picture.maxima()})
                self.outbox.extend(
                    attach_message(proc)
                    for proc in server.picture.processes.values()
                    if proc.origin == server.node.name)
                self.ready.notify()
        log.info("peer %s: link up", origin)
        try:
            while True:
                message = read_message(rfile)
                if message is None:
                    break
                with server.lock:
                    self._apply(message)
        except (OSError, ProtocolError) as err:
            log.warning("peer %s: %s", origin, err)
        finally:
            with server.lock:
                if self.generation == generation:
                    with self.ready:
                        self.sock = None
                        self.outbox.clear()
                    gone = server.picture.detach_origin(origin)
                    log.info("peer %s: link down; its %d processes leave "
                             "the picture", origin, gone)
            self._cut(sock)

    def _apply(self, message: Dict[str, Any]) -> None:
        """Apply a peer's news to our picture (caller holds the lock)."""
        picture, op, now = self.server.picture, message["op"], \
            time.monotonic()
        if op == "attach":
            proc = process_from(message.get("proc"))
            state = message.get("state")
            if not isinstance(state, dict):
                raise ProtocolError("attach needs a 'state' object")
            proc.update(connmon.expect(state, "state"), now)
            picture.attach(proc, self.node.name)
        elif op in ("forward", "detach"):
            ident, session = message.get("id"), message.get("session")
            if not isinstance(ident, str) or type(session) is not int:
                raise ProtocolError(f"{op} needs 'id' and 'session'")
            if op == "detach":
                picture.detach(ident, session)
            else:
                update = message.get("update")
                if not isinstance(update, dict):
                    raise ProtocolError("forward needs an 'update' object")
                picture.update(ident, session,
                               connmon.expect(update, "update"), now)
        elif op == "maxima":
            picture.merge_maxima(message)
        elif op == "clear_maxima":
            picture.clear_maxima()
        else:
            raise ProtocolError(f"unknown peer message {op!r}")

    def _write_loop(self) -> None:
        while True:
            with self.ready:
                while not self.outbox:
                    self.ready.wait()
                sock = self.sock
                batch = list(self.outbox)
                self.outbox.clear()
            if sock is None:
                continue
            try:
                sock.sendall(b"".join(connmon.encode(m) for m in batch))
            except (OSError, ProtocolError) as err:
                log.warning("peer %s: cannot send: %s", self.node.name, err)
                self._cut(sock)

    def _dial_loop(self) -> None:
        """Keep a link to the peer up, retrying with backoff."""
        delay = 0.0
        while True:
            try:
                conn = connmon.open_connection(
                    [self.node.address], "peer",
                    service=self.server.service.name,
                    node=self.server.node.name)
                conn.sock.settimeout(None)
                delay = 0.0
                self.run(conn.sock, conn.rfile)
            except (OSError, ProtocolError) as err:
                (log.warning if delay == 0.0 else log.debug)(
                    "peer %s: cannot connect: %s", self.node.name, err)
            delay = min(connmon.RECONNECT_MAX,
                        max(connmon.RECONNECT_MIN, delay * 2))
            time.sleep(delay * random.uniform(0.8, 1.2))

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        """Make the link's reader see the end (and so clean up)."""
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
    server.cluster.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("connmond stopping")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
