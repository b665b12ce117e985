"""connmon: watch the database connections of every SQLAlchemy process.

This one file is all an application host needs.  Read top to bottom:

1. configuration   -- the ``/etc/connmon.cfg`` file and its ``nodes:`` syntax
2. wire protocol   -- newline-delimited JSON over TCP, with hard size limits
3. state model     -- one process's connections, and the daemon's picture of
                      every process grouped by host and program
4. sender          -- the background thread that ships a process's pool
                      events to ``connmond`` and resends its whole state after
                      every reconnect
5. SQLAlchemy glue -- the ``<driver>_connmon`` dialect names and the
                      ``?plugin=connmon`` engine plugin

Sections 1-3 use only the standard library (the daemon and the console import
them); SQLAlchemy is imported only by section 5, when an engine asks for it.

The application is never hurt by monitoring: pool event listeners only append
a tuple to a deque; the network, DNS and every retry happen on one daemon
thread per process, and no exception from here reaches the application once
``create_engine()`` has returned.
"""

from __future__ import annotations

import collections
import configparser
import itertools
import json
import logging
import os
import random
import select
import socket
import sys
import threading
import time
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

__version__ = "0.4.0"

log = logging.getLogger("connmon")

DEFAULT_CONFIG_FILE = "/etc/connmon.cfg"
DEFAULT_PORT = 5800
DEFAULT_SERVICE = "default"
DEFAULT_CONFIG_TEXT = """\
[connmon_service_default]
name: default

nodes:
    node1 hostname=localhost:5800 bind=0.0.0.0
"""


# ---------------------------------------------------------------------------
# 1. Configuration
# ---------------------------------------------------------------------------


class ConfigError(ValueError):
    """A configuration file, URL parameter or address that cannot be used."""


Address = Tuple[str, int]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse ``HOST[:PORT]``; IPv6 hosts are written ``[::1]:5800``."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a bare name, IPv4 address or unbracketed IPv6 address
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"bad address {text!r}: no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"bad port {port_text!r} in address {text!r}")
    return host, int(port_text)


def format_address(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Node:
    """One connmond of a service: where clients reach it, where it listens."""

    def __init__(self, name: str, address: Address, bind: Address):
        self.name = name
        self.address = address
        self.bind = bind

    def __repr__(self) -> str:
        return f"<Node {self.name} {format_address(self.address)}>"


class Service:
    """A ``[connmon_service_NAME]`` section: its nodes and other options."""

    def __init__(self, name: str, nodes: List[Node], options: Dict[str, str],
                 source: str):
        self.name = name
        self.nodes = nodes
        self.options = options
        self.source = source

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"{self.source}: service {self.name!r} has no node "
                          f"{name!r} (nodes: {known})")


def _parse_node_line(line: str, where: str) -> Node:
    """``NODENAME hostname=HOST[:PORT] [bind=ADDR[:PORT]]``."""
    name, *words = line.split()
    fields = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in ("hostname", "bind") or not value:
            raise ConfigError(f"{where}: unexpected {word!r} in node line "
                              f"{line!r}; expected hostname=HOST[:PORT] "
                              "[bind=ADDR[:PORT]]")
        fields[key] = value
    if "hostname" not in fields:
        raise ConfigError(f"{where}: node line {line!r} has no "
                          "hostname=HOST[:PORT]")
    try:
        address = parse_address(fields["hostname"])
        wildcard = "::" if ":" in address[0] else "0.0.0.0"
        bind = parse_address(fields.get("bind", wildcard), address[1])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return Node(name, address, bind)


def _line_number(text: str, section: str, needle: str) -> int:
    """The line of ``text`` where ``needle`` first appears inside ``section``.

    configparser forgets line numbers; operators want them in errors.
    """
    in_section = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped == f"[{section}]"
        elif in_section and needle in line:
            return number
    return 0


def parse_config(text: str, source: str) -> Dict[str, Service]:
    """Parse config text into services keyed by their ``name:``."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        raise ConfigError(f"{source}: {err}") from None
    services: Dict[str, Service] = {}
    for section in parser.sections():
        if not section.startswith("connmon_service_"):
            continue
        options = dict(parser[section])

        def where(needle: str) -> str:
            line = _line_number(text, section, needle)
            return f"{source}, [{section}]" + (f", line {line}" if line else "")

        if not options.get("name"):
            raise ConfigError(f"{where('name')}: missing 'name:'")
        if not options.get("nodes", "").strip():
            raise ConfigError(f"{where('nodes')}: missing 'nodes:' (one node "
                              "a line: NODENAME hostname=HOST[:PORT])")
        nodes = [_parse_node_line(line, where(line))
                 for line in options.pop("nodes").splitlines() if line.strip()]
        names = [node.name for node in nodes]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"{where(name)}: node {name!r} is listed "
                                  "twice")
        name = options.pop("name")
        services[name] = Service(name, nodes, options, f"{source} [{section}]")
    return services


def load_config(path: Optional[str] = None) -> Dict[str, Service]:
    """Read ``path``, or ``/etc/connmon.cfg``, or else the built-in default.

    A file named explicitly must exist; the default file is optional.
    """
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_FILE):
            return parse_config(DEFAULT_CONFIG_TEXT, "<built-in default>")
        path = DEFAULT_CONFIG_FILE
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    return parse_config(text, path)


def find_service(name: str = DEFAULT_SERVICE,
                 path: Optional[str] = None) -> Service:
    services = load_config(path)
    if name not in services:
        known = ", ".join(sorted(services)) or "none"
        raise ConfigError(f"{path or DEFAULT_CONFIG_FILE}: unknown service "
                          f"{name!r} (services: {known})")
    return services[name]


def candidate_addresses(service: Service,
                        node: Optional[str] = None) -> List[Address]:
    """Addresses to try in order: the pinned node, else every node shuffled."""
    if node:
        return [service.node(node).address]
    addresses = [n.address for n in service.nodes]
    random.shuffle(addresses)
    return addresses


# ---------------------------------------------------------------------------
# 2. Wire protocol
# ---------------------------------------------------------------------------
#
# One JSON object a line, UTF-8, at most MAX_MESSAGE_BYTES including the
# newline.  The daemon speaks first:
#
#   daemon -> {"op": "welcome", "version": 1, "service": S, "node": N}
#   client -> {"op": "hello", "version": 1, "role": "app"|"console", ...}
#
# An app's hello carries "proc": {"id", "hostname", "progname", "pid"}; then
# it sends {"op": "state", ...} (its whole state, which replaces whatever the
# daemon knew of that process) and afterwards {"op": "events", "events": [...]}
# batches.  Each event is [KIND, CONN_ID, AGO] or [KIND, ID, AGO, EXTRA]:
# AGO is how many seconds before the message was sent the event happened, so
# clocks of different hosts never need to agree.  A console sends requests
# such as {"op": "snapshot"} and reads one reply line per request.  A
# malformed message gets {"op": "error", "error": TEXT} and a closed socket.

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_EVENTS_PER_MESSAGE = 5000

CONNECT = "C"    # [C, conn, ago, pool]   a new DBAPI connection in pool
CHECKOUT = "O"   # [O, conn, ago, pool]   handed to the application
CHECKIN = "I"    # [I, conn, ago]         returned to the pool
CLOSE = "X"      # [X, conn, ago]         closed, invalidated, discarded
POOL = "P"       # [P, pool, ago, limit]  a pool: pool_size + max_overflow,
                 #                        or null when unlimited


class ProtocolError(Exception):
    """The peer sent something that is not connmon protocol."""


def encode(message: Dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the "
                            f"{MAX_MESSAGE_BYTES} byte limit")
    return data


def decode(line: bytes) -> Dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("not a JSON object with a string 'op'")
    return message


def read_message(rfile) -> Optional[Dict[str, Any]]:
    """Read one message from a binary file; None at a clean end of stream."""
    line = rfile.readline(MAX_MESSAGE_BYTES + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        if len(line) > MAX_MESSAGE_BYTES:
            raise ProtocolError(f"message longer than {MAX_MESSAGE_BYTES} "
                                "bytes")
        raise ProtocolError("connection closed in the middle of a message")
    return decode(line)


def expect(message: Optional[Dict[str, Any]], op: str) -> Dict[str, Any]:
    """Check that the peer answered with ``op``; raise a clear error if not."""
    if message is None:
        raise ProtocolError(f"connection closed while waiting for {op!r}")
    if message["op"] == "error":
        raise ProtocolError(f"refused: {message.get('error')}")
    if message["op"] != op:
        raise ProtocolError(f"expected {op!r}, got {message['op']!r}")
    return message


class Connection:
    """A client's handshaken connection to one connmond."""

    def __init__(self, sock: socket.socket, welcome: Dict[str, Any]):
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.welcome = welcome

    def send(self, message: Dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        self.send(message)
        return expect(read_message(self.rfile), message["op"])

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def open_connection(addresses: Iterable[Address], role: str,
                    timeout: float = 5.0, **hello: Any) -> Connection:
    """Connect to the first address that answers and do the handshake.

    Raises OSError naming every address tried when none works.
    """
    failures = []
    for address in addresses:
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except OSError as err:
            failures.append(f"{format_address(address)}: {err}")
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, {})
            conn.welcome = expect(read_message(conn.rfile), "welcome")
            conn.send(dict(op="hello", version=PROTOCOL_VERSION, role=role,
                           **hello))
            return conn
        except (OSError, ProtocolError) as err:
            sock.close()
            failures.append(f"{format_address(address)}: {err}")
    raise OSError("no connmond answered (" + "; ".join(failures) + ")")


# ---------------------------------------------------------------------------
# 3. State model
# ---------------------------------------------------------------------------
#
# The application keeps a ProcessState for itself; the daemon keeps one per
# attached process inside a Picture, and both change them with the same
# ProcessState.apply(), so the two can never disagree about what an event
# means.


class PooledConnection:
    __slots__ = ("pool", "checked_out_at")

    def __init__(self, pool: int, checked_out_at: Optional[float] = None):
        self.pool = pool
        self.checked_out_at = checked_out_at  # None while idle in the pool


class ProcessState:
    """The connections of one process, and its maxima."""

    def __init__(self, ident: str, hostname: str, progname: str, pid: int):
        self.ident = ident
        self.hostname = hostname
        self.progname = progname
        self.pid = pid
        self.conns: Dict[int, PooledConnection] = {}
        self.pools: Dict[int, Optional[int]] = {}
        self.checked_out = 0
        self.max_conns = 0
        self.max_checked_out = 0
        self.since = time.time()

    @property
    def key(self) -> Tuple[str, str]:
        return self.hostname, self.progname

    def apply(self, kind: str, ident: int, when: float,
              extra: Any = None) -> Tuple[int, int]:
        """Apply one event; return the change in (connections, checkouts).

        Events for connections this process does not know are what a forked
        child sees for its parent's connections: a checkout adopts the
        connection, a checkin or close of it changes nothing.
        """
        conn = self.conns.get(ident)
        if kind == CHECKOUT:
            added = 0
            if conn is None:
                conn = self.conns[ident] = PooledConnection(extra)
                added = 1
            if conn.checked_out_at is not None:
                return self._changed(added, 0)
            conn.checked_out_at = when
            return self._changed(added, 1)
        if kind == CHECKIN:
            if conn is None or conn.checked_out_at is None:
                return 0, 0
            conn.checked_out_at = None
            return self._changed(0, -1)
        if kind == CONNECT:
            if conn is not None:
                return 0, 0
            self.conns[ident] = PooledConnection(extra)
            return self._changed(1, 0)
        if kind == CLOSE:
            if conn is None:
                return 0, 0
            del self.conns[ident]
            return self._changed(-1, -1 if conn.checked_out_at is not None
                                 else 0)
        if kind == POOL:
            self.pools[ident] = extra
            return 0, 0
        raise ProtocolError(f"unknown event kind {kind!r}")

    def _changed(self, conns: int, checkouts: int) -> Tuple[int, int]:
        self.checked_out += checkouts
        if len(self.conns) > self.max_conns:
            self.max_conns = len(self.conns)
        if self.checked_out > self.max_checked_out:
            self.max_checked_out = self.checked_out
        return conns, checkouts

    @property
    def limit(self) -> Optional[int]:
        """Capacity of all this process's pools; None if any is unlimited."""
        if any(limit is None for limit in self.pools.values()):
            return None
        return sum(self.pools.values())

    def oldest_checkout(self) -> Optional[float]:
        times = [c.checked_out_at for c in self.conns.values()
                 if c.checked_out_at is not None]
        return min(times) if times else None

    # The "state" message: everything needed to rebuild this object.

    def to_message(self, now: float) -> Dict[str, Any]:
        return {
            "op": "state",
            "conns": [[ident, c.pool, None if c.checked_out_at is None
                       else round(now - c.checked_out_at, 6)]
                      for ident, c in self.conns.items()],
            "pools": [[ident, limit] for ident, limit in self.pools.items()],
        }

    def load_message(self, message: Dict[str, Any], now: float) -> None:
        """Replace everything with a "state" message (validated here)."""
        conns, pools = message.get("conns"), message.get("pools")
        if not isinstance(conns, list) or not isinstance(pools, list):
            raise ProtocolError("state message needs 'conns' and 'pools' "
                                "lists")
        self.conns.clear()
        self.pools.clear()
        self.checked_out = 0
        for item in pools:
            if not (isinstance(item, list) and len(item) == 2
                    and _is_int(item[0]) and (item[1] is None
                                              or _is_int(item[1]))):
                raise ProtocolError(f"bad pool entry {item!r}")
            self.apply(POOL, item[0], now, item[1])
        for item in conns:
            if not (isinstance(item, list) and len(item) == 3
                    and _is_int(item[0]) and _is_int(item[1])
                    and (item[2] is None or _is_age(item[2]))):
                raise ProtocolError(f"bad connection entry {item!r}")
            self.apply(CONNECT, item[0], now, item[1])
            if item[2] is not None:
                self.apply(CHECKOUT, item[0], now - item[2])


def _is_int(value: Any) -> bool:
    return type(value) is int and -(1 << 62) < value < (1 << 62)


def _is_age(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < 1e9


def parse_events(message: Dict[str, Any]) -> List[list]:
    """Validate an "events" message and return its events."""
    events = message.get("events")
    if not isinstance(events, list) or len(events) > MAX_EVENTS_PER_MESSAGE:
        raise ProtocolError("events message needs an 'events' list of at "
                            f"most {MAX_EVENTS_PER_MESSAGE} events")
    for event in events:
        if not _valid_event(event):
            raise ProtocolError(f"bad event {event!r}")
    return events


def _valid_event(event: Any) -> bool:
    if not (isinstance(event, list) and event and isinstance(event[0], str)
            and len(event) == _EVENT_LENGTH.get(event[0])):
        return False
    if not (_is_int(event[1]) and _is_age(event[2])):
        return False
    return (len(event) == 3 or _is_int(event[3])
            or (event[0] == POOL and event[3] is None))


_EVENT_LENGTH = {CONNECT: 4, CHECKOUT: 4, CHECKIN: 3, CLOSE: 3, POOL: 4}


class RateMeter:
    """Events per second over the last complete second."""

    __slots__ = ("second", "count", "last")

    def __init__(self) -> None:
        self.second = 0
        self.count = 0
        self.last = 0

    def add(self, when: float) -> None:
        second = int(when)
        if second > self.second:
            self.last = self.count if second == self.second + 1 else 0
            self.second, self.count = second, 0
        self.count += 1

    def rate(self, now: float) -> int:
        second = int(now)
        if second == self.second:
            return self.last
        return self.count if second == self.second + 1 else 0


class ProgramRow:
    """The live totals and the maxima of one host+program."""

    def __init__(self, hostname: str, progname: str):
        self.hostname = hostname
        self.progname = progname
        self.nproc = self.conn = self.ckout = 0
        self.maxnproc = self.maxconn = self.maxckout = 0
        self.checkouts = RateMeter()

    def add(self, nproc: int, conn: int, ckout: int) -> None:
        self.nproc += nproc
        self.conn += conn
        self.ckout += ckout
        self.maxnproc = max(self.maxnproc, self.nproc)
        self.maxconn = max(self.maxconn, self.conn)
        self.maxckout = max(self.maxckout, self.ckout)

    def clear_maxima(self) -> None:
        self.maxnproc, self.maxconn, self.maxckout = (
            self.nproc, self.conn, self.ckout)


class Picture:
    """Everything one daemon knows: attached processes and per-program rows.

    Not thread-safe by itself: the daemon holds one lock around every call.
    Times are the daemon's ``time.monotonic()``.
    """

    def __init__(self) -> None:
        self.processes: Dict[str, ProcessState] = {}
        self.owners: Dict[str, object] = {}
        self.rows: Dict[Tuple[str, str], ProgramRow] = {}
        self.host_nproc: collections.Counter = collections.Counter()
        self.connections = self.checkouts = 0
        self.max_hosts = self.max_processes = 0
        self.max_connections = self.max_checkouts = 0

    def _row(self, proc: ProcessState) -> ProgramRow:
        row = self.rows.get(proc.key)
        if row is None:
            row = self.rows[proc.key] = ProgramRow(*proc.key)
        return row

    def _add(self, proc: ProcessState, sign: int) -> None:
        """Count a whole process in (sign 1) or out (sign -1)."""
        conns, checkouts = sign * len(proc.conns), sign * proc.checked_out
        self._row(proc).add(sign, conns, checkouts)
        self.host_nproc[proc.hostname] += sign
        if self.host_nproc[proc.hostname] <= 0:
            del self.host_nproc[proc.hostname]
        self._totals(conns, checkouts)

    def _totals(self, conns: int, checkouts: int) -> None:
        self.connections += conns
        self.checkouts += checkouts
        self.max_connections = max(self.max_connections, self.connections)
        self.max_checkouts = max(self.max_checkouts, self.checkouts)
        self.max_processes = max(self.max_processes, len(self.processes))
        self.max_hosts = max(self.max_hosts, len(self.host_nproc))

    def attach(self, proc: ProcessState, owner: object) -> None:
        """Add a process, replacing any earlier state of the same process."""
        old = self.processes.pop(proc.ident, None)
        if old is not None:
            self._add(old, -1)
        self.processes[proc.ident] = proc
        self.owners[proc.ident] = owner
        self._add(proc, 1)

    def detach(self, ident: str, owner: object) -> bool:
        """Drop a process, unless a newer connection has taken it over."""
        if self.owners.get(ident) is not owner:
            return False
        del self.owners[ident]
        self._add(self.processes.pop(ident), -1)
        return True

    def apply_events(self, ident: str, owner: object, events: List[list],
                     now: float) -> None:
        """Apply a batch, unless a newer connection has taken the process."""
        if self.owners.get(ident) is not owner:
            return
        proc = self.processes[ident]
        row = self._row(proc)
        for event in events:
            when = now - event[2]
            conns, checkouts = proc.apply(event[0], event[1], when,
                                          event[3] if len(event) > 3 else None)
            if event[0] == CHECKOUT:
                row.checkouts.add(when)
            if conns or checkouts:
                row.add(0, conns, checkouts)
                self._totals(conns, checkouts)

    def clear_maxima(self) -> None:
        for row in self.rows.values():
            row.clear_maxima()
        self.max_hosts, self.max_processes = (len(self.host_nproc),
                                              len(self.processes))
        self.max_connections, self.max_checkouts = (self.connections,
                                                    self.checkouts)

    def snapshot(self, now: float) -> Dict[str, Any]:
        """The JSON snapshot of DESIGN.md (without "service" and "node")."""
        rows = [{
            "hostname": row.hostname,
            "progname": row.progname,
            "connected": row.nproc > 0,
            "nproc": row.nproc,
            "conn": row.conn,
            "ckout": row.ckout,
            "maxnproc": row.maxnproc,
            "maxconn": row.maxconn,
            "maxckout": row.maxckout,
            "ckout_per_sec": row.checkouts.rate(now),
        } for _, row in sorted(self.rows.items())]
        return {
            "hosts": len(self.host_nproc),
            "max_hosts": self.max_hosts,
            "processes": len(self.processes),
            "max_processes": self.max_processes,
            "connections": self.connections,
            "max_connections": self.max_connections,
            "checkouts": self.checkouts,
            "max_checkouts": self.max_checkouts,
            "checkouts_per_sec": sum(r["ckout_per_sec"] for r in rows),
            "rows": rows,
        }


# ---------------------------------------------------------------------------
# 4. The sender: one background thread per process and daemon address list
# ---------------------------------------------------------------------------

FLUSH_DELAY = 0.01       # gather a batch for this long after the first event
RECONNECT_MIN = 0.1      # first retry after a lost connection
RECONNECT_MAX = 5.0      # retries back off to at most this many seconds
SEND_TIMEOUT = 5.0       # a daemon that does not read for this long is lost

DISPOSE = "D"            # app-side only: [D, pool, t], turned into closes


def progname() -> str:
    """The program's name as operators know it: ``nova-api``, not python."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(argv0)
    if name in ("", "-c", "-m", "__main__.py"):
        name = os.path.basename(sys.executable) or "python"
    return name


class Sender:
    """Ships one process's pool events to connmond from a daemon thread.

    Listeners on application threads call ``events.append`` and ``wake``
    only.  The thread drains the deque into ``state`` (so memory stays
    bounded whatever the daemon does), and while connected forwards the same
    events; after every (re)connect it first sends the whole state.
    """

    def __init__(self, addresses: List[Address], description: str):
        self.addresses = addresses
        self.description = description
        self.events: collections.deque = collections.deque()
        self._start()

    def _start(self) -> None:
        """(Re)initialise everything per-process; also used after fork."""
        self.events.clear()
        self.state = ProcessState(os.urandom(8).hex(), socket.gethostname(),
                                  progname(), os.getpid())
        self._orphans: set = set()   # checked out when their pool was disposed
        self._wake_pending = False
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="connmon-sender")
        self._thread.start()

    def after_fork_in_child(self) -> None:
        os.close(self._wake_read)
        os.close(self._wake_write)
        self._start()

    def wake(self) -> None:
        """Tell the thread there are events; one pipe write per batch."""
        if not self._wake_pending:
            self._wake_pending = True
            try:
                os.write(self._wake_write, b"!")
            except OSError:
                pass

    # -- the thread ---------------------------------------------------------

    def _run(self) -> None:
        conn: Optional[Connection] = None
        delay = 0.0
        retry_at = 0.0
        failures = 0
        while True:
            try:
                if conn is None and time.monotonic() >= retry_at:
                    conn = self._connect(failures)
                    if conn is None:
                        failures += 1
                        delay = min(RECONNECT_MAX,
                                    max(RECONNECT_MIN, delay * 2))
                        retry_at = time.monotonic() + delay * random.uniform(
                            0.8, 1.2)
                    else:
                        failures, delay = 0, 0.0
                waiting = [self._wake_read] + ([conn.sock] if conn else [])
                timeout = None if conn else max(0.0,
                                                retry_at - time.monotonic())
                readable, _, _ = select.select(waiting, [], [], timeout)
                if conn is not None and conn.sock in readable:
                    if not conn.sock.recv(4096):
                        log.warning("connmon: connmond %s closed the "
                                    "connection", self.description)
                        conn = self._drop(conn)
                        retry_at = time.monotonic()
                if self._wake_read in readable:
                    time.sleep(FLUSH_DELAY)
                    os.read(self._wake_read, 4096)
                    self._wake_pending = False
                    batch = self._drain()
                    if conn is not None and batch:
                        self._send_events(conn, batch)
            except (OSError, ProtocolError) as err:
                log.warning("connmon: lost connmond %s: %s", self.description,
                            err)
                conn = self._drop(conn)
                retry_at = time.monotonic() + RECONNECT_MIN
            except Exception:  # never let the thread die silently
                log.exception("connmon: sender error")
                conn = self._drop(conn)
                retry_at = time.monotonic() + RECONNECT_MAX

    def _connect(self, failures: int) -> Optional[Connection]:
        state = self.state
        proc = {"id": state.ident, "hostname": state.hostname,
                "progname": state.progname, "pid": state.pid}
        try:
            conn = open_connection(self.addresses, "app", proc=proc)
            conn.sock.settimeout(SEND_TIMEOUT)
            self._drain()
            conn.send(state.to_message(time.monotonic()))
        except (OSError, ProtocolError) as err:
            # Say it once, then quietly keep trying.
            (log.warning if failures == 0 else log.debug)(
                "connmon: cannot reach connmond %s: %s", self.description, err)
            return None
        log.info("connmon: connected to connmond %s (node %s)",
                 self.description, conn.welcome.get("node"))
        return conn

    @staticmethod
    def _drop(conn: Optional[Connection]) -> None:
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass
        return None

    def _drain(self) -> List[list]:
        """Apply queued events to our state; return them in wire form."""
        events = self.events
        now = time.monotonic()
        batch = []
        state = self.state
        for _ in range(len(events)):
            kind, ident, when, *extra = events.popleft()
            if kind == DISPOSE:
                batch.extend(self._dispose_pool(ident, when))
                continue
            if ident is None:  # a record with no id: not ours to count
                continue
            state.apply(kind, ident, when, *extra)
            batch.append([kind, ident, round(now - when, 6), *extra])
            if kind == CHECKIN and ident in self._orphans:
                # Returned to a disposed pool: it is gone from our view.
                self._orphans.discard(ident)
                state.apply(CLOSE, ident, when)
                batch.append([CLOSE, ident, round(now - when, 6)])
        return batch

    def _dispose_pool(self, pool: int, when: float) -> List[list]:
        """``engine.dispose()`` left a pool: its idle connections are gone and
        the checked-out ones will go when returned (no close event fires for
        them; the old pool is simply forgotten)."""
        closes = []
        for ident, conn in list(self.state.conns.items()):
            if conn.pool != pool:
                continue
            if conn.checked_out_at is None:
                self.state.apply(CLOSE, ident, when)
                closes.append([CLOSE, ident, round(time.monotonic() - when, 6)])
            else:
                self._orphans.add(ident)
        return closes

    @staticmethod
    def _send_events(conn: Connection, batch: List[list]) -> None:
        for start in range(0, len(batch), MAX_EVENTS_PER_MESSAGE):
            conn.send({"op": "events",
                       "events": batch[start:start + MAX_EVENTS_PER_MESSAGE]})


_senders: Dict[Tuple[Address, ...], Sender] = {}
_senders_lock = threading.Lock()


def get_sender(addresses: List[Address], description: str) -> Sender:
    """The process's sender for this daemon address list, made on first use."""
    key = tuple(sorted(addresses))
    with _senders_lock:
        sender = _senders.get(key)
        if sender is None:
            sender = _senders[key] = Sender(addresses, description)
        return sender


def _after_fork_in_child() -> None:
    global _senders_lock
    _senders_lock = threading.Lock()
    for sender in _senders.values():
        sender.after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---------------------------------------------------------------------------
# 5. SQLAlchemy glue
# ---------------------------------------------------------------------------

URL_PARAMETERS = ("connmon_service", "connmon_addr", "connmon_config")
CONN_ID = "connmon_id"   # key in ConnectionPoolEntry.info

_connection_ids = itertools.count(1)
_pool_ids = itertools.count(1)
_instrumented: "weakref.WeakSet" = weakref.WeakSet()


def url_settings(query: Dict[str, Any]) -> Dict[str, str]:
    """The ``connmon_*`` parameters of a URL query, checked."""
    settings = {}
    for key, value in query.items():
        if not key.startswith("connmon_"):
            continue
        if key not in URL_PARAMETERS:
            raise ConfigError(f"unknown URL parameter {key!r}; connmon knows "
                              + ", ".join(URL_PARAMETERS))
        if isinstance(value, tuple):
            raise ConfigError(f"URL parameter {key!r} is given more than once")
        settings[key] = value
    return settings


def resolve_target(settings: Dict[str, str]) -> Tuple[List[Address], str]:
    """Daemon addresses (and a description for logs) for URL settings.

    Reads the config file but does no DNS: names are resolved by the sender.
    """
    if "connmon_addr" in settings:
        address = parse_address(settings["connmon_addr"])
        return [address], format_address(address)
    service = find_service(settings.get("connmon_service", DEFAULT_SERVICE),
                           settings.get("connmon_config"))
    return ([node.address for node in service.nodes],
            f"service {service.name!r}")


def _pool_limit(pool) -> Optional[int]:
    """QueuePool capacity: pool_size + max_overflow; None when unlimited.

    QueuePool keeps max_overflow only as ``_max_overflow``; reading it is the
    one way to know the limit (nothing is changed).
    """
    max_overflow = getattr(pool, "_max_overflow", None)
    if max_overflow is None or max_overflow < 0 or not hasattr(pool, "size"):
        return None
    return pool.size() + max_overflow


def instrument(engine, settings: Dict[str, str]) -> None:
    """Listen to the engine's pool events; called once create_engine() has
    made the engine.  Configuration errors raise here, at start-up."""
    from sqlalchemy import event

    if engine in _instrumented:
        return
    addresses, description = resolve_target(settings)
    _instrumented.add(engine)
    try:
        sender = get_sender(addresses, description)
    except Exception:  # e.g. no threads left: run unmonitored, never fail
        log.exception("connmon: cannot start; %s runs unmonitored", engine)
        return
    record = sender.events.append
    wake = sender.wake
    clock = time.monotonic
    pool_id = next(_pool_ids)

    def on_connect(dbapi_connection, connection_record):
        ident = next(_connection_ids)
        connection_record.info[CONN_ID] = ident
        record((CONNECT, ident, clock(), pool_id))
        wake()

    def on_checkout(dbapi_connection, connection_record, connection_proxy):
        record((CHECKOUT, connection_record.info.get(CONN_ID), clock(),
                pool_id))
        wake()

    def on_checkin(dbapi_connection, connection_record):
        record((CHECKIN, connection_record.info.get(CONN_ID), clock()))
        wake()

    def on_close(dbapi_connection, connection_record):
        record((CLOSE, connection_record.info.get(CONN_ID), clock()))
        wake()

    # A detached connection leaves its pool entry (which gets a fresh
    # connection and info) but stays open until close_detached.
    detached: Dict[int, int] = {}

    def on_detach(dbapi_connection, connection_record):
        ident = connection_record.info.get(CONN_ID)
        if ident is not None:
            detached[id(dbapi_connection)] = ident

    def on_close_detached(dbapi_connection):
        record((CLOSE, detached.pop(id(dbapi_connection), None), clock()))
        wake()

    def on_engine_disposed(disposed_engine):
        nonlocal pool_id
        record((DISPOSE, pool_id, clock()))
        pool_id = next(_pool_ids)
        record((POOL, pool_id, clock(), _pool_limit(disposed_engine.pool)))
        wake()

    # invalidate, soft_invalidate and pool-wide invalidation need no
    # listener: a hard invalidation fires "close" for the connection, and the
    # other two close it (firing "close") at its next checkout.
    for name, listener in (("connect", on_connect),
                           ("checkout", on_checkout),
                           ("checkin", on_checkin),
                           ("close", on_close),
                           ("detach", on_detach),
                           ("close_detached", on_close_detached)):
        event.listen(engine, name, listener)
    event.listen(engine, "engine_disposed", on_engine_disposed)
    record((POOL, pool_id, clock(), _pool_limit(engine.pool)))
    wake()


def _dialect_subclass(real_cls):
    """The real dialect, but never passing ``connmon_*`` to the driver."""
    subclass = _dialect_subclasses.get(real_cls)
    if subclass is None:
        def create_connect_args(self, url):
            return real_cls.create_connect_args(
                self, url.difference_update_query(URL_PARAMETERS))

        subclass = type(real_cls.__name__ + "_connmon", (real_cls,), {
            "create_connect_args": create_connect_args,
            "supports_statement_cache": True,
            "__doc__": f"{real_cls.__name__} monitored by connmon.",
        })
        _dialect_subclasses[real_cls] = subclass
    return subclass


_dialect_subclasses: Dict[type, type] = {}


class ConnmonDialect:
    """Entry point for ``<backend>+<driver>_connmon://`` URLs.

    SQLAlchemy asks it for the dialect class and later hands it the engine.
    """

    def __init__(self, real_drivername: str):
        self.real_drivername = real_drivername

    def get_dialect_cls(self, url):
        resolve_target(url_settings(url.query))   # fail fast on bad settings
        real_url = url.set(drivername=self.real_drivername)
        return _dialect_subclass(real_url.get_dialect())

    def engine_created(self, engine) -> None:
        instrument(engine, url_settings(engine.url.query))


# Entry points of setup.py point at these names.
mysql_pymysql = ConnmonDialect("mysql+pymysql")
mysql_mysqldb = ConnmonDialect("mysql+mysqldb")
mysql_default = ConnmonDialect("mysql")
postgresql_psycopg2 = ConnmonDialect("postgresql+psycopg2")
postgresql_psycopg = ConnmonDialect("postgresql+psycopg")
postgresql_default = ConnmonDialect("postgresql")
sqlite_pysqlite = ConnmonDialect("sqlite+pysqlite")
sqlite_default = ConnmonDialect("sqlite")

DIALECT_ENTRY_POINTS = {
    "mysql.pymysql_connmon": "mysql_pymysql",
    "mysql.mysqldb_connmon": "mysql_mysqldb",
    "mysql.connmon": "mysql_default",
    "postgresql.psycopg2_connmon": "postgresql_psycopg2",
    "postgresql.psycopg_connmon": "postgresql_psycopg",
    "postgresql.connmon": "postgresql_default",
    "sqlite.pysqlite_connmon": "sqlite_pysqlite",
    "sqlite.connmon": "sqlite_default",
}


def _make_plugin_class():
    from sqlalchemy.engine import CreateEnginePlugin

    class ConnmonPlugin(CreateEnginePlugin):
        """``?plugin=connmon`` on any URL."""

        def __init__(self, url, kwargs):
            super().__init__(url, kwargs)
            self.settings = url_settings(url.query)
            resolve_target(self.settings)   # fail fast on a bad config

        def update_url(self, url):
            return url.difference_update_query(URL_PARAMETERS)

        def engine_created(self, engine):
            instrument(engine, self.settings)

    return ConnmonPlugin


def __getattr__(name: str):
    # ConnmonPlugin subclasses a SQLAlchemy class; build it only when the
    # plugin entry point asks, so the daemon never imports SQLAlchemy.
    if name == "ConnmonPlugin":
        globals()[name] = cls = _make_plugin_class()
        return cls
    raise AttributeError(name)
