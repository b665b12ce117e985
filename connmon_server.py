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

Optional exports, each on its own daemon thread and each reading only
``ConnmonServer.snapshot()``: Prometheus text on ``GET /metrics`` and a CSV
file appended to every ``csv_interval`` seconds.

Run ``connmond`` or ``python -m connmon_server``.
"""

from __future__ import annotations

import argparse
import collections
import configparser
import csv
import http.server
import io
import logging
import logging.config
import os
import random
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import connmon
from connmon import ProtocolError, read_message

log = logging.getLogger("connmond")

HELLO_TIMEOUT = 10.0      # seconds a new connection has to say hello
MAX_TEXT = 255            # longest hostname / progname accepted
MAX_OUTBOX = 100_000      # messages queued for a peer before the link is cut
MAX_HELLO_BYTES = 16384   # the most a client may send before it is trusted
DEFAULT_MAX_CLIENTS = 10000   # about 280 MB of connmond at most
PROBLEM_LOG_INTERVAL = 10.0   # seconds between two log lines of one kind


class ProblemLog:
    """Logs client problems at most once per kind per interval, so that a
    flood of bad clients cannot flood the log; the next line of a kind
    says how many were left out."""

    def __init__(self, logger: logging.Logger, interval: float):
        self.logger = logger
        self.interval = interval
        self.lock = threading.Lock()
        self.last: Dict[str, float] = {}
        self.suppressed: collections.Counter = collections.Counter()

    def log(self, level: int, kind: str, text: str, *args: Any) -> None:
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(kind, -self.interval) < self.interval:
                self.suppressed[kind] += 1
                return
            self.last[kind] = now
            left_out = self.suppressed.pop(kind, 0)
        if left_out:
            text += " (and %d more like this not logged in the last %gs)"
            args += (left_out, self.interval)
        self.logger.log(level, text, *args)


problems = ProblemLog(log, PROBLEM_LOG_INTERVAL)


def brief(err: Exception, limit: int = 200) -> str:
    """An error's text cut short: it may quote what a client sent."""
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def number_option(service: connmon.Service, key: str, default: float,
                  low: float, high: float) -> float:
    """A numeric option of the service section, checked."""
    text = service.options.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise connmon.ConfigError(f"{service.source}: {key} must be a number "
                                  f"from {low:g} to {high:g}, not {text!r}")
    return value


class LineReader:
    """Reads lines from a socket like a binary file's ``readline``, but
    under an optional absolute deadline (the hello's): a client that
    trickles a byte at a time cannot hold a connection open past it."""

    def __init__(self, sock: socket.socket, deadline: Optional[float]):
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()
        self.scanned = 0   # no newline in buffer[:scanned]

    def readline(self, size: int) -> bytes:
        while True:
            end = self.buffer.find(b"\n", self.scanned, size)
            if end >= 0 or len(self.buffer) >= size:
                cut = end + 1 if end >= 0 else size
                break
            self.scanned = len(self.buffer)
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                self.sock.settimeout(left)
            data = self.sock.recv(65536)
            if not data:
                cut = len(self.buffer)
                break
            self.buffer += data
        line = bytes(self.buffer[:cut])
        del self.buffer[:cut]
        self.scanned = 0
        return line

    def close(self) -> None:
        self.buffer.clear()


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
        # Settings first: a bad one is a ConfigError before we listen.
        self.security = connmon.Security.of_service(service)
        self.ssl_context = self.security.server_context()
        self.heartbeat = number_option(
            service, "heartbeat_timeout", connmon.DEFAULT_HEARTBEAT,
            connmon.MIN_HEARTBEAT, connmon.MAX_HEARTBEAT)
        self.max_clients = int(number_option(
            service, "max_clients", DEFAULT_MAX_CLIENTS, 1, 1 << 20))
        self.clients = 0
        self.clients_lock = threading.Lock()
        self.cluster = Cluster(self)
        if ":" in node.bind[0]:
            self.address_family = socket.AF_INET6
        super().__init__(node.bind, ConnmonHandler)

    def process_request(self, request, client_address) -> None:
        """Start a handler thread, unless max_clients are connected."""
        with self.clients_lock:
            full = self.clients >= self.max_clients
            if not full:
                self.clients += 1
        if full:
            self.refuse(request, client_address, f"too many connections "
                        f"(max_clients is {self.max_clients})")
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError as err:   # no thread to be had
            self.client_gone()
            self.refuse(request, client_address, f"overloaded: {err}")

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.client_gone()

    def client_gone(self) -> None:
        with self.clients_lock:
            self.clients -= 1

    def refuse(self, request: socket.socket, client_address,
               reason: str) -> None:
        """Say why in one line, without ever blocking the accept loop."""
        problems.log(logging.WARNING, "refused", "%s: refused: %s",
                     connmon.format_address(client_address[:2]), reason)
        if self.ssl_context is None:
            try:
                request.setblocking(False)
                request.send(connmon.encode({"op": "error",
                                             "error": reason}))
            except OSError:
                pass
        self.shutdown_request(request)

    def snapshot(self, procs: bool = False) -> Dict[str, Any]:
        with self.lock:
            snapshot = self.picture.snapshot(time.monotonic(), procs)
            peers = self.cluster.status()
        return {"service": self.service.name, "node": self.node.name,
                "peers": peers, **snapshot}

    def welcome(self, nonce: str) -> Dict[str, Any]:
        return {"op": "welcome", "version": connmon.PROTOCOL_VERSION,
                "service": self.service.name, "node": self.node.name,
                "nonce": nonce, "heartbeat": self.heartbeat}


PING = {"op": "ping"}
PONG = {"op": "pong"}


class ConnmonHandler(socketserver.StreamRequestHandler):
    """One client connection: an application process, a console or a peer
    node."""

    server: ConnmonServer

    def setup(self) -> None:
        self.peer = connmon.format_address(self.client_address[:2])
        self.request.settimeout(HELLO_TIMEOUT)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.server.ssl_context is not None:
            # No I/O yet: the handshake waits for handle(), under the hello
            # deadline and its error handling.
            self.request = self.server.ssl_context.wrap_socket(
                self.request, server_side=True,
                do_handshake_on_connect=False)
        super().setup()
        self.rfile.close()
        self.rfile = LineReader(self.connection,
                                time.monotonic() + HELLO_TIMEOUT)

    def finish(self) -> None:
        super().finish()
        self.connection.close()   # the TLS socket, if any

    def send(self, message: Dict[str, Any]) -> None:
        self.wfile.write(connmon.encode(message, connmon.MAX_REPLY_BYTES))

    def handle(self) -> None:
        trusted = False
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                try:
                    self.connection.do_handshake()
                except ssl.SSLEOFError:   # a port probe, most likely
                    log.debug("%s: closed before TLS", self.peer)
                    return
            nonce = secrets.token_hex(16)
            self.send(self.server.welcome(nonce))
            hello = read_message(self.rfile, MAX_HELLO_BYTES)
            if hello is None:   # a port probe, most likely
                log.debug("%s: closed before hello", self.peer)
                return
            serve = self.check_hello(connmon.expect(hello, "hello"), nonce)
            trusted = True
            self.rfile.deadline = None
            self.connection.settimeout(self.server.heartbeat)
            self.send({"op": "ready"})
            serve(hello)
        except connmon.AuthError as err:
            self.refuse("auth", err)
        except ProtocolError as err:
            self.refuse("bad " + (hello["role"] if trusted else "hello"), err)
        except ssl.SSLError as err:
            problems.log(logging.WARNING, "tls", "%s: TLS failed: %s; closing "
                         "the connection", self.peer, brief(err))
        except socket.timeout:
            if trusted:
                log.info("%s: silent for %gs (heartbeat_timeout); closing "
                         "the connection", self.peer, self.server.heartbeat)
            else:
                problems.log(logging.WARNING, "hello", "%s: no hello within "
                             "%gs; closing the connection", self.peer,
                             HELLO_TIMEOUT)
        except OSError as err:
            if trusted:
                log.info("%s: connection lost: %s", self.peer, err)
            else:
                problems.log(logging.INFO, "lost", "%s: connection lost "
                             "before hello: %s", self.peer, brief(err))
        except Exception:   # a bug: say so, keep serving everyone else
            log.exception("%s: internal error; closing the connection",
                          self.peer)

    def check_hello(self, hello: Dict[str, Any], nonce: str):
        """The serve method for a valid hello; ProtocolError otherwise."""
        if hello.get("version") != connmon.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello.get('version')!r}"
                                f" not supported (this daemon speaks "
                                f"{connmon.PROTOCOL_VERSION})")
        role = hello.get("role")
        serve = {"app": self.serve_app, "console": self.serve_console,
                 "peer": self.serve_peer}.get(
            role if isinstance(role, str) else "")
        if serve is None:
            raise ProtocolError(f"unknown role {role!r}")
        secret = self.server.security.secret
        if secret is not None and not connmon.proof_is_valid(
                secret, nonce, role, hello.get("auth")):
            raise connmon.AuthError(f"{role}: authentication failed (wrong "
                                    "or missing secret)")
        return serve

    def refuse(self, kind: str, err: ProtocolError) -> None:
        """One rate-limited log line, the reason to the client, hang up."""
        problems.log(logging.WARNING, kind, "%s: %s; closing the connection",
                     self.peer, brief(err))
        try:
            self.send({"op": "error", "error": brief(err)})
        except OSError:
            pass

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
                if message["op"] == "ping":
                    self.send(PONG)
                    continue
                connmon.expect(message, "update")
                with lock:
                    unknown = picture.update(proc.ident, proc.session,
                                             message, time.monotonic())
                    if unknown is not None:
                        cluster.broadcast({
                            "op": "forward", "id": proc.ident,
                            "session": proc.session, "update": message})
                if unknown:
                    problems.log(logging.WARNING, "unknown", "%s: app %s "
                                 "sent %d events for connections it never "
                                 "announced; ignored", self.peer, name,
                                 unknown)
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
            if request["op"] == "ping":
                self.send(PONG)
            elif request["op"] == "snapshot":
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
        if not (isinstance(value, str) and 0 < len(value) <= MAX_TEXT
                and value.isprintable()):
            raise ProtocolError(f"app hello: 'proc.{key}' must be a string "
                                f"of 1 to {MAX_TEXT} printable characters")
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
        elif op != "ping":
            raise ProtocolError(f"unknown peer message {op!r}")

    def _write_loop(self) -> None:
        """Write what is queued; on a quiet link, a ping every third of the
        heartbeat timeout, so that the peer's reads never time out while
        both nodes live (and do when one is stopped or cut off)."""
        while True:
            with self.ready:
                if not self.outbox:
                    self.ready.wait(self.server.heartbeat / 3)
                sock = self.sock
                batch = list(self.outbox) or [PING]
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
                    security=self.server.security,
                    service=self.server.service.name,
                    node=self.server.node.name)
                conn.sock.settimeout(self.server.heartbeat)
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
# Daemon options: what a service section says beyond name and nodes
# ---------------------------------------------------------------------------


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"expected a port number 1-65535, got {text!r}")
    return int(text)


def _bind_host(text: str) -> str:
    host, port = connmon.parse_address(text, 0)
    if port:
        raise ValueError(f"expected an address without a port (the port "
                         f"is metrics_port), got {text!r}")
    return host


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e6:
        raise ValueError(f"expected a number of seconds above 0, got "
                         f"{text!r}")
    return seconds


def csv_known_columns() -> List[str]:
    """``time``, ``token``, ``service``, ``node`` and every key of a
    snapshot row, learnt from the model so that a key added there is a
    column here without a change."""
    picture = connmon.Picture()
    picture.attach(connmon.ProcessState("x", "host", "prog", 1), None)
    (row,) = picture.snapshot(0.0)["rows"]
    return ["time", "token", "service", "node", *row]


def _columns(text: str) -> List[str]:
    columns = text.replace(",", " ").split()
    known = csv_known_columns()
    unknown = [column for column in columns if column not in known]
    if unknown:
        raise ValueError(f"unknown column {', '.join(unknown)} (known: "
                         f"{', '.join(known)})")
    if len(set(columns)) < len(columns):
        raise ValueError(f"a column is listed twice in {text!r}")
    return columns


def _server_limits(text: str) -> Dict[str, int]:
    """``database_servers``: one database server a line, ``HOST:PORT
    max_connections=N``, HOST:PORT as the applications' URLs name it."""
    limits = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        server, *words = line.split()
        key, _, value = " ".join(words).partition("=")
        if key != "max_connections" or not value.isdigit() or not (
                0 < int(value) < 1 << 31):
            raise ValueError(f"expected HOST:PORT max_connections=N, got "
                             f"{line.strip()!r}")
        try:
            host, port = connmon.parse_address(server, 0)
        except connmon.ConfigError as err:
            raise ValueError(str(err)) from None
        if not port:
            raise ValueError(f"{server!r} needs its port, as in "
                             f"{server}:3306")
        limits[connmon.format_address((host, port))] = int(value)
    return limits


# name: (parse the text, default text); "" means off.
OPTIONS = {
    "metrics_port": (_port, ""),
    "metrics_bind": (_bind_host, ""),
    "csv_dump": (str, ""),
    "csv_columns": (_columns, "time token hostname progname nproc conn "
                    "ckout maxnproc maxconn maxckout ckout_total"),
    "csv_token": (str, ""),
    "csv_interval": (_seconds, "10"),
    "database_servers": (_server_limits, ""),
}


class DaemonOptions:
    """The options of a service section that only connmond reads
    (``connmon.Service`` keeps them as text), checked at start: a typo
    stops the daemon with a message, never silently switches an export
    off."""

    metrics_port: Optional[int]
    metrics_bind: str
    csv_dump: Optional[str]
    csv_columns: List[str]
    csv_token: str
    csv_interval: float
    database_servers: Optional[Dict[str, int]]

    def __init__(self, service: connmon.Service, node: connmon.Node):
        given = {name: service.options.get(name, "").strip()
                 for name in OPTIONS}
        for name, (parse, default) in OPTIONS.items():
            text = given[name] or default
            try:
                setattr(self, name, parse(text) if text else None)
            except ValueError as err:
                raise connmon.ConfigError(f"{service.source}: {name}: {err}"
                                          ) from None
        needs = {"metrics_bind": "metrics_port", "csv_columns": "csv_dump",
                 "csv_token": "csv_dump", "csv_interval": "csv_dump"}
        for name, needed in needs.items():
            if given[name] and not given[needed]:
                raise connmon.ConfigError(f"{service.source}: {name} is set "
                                          f"but {needed} is not")
        self.metrics_bind = self.metrics_bind or node.bind[0]
        self.csv_token = self.csv_token or ""


# ---------------------------------------------------------------------------
# Prometheus: GET /metrics
# ---------------------------------------------------------------------------

class Metric(NamedTuple):
    """One per-row sample of /metrics, labelled with hostname and progname:
    the snapshot row's ``key``; rows whose value is null have none.  A
    summary is two metrics, NAME_sum and NAME_count: rate() over them
    gives the mean over any window, so the snapshot's one-second means and
    maxima are left out."""
    name: str
    key: str
    kind: str
    help: str

    @property
    def family(self) -> str:
        if self.kind == "summary":
            return self.name.rpartition("_")[0]
        return self.name


# OpenTelemetry's database client metrics, db.client.connection.*, by
# the OpenTelemetry-to-Prometheus naming (dots become underscores, the
# unit a suffix, counters end in _total); histograms become summaries.
OTEL = "OpenTelemetry db.client.connection."
METRICS = [
    Metric("connmon_processes", "nproc", "gauge",
           "Processes of the program attached to connmond."),
    Metric("connmon_connections", "conn", "gauge",
           "Open database connections of the program."),
    Metric("connmon_checked_out_connections", "ckout", "gauge",
           "Database connections checked out of their pools."),
    Metric("connmon_max_processes", "maxnproc", "gauge",
           "Most processes at once since the maxima were last cleared."),
    Metric("connmon_max_connections", "maxconn", "gauge",
           "Most open connections at once since the maxima were last "
           "cleared."),
    Metric("connmon_max_checked_out_connections", "maxckout", "gauge",
           "Most checked-out connections at once since the maxima were "
           "last cleared."),
    Metric("connmon_pool_limit_connections", "limit", "gauge",
           "Capacity of the program's pools (pool_size + max_overflow); "
           "absent when unlimited."),
    Metric("connmon_oldest_checkout_age_seconds", "oldest", "gauge",
           "Age of the oldest checked-out connection; absent when none is."),
    Metric("connmon_checkouts_total", "ckout_total", "counter",
           "Checkouts since connmond started."),
    Metric("connmon_connected", "connected", "gauge",
           "1 while a process of the program is attached, 0 once all are "
           "gone."),
    Metric("db_client_connection_pending_requests", "waiting", "gauge",
           "Checkouts waiting for a connection now (" + OTEL +
           "pending_requests)."),
    Metric("db_client_connection_timeouts_total", "timeouts_total",
           "counter", "Checkouts that gave up waiting since connmond "
           "started (" + OTEL + "timeouts)."),
    Metric("db_client_connection_wait_time_seconds_sum",
           "wait_seconds_total", "summary", "Time checkouts took to get a "
           "connection or give up (" + OTEL + "wait_time)."),
    Metric("db_client_connection_wait_time_seconds_count", "waits_total",
           "summary", ""),
    Metric("db_client_connection_create_time_seconds_sum",
           "connect_seconds_total", "summary", "Time new connections took "
           "to open (" + OTEL + "create_time)."),
    Metric("db_client_connection_create_time_seconds_count",
           "connects_total", "summary", ""),
    Metric("db_client_connection_use_time_seconds_sum",
           "hold_seconds_total", "summary", "Time connections stayed "
           "checked out (" + OTEL + "use_time)."),
    Metric("db_client_connection_use_time_seconds_count", "holds_total",
           "summary", ""),
    Metric("connmon_max_pending_requests", "maxwaiting", "gauge",
           "Most checkouts waiting at once since the maxima were last "
           "cleared."),
    Metric("connmon_connect_errors_total", "connect_errors_total", "counter",
           "Checkouts that failed otherwise than by a timeout (the "
           "connection could not be opened) since connmond started."),
    Metric("connmon_invalidations_total", "invalidations_total", "counter",
           "Connections invalidated (failed pre-ping, disconnect detected, "
           "invalidate()) since connmond started."),
]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: Any) -> Any:
    """Booleans as 1 and 0, for Prometheus and spreadsheets alike."""
    return int(value) if isinstance(value, bool) else value


def escape_label_value(text: str) -> str:
    return (text.replace("\\", r"\\").replace('"', r'\"')
            .replace("\n", r"\n"))


def render_metrics(snapshot: Dict[str, Any]) -> str:
    """The snapshot's rows in the Prometheus text exposition format 0.0.4."""
    lines = []
    labels = [f'{{hostname="{escape_label_value(row["hostname"])}",'
              f'progname="{escape_label_value(row["progname"])}"}}'
              for row in snapshot["rows"]]
    family = None
    for metric in METRICS:
        if metric.family != family:
            family = metric.family
            lines.append(f"# HELP {family} {metric.help}")
            lines.append(f"# TYPE {family} {metric.kind}")
        for row, label in zip(snapshot["rows"], labels):
            value = row.get(metric.key)
            if value is not None:
                lines.append(f"{metric.name}{label} {_number(value)}")
    return "\n".join(lines) + "\n"


class MetricsServer(socketserver.ThreadingTCPServer):
    """``GET /metrics`` and ``GET /healthz`` for one ConnmonServer.

    A plain TCP server under ``http.server``'s handler: HTTPServer would
    look the bind address up in DNS at start.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: connmon.Address, daemon: ConnmonServer):
        self.daemon = daemon
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, MetricsHandler)


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = 10   # seconds; a client that sends nothing is dropped

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/metrics":
            self.reply(200, render_metrics(self.server.daemon.snapshot()),
                       METRICS_CONTENT_TYPE)
        elif path == "/healthz":
            # Serving means the state lock can be had: not wedged.
            lock = self.server.daemon.lock
            if lock.acquire(timeout=5):
                lock.release()
                self.reply(200, "ok\n")
            else:
                self.reply(503, "connmond state lock is stuck\n")
        else:
            self.reply(404, "connmond serves /metrics and /healthz\n")

    def reply(self, status: int, body: str,
              content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


# ---------------------------------------------------------------------------
# CSV dump
# ---------------------------------------------------------------------------


def _csv_cell(value: Any) -> Any:
    return "" if value is None else _number(value)


class CsvDump:
    """Every interval, appends a line per host+program whose values changed
    since the last line written for it.

    The file is opened anew each time: it is never truncated, a restarted
    daemon goes on appending under the existing header, and a file rotated
    away is started afresh with a header.  Failing to write is logged once
    (then at DEBUG) and retried; the daemon carries on.
    """

    def __init__(self, daemon: ConnmonServer, options: DaemonOptions):
        self.daemon = daemon
        self.path = options.csv_dump
        self.columns = options.csv_columns
        self.interval = options.csv_interval
        self.fixed = {"token": options.csv_token,
                      "service": daemon.service.name,
                      "node": daemon.node.name}
        self.header = self.format([self.columns])
        self.written: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self.failing = False

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.dump()
            except Exception:  # never let the thread die silently
                log.exception("CSV dump to %s failed", self.path)

    def dump(self) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        changed = {}
        for row in self.daemon.snapshot()["rows"]:
            record = {**row, **self.fixed}
            cells = {column: _csv_cell(record[column])
                     for column in self.columns if column != "time"}
            key = (row["hostname"], row["progname"])
            if self.written.get(key) != cells:
                changed[key] = cells
        if not changed:
            return
        text = self.format([stamp if column == "time" else cells[column]
                            for column in self.columns]
                           for cells in changed.values())
        try:
            self.append(text)
        except (OSError, ValueError) as err:
            (log.debug if self.failing else log.error)(
                "cannot write CSV to %s: %s; connmond carries on and "
                "retries every %gs", self.path, err, self.interval)
            self.failing = True
            return
        if self.failing:
            log.warning("writing CSV to %s again", self.path)
            self.failing = False
        self.written.update(changed)

    def append(self, text: str) -> None:
        with open(self.path, "a+", encoding="utf-8", newline="") as file:
            if os.fstat(file.fileno()).st_size == 0:
                text = self.header + text
            else:
                file.seek(0)
                first = file.readline(len(self.header) + 1)
                if first != self.header:
                    raise ValueError(
                        f"the file starts with {first.strip()!r}, not this "
                        f"csv_columns header {self.header.strip()!r}; move "
                        "it away or set csv_columns to match")
            file.write(text)

    @staticmethod
    def format(rows) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(rows)
        return out.getvalue()


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
    parser.add_argument("--log-level",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the root logger's level (default: INFO, or "
                        "what the config file's logging sections say)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the config for this service and node, "
                        "say OK or what is wrong, and exit")
    return parser


def config_path(given: Optional[str]) -> Optional[str]:
    """The config file load_config reads, or None for the built-in one."""
    if given is None and os.path.exists(connmon.DEFAULT_CONFIG_FILE):
        return connmon.DEFAULT_CONFIG_FILE
    return given


def configure_logging(path: Optional[str], level: Optional[str]) -> None:
    """Log to stderr, or as the config file's ``[loggers]``, ``[handlers]``
    and ``[formatters]`` sections say (the ``logging.config.fileConfig``
    format).  ``--log-level`` sets the root logger's level either way."""
    sections = configparser.ConfigParser(interpolation=None)
    if path:
        sections.read(path, encoding="utf-8")   # readable: parsed already
    if {"loggers", "handlers", "formatters"} & set(sections.sections()):
        try:
            logging.config.fileConfig(path, disable_existing_loggers=False)
        except Exception as err:  # fileConfig raises anything at all
            raise connmon.ConfigError(
                f"{path}: logging sections: {type(err).__name__}: {err}"
            ) from None
    else:
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s "
                            "%(name)s %(levelname)s %(message)s")
        level = level or "INFO"
    if level:
        logging.getLogger().setLevel(level)


def describe(node: connmon.Node, options: DaemonOptions) -> str:
    parts = [f"node {node.name} listening on "
             f"{connmon.format_address(node.bind)}"]
    if options.metrics_port:
        parts.append("metrics on " + connmon.format_address(
            (options.metrics_bind, options.metrics_port)))
    if options.csv_dump:
        parts.append(f"CSV to {options.csv_dump} every "
                     f"{options.csv_interval:g}s")
    return ", ".join(parts)


def raise_file_limit(clients: int) -> None:
    """Let connmond hold max_clients sockets: the soft limit on open files
    is often 1024, the hard one much higher."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = clients + 64   # and a few for the rest
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open files are limited to %d: fewer than "
                        "max_clients (%d) clients fit (raise LimitNOFILE)",
                        new, clients)


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path(args.config)
    try:
        service = connmon.find_service(args.service, args.config)
        node = choose_node(service, args.node)
        options = DaemonOptions(service, node)
        connmon.Security.of_service(service).server_context()
        configure_logging(path, args.log_level)
    except connmon.ConfigError as err:
        print(f"connmond: error: {err}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"connmond: config OK: {path or '<built-in default>'} service "
              f"{service.name!r}: {describe(node, options)}")
        return 0
    metrics = None
    address = node.bind
    try:
        server = ConnmonServer(service, node)
        if options.metrics_port:
            address = (options.metrics_bind, options.metrics_port)
            metrics = MetricsServer(address, server)
    except connmon.ConfigError as err:
        print(f"connmond: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"connmond: error: cannot listen on "
              f"{connmon.format_address(address)}: {err}", file=sys.stderr)
        return 1
    if metrics is not None:
        threading.Thread(target=metrics.serve_forever, daemon=True,
                         name="connmond-metrics").start()
    if options.csv_dump:
        threading.Thread(target=CsvDump(server, options).run, daemon=True,
                         name="connmond-csv").start()
    server.picture.server_limits = options.database_servers or {}
    raise_file_limit(server.max_clients)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    log.info("connmond %s: service %r %s", connmon.__version__,
             service.name, describe(node, options))
    server.cluster.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("connmond stopping")
    finally:
        server.server_close()
        if metrics is not None:
            metrics.shutdown()
            metrics.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
