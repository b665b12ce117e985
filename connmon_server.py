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
import collections
import logging
import secrets
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from typing import Any, Dict, Optional

import connmon
from connmon import ProtocolError, read_message

log = logging.getLogger("connmond")

HELLO_TIMEOUT = 10.0      # seconds a new connection has to say hello
MAX_TEXT = 255            # longest hostname / progname accepted
MAX_HELLO_BYTES = 16384   # the most a client may send before it is trusted
DEFAULT_MAX_CLIENTS = 4096
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
        return {"service": self.service.name, "node": self.node.name,
                **snapshot}

    def welcome(self, nonce: str) -> Dict[str, Any]:
        return {"op": "welcome", "version": connmon.PROTOCOL_VERSION,
                "service": self.service.name, "node": self.node.name,
                "nonce": nonce, "heartbeat": self.heartbeat}


PONG = {"op": "pong"}


class ConnmonHandler(socketserver.StreamRequestHandler):
    """One client connection: an application process or a console."""

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
        serve = {"app": self.serve_app, "console": self.serve_console}.get(
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
                if message["op"] == "ping":
                    self.send(PONG)
                    continue
                connmon.expect(message, "update")
                with lock:
                    unknown = picture.update(proc.ident, self, message,
                                             time.monotonic())
                if unknown:
                    problems.log(logging.WARNING, "unknown", "%s: app %s "
                                 "sent %d events for connections it never "
                                 "announced; ignored", self.peer, name,
                                 unknown)
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
            if request["op"] == "ping":
                self.send(PONG)
            elif request["op"] == "snapshot":
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
        if not (isinstance(value, str) and 0 < len(value) <= MAX_TEXT
                and value.isprintable()):
            raise ProtocolError(f"app hello: 'proc.{key}' must be a string "
                                f"of 1 to {MAX_TEXT} printable characters")
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
    except connmon.ConfigError as err:
        print(f"connmond: error: {err}", file=sys.stderr)
        return 2
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
