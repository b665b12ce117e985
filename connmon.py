"""connmon: watch the database connections of every SQLAlchemy process.

This one file is exactly what an application process runs, plus the codec
it shares with the daemon (``connmond``, in connmon_server.py, holds the
picture of every process; this file holds one process's).  Read top to
bottom:

1. configuration   -- the ``/etc/connmon.cfg`` file and its ``nodes:`` syntax
2. wire protocol   -- newline-delimited JSON over TCP, with hard size limits;
                      its comment is the protocol reference
3. leak finder     -- where in the application a connection was checked out,
                      and whether the code that asked for it still runs
4. process state   -- one process's connections (``ProcessState``): the
                      application folds its pool events and connection
                      notes into it and sends what changed; the daemon
                      applies those messages
5. sender          -- the background threads that fold a process's pool
                      events and ship them to ``connmond``, resending its
                      whole state after every reconnect
6. SQLAlchemy glue -- the ``<driver>_connmon`` dialect names, the
                      ``?plugin=connmon`` engine plugin, and the measured
                      pool classes they choose
7. vendoring       -- ``python connmon.py --install-entry-points``: the
                      entry points of section 6, registered without pip

Sections 1-4 use only the standard library (the daemon and the console import
them); SQLAlchemy is imported only by section 6, when an engine asks for it.

The application is never hurt by monitoring: pool event listeners, and the
measured pool's connect() (``MeasuredPool``: when checkouts begin to wait),
only count a checkout or a checkin in the connection's note (with the
checkout's site) or queue a rarer event; the network, DNS, the leak
finder's looks and every retry happen on background threads, and no
exception from here reaches the application once ``create_engine()`` has
returned.
"""

from __future__ import annotations

import atexit
import configparser
import difflib
import encodings.idna  # noqa: F401  (see below)
import functools
import hashlib
import heapq
import hmac
import itertools
import json
import logging
import os
import random
import select
import signal
import socket
import ssl
import sys
import sysconfig
import threading
import time
import types
import weakref
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional,
                    Sequence, Set, Tuple)

__version__ = "0.4.0"

log = logging.getLogger("connmon")

# encodings.idna is imported above, on the importing thread, because
# socket.getaddrinfo() imports it on first use: were that first use on the
# sender thread while the application forks, the child would inherit a
# half-imported codec and never resolve a name.

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
    """A configuration file, URL parameter or address that cannot be used.

    One found in a file knows where (``at``), so that --check-config can
    list it as ``FILE:LINE: [SECTION] problem``; its text names the place
    too."""

    def __init__(self, message: str, source: str = "",
                 section: Optional[str] = None, line: int = 0,
                 problem: str = ""):
        super().__init__(message)
        self.source, self.section, self.line = source, section, line
        self.problem = problem or message

    @classmethod
    def at(cls, source: str, section: Optional[str], line: int,
           problem: str) -> "ConfigError":
        return cls(f"{_place(source, section, line)}: {problem}", source,
                   section, line, problem)

    def located(self) -> str:
        """``FILE:LINE: [SECTION] problem``, as much of the place as is
        known."""
        if not self.source:
            return str(self)
        where = f"{self.source}:{self.line}" if self.line else self.source
        section = f" [{self.section}]" if self.section else ""
        return f"{where}:{section} {self.problem}"


Address = Tuple[str, int]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """Parse ``HOST[:PORT]``; IPv6 hosts are written ``[::1]:5800``."""
    text = text.strip()
    if not text:
        raise ConfigError("empty address")
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"bad address {text!r}: expected [IPV6]:PORT")
        has_port, port_text = bool(rest), rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        has_port = True
    else:  # a bare name, IPv4 address or unbracketed IPv6 address
        host, has_port, port_text = text, False, ""
    if not host:
        raise ConfigError(f"bad address {text!r}: no host")
    if not has_port:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"bad port {port_text!r} in address {text!r}")
    return host, int(port_text)


def plural(count: int, noun: str, nouns: str = "") -> str:
    """"1 process", "2 processes"."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


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
                 source: str, file: str = "", section: Optional[str] = None,
                 lines: Optional[Dict[str, int]] = None):
        self.name = name
        self.nodes = nodes
        self.options = options
        self.source = source
        # where it was read: the file, the section, each option's line
        self.file, self.section = file, section
        self.lines = lines or {}

    def mistake(self, option: str, problem: str) -> ConfigError:
        """A ConfigError about ``option``, placed at its line."""
        return ConfigError(f"{self.source}: {problem}", self.file,
                           self.section, self.lines.get(option, 0), problem)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"{self.source}: service {self.name!r} has no node "
                          f"{name!r} (nodes: {known})")


def _parse_node_line(line: str) -> Node:
    """``NODENAME hostname=HOST[:PORT] [bind=ADDR[:PORT]]``."""
    name, *words = line.split()
    fields = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in ("hostname", "bind") or not value:
            raise ConfigError(f"unexpected {word!r} in node line "
                              f"{line!r}; expected hostname=HOST[:PORT] "
                              "[bind=ADDR[:PORT]]")
        fields[key] = value
    if "hostname" not in fields:
        raise ConfigError(f"node line {line!r} has no hostname=HOST[:PORT]")
    try:
        address = parse_address(fields["hostname"])
        wildcard = "::" if ":" in address[0] else "0.0.0.0"
        bind = parse_address(fields.get("bind", wildcard), address[1])
    except ConfigError as err:
        raise ConfigError(str(err)) from None
    return Node(name, address, bind)


def _line_number(text: str, section: str, needle: Optional[str]) -> int:
    """The line of ``text`` where ``needle`` first appears inside ``section``
    (the section's own header line when ``needle`` is None).

    configparser forgets line numbers; operators want them in errors.
    """
    in_section = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped == f"[{section}]"
            if in_section and needle is None:
                return number
        elif in_section and needle is not None and needle in line:
            return number
    return 0


def _place(source: str, section: Optional[str], line: int) -> str:
    """"FILE, [SECTION], line N", as much of it as is known."""
    place = f"{source}, [{section}]" if section else source
    return f"{place}, line {line}" if line else place


def _section_at(text: str, lineno: int) -> Optional[str]:
    """The section a line of ``text`` belongs to (None before the first)."""
    section = None
    for line in text.splitlines()[:lineno]:
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1]
    return section


def _check_headers(text: str, source: str) -> None:
    """A section header without its ']' (configparser would take it for an
    option line, and complain about something else)."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("[") and not line.rstrip().endswith("]"):
            raise ConfigError.at(source, _section_at(text, lineno - 1),
                                 lineno, f"section header {line.strip()!r} "
                                 "has no closing ']'")


def _parse_error(err: configparser.Error, text: str,
                 source: str) -> ConfigError:
    """configparser's many-line complaint as one line naming the file, the
    section and the line."""
    lineno = getattr(err, "lineno", None)
    errors = getattr(err, "errors", None)   # a ParsingError's lines
    if errors:
        lineno = errors[0][0]
    if not lineno:
        return ConfigError.at(source, None, 0, " ".join(str(err).split()))
    line = text.splitlines()[lineno - 1].strip()
    section = _section_at(text, lineno - 1)
    if isinstance(err, (configparser.DuplicateOptionError,
                        configparser.DuplicateSectionError)):
        what = (f"option {err.option!r}" if isinstance(
            err, configparser.DuplicateOptionError) else
            f"section [{err.section}]")
        return ConfigError.at(source, section, lineno, f"{what} is given "
                              "twice")
    if isinstance(err, configparser.MissingSectionHeaderError):
        return ConfigError.at(source, section, lineno, f"{line!r} comes "
                              "before any [section] header")
    return ConfigError.at(source, section, lineno, f"{line!r} is not "
                          "'option: value' (no ':' or '=')")


def parse_config(text: str, source: str) -> Dict[str, Service]:
    """Parse config text into services keyed by their ``name:``; the first
    mistake is a ConfigError (config_problems finds them all)."""
    services, problems = read_config(text, source)
    if problems:
        raise problems[0]
    return services


# Sections a config file may hold besides [connmon_service_NAME]: the
# logging.config.fileConfig format's (connmond honours them).
LOGGING_SECTIONS = ("loggers", "handlers", "formatters")
LOGGING_SECTION_PREFIXES = ("logger_", "handler_", "formatter_")
SERVICE_PREFIX = "connmon_service_"


def read_config(text: str, source: str
                ) -> Tuple[Dict[str, Service], List[ConfigError]]:
    """The services of config text, and every mistake found in it, in the
    order of the file: each section is read whatever the others hold (a
    file that is not 'option: value' lines is one mistake, and no more is
    read)."""
    try:
        _check_headers(text, source)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(text, source=source)
    except ConfigError as err:
        return {}, [err]
    except configparser.Error as err:
        return {}, [_parse_error(err, text, source)]
    services: Dict[str, Service] = {}
    problems: List[ConfigError] = []
    for section in parser.sections():
        if section.startswith(SERVICE_PREFIX):
            service = _read_service(parser[section], text, source, problems)
            if service is not None:
                services[service.name] = service
        elif section not in LOGGING_SECTIONS and not section.startswith(
                LOGGING_SECTION_PREFIXES):
            problems.append(ConfigError.at(
                source, section, _line_number(text, section, None),
                _unknown_section(section)))
    return services, problems


def _unknown_section(section: str) -> str:
    """What is wrong with a section connmon does not read, and the
    likeliest one meant."""
    head, _, rest = section.rpartition("_")
    if section == "connmon" or not head:
        meant = f"[{SERVICE_PREFIX}{DEFAULT_SERVICE}]"
    elif difflib.get_close_matches(head + "_", [SERVICE_PREFIX], 1, 0.8):
        meant = f"[{SERVICE_PREFIX}{rest}]"
    else:
        meant = ""
    return ("unknown section: connmon reads [connmon_service_NAME] sections "
            "(and logging's)" + (f"; did you mean {meant}?" if meant else ""))


def _read_service(section, text: str, source: str,
                  problems: List[ConfigError]) -> Optional[Service]:
    """One [connmon_service_NAME] section (None when it has no name or no
    good node); its mistakes go to ``problems``."""
    name = section.name
    options = dict(section)

    def mistake(needle: Optional[str], problem: str) -> None:
        problems.append(ConfigError.at(
            source, name, _line_number(text, name, needle), problem))

    if not options.get("name"):
        mistake(None, "missing 'name:'")
    if not options.get("nodes", "").strip():
        mistake(None, "missing 'nodes:' (one node a line: NODENAME "
                "hostname=HOST[:PORT])")
    if not options.get("name") or not options.get("nodes", "").strip():
        return None
    nodes = []
    for line in options.pop("nodes").splitlines():
        if line.strip():
            try:
                nodes.append(_parse_node_line(line))
            except ConfigError as err:
                mistake(line, str(err))
    names = [node.name for node in nodes]
    for node_name in sorted(set(names)):
        if names.count(node_name) > 1:
            mistake(node_name, f"node {node_name!r} is listed twice")
    if not nodes:
        return None
    return Service(options.pop("name"), nodes, options, f"{source} [{name}]",
                   source, name, _option_lines(text, name))


def _option_lines(text: str, section: str) -> Dict[str, int]:
    """option -> the line it starts on, in ``section`` of ``text``."""
    lines: Dict[str, int] = {}
    in_section = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = stripped == f"[{section}]"
        elif in_section and line[:1] not in (" ", "\t", "#", ";", ""):
            key = line.replace("=", ":", 1).split(":", 1)[0].strip().lower()
            lines.setdefault(key, number)
    return lines


def config_file(path: Optional[str] = None) -> Optional[str]:
    """The file ``load_config(path)`` reads; None for the built-in default
    (no ``path`` given and no ``/etc/connmon.cfg``)."""
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        return DEFAULT_CONFIG_FILE
    return path


BUILT_IN = "<built-in default>"


def load_config(path: Optional[str] = None) -> Dict[str, Service]:
    """Read ``path``, or ``/etc/connmon.cfg``, or else the built-in default.

    A file named explicitly must exist; the default file is optional.
    """
    path = config_file(path)
    if path is None:
        return parse_config(DEFAULT_CONFIG_TEXT, BUILT_IN)
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
        raise ConfigError(f"{config_file(path) or BUILT_IN}: unknown service "
                          f"{name!r} (services: {known})")
    return services[name]


# -- Service options ----------------------------------------------------------
#
# Every option a service section may carry beyond name: and nodes:, with
# how its text is checked.  The applications read SERVICE_OPTIONS (through
# option_value); connmond's own table (connmon_server.OPTIONS) adds its
# options to these, and its --check-config checks a section against the
# whole of it, so that one definition of each option serves every reader.


class Option(NamedTuple):
    """How one option's text is read: ``parse`` returns the value or raises
    ValueError saying what it expected; ``default`` is the text used when
    the option is absent ("" means off)."""
    parse: Callable[[str], Any]
    default: str = ""


def number_between(low: float, high: float, unit: str = "",
                   whole: bool = False) -> Callable[[str], Any]:
    """A parser of numbers from ``low`` to ``high`` (whole ones only when
    ``whole``)."""
    kind, shown = ("whole number", "d") if whole else ("number", "g")
    expected = (f"expected a {kind}{unit} from {low:{shown}} to "
                f"{high:{shown}}")

    def parse(text: str) -> Any:
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise ValueError(f"{expected}, got {text!r}") from None
        if not low <= value <= high:
            raise ValueError(f"{expected}, got {text!r}")
        return value
    return parse


def on_off(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"expected 1 (on) or 0 (off), got {text!r}")
    return text == "1"


def any_text(text: str) -> str:
    return text


TLS_OPTIONS = ("ssl_certfile", "ssl_keyfile", "ssl_cafile",
               "ssl_client_certfile", "ssl_client_keyfile",
               "ssl_client_cafile")

DEFAULT_HOLD_WARN = 10.0  # a checkout held this long: say where it is held
DEFAULT_HOLD_MS_WARN = 1000.0   # a mean hold above this: the console's alarm

SERVICE_OPTIONS: Dict[str, Option] = {
    # how long a checkout is held before the application says where
    "hold_warn_seconds": Option(number_between(0.1, 86400, " of seconds"),
                                f"{DEFAULT_HOLD_WARN:g}"),
    # note each checkout's site (the leak finder)
    "checkout_sites": Option(on_off, "1"),
    # report each pool's database: backend, host, port, name and user
    "report_endpoints": Option(on_off, "1"),
    "auth_secret_file": Option(any_text),
    "auth_secret": Option(any_text),
    **{name: Option(any_text) for name in TLS_OPTIONS},
}


def option_value(service: Service, name: str,
                 table: Dict[str, Option] = SERVICE_OPTIONS) -> Any:
    """The checked value of option ``name`` of ``service`` (its default
    when absent; None when that is off), or a ConfigError naming the file,
    the section and the option."""
    option = table[name]
    text = service.options.get(name, "").strip() or option.default
    if not text:
        return None
    try:
        return option.parse(text)
    except ValueError as err:
        raise service.mistake(name, f"{name}: {err}") from None


def check_options(service: Service, table: Dict[str, Option]) -> None:
    """Every option of ``service`` is in ``table`` and valid; a misspelt
    one is named, with the likeliest option meant.  The first mistake is
    raised (option_problems lists them all)."""
    problems = option_problems(service, table)
    if problems:
        raise problems[0]


def option_problems(service: Service, table: Dict[str, Option]
                    ) -> List[ConfigError]:
    """Every unknown or invalid option of ``service``, in file order."""
    problems = []
    for name in sorted(service.options, key=lambda n: service.lines.get(
            n, 0)):
        if name not in table:
            close = difflib.get_close_matches(name, table, 1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(service.mistake(
                name, f"unknown option {name!r}{hint}"))
            continue
        try:
            option_value(service, name, table)
        except ConfigError as err:
            problems.append(err)
    return problems


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
# This comment is the protocol reference: every role, op and key.  The
# daemon side's checks live in connmon_server.py (Door.admit, ROLES, the
# handler's serve_app / serve_console, PeerLink._apply); the app's state
# is ProcessState.message (what an app sends) and ProcessState.update
# (how the daemon checks and applies it), below in this file.
#
# Framing.  Newline-delimited JSON over TCP (inside TLS when the service
# sets any ssl_ option), one object a line, UTF-8, every object with a
# string "op".  Sizes, newline included: at most MAX_HELLO_BYTES (16 KiB,
# connmon_server.py) before a hello is accepted, MAX_MESSAGE_BYTES (1 MiB)
# a message from an app or a console, MAX_PEER_MESSAGE_BYTES (32 MiB,
# connmon_server.py) from an authenticated peer, MAX_REPLY_BYTES (64 MiB)
# a reply of the daemon.  The hello must come within HELLO_TIMEOUT (10 s,
# a deadline, not an idle timeout).  Anything malformed, too big, or not
# allowed to the sender's role gets {"op": "error", "error": TEXT} and a
# closed connection (from a peer: the link is cut, and re-dialled).
#
# Handshake.  The daemon speaks first, at once:
#
#   daemon -> {"op": "welcome", "version": 1, "service": S, "node": N,
#              "nonce": HEX (fresh, 16 random bytes), "heartbeat": SECONDS}
#   client -> {"op": "hello", "version": 1, "role": "app"|"console"|"peer",
#              ...the role's keys..., "auth": PROOF (when the role has a
#              secret)}
#   daemon -> {"op": "ready"}, or {"op": "error", "error": TEXT} and EOF
#
# PROOF is hello_proof(): HMAC-SHA256 keyed with the role's secret over
# "connmon hello\n" NONCE "\n" ROLE, in hex; the daemon checks it in
# constant time.  The secret never crosses the wire and a recorded hello
# is worthless on any other connection.  The secrets: an app proves
# auth_secret(_file); a console proves console_secret(_file) when the
# service has one, else the apps' secret; a peer proves
# peer_secret(_file) (a service with an apps' secret and several nodes
# must have one).  Without the role's secret no "auth" is asked for.  A
# wrong or missing proof gets "ROLE: authentication failed (wrong or
# missing secret)".  A client that finds no "nonce" in the welcome while
# it has a secret refuses to go on (an older daemon).  A client that
# meets something other than a welcome on its first line (a database's
# port, a web server) says "not connmond" (see read_welcome).
#
# The roles, and all that each may send after its hello (Door and ROLES
# in connmon_server.py check this, in one place); anything else is
# refused with the connection:
#
#   app      hello "proc": {"id": random process id, "hostname",
#            "progname" (each 1 to MAX_NAME printable characters), "pid"
#            (1 to 2^32-1), "session": how many times this process has
#            connected to any daemon (0 to MAX_SESSION-1)}; refused while
#            another live connection has that process id ("attached by
#            another live connection; try again later").  Then exactly
#            one "state" (its whole state), then "update"s of that
#            process only, and "ping".
#   console  hello with no other key.  Then "snapshot", "history",
#            "clear_maxima" and "ping", each answered by one line.
#   peer     hello "service": S, "node": N: one of this service's other
#            nodes, connecting from an address its hostname= resolves to
#            (a service of one node accepts no peer).  Then "attach",
#            "forward", "forwards", "detach", "maxima", "clear_maxima",
#            "ping" and "pong".
#
# Room: max_clients apps at once, CONSOLE_ROOM (64) consoles, four links
# an other node; at most MAX_WAITING (1024) connections before their
# hello (past it, the one waiting longest is let go once it has had
# HELLO_GRACE, 1 s), MAX_WAITING_PER_ADDRESS (64) from one address (the
# refusals say "too many connections (max_clients is N)", "too many
# connections from ADDRESS waiting for their hello (64)").
#
# Heartbeat.  Every client (and every peer, on a quiet link) sends
# {"op": "ping"} when it has sent nothing else for a third of the
# welcome's "heartbeat", and an app, however much it sends, when it has
# not heard from the daemon for two thirds of it; the daemon answers
# {"op": "pong"}.  Either side gives up a connection it has not
# heard from for the whole heartbeat (heartbeat_timeout, 1 to 3600 s,
# default 30): a stopped process, a host that vanished.  An app reads
# nothing from the daemon but pongs (and an error before it hangs up).
#
# An app's "state" and "update" (ProcessState.message builds them,
# ProcessState.update checks and applies them).  Ids are the process's
# own integers (connections, pools, sites).  Times travel as ages, seconds
# before the message was sent, so host clocks never need to agree.
#
#   "connect"   [[conn, pool], ...] connections opened since the last
#               message (in "state": all of them)
#   "close"     [conn, ...] connections closed
#   "checkout"  [[conn, seconds since its checkout], ...] newly out
#   "checkin"   [conn, ...] returned
#   "checkouts" how many checkouts since the last message
#   "hold"      [seconds, count]: the hold times of the checkins since
#   "peak"      [connections, checked out]: the most at once since
#   "pools"     [[pool, limit (pool_size + max_overflow; null when
#               unlimited), endpoint], ...], every pool, when any changed
#               (always in "state"); endpoint is {"backend", "host",
#               "port", "database", "user"} (all but backend may be null)
#               or null (report_endpoints 0); a [pool, limit] pair is
#               accepted too
#   "sites"     [[site, "FILE:LINE in FUNC"], ...] names of checkout
#               sites not named before (optional)
#   "checkout_sites" [[conn, site], ...] the site of each new checkout
#               (optional)
#   "held_at"   [[conn, text], ...] where a long holder is held now:
#               "FILE:LINE in FUNC", "leaked" or "thread gone", with
#               " (task NAME)" for a task (optional)
#   "waiting"   [[pool, checkouts waiting, seconds the longest has
#               waited], ...] whenever any wait, once more when none
#               does, and always in "state"; at most MAX_PROCESS_POOLS
#   pool pressure since the last message, each key absent when 0:
#   "waits" [seconds, count, longest seconds], "timeouts", "failures"
#   (connect errors), "connects" [seconds, count], "invalidations",
#   "peak_waiting" (the most waiting at once)
#
# "state" replaces whatever the daemon knew of the process; "update"
# changes it.  An app sends an update about once a second while its state
# merely changes (connections, checkouts, counters, hold times), at once
# (within 0.25 s) on an alarm (ProcessState.alarm_since: a new pool, a
# pool exhausted or no longer, checkouts starting or stopping to wait, a
# timeout or connect error, a new long holder or leak), and one as it
# exits.  checkouts, hold and peak are required in both.  A process
# may have at most MAX_PROCESS_CONNECTIONS (5000) connections and
# MAX_PROCESS_POOLS (1000) pools; the daemon keeps at most MAX_SITES
# (1000) site names and held-at places a process.  Every text is 1 to
# MAX_NAME (255) printable characters (is_text): no control or format
# characters, no lone surrogates.  Events for connections never announced
# are ignored (and counted in a log line).  For example:
#
#   {"op":"hello","version":1,"role":"app",
#    "proc":{"id":"9f1c...","hostname":"api1","progname":"nova-api",
#            "pid":4242,"session":1}}
#   {"op":"state","connect":[[1,1],[2,1]],"close":[],"checkout":[[2,0.5]],
#    "checkin":[],"checkouts":0,"hold":[0,0],"peak":[2,1],"pools":[[1,15]]}
#   {"op":"update","connect":[[3,1]],"close":[],"checkout":[[3,0.002]],
#    "checkin":[2],"checkouts":7,"hold":[0.031,6],"peak":[3,2]}
#
# A console's requests and their replies:
#
#   {"op": "snapshot"} (with "procs": true for each row's processes)
#       -> {"op": "snapshot", "service", "node", "peers" {NODE: link up},
#           "thresholds" {"oldest", "hold_ms"}, and the JSON snapshot of
#           `connmon --once --json` (docs/console.txt)}.  Trimmed to fit
#           MAX_REPLY_BYTES: the rows that matter least (gone, then the
#           fewest connections) are left out, with their lines in
#           "databases", and "trimmed" says how many (fit_reply).
#   {"op": "history", "progname": P, "hostname": H or null (the sums over
#    every host)}
#       -> {"op": "history", "interval": 1.0, "conn": [...], "ckout":
#           [...]}: the daemon's samples of the row, oldest first, at
#           most 600
#   {"op": "clear_maxima"} -> {"op": "clear_maxima"}; every node clears
#
# So a daemon can be watched with nc:
#
#   printf '{"op":"hello","version":1,"role":"console"}\n{"op":"snapshot"}\n' \
#       | nc -q1 localhost 5800
#
# Peers (connmon_server.py, Cluster and PeerLink) send in both directions.
# When a link is made each side sends its maxima, then one "attach" per
# process attached to itself; maxima again every MAXIMA_INTERVAL (5 s);
# then, as things happen:
#
#   {"op": "attach", "proc": {the app's hello "proc"}, "state": {a
#    "state"}}                              a process, whole
#   {"op": "forward", "id": ID, "session": N, "update": {an "update"}}
#   {"op": "forwards", "items": [[ID, N, {an "update"}], ...]}  the
#                                           updates of about 0.2 s, at
#                                           most 50,000 a message
#   {"op": "detach", "id": ID, "session": N}  that session ended
#   {"op": "maxima", "rows": [[hostname, progname, maxnproc, maxconn,
#    maxckout], ...] (at most 250 a message, MAX_ROWS accepted),
#    "totals": [max_hosts, max_processes, max_connections,
#    max_checkouts], "clears": N}
#   {"op": "clear_maxima", "clears": N}
#
# A node gathers its apps' updates for a peer that says "batches": true
# (in its welcome, or in its hello when it dials) and sends them as one
# "forwards", encoded once for every link; to a peer that does not (an
# older connmond) each update goes as a "forward", as before.  Apps and
# consoles ignore the welcome's "batches".  A peer's message with a bad
# field (checked with the bounds its sender applies) is dropped, with a
# log line, and the link stays; another role's request cuts the link.
#
# "clears" counts the clears of the maxima: maxima sent before a clear the
# receiver has seen are dropped.  A node keeps a process's newest session,
# so a late "detach" never removes a process attached elsewhere since.  A
# peer may attach at most max_clients processes.
#
# Versions and rolling upgrades.  The version is 1: the daemon refuses a
# hello of another ("protocol version V not supported (this daemon speaks
# 1)").  Within a version keys are only added, optional, never changed in
# meaning: readers ignore keys they do not know, and an absent new key
# means what the older client meant (no "sites", "checkout_sites",
# "held_at", "waiting" or pressure keys: none; a [pool, limit] pair: no
# endpoint; a welcome without "heartbeat": 30 s).  A change that old
# readers would misread takes a new version; connmond then keeps
# accepting the previous version's hello and messages, for the clouds
# that upgrade their app hosts a few at a time, and this comment says
# what an old client still gets.

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20     # the most a client may send in one message
MAX_REPLY_BYTES = 64 << 20      # the most a snapshot reply may be
MAX_NAME = 255                  # longest process id, hostname, progname
MAX_LOCATION = MAX_NAME         # longest checkout site or held-at text
MAX_SESSION = 1 << 32           # an app's session claim is below this
DEFAULT_HEARTBEAT = 30.0        # seconds of silence that lose a peer
MIN_HEARTBEAT, MAX_HEARTBEAT = 1.0, 3600.0
MAX_SECRET_BYTES = 4096


class ProtocolError(Exception):
    """The peer sent something that is not connmon protocol."""


class NotConnmond(OSError):
    """Something answers at the address, but it is not connmond (a
    database server, a web server...): retrying soon will not help."""


def is_text(value: Any, limit: int) -> bool:
    """Whether a client's text may enter: a string of 1 to ``limit``
    printable characters (no control or format characters, no lone
    surrogates), so that it can reach a terminal, a CSV file or /metrics
    as it is."""
    return (isinstance(value, str) and 0 < len(value) <= limit
            and value.isprintable())


def printable(text: str, limit: int = 0) -> str:
    """``text`` made fit to enter (see ``is_text``) or to be printed:
    every character a terminal would act on written as its Python
    escape, and, with ``limit``, cut to that many characters keeping the
    end (where a location's line and function are)."""
    if not text.isprintable():
        text = "".join(char if char.isprintable() else char.encode(
            "unicode_escape", "backslashreplace").decode("ascii")
                       for char in text)
    if limit and len(text) > limit:
        text = "..." + text[len(text) - limit + 3:]
    return text


class AuthError(ProtocolError):
    """The hello did not prove knowledge of the service's secret."""


def hello_proof(secret: bytes, nonce: str, role: str) -> str:
    """What a client puts in its hello's "auth": an HMAC-SHA256, keyed by
    the shared secret, over the daemon's fresh nonce and the client's role."""
    text = f"connmon hello\n{nonce}\n{role}".encode("utf-8", "surrogatepass")
    return hmac.new(secret, text, hashlib.sha256).hexdigest()


def proof_is_valid(secret: bytes, nonce: str, role: str, proof: Any) -> bool:
    """Check a hello's "auth" in constant time, whatever type it has."""
    if not isinstance(proof, str):
        return False
    return hmac.compare_digest(hello_proof(secret, nonce, role).encode(),
                               proof.encode("utf-8", "surrogatepass"))


# The options that name a file holding a secret or a token, and whether
# a group may read it: the apps' and the consoles' secrets are shared with
# the users of a group; only connmond reads the other two.
SECRET_FILE_OPTIONS = {"auth_secret_file": True, "console_secret_file": True,
                       "peer_secret_file": False,
                       "metrics_token_file": False}


def read_secret(path: str) -> bytes:
    """The shared secret kept in ``path`` (surrounding whitespace and the
    final newline are not part of it)."""
    try:
        with open(path, "rb") as file:
            secret = file.read(MAX_SECRET_BYTES + 1).strip()
    except OSError as err:
        raise ConfigError(f"cannot read secret file {path}: "
                          f"{err.strerror or err}") from None
    if not secret:
        raise ConfigError(f"secret file {path} is empty")
    if len(secret) > MAX_SECRET_BYTES:
        raise ConfigError(f"secret file {path} is longer than "
                          f"{MAX_SECRET_BYTES} bytes")
    return secret


def loose_secret_files(options: Dict[str, str]) -> List[str]:
    """Warnings for the secret and token files of ``options`` that others
    may read (or a group, where only connmond should): a secret is only as
    safe as its file."""
    warnings = []
    for name, group_may in SECRET_FILE_OPTIONS.items():
        path = options.get(name, "").strip()
        try:
            mode = os.stat(path).st_mode if path else 0
        except OSError:   # (reading it says why, when it is read)
            continue
        if mode & (0o007 if group_may else 0o077):
            warnings.append(f"{name} {path} may be read by "
                            f"{'others' if mode & 0o007 else 'its group'} "
                            f"(mode {mode & 0o777:o}); chmod 600 it")
    return warnings


def _option_secret(options: Dict[str, str], name: str,
                   path: Optional[str] = None) -> Optional[bytes]:
    """The secret of ``NAME_file`` (or ``path``), else of ``NAME`` itself
    written in the config, else None."""
    path = path or options.get(name + "_file")
    if path:
        return read_secret(path)
    return options.get(name, "").encode() or None


class Security:
    """A service's shared secret and TLS files: what a client proves in
    its hello and how every connection to the service is protected.

    TLS is on when any ``ssl_*`` option is set.  The daemon uses
    ``ssl_certfile``/``ssl_keyfile`` (and asks clients for certificates
    signed by ``ssl_client_cafile`` if set); clients check the daemon
    against ``ssl_cafile`` (default: the system's CAs) and present
    ``ssl_client_certfile``/``ssl_client_keyfile`` if set.
    """

    def __init__(self, secret: Optional[bytes] = None,
                 tls: Optional[Dict[str, str]] = None, source: str = "",
                 peer_secret: Optional[bytes] = None,
                 console_secret: Optional[bytes] = None):
        self.secret = secret
        self.peer_secret = peer_secret
        self.console_secret = console_secret
        self.tls = dict(tls or {})
        self.source = source
        self._client_context: Optional[ssl.SSLContext] = None

    @classmethod
    def of_service(cls, service: "Service", secret_file: Optional[str] = None,
                   daemon: bool = False, console: bool = False
                   ) -> "Security":
        """The service's settings; ``secret_file`` overrides the secret a
        client proves.

        Only the daemon (``daemon``) reads the peer credential, which the
        nodes of a service prove to each other: app hosts do not hold it.
        A service of several nodes whose apps have a secret needs one,
        else any app host could pose as a node.  The consoles' secret, if
        the service has one, is read by the daemon and the consoles
        (``console``) alone: then app hosts cannot read the picture.
        """
        options = service.options
        try:
            if console:   # the consoles' own secret, else the apps'
                console_secret = _option_secret(options, "console_secret",
                                                secret_file)
                secret = (None if console_secret
                          else _option_secret(options, "auth_secret"))
            else:
                secret = _option_secret(options, "auth_secret", secret_file)
                console_secret = (_option_secret(options, "console_secret")
                                  if daemon else None)
            peer_secret = (_option_secret(options, "peer_secret")
                           if daemon else None)
        except ConfigError as err:
            raise ConfigError(f"{service.source}: {err}") from None
        if daemon and len(service.nodes) > 1 and secret is not None and (
                peer_secret is None or peer_secret == secret):
            raise ConfigError(
                f"{service.source}: a service of several nodes with an "
                "apps' secret (auth_secret_file) needs peer_secret_file "
                "too, a different secret that only the nodes can read: "
                "with the apps' secret alone any app host could pose as a "
                "node")
        if console_secret is not None and console_secret in (secret,
                                                             peer_secret):
            raise ConfigError(
                f"{service.source}: console_secret must differ from "
                + ("auth_secret" if console_secret == secret
                   else "peer_secret")
                + ": a console secret that app hosts (or nodes) hold "
                "anyway keeps no one out of the consoles' role")
        tls = {key: value for key, value in options.items()
               if key.startswith("ssl_")}
        for key in tls:
            if key not in TLS_OPTIONS:
                raise ConfigError(f"{service.source}: unknown option {key!r}"
                                  "; TLS options are " + ", ".join(
                                      TLS_OPTIONS))
        return cls(secret, tls, service.source, peer_secret, console_secret)

    def secret_for(self, role: str) -> Optional[bytes]:
        """What a hello of ``role`` proves: nodes their own credential,
        consoles theirs if the service has one, everyone else the apps'
        secret."""
        if role == "peer":
            return self.peer_secret
        if role == "console" and self.console_secret is not None:
            return self.console_secret
        return self.secret

    @property
    def key(self) -> tuple:
        """Equal for settings that make equal connections."""
        return self.secret, tuple(sorted(self.tls.items()))

    def client_context(self) -> Optional[ssl.SSLContext]:
        """The TLS context clients connect with (None: plain TCP).  Made
        once; a bad file is a ConfigError, so call it at start-up."""
        if self.tls and self._client_context is None:
            try:
                context = ssl.create_default_context(
                    cafile=self.tls.get("ssl_cafile"))
                if "ssl_client_certfile" in self.tls:
                    context.load_cert_chain(
                        self.tls["ssl_client_certfile"],
                        self.tls.get("ssl_client_keyfile"))
            except (OSError, ssl.SSLError) as err:
                raise ConfigError(f"{self.source}: cannot load TLS files: "
                                  f"{err}") from None
            self._client_context = context
        return self._client_context

    def server_context(self) -> Optional[ssl.SSLContext]:
        """The daemon's TLS context (None: plain TCP)."""
        if not self.tls:
            return None
        if "ssl_certfile" not in self.tls:
            raise ConfigError(f"{self.source}: TLS needs ssl_certfile (and "
                              "ssl_keyfile) on the daemon")
        try:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.tls["ssl_certfile"],
                                    self.tls.get("ssl_keyfile"))
            if "ssl_client_cafile" in self.tls:
                context.load_verify_locations(self.tls["ssl_client_cafile"])
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as err:
            raise ConfigError(f"{self.source}: cannot load TLS files: "
                              f"{err}") from None
        return context

    def wrap(self, sock: socket.socket, host: str) -> socket.socket:
        """A client socket, inside TLS if the service uses it."""
        context = self.client_context()
        if context is None:
            return sock
        return context.wrap_socket(sock, server_hostname=host)

    def proof(self, welcome: Dict[str, Any], role: str) -> Dict[str, str]:
        """The hello's "auth" field for this welcome, if we have a secret."""
        secret = self.secret_for(role)
        if secret is None:
            return {}
        nonce = welcome.get("nonce")
        if not isinstance(nonce, str) or not nonce:
            raise ProtocolError("the daemon sent no nonce to authenticate "
                                "with (is it older than this client?)")
        return {"auth": hello_proof(secret, nonce, role)}


def encode(message: Dict[str, Any], limit: int = MAX_MESSAGE_BYTES) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
    if len(data) > limit:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the "
                            f"{limit} byte limit")
    return data


def decode(line: bytes) -> Dict[str, Any]:
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as err:
        raise ProtocolError(f"not JSON: {err}") from None
    except RecursionError:
        raise ProtocolError("not JSON: nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("not a JSON object with a string 'op'")
    return message


def read_message(rfile, limit: int = MAX_MESSAGE_BYTES
                 ) -> Optional[Dict[str, Any]]:
    """Read one message from a binary file; None at a clean end of stream."""
    line = rfile.readline(limit + 1)
    if not line:
        return None
    if not line.endswith(b"\n"):
        if len(line) > limit:
            raise ProtocolError(f"message longer than {limit} bytes")
        raise ProtocolError("connection closed in the middle of a message")
    return decode(line)


def expect(message: Optional[Dict[str, Any]], op: str) -> Dict[str, Any]:
    """Check that the peer answered with ``op``; raise a clear error if not."""
    if message is None:
        raise ProtocolError(f"connection closed while waiting for {op!r}")
    if message["op"] == "error":   # (its text goes to log lines: escaped)
        raise ProtocolError(
            f"refused: {printable(str(message.get('error')), MAX_NAME)}")
    if message["op"] != op:
        raise ProtocolError(f"expected {op!r}, got {message['op']!r}")
    return message


class Connection:
    """A client's handshaken connection to one connmond."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.rfile = sock.makefile("rb")
        self.welcome: Dict[str, Any] = {}
        # what its descriptor is, besides its number: see close_if_still
        self.identity = descriptor_identity(sock.fileno())

    @property
    def heartbeat(self) -> float:
        """The daemon's heartbeat timeout, as its welcome announced."""
        value = self.welcome.get("heartbeat")
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and MIN_HEARTBEAT <= value <= MAX_HEARTBEAT:
            return float(value)
        return DEFAULT_HEARTBEAT

    def send(self, message: Dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def request(self, message: Dict[str, Any]) -> Dict[str, Any]:
        self.send(message)
        return expect(read_message(self.rfile, MAX_REPLY_BYTES),
                      message["op"])

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()


def descriptor_identity(fd: int) -> Optional[Tuple[int, int]]:
    """What the file descriptor ``fd`` refers to now (device and inode: a
    pipe's or a socket's are its own), or None when it is closed."""
    try:
        status = os.fstat(fd)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def close_if_still(fd: int, identity: Optional[Tuple[int, int]]) -> None:
    """Close ``fd`` if it still refers to ``identity``.  For what a forked
    child inherited: a child of C fork() may have run the application's
    code before connmon noticed the fork, and that code may have closed the
    number and opened something of its own under it."""
    if identity is not None and descriptor_identity(fd) == identity:
        os.close(fd)


def open_connection(addresses: Iterable[Address], role: str,
                    timeout: float = 5.0,
                    security: Optional[Security] = None,
                    source: Optional[str] = None,
                    **hello: Any) -> Connection:
    """Connect to the first address that answers and do the handshake
    (TLS and the secret's proof as ``security`` says), from the local
    address ``source`` if given.

    Raises OSError naming every address tried when none works.
    """
    security = security or Security()
    failures: List[Tuple[str, Exception]] = []
    for address in addresses:
        try:
            sock = socket.create_connection(
                address, timeout=timeout,
                source_address=(source, 0) if source else None)
        except OSError as err:
            failures.append((f"{format_address(address)}: {err}", err))
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = security.wrap(sock, address[0])
            conn = Connection(sock)
            conn.welcome = read_welcome(conn, timeout)
            conn.send(dict(op="hello", version=PROTOCOL_VERSION, role=role,
                           **security.proof(conn.welcome, role), **hello))
            expect(read_message(conn.rfile), "ready")
            return conn
        except (OSError, ProtocolError) as err:
            sock.close()
            failures.append((f"{format_address(address)}: {err}", err))
    if failures and all(isinstance(err, NotConnmond) for _, err in failures):
        raise NotConnmond("; ".join(text for text, _ in failures))
    raise OSError("no connmond answered (" + "; ".join(
        text for text, _ in failures) + ")")


# Sent to a server that stays silent where connmond would have greeted:
# another kind of server answers it or hangs up; a stuck connmond does
# neither (and a slow one greets at last).
PROBE = b"GET / HTTP/1.0\r\n\r\n"
PROBE_WAIT = 1.0


def read_welcome(conn: Connection, timeout: float) -> Dict[str, Any]:
    """The daemon's first line: connmond speaks first, at once.  A first
    line that is not its welcome, or a silence that a probe shows to be
    another server's, raises NotConnmond."""
    try:
        line = conn.rfile.readline(MAX_MESSAGE_BYTES + 1)
    except socket.timeout:
        _probe(conn.sock)
        raise
    if not line:
        raise ProtocolError("connection closed before the welcome")
    try:
        message = decode(line)
    except ProtocolError:
        raise NotConnmond(f"not connmond: its first line is not JSON "
                          f"({line[:40]!r})") from None
    if message["op"] == "error":
        return expect(message, "welcome")   # a refusal: connmond after all
    if message["op"] != "welcome":
        raise NotConnmond(f"not connmond: its first line was "
                          f"{message['op']!r}, not connmond's welcome")
    return message


def _probe(sock: socket.socket) -> None:
    """After a silence: NotConnmond if the server answers PROBE with
    something else than connmond's welcome, or hangs up at it."""
    try:
        sock.sendall(PROBE)
        sock.settimeout(PROBE_WAIT)
        answer = sock.recv(4096)
    except OSError:
        return   # still silent (or gone): nothing learnt
    if not answer:
        raise NotConnmond("not connmond: it said nothing, and hung up at "
                          "an HTTP request") from None
    if not answer.startswith(b'{"op":"welcome"'):
        raise NotConnmond(f"not connmond: it said nothing, then answered "
                          f"an HTTP request with {answer[:40]!r}") from None


# ---------------------------------------------------------------------------
# 3. The leak finder: where in the application connections are held
# ---------------------------------------------------------------------------

# Where in the application: the leak finder names the first frame, walking
# out from the pool, that is not SQLAlchemy, oslo.db, a database driver, a
# green-thread runtime, connmon or the standard library.  Only a file name,
# a line number and a function name are ever taken from a frame: never a
# local variable or an argument.

_LIBRARY_PACKAGES = tuple(
    f"{os.sep}{package}{os.sep}" for package in (
        "sqlalchemy", "oslo_db",
        # drivers: a connection held while a query runs is held at the line
        # of the application that runs it, not at a socket read
        "pymysql", "MySQLdb", f"mysql{os.sep}connector", "mariadb",
        "psycopg2", "psycopg", "pg8000", "asyncpg", "aiomysql", "aiosqlite",
        # runtimes: a green thread waiting for I/O waits in their hubs
        "gevent", "eventlet", "greenlet",
        # servers and executors: their loops outlive the requests they run,
        # so they hold no connection (see holder_verdict)
        "gunicorn", "futurist", "oslo_service", "oslo_messaging", "paste",
        "werkzeug", "waitress")) + (
    "<sqlalchemy generated",)   # SQLAlchemy's wrappers
_STDLIB = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})
# console-script launchers (bin/nova-api: "sys.exit(main())") likewise
_SCRIPTS = sysconfig.get_paths()["scripts"] + os.sep
_SITE_PACKAGES = tuple({sysconfig.get_paths()[k]
                        for k in ("purelib", "platlib")})
# id(code object) -> not the application.  Keyed by id because hashing a
# code object hashes its constants, every time; the code objects are kept
# alive (the list) so that no id is reused.  At most this many: a process
# that compiles code at run time (exec, templates) may check out from ever
# new code objects, which past it are classified anew at each walk.
_internal_codes: Dict[int, bool] = {}
_classified_codes: List[Any] = []
MAX_CLASSIFIED_CODES = 5000


def _is_internal(code) -> bool:
    internal = _internal_codes.get(id(code))
    if internal is None:
        name = code.co_filename
        internal = (name == _is_internal.__code__.co_filename   # connmon
                    or name.startswith(("<frozen", _SCRIPTS))
                    or any(package in name for package in _LIBRARY_PACKAGES)
                    or (name.startswith(_STDLIB)
                        and not name.startswith(_SITE_PACKAGES)))
        if len(_classified_codes) < MAX_CLASSIFIED_CODES:
            _classified_codes.append(code)
            _internal_codes[id(code)] = internal
    return internal


def describe_code(code, line: int) -> str:
    return printable(f"{code.co_filename}:{line} in "
                     f"{getattr(code, 'co_qualname', code.co_name)}",
                     MAX_LOCATION)


def line_at(code, offset: int) -> int:
    """The source line of a bytecode offset."""
    import dis
    line = code.co_firstlineno
    for start, start_line in dis.findlinestarts(code):
        if start > offset:
            break
        line = start_line or line
    return line


def describe_stack(stack: List[Any]) -> str:
    """The innermost application frame of ``stack`` (innermost first)."""
    frame = next((f for f in stack if not _is_internal(f.f_code)), stack[0])
    return describe_code(frame.f_code, frame.f_lineno)


# The application frame asking for a connection is found by a frame walk
# (each frame walked is materialised, which costs), so a site found once is
# remembered, with its depth: the checkout listener first looks at the frame
# at the depth of the last site found, and when that frame is at a known
# site, that is the answer.  Only a new site, or a stack of another shape,
# walks.  A site is known by (id(code), bytecode offset), not by its line,
# because a frame's f_lineno scans the code's line table on every access;
# and it is numbered, once per process, so that only a small number
# travels with each checkout.  At most MAX_SITES are (what the daemon keeps
# of a process): past them, a checkout at a new site has none, and memory
# stays bounded in a process that checks out from code compiled at run
# time.
_site_depth = 3   # from the checkout listener's frame, where the last site was
_sites: Dict[Tuple[int, int], int] = {}   # (id(code), offset) -> number
_site_places: Dict[int, Tuple[Any, int]] = {}   # number -> (code, offset)


def checkout_site(_getframe=sys._getframe) -> Tuple[Optional[int], Any]:
    """Walk out from the checkout listener (which calls this through
    site_and_mark) to the first application frame, and remember its site
    and depth: the site's number and the frame, or (None, None) if there
    is no application frame.

    On an asyncio engine the pool is called inside SQLAlchemy's greenlet
    bridge, whose stack holds no application frame: the application's
    coroutine waits, suspended, in the greenlet that started the bridge,
    so the walk goes on there."""
    global _site_depth
    frame, depth = _first_application_frame(_getframe(3))   # 0: here,
    #                                      1: site_and_mark, 2: the listener
    if frame is not None:
        _site_depth = depth + 1   # counted from the listener
    else:
        frame, _ = _first_application_frame(_bridged_caller())
        if frame is None:
            return None, None
    code = frame.f_code
    key = (id(code), frame.f_lasti)
    number = _sites.get(key)
    if number is None:
        if len(_sites) >= MAX_SITES:
            return None, None
        _sites[key] = number = len(_sites) + 1   # the code is kept, so its
        _site_places[number] = (code, frame.f_lasti)   # id stays
    return number, frame


def _first_application_frame(frame) -> Tuple[Any, int]:
    """The first application frame at or outside ``frame``, and how many
    frames out it is."""
    depth = 0
    while frame is not None and _is_internal(frame.f_code):
        frame, depth = frame.f_back, depth + 1
    return frame, depth


def _bridged_caller():
    """Where the greenlet that started SQLAlchemy's asyncio bridge (the one
    running now) waits for it: the innermost frame of the awaiting
    coroutines; None outside the bridge."""
    greenlet = sys.modules.get("greenlet")
    if greenlet is None:
        return None
    current = greenlet.getcurrent()
    if current.parent is None or not type(current).__module__.startswith(
            "sqlalchemy."):
        return None
    return current.parent.gr_frame


def site_name(number: int) -> str:
    """"file:line in function" of a checkout site."""
    code, offset = _site_places[number]
    return describe_code(code, line_at(code, offset))


# Who holds a checked-out connection, and whether the code that asked for
# it still runs.  At each checkout the listener notes the application
# frames on the holder's stack: the site's frame and its application
# callers (the request handler, the @reader-decorated API function, the
# Session's owner); and, once a run of a frame, the holder running it (the
# asyncio task, the greenlet or the thread: objects that outlive their
# work and say when it has ended), weakly, so that connmon keeps no holder
# alive, nor what a task returned (one that has been collected has
# ended).  In an ORM application the first query, and so the checkout,
# runs in a helper that returns long before the transaction ends: its
# callers say whether the request still runs.
#
# A frame cannot be referenced weakly, and a strong reference would keep
# its locals (the connection among them) alive after it returns; nor does
# its id() tell it apart: once it has returned, a new frame of the same
# function in the same holder (the next request of a pooled thread) may
# be given its memory.  So each of those frames is marked, once, in the
# slot a frame has for others' use, f_trace, with a mark unique to that
# run of it and linked to its caller's (see FrameMark); the checkout keeps
# the site's.  Only for connections held past hold_warn_seconds, on the
# fold thread, does connmon look at the holder's stack now:
#
#   holder ended                 -> "thread gone"  (a leak for sure)
#   no marked frame of the        -> "leaked"       (the request returned:
#     checkout on its stack                          it runs other code)
#   one of them on it            -> "FILE:LINE in FUNC": the innermost
#                                   application frame of that stack
#
# A task holder adds " (task NAME)", its name noted with the mark.  Both
# leak verdicts are final: a frame that has returned never runs again, and
# no other frame carries its mark.  A connection found "held" is looked at
# again at every scan.

LEAKED = "leaked"
THREAD_GONE = "thread gone"
MAX_TASK_NAME = 100


class TaskRef(weakref.ref):
    """A weak reference to a task holder, with the task's name, which its
    verdicts carry even once the task has been collected."""

    __slots__ = ("name",)

    def __init__(self, task) -> None:   # (weakref.ref.__new__ refers)
        self.name = printable(str(task.get_name())[:MAX_TASK_NAME])


class FrameMark:
    """What an application frame on a holder's stack at a checkout carries
    in its f_trace from then on: unique to that run of the frame, linked
    to its caller's (``outer``), and kept by the checkouts it is the
    site's mark of, so that no other object takes its id meanwhile.

    A frame's f_trace is called only while a tracer (sys.settrace) runs
    in its thread: a frame a tracer gave one is left alone, and a tracer
    calling this one gets None, which asks for no line events, as the
    frame's None did."""

    __slots__ = ("outer", "holder", "lasti", "site")

    def __init__(self, outer: Optional["FrameMark"],
                 holder: weakref.ref) -> None:
        self.outer = outer
        self.holder = holder   # who runs the frame: see holder_finder
        self.lasti = -1   # where its frame last checked out (the site's
        self.site = 0     # offset and number), to spare the next look-up

    def __call__(self, frame, event: str, arg: Any) -> None:
        return None


def site_and_mark(frame, find_holder
                  ) -> Tuple[Optional[int], Optional[FrameMark]]:
    """The site of a checkout and the mark of its frame, when the frame
    at the depth the last site was found (``frame``, or None) has not
    checked out at this place before in this run of it; ``find_holder``
    gives a weak reference to the holder running it (see frame_mark)."""
    site = frame and _sites.get((id(frame.f_code), frame.f_lasti))
    if not site:
        site, frame = checkout_site()
        if site is None:
            return None, None
    mark = frame.f_trace
    if type(mark) is not FrameMark:   # a new run of the site
        mark = frame_mark(frame, find_holder)
    if mark is not None and frame.f_trace is mark:   # (not a tracer's)
        mark.lasti, mark.site = frame.f_lasti, site
    return site, mark


def frame_mark(frame, find_holder) -> Optional[FrameMark]:
    """The mark of the application frame ``frame``, marking it and its
    application callers not marked yet: the walk out stops at the first
    frame marked already, whose callers were marked with it (it has not
    returned, so they have not).  None when no frame could be marked.

    Each new mark notes the holder running its frame (``find_holder()``,
    asked once a walk): a frame runs in one holder, so its checkouts need
    not ask again.  (A generator's frame resumed by another thread would
    be judged by the holder that ran it first.)"""
    unmarked = []
    while frame is not None:
        mark = frame.f_trace
        if type(mark) is FrameMark:
            break
        if mark is None and not _is_internal(frame.f_code):
            unmarked.append(frame)
        frame = frame.f_back
    else:
        mark = None
    if unmarked:
        holder = find_holder()
        for frame in reversed(unmarked):
            frame.f_trace = mark = FrameMark(mark, holder)
    return mark


class ThreadHolder:
    """The holder of the checkouts of one OS thread (where no green thread
    runs), kept in a thread-local: so it lives exactly as long as the
    thread's Python state, and its weak reference dies when the thread
    ends, whoever made the thread.  Not the threading.Thread: for a thread
    Python did not create (uWSGI's request threads, a C library's
    callbacks), threading makes up a _DummyThread that always says it is
    alive, which before Python 3.12 stays in threading._active after the
    thread has ended and goes to the next thread given the same ident.
    ``ident`` finds the thread's frames now (sys._current_frames())."""

    __slots__ = ("ident", "__weakref__")

    def __init__(self, ident: int) -> None:
        self.ident = ident


def holder_finder(is_async: bool) -> Tuple[Any, Any]:
    """The functions a checkout listener calls for a weak reference to the
    current holder: the task on an asyncio engine, else the greenlet where
    green threads may run (greenlet imported), else the thread's
    ThreadHolder.  The first is quick and may answer None; then the
    second, once per thread, knows."""
    if is_async:
        import asyncio
        running_loop, current_task = (asyncio.events._get_running_loop,
                                      asyncio.current_task)
        quick, fallback = holder_finder(False)

        def current_task_or_fallback():
            loop = running_loop()
            task = loop and current_task(loop)
            return TaskRef(task) if task else quick() or fallback()
        return current_task_or_fallback, current_task_or_fallback
    greenlet = sys.modules.get("greenlet")
    real_get_ident = _real_get_ident()
    if greenlet is None:
        local = threading.local()

        def first_checkout_in_thread():
            local.holder = holder = ThreadHolder(real_get_ident())
            local.ref = ref = weakref.ref(holder)
            return ref
        return (functools.partial(getattr, local, "ref", None),
                first_checkout_in_thread)
    getcurrent = greenlet.getcurrent

    def current_greenlet():
        current = getcurrent()
        if current.parent is None and current not in _thread_greenlets:
            _note_thread_greenlet(current, real_get_ident())
        return weakref.ref(current)
    return current_greenlet, current_greenlet


# A thread's main greenlet -> the thread's ident: a running greenlet's frames
# are the stack of its thread, which greenlet does not name (and green
# runtimes patch threading's idents).  Dead ones are dropped as new come.
_thread_greenlets: Dict[Any, int] = {}


def _note_thread_greenlet(main_greenlet, ident: int) -> None:
    """(On an application thread: other threads may note theirs at once.)"""
    for known in list(_thread_greenlets):
        if known.dead:
            _thread_greenlets.pop(known, None)
    _thread_greenlets[main_greenlet] = ident


def _real_get_ident():
    """The OS thread's ident, whatever eventlet or gevent have patched."""
    return _unpatched("_thread", "get_ident")


def holder_stack(ref: weakref.ref) -> Tuple[bool, Optional[List[Any]], str]:
    """(ended, stack, label) of a holder, from its weak reference: whether
    it has ended (or been collected); its frames now, innermost first (None
    when they cannot be seen at this moment); the label its verdicts
    carry."""
    holder = ref()
    is_task = isinstance(ref, TaskRef)
    label = f" (task {ref.name})" if isinstance(ref, TaskRef) else ""
    if holder is None:
        return True, None, label
    if is_task:
        if holder.done():
            return True, None, label
        return False, _awaiting_frames(holder.get_coro()), label
    if isinstance(holder, ThreadHolder):   # alive, since it is referred
        # to: its frames now, none while it runs no Python code (a uWSGI
        # request thread between requests)
        return False, _frames_out(sys._current_frames().get(holder.ident)), ""
    if holder.dead:   # a greenlet
        return True, None, ""
    if holder.gr_frame is not None:   # suspended: its own stack
        return False, _frames_out(holder.gr_frame), ""
    # Running now, so its frames are its thread's stack (if it still runs
    # after that stack is taken).
    root = holder
    while root.parent is not None:
        root = root.parent
    ident = _thread_greenlets.get(root)
    frame = None if ident is None else sys._current_frames().get(ident)
    if frame is None or holder.gr_frame is not None:
        return False, None, ""
    return False, _frames_out(frame), ""


def _frames_out(frame) -> List[Any]:
    """``frame`` and its callers, innermost first."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _awaiting_frames(coro) -> Optional[List[Any]]:
    """A suspended task's frames, innermost first: its coroutine and what
    each awaits in turn.  None while it runs (the chain is then on its
    loop thread's stack, or a bridge greenlet's)."""
    if getattr(coro, "cr_running", False):
        return None
    frames = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(
            coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(
            coro, "gi_yieldfrom", None)
    frames.reverse()
    return frames


def is_leak(verdict: str) -> bool:
    """Whether a long holder's text is one of the two leak verdicts (a
    place is "FILE:LINE in FUNC", never one of those words alone)."""
    return verdict.split(" (task ", 1)[0] in (LEAKED, THREAD_GONE)


def holder_verdict(mark: FrameMark) -> Optional[str]:
    """What a long holder's connection is now (the "held at" place,
    "leaked" or "thread gone"), from the mark of its checkout's site and
    the holder that mark notes; None when it cannot be seen now."""
    ended, stack, label = holder_stack(mark.holder)
    if ended:
        return THREAD_GONE + label
    if stack is None:
        return None
    on_stack = {id(frame.f_trace) for frame in stack}
    marked: Optional[FrameMark] = mark
    while marked is not None:
        if id(marked) in on_stack:
            return printable(describe_stack(stack) + label,
                             MAX_LOCATION)   # what the daemon takes
        marked = marked.outer
    return LEAKED + label


# ---------------------------------------------------------------------------
# 4. Process state: one process's connections, both halves of the codec
# ---------------------------------------------------------------------------
#
# A ProcessState is one process's connections.  The application keeps one
# for itself and folds its pool events into it (fold); every flush it sends
# the difference from what it sent last (message).  The daemon keeps one per
# attached process and changes it with those messages (update).  Both
# sides use this one class, so they cannot disagree about the meaning.
#
# A checkout and a checkin, the events of every request, cross no thread:
# the listener counts them in the connection's own ConnectionNote, which
# only the thread holding the connection writes (the pool hands it to one
# holder at a time), and puts the connections out in one dict shared by
# the process's pools (Sender.out; a dict's item set and pop are atomic).
# The fold thread reads the notes (ProcessState.fold): its cost follows
# the connections, once a batch, not the traffic; and nothing is made for
# a request (no event, no tuple), so the application's garbage collector
# is not made to run any more often.  A flush that saw ten thousand
# checkouts sends a count, a hold-time sum and the peaks.

# The rarer events go from the listeners to the fold thread through a
# list used as a queue, flat: six items an event, added at the end by one
# list.extend() (atomic: C code, holding the GIL throughout) and taken from
# the front six at a time.
#   (CONNECT, conn, when, pool, note, began)  a connection counted (see
#       PoolProbe.counted): its ConnectionNote; began: when its opening began
#       (None when not known), so the connect time is when - began
#   (CLOSE, conn, when, None, None, None)  closed, invalidated, discarded
#   (INVALIDATED, conn, when, pool, None, None)  invalidated: a failed
#       pre-ping, a disconnect detected, invalidate() (hard or soft)
#   (WAITED, None, when, pool, None, began)  a checkout that waited for
#       WAITING_AFTER or more (it is counted in its note too)
#   (TIMED_OUT, None, when, pool, None, began)  a checkout gave up
#       (sqlalchemy.exc.TimeoutError)
#   (FAILED, None, when, pool, None, began)  a checkout failed otherwise:
#       the connection could not be opened
#   (POOL, pool, when, limit, endpoint, None)  limit: pool_size +
#       max_overflow, None when unlimited; endpoint: (backend, host, port,
#       database, user) or None
#   (ENGINE_GONE, pool, when, None, None, None)  its engine was collected:
#       the pool and its connections are no more
CONNECT = "connect"
CLOSE = "close"
INVALIDATED = "invalidated"
WAITED = "waited"
TIMED_OUT = "timed out"
FAILED = "failed"
POOL = "pool"
ENGINE_GONE = "engine gone"
EVENT_ITEMS = 6
CONNECT_NOTE = 4   # where a CONNECT event has its note

# A checkout counts as waiting once it has taken this long: a checkout
# that finds a connection idle takes microseconds, so this leaves out only
# threads the interpreter happened to pause inside one.
WAITING_AFTER = 0.01
ENDPOINT_FIELDS = ("backend", "host", "port", "database", "user")

# What the daemon accepts of one process: memory stays bounded whatever
# clients send.
MAX_PROCESS_CONNECTIONS = 5000   # with the others: <= 8.2 MiB a process
MAX_PROCESS_POOLS = 1000


class ConnectionNote:
    """What connmon notes of one open DBAPI connection of a pool, kept as
    the ``_connmon`` attribute (NOTE) of its pool entry: not in the entry's
    ``.info``, which is the application's (it is Connection.info too), nor
    in a mapping keyed by the entry, whose look-up would cost each checkout
    and checkin more than an attribute (or by the DBAPI connection:
    sqlite3's cannot be weakly referenced).  A reconnect of the entry replaces
    the note (see on_connect).

    The connection is counted at its first checkout or checkin, not when
    opened (see on_connect): until then ``opened`` holds when it was
    opened, when its opening began, and its pool; once counted,
    ``connections`` is that pool's set of open connections (see
    pool_connections), which it is in.

    Its checkouts and checkins are counted here, by the thread holding it
    (see PoolProbe.checked_out and the checkin listener): when it was
    last checked out (``out_at``), from which site and frame (``site``,
    ``mark``: see holder_verdict), and since it was opened how many
    checkouts and the seconds they waited (``waited``, when its pool is
    ``measured``), and how many holds and their seconds.  Each counter is
    written after the sums it gates (``waited`` before ``checkouts``,
    ``held`` before ``holds``), and the fold thread reads them the other
    way round, so a count it has seen never lacks its seconds.  ``seen``
    is the fold thread's own: the counts and sums it has folded.  The
    longest wait since the fold last looked (``wait_max``) is the one
    value both write: the fold thread's reset may drop a wait of under
    WAITING_AFTER that ends in the same instant (longer ones also come as
    WAITED events)."""

    __slots__ = ("ident", "pool", "measured", "opened", "connections",
                 "out_at", "site", "mark", "checkouts", "waited", "wait_max",
                 "holds", "held", "seen")

    def __init__(self, ident: int, pool: int, measured: bool,
                 opened: Tuple[float, Optional[float], Any]):
        self.ident = ident
        self.pool = pool
        self.measured = measured
        self.opened: Optional[Tuple[float, Optional[float], Any]] = opened
        self.connections: Optional[Set[int]] = None
        self.out_at = 0.0
        self.site: Optional[int] = None
        self.mark: Optional[FrameMark] = None
        self.checkouts = self.holds = 0
        self.waited = self.wait_max = self.held = 0.0
        self.seen: Tuple[int, int, float, float] = (0, 0, 0.0, 0.0)

    def counted_since_seen(self) -> Tuple[int, int, float, float, float]:
        """(Fold thread) the checkouts, holds, hold seconds, wait seconds
        and longest wait since the fold thread last looked, which it has
        now seen."""
        checkouts, holds = self.checkouts, self.holds   # (then their sums)
        seen = self.seen
        if checkouts == seen[0] and holds == seen[1]:
            return 0, 0, 0.0, 0.0, 0.0
        held, waited, wait_max = self.held, self.waited, self.wait_max
        self.wait_max = 0.0
        self.seen = (checkouts, holds, held, waited)
        return (checkouts - seen[0], holds - seen[1], held - seen[2],
                waited - seen[3], wait_max)

    def inherited(self, now: float) -> None:
        """(Forked child) The parent's connection: what the parent counted
        is the parent's, and the child counts it at its first checkout or
        checkin, as it would one it opened now (see PoolProbe.counted)."""
        self.seen = (self.checkouts, self.holds, self.held, self.waited)
        self.wait_max = 0.0
        self.opened = (now, None, None)

    def forget(self) -> int:
        """The counted connection leaves its pool (closed or detached):
        its id."""
        if self.connections is not None:   # (counted: see counted_note)
            self.connections.discard(self.ident)
        return self.ident


class ProcessState:
    """The open connections of one process, which of them are checked out
    and since when, its pools' capacities and databases, the checkouts
    waiting for a connection, and what happened since the last message
    (checkout count, hold, wait and connect times, timeouts, failures,
    invalidations, peaks)."""

    def __init__(self, ident: str, hostname: str, progname: str, pid: int,
                 session: int = 0):
        self.ident = ident
        self.hostname = hostname
        self.progname = progname
        self.pid = pid
        self.session = session   # grows with every (re)connect of the process
        self.origin = ""         # daemon side: the node it is attached to
        self.since = time.time()
        self.conns: Dict[int, int] = {}            # connection -> pool
        self.checked_out: Dict[int, float] = {}    # connection -> since when
        self.pools: Dict[int, Optional[int]] = {}  # pool -> capacity
        self.endpoints: Dict[int, Dict[str, Any]] = {}   # pool -> database
        # pool -> (checkouts waiting now, since when the longest waits)
        self.waiting: Dict[int, Tuple[int, float]] = {}
        self.max_conns = self.max_checked_out = self.max_waiting = 0
        # App side: the notes of the connections open, and the waits of
        # WAITING_AFTER or more that ended since the last look (began, end)
        self.notes: Dict[int, "ConnectionNote"] = {}
        self._long_waits: List[Tuple[float, float]] = []
        # The leak finder: where each checked-out connection was checked out
        # (a site number, named in site_names), by which frames (app side
        # only: the site's FrameMark, see holder_verdict), and for long
        # holders where they are now.
        self.holders: Dict[int, tuple] = {}   # conn -> (site, mark)
        self.site_names: Dict[int, str] = {}  # site -> "file:line in func"
        self.held_at: Dict[int, str] = {}     # connection -> "file:line..."
        self._held_texts: Dict[str, str] = {}  # daemon side: each text once
        self._site_holders: Dict[int, tuple] = {}  # ... each holder once
        self.reset_counters()

    @property
    def key(self) -> Tuple[str, str]:
        return self.hostname, self.progname

    def describe(self) -> Dict[str, Any]:
        """Who this process is: the "proc" of an app's hello."""
        return {"id": self.ident, "hostname": self.hostname,
                "progname": self.progname, "pid": self.pid,
                "session": self.session}

    def reset_counters(self) -> None:
        self.checkouts = self.holds = 0
        self.hold_total = 0.0
        self.peak_conns = len(self.conns)
        self.peak_checked_out = len(self.checked_out)
        self.waits = self.connects = 0           # each with its seconds:
        self.wait_total = self.wait_max = self.connect_total = 0.0
        self.timeouts = self.failures = self.invalidations = 0
        self.peak_waiting = self.waiting_count

    @property
    def waiting_count(self) -> int:
        return sum(count for count, _ in self.waiting.values()) \
            if self.waiting else 0

    # -- application side -----------------------------------------------------

    def fold(self, events: Iterable[tuple],
             out: Optional[Dict[int, "ConnectionNote"]] = None,
             peak_out: int = 0) -> bool:
        """Fold pool events in, in order (the six items of each: see the
        event kinds above), then what the connections' notes counted since
        the last fold, and which connections are out now (``out``, a copy
        of Sender.out; ``peak_out``: the most out at once meanwhile, as the
        listeners saw it).  Returns whether anything changed.

        A forked child counts its parent's pooled connections as it
        first checks them out or in (see ConnectionNote.inherited)."""
        conns, notes = self.conns, self.notes
        changed = False
        for kind, ident, when, pool, extra, began in events:
            changed = True
            if kind is CONNECT:
                conns[ident] = pool
                notes[ident] = extra
                self.peak_conns = max(self.peak_conns, len(conns))
                if began is not None:
                    self.connects += 1
                    self.connect_total += when - began
            elif kind is CLOSE:
                note = notes.pop(ident, None)
                if note is not None:   # its last counts
                    self._count(note)
                conns.pop(ident, None)
                if self.checked_out.pop(ident, None) is not None:
                    self._forget_holder(ident)
            elif kind is INVALIDATED:
                self.invalidations += 1
            elif kind is WAITED:
                self._long_waits.append((began, when))
                self.wait_max = max(self.wait_max, when - began)
            elif kind is TIMED_OUT or kind is FAILED:
                if kind is TIMED_OUT:
                    self.timeouts += 1
                else:
                    self.failures += 1
                self.waits += 1
                self.wait_total += when - began
                self.wait_max = max(self.wait_max, when - began)
                if when - began >= WAITING_AFTER:
                    self._long_waits.append((began, when))
            elif kind is POOL:
                self.pools[ident] = pool
                if extra is not None:
                    self.endpoints[ident] = dict(zip(ENDPOINT_FIELDS, extra))
            elif kind is ENGINE_GONE:
                self._forget_pool(ident)
        if out is None:
            return changed
        for note in notes.values():
            changed = self._count(note) or changed
        return self._checked_out_now(out, peak_out) or changed

    def _count(self, note: "ConnectionNote") -> bool:
        """Add what ``note`` counted since the last look; whether any."""
        checkouts, holds, held, waited, wait_max = note.counted_since_seen()
        if not (checkouts or holds):
            return False
        self.checkouts += checkouts
        self.holds += holds
        self.hold_total += held
        if note.measured and checkouts:
            self.waits += checkouts
            self.wait_total += waited
            self.wait_max = max(self.wait_max, wait_max)
        return True

    def _checked_out_now(self, out: Dict[int, "ConnectionNote"],
                         peak_out: int) -> bool:
        """Note which connections are out now and since when, where each
        was checked out, and forget where the ones checked in or out again
        were held; whether any of that changed."""
        before, conns = self.checked_out, self.conns
        now_out = {ident: note.out_at for ident, note in out.items()
                   if ident in conns}
        self.peak_checked_out = max(self.peak_checked_out, peak_out,
                                    len(now_out))
        if now_out == before:
            return False
        for ident, since in before.items():
            if now_out.get(ident) != since:   # checked in, or out again
                self._forget_holder(ident)
        for ident, since in now_out.items():
            note = out[ident]
            if before.get(ident) != since and note.site is not None:
                self.holders[ident] = (note.site, note.mark)
        self.checked_out = now_out
        return True

    def look_at_waiters(self, now: float,
                        pending: Dict[int, List[float]]) -> None:
        """Count the checkouts waiting now, per pool, from when each began
        (``pending``: the measured pools' lists of those times), and the
        most that waited at once since the last look: the waits that ended
        meanwhile and the ones still going, laid side by side."""
        waiting = {}
        starts = []
        for pool, began in list(pending.items()):
            began = [t for t in list(began) if now - t >= WAITING_AFTER]
            if began:
                waiting[pool] = (len(began), min(began))
                starts += began
        self.waiting = waiting
        moments = sorted([(t + WAITING_AFTER, 1) for t in starts]
                         + [(t + WAITING_AFTER, 1)
                            for t, _ in self._long_waits]
                         + [(end, -1) for _, end in self._long_waits])
        self._long_waits.clear()
        at_once = 0
        for _, step in moments:
            at_once += step
            self.peak_waiting = max(self.peak_waiting, at_once)

    def differs_visibly(self, sent: "ProcessState") -> bool:
        """Whether the daemon's counts would change with a message: which
        connections are open and out, the pools, where long holders are,
        how many checkouts wait; not the counters and the ages."""
        return (self.conns.keys() != sent.conns.keys()
                or self.checked_out.keys() != sent.checked_out.keys()
                or self.pools != sent.pools or self.held_at != sent.held_at
                or self.waiting_counts() != sent.waiting_counts())

    def waiting_counts(self) -> Dict[int, int]:
        return {pool: count for pool, (count, _) in self.waiting.items()}

    def alarm_since(self, sent: "ProcessState") -> bool:
        """Whether what changed since ``sent`` (what the daemon knows) is
        something an operator must see at once: a pool the daemon does not
        know (the process attaching, an engine made), a pool exhausted or
        no longer, a pool's checkouts starting or ceasing to wait, a
        timeout or a connect error, a new long holder or a leak found.
        Anything else (connections opened, closed, checked out and in,
        counters, hold times, a holder's place) merely changes, and may
        wait for the next message (see Sender._fold_batch)."""
        return bool(self.timeouts or self.failures
                    or self.pools.keys() - sent.pools.keys()
                    or self.waiting.keys() != sent.waiting.keys()
                    or self.exhausted_pools() != sent.exhausted_pools()
                    or any(sent.held_at.get(ident) != text and (
                        ident not in sent.held_at or is_leak(text))
                        for ident, text in self.held_at.items()))

    def exhausted_pools(self) -> Set[int]:
        """The pools of a limited capacity whose every connection is
        checked out: one checkout more waits (as connmond's is_exhausted
        judges a process)."""
        out: Dict[int, int] = {}
        for ident in self.checked_out:
            pool = self.conns[ident]   # (every one checked out is open)
            out[pool] = out.get(pool, 0) + 1
        return {pool for pool, limit in self.pools.items()
                if limit and out.get(pool, 0) >= limit}

    def _forget_pool(self, pool: int) -> None:
        """An application that makes engine after engine must not grow
        its state (nor reach MAX_PROCESS_POOLS at the daemon)."""
        self.pools.pop(pool, None)
        self.endpoints.pop(pool, None)
        self.waiting.pop(pool, None)
        for ident in [c for c, owner in self.conns.items() if owner == pool]:
            del self.conns[ident]
            note = self.notes.pop(ident, None)
            if note is not None:   # its last counts
                self._count(note)
            if self.checked_out.pop(ident, None) is not None:
                self._forget_holder(ident)

    def name_sites(self) -> None:
        """Name the checkout sites of the connections out (app side)."""
        for site, _ in self.holders.values():
            if site not in self.site_names:
                self.site_names[site] = site_name(site)

    def _forget_holder(self, ident: int) -> None:
        self.holders.pop(ident, None)
        self.held_at.pop(ident, None)

    def look_at_long_holders(self, now: float, threshold: float) -> None:
        """Say what each connection held for longer than ``threshold``
        seconds is now (see holder_verdict): held at a place, "leaked" or
        "thread gone".  Costs nothing without long holders; a leak, once
        found, is not looked at again."""
        for ident, since in self.checked_out.items():
            if now - since < threshold or ident not in self.holders or (
                    is_leak(self.held_at.get(ident, ""))):
                continue
            mark = self.holders[ident][1]
            if mark is None:   # no frame marked (a tracer's)
                continue
            verdict = holder_verdict(mark)
            if verdict is not None:
                self.held_at[ident] = verdict

    def message(self, now: float, sent: Optional["ProcessState"] = None
                ) -> Dict[str, Any]:
        """The "update" that takes a daemon from knowing ``sent`` to knowing
        this state; without ``sent``, the "state" message (all of it)."""
        conns, out = self.conns, self.checked_out
        sent_conns = sent.conns if sent else {}
        sent_out = sent.checked_out if sent else {}
        message: Dict[str, Any] = {
            "op": "update" if sent else "state",
            "connect": [[c, p] for c, p in conns.items()
                        if c not in sent_conns],
            "close": [c for c in sent_conns if c not in conns],
            "checkout": [[c, round(now - t, 6)] for c, t in out.items()
                         if sent_out.get(c) != t],
            "checkin": [c for c in sent_out if c not in out and c in conns],
            "checkouts": self.checkouts,
            "hold": [round(self.hold_total, 6), self.holds],
            "peak": [self.peak_conns, self.peak_checked_out],
        }
        sent_sites = sent.site_names if sent else {}
        sent_held = sent.held_at if sent else {}
        tables: Tuple[Tuple[str, List[list]], ...] = (
                ("sites", [[i, name] for i, name in self.site_names.items()
                           if i not in sent_sites]),
                ("checkout_sites", [[c, self.holders[c][0]] for c, t in
                                    out.items() if c in self.holders
                                    and sent_out.get(c) != t]),
                ("held_at", [[c, text] for c, text in self.held_at.items()
                             if sent_held.get(c) != text]))
        counters: Tuple[Tuple[str, Any], ...] = (
                ("waits", self.waits and [round(self.wait_total, 6),
                                          self.waits,
                                          round(self.wait_max, 6)]),
                ("timeouts", self.timeouts),
                ("failures", self.failures),
                ("connects", self.connects and [round(self.connect_total, 6),
                                                self.connects]),
                ("invalidations", self.invalidations),
                ("peak_waiting", self.peak_waiting))
        for key, value in tables + counters:
            if value:
                message[key] = value
        if self.waiting or sent is None or sent.waiting:
            message["waiting"] = [[p, count, round(now - since, 6)]
                                  for p, (count, since) in
                                  self.waiting.items()]
        if (sent is None or self.pools != sent.pools
                or self.endpoints != sent.endpoints):
            message["pools"] = [[p, limit, self.endpoints.get(p)]
                                for p, limit in self.pools.items()]
        return message

    def copy(self) -> "ProcessState":
        """A copy of the connections and pools (what was sent)."""
        twin = ProcessState(self.ident, self.hostname, self.progname,
                            self.pid)
        twin.conns = dict(self.conns)
        twin.checked_out = dict(self.checked_out)
        twin.pools = dict(self.pools)
        twin.endpoints = dict(self.endpoints)
        twin.waiting = dict(self.waiting)
        twin.site_names = dict(self.site_names)
        twin.held_at = dict(self.held_at)
        return twin

    # -- daemon side ----------------------------------------------------------

    def update(self, message: Dict[str, Any], now: float) -> int:
        """Apply a "state" or "update" message, validating every field
        (see Update)."""
        return self.apply(Update(message), now)

    def apply(self, change: "Update", now: float) -> int:
        """Apply a message checked by Update: "state" replaces
        everything.  An update of counters only (the commonest: most
        messages carry checkouts that came and went) touches the maxima
        and nothing else.  Returns how many of its events were for
        connections the process never announced (ignored)."""
        unknown = self._apply_tables(change, now) if change.moves else 0
        conns, out = len(self.conns), len(self.checked_out)
        self.max_conns = max(self.max_conns, change.peak_conns, conns)
        self.max_checked_out = max(self.max_checked_out,
                                   change.peak_checked_out, out)
        self.max_waiting = max(self.max_waiting, change.peak_waiting,
                               self.waiting_count)
        return unknown

    def _apply_tables(self, change: "Update", now: float) -> int:
        """The connections, checkouts, pools, waits and sites of a
        message; checks the process's bounds before changing anything."""
        known = 0 if change.state else len(self.conns)
        if known + len(change.connect) > MAX_PROCESS_CONNECTIONS:
            raise ProtocolError(f"more than {MAX_PROCESS_CONNECTIONS} "
                                "connections in one process")
        if change.state:
            for table in (self.conns, self.checked_out, self.pools,
                          self.endpoints, self.waiting, self.holders,
                          self.site_names, self.held_at,
                          self._held_texts, self._site_holders):
                table.clear()
        if change.pools is not None:
            self.pools = {pool: limit for pool, limit, _ in change.pools}
            self.endpoints = {pool: endpoint
                              for pool, _, endpoint in change.pools
                              if endpoint is not None}
        if change.waiting is not None:
            self.waiting = {pool: (count, now - age)
                            for pool, count, age in change.waiting}
        self.conns.update(change.connect)
        unknown = 0   # events for connections the process never announced
        for ident in change.close:
            unknown += self.conns.pop(ident, None) is None
            self.checked_out.pop(ident, None)
            self._forget_holder(ident)
        for ident in change.checkin:
            unknown += self.checked_out.pop(ident, None) is None
            self._forget_holder(ident)
        for ident, age in change.checkout:
            if ident in self.conns:
                self.checked_out[ident] = now - age
                self._forget_holder(ident)
            else:
                unknown += 1
        room = MAX_SITES - len(self.site_names)
        self.site_names.update(change.sites[:max(0, room)])
        for ident, site in change.checkout_sites:
            # A named site only, each holder tuple once: bounded bytes.
            if ident in self.checked_out and site in self.site_names:
                self.holders[ident] = self._site_holders.setdefault(
                    site, (site, None))
        for ident, text in change.held_at:
            if ident in self.checked_out and (
                    ident in self.held_at or len(self.held_at) < MAX_SITES):
                self.held_at[ident] = self._held_text(text)
        return unknown

    def _held_text(self, text: str) -> str:
        """One copy of each held-at text (thousands of holders are held
        at a few places), and at most MAX_SITES of them: what one process
        makes the daemon keep stays bounded in bytes."""
        kept = self._held_texts.get(text)
        if kept is None:
            if len(self._held_texts) >= MAX_SITES:
                return NOT_KEPT
            kept = self._held_texts[text] = text
        return kept

    def site_of(self, ident: int) -> Optional[str]:
        holder = self.holders.get(ident)
        return None if holder is None else self.site_names.get(holder[0])

    def count_sites(self, sites: Dict[Optional[str], dict],
                    now: float) -> None:
        """Add this process's checked-out connections to ``sites``: per
        checkout site, how many are held, the oldest age, the long
        holders and where they are held now."""
        for ident, since in self.checked_out.items():
            name = self.site_of(ident)
            site = sites.get(name)
            if site is None:
                site = sites[name] = {"site": name, "held": 0, "oldest": 0.0,
                                      "long_holders": []}
            age = round(now - since, 1)
            site["held"] += 1
            site["oldest"] = max(site["oldest"], age)
            if ident in self.held_at:
                site["long_holders"].append({
                    "pid": self.pid, "age": age,
                    "held_at": self.held_at[ident]})

    def long_holders(self, now: float) -> List[dict]:
        """The connections held long enough for the app to say where."""
        return oldest_holders({"age": round(now - self.checked_out[ident],
                                            1),
                               "site": self.site_of(ident),
                               "held_at": held_at}
                              for ident, held_at in self.held_at.items()
                              if ident in self.checked_out)

    @property
    def waiting_since(self) -> Optional[float]:
        """When the longest of the checkouts waiting now began waiting."""
        return min((since for _, since in self.waiting.values()),
                   default=None)

    def pool_figures(self) -> Dict[int, Dict[str, Any]]:
        """Per pool: its database, limit, connections, checkouts and
        checkouts waiting."""
        figures: Dict[int, Dict[str, Any]] = {
            pool: {"endpoint": self.endpoints.get(pool), "limit": limit,
                   "conn": 0, "ckout": 0,
                   "waiting": self.waiting.get(pool, (0, 0.0))[0]}
            for pool, limit in self.pools.items()}
        for ident, pool in self.conns.items():
            if pool in figures:
                figures[pool]["conn"] += 1
                figures[pool]["ckout"] += ident in self.checked_out
        return figures

    @property
    def limit(self) -> Optional[int]:
        """Capacity of all this process's pools; None if any is unlimited."""
        total = 0
        for limit in self.pools.values():
            if limit is None:
                return None
            total += limit
        return total


MAX_SITES = 1000   # checkout sites the daemon keeps names of, per process,
#                    and long holders it keeps the places of
NOT_KEPT = "(place not kept: too many)"   # past MAX_SITES held-at texts


class Update:
    """An app's "state" or "update" message, checked whole before any of
    it is applied: the daemon checks it outside its lock and applies it
    (ProcessState.apply) inside.

    ``moves`` says whether it changes any table (connections, checkouts,
    pools, waits, sites); the counters are the checkouts, hold times and
    peaks since the previous message, and the pool pressure (see
    ``_read_pressure``): zero when absent.
    """

    __slots__ = ("state", "moves", "connect", "close", "checkout",
                 "checkin", "pools", "waiting", "sites", "checkout_sites",
                 "held_at", "checkouts", "hold_total", "holds",
                 "peak_conns", "peak_checked_out", "wait_total", "waits",
                 "wait_max", "connect_total", "connects", "timeouts",
                 "failures", "invalidations", "peak_waiting")

    def __init__(self, message: Dict[str, Any]):
        self._read_pressure(message)
        self.state = message["op"] == "state"
        checkouts, hold, peak = (message.get("checkouts"),
                                 message.get("hold"), message.get("peak"))
        if not (is_count(checkouts)
                and type(hold) is list and len(hold) == 2
                and _is_age(hold[0]) and is_count(hold[1])
                and type(peak) is list and len(peak) == 2
                and is_count(peak[0]) and is_count(peak[1])):
            raise ProtocolError("update needs 'checkouts', 'hold' [seconds, "
                                "count] and 'peak' [conns, checkouts]")
        self.checkouts, (self.hold_total, self.holds) = checkouts, hold
        self.peak_conns, self.peak_checked_out = peak
        self.sites = self.checkout_sites = self.held_at = NOTHING
        self.pools = self.waiting = None
        connect, close, checkout, checkin = (
            message.get("connect"), message.get("close"),
            message.get("checkout"), message.get("checkin"))
        if [] == connect == close == checkout == checkin and not (
                self.state or _TABLE_KEYS & message.keys()):
            self.moves = False   # counters only: nothing more to check
            self.connect = self.close = self.checkout = self.checkin = \
                NOTHING
            return
        self.moves = True
        self.connect = _pairs(message, "connect", _is_int)
        self.close = _ints(message, "close")
        self.checkout = _pairs(message, "checkout", _is_age)
        self.checkin = _ints(message, "checkin")
        if "pools" in message:
            self.pools = _pools(message)
            if len(self.pools) > MAX_PROCESS_POOLS:
                raise ProtocolError(f"more than {MAX_PROCESS_POOLS} pools in "
                                    "one process")
        if "waiting" in message:
            self.waiting = _waiting(message)
        self.sites = _pairs(message, "sites", _is_location, optional=True)
        self.checkout_sites = _pairs(message, "checkout_sites", _is_int,
                                     optional=True)
        self.held_at = _pairs(message, "held_at", _is_location,
                              optional=True)

    def _read_pressure(self, message: Dict[str, Any]) -> None:
        """The pool pressure since the previous message, each key optional
        (absent: none): "waits" [seconds, count, longest seconds] of the
        checkouts that waited (whether they got a connection or not),
        "timeouts" and "failures" (checkouts that gave up, or failed to
        open a connection), "connects" [seconds, count] of the connections
        opened, "invalidations", and "peak_waiting", the most checkouts
        waiting at once."""
        get = message.get
        waits, connects = get("waits", NO_WAITS), get("connects", NO_CONNECTS)
        counts = (get("timeouts", 0), get("failures", 0),
                  get("invalidations", 0), get("peak_waiting", 0))
        if not (type(waits) is list and len(waits) == 3
                and _is_age(waits[0]) and is_count(waits[1])
                and _is_age(waits[2])
                and type(connects) is list and len(connects) == 2
                and _is_age(connects[0]) and is_count(connects[1])
                and all(map(is_count, counts))):
            raise ProtocolError(f"{message['op']}: 'waits' must be [seconds, "
                                "count, seconds], 'connects' [seconds, "
                                "count], 'timeouts', 'failures', "
                                "'invalidations' and 'peak_waiting' counts")
        self.wait_total, self.waits, self.wait_max = waits
        self.connect_total, self.connects = connects
        self.timeouts, self.failures, self.invalidations, \
            self.peak_waiting = counts


NO_WAITS = [0.0, 0, 0.0]   # what absent "waits" and "connects" mean
NO_CONNECTS = [0.0, 0]
NOTHING: Sequence[Any] = ()   # an empty table of a message
# The optional keys that change tables: a message with none of them (and
# no connections, checkouts or checkins) is counters only.
_TABLE_KEYS = frozenset({"pools", "waiting", "sites", "checkout_sites",
                         "held_at"})


def _is_int(value: Any) -> bool:
    return type(value) is int and -(1 << 62) < value < (1 << 62)


def is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < (1 << 62)


def _is_age(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < 1e9


def _is_limit(value: Any) -> bool:
    return value is None or is_count(value)


def _is_endpoint(value: Any) -> bool:
    """None, or a pool's database: its backend, host, port, database name
    and user (any but the backend may be null)."""
    return value is None or (
        isinstance(value, dict) and set(value) == set(ENDPOINT_FIELDS)
        and is_text(value["backend"], MAX_NAME)
        and all(value[key] is None or is_text(value[key], MAX_NAME)
                for key in ("host", "database", "user"))
        and (value["port"] is None or (is_count(value["port"])
                                       and value["port"] < 65536)))


def _pools(message: Dict[str, Any]) -> List[list]:
    """"pools": [[pool, limit, endpoint], ...] (endpoint optional)."""
    value = message.get("pools")
    if not isinstance(value, list) or not all(
            isinstance(item, list) and len(item) in (2, 3)
            and _is_int(item[0]) and _is_limit(item[1])
            and (len(item) == 2 or _is_endpoint(item[2])) for item in value):
        raise ProtocolError(f"{message['op']}: 'pools' must be a list of "
                            "[pool, limit, endpoint]")
    return [item if len(item) == 3 else item + [None] for item in value]


def _waiting(message: Dict[str, Any]) -> List[list]:
    """"waiting": [[pool, checkouts waiting, seconds the longest has
    waited], ...]."""
    value = message.get("waiting")
    if not (isinstance(value, list) and len(value) <= MAX_PROCESS_POOLS
            and all(isinstance(item, list) and len(item) == 3
                    and _is_int(item[0]) and is_count(item[1])
                    and _is_age(item[2]) for item in value)):
        raise ProtocolError(f"{message['op']}: 'waiting' must be a list of "
                            f"at most {MAX_PROCESS_POOLS} [pool, count, "
                            "seconds]")
    return value


def _ints(message: Dict[str, Any], key: str) -> List[int]:
    value = message.get(key)
    if not isinstance(value, list) or not all(map(_is_int, value)):
        raise ProtocolError(f"{message['op']}: {key!r} must be a list of "
                            "integers")
    return value


def _is_location(value: Any) -> bool:
    return is_text(value, MAX_LOCATION)


def _pairs(message: Dict[str, Any], key: str, check,
           optional: bool = False) -> List[list]:
    value = message.get(key, [] if optional else None)
    if not isinstance(value, list) or not all(
            isinstance(item, list) and len(item) == 2 and _is_int(item[0])
            and check(item[1]) for item in value):
        raise ProtocolError(f"{message['op']}: {key!r} must be a list of "
                            "[id, value] pairs")
    return value


def server_name(endpoint: Optional[Dict[str, Any]]) -> Optional[str]:
    """"host:port" of a pool's database server; the backend alone for a
    database without one (SQLite); None when not reported."""
    if endpoint is None:
        return None
    if endpoint["host"] is None:
        return endpoint["backend"]
    if endpoint["port"] is None:
        return endpoint["host"]
    return format_address((endpoint["host"], endpoint["port"]))


TOP_HOLDERS = 20   # long holders listed per site, and per process


def oldest_holders(holders: Iterable[dict]) -> List[dict]:
    """The TOP_HOLDERS oldest long holders, oldest first: a snapshot's size
    does not grow with a client's checkouts."""
    return heapq.nsmallest(TOP_HOLDERS, holders, key=lambda h: -h["age"])


# ---------------------------------------------------------------------------
# 5. The sender: background threads per process and daemon address list
# ---------------------------------------------------------------------------

# A process sends what the operator sees, when the console looks (once a
# second): what merely changes (connections, checkouts, counters, hold
# times) at most once every COUNTERS_DELAY, an alarm (see
# ProcessState.alarm_since) within FLUSH_DELAY.  So connmon's threads wake
# a few times a second in a busy process, and connmond pays for about one
# message a second of each.
FLUSH_DELAY = 0.25       # fold the events this often while they come
COUNTERS_DELAY = 1.0     # what merely changes may wait this long
WAITERS_LOOK = 0.2       # how often checkouts waiting are counted
EXIT_WAIT = 0.5          # the most an exiting process waits for its last send
RECONNECT_MIN = 0.1      # first retry after a lost connection
RECONNECT_MAX = 5.0      # retries back off to at most this many seconds
SEND_TIMEOUT = 5.0       # a daemon that does not read for this long is lost


def progname() -> str:
    """The program's name as operators know it: ``nova-api``, not python."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(argv0)
    if name in ("", "-c", "-m", "__main__.py"):
        name = os.path.basename(sys.executable) or "python"
    return printable(name, MAX_NAME)


PING = {"op": "ping"}


class Heartbeat:
    """When to ping the daemon, and when to give it up for lost.

    The daemon gives up a client it has not heard from for its heartbeat
    timeout, so a ping goes out when nothing else was sent for a third of
    it; and since only pongs say the daemon is alive, a ping goes out too,
    however much is sent, once the daemon has not been heard from for two
    thirds of it (then once a third).  A daemon not heard from for the
    whole timeout is lost, as if it had hung up: a host that vanished
    without a FIN, or a stopped daemon.  Between those moments the thread
    sleeps.
    """

    def __init__(self, timeout: float, now: float):
        self.timeout = timeout
        self.heard_at = self.sent_at = self.pinged_at = now

    def heard(self, now: float) -> None:
        self.heard_at = now

    def sent(self, now: float) -> None:
        self.sent_at = now

    def pinged(self, now: float) -> None:
        self.sent_at = self.pinged_at = now

    def lost(self, now: float) -> bool:
        return now - self.heard_at >= self.timeout

    @property
    def ping_at(self) -> float:
        third = self.timeout / 3
        return min(self.sent_at + third,
                   max(self.heard_at + 2 * third, self.pinged_at + third))

    def ping_due(self, now: float) -> bool:
        return now >= self.ping_at

    def wait(self, now: float) -> float:
        """Seconds until the next ping or the deadline, whichever is first."""
        return max(0.0, min(self.ping_at, self.heard_at + self.timeout) - now)


# The jitter's own generator: the application's seeded ``random`` stays
# the application's.  Reseeded in forked children, so workers spread out.
_jitter = random.Random()


class Backoff:
    """Jittered exponential retry delays from RECONNECT_MIN up to
    RECONNECT_MAX, back to the start once a daemon has answered."""

    def __init__(self) -> None:
        self.failures = 0
        self.delay = 0.0
        self.retry_at = 0.0

    def failed(self, now: float) -> None:
        self.failures += 1
        self.delay = min(RECONNECT_MAX, max(RECONNECT_MIN, self.delay * 2))
        self.retry_at = now + self.delay * _jitter.uniform(0.8, 1.2)

    def reset(self) -> None:
        self.failures = 0
        self.delay = 0.0


def _unpatched(module: str, name: str) -> Any:
    """``module.name`` as the standard library made it, even when gevent or
    eventlet has monkey-patched the module (each keeps the originals)."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None:
        return gevent_monkey.get_original(module, name)
    eventlet_patcher = sys.modules.get("eventlet.patcher")
    if eventlet_patcher is not None:
        return getattr(eventlet_patcher.original(module), name)
    return getattr(__import__(module), name)


class Runtime:
    """The primitives the sender's background work uses, and when it may
    start: the one place that knows about eventlet, gevent and uWSGI.

    The background work runs on real OS threads, with the standard
    library's own thread, lock, sleep, poll and pipe I/O, whatever the
    application monkey-patched (see docs/openstack.txt, "Runtimes"): a
    green thread would run only when the application yields to its hub,
    so a busy or blocked hub would freeze the counts just when they
    matter, and a connmon loop that did not yield would freeze the
    application.  Our
    threads never wait on the hub and the hub never waits on them.  Their
    sockets may be green ones (connect, TLS, DNS as the application
    patched them): in a real thread those wait in that thread's own hub.
    """

    def __init__(self) -> None:
        self.start_new_thread = _unpatched("_thread", "start_new_thread")
        self.allocate_lock = _unpatched("_thread", "allocate_lock")
        self.get_native_id = _unpatched("_thread", "get_native_id")
        self.sleep = _unpatched("time", "sleep")
        self.poll = _unpatched("select", "poll")
        self.read = _unpatched("posix", "read")
        self.write = _unpatched("posix", "write")
        self.pthread_sigmask = _unpatched("signal", "pthread_sigmask")

    @staticmethod
    def may_start_threads() -> bool:
        """Not in a uWSGI master that has loaded the application and will
        fork its workers with C fork(): a thread of ours holding the GIL at
        that moment would leave the worker's GIL held for ever.  Its
        workers, mules and spoolers, which fork nothing, may.  (Without
        --master the loading process becomes worker 1 without a fork: its
        worker id changes then.)"""
        uwsgi = sys.modules.get("uwsgi")
        return (uwsgi is None or uwsgi.worker_id() != 0
                or uwsgi.mule_id() != 0 or bool(uwsgi.i_am_the_spooler()))

    def wait_readable(self, fds: List[int],
                      timeout: Optional[float]) -> List[int]:
        """The file descriptors of ``fds`` that are readable, waiting at
        most ``timeout`` seconds (None: for ever).  poll(), not select():
        in a big application our descriptors may well be numbered above
        1024."""
        poller = self.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        ready = poller.poll(None if timeout is None else timeout * 1000)
        return [fd for fd, _ in ready]

    def start_thread(self, target) -> "BackgroundThread":
        thread = BackgroundThread()
        thread.start(target, self)
        return thread


# The signals a fault raises in the very thread at fault: never blocked
# (blocked, the kernel would kill the process without a handler's word).
FAULT_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                 signal.SIGTRAP, signal.SIGSYS, signal.SIGABRT}


class BackgroundThread:
    """One of the sender's OS threads: its ids, for the benchmarks.

    It blocks every signal but FAULT_SIGNALS.  The kernel gives a signal
    sent to the process to any thread that does not block it, and ours
    must never be that thread: the stop, reload and child signals of
    uWSGI, gunicorn or oslo.service, and the application's own (SIGALRM,
    SIGUSR1...), then always reach a thread of the application's.  uWSGI
    handles them in C, on the thread they reach (its handler ending a
    worker from our thread left it to be killed 60 s later); Python runs
    its handlers on the main thread, which a signal that reached another
    thread does not wake from a blocking call.  The thread is born with
    them blocked, since a thread inherits its creator's mask: the starting
    thread blocks them for the instant of the start (blocking them itself,
    the thread would leave a window until it first held the GIL).  Under
    eventlet and gevent too: ours are real OS threads (see Runtime)."""

    def __init__(self) -> None:
        self.ident = 0       # pthread id
        self.native_id = 0   # the kernel's thread id, once it runs

    def start(self, target, runtime: Runtime) -> None:
        mask = runtime.pthread_sigmask(
            signal.SIG_BLOCK, signal.valid_signals() - FAULT_SIGNALS)
        try:
            self.ident = runtime.start_new_thread(self.run, (target, runtime))
        finally:   # (a signal that came meanwhile is delivered now, here)
            runtime.pthread_sigmask(signal.SIG_SETMASK, mask)

    def run(self, target, runtime: Runtime) -> None:
        self.native_id = runtime.get_native_id()
        target()


_runtime: Optional[Runtime] = None


def runtime() -> Runtime:
    """The Runtime, chosen when the first monitored engine is made: after
    the application's monkey-patching, whenever it imported connmon."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime()
    return _runtime


# The most items the queue holds when no thread drains it (see
# Sender.wake): then the listener's own thread folds it.  While the fold
# thread runs, it holds what comes in one FLUSH_DELAY: at the most events
# a process can make, a few megabytes.
MAX_QUEUED = 10000 * EVENT_ITEMS
# While the fold thread is at work, listeners leave it alone; but a thread
# that has not been seen at work for this long (a fork left none) is
# woken again, so a process forked without Python's at-fork hooks notices
# its new pid within this many seconds of its parent's last batch.
WAKE_AGAIN = 2 * FLUSH_DELAY


class Pipe:
    """A pipe one thread wakes another through, a byte a wake-up; with
    what it is besides its numbers (see close_if_still), so that a forked
    child, which inherits the numbers, closes them only while they are
    still this pipe."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.write_end, False)
        self.identity = descriptor_identity(self.read_end)

    def notify(self) -> None:
        try:
            runtime().write(self.write_end, b"!")
        except OSError:   # full: the reader has been woken already
            pass          # (closed: -1, no one's; see close_inherited)

    def drain(self) -> None:
        runtime().read(self.read_end, 4096)

    def close_inherited(self) -> None:
        """In a forked child: close what is still ours of the parent's
        pipe, and never use these numbers again."""
        for fd in (self.read_end, self.write_end):
            close_if_still(fd, self.identity)
        self.read_end = self.write_end = -1


class Sender:
    """Ships one process's connection state to connmond from two
    background threads, started at the first pool event (see Runtime).

    Listeners on application threads count checkouts and checkins in
    the connections' notes, put the connections out in ``out`` (and the
    most out at once in ``peak_out``), and call ``events.extend`` and
    ``wake`` only.  The fold thread folds all that into ``state``, never
    touching the network, so memory stays bounded however long a
    connect, a DNS look-up or a send to a stuck daemon blocks.  The
    network thread, while connected, sends what changed; after every
    (re)connect it first sends the whole state.
    """

    def __init__(self, addresses: List[Address], description: str,
                 security: Security, hold_warn: float = DEFAULT_HOLD_WARN):
        self.addresses = addresses
        self.description = description
        self.security = security
        self.hold_warn = hold_warn
        self.events: List[Any] = []   # see the event kinds
        self.out: Dict[int, ConnectionNote] = {}   # connection -> its note
        # pool -> when each checkout now in a measured pool's connect()
        # began (the pool's MeasuredPool.connmon_probe.pending)
        self.pending: Dict[int, List[float]] = {}
        # pool -> (capacity, endpoint), of the engines alive: what a forked
        # child announces before it has folded any event of its own
        self.announced: Dict[int, Tuple[Optional[int], Any]] = {}
        self._conn: Optional[Connection] = None   # to connmond, when up
        self._begin()

    def _begin(self) -> None:
        """(Re)initialise everything per-process: when made, and in a
        forked child.  No thread yet: see wake."""
        self.events.clear()
        self.out.clear()
        self.peak_out = 0   # the most out at once since the last send
        self.state = ProcessState(os.urandom(8).hex(),
                                  printable(socket.gethostname(), MAX_NAME),
                                  progname(), os.getpid())
        self.state.fold((POOL, pool, 0.0, limit, endpoint, None)
                        for pool, (limit, endpoint) in self.announced.items())
        self._sent = self.state.copy()
        self._sent_at = 0.0     # when _sent was sent
        self._dialing = False   # the network thread is connecting
        # When the changes held back are to be sent (see _fold_batch)
        self._due_at: Optional[float] = None
        # The lock the network thread releases once it has sent what an
        # exiting process asked it to (see flush_at_exit)
        self._flushed: Optional[Any] = None
        self._scanned = 0.0   # when long holders were last looked at
        self.lock = runtime().allocate_lock()   # state, _sent*, threads
        self.wake_until = 0.0   # listeners call wake for events after it
        self.started = False
        self.threads: List[BackgroundThread] = []
        self._start = runtime().allocate_lock()   # see _start_threads
        self._wake = Pipe()   # listeners -> fold thread
        self._news = Pipe()   # fold thread -> network thread

    def after_fork_in_child(self) -> None:
        """Forget the parent's threads, pipes and queued events, and close
        the parent's connection to connmond: a parent killed later leaves
        the counts at once, not when the heartbeat runs out.  Called once
        a process, by one thread (see this_process)."""
        conn, self._conn = self._conn, None
        if conn is not None:   # (detached, not closed: after a C fork,
            # its reader's lock may be held)
            close_if_still(conn.sock.detach(), conn.identity)
        self._wake.close_inherited()
        self._news.close_inherited()
        for began in self.pending.values():   # the parent's threads' waits
            began.clear()
        queued = self.events[CONNECT_NOTE::EVENT_ITEMS]   # (or None)
        now = time.monotonic()
        for note in [*self.state.notes.values(), *self.out.values(),
                     *queued]:
            if note.__class__ is ConnectionNote and (
                    note.connections is not None):   # (counted)
                note.inherited(now)
        self._begin()

    def wake(self, start: bool = True) -> None:
        """Tell the fold thread there are events.  Listeners call this for
        an event later than ``wake_until``: the first of a batch, since the
        fold thread moves ``wake_until`` on while it works; so one pipe
        write a busy spell.  Here, not on every event, the process notices
        a fork that ran no at-fork hooks (its pid changed), folds a queue
        no thread drains (then every event comes here), and starts the
        threads (``start``: unless the event is no use of a pool)."""
        this_process()
        if len(self.events) > MAX_QUEUED:
            self._fold_here()
        if not self.started and not (start and self._start_threads()):
            return
        self.wake_until = time.monotonic() + WAKE_AGAIN
        self._wake.notify()

    def _fold_here(self) -> None:
        """Fold the queue on the application's thread: no thread drains it
        (none may start yet, or none could) or the fold thread cannot keep
        up.  Dict work only, never a wait: when the lock is taken, one of
        our threads is at work and drains the queue soon.  Memory stays
        bounded and no event is lost."""
        if self.lock.acquire(False):
            try:
                self._drain()
            finally:
                self.lock.release()

    def _start_threads(self) -> bool:
        """Start the threads if this process may (see Runtime), once: of
        the application's threads that come here together (a threaded
        server's first requests), the one that takes ``_start`` starts
        them, the others carry on (their wake-up waits in the pipe)."""
        rt = runtime()
        if not rt.may_start_threads():
            return False
        if self._start.acquire(False):   # never released: once a process
            self.started = True
            try:
                self.threads = [rt.start_thread(self._fold),
                                rt.start_thread(self._run)]
            except Exception:  # e.g. no threads left: never fail the app
                log.exception("connmon: cannot start; process %d runs "
                              "unmonitored", os.getpid())
        return True

    # -- the threads --------------------------------------------------------

    def _fold(self) -> None:
        """Woken by the first event of a batch, fold a batch every
        FLUSH_DELAY (sooner when something is due: see _scan_due) for as
        long as events keep coming; listeners do not wake it meanwhile
        (wake_until moves on), which spares the application a pipe write
        and this thread a wake-up per batch."""
        rt = runtime()
        while True:
            try:
                woken = rt.wait_readable([self._wake.read_end],
                                         self._scan_due())
                busy = bool(woken)
                while busy:
                    due = self._scan_due()
                    rt.sleep(FLUSH_DELAY if due is None
                             else min(FLUSH_DELAY, due))
                    busy = self._fold_batch()
                    if busy:
                        self.wake_until = time.monotonic() + WAKE_AGAIN
                    else:   # a quiet spell: back to being woken, and
                        self._wake.drain()   # what came meanwhile folded
                        self.wake_until = 0.0
                        self._fold_batch()
                if not woken:   # something is due (see _scan_due)
                    self._fold_batch()
            except Exception:  # never let the thread die silently
                log.exception("connmon: error folding pool events")
                rt.sleep(RECONNECT_MAX)

    def _fold_batch(self) -> bool:
        """Fold the queued events and the notes (whether anything changed
        is returned), look at long holders when that is due,
        and tell the network thread when there is something to send: at
        once for an alarm (see ProcessState.alarm_since); what merely
        changed, once COUNTERS_DELAY has passed since the last message,
        until when it is held back (_due_at, when this thread wakes to
        send it).  Every message wakes the daemon: one a second of each
        process is what lets one daemon follow a cloud, and spares an
        application that shares the host with it."""
        with self.lock:
            changed = self._drain()
            state, now = self.state, time.monotonic()
            look_at = self._holders_look_at()
            if look_at is not None and now >= look_at:
                self._scanned = now
                state.look_at_long_holders(now, self.hold_warn)
            state.look_at_waiters(now, self.pending)
            counted = (state.checkouts or state.holds or state.waits
                       or state.connects or state.invalidations)   # since
            # the last send (the daemon ages a wait in progress by itself)
            alarm = state.alarm_since(self._sent)
            news = alarm or counted or state.differs_visibly(self._sent)
            self._due_at = None
            if news and not alarm and (
                    now < self._sent_at + COUNTERS_DELAY):
                self._due_at = self._sent_at + COUNTERS_DELAY
                news = False
        if news:
            self._news.notify()
        return changed

    def flush_at_exit(self) -> None:
        """Send, as the process exits normally, what has not been sent:
        the counts of its last moments are never lost.  The network
        thread sends it (one thread writes to the socket); the exiting
        thread waits for that at most EXIT_WAIT (twice at the most: for
        the lock, then for the send), since the daemon may not be reading.
        Not in a child of a fork that has not noticed it: the connection
        is its parent's."""
        if ((self._conn is None and not self._dialing)
                or self.state.pid != os.getpid()
                or not self.lock.acquire(True, EXIT_WAIT)):
            return
        rt = runtime()
        sent = rt.allocate_lock()
        sent.acquire()
        try:
            self._drain()
            self._flushed = sent
        finally:
            self.lock.release()
        self._news.notify()
        sent.acquire(True, EXIT_WAIT)

    def _run(self) -> None:
        rt = runtime()
        beat = Heartbeat(DEFAULT_HEARTBEAT, 0.0)
        backoff = Backoff()
        while True:
            try:
                conn = self._conn
                if conn is None and time.monotonic() >= backoff.retry_at:
                    conn = self._conn = self._connect(backoff.failures)
                    if conn is None:
                        backoff.failed(time.monotonic())
                    else:
                        beat = Heartbeat(conn.heartbeat, time.monotonic())
                now = time.monotonic()
                if conn is None:   # news can wait: a reconnect sends all
                    waiting = []
                    timeout = max(0.0, backoff.retry_at - now)
                else:
                    waiting = [self._news.read_end, conn.sock.fileno()]
                    timeout = beat.wait(now)
                readable = rt.wait_readable(waiting, timeout)
                if conn is not None and conn.sock.fileno() in readable:
                    # The daemon says nothing but pongs (or why it hangs up).
                    expect(read_message(conn.rfile), "pong")
                    beat.heard(time.monotonic())
                    backoff.reset()
                if self._news.read_end in readable:
                    self._news.drain()
                    if conn is not None:
                        self._send(conn)
                        beat.sent(time.monotonic())
                if conn is not None:
                    self._keep_alive(conn, beat)
            except (OSError, ProtocolError) as err:
                # Say it once, then quietly keep trying.
                (log.warning if backoff.failures == 0 else log.debug)(
                    "connmon: lost connmond %s: %s", self.description, err)
                self._conn = self._drop(self._conn)
                backoff.failed(time.monotonic())
            except Exception:  # never let the thread die, nor spin
                log.exception("connmon: sender error")
                self._conn = self._drop(self._conn)
                backoff.failed(time.monotonic())
                rt.sleep(RECONNECT_MAX)

    @staticmethod
    def _keep_alive(conn: Connection, beat: "Heartbeat") -> None:
        now = time.monotonic()
        if beat.lost(now):
            raise ProtocolError(f"no answer for {beat.timeout:g} s "
                                "(heartbeat)")
        if beat.ping_due(now):
            conn.send(PING)
            beat.pinged(now)

    def _connect(self, failures: int) -> Optional[Connection]:
        state = self.state
        state.session += 1
        self._dialing = True   # (an exiting process waits for its state)
        try:
            conn = open_connection(
                _jitter.sample(self.addresses, len(self.addresses)), "app",
                security=self.security, proc=state.describe())
            conn.sock.settimeout(SEND_TIMEOUT)
            if self._sent_at:   # a reconnect: what happened while away is
                with self.lock:   # past (before the first, it is news)
                    state.reset_counters()
            self._send(conn, full=True)
        except (OSError, ProtocolError) as err:
            # Say it once, then quietly keep trying.
            (log.warning if failures == 0 else log.debug)(
                "connmon: cannot reach connmond %s: %s", self.description, err)
            return None
        finally:
            self._dialing = False
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

    def _send(self, conn: Connection, full: bool = False) -> None:
        with self.lock:
            state = self.state
            state.name_sites()
            message = state.message(time.monotonic(), None if full else
                                    self._sent)
            self._sent = state.copy()
            self._sent_at = time.monotonic()
            state.reset_counters()
            self.peak_out = len(self.out)   # (a checkout in between may
            # be missed from the next peak: the peaks are a gauge)
            flushed, self._flushed = self._flushed, None
        conn.send(message)
        if flushed is not None:   # an exiting process waits for this one
            flushed.release()

    def _holders_look_at(self) -> Optional[float]:
        """When the fold thread next looks at long holders; None without
        a holder to look at."""
        if not self.state.holders:
            return None
        return self._scanned + min(5.0, self.hold_warn / 2)

    def _scan_due(self) -> Optional[float]:
        """Seconds until the fold thread next has something to do: send the
        changes held back, look at long holders, or count the checkouts
        waiting (every WAITERS_LOOK while any wait); None while none is
        needed (nothing to do)."""
        now = time.monotonic()
        moments = [at for at in (self._due_at, self._holders_look_at())
                   if at is not None]
        if self.state.waiting or any(self.pending.values()):
            moments.append(now + WAITERS_LOOK)
        return max(0.0, min(moments) - now) if moments else None

    def _drain(self) -> bool:
        """Fold the queued events and the notes into our state; whether
        anything changed.  Listeners only ever add at the end, so the
        events queued now can be copied, then deleted, while they go on
        adding; C code groups the items EVENT_ITEMS by EVENT_ITEMS.  The
        connections out are copied first: each one's CONNECT is queued
        before it is put there."""
        out = self.out.copy()
        queued = len(self.events)
        batch = self.events[:queued]
        del self.events[:queued]
        items = iter(batch)
        return self.state.fold(zip(*[items] * EVENT_ITEMS), out,
                               self.peak_out)


_senders: Dict[tuple, Sender] = {}
_pid = os.getpid()   # whose senders these are: see this_process

# A process's own lock, for its senders and for starting afresh after a
# fork: one a pid, found in a dict whose setdefault() is atomic (whichever
# thread comes first puts its lock there, and every thread gets that one).
# One a pid because a child of C fork() inherits every lock as it was at
# the fork: one that another thread of the parent held then stays held in
# the child for ever.
_process_locks: Dict[int, Any] = {}


def _process_lock(pid: int):
    lock = _process_locks.get(pid)
    if lock is None:
        lock = _process_locks.setdefault(pid, runtime().allocate_lock())
    return lock


def get_sender(target: "Target") -> Sender:
    """The process's sender for these daemons and settings, made on first
    use."""
    this_process()
    key = (tuple(sorted(target.addresses)), target.security.key)
    with _process_lock(_pid):
        sender = _senders.get(key)
        if sender is None:
            sender = _senders[key] = Sender(
                target.addresses, target.description, target.security,
                target.hold_warn)
        return sender


def this_process() -> None:
    """Start afresh in a forked child, once: the first of the child's
    threads to come here resets every sender while any other that comes
    meanwhile waits for it (a few closes and two new pipes; never the
    network), and only then is the new pid noted, which lets every thread
    through.  Python's at-fork hook calls it in a child of os.fork(); in
    a child of C fork() (uWSGI), which runs no hook, the listeners do
    (see Sender.wake), and a threaded server's first requests come on
    several threads at once."""
    global _pid
    pid = os.getpid()
    if _pid == pid:
        return
    with _process_lock(pid):
        if _pid == pid:   # another thread has done it meanwhile
            return
        try:
            for parents in [p for p in _process_locks if p != pid]:
                del _process_locks[parents]   # bounded, and never used here
            _jitter.seed()
            for sender in _senders.values():
                sender.after_fork_in_child()
        except Exception:  # e.g. no descriptors left: never fail the app
            log.exception("connmon: cannot start afresh in process %d; it "
                          "may run unmonitored", pid)
        finally:
            _pid = pid


os.register_at_fork(after_in_child=this_process)


def _flush_at_exit() -> None:
    """The process exits normally: each sender sends what is pending (see
    Sender.flush_at_exit), never an error at the application's exit."""
    for sender in list(_senders.values()):
        try:
            sender.flush_at_exit()
        except Exception:
            log.debug("connmon: cannot send at exit", exc_info=True)


atexit.register(_flush_at_exit)


# ---------------------------------------------------------------------------
# 6. SQLAlchemy glue
# ---------------------------------------------------------------------------

URL_PARAMETERS = ("connmon_service", "connmon_addr", "connmon_config",
                  "connmon_secret_file", "connmon_sites", "connmon_endpoint")
# The switches: URL parameter -> (the service's option, what 1 does)
SWITCHES = {"connmon_sites": ("checkout_sites", "note checkout sites"),
            "connmon_endpoint": ("report_endpoints",
                                 "report the database's host, port, name "
                                 "and user")}
# The attribute of a pool entry (ConnectionPoolEntry) that holds connmon's
# ConnectionNote of its connection: the entry's .info is the application's.
NOTE = "_connmon"

_connection_ids = itertools.count(1)
_pool_ids = itertools.count(1)
_instrumented: "weakref.WeakSet" = weakref.WeakSet()   # pools
# pool object -> the ids of its open connections (see pool_connections)
_pool_connections: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def without_settings(url):
    """``url`` without its ``connmon_*`` parameters: ``url`` itself when it
    has none, so that a stand-in for a URL (anything with a ``query``
    mapping) passes through untouched."""
    if any(key in url.query for key in URL_PARAMETERS):
        return url.difference_update_query(URL_PARAMETERS)
    return url


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
        if key in SWITCHES and value not in ("0", "1"):
            raise ConfigError(f"URL parameter {key}={value!r}: say 1 "
                              f"({SWITCHES[key][1]}, the default) or 0")
        settings[key] = value
    return settings


class Target(NamedTuple):
    """Where an engine's process reports, and how."""
    addresses: List[Address]
    description: str            # for log lines
    security: Security
    hold_warn: float            # hold_warn_seconds
    sites: bool                 # note checkout sites
    endpoints: bool             # report each pool's database


def resolve_target(settings: Dict[str, str]) -> Target:
    """The Target for URL settings (the service's config fills in what the
    URL does not say).

    Reads the config, secret and TLS files but does no DNS: names are
    resolved by the sender.
    """
    secret_file = settings.get("connmon_secret_file")
    if "connmon_addr" in settings:
        address = parse_address(settings["connmon_addr"])
        security = Security(read_secret(secret_file) if secret_file
                            else None)
        return Target([address], format_address(address), security,
                      DEFAULT_HOLD_WARN,
                      *(settings.get(key, "1") == "1" for key in SWITCHES))
    service = find_service(settings.get("connmon_service", DEFAULT_SERVICE),
                           settings.get("connmon_config"))
    security = Security.of_service(service, secret_file)
    security.client_context()   # a bad TLS file fails here, at start-up
    switches = [settings[key] == "1" if key in settings
                else option_value(service, option)
                for key, (option, _) in SWITCHES.items()]
    return Target([node.address for node in service.nodes],
                  f"service {service.name!r}", security,
                  option_value(service, "hold_warn_seconds"), *switches)


def _pool_limit(pool) -> Optional[int]:
    """QueuePool capacity: pool_size + max_overflow; None when unlimited.

    QueuePool keeps max_overflow only as ``_max_overflow``; reading it is the
    one way to know the limit (nothing is changed).
    """
    max_overflow = getattr(pool, "_max_overflow", None)
    if max_overflow is None or max_overflow < 0 or not hasattr(pool, "size"):
        return None
    return pool.size() + max_overflow


def pool_connections(pool, sender: Sender) -> Set[int]:
    """The ids of the open connections in ``pool`` (an engine's pool object:
    a new one after each engine.dispose()).

    A pool that is dropped closes its connections without a close event:
    engine.dispose() drops the old pool, whose connections checked out then
    go back to it when returned and stay open, like the idle ones of
    dispose(close=False), until the garbage collector takes that pool.
    So what remains of its connections is closed then."""
    connections = _pool_connections.get(pool)
    if connections is None:
        connections = _pool_connections[pool] = set()
        weakref.finalize(pool, _pool_gone, sender, connections)
    return connections


def _pool_gone(sender: Sender, connections: Set[int]) -> None:
    """A pool was collected (weakref.finalize): its connections are closed."""
    now = time.monotonic()
    for ident in list(connections):
        sender.out.pop(ident, None)
        sender.events.extend((CLOSE, ident, now, None, None, None))
    sender.wake(start=False)


def _engine_gone(sender: Sender, pool_id: int) -> None:
    """An instrumented engine was collected (weakref.finalize)."""
    sender.announced.pop(pool_id, None)
    sender.pending.pop(pool_id, None)
    for ident, note in list(sender.out.items()):
        if note.pool == pool_id:
            sender.out.pop(ident, None)
    sender.events.extend((ENGINE_GONE, pool_id, time.monotonic(), None, None,
                          None))
    sender.wake(start=False)


def counted_note(entry) -> Optional[ConnectionNote]:
    """The note of a pool entry's connection once counted; None before,
    and for a connection connmon did not see open."""
    note = getattr(entry, NOTE, None)
    if note.__class__ is ConnectionNote and note.connections is not None:
        return note
    return None


class PoolProbe:
    """What one monitored engine's pool reports through: its sender (its
    queue and the connections out), its pool id, whether checkout sites
    are noted (and how to refer to a checkout's holder: see
    holder_finder), and when each checkout now in its connect() began."""

    __slots__ = ("record", "sender", "out", "pool_id", "sites", "holder",
                 "first_holder", "pending")

    def __init__(self, sender: Sender, pool_id: int, sites: bool,
                 holder_refs: Tuple[Any, Any]):
        self.record = sender.events.extend
        self.sender = sender
        self.out = sender.out
        self.pool_id = pool_id
        self.sites = sites
        self.holder, self.first_holder = holder_refs
        self.pending: List[float] = sender.pending.setdefault(pool_id, [])

    def checked_out(self, entry, began: Optional[float]) -> None:
        """Count a checkout of a pool entry in its connection's note
        (``began``: when the application asked, None when not known), with
        its site and frame mark, and put it among the connections out.
        Runs on the application's thread, for every checkout: the frame
        at the depth the last site was found is looked at first, and its
        mark, once it has checked out at this place, remembers the site
        (see site_and_mark)."""
        note = getattr(entry, NOTE, None)   # (see counted(), inlined)
        if note.__class__ is not ConnectionNote or note.opened is not None:
            note = self.counted(entry)
            if note is None:
                return
        if self.sites:
            try:
                frame = _getframe(_site_depth)
                mark = frame.f_trace
                if type(mark) is FrameMark and mark.lasti == frame.f_lasti:
                    note.site = mark.site   # (this run of the frame's last)
                else:
                    note.site, mark = site_and_mark(frame, self.find_holder)
            except ValueError:   # a shallower stack
                note.site, mark = site_and_mark(None, self.find_holder)
            note.mark = mark
        now = note.out_at = _clock()
        if began is not None:   # (its sums before its count: see the note)
            waited = now - began
            note.waited += waited
            if waited > note.wait_max:
                note.wait_max = waited
            if waited >= WAITING_AFTER:
                self.record((WAITED, None, now, self.pool_id, None, began))
        note.checkouts += 1
        out = self.out
        out[note.ident] = note
        sender = self.sender
        if len(out) > sender.peak_out:
            sender.peak_out = len(out)
        if now > sender.wake_until:
            sender.wake()

    def counted(self, entry) -> Optional[ConnectionNote]:
        """The note of a pool entry's connection, at its checkout or
        checkin: counted, the first time, as opened (see on_connect); None
        for one connmon did not see open (or a stand-in for a pool entry).
        The checkout and the checkin inline the common case, a connection
        already counted: a call costs them a measurable share."""
        note = getattr(entry, NOTE, None)
        if note.__class__ is not ConnectionNote:
            return None
        if note.opened is not None:
            when, began, pool = note.opened
            note.opened = None
            if note.connections is None:   # (not a forked child's own)
                note.connections = pool_connections(pool, self.sender)
                note.connections.add(note.ident)
            self.record((CONNECT, note.ident, when, self.pool_id, note,
                         began))
        return note

    def find_holder(self) -> weakref.ref:
        """A weak reference to the holder running now (see frame_mark)."""
        return self.holder() or self.first_holder()

    def gave_up(self, error: BaseException, began: float) -> None:
        """A checkout that raised: a timeout, or a connection that could
        not be opened (a task cancelled while it waited is neither)."""
        if isinstance(error, Exception):
            from sqlalchemy.exc import TimeoutError
            kind = TIMED_OUT if isinstance(error, TimeoutError) else FAILED
            now = _clock()
            self.record((kind, None, now, self.pool_id, None, began))
            if now > self.sender.wake_until:
                self.sender.wake()


_clock = time.monotonic
_getframe = sys._getframe
_function = types.FunctionType


class MeasuredPool:
    """Mixed into the pool class an engine would have used, to see what no
    pool event shows: the checkouts waiting for a connection, how long they
    wait, and those that give up.  SQLAlchemy has no "before checkout"
    event, so the class overrides the public ``Pool.connect()``; which
    also queues the checkout itself, and so spares the pool a checkout
    listener.  It calls the pool class's connect() as super() finds it at
    that moment: a patch of ``QueuePool.connect`` or ``Pool.connect``
    (a test's mock, an APM agent's wrapper) is called, and undoing it
    takes effect.

    ``connmon_probe`` is set by instrument(); until then, and for an engine
    connmon does not monitor, connect() is the pool's own.

    It comes after the pool class among the bases (so that a pool made by
    the application can take its measured twin's class: see
    measure_given_pool), so its methods are put in the twin's own
    namespace, and reach the pool class's as super(type(self), self).
    """

    connmon_probe: Optional[PoolProbe] = None
    connmon_pool_class: type   # the class measured (measured_pool_class)

    def connect(self):
        probe = self.connmon_probe
        if probe is None:
            return super(type(self), self).connect()
        pending = probe.pending
        began = _clock()
        pending.append(began)
        if began > probe.sender.wake_until:   # to count it while it waits
            probe.sender.wake()
        try:
            # What super() finds, without its cost (0.3 us a checkout on
            # Python 3.11) when that is a plain function; anything else (a
            # mock, a wrapper object) is bound by super() as it would be.
            pool_connect = self.connmon_pool_class.connect
            fairy = (pool_connect(self)
                     if pool_connect.__class__ is _function
                     else super(type(self), self).connect())
        except BaseException as error:
            _unpend(pending, began)
            probe.gave_up(error, began)
            raise
        _unpend(pending, began)
        # The proxied connection names its pool entry only privately (its
        # public .info is the application's dictionary); a stand-in
        # without it (a mock's) is a checkout connmon did not see open.
        probe.checked_out(getattr(fairy, "_connection_record", None), began)
        return fairy

    def recreate(self):
        """engine.dispose() replaces the pool: the new one reports alike."""
        pool = super(type(self), self).recreate()
        pool.connmon_probe = self.connmon_probe
        return pool


def _unpend(pending: List[float], began: float) -> None:
    """A checkout's wait is over.  It may be gone already: a child of a
    fork without at-fork hooks notices the fork at its first event (see
    Sender.wake), which may come inside this very connect(), and forgets
    the waits it inherited; never an error for the application."""
    try:
        pending.remove(began)
    except ValueError:
        pass


_measured_classes: Dict[type, type] = {}


def measured_pool_class(pool_class: type) -> type:
    """``pool_class`` with MeasuredPool mixed in (made once per class).
    The pool class comes first among the bases, so that a pool made by
    the application (see measure_given_pool) can take the measured class
    in place (``__class__`` assignment needs the same base layout); the
    measured methods are the class's own."""
    if issubclass(pool_class, MeasuredPool):
        return pool_class
    measured = _measured_classes.get(pool_class)
    if measured is None:
        measured = _measured_classes[pool_class] = type(
            pool_class.__name__, (pool_class, MeasuredPool),
            {"connmon_pool_class": pool_class,
             "connect": MeasuredPool.connect,
             "recreate": MeasuredPool.recreate,
             "__doc__": f"{pool_class.__name__}, measured by connmon.",
             # SQLAlchemy names the pool's logger after the class's module:
             # the application's logging settings must still apply
             "__module__": pool_class.__module__})
    return measured


def choose_pool_class(url, kwargs: Dict[str, Any]) -> None:
    """Make create_engine() use a measured pool: the app's poolclass=,
    else the one the URL's dialect would choose.  An app's own pool= is
    left alone (instrument() says what that leaves unmeasured)."""
    if "pool" in kwargs:
        return
    pool_class = kwargs.get("poolclass")
    if pool_class is None:
        dialect_class = url.get_dialect(kwargs.get("_is_async", False))
        pool_class = dialect_class.get_pool_class(url)
    kwargs["poolclass"] = measured_pool_class(pool_class)


DEFAULT_PORTS = {"mysql": 3306, "mariadb": 3306, "postgresql": 5432,
                 "mssql": 1433, "oracle": 1521}


def endpoint_of(url) -> Tuple[Any, ...]:
    """The database an engine talks to, as the event POOL carries it:
    backend, host, port, database name and user; never the password, the
    query string or the URL itself.  Each text as the daemon accepts it
    (see is_text: escaped, at most MAX_NAME characters; None rather than
    empty)."""
    backend = url.get_backend_name()
    port = url.port or (DEFAULT_PORTS.get(backend) if url.host else None)
    texts = [printable(text, MAX_NAME) if text else None
             for text in (backend, url.host, url.database, url.username)]
    return (texts[0] or "?", texts[1], port, texts[2], texts[3])


def instrument(engine, settings: Dict[str, str]) -> None:
    """Listen to the engine's pool events, and measure its pool's checkouts
    (see MeasuredPool); called once create_engine() has made the engine.
    Configuration errors raise here, at start-up."""
    from sqlalchemy import event

    if engine.pool in _instrumented:   # (engines may share one pool=)
        return
    target = resolve_target(settings)
    _instrumented.add(engine.pool)
    try:
        sender = get_sender(target)
    except Exception:  # e.g. no threads left: run unmonitored, never fail
        log.exception("connmon: cannot start; %s runs unmonitored", engine)
        return
    # The listeners run on the application's threads: each only counts in
    # a note or queues an event and, for an event later than wake_until
    # (the first of a batch), wakes the sender (the test is inlined
    # because a function call here is a measurable share of a checkout).
    record = sender.events.extend
    out = sender.out
    clock = time.monotonic
    pool_id = next(_pool_ids)
    measured = isinstance(engine.pool, MeasuredPool)
    probe = PoolProbe(sender, pool_id, target.sites,
                      holder_finder(engine.dialect.is_async))

    def on_connect(dbapi_connection, connection_record):
        # Counted at its first checkout or checkin (see PoolProbe.counted):
        # a connect listener of the application's, called after this one,
        # may still fail, and SQLAlchemy then closes the connection without
        # a close event.  (A reconnect of an invalidated entry replaces the
        # note of its previous connection.)
        now = clock()
        setattr(connection_record, NOTE, ConnectionNote(
            next(_connection_ids), pool_id, measured,
            (now, connect_began(connection_record, now), engine.pool)))

    def on_checkout(dbapi_connection, connection_record, connection_proxy):
        probe.checked_out(connection_record, None)

    def on_checkin(dbapi_connection, connection_record):
        note = getattr(connection_record, NOTE, None)   # (probe.counted)
        if note.__class__ is not ConnectionNote or note.opened is not None:
            note = probe.counted(connection_record)
            if note is None:
                return
        now = clock()
        if out.pop(note.ident, None) is not None:   # (a child's inherited
            note.held += now - note.out_at          # checkout is not)
            note.holds += 1   # (after its sum: see ConnectionNote)
        if now > sender.wake_until:
            sender.wake()

    def closed(ident: int) -> None:
        out.pop(ident, None)   # (closed while out: no hold)
        now = clock()
        record((CLOSE, ident, now, None, None, None))
        if now > sender.wake_until:
            sender.wake()

    def on_close(dbapi_connection, connection_record):
        note = counted_note(connection_record)
        if note is not None:
            closed(note.forget())

    def on_invalidate(dbapi_connection, connection_record, exception):
        note = counted_note(connection_record)
        now = clock()
        record((INVALIDATED, note.ident if note else None, now, pool_id,
                None, None))
        if now > sender.wake_until:
            sender.wake()

    # A detached connection leaves its pool entry (which gets a fresh
    # connection and info) but stays open until close_detached; or until
    # the garbage collector takes it, when the application drops it
    # unclosed, which no event says (a finalizer does).
    detached: Dict[int, int] = {}

    def on_detach(dbapi_connection, connection_record):
        note = counted_note(connection_record)
        if note is not None:
            ident = note.forget()   # no longer the pool's
            detached[id(dbapi_connection)] = ident
            try:
                weakref.finalize(dbapi_connection, detached_closed,
                                 id(dbapi_connection))
            except TypeError:   # a driver's connection with no weakref
                pass

    def detached_closed(key: int) -> None:
        ident = detached.pop(key, None)
        if ident is not None:
            closed(ident)

    def on_close_detached(dbapi_connection):
        detached_closed(id(dbapi_connection))

    # Pool events only.  A hard invalidation fires "close" too, the others
    # close the connection (firing "close") at its next checkout.
    # engine.dispose() closes idle connections with "close" events; see
    # pool_connections for the others.  (The engine_disposed event would
    # not say when those close, and the dialect's do_connect would say
    # when a connect begins; but any Engine- or Dialect-level listener
    # puts SQLAlchemy's event dispatch on every statement of every
    # connection: do_connect measured 5,900 CPU instructions a statement,
    # a fifth of connmon's whole cost for a request of one statement.)
    listeners: List[Tuple[str, Callable[..., Any]]] = [
        ("connect", on_connect), ("checkin", on_checkin),
        ("close", on_close), ("invalidate", on_invalidate),
        ("soft_invalidate", on_invalidate), ("detach", on_detach),
        ("close_detached", on_close_detached)]
    if isinstance(engine.pool, MeasuredPool):
        engine.pool.connmon_probe = probe   # it queues the checkouts
    else:
        listeners.append(("checkout", on_checkout))
        log.warning("connmon: %s: its pool (%s) is the application's own "
                    "(pool= or poolclass= given to create_engine()): "
                    "checkouts waiting, their wait times, timeouts and "
                    "connect errors of this engine are not measured (with "
                    "poolclass=, ?plugin=connmon measures them)",
                    _safe_name(engine), type(engine.pool).__name__)
    for name, listener in listeners:
        event.listen(engine, name, listener)
    announced = sender.announced[pool_id] = (
        _pool_limit(engine.pool),
        endpoint_of(engine.url) if target.endpoints else None)
    record((POOL, pool_id, clock(), *announced, None))
    weakref.finalize(engine, _engine_gone, sender, pool_id)
    sender.wake(start=False)   # threads start at the first use of a pool


def connect_began(connection_record, now: float) -> Optional[float]:
    """When the opening of the connection that the pool's connect event
    reports began, on the monotonic clock that ``now`` reads: the pool
    entry's ``last_connect_time`` is the wall time the pool noted just
    before it called the driver's connect (None when the entry has none)."""
    started = getattr(connection_record, "last_connect_time", None)
    if not started:
        return None
    return now - max(0.0, time.time() - started)


def _safe_name(engine) -> str:
    """The engine for a log line: its URL without password or query."""
    url = engine.url
    return url.set(query={}).render_as_string(hide_password=True)


def _dialect_subclass(real_cls):
    """The real dialect, but never passing ``connmon_*`` to the driver (its
    create_connect_args() takes, and passes on, whatever the real one's
    does), and choosing a measured pool (see MeasuredPool).

    It says it comes from the real dialect's module and has its name, as
    code keyed on those (SQLAlchemy's testing provisioning, for one)
    expects of the dialect it is given."""
    subclass = _dialect_subclasses.get(real_cls)
    if subclass is None:
        def create_connect_args(self, url, *args, **kwargs):
            return super(subclass, self).create_connect_args(
                without_settings(url), *args, **kwargs)

        def get_pool_class(cls, url):
            return measured_pool_class(super(subclass, cls).get_pool_class(
                url))

        subclass = type(real_cls.__name__ + "_connmon", (real_cls,), {
            "create_connect_args": create_connect_args,
            "get_pool_class": classmethod(get_pool_class),
            "supports_statement_cache": True,
            "__module__": real_cls.__module__,
            "name": real_cls.name,
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

    def get_dialect_cls(self, url, _is_async: bool = False):
        resolve_target(url_settings(url.query))   # fail fast on bad settings
        real_url = url.set(drivername=self.real_drivername)
        return _dialect_subclass(real_url.get_dialect(_is_async))

    def get_async_dialect_cls(self, url):
        """create_async_engine() with a driver that has an asyncio
        dialect too (postgresql+psycopg_connmon)."""
        return self.get_dialect_cls(url, _is_async=True)

    def engine_created(self, engine) -> None:
        """Instrument the engine, and leave it the URL without connmon's
        parameters, as ``?plugin=connmon`` does: code that reuses
        ``engine.url`` with another driver, or logs or copies it, never
        sees them.  (A URL hook, CreateEnginePlugin.update_url, exists for
        plugins only: create_engine() has handed the dialect and the
        engine this URL by now, and ``Engine.url`` is the public,
        assignable attribute that AsyncEngine.url proxies, setter
        included.)"""
        settings = url_settings(engine.url.query)
        engine.url = without_settings(engine.url)
        measure_given_pool(engine)
        instrument(engine, settings)


def measure_given_pool(engine) -> None:
    """A dialect name sees no create_engine() arguments, so it cannot choose
    the pool class as ?plugin=connmon does: an engine given poolclass= (or
    pool=) gets a pool of the application's class.  Here, before its first
    connection, that pool becomes its class's measured twin (a subclass
    adding only the measuring connect(); see measured_pool_class), so that
    waits and timeouts are measured with either URL form."""
    pool = engine.pool
    if isinstance(pool, MeasuredPool) or pool in _instrumented:
        return
    try:
        pool.__class__ = measured_pool_class(type(pool))
    except TypeError:   # a class that cannot take it: instrument() says so
        pass


# Entry points of setup.py point at these names.
mysql_pymysql = ConnmonDialect("mysql+pymysql")
mysql_mysqldb = ConnmonDialect("mysql+mysqldb")
mysql_default = ConnmonDialect("mysql")
mariadb_pymysql = ConnmonDialect("mariadb+pymysql")
mariadb_mysqldb = ConnmonDialect("mariadb+mysqldb")
postgresql_psycopg2 = ConnmonDialect("postgresql+psycopg2")
postgresql_psycopg = ConnmonDialect("postgresql+psycopg")
postgresql_default = ConnmonDialect("postgresql")
sqlite_pysqlite = ConnmonDialect("sqlite+pysqlite")
sqlite_default = ConnmonDialect("sqlite")

DIALECT_ENTRY_POINTS = {
    "mysql.pymysql_connmon": "mysql_pymysql",
    "mysql.mysqldb_connmon": "mysql_mysqldb",
    "mysql.connmon": "mysql_default",
    "mariadb.pymysql_connmon": "mariadb_pymysql",
    "mariadb.mysqldb_connmon": "mariadb_mysqldb",
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
            try:
                choose_pool_class(url, kwargs)
            except Exception as err:   # measure less, never fail the app
                log.warning("connmon: cannot choose a measured pool class "
                            "(%s: %s); checkouts waiting, wait times and "
                            "timeouts are not measured", type(err).__name__,
                            err)

        def update_url(self, url):
            if url.drivername.endswith("connmon"):
                # A <driver>_connmon dialect too: it reads the parameters
                # (after this), keeps them from the driver and removes
                # them from engine.url itself.
                return url
            return without_settings(url)

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


# ---------------------------------------------------------------------------
# 7. Vendoring: registering the entry points without pip
# ---------------------------------------------------------------------------
#
# SQLAlchemy finds "<driver>_connmon" and "plugin=connmon" through entry
# points, which importlib.metadata reads from *.dist-info directories on
# sys.path.  On a host where pip is not allowed, copy this file next to the
# application and run
#
#     python connmon.py --install-entry-points [--target DIR]
#
# to write the few lines pip would have written.

INSTALLER = "connmon.py --install-entry-points"


def install_entry_points(target: str) -> str:
    """Write ``connmon-VERSION.dist-info`` into ``target``; return its path.

    Older ones written by this command are removed, so that an upgraded
    connmon.py never leaves two registrations behind.
    """
    for name in os.listdir(target):
        old = os.path.join(target, name)
        if (name.startswith("connmon-") and name.endswith(".dist-info")
                and _read(os.path.join(old, "INSTALLER")) == INSTALLER):
            for leftover in os.listdir(old):
                os.remove(os.path.join(old, leftover))
            os.rmdir(old)
    dist_info = os.path.join(target, f"connmon-{__version__}.dist-info")
    if os.path.exists(dist_info):
        raise OSError(f"{dist_info} exists and was not written by this "
                      "command (installed by pip?); leaving it alone")
    os.makedirs(dist_info)
    dialects = "".join(f"{name} = connmon:{attr}\n"
                       for name, attr in DIALECT_ENTRY_POINTS.items())
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: connmon\n"
                    f"Version: {__version__}\n",
        "entry_points.txt": f"[sqlalchemy.dialects]\n{dialects}\n"
                            "[sqlalchemy.plugins]\n"
                            "connmon = connmon:ConnmonPlugin\n",
        "INSTALLER": INSTALLER,
    }
    for name, text in files.items():
        with open(os.path.join(dist_info, name), "w",
                  encoding="utf-8") as file:
            file.write(text)
    return dist_info


def _read(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError:
        return None


def main(argv: Optional[List[str]] = None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        prog="python connmon.py", description="connmon's application side. "
        "Without pip: register its SQLAlchemy entry points.")
    parser.add_argument("--install-entry-points", action="store_true",
                        required=True, help="write connmon-VERSION.dist-info"
                        " so that SQLAlchemy finds the <driver>_connmon "
                        "dialects and plugin=connmon")
    parser.add_argument("--target", default=os.path.dirname(
        os.path.abspath(__file__)), help="where to write it: a directory "
        "on the application's sys.path, next to connmon.py (default: "
        "%(default)s)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.target, "connmon.py")):
        log.warning("no connmon.py in %s: the entry points will not load "
                    "unless connmon is importable some other way",
                    args.target)
    try:
        print(install_entry_points(args.target))
    except OSError as err:
        print(f"connmon: error: cannot write to {args.target}: {err}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="connmon: %(message)s")
    sys.exit(main())
