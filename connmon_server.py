"""connmond: the daemon that application processes report to.

One ``socketserver.ThreadingTCPServer`` and one ``Picture`` (section 1)
behind one lock.  An application's connection carries its pool state; when
it closes, the process leaves the current counts at once (its host+program
row stays, with its maxima).  A console's connection asks for snapshots.

One departure from a handler thread per connection: one ``Reader`` thread
greets every new connection (TLS handshake, welcome, hello) and serves
every app's for good, waiting for all of them at once and applying their
messages in batches; a console or a peer, once admitted, gets a
``ConnmonHandler`` thread of its own.  A thread per connection cost a
thread's start and the interpreter handed to it at each step of a hello,
then a wake-up for each message: at about a message a second from each of
thousands of processes ~100 us a message, and after a restart the
reconnecting cloud's hellos queued behind each other for longer than the
plugin waits for its welcome (see docs/performance.txt).

Every client passes the ``Door``, the one place where roles are checked:
what it may do is its ``Role`` in ``ROLES``; texts are checked where they
enter (``connmon.is_text``), and what one client can make the daemon hold
is bounded (see docs/security.txt).

With several nodes in the service, every node links to every other node
(full mesh, one link a pair, dialled by the node whose name sorts first)
and forwards what its own applications say, their updates in batches
(encoded once for every link); each node holds the whole cluster's
picture.  See ``Cluster``.

Optional exports, each on its own daemon thread and each reading only
``ConnmonServer.snapshot()``: Prometheus text on ``GET /metrics`` and a CSV
file appended to every ``csv_interval`` seconds.  A thread of its own
samples every row into a ten-minute ``History`` once a second (consoles
ask for a row's with ``{"op": "history"}``) and forgets rows gone for
longer than ``forget_gone_after``.

Every option a service section may carry is in ``OPTIONS`` (the
applications' ``connmon.SERVICE_OPTIONS`` and connmond's own), checked
at start and by ``--check-config``.

Read top to bottom: 1. the picture (``Picture``: per host+program rows,
their meters, the databases), 2. the door and the server (``Door``,
``ConnmonServer``, the lock that guards the picture, the handler per
connection, the apps' reader), 3. the cluster, 4. daemon options,
5. Prometheus, 6. CSV, 7. the command line.

Run ``connmond`` or ``python -m connmon_server``.
"""

from __future__ import annotations

import argparse
import array
import collections
import configparser
import csv
import errno
import heapq
import hmac
import http.server
import ipaddress
import io
import json
import logging
import logging.config
import operator
import os
import random
import secrets
import selectors
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator,
                    List, NamedTuple, Optional, Tuple)

import connmon
from connmon import (MAX_NAME, ProcessState, ProtocolError,
                     is_count, is_text, oldest_holders, read_message,
                     server_name)

log = logging.getLogger("connmond")


# ---------------------------------------------------------------------------
# 1. The picture: every process, grouped by host and program
# ---------------------------------------------------------------------------

# How many host+program rows of programs that are gone the picture
# remembers: memory stays bounded whatever clients send.
MAX_ROWS = 10000

# What the picture reckons an attached process costs connmond, in bytes:
# its connection, thread and buffers, and its state, each entry as
# tracemalloc measured it with every text at its longest in four-byte
# characters.  A process at every cap reckons about 6 MiB.
COST_PROCESS = 16 << 10
COST_CONNECTION = 48
COST_CHECKOUT = 96
COST_POOL = 3 << 10       # with its database's names
COST_TEXT = 1100          # a checkout site's name or a held-at place


def state_cost(proc: ProcessState) -> int:
    """What ``proc`` costs, reckoned from how many of each it holds (a few
    len()s: cheap enough for every update)."""
    return (COST_PROCESS + COST_CONNECTION * len(proc.conns)
            + COST_CHECKOUT * len(proc.checked_out)
            + COST_POOL * len(proc.pools)
            + COST_TEXT * (len(proc.site_names) + len(proc.held_at)))


class Meter:
    """What the meters share: slots, since a picture has one of each
    meter a row, and a row a host+program."""

    __slots__: Tuple[str, ...] = ()


class RateMeter(Meter):
    """Events per second over the last complete second, and their total
    since the daemon started."""

    __slots__ = ("second", "count", "last", "total")

    def __init__(self) -> None:
        self.second = 0
        self.count = 0
        self.last = 0
        self.total = 0

    def add(self, when: float, count: int = 1) -> None:
        second = int(when)
        if second > self.second:
            self.last = self.count if second == self.second + 1 else 0
            self.second, self.count = second, 0
        self.count += count
        self.total += count

    def rate(self, now: float) -> int:
        second = int(now)
        if second == self.second:
            return self.last
        return self.count if second == self.second + 1 else 0


class DurationMeter(Meter):
    """Durations (checkout holds, waits, connects): their mean and their
    longest over the last complete second (RateMeter's window), so they
    read like ckout/s, and their sum and count since the daemon started
    (a Prometheus summary)."""

    __slots__ = ("second", "current", "last", "seconds_total", "total")

    def __init__(self) -> None:
        self.second = 0
        self.current = self.last = (0.0, 0, 0.0)   # seconds, count, longest
        self.seconds_total, self.total = 0.0, 0

    def add(self, when: float, seconds: float, count: int,
            longest: float = 0.0) -> None:
        second = int(when)
        if second > self.second:
            self.last = (self.current if second == self.second + 1
                         else (0.0, 0, 0.0))
            self.second, self.current = second, (0.0, 0, 0.0)
        total, number, most = self.current
        self.current = (total + seconds, number + count, max(most, longest))
        self.seconds_total += seconds
        self.total += count

    def _window(self, now: float) -> Tuple[float, int, float]:
        second = int(now)
        if second == self.second:
            return self.last
        if second == self.second + 1:
            return self.current
        return 0.0, 0, 0.0

    def mean_ms(self, now: float) -> Optional[float]:
        """Milliseconds; None when there were none in the window."""
        total, count, _ = self._window(now)
        return round(total / count * 1000, 1) if count else None

    def max_ms(self, now: float) -> Optional[float]:
        _, count, longest = self._window(now)
        return round(longest * 1000, 1) if count else None


class ProgramRow:
    """The live totals and the maxima of one host+program."""

    def __init__(self, hostname: str, progname: str):
        self.hostname = hostname
        self.progname = progname
        self.nproc = self.conn = self.ckout = self.waiting = 0
        self.maxnproc = self.maxconn = self.maxckout = self.maxwaiting = 0
        self.checkouts = RateMeter()
        self.holds = DurationMeter()
        # Pool pressure: checkouts that waited, gave up or failed; the
        # connections opened and invalidated.
        self.waits = DurationMeter()
        self.timeouts = RateMeter()
        self.failures = RateMeter()
        self.connects = DurationMeter()
        self.invalidations = RateMeter()
        self.gone_since = time.monotonic()   # while no process is attached

    def add(self, nproc: int, conn: int, ckout: int, waiting: int = 0,
            peak_conn: int = 0, peak_ckout: int = 0,
            peak_waiting: int = 0) -> None:
        """Change the totals; ``peak_*`` are how far above the new totals
        they went in between (a burst inside one update)."""
        self.nproc += nproc
        self.conn += conn
        self.ckout += ckout
        self.waiting += waiting
        if nproc and not self.nproc:
            self.gone_since = time.monotonic()
        self.maxnproc = max(self.maxnproc, self.nproc)
        self.maxconn = max(self.maxconn, self.conn + peak_conn)
        self.maxckout = max(self.maxckout, self.ckout + peak_ckout)
        self.maxwaiting = max(self.maxwaiting, self.waiting + peak_waiting)

    def count(self, now: float, change: connmon.Update) -> None:
        """Add an update's counters; a meter whose count did not move is
        not touched (its readings age by the clock alone)."""
        if change.checkouts:
            self.checkouts.add(now, change.checkouts)
        if change.holds:
            self.holds.add(now, change.hold_total, change.holds)
        if change.waits:
            self.waits.add(now, change.wait_total, change.waits,
                           change.wait_max)
        if change.connects:
            self.connects.add(now, change.connect_total, change.connects)
        if change.timeouts:
            self.timeouts.add(now, change.timeouts)
        if change.failures:
            self.failures.add(now, change.failures)
        if change.invalidations:
            self.invalidations.add(now, change.invalidations)

    def clear_maxima(self) -> None:
        self.maxnproc, self.maxconn, self.maxckout, self.maxwaiting = (
            self.nproc, self.conn, self.ckout, self.waiting)


class Picture:
    """Everything one daemon knows: attached processes and per-program rows.

    Each process carries a session number that grows with every connection
    it makes, so news can arrive by any path in any order: an attach from an
    older session than one already seen, or an update or detach for a
    session that is no longer current, is stale and changes nothing.

    A process attached by a live connection to this node (``node``) is
    that connection's: no other connection replaces, detaches or erases
    it.  A peer's newer news of it waits (``parked``) until that
    connection ends, then applies.

    Not thread-safe by itself: the daemon holds one lock around every call.
    Times are the daemon's ``time.monotonic()``.
    """

    MAX_TOMBSTONES = 100_000   # sessions of gone processes remembered

    def __init__(self, node: str = "") -> None:
        self.node = node
        self.processes: Dict[str, ProcessState] = {}
        self.parked: Dict[str, ProcessState] = {}
        self.tombstones: collections.OrderedDict = collections.OrderedDict()
        self.rows: Dict[Tuple[str, str], ProgramRow] = {}
        self.host_nproc: collections.Counter = collections.Counter()
        self.by_origin: collections.Counter = collections.Counter()
        self.costs: Dict[str, int] = {}   # process -> its state_cost
        self.client_bytes = 0   # their sum: see Door.admit
        self.connections = self.checkouts = self.waiting = 0
        self.max_hosts = self.max_processes = 0
        self.max_connections = self.max_checkouts = self.max_waiting = 0
        self.max_since = time.time()   # the maxima run from then
        self.clears = 0   # maxima cleared so often, here or on a peer
        # host:port of a database server -> its max_connections, as the
        # operator configured it (see database_servers in docs/pool-pressure.txt)
        self.server_limits: Dict[str, int] = {}

    def _row(self, key: Tuple[str, str]) -> ProgramRow:
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= MAX_ROWS:
                self._forget_a_gone_row()
            row = self.rows[key] = ProgramRow(*key)
        return row

    def forget_gone(self, before: float) -> None:
        """Forget the rows of programs gone since before ``before`` (a
        monotonic time): a daemon that runs for months does not keep
        every program that ever ran."""
        for key in [key for key, row in self.rows.items()
                    if row.nproc == 0 and row.gone_since < before]:
            del self.rows[key]

    def _forget_a_gone_row(self) -> None:
        """Drop the oldest row with no live process (there is one unless
        every row is live, which the daemon's max_clients bounds)."""
        for key, row in self.rows.items():
            if row.nproc == 0:
                del self.rows[key]
                return

    def _add(self, proc: ProcessState, sign: int) -> None:
        """Count a whole process in (sign 1) or out (sign -1)."""
        conns, checkouts = sign * len(proc.conns), sign * len(proc.checked_out)
        waiting = sign * proc.waiting_count
        if sign > 0:
            self._cost(proc)
        else:
            self.client_bytes -= self.costs.pop(proc.ident, 0)
        self._row(proc.key).add(sign, conns, checkouts, waiting)
        self.by_origin[proc.origin] += sign
        self.host_nproc[proc.hostname] += sign
        if self.host_nproc[proc.hostname] <= 0:
            del self.host_nproc[proc.hostname]
        self._totals(conns, checkouts, waiting)

    def _totals(self, conns: int, checkouts: int, waiting: int,
                peak_conns: int = 0, peak_checkouts: int = 0,
                peak_waiting: int = 0) -> None:
        self.connections += conns
        self.checkouts += checkouts
        self.waiting += waiting
        self.max_connections = max(self.max_connections,
                                   self.connections + peak_conns)
        self.max_checkouts = max(self.max_checkouts,
                                 self.checkouts + peak_checkouts)
        self.max_waiting = max(self.max_waiting,
                               self.waiting + peak_waiting)
        self.max_processes = max(self.max_processes, len(self.processes))
        self.max_hosts = max(self.max_hosts, len(self.host_nproc))

    def _cost(self, proc: ProcessState) -> None:
        """Reckon ``proc``'s cost anew."""
        cost = state_cost(proc)
        self.client_bytes += cost - self.costs.get(proc.ident, 0)
        self.costs[proc.ident] = cost

    def current(self, ident: str, session: int,
                origin: Optional[str] = None) -> Optional[ProcessState]:
        """The process if ``session`` is its current session (and, if
        given, ``origin`` the node it is attached to), else None."""
        proc = self.processes.get(ident)
        if proc is None or proc.session != session or origin not in (
                None, proc.origin):
            return None
        return proc

    def attach(self, proc: ProcessState, origin: str) -> bool:
        """Add a process attached to node ``origin``, replacing any earlier
        state of it.  Returns False, changing nothing, for stale news (or
        parks it, for news of a process one of our connections holds)."""
        live = self.processes.get(proc.ident)
        if live is not None and proc.session < live.session:
            return False
        if live is None and (proc.session
                             <= self.tombstones.get(proc.ident, -1)):
            return False
        if live is not None and live.origin == self.node != origin:
            if proc.session > live.session:
                proc.origin = origin
                self.parked[proc.ident] = proc
            return False
        if live is not None:
            self._add(self.processes.pop(proc.ident), -1)
        self.tombstones.pop(proc.ident, None)
        proc.origin = origin
        self.processes[proc.ident] = proc
        self._add(proc, 1)
        return True

    def count_first(self, proc: ProcessState, state: connmon.Update,
                    now: float) -> None:
        """Count the counters of a process's first "state": the checkouts
        it made before it could send (attaching counts no counter)."""
        self._row(proc.key).count(now, state)

    def taken(self, ident: str) -> Optional[str]:
        """Why an app may not attach process ``ident`` now, if it may not:
        another live connection, to any node, has it."""
        live = self.processes.get(ident)
        if live is None:
            return None
        return (f"process id {ident!r} is attached by another live "
                f"connection (to node {live.origin}); try again later")

    def attach_own(self, proc: ProcessState) -> Optional[str]:
        """An app's hello on a live connection to this node: news of now,
        so no tombstone refuses it (its session goes past any known one);
        refused, with the reason, only while another live connection, to
        any node, has the process."""
        taken = self.taken(proc.ident)
        if taken is not None:
            return taken
        proc.session = max(proc.session,
                           self.tombstones.get(proc.ident, -1) + 1)
        self.attach(proc, self.node)
        return None

    def detach(self, ident: str, session: int,
               origin: Optional[str] = None) -> bool:
        """The process ended that session: drop it, and remember the session
        so that late news of it is known to be stale.  A peer (``origin``)
        detaches only the processes attached to it."""
        parked = self.parked.get(ident)
        if parked is not None and parked.session == session and origin in (
                None, parked.origin):
            del self.parked[ident]
            self._tombstone(ident, session)
            return True
        proc = self.current(ident, session, origin)
        if proc is None:
            return False
        self._add(self.processes.pop(ident), -1)
        self._tombstone(ident, session)
        parked = self.parked.pop(ident, None)
        if parked is not None:   # a peer's newer news, held back till now
            self.attach(parked, parked.origin)
        return True

    def _tombstone(self, ident: str, session: int) -> None:
        self.tombstones[ident] = session
        if len(self.tombstones) > self.MAX_TOMBSTONES:
            self.tombstones.popitem(last=False)

    def detach_origin(self, origin: str) -> int:
        """A node is out of reach: drop the processes attached to it.  No
        tombstones: they come back as they were when the node returns."""
        gone = [p for p in self.processes.values() if p.origin == origin]
        for proc in gone:
            self._add(self.processes.pop(proc.ident), -1)
        for ident in [i for i, p in self.parked.items()
                      if p.origin == origin]:
            del self.parked[ident]
        return len(gone)

    def update(self, ident: str, session: int, change: connmon.Update,
               now: float, origin: Optional[str] = None) -> Optional[int]:
        """Apply an app's "update" (checked: see connmon.Update) to its
        current session (a peer's, ``origin``, only to a process attached
        to it).  Returns None for stale news (ignored), else how many of
        its events were for connections the process never announced
        (ignored; an honest process sends none)."""
        proc = self.current(ident, session, origin)
        if proc is None:
            parked = self.parked.get(ident)
            if parked is not None and parked.session == session and (
                    origin in (None, parked.origin)):
                parked.apply(change, now)   # kept current, not counted
            return None
        before = (len(proc.conns), len(proc.checked_out),
                  proc.waiting_count) if change.moves else None
        unknown = proc.apply(change, now)
        after = (len(proc.conns), len(proc.checked_out), proc.waiting_count)
        moved = (0, 0, 0) if before is None else (
            after[0] - before[0], after[1] - before[1], after[2] - before[2])
        # How far above the new counts a burst inside the update went.
        peaks = (max(0, change.peak_conns - after[0]),
                 max(0, change.peak_checked_out - after[1]),
                 max(0, change.peak_waiting - after[2]))
        row = self._row(proc.key)
        if any(moved) or any(peaks):
            row.add(0, *moved, *peaks)
            self._totals(*moved, *peaks)
        row.count(now, change)
        if change.moves:
            self._cost(proc)
        return unknown

    MAXIMA_ROWS = 250   # rows a "maxima" message: always under 1 MiB

    def maxima(self) -> List[Dict[str, Any]]:
        """The maxima, for a peer to merge (cluster maxima converge), in
        as many messages as their rows need."""
        rows = [[r.hostname, r.progname, r.maxnproc, r.maxconn, r.maxckout]
                for r in self.rows.values()]
        totals = [self.max_hosts, self.max_processes, self.max_connections,
                  self.max_checkouts]
        return [{"op": "maxima", "rows": rows[start:start + self.MAXIMA_ROWS],
                 "totals": totals, "clears": self.clears}
                for start in range(0, max(1, len(rows)), self.MAXIMA_ROWS)]

    def merge_maxima(self, message: Dict[str, Any]) -> None:
        rows, totals = message.get("rows"), message.get("totals")
        if not (isinstance(rows, list) and len(rows) <= MAX_ROWS
                and isinstance(totals, list)
                and len(totals) == 4 and all(map(is_count, totals))
                and all(isinstance(r, list) and len(r) == 5
                        and is_text(r[0], MAX_NAME)
                        and is_text(r[1], MAX_NAME)
                        and all(map(is_count, r[2:])) for r in rows)):
            raise ProtocolError("maxima needs 'rows' [[hostname, progname, "
                                "maxnproc, maxconn, maxckout], ...] (names "
                                f"of 1 to {MAX_NAME} printable characters, "
                                f"at most {MAX_ROWS} rows) and 'totals' "
                                "[4 counts]")
        clears = message.get("clears", 0)
        if not is_count(clears):
            raise ProtocolError("maxima: 'clears' must be a count")
        if clears < self.clears:
            return   # sent before a clear this node has seen: stale
        self.clears = clears
        for hostname, progname, maxnproc, maxconn, maxckout in rows:
            row = self._row((hostname, progname))
            row.maxnproc = max(row.maxnproc, maxnproc)
            row.maxconn = max(row.maxconn, maxconn)
            row.maxckout = max(row.maxckout, maxckout)
        self.max_hosts, self.max_processes, self.max_connections, \
            self.max_checkouts = map(max, zip(totals, (
                self.max_hosts, self.max_processes, self.max_connections,
                self.max_checkouts)))

    def clear_maxima(self) -> None:
        self.clears += 1
        for row in self.rows.values():
            row.clear_maxima()
        for proc in self.processes.values():
            proc.max_conns = len(proc.conns)
            proc.max_checked_out = len(proc.checked_out)
            proc.max_waiting = proc.waiting_count
        self.max_hosts, self.max_processes = (len(self.host_nproc),
                                              len(self.processes))
        self.max_connections, self.max_checkouts, self.max_waiting = (
            self.connections, self.checkouts, self.waiting)
        self.max_since = time.time()

    def snapshot(self, now: float, procs: bool = False) -> Dict[str, Any]:
        """The JSON snapshot of DESIGN.md (without "service" and "node").

        With ``procs``, each row also lists its live processes (and each
        process its pools).  "oldest" is the age in seconds of the longest
        checked-out connection (the leak finder), "limit" the pools'
        summed capacity (None when any is unlimited), "exhausted" whether
        every connection allowed is out; see row_pressure for the pool
        pressure, and databases for "databases".
        """
        oldest: Dict[Tuple[str, str], float] = {}
        waited: Dict[Tuple[str, str], float] = {}
        limits: Dict[Tuple[str, str], Optional[int]] = {}
        sites: Dict[Tuple[str, str], Dict[Optional[str], dict]] = {}
        for proc in self.processes.values():
            key = proc.key
            if proc.checked_out:
                since = min(proc.checked_out.values())
                oldest[key] = min(since, oldest.get(key, since))
                proc.count_sites(sites.setdefault(key, {}), now)
            if proc.waiting:
                waiting_since = proc.waiting_since
                if waiting_since is not None:
                    waited[key] = min(waiting_since,
                                      waited.get(key, waiting_since))
            total, limit = limits.get(key, 0), proc.limit
            limits[key] = (None if total is None or limit is None
                           else total + limit)
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
            "ckout_total": row.checkouts.total,
            "hold_ms": row.holds.mean_ms(now),
            "oldest": _age(now, oldest.get(key)),
            "limit": limits.get(key),
            "exhausted": is_exhausted(row.ckout, limits.get(key)),
            "sites": top_sites(sites.get(key, {})),
            "sites_more": max(0, len(sites.get(key, ())) - TOP_SITES),
            **row_pressure(row, now, waited.get(key)),
        } for key, row in sorted(self.rows.items())]
        if procs:
            by_row: Dict[Tuple[str, str], list] = {}
            for proc in sorted(self.processes.values(), key=lambda p: p.pid):
                figures = proc.pool_figures()
                by_row.setdefault(proc.key, []).append({
                    "pid": proc.pid,
                    "node": proc.origin,
                    "conn": len(proc.conns),
                    "ckout": len(proc.checked_out),
                    "maxconn": proc.max_conns,
                    "maxckout": proc.max_checked_out,
                    "since": round(proc.since, 3),
                    "oldest": _age(now, min(proc.checked_out.values(),
                                            default=None)),
                    "limit": proc.limit,
                    "exhausted": is_exhausted(len(proc.checked_out),
                                              proc.limit),
                    "long_holders": proc.long_holders(now),
                    "waiting": proc.waiting_count,
                    "maxwaiting": proc.max_waiting,
                    "longest_wait_ms": _ms(now, proc.waiting_since),
                    "pools": top_pools(figures),
                    "pools_more": max(0, len(figures) - TOP_POOLS),
                })
            for row in rows:
                row["procs"] = by_row.get((row["hostname"], row["progname"]),
                                          [])
        return {
            "hosts": len(self.host_nproc),
            "max_hosts": self.max_hosts,
            "processes": len(self.processes),
            "max_processes": self.max_processes,
            "connections": self.connections,
            "max_connections": self.max_connections,
            "checkouts": self.checkouts,
            "max_checkouts": self.max_checkouts,
            "max_since": round(self.max_since, 3),
            "checkouts_per_sec": sum(r["ckout_per_sec"] for r in rows),
            "waiting": self.waiting,
            "max_waiting": self.max_waiting,
            **{key: sum(r[key] for r in rows) for key in (
                "timeouts_per_sec", "connect_errors_per_sec",
                "invalidations_per_sec")},
            "rows": rows,
            **databases(self.processes.values(), self.server_limits),
        }


def row_pressure(row: ProgramRow, now: float,
                 waiting_since: Optional[float]) -> Dict[str, Any]:
    """A row's pool pressure: the checkouts waiting now and at most, how
    long checkouts waited (mean and longest over the last second, the
    longest wait still going), timeouts, connect errors and times,
    invalidations; and the running sums the Prometheus summaries need."""
    return {
        "waiting": row.waiting,
        "maxwaiting": row.maxwaiting,
        "wait_ms": row.waits.mean_ms(now),
        "wait_max_ms": row.waits.max_ms(now),
        "longest_wait_ms": _ms(now, waiting_since),
        "timeouts_per_sec": row.timeouts.rate(now),
        "timeouts_total": row.timeouts.total,
        "connect_ms": row.connects.mean_ms(now),
        "connect_errors_per_sec": row.failures.rate(now),
        "connect_errors_total": row.failures.total,
        "invalidations_per_sec": row.invalidations.rate(now),
        "invalidations_total": row.invalidations.total,
        "wait_seconds_total": round(row.waits.seconds_total, 6),
        "waits_total": row.waits.total,
        "connect_seconds_total": round(row.connects.seconds_total, 6),
        "connects_total": row.connects.total,
        "hold_seconds_total": round(row.holds.seconds_total, 6),
        "holds_total": row.holds.total,
    }


class _Holdings:
    """What a fleet's pools hold on one database server or database, and
    (``programs``) per host+program."""

    __slots__ = ("conn", "ckout", "waiting", "limit", "nproc", "last",
                 "programs")

    def __init__(self, by_program: bool = True) -> None:
        self.conn = self.ckout = self.waiting = self.nproc = 0
        self.limit: Optional[int] = 0
        self.last: Optional[ProcessState] = None   # the process counted last
        self.programs: Optional[Dict[Tuple[str, str], "_Holdings"]] = (
            {} if by_program else None)

    def add(self, proc: ProcessState, figures: Dict[str, Any]) -> None:
        """Add a pool of ``proc``; a process's pools come one after the
        other, so it is counted once however many of them hold here."""
        if self.last is not proc:
            self.last = proc
            self.nproc += 1
        self.conn += figures["conn"]
        self.ckout += figures["ckout"]
        self.waiting += figures["waiting"]
        self.limit = (None if self.limit is None or figures["limit"] is None
                      else self.limit + figures["limit"])
        if self.programs is not None:
            program = self.programs.get(proc.key)
            if program is None:
                program = self.programs[proc.key] = _Holdings(False)
            program.add(proc, figures)

    def figures(self) -> Dict[str, Any]:
        figures = {"conn": self.conn, "ckout": self.ckout,
                   "waiting": self.waiting, "limit": self.limit,
                   "nproc": self.nproc}
        if self.programs is not None:
            figures["nprog"] = len(self.programs)
        return figures


TOP_SERVERS = 50     # database servers listed in a snapshot
TOP_DATABASES = 50   # databases listed per server
TOP_USERS = 5        # users named per database


def databases(processes: Iterable[ProcessState],
              server_limits: Dict[str, int]) -> Dict[str, Any]:
    """The snapshot's "databases": per database server, then per database
    on it, what the fleet's pools hold (connections, checkouts, waiting,
    their summed limits; None when any pool is unlimited), how many
    processes and programs; per server its programs, and the server's own
    max_connections when the operator configured it.

    Bounded whatever clients announce, so that a snapshot always fits its
    reply: the TOP_SERVERS servers holding the most connections, on each
    the TOP_DATABASES databases holding the most, each naming the
    TOP_USERS users holding the most.  "databases_trimmed" (beside the
    servers, and in each server) and "users_trimmed" count what is left
    out; its figures still count in the lines above it.  One pass over
    the processes gathers every server and database; the lists are cut
    after."""
    servers: Dict[Any, _Holdings] = {}
    on_server: Dict[Any, Dict[Any, Tuple[_Holdings,
                                         collections.Counter]]] = {}
    backends: Dict[Any, Optional[str]] = {}
    for proc in processes:
        for figures in proc.pool_figures().values():
            endpoint = figures["endpoint"] or {}
            name = server_name(figures["endpoint"])
            server = servers.get(name)
            if server is None:
                server = servers[name] = _Holdings()
                on_server[name] = {}
                backends[name] = endpoint.get("backend")
            server.add(proc, figures)
            names = on_server[name]
            database = names.get(endpoint.get("database"))
            if database is None:
                database = names[endpoint.get("database")] = (
                    _Holdings(), collections.Counter())
            database[0].add(proc, figures)
            if endpoint.get("user") is not None:
                database[1][endpoint["user"]] += figures["conn"]
    listed = _top({name: server.conn for name, server in servers.items()},
                  TOP_SERVERS)
    return {"databases": [{
        "server": name,
        "backend": backends[name],
        "max_connections": server_limits.get(name),
        **servers[name].figures(),
        "programs": [{"hostname": hostname, "progname": progname,
                      **program.figures()} for (hostname, progname), program
                     in sorted((servers[name].programs or {}).items())],
        "databases": [{"database": database, "users": _top(users, TOP_USERS),
                       "users_trimmed": max(0, len(users) - TOP_USERS),
                       **holdings.figures()}
                      for database, (holdings, users) in _top_items(
                          on_server[name], TOP_DATABASES)],
        "databases_trimmed": max(0, len(on_server[name]) - TOP_DATABASES),
    } for name in listed],
        "databases_trimmed": len(servers) - len(listed)}


def _top_items(held: Dict[Any, Tuple[_Holdings, Any]], count: int
               ) -> List[Tuple[Any, Tuple[_Holdings, Any]]]:
    """The ``count`` items of ``held`` whose holdings hold the most
    connections (see _top)."""
    return [(name, held[name]) for name in _top(
        {name: holdings.conn for name, (holdings, _) in held.items()}, count)]


def _top(conns: Dict[Any, int], count: int) -> List[Any]:
    """The ``count`` names holding the most connections (ties by name),
    in name order: what a list of the snapshot keeps, whatever clients
    announce."""
    def by_name(name: Optional[str]) -> str:
        return name or ""
    return sorted(heapq.nsmallest(count, conns, key=lambda name: (
        -conns[name], by_name(name))), key=by_name)


TOP_SITES = 10   # checkout sites listed per host+program
TOP_POOLS = 20   # pools listed per process


def top_sites(sites: Dict[Optional[str], dict]) -> List[dict]:
    """The sites holding the most connections (then the oldest) first,
    each with its oldest long holders and how many more it has."""
    ranked = sorted(sites.values(), key=lambda s: (-s["held"], -s["oldest"],
                                                   s["site"] or ""))[:TOP_SITES]
    for site in ranked:
        holders = site["long_holders"]
        site["long_holders"] = oldest_holders(holders)
        site["long_holders_more"] = len(holders) - len(site["long_holders"])
    return ranked


def top_pools(figures: Dict[int, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A process's TOP_POOLS pools holding the most connections, in pool
    order: a process that announces a thousand pools lists twenty."""
    pools = heapq.nsmallest(TOP_POOLS, figures.items(),
                            key=lambda item: (-item[1]["conn"], item[0]))
    return [{"pool": pool, **pool_figures} for pool, pool_figures
            in sorted(pools, key=lambda item: item[0])]


def _age(now: float, since: Optional[float]) -> Optional[float]:
    return None if since is None else round(max(0.0, now - since), 1)


def _ms(now: float, since: Optional[float]) -> Optional[float]:
    return None if since is None else round(max(0.0, now - since) * 1000, 1)


def is_exhausted(ckout: int, limit: Optional[int]) -> bool:
    """Every connection the pools allow is checked out: threads that want
    one more wait (and time out)."""
    return limit is not None and 0 < limit <= ckout


# ---------------------------------------------------------------------------
# 2. The door and the server
# ---------------------------------------------------------------------------

HELLO_TIMEOUT = 10.0      # seconds a new connection has to say hello
MAX_OUTBOX = 100_000      # messages queued for a peer before the link is cut
MAX_HELLO_BYTES = 16384   # the most a client may send before it is trusted
PROBLEM_LOG_INTERVAL = 10.0   # seconds between two log lines of one kind
MAX_WAITING = 1024        # connections not yet past their hello, in all
MAX_WAITING_PER_ADDRESS = 64  # ... and from one source address
HELLO_GRACE = 1.0         # seconds one of them keeps its place in any case
CONSOLE_ROOM = 64         # consoles served beside max_clients apps
MAXIMA_INTERVAL = 5.0     # seconds between two maxima sent to each peer
ACCEPT_BACKOFF_MAX = 1.0  # seconds the accept loop rests, out of files


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
    """An error's text for a log line, cut short and escaped: it may quote
    what a client sent, which must not forge lines or move a terminal."""
    text = connmon.printable(str(err))
    return text if len(text) <= limit else text[:limit] + "..."


class LineReader(io.BufferedIOBase):
    """Reads lines from a socket like a binary file's ``readline``, but
    under an optional absolute deadline (the hello's): a client that
    trickles a byte at a time cannot hold a connection open past it.  A
    file, so that http.server's handler reads its request through one."""

    def __init__(self, sock: socket.socket, deadline: Optional[float]):
        super().__init__()
        self.sock = sock
        self.deadline = deadline
        self.buffer = bytearray()
        self.scanned = 0   # no newline in buffer[:scanned]

    def readable(self) -> bool:
        return True

    def readline(self, size: Optional[int] = -1) -> bytes:
        if size is None or size < 0:
            size = sys.maxsize
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
        super().close()


class Role(NamedTuple):
    """What one kind of client may do once past the door."""

    name: str
    requests: FrozenSet[str]   # the ops it may send after its hello
    message_limit: int = connmon.MAX_MESSAGE_BYTES   # bytes a message


# A peer tells of a process whole, in one "attach": a process at every cap
# (5000 connections, 1000 pools with their databases, 1000 sites and
# held-at places), every text of it at its longest in characters JSON
# writes as 12 bytes each, is 19.2 MB (see the test of the largest
# attach); and an app's update of up to MAX_MESSAGE_BYTES reaches the
# peers inside a "forward".  Only a node holding the peer credential
# gets this far.
MAX_PEER_MESSAGE_BYTES = 32 << 20


# The powers of each role, all of them.  An app changes only the process
# its own connection attached (its hello's, then "update"s of it); a
# console reads, and may clear maxima; a peer (one of the service's other
# nodes, from that node's address, with the peer credential) tells of the
# processes attached to it and of the maxima.  Everyone pings.
ROLES = {
    "app": Role("app", frozenset({"update"})),
    "console": Role("console", frozenset({"snapshot", "history",
                                          "clear_maxima"})),
    "peer": Role("peer", frozenset({"attach", "forward", "forwards",
                                    "detach", "maxima", "clear_maxima",
                                    "pong"}),
                 MAX_PEER_MESSAGE_BYTES),
}


def request_op(message: Dict[str, Any], role: Role) -> str:
    """The op of a message from a client of ``role``: a ping, or one of
    its role's requests; any other is a ProtocolError."""
    op = message["op"]
    if op != "ping" and op not in role.requests:
        raise ProtocolError(f"a {role.name} may not send {op!r}")
    return op


def requests(rfile, role: Role, reply) -> Iterator[Dict[str, Any]]:
    """The messages a client of ``role`` sends, until it hangs up; any op
    its role may not send is a ProtocolError.  Pings are answered with a
    pong through ``reply``, and pongs dropped."""
    while True:
        message = read_message(rfile, role.message_limit)
        if message is None:
            return
        op = request_op(message, role)
        if op == "ping":
            reply(PONG)
        elif op != "pong":
            yield message


class Ticket:
    """One connection at the door: where it comes from, the role it was
    admitted as (None while it has not said its hello), and the socket
    its handler reads (the TLS one, once made)."""

    def __init__(self, host: str, sock: socket.socket, since: float):
        self.host = host
        self.role: Optional[str] = None
        self.sock = sock
        self.since = since   # (monotonic) counted in


class Door:
    """Every client passes here, and only here, before it is served.

    Connections that have not said their hello are counted apart, in all
    (MAX_WAITING) and per source address (MAX_WAITING_PER_ADDRESS), so
    that silent ones cannot lock anyone out: from one address they are
    refused past their share, and when all the room is taken (silent
    ones from many addresses) the one that has waited longest is let go
    for the newcomer, once it has had HELLO_GRACE to say its hello (an
    honest client says it within milliseconds, a whole cloud reconnecting
    at once within the grace; newcomers wait in the kernel's queue
    meanwhile, see Reader).  After its hello a client
    takes the room of its role: max_clients apps, of which at most
    max_clients_per_address from one source address (so that one host,
    or one holder of the apps' secret, cannot lock the others out),
    CONSOLE_ROOM consoles, and a few links per other node (a new link may
    come while the old one has not quite ended).  The hello proves the
    role's credential, and a peer must be one of the service's other
    nodes, connecting from that node's address.
    """

    def __init__(self, server: "ConnmonServer"):
        self.server = server
        self.lock = threading.Lock()
        self.tickets: Dict[socket.socket, Ticket] = {}
        self.unheard: Dict[socket.socket, Ticket] = {}   # oldest first
        self.waiting: collections.Counter = collections.Counter()
        self.admitted: collections.Counter = collections.Counter()
        self.apps_from: collections.Counter = collections.Counter()
        self.per_address = (server.options.max_clients_per_address
                            or max(1, server.max_clients // 4))
        others = len(server.service.nodes) - 1
        # New links may come while old ones have not quite ended.
        self.room = {"app": server.max_clients, "console": CONSOLE_ROOM,
                     "peer": 4 * others}

    @property
    def most_clients(self) -> int:
        """Every connection the door may let in at once."""
        return MAX_WAITING + sum(self.room.values())

    def place_at(self) -> float:
        """When a newcomer may be counted in (monotonic): at once (0.0)
        while the waiting room has a place, else once the connection that
        has waited longest has had its HELLO_GRACE."""
        with self.lock:
            if self.waiting[""] < MAX_WAITING:
                return 0.0
            return next(iter(self.unheard.values())).since + HELLO_GRACE

    def arrive(self, request: socket.socket, host: str,
               now: float) -> Optional[str]:
        """Count a new connection in, or say why it is refused (the caller
        has waited for ``place_at``)."""
        with self.lock:
            if self.waiting[host] >= MAX_WAITING_PER_ADDRESS:
                return (f"too many connections from {host} waiting for "
                        f"their hello ({MAX_WAITING_PER_ADDRESS})")
            if self.waiting[""] >= MAX_WAITING:
                self._let_go(next(iter(self.unheard)))
            self.waiting[""] += 1
            self.waiting[host] += 1
            self.tickets[request] = self.unheard[request] = Ticket(
                host, request, now)
        return None

    def reads(self, request: socket.socket, sock: socket.socket) -> None:
        """The reader reads ``request`` through ``sock`` now (TLS)."""
        with self.lock:
            self.tickets[request].sock = sock

    def depart(self, request: socket.socket) -> None:
        with self.lock:
            ticket = self.tickets.pop(request)
            if request in self.unheard:
                self._stop_waiting(request)
            elif ticket.role is not None:
                self.admitted[ticket.role] -= 1
                if ticket.role == "app":
                    self.apps_from[ticket.host] -= 1
                    if not self.apps_from[ticket.host]:
                        del self.apps_from[ticket.host]

    def _let_go(self, request: socket.socket) -> None:
        """Stop counting a connection waiting for its hello, and end it:
        its handler's read sees the end (caller holds the lock)."""
        sock = self.unheard[request].sock
        self._stop_waiting(request)
        try:   # (socket's own shutdown, not TLS's: the handler reads it)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:   # it has ended meanwhile
            pass

    def _stop_waiting(self, request: socket.socket) -> None:
        host = self.unheard.pop(request).host
        for key in ("", host):
            self.waiting[key] -= 1
            if not self.waiting[key]:
                del self.waiting[key]

    def admit(self, request: socket.socket, hello: Dict[str, Any],
              nonce: str) -> Role:
        """The role a hello is admitted as; ProtocolError (AuthError for
        a wrong credential) with the reason if it is not."""
        if hello.get("version") != connmon.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {hello.get('version')!r}"
                                f" not supported (this daemon speaks "
                                f"{connmon.PROTOCOL_VERSION})")
        name = hello.get("role")
        role = ROLES.get(name) if isinstance(name, str) else None
        if role is None:
            raise ProtocolError(f"unknown role {name!r}")
        secret = self.server.security.secret_for(role.name)
        if secret is not None and not connmon.proof_is_valid(
                secret, nonce, role.name, hello.get("auth")):
            raise connmon.AuthError(f"{role.name}: authentication failed "
                                    "(wrong or missing secret)")
        ticket = self.tickets[request]
        if role.name == "peer":
            self.server.cluster.check_peer(hello, ticket.host)
        elif role.name == "app":   # its process is no other connection's
            proc = process_from(hello.get("proc"), connmon.MAX_SESSION)
            with self.server.lock:
                taken = self.server.picture.taken(proc.ident)
            if taken is not None:
                raise ProtocolError(taken)
        with self.lock:
            if request not in self.unheard:
                raise ProtocolError(f"too many connections waiting for "
                                    f"their hello ({MAX_WAITING}); this one "
                                    f"had waited longest")
            if self.admitted[role.name] >= self.room[role.name]:
                raise ProtocolError(self.full(role.name))
            if (role.name == "app" and self.server.picture.client_bytes
                    >= self.server.options.max_client_memory << 20):
                raise ProtocolError(
                    f"connmond holds {self.server.picture.client_bytes >> 20}"
                    " MB of its clients' state already (max_client_memory "
                    f"is {self.server.options.max_client_memory}); the apps "
                    "attached carry on, new ones wait")
            if (role.name == "app"
                    and self.apps_from[ticket.host] >= self.per_address):
                raise ProtocolError(
                    f"too many app connections from {ticket.host} "
                    f"(max_clients_per_address is {self.per_address})")
            self._stop_waiting(request)
            self.admitted[role.name] += 1
            if role.name == "app":
                self.apps_from[ticket.host] += 1
            ticket.role = role.name
        return role

    def full(self, role: str) -> str:
        if role == "app":
            return f"too many connections (max_clients is {self.room[role]})"
        return f"too many {role} connections ({self.room[role]})"


class SharedReplies:
    """Snapshot replies built once for every console that asks meanwhile.

    Each request gets a reply begun after it asked (never an older one),
    and however many consoles ask at once, one is built at a time of each
    kind (with and without processes): a snapshot of 10,000 processes
    holds the picture's lock about 0.2 s, and consoles polling in a loop
    cost connmond what one console costs.  A reply is kept only while
    someone waits for it.
    """

    def __init__(self, build: Callable[[bool], bytes]):
        self.build = build
        self.changed = threading.Condition()
        self.begun = {False: 0, True: 0}      # builds begun, of each kind
        self.building = {False: False, True: False}
        self.wanting = {False: 0, True: 0}    # requests waiting, of each
        self.done: Dict[bool, Tuple[int, bytes]] = {False: (0, b""),
                                                    True: (0, b"")}

    def get(self, procs: bool) -> bytes:
        with self.changed:
            wanted = self.begun[procs] + 1   # the first begun from now on
            self.wanting[procs] += 1
            try:
                while self.done[procs][0] < wanted:
                    if self.building[procs]:
                        self.changed.wait()
                    else:
                        self._build(procs)
                return self.done[procs][1]
            finally:
                self.wanting[procs] -= 1
                if not self.wanting[procs]:   # (up to MAX_REPLY_BYTES)
                    self.done[procs] = (self.done[procs][0], b"")

    def _build(self, procs: bool) -> None:
        """Build one, outside the condition's lock (held on entry)."""
        self.building[procs] = True
        self.begun[procs] += 1
        number = self.begun[procs]
        try:
            self.changed.release()
            try:
                reply = self.build(procs)
            finally:
                self.changed.acquire()
            self.done[procs] = (number, reply)
        finally:
            self.building[procs] = False
            self.changed.notify_all()


class ConnmonServer(socketserver.ThreadingTCPServer):
    """Listens on a node's bind address and keeps the picture."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = socket.SOMAXCONN   # a whole cloud reconnects at once

    def __init__(self, service: connmon.Service, node: connmon.Node,
                 options: Optional["DaemonOptions"] = None):
        self.service = service
        self.node = node
        # Settings first: a bad one is a ConfigError before we listen.
        self.options = options or DaemonOptions(service, node)
        self.picture = Picture(node.name)
        self.picture.server_limits = self.options.database_servers or {}
        self.history = History()
        self.replies = SharedReplies(self._build_reply)
        self.lock = threading.Lock()
        self.security = connmon.Security.of_service(service, daemon=True)
        self.ssl_context = self.security.server_context()
        self.heartbeat = self.options.heartbeat_timeout
        self.max_clients = self.options.max_clients
        self.door = Door(self)
        self.cluster = Cluster(self)
        self.departures = Departures(self)
        self.reader = Reader(self)
        self.accept_backoff = 0.0   # > 0 while out of file descriptors
        if ":" in node.bind[0]:
            self.address_family = socket.AF_INET6
        super().__init__(node.bind, ConnmonHandler)

    def get_request(self):
        """Accept; out of file descriptors, rest a while (the listening
        socket stays readable, so retrying at once would spin) and say so
        once, and once more when accepting works again."""
        try:
            request = super().get_request()
        except OSError as err:
            if err.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                                 errno.ENOMEM):
                raise
            if not self.accept_backoff:
                log.error("cannot accept connections: %s; resting up to "
                          "%gs between tries until a client leaves (raise "
                          "LimitNOFILE, or lower max_clients)",
                          err.strerror, ACCEPT_BACKOFF_MAX)
            self.accept_backoff = min(ACCEPT_BACKOFF_MAX,
                                      max(0.05, self.accept_backoff * 2))
            time.sleep(self.accept_backoff)
            raise
        if self.accept_backoff:
            log.warning("accepting connections again")
            self.accept_backoff = 0.0
        return request

    def process_request(self, request, client_address) -> None:
        """Hand a new connection to the reader, which lets the door count
        it in (or refuse it) and greets it."""
        self.reader.add(Greeting(request, client_address))

    def serve_admitted(self, greeting: "Greeting") -> None:
        """A console's or a peer's connection, in a thread of its own
        until it ends."""
        try:
            ConnmonHandler(greeting, greeting.client_address, self)
        except Exception:
            self.handle_error(greeting.ticket_key, greeting.client_address)
        finally:
            self.shutdown_request(greeting.sock)
            self.door.depart(greeting.ticket_key)

    def refuse(self, request: socket.socket, client_address,
               reason: str) -> None:
        """Say why in one line, without ever blocking the reader."""
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
        """The picture now, read under the lock: the reader waits
        meanwhile (about 0.2 s with 10,000 processes), and what it reads
        waits in the kernel's buffers.  A copy of the picture to read
        outside the lock cost more than the reading itself, and the
        reading, sharing the interpreter with the reader, took several
        times as long; the snapshot holds none of the picture's objects,
        so it is encoded outside."""
        with self.lock:
            now = time.monotonic()
            picture = self.picture.snapshot(now, procs)
            peers = self.cluster.status()
        return {"service": self.service.name, "node": self.node.name,
                "peers": peers, "thresholds": {
                    "oldest": self.options.hold_warn_seconds,
                    "hold_ms": self.options.hold_ms_warn},
                **picture}

    def history_of(self, request: Dict[str, Any]) -> Dict[str, Any]:
        """The "history" reply: a program's conn and ckout, one sample a
        second, oldest first; on one host, or summed over every host
        when the request names none (outside the lock, from a copy)."""
        hostname, progname = request.get("hostname"), request.get("progname")
        if not isinstance(progname, str) or not (
                hostname is None or isinstance(hostname, str)):
            raise ProtocolError("history needs 'progname' and, optionally, "
                                "'hostname'")
        with self.lock:
            picked = self.history.picked(progname, hostname)
        conn, ckout = picked.sums()
        return {"op": "history", "interval": 1.0, "conn": conn,
                "ckout": ckout}

    def keep_history(self) -> None:
        """Once a second: sample every row into the history, and forget
        the rows of programs gone longer than forget_gone_after."""
        forget_after = self.options.forget_gone_after
        next_tick = time.monotonic()
        while True:
            next_tick += HISTORY_INTERVAL
            time.sleep(max(0.0, next_tick - time.monotonic()))
            now = time.monotonic()
            next_tick = max(next_tick, now - HISTORY_INTERVAL)
            with self.lock:
                self.picture.forget_gone(now - forget_after)
                self.history.record(self.picture.rows)

    def snapshot_reply(self, procs: bool) -> bytes:
        """The snapshot as one reply line, trimmed to fit the reply limit
        (never refused): a console always gets a picture.  Shared by the
        consoles that ask meanwhile (see SharedReplies)."""
        return self.replies.get(procs)

    def _build_reply(self, procs: bool) -> bytes:
        return fit_reply({"op": "snapshot", **self.snapshot(procs)},
                         connmon.MAX_REPLY_BYTES)

    def welcome(self, nonce: str) -> Dict[str, Any]:
        return {"op": "welcome", "version": connmon.PROTOCOL_VERSION,
                "service": self.service.name, "node": self.node.name,
                "nonce": nonce, "heartbeat": self.heartbeat,
                "batches": True}


HISTORY_INTERVAL = 1.0   # seconds between two samples of the history
HISTORY_SAMPLES = 600    # samples kept per row: ten minutes
HISTORY_MAX_COUNT = 65535   # a count above this is kept as this


class History:
    """Every row's conn and ckout, once a second, for the last
    HISTORY_SAMPLES seconds: a console opened after an incident draws the
    staircase of a leak that began before it started.

    Bounded: two ring buffers of HISTORY_SAMPLES unsigned 16-bit counts a
    row (2.4 KB), and a row's history goes with the row.  Each node of a
    cluster keeps its own (from when it started).
    """

    def __init__(self, length: int = HISTORY_SAMPLES):
        self.length = length
        self.tick = 0   # samples taken so far
        # (hostname, progname) -> (conn ring, ckout ring, first tick)
        self.series: Dict[Tuple[str, str], Tuple[array.array, array.array,
                                                 int]] = {}

    def record(self, rows: Dict[Tuple[str, str], ProgramRow]
               ) -> None:
        series, slot, top = self.series, self.tick % self.length, \
            HISTORY_MAX_COUNT
        for key in series.keys() - rows.keys():   # forgotten rows
            del series[key]
        for key, row in rows.items():
            entry = series.get(key)
            if entry is None:
                empty = bytes(2 * self.length)
                entry = series[key] = (array.array("H", empty),
                                       array.array("H", empty), self.tick)
            entry[0][slot] = row.conn if row.conn < top else top
            entry[1][slot] = row.ckout if row.ckout < top else top
        self.tick += 1

    def picked(self, progname: str, hostname: Optional[str]) -> "History":
        """A copy of the rows of ``progname`` (on ``hostname``, or on
        every host when None), to sum outside the daemon's lock: the lock
        pays a look at each row's key and a copy of two small arrays a
        row picked, not the summing."""
        twin = History(self.length)
        twin.tick = self.tick
        twin.series = {key: (conn[:], ckout[:], first)
                       for key, (conn, ckout, first) in self.series.items()
                       if key[1] == progname and hostname in (None, key[0])}
        return twin

    def sums(self) -> Tuple[List[int], List[int]]:
        """The summed conn and ckout of every row here over the samples
        any of them has, oldest first: each row's added in one go (in C,
        not a Python loop a sample)."""
        length = min(self.length, max(
            (self.tick - first for _, _, first in self.series.values()),
            default=0))
        totals: Tuple[List[int], List[int]] = ([0] * length, [0] * length)
        for *rings, first in self.series.values():
            have = min(length, self.tick - first)
            for total, ring in zip(totals, rings):
                total[length - have:] = map(operator.add,
                                            total[length - have:],
                                            self._latest(ring, have))
        return totals

    def _latest(self, ring: array.array, count: int) -> array.array:
        """The ``count`` latest samples of ``ring``, oldest first."""
        start = (self.tick - count) % self.length
        return ring[start:start + count] + ring[:max(
            0, start + count - self.length)]


class Departures:
    """The processes whose connection ended, taken out of the picture by
    one thread, in batches: when thousands of clients drop at once, the
    reader does not hold the state lock for all of them in one go, and
    consoles are not queued behind them.
    """

    BATCH = 500   # departures a hold of the state lock

    def __init__(self, server: "ConnmonServer"):
        self.server = server
        self.queue: collections.deque = collections.deque()
        self.wake = threading.Event()
        threading.Thread(target=self._run, daemon=True,
                         name="departures").start()

    def add(self, ident: str, session: int) -> None:
        self.queue.append((ident, session))
        self.wake.set()

    def _run(self) -> None:
        server, queue = self.server, self.queue
        while True:
            self.wake.wait()
            self.wake.clear()
            while queue:
                with server.lock:
                    for _ in range(min(self.BATCH, len(queue))):
                        ident, session = queue.popleft()
                        if server.picture.detach(ident, session):
                            server.cluster.broadcast({
                                "op": "detach", "id": ident,
                                "session": session})


PING = {"op": "ping"}
PONG = {"op": "pong"}


def say_why_it_ends(peer: str, err: Exception, role: Optional[str],
                    heartbeat: float) -> Optional[str]:
    """Log why a client's connection ends on ``err`` (``role`` None while
    it has not been admitted), and return what to tell it, if anything:
    the reason it is refused.  Bad input gets one rate-limited line."""
    if isinstance(err, ProtocolError):
        kind = ("auth" if isinstance(err, connmon.AuthError)
                else f"bad {role or 'hello'}")
        problems.log(logging.WARNING, kind, "%s: %s; closing the connection",
                     peer, brief(err))
        return brief(err)
    if isinstance(err, ssl.SSLError):
        problems.log(logging.WARNING, "tls", "%s: TLS failed: %s; closing "
                     "the connection", peer, brief(err))
    elif isinstance(err, socket.timeout):
        if role is not None:
            log.info("%s: silent for %gs (heartbeat_timeout); closing the "
                     "connection", peer, heartbeat)
        else:
            problems.log(logging.WARNING, "hello", "%s: no hello within %gs;"
                         " closing the connection", peer, HELLO_TIMEOUT)
    elif isinstance(err, OSError):
        if role is not None:
            log.info("%s: connection lost: %s", peer, err)
        else:
            problems.log(logging.INFO, "lost", "%s: connection lost before "
                         "hello: %s", peer, brief(err))
    else:   # a bug: say so, keep serving everyone else
        log.error("%s: internal error; closing the connection", peer,
                  exc_info=err)
    return None


def line_end(buffer: bytearray, start: int, limit: int) -> int:
    """Where the message at ``start`` of ``buffer`` ends (past its
    newline), or -1 while it has not all come; ProtocolError when it is
    longer than ``limit`` bytes."""
    end = buffer.find(b"\n", start, start + limit + 1)
    if end < 0 and len(buffer) - start > limit:
        raise ProtocolError(f"message longer than {limit} bytes")
    return end + 1 if end >= 0 else -1


class Greeting:
    """A connection from its accept until its hello is through (an app's:
    until its first state is): what the reader needs to greet it."""

    __slots__ = ("sock", "ticket_key", "client_address", "peer", "nonce",
                 "deadline", "buffer", "handshaking", "hello", "role")

    def __init__(self, request: socket.socket, client_address: Any):
        self.sock = request   # the TLS one, once made
        self.ticket_key = request   # the door's
        self.client_address = client_address
        self.peer = connmon.format_address(client_address[:2])
        self.nonce = secrets.token_hex(16)
        self.deadline = 0.0   # for its hello, once the door counts it
        self.buffer = bytearray()   # read, not yet taken as messages
        self.handshaking = False    # TLS, until its handshake is through
        self.hello: Dict[str, Any] = {}
        self.role: Optional[Role] = None   # once admitted


class AppStream:
    """An app's connection once its hello and first state are through:
    what the reader needs to serve it."""

    __slots__ = ("sock", "ticket_key", "peer", "name", "ident", "session",
                 "buffer", "heard")

    def __init__(self, greeting: Greeting, name: str, proc: ProcessState):
        self.sock = greeting.sock
        self.ticket_key = greeting.ticket_key
        self.peer, self.name = greeting.peer, name
        self.ident, self.session = proc.ident, proc.session
        self.buffer = greeting.buffer   # read past its first state
        self.heard = time.monotonic()   # the last time it sent anything


class Reader:
    """One thread that greets every connection and serves every app's.

    A departure from "a handler per connection" (see docs/performance.txt):
    a thread per connection costs a thread's start and the interpreter
    handed to it at each step of a hello, and then a wake-up for each
    message; at about a message a second from each of thousands of
    processes those cost connmond ~100 us a message, and after a restart,
    when a whole cloud reconnects at once, its hellos queued behind each
    other for longer than the plugin waits for its welcome, so that the
    cloud never got back in.  This thread waits for all connections at
    once (``selectors``): it does each one's TLS handshake, sends its
    welcome, reads its hello and lets the door admit it (``Door.admit``).
    A console or a peer then gets a handler thread of its own
    (``ConnmonHandler``); an app stays: its first state attaches its
    process, and from then on the reader reads what it sends, checks every
    message outside the lock (``connmon.Update``), applies those of a
    batch of connections under one hold of the lock, answers pings once
    the updates before them are applied, and ends a connection on its
    end, bad input (the reason sent back, the connection closed), a lost
    or failed connection (TLS included), or silence: no hello within
    HELLO_TIMEOUT, nothing for heartbeat_timeout.
    """

    # Connections read, and their updates applied under one hold of the
    # picture's lock, at a time: a round's messages are let go before the
    # next batch is read (they die young, where the collector is cheap).
    BATCH = 64
    READ_SIZE = 65536   # bytes read from a connection at a time
    # While more than BUSY apps are served and connections are read more
    # than BUSY times a second, a round begins at most every ROUND_TIME:
    # what comes meanwhile waits in the kernel's buffers and is read in
    # the next round, so that at a message a second from each of thousands
    # of processes a round reads dozens, not one (a wake-up, a select and
    # a hold of the lock shared by them), for at most this much more
    # delay, far inside the console's second.  Otherwise (a few clients,
    # however chatty), and for a new connection, a round begins at once.
    ROUND_TIME = 0.02
    BUSY = 200
    # New connections taken (welcomed) a round, and waiting to be taken
    # at most: after a restart, the room of the door (MAX_WAITING) holds
    # a few rounds' hellos.  While the room is full, newcomers are taken
    # as hellos are read, or as the grace of the longest waiting ends.
    ARRIVALS_A_ROUND = 256
    MAX_ARRIVALS = 1024

    def __init__(self, server: "ConnmonServer"):
        self.server = server
        self.selector = selectors.DefaultSelector()
        self.streams: Dict[AppStream, None] = {}
        self.greetings: Dict[Greeting, None] = {}
        self.arrivals: collections.deque = collections.deque()
        self.arrived = threading.Event()   # (ends the rest between rounds)
        self.take_at = 0.0   # (monotonic) when arrivals may be taken next
        self.room = threading.BoundedSemaphore(self.MAX_ARRIVALS)
        self.wake, self._waker = socket.socketpair()
        for sock in (self.wake, self._waker):
            sock.setblocking(False)
        self.selector.register(self.wake, selectors.EVENT_READ, None)
        # Silence is looked for a few times a heartbeat, at most each second.
        self.sweep_interval = min(1.0, server.heartbeat / 4)
        self.next_sweep = time.monotonic()
        self.busy = False   # read more than BUSY times in the last second
        #                     with more than BUSY apps
        self.reads = 0      # ... this second, so far
        self.second = int(self.next_sweep)
        # A round's work: updates to apply, pings to answer, endings.
        self.changes: List[Tuple[AppStream, connmon.Update,
                                 Dict[str, Any]]] = []
        self.pings: List[AppStream] = []
        self.ending: Dict[Any, Optional[Exception]] = {}
        threading.Thread(target=self._run, daemon=True,
                         name="reader").start()

    def add(self, greeting: Greeting) -> None:
        """Greet a new connection (called by the accepting thread, which
        waits here while MAX_ARRIVALS are still to be taken: the rest wait
        in the kernel's queue, not counted at the door yet, so that a
        whole cloud reconnecting at once does not fill the door's room
        faster than the hellos are read)."""
        self.room.acquire()
        self.arrivals.append(greeting)
        self.arrived.set()
        self._wake_up()

    def _wake_up(self) -> None:
        """End the reader's select."""
        try:
            self._waker.send(b"\0")
        except OSError:   # woken already, its buffer full
            pass

    def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                self._round()
            except Exception:   # a bug: say so, drop the round, go on
                log.exception("reader: internal error")
                self.changes.clear()
                self.pings.clear()
                self.ending.clear()
            if self.busy:
                self.arrived.wait(max(0.0, began + self.ROUND_TIME
                                      - time.monotonic()))

    def _round(self) -> None:
        until = (min(self.next_sweep, self.take_at) if self.arrivals
                 else self.next_sweep)
        ready = self.selector.select(max(0.0, until - time.monotonic()))
        now = time.monotonic()
        if int(now) != self.second:
            last_second = int(now) == self.second + 1
            self.busy = (last_second and self.reads > self.BUSY
                         and len(self.streams) > self.BUSY)
            self.second, self.reads = int(now), 0
        self.reads += len(ready)
        for first in range(0, len(ready), self.BATCH):
            for key, _ in ready[first:first + self.BATCH]:
                if key.data is None:
                    self._drain_wake()
                elif type(key.data) is AppStream:
                    self._read(key.data, now)
                elif key.data in self.greetings:   # (not just admitted)
                    self._greet(key.data, now)
            self._apply(now)
            for stream in self.pings:
                self._reply(stream, PONG)
            self.pings.clear()
        if now >= self.next_sweep:
            self.next_sweep = now + self.sweep_interval
            silence = now - self.server.heartbeat
            for stream in self.streams:
                if stream.heard < silence:
                    self.ending.setdefault(stream, socket.timeout())
            for greeting in self.greetings:
                if greeting.deadline < now:
                    self.ending.setdefault(greeting, socket.timeout())
        for client, err in self.ending.items():
            if type(client) is AppStream:
                self._end(client, err)
            else:
                self._end_greeting(client, err)
        self.ending.clear()
        if self.arrivals:
            self._take_arrivals(now)

    # -- greeting -------------------------------------------------------------

    def _drain_wake(self) -> None:
        self.arrived.clear()
        try:
            while self.wake.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _take_arrivals(self, now: float) -> None:
        """Welcome up to ARRIVALS_A_ROUND new connections, as long as the
        door has a place for them; the next round takes more at once, or
        when the door will have a place."""
        taken = 0
        try:
            while self.arrivals and taken < self.ARRIVALS_A_ROUND:
                self.take_at = self.server.door.place_at()
                if self.take_at > now:
                    return
                greeting = self.arrivals.popleft()
                self.room.release()
                taken += 1
                self._welcome(greeting, now)
        finally:
            if self.arrivals and self.take_at <= now:
                self.arrived.set()   # (ends a rest between rounds)

    def _welcome(self, greeting: Greeting, now: float) -> None:
        """A new connection: counted in by the door (or refused), then its
        TLS handshake begins, or its welcome is sent."""
        server, context = self.server, self.server.ssl_context
        reason = server.door.arrive(greeting.ticket_key,
                                    greeting.client_address[0], now)
        if reason is not None:
            server.refuse(greeting.ticket_key, greeting.client_address,
                          reason)
            return
        self.greetings[greeting] = None
        greeting.deadline = now + HELLO_TIMEOUT
        try:
            sock = greeting.sock
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                greeting.sock = context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False)
                greeting.handshaking = True
                server.door.reads(greeting.ticket_key, greeting.sock)
            self.selector.register(greeting.sock, selectors.EVENT_READ,
                                   greeting)
            if context is None:
                self._say(greeting, server.welcome(greeting.nonce))
        except Exception as err:
            self.ending.setdefault(greeting, err)

    def _greet(self, greeting: Greeting, now: float) -> None:
        """A step of the handshake: TLS's, then the welcome sent, the
        hello read and admitted, and an app's first state."""
        sock = greeting.sock
        try:
            if isinstance(sock, ssl.SSLSocket) and greeting.handshaking:
                sock.do_handshake()
                greeting.handshaking = False
                self.selector.modify(sock, selectors.EVENT_READ, greeting)
                self._say(greeting, self.server.welcome(greeting.nonce))
            data = self._receive(sock)
            if not data:
                self.ending.setdefault(greeting, None)
                return
            greeting.buffer += data
            self._greeting_messages(greeting, now)
        except BlockingIOError:
            pass
        except ssl.SSLWantReadError:   # (the handshake's turn to read)
            if greeting.handshaking:
                self.selector.modify(sock, selectors.EVENT_READ, greeting)
        except ssl.SSLWantWriteError:   # (the handshake's turn to write)
            self.selector.modify(sock, selectors.EVENT_WRITE, greeting)
        except Exception as err:
            self.ending.setdefault(greeting, err)

    def _greeting_messages(self, greeting: Greeting, now: float) -> None:
        """The hello (admitted by the door: a console or a peer goes to a
        handler thread of its own), then an app's first state."""
        buffer = greeting.buffer
        while True:
            end = line_end(buffer, 0, MAX_HELLO_BYTES if greeting.role is None
                           else connmon.MAX_MESSAGE_BYTES)
            if end < 0:
                return
            message = connmon.decode(bytes(buffer[:end]))
            del buffer[:end]
            if greeting.role is not None:   # an app's first state
                self._attach(greeting, message, now)
                return
            greeting.role = self.server.door.admit(
                greeting.ticket_key, connmon.expect(message, "hello"),
                greeting.nonce)
            greeting.hello = message
            self._say(greeting, {"op": "ready"})
            if greeting.role.name != "app":
                self._hand_over(greeting)
                return
            greeting.deadline = now + self.server.heartbeat

    def _attach(self, greeting: Greeting, message: Dict[str, Any],
                now: float) -> None:
        """An app's first state: its process joins the picture (unless
        another live connection has it), and the reader serves it."""
        proc = process_from(greeting.hello.get("proc"), connmon.MAX_SESSION)
        name = f"{proc.progname}[{proc.pid}] on {proc.hostname}"
        state = connmon.Update(connmon.expect(message, "state"))
        proc.apply(state, now)
        server = self.server
        with server.lock:
            taken = server.picture.attach_own(proc)
            if taken is None:   # (what it counted before it could send)
                server.picture.count_first(proc, state, now)
                server.cluster.broadcast(attach_message(proc))
        if taken is not None:
            raise ProtocolError(taken)
        log.info("%s: app %s connected (%s)", greeting.peer, name,
                 connmon.plural(len(proc.conns), "connection"))
        del self.greetings[greeting]
        stream = AppStream(greeting, name, proc)
        self.streams[stream] = None
        self.selector.modify(stream.sock, selectors.EVENT_READ, stream)
        self._parse(stream, now)   # what it sent past its state

    def _hand_over(self, greeting: Greeting) -> None:
        """A console's or a peer's connection, admitted: served from now
        on by a handler thread of its own."""
        del self.greetings[greeting]
        self.selector.unregister(greeting.sock)
        try:
            threading.Thread(target=self.server.serve_admitted,
                             args=(greeting,), daemon=True).start()
        except RuntimeError as err:   # no thread to be had
            self.greetings[greeting] = None   # (to be ended)
            self.selector.register(greeting.sock, selectors.EVENT_READ,
                                   greeting)
            raise ProtocolError(f"overloaded: {err}") from None

    @staticmethod
    def _say(greeting: Greeting, message: Dict[str, Any]) -> None:
        """Send one of the handshake's short lines, whole at once: a new
        connection's send buffer has room for it, or its client reads
        nothing."""
        data = connmon.encode(message)
        try:
            if greeting.sock.send(data) == len(data):
                return
        except (BlockingIOError, ssl.SSLWantWriteError):
            pass
        raise OSError("the client reads nothing connmond sends")

    def _end_greeting(self, greeting: Greeting,
                      err: Optional[Exception]) -> None:
        """A connection that ends before it is served: why is logged (and
        told, for bad input), the connection closed."""
        self.greetings.pop(greeting, None)
        try:
            self.selector.unregister(greeting.sock)
        except (KeyError, ValueError):   # never registered
            pass
        role = None if greeting.role is None else greeting.role.name
        if err is None and role is not None:   # an app, before its state
            err = ProtocolError("connection closed while waiting for "
                                "'state'")
        if err is None or isinstance(err, ssl.SSLEOFError):
            log.debug("%s: closed before %s", greeting.peer,
                      "TLS" if greeting.handshaking else "hello")
            reason = None   # a port probe, most likely
        else:
            reason = say_why_it_ends(greeting.peer, err, role,
                                     self.server.heartbeat)
        self._close(greeting.sock, greeting.ticket_key, reason)

    def _close(self, sock: socket.socket, ticket_key: socket.socket,
               reason: Optional[str]) -> None:
        """Tell ``reason``, if any, and close the connection."""
        if reason is not None:
            try:
                sock.send(connmon.encode({"op": "error", "error": reason},
                                         connmon.MAX_REPLY_BYTES))
            except OSError:
                pass
        self.server.shutdown_request(sock)
        self.server.door.depart(ticket_key)

    def _receive(self, sock: socket.socket) -> bytes:
        """What a connection has sent (b"" at its end); over TLS, also
        what the TLS layer holds decrypted, which select does not see."""
        data = sock.recv(self.READ_SIZE)
        if isinstance(sock, ssl.SSLSocket):
            while data and sock.pending():
                data += sock.recv(self.READ_SIZE)
        return data

    # -- serving apps ---------------------------------------------------------

    def _read(self, stream: AppStream, now: float) -> None:
        try:
            data = self._receive(stream.sock)
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except Exception as err:
            self.ending.setdefault(stream, err)
            return
        stream.heard = now
        if not data:
            self.ending.setdefault(stream, ProtocolError(
                "connection closed in the middle of a message")
                if stream.buffer else None)
            return
        stream.buffer += data
        self._parse(stream, now)

    def _parse(self, stream: AppStream, now: float) -> None:
        """Take the complete messages out of ``stream``'s buffer: its
        updates, checked, to apply; its pings, to answer."""
        buffer, start = stream.buffer, 0
        try:
            while True:
                end = line_end(buffer, start, connmon.MAX_MESSAGE_BYTES)
                if end < 0:
                    break
                message = connmon.decode(bytes(buffer[start:end]))
                start = end
                if request_op(message, ROLES["app"]) == "ping":
                    self.pings.append(stream)
                else:
                    self.changes.append((stream, connmon.Update(message),
                                         message))
        except Exception as err:   # bad input; any other is a bug
            self.ending[stream] = err
        del buffer[:start]

    def _apply(self, now: float) -> None:
        lock, picture, cluster = (self.server.lock, self.server.picture,
                                  self.server.cluster)
        unknowns, refused = [], set()
        with lock:
            for stream, change, message in self.changes:
                if stream in refused:   # (its messages after the bad one)
                    continue
                try:
                    unknown = picture.update(stream.ident, stream.session,
                                             change, now)
                    if unknown is not None and cluster.links:
                        cluster.forward(stream.ident, stream.session,
                                        message)
                except Exception as err:   # past a cap, or a bug
                    refused.add(stream)
                    self.ending[stream] = err
                    continue
                if unknown:
                    unknowns.append((stream, unknown))
        self.changes.clear()
        for stream, unknown in unknowns:
            problems.log(logging.WARNING, "unknown", "%s: app %s sent %d "
                         "events for connections it never announced; "
                         "ignored", stream.peer, stream.name, unknown)

    def _reply(self, stream: AppStream, message: Dict[str, Any]) -> None:
        """Send a short reply at once, or end a connection whose app does
        not read what it is sent."""
        data = connmon.encode(message, connmon.MAX_REPLY_BYTES)
        try:
            if stream.sock.send(data) == len(data):
                return
            err: Exception = OSError("the app reads nothing connmond sends")
        except (BlockingIOError, ssl.SSLWantWriteError):
            err = OSError("the app reads nothing connmond sends")
        except Exception as failed:
            err = failed
        self.ending.setdefault(stream, err)

    def _end(self, stream: AppStream, err: Optional[Exception]) -> None:
        """What the handler's end did: the process leaves, the reason is
        logged (and told, for bad input), the connection closed."""
        server = self.server
        self.selector.unregister(stream.sock)
        del self.streams[stream]
        server.departures.add(stream.ident, stream.session)
        log.info("%s: app %s disconnected", stream.peer, stream.name)
        self._close(stream.sock, stream.ticket_key, None if err is None
                    else say_why_it_ends(stream.peer, err, "app",
                                         server.heartbeat))


class ConnmonHandler(socketserver.StreamRequestHandler):
    """A console's or a peer node's connection, once the reader has
    greeted it and the door admitted it (see ConnmonServer.serve_admitted):
    its ``request`` is the TLS socket, if any."""

    server: ConnmonServer

    def __init__(self, greeting: Greeting, client_address: Any,
                 server: ConnmonServer):
        self.greeting = greeting
        super().__init__(greeting.sock, client_address, server)

    def setup(self) -> None:
        greeting = self.greeting
        self.peer, self.hello = greeting.peer, greeting.hello
        assert greeting.role is not None   # (admitted: Reader._hand_over)
        self.role = greeting.role
        self.request.setblocking(True)
        self.request.settimeout(self.server.heartbeat)
        super().setup()
        self.rfile.close()
        self.lines = LineReader(self.connection, None)
        self.lines.buffer += greeting.buffer   # read past its hello

    def send(self, message: Dict[str, Any]) -> None:
        self.wfile.write(connmon.encode(message, connmon.MAX_REPLY_BYTES))

    def handle(self) -> None:
        try:
            getattr(self, "serve_" + self.role.name)(self.hello, self.role)
        except Exception as err:
            reason = say_why_it_ends(self.peer, err, self.role.name,
                                     self.server.heartbeat)
            if reason is not None:
                try:
                    self.send({"op": "error", "error": reason})
                except OSError:
                    pass

    # -- consoles -------------------------------------------------------------

    def serve_console(self, hello: Dict[str, Any], role: Role) -> None:
        log.info("%s: console connected", self.peer)
        for request in requests(self.lines, role, self.send):
            if request["op"] == "snapshot":
                self.wfile.write(self.server.snapshot_reply(
                    procs=request.get("procs") is True))
            elif request["op"] == "history":
                self.send(self.server.history_of(request))
            else:   # clear_maxima
                with self.server.lock:
                    self.server.picture.clear_maxima()
                    self.server.cluster.broadcast(
                        {"op": "clear_maxima",
                         "clears": self.server.picture.clears})
                self.send({"op": "clear_maxima"})
        log.info("%s: console disconnected", self.peer)

    # -- peer nodes -----------------------------------------------------------

    def serve_peer(self, hello: Dict[str, Any], role: Role) -> None:
        link = self.server.cluster.links[hello["node"]]
        link.run(self.request, self.lines, hello.get("batches") is True)


def process_from(proc: Any, max_session: int = 1 << 62
                 ) -> connmon.ProcessState:
    """A ProcessState for the "proc" of an app's hello (or a peer's
    attach), checking every field."""
    if not isinstance(proc, dict):
        raise ProtocolError("app hello needs a 'proc' object")
    fields: List[str] = []
    for key in ("id", "hostname", "progname"):
        value = proc.get(key)
        if not (isinstance(value, str)
                and connmon.is_text(value, connmon.MAX_NAME)):
            raise ProtocolError(f"app hello: 'proc.{key}' must be a string "
                                f"of 1 to {connmon.MAX_NAME} printable "
                                "characters")
        fields.append(value)
    pid, session = proc.get("pid"), proc.get("session")
    if type(pid) is not int or not 0 < pid < 1 << 32:
        raise ProtocolError("app hello: 'proc.pid' must be a positive integer")
    if type(session) is not int or not 0 <= session < max_session:
        raise ProtocolError(f"app hello: 'proc.session' must be a count "
                            f"below {max_session}")
    ident, hostname, progname = fields
    return connmon.ProcessState(ident, hostname, progname, pid, session)


def nested(message: Dict[str, Any], key: str, op: str) -> Dict[str, Any]:
    """The ``op`` object inside a peer's message, checked."""
    value = message.get(key)
    if not isinstance(value, dict) or value.get("op") != op:
        raise ProtocolError(f"{message['op']}: {key!r} must be an object "
                            f"with op {op!r}")
    return value


def _line(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def fit_reply(message: Dict[str, Any], limit: int) -> bytes:
    """``message`` (a snapshot) as a line of at most ``limit`` bytes.

    Fair whatever clients say of themselves: every row gets an equal share
    of the bytes, and what one row does not use is shared among the
    others (``water_level``).  A row larger than its share keeps its
    smallest processes and sites, says how many it left out ("procs_more",
    "sites_more") and is marked "trimmed"; so a client that makes its own
    row large costs only its own row.  Only if even rows without their
    lists cannot all fit are whole rows left out, the largest first (gone
    before live), with their programs under "databases"; "trimmed" says
    how many."""
    data = _line(message)
    if len(data) <= limit:
        return data
    rows = message["rows"]

    def keeping(kept: List[Dict[str, Any]]) -> bytes:
        names = {(row["hostname"], row["progname"]) for row in kept}
        trimmed = {**message, "trimmed": len(rows) - len(kept), "rows": [
            row for row in fitted
            if (row["hostname"], row["progname"]) in names]}
        if "databases" in message and len(kept) < len(rows):
            trimmed["databases"] = [{**server, "programs": [
                program for program in server["programs"]
                if (program["hostname"], program["progname"]) in names]}
                for server in message["databases"]]
        return _line(trimmed)

    fitted = rows
    frame = len(keeping([]))
    if frame > limit:
        raise ProtocolError(f"a snapshot without rows is {frame} bytes, "
                            f"over the {limit} byte reply limit")
    # A row costs its line, and its program's lines under "databases".
    listed: Dict[Tuple[str, str], int] = collections.Counter()
    for server in message.get("databases", ()):
        for program in server["programs"]:
            listed[program["hostname"], program["progname"]] += len(
                _line(program))
    extra = [listed[row["hostname"], row["progname"]] for row in rows]
    sizes = [len(_line(row)) for row in rows]   # (each row's comma: its \n)
    share = water_level([size + more for size, more in zip(sizes, extra)],
                        limit - frame)
    fitted = [row if size + more <= share else trim_row(row, share - more)
              for row, size, more in zip(rows, sizes, extra)]
    ranked = [fitted[index] for *_, index in sorted(
        (not row["connected"], len(_line(row)) + more, index)
        for index, (row, more) in enumerate(zip(fitted, extra)))]
    low, high = 0, len(rows) + 1   # keeping low rows fits; high does not
    best = keeping([])
    while high - low > 1:
        middle = (low + high) // 2
        reply = keeping(ranked[:middle])
        if len(reply) <= limit:
            low, best = middle, reply
        else:
            high = middle
    return best


def water_level(sizes: List[int], budget: int) -> int:
    """The largest share such that every size cut to it fits ``budget``
    in all: smaller ones keep their size, what they leave goes to the
    larger ones."""
    left, count = budget, len(sizes)
    for size in sorted(sizes):
        if size * count > left:
            return left // count
        left -= size
        count -= 1
    return max(sizes, default=0)


def trim_row(row: Dict[str, Any], share: int) -> Dict[str, Any]:
    """``row`` cut to about ``share`` bytes: its processes, then its sites,
    keeping the smallest of each (an honest process's few pools and
    holders), the ones left out counted."""
    trimmed = {**row, "trimmed": True}
    for key in ("procs", "sites"):
        items = row.get(key)
        if not items:
            continue
        if len(_line(trimmed)) <= share:
            break
        room = share - len(_line({**trimmed, key: [], f"{key}_more": 0}))
        kept = set()
        for size, index in sorted((len(_line(item)), index)
                                  for index, item in enumerate(items)):
            if size > room:
                break
            room -= size
            kept.add(index)
        trimmed[key] = [item for index, item in enumerate(items)
                        if index in kept]
        trimmed[f"{key}_more"] = (row.get(f"{key}_more", 0) + len(items)
                                  - len(kept))
    left_out = any(trimmed.get(f"{key}_more", 0) > row.get(f"{key}_more", 0)
                   for key in ("procs", "sites"))
    return trimmed if left_out else row


def attach_message(proc: connmon.ProcessState) -> Dict[str, Any]:
    """What tells a peer about one of our processes, whole."""
    return {"op": "attach", "proc": proc.describe(),
            "state": proc.message(time.monotonic())}


# ---------------------------------------------------------------------------
# 3. The cluster
# ---------------------------------------------------------------------------


FORWARD_INTERVAL = 0.2    # seconds our apps' updates gather for the peers
MAX_FORWARDS = 50_000     # updates a "forwards" batch may carry
FORWARDS_A_HOLD = 500     # a peer's forwarded updates a hold of the lock


class Cluster:
    """This node's links to the other nodes of its service.

    Our applications' updates go to the peers in batches: gathered for
    FORWARD_INTERVAL (well inside the picture's second), encoded once for
    every link, written in one go, and applied by each peer under one
    hold of its lock per FORWARDS_A_HOLD of them.  Every other message
    (an attach, a detach, the maxima) first sends the batch gathered so
    far, so that peers see our news in the order we made it.  A peer of
    an older version (that does not say "batches" in its hello or
    welcome) gets each update as a "forward" of its own, as before.
    """

    def __init__(self, server: ConnmonServer):
        self.server = server
        me = server.node.name
        self.links = {node.name: PeerLink(server, node)
                      for node in server.service.nodes if node.name != me}
        self.source: Optional[str] = None   # where our links come from
        self.forwards: List[list] = []   # [id, session, update], gathering

    def own_source(self) -> Optional[str]:
        """The local address to dial peers from: the one our hostname
        names (peers check it), if this host has it; else the system's
        choice."""
        for address in sorted(node_addresses(self.server.node)):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                with socket.socket(family) as probe:
                    probe.bind((address, 0))
                return address
            except OSError:
                continue
        log.warning("node %s: no local address is its hostname %s; peers "
                    "will refuse links that do not come from it",
                    self.server.node.name, self.server.node.address[0])
        return None

    def start(self) -> None:
        if self.links:
            self.source = self.own_source()
        for link in self.links.values():
            link.start()
        if self.links:
            threading.Thread(target=self._maxima_loop, daemon=True,
                             name="peer-maxima").start()
            threading.Thread(target=self._forward_loop, daemon=True,
                             name="peer-forwards").start()

    def _forward_loop(self) -> None:
        while True:
            time.sleep(FORWARD_INTERVAL)
            with self.server.lock:
                self.flush_forwards()

    def _maxima_loop(self) -> None:
        """Send every peer our maxima every MAXIMA_INTERVAL, not only when
        a link is made: after any partition heals, every node's maxima
        reach every other node, however the cut ran."""
        while True:
            time.sleep(MAXIMA_INTERVAL)
            with self.server.lock:
                for message in self.server.picture.maxima():
                    self.broadcast(message)

    def broadcast(self, message: Dict[str, Any]) -> None:
        """Queue a message for every peer that is up, after the updates
        gathered so far (caller holds the picture lock, so peers see our
        changes in the order we made them)."""
        self.flush_forwards()
        self._put(Outgoing([message]))

    def forward(self, ident: str, session: int,
                update: Dict[str, Any]) -> None:
        """Gather one of our app's updates for the peers (caller holds the
        picture lock)."""
        self.forwards.append([ident, session, update])
        if len(self.forwards) >= MAX_FORWARDS:
            self.flush_forwards()

    def flush_forwards(self) -> None:
        """Queue the updates gathered for every peer that is up: one
        "forwards" batch, or for a peer of an older version each its own
        "forward" (caller holds the picture lock)."""
        if not self.forwards:
            return
        items, self.forwards = self.forwards, []
        self._put(Outgoing([{"op": "forwards", "items": items}]),
                  lambda: Outgoing([{"op": "forward", "id": ident,
                                     "session": session, "update": update}
                                    for ident, session, update in items]))

    def _put(self, batched: "Outgoing", each=None) -> None:
        """Queue ``batched`` for every link that is up, or what ``each``
        makes (once) for the links to peers that take no batches."""
        unbatched = None
        for link in self.links.values():
            if link.batches or each is None:
                link.put(batched)
            else:
                unbatched = unbatched or each()
                link.put(unbatched)

    def status(self) -> Dict[str, bool]:
        return {name: link.sock is not None
                for name, link in sorted(self.links.items())}

    def check_peer(self, hello: Dict[str, Any], host: str) -> None:
        """A peer's hello must name one of the service's other nodes, and
        come from that node's address; a clear refusal otherwise."""
        service, node = hello.get("service"), hello.get("node")
        name = self.server.service.name
        if not self.links:
            raise ProtocolError(f"service {name!r} has one node: this "
                                "daemon accepts no peer")
        if service != name:
            raise ProtocolError(f"peer is of service {service!r}, this node "
                                f"of {name!r}")
        if not isinstance(node, str) or node not in self.links:
            raise ProtocolError(f"peer node {node!r} is not one of the "
                                f"other nodes of service {name!r}")
        addresses = node_addresses(self.links[node].node)
        if same_address(host) not in addresses:
            raise ProtocolError(f"peer node {node!r} connects from {host}, "
                                f"not from its address ("
                                f"{', '.join(sorted(addresses)) or 'unresolvable'})")


def same_address(host: str) -> str:
    """An IP address in one spelling (an IPv4 address mapped into IPv6 as
    the IPv4 address), so that addresses compare."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def node_addresses(node: connmon.Node) -> set:
    """The addresses a node's hostname resolves to (looked up at each
    peer's hello: a node may move)."""
    try:
        infos = socket.getaddrinfo(node.address[0], None,
                                   type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {same_address(str(info[4][0])) for info in infos}


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the port to this machine."""
    try:
        infos = socket.getaddrinfo(host or None, None,
                                   type=socket.SOCK_STREAM)
    except OSError:
        return False
    return all(ipaddress.ip_address(same_address(str(info[4][0]))).is_loopback
               for info in infos)


class Outgoing:
    """Messages queued for one or more peers: encoded once, by the first
    link's writer that sends them (outside the picture's lock)."""

    __slots__ = ("messages", "count", "_data")

    def __init__(self, messages: List[Dict[str, Any]]):
        self.messages = messages
        self.count = sum(len(m["items"]) if m["op"] == "forwards" else 1
                         for m in messages)
        self._data: Optional[bytes] = None

    def data(self) -> bytes:
        if self._data is None:
            self._data = b"".join(map(peer_lines, self.messages))
        return self._data


def peer_lines(message: Dict[str, Any]) -> bytes:
    """A message for a peer as a line; a "forwards" batch larger than a
    peer message may be as several (an app's update is under 1 MiB, a
    peer's message may be 32 MiB: halving always ends)."""
    try:
        return connmon.encode(message, MAX_PEER_MESSAGE_BYTES)
    except ProtocolError:
        items = message.get("items") if message["op"] == "forwards" else None
        if not items or len(items) < 2:
            raise
        half = len(items) // 2
        return (peer_lines({"op": "forwards", "items": items[:half]})
                + peer_lines({"op": "forwards", "items": items[half:]}))


def forwarded(message: Dict[str, Any]) -> List[Tuple[str, int,
                                                     connmon.Update]]:
    """The updates of a peer's "forwards", each checked as an app's is:
    [[id, session, update], ...], at most MAX_FORWARDS."""
    items = message.get("items")
    if not (type(items) is list and len(items) <= MAX_FORWARDS):
        raise ProtocolError(f"forwards needs 'items', a list of at most "
                            f"{MAX_FORWARDS} [id, session, update]")
    checked = []
    for item in items:
        if not (type(item) is list and len(item) == 3
                and connmon.is_text(item[0], connmon.MAX_NAME)
                and type(item[1]) is int and 0 <= item[1] < 1 << 62
                and type(item[2]) is dict
                and item[2].get("op") == "update"):
            raise ProtocolError("forwards: each item must be [id, session, "
                                "update]")
        checked.append((item[0], item[1], connmon.Update(item[2])))
    return checked


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
        self.batches = False   # whether the peer takes "forwards"
        self.outbox: collections.deque = collections.deque()
        self.queued = 0   # messages in the outbox (a batch's updates each)
        self.ready = threading.Condition(threading.Lock())

    def start(self) -> None:
        threading.Thread(target=self._write_loop, daemon=True,
                         name=f"peer-{self.node.name}-writer").start()
        if self.server.node.name < self.node.name:
            threading.Thread(target=self._dial_loop, daemon=True,
                             name=f"peer-{self.node.name}-dialer").start()

    def enqueue(self, message: Dict[str, Any]) -> None:
        """Queue a message for this peer alone."""
        self.put(Outgoing([message]))

    def put(self, outgoing: Outgoing) -> None:
        if self.sock is None:
            return   # the peer gets everything again when the link is up
        with self.ready:
            self.outbox.append(outgoing)
            self.queued += outgoing.count
            if self.queued > MAX_OUTBOX:
                log.warning("peer %s: %d messages behind; cutting the link",
                            self.node.name, self.queued)
                self._cut(self.sock)
            self.ready.notify()

    def run(self, sock: socket.socket, rfile, batches: bool) -> None:
        """Serve a new link until it ends (``batches``: the peer takes
        "forwards")."""
        server = self.server
        origin = self.node.name
        with server.lock:
            if self.sock is not None:
                self._cut(self.sock)   # a newer link replaces a stale one
            server.cluster.flush_forwards()   # news the attaches include
            server.picture.detach_origin(origin)
            self.generation += 1
            generation = self.generation
            with self.ready:
                self.sock, self.batches = sock, batches
                self.outbox.clear()
                self.outbox.append(Outgoing(server.picture.maxima() + [
                    attach_message(proc)
                    for proc in server.picture.processes.values()
                    if proc.origin == server.node.name]))
                self.queued = self.outbox[0].count
                self.ready.notify()
        log.info("peer %s: link up", origin)
        try:
            for message in requests(rfile, ROLES["peer"], self.enqueue):
                if message["op"] == "forwards":
                    if not self._apply_forwards(forwarded(message),
                                                generation):
                        break
                    continue
                with server.lock:
                    if self.generation != generation:
                        break   # replaced: only the new link's news counts
                    try:
                        self._apply(message)
                    except ProtocolError as err:   # checked whole, then
                        problems.log(   # applied: nothing of it was
                            logging.WARNING, "bad peer message",
                            "peer %s: %s; message dropped", origin,
                            brief(err))
        except ProtocolError as err:
            problems.log(logging.WARNING, "bad peer", "peer %s: %s; cutting "
                         "the link", origin, brief(err))
        except OSError as err:
            log.warning("peer %s: %s", origin, err)
        finally:
            with server.lock:
                if self.generation == generation:
                    with self.ready:
                        self.sock = None
                        self.outbox.clear()
                        self.queued = 0
                    gone = server.picture.detach_origin(origin)
                    log.info("peer %s: link down; its processes (%d) leave "
                             "the picture", origin, gone)
            self._cut(sock)

    def _apply(self, message: Dict[str, Any]) -> None:
        """Apply a peer's news to our picture (caller holds the lock)."""
        picture, op, now = self.server.picture, message["op"], \
            time.monotonic()
        if op == "attach":
            proc = process_from(message.get("proc"))
            proc.update(nested(message, "state", "state"), now)
            if (picture.by_origin[self.node.name] >= self.server.max_clients
                    and proc.ident not in picture.processes):
                raise ProtocolError(f"attach: more than max_clients "
                                    f"({self.server.max_clients}) processes")
            picture.attach(proc, self.node.name)
        elif op in ("forward", "detach"):
            ident, session = message.get("id"), message.get("session")
            if not (isinstance(ident, str)
                    and connmon.is_text(ident, connmon.MAX_NAME)
                    and type(session) is int and 0 <= session < 1 << 62):
                raise ProtocolError(f"{op} needs 'id' and 'session'")
            if op == "detach":
                picture.detach(ident, session, self.node.name)
            else:
                picture.update(ident, session, connmon.Update(
                    nested(message, "update", "update")), now,
                    self.node.name)
        elif op == "maxima":
            picture.merge_maxima(message)
        else:   # clear_maxima
            clears = message.get("clears", 0)
            if not is_count(clears):   # as merge_maxima checks it
                raise ProtocolError("clear_maxima: 'clears' must be a count")
            picture.clear_maxima()
            picture.clears = max(picture.clears, clears)

    def _apply_forwards(self, changes: List[Tuple[str, int,
                                                  connmon.Update]],
                        generation: int) -> bool:
        """Apply a peer's batch of its apps' updates (checked already), a
        few hundred a hold of the lock; False if the link was replaced."""
        picture, origin = self.server.picture, self.node.name
        for start in range(0, len(changes), FORWARDS_A_HOLD):
            now = time.monotonic()
            with self.server.lock:
                if self.generation != generation:
                    return False
                for ident, session, change in changes[
                        start:start + FORWARDS_A_HOLD]:
                    picture.update(ident, session, change, now, origin)
        return True

    def _write_loop(self) -> None:
        """Write what is queued; on a quiet link, a ping every third of the
        heartbeat timeout, so that the peer's reads never time out while
        both nodes live (and do when one is stopped or cut off)."""
        while True:
            with self.ready:
                if not self.outbox:
                    self.ready.wait(self.server.heartbeat / 3)
                sock = self.sock
                batch = list(self.outbox) or [Outgoing([PING])]
                self.outbox.clear()
                self.queued = 0
            if sock is None:
                continue
            try:
                sock.sendall(b"".join(item.data() for item in batch))
            except (OSError, ProtocolError) as err:
                problems.log(logging.WARNING, "peer send", "peer %s: cannot "
                             "send: %s", self.node.name, brief(err))
                self._cut(sock)

    def _dial_loop(self) -> None:
        """Keep a link to the peer up, retrying with backoff."""
        delay = 0.0
        while True:
            try:
                conn = connmon.open_connection(
                    [self.node.address], "peer",
                    security=self.server.security,
                    source=self.server.cluster.source,
                    service=self.server.service.name,
                    node=self.server.node.name, batches=True)
                conn.sock.settimeout(self.server.heartbeat)
                delay = 0.0
                self.run(conn.sock, conn.rfile,
                         conn.welcome.get("batches") is True)
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
# 4. Daemon options: what a service section says beyond name and nodes
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
    picture = Picture()
    picture.attach(connmon.ProcessState("x", "host", "prog", 1), "")
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


# Everything a service section may say: the options the applications
# read too (connmon.SERVICE_OPTIONS), and connmond's own.
OPTIONS: Dict[str, connmon.Option] = {
    **connmon.SERVICE_OPTIONS,
    "heartbeat_timeout": connmon.Option(connmon.number_between(
        connmon.MIN_HEARTBEAT, connmon.MAX_HEARTBEAT, " of seconds"),
        f"{connmon.DEFAULT_HEARTBEAT:g}"),
    # about 280 MB of connmond at most
    "max_clients": connmon.Option(connmon.number_between(
        1, 1 << 20, whole=True), "10000"),
    # what the clients' state may cost before new apps are refused
    "max_client_memory": connmon.Option(connmon.number_between(
        16, 1 << 20, " of megabytes", whole=True), "512"),
    # apps from one source address; by default a quarter of max_clients
    "max_clients_per_address": connmon.Option(connmon.number_between(
        1, 1 << 20, whole=True)),
    # rows of programs gone this long are forgotten
    "forget_gone_after": connmon.Option(connmon.number_between(
        1, 1e8, " of seconds"), "86400"),
    # HOLD_MS above this many milliseconds is an alarm on the console
    "hold_ms_warn": connmon.Option(connmon.number_between(
        0.1, 3.6e6, " of milliseconds"), f"{connmon.DEFAULT_HOLD_MS_WARN:g}"),
    "metrics_port": connmon.Option(_port),
    "metrics_bind": connmon.Option(_bind_host),
    "csv_dump": connmon.Option(connmon.any_text),
    "csv_columns": connmon.Option(_columns, "time token hostname progname "
                                  "nproc conn ckout maxnproc maxconn "
                                  "maxckout ckout_total"),
    "csv_token": connmon.Option(connmon.any_text),
    "csv_interval": connmon.Option(_seconds, "10"),
    # a bearer token /metrics asks for (read by connmond only)
    "metrics_token_file": connmon.Option(connmon.read_secret),
    # what the nodes prove to each other (read by connmond only: app
    # hosts do not hold it); see connmon.Security.of_service
    "peer_secret_file": connmon.Option(connmon.any_text),
    "peer_secret": connmon.Option(connmon.any_text),
    # what consoles prove, if not the apps' secret (read by connmond and
    # the consoles only: then app hosts cannot read the picture)
    "console_secret_file": connmon.Option(connmon.any_text),
    "console_secret": connmon.Option(connmon.any_text),
    # the database servers' own connection limits (docs/pool-pressure.txt)
    "database_servers": connmon.Option(_server_limits),
}


class DaemonOptions:
    """Every option of a service section, checked at start (and by
    --check-config): a typo stops the daemon with a message, never
    silently switches an export off or leaves every application failing
    at create_engine()."""

    hold_warn_seconds: float
    checkout_sites: bool
    report_endpoints: bool
    heartbeat_timeout: float
    max_clients: int
    max_clients_per_address: Optional[int]
    max_client_memory: int
    forget_gone_after: float
    hold_ms_warn: float
    metrics_port: Optional[int]
    metrics_bind: str
    csv_dump: Optional[str]
    csv_columns: List[str]
    csv_token: str
    csv_interval: float
    metrics_token_file: Optional[bytes]   # the token itself, once read
    peer_secret_file: Optional[str]
    peer_secret: Optional[str]
    console_secret_file: Optional[str]
    console_secret: Optional[str]
    database_servers: Optional[Dict[str, int]]

    def __init__(self, service: connmon.Service, node: connmon.Node):
        problems = self.problems(service)
        if problems:
            raise problems[0]
        for name in OPTIONS:
            setattr(self, name, connmon.option_value(service, name, OPTIONS))
        # The fleet's picture stays on this host unless the operator says.
        self.metrics_bind = self.metrics_bind or (
            "::1" if ":" in node.bind[0] else "127.0.0.1")
        self.csv_token = self.csv_token or ""

    # option -> the option it goes with
    NEEDS = {"metrics_bind": "metrics_port", "csv_columns": "csv_dump",
             "csv_token": "csv_dump", "csv_interval": "csv_dump",
             "metrics_token_file": "metrics_port"}

    @classmethod
    def problems(cls, service: connmon.Service) -> List[connmon.ConfigError]:
        """Every mistake in the options of ``service``: unknown or invalid
        options, an option without the one it goes with."""
        problems = connmon.option_problems(service, OPTIONS)
        given = {name: bool(service.options.get(name, "").strip())
                 for name in OPTIONS}
        for name, needed in cls.NEEDS.items():
            if given[name] and not given[needed]:
                problems.append(service.mistake(
                    name, f"{name} is set but {needed} is not"))
        return problems

    @staticmethod
    def missing_directories(service: connmon.Service
                            ) -> List[connmon.ConfigError]:
        """A CSV file in a directory that does not exist: a mistake for
        --check-config, while a running daemon waits for the directory
        (one log line; a mount may come later)."""
        path = service.options.get("csv_dump", "").strip()
        directory = os.path.dirname(os.path.abspath(path)) if path else ""
        if directory and not os.path.isdir(directory):
            return [service.mistake("csv_dump", f"csv_dump: directory "
                                    f"{directory} does not exist")]
        return []


# ---------------------------------------------------------------------------
# 5. Prometheus: GET /metrics
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


MAX_METRICS_CLIENTS = 16   # /metrics and /healthz requests served at once
METRICS_DEADLINE = 10.0    # seconds one may take, from connect to reply


class MetricsServer(socketserver.ThreadingTCPServer):
    """``GET /metrics`` and ``GET /healthz`` for one ConnmonServer.

    A plain TCP server under ``http.server``'s handler: HTTPServer would
    look the bind address up in DNS at start.  At most MAX_METRICS_CLIENTS
    are served at once, each for at most METRICS_DEADLINE seconds in all,
    however slowly it trickles its request: scrapers cannot hold threads
    and descriptors connmond needs for its clients.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: connmon.Address, daemon: ConnmonServer,
                 token: Optional[bytes] = None):
        self.daemon = daemon
        self.token = token
        self.slots = threading.BoundedSemaphore(MAX_METRICS_CLIENTS)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, MetricsHandler)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            problems.log(logging.WARNING, "metrics full", "metrics: %s: "
                         "refused: %d requests served already",
                         connmon.format_address(client_address[:2]),
                         MAX_METRICS_CLIENTS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:   # no thread to be had
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class MetricsHandler(http.server.BaseHTTPRequestHandler):
    server: MetricsServer
    timeout = METRICS_DEADLINE

    def setup(self) -> None:
        """Read and reply under the request's whole deadline (http.server
        reads with readline alone)."""
        super().setup()
        self.deadline = time.monotonic() + METRICS_DEADLINE
        self.rfile.close()
        self.rfile = LineReader(self.connection, self.deadline)

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        token = self.server.token
        if path == "/metrics" and token is not None and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(
                    "utf-8", "surrogateescape"), b"Bearer " + token):
            self.reply(401, "connmond: /metrics needs the bearer token of "
                       "metrics_token_file\n")
        elif path == "/metrics":
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
        data = body.encode("utf-8", "backslashreplace")   # never stuck
        self.connection.settimeout(max(0.001,
                                       self.deadline - time.monotonic()))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics: %s %s", self.address_string(), format % args)


# ---------------------------------------------------------------------------
# 6. CSV dump
# ---------------------------------------------------------------------------


# What a spreadsheet reads as a formula at the start of a cell.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: Any) -> Any:
    """A value as the CSV holds it: a text that a spreadsheet would run
    as a formula (a program named =HYPERLINK(...)) starts with a quote."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
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
        self.path: str = options.csv_dump or ""   # (made when it is set)
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
        with open(self.path, "a+", encoding="utf-8", newline="",
                  errors="backslashreplace") as file:
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
# 7. Command line
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
        "from connmon-enabled SQLAlchemy applications.",
        epilog="The manual: docs/ in connmon's source (README.txt lists it).")
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
                        help="check the config for this service and node "
                        "(every option, the applications' too), say OK or "
                        "what is wrong, and exit")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {connmon.__version__}")
    return parser


def configure_logging(path: Optional[str], level: Optional[str]) -> None:
    """Log to stderr, or as the config file's ``[loggers]``, ``[handlers]``
    and ``[formatters]`` sections say (the ``logging.config.fileConfig``
    format).  ``--log-level`` sets the root logger's level either way."""
    sections = configparser.ConfigParser(interpolation=None)
    if path:
        sections.read(path, encoding="utf-8")   # readable: parsed already
    if path and {"loggers", "handlers", "formatters"} & set(
            sections.sections()):
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


def warn_exposure(server: ConnmonServer, options: DaemonOptions) -> None:
    """Say plainly, once, what a daemon open to the network lets anyone
    there do."""
    for warning in exposure_warnings(server.service, server.node,
                                     server.security, options):
        log.warning("%s", warning)


def exposure_warnings(service: connmon.Service, node: connmon.Node,
                      security: connmon.Security,
                      options: DaemonOptions) -> List[str]:
    """What a daemon open to the network lets anyone there do, and the
    secret files others may read (start-up logs it, --check-config prints
    it)."""
    warnings = []
    if not is_loopback(node.bind[0]) and security.secret is None:
        warnings.append(
            f"listening on {connmon.format_address(node.bind)} without "
            "auth_secret_file: anyone who can reach this port can read every "
            "process's host and program names and counts, add processes and "
            "rows of their own, and clear the maxima"
            + ("" if security.peer_secret else ", and, from a node's "
               "address, act as that node") + " (see docs/security.txt)")
    if (options.metrics_port and options.metrics_token_file is None
            and not is_loopback(options.metrics_bind)):
        warnings.append(
            "serving /metrics on " + connmon.format_address(
                (options.metrics_bind, options.metrics_port))
            + " without metrics_token_file: anyone who can reach it reads "
            "the fleet's picture")
    return warnings + connmon.loose_secret_files(service.options)


def raise_file_limit(clients: int) -> None:
    """Let connmond hold every connection it may serve: the soft limit on
    open files is often 1024, the hard one much higher."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = clients + 64   # and a few for the rest
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open files are limited to %d: fewer than the %d "
                        "connections connmond may serve at once (max_clients"
                        " apps and room for consoles, peers and hellos; "
                        "raise LimitNOFILE)", new, clients)


def check_config(args: argparse.Namespace) -> int:
    """--check-config: every mistake of the file, each as ``FILE:LINE:
    [SECTION] problem`` on stderr, then the warnings start-up would log;
    or OK and what the daemon would do, on stdout."""
    path = connmon.config_file(args.config)
    source = path or connmon.BUILT_IN
    try:
        text = connmon.DEFAULT_CONFIG_TEXT
        if path is not None:
            with open(path, encoding="utf-8") as file:
                text = file.read()
    except (OSError, UnicodeDecodeError) as err:
        print(f"connmond: error: cannot read config file {path}: {err}",
              file=sys.stderr)
        return 2
    services, problems = connmon.read_config(text, source)
    service = services.get(args.service)
    node = options = security = None
    if service is None:
        if not problems or services:
            known = ", ".join(sorted(services)) or "none"
            problems.append(connmon.ConfigError(
                f"{source}: unknown service {args.service!r} (services: "
                f"{known})"))
    else:
        problems += DaemonOptions.problems(service)
        problems += DaemonOptions.missing_directories(service)
        try:
            node = choose_node(service, args.node)
            security = connmon.Security.of_service(service, daemon=True)
            security.server_context()
        except connmon.ConfigError as err:
            problems.append(err)
        if not problems and node is not None:
            options = DaemonOptions(service, node)
    try:
        configure_logging(path, args.log_level)
    except connmon.ConfigError as err:
        problems.append(err)
    except configparser.Error:
        pass   # a file that is not 'option: value' lines: said already
    for problem in problems:
        print(f"connmond: error: {problem.located()}", file=sys.stderr)
    if (problems or service is None or node is None or security is None
            or options is None):   # (each None has said its problem)
        return 2
    for warning in exposure_warnings(service, node, security, options):
        print(f"connmond: warning: {service.file or source}: "
              f"[{service.section}] {warning}", file=sys.stderr)
    print(f"connmond: config OK: {source} service {service.name!r}: "
          f"{describe(node, options)}")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_config:
        return check_config(args)
    path = connmon.config_file(args.config)
    try:
        service = connmon.find_service(args.service, args.config)
        node = choose_node(service, args.node)
        options = DaemonOptions(service, node)
        connmon.Security.of_service(service, daemon=True).server_context()
        configure_logging(path, args.log_level)
    except connmon.ConfigError as err:
        print(f"connmond: error: {err}", file=sys.stderr)
        return 2
    # SIGTERM stops it like Ctrl-C from here on, even while it starts.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, lambda *_: log.warning(
        "SIGHUP ignored: connmond reloads nothing; restart it to read "
        "the config again"))
    metrics = None
    address = node.bind
    try:
        server = ConnmonServer(service, node, options)
        if options.metrics_port:
            address = (options.metrics_bind, options.metrics_port)
            metrics = MetricsServer(address, server,
                                    options.metrics_token_file)
    except connmon.ConfigError as err:
        print(f"connmond: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"connmond: error: cannot listen on "
              f"{connmon.format_address(address)}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        log.info("connmond stopping")
        return 0
    metrics_thread = threading.Thread(
        target=metrics.serve_forever if metrics else None, daemon=True,
        name="connmond-metrics")
    try:
        if metrics is not None:
            metrics_thread.start()
        if options.csv_dump:
            threading.Thread(target=CsvDump(server, options).run,
                             daemon=True, name="connmond-csv").start()
        threading.Thread(target=server.keep_history, daemon=True,
                         name="connmond-history").start()
        raise_file_limit(server.door.most_clients)
        log.info("connmond %s: service %r %s", connmon.__version__,
                 service.name, describe(node, options))
        warn_exposure(server, options)
        server.cluster.start()
        server.serve_forever()
    except KeyboardInterrupt:
        log.info("connmond stopping")
    finally:
        server.server_close()
        if metrics is not None:
            if metrics_thread.is_alive():   # (shutdown waits for it)
                metrics.shutdown()
            metrics.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
