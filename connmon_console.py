"""connmon: the console that shows what connmond knows.

``connmon`` draws a live, ``top``-like screen with curses: one row per
host+program (or per program over every host: the fleet view), refreshed
every ``-i`` seconds, with htop's keys (F1 lists them).  Its columns fit
the screen (``plan``): names first, whole numbers only, the least useful
columns dropped first; cells above the daemon's thresholds carry a
marker.  ``connmon --once`` prints one snapshot as a plain table and
``--once --json`` as JSON.  ``connmon --demo`` starts a private connmond and
a few demo applications and watches them: the no-setup way to see it work.

Run ``connmon`` or ``python -m connmon_console``.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import ctypes
import functools
import curses
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
from typing import (Any, Callable, Dict, Iterable, List, NamedTuple, Optional,
                    Tuple)

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
            self.security = connmon.Security.of_service(
                self.service, args.secret_file, console=True)
            self.security.client_context()   # fail now on a bad TLS file

    def addresses(self) -> List[connmon.Address]:
        if self.service is None:
            return [self.address]
        return connmon.candidate_addresses(self.service, self.node)

    def connect(self, timeout: float = 5.0) -> connmon.Connection:
        return connmon.open_connection(self.addresses(), "console",
                                       timeout=timeout,
                                       security=self.security)


def one_cell(text: str) -> str:
    """``text`` with every character a terminal draws in other than one
    cell written as its escape (wide ones, "\\u30c7", take two; combining
    marks none): the columns are laid out a character a cell, and a name
    with combining marks must not pass for another."""
    if text.isascii():
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.east_asian_width(char) in ("W", "F")
        or unicodedata.category(char) in ("Mn", "Me") else char
        for char in text)


def escaped(value: Any) -> Any:
    """``value`` (a snapshot) with every text made safe to print: the
    daemon refuses control characters at its door, and this is the second
    line of defence, against an older or a broken daemon.  And one cell a
    character (see one_cell)."""
    if isinstance(value, str):
        return one_cell(connmon.printable(value))
    if isinstance(value, list):
        return [escaped(item) for item in value]
    if isinstance(value, dict):
        return {key: escaped(item) for key, item in value.items()}
    return value


def trimmed_text(snapshot: Dict[str, Any]) -> str:
    """What connmond left out of a reply too large to send whole: rows,
    and the lists (processes, sites) of the rows it cut, named."""
    parts = []
    if snapshot.get("trimmed"):
        parts.append(f"{snapshot['trimmed']} rows not shown")
    cut = [row["progname"] for row in snapshot.get("rows", ())
           if row.get("trimmed")]
    if cut:
        parts.append("lists cut in " + ", ".join(cut[:3])
                     + (f" and {len(cut) - 3} more" if len(cut) > 3 else ""))
    return ("TRIMMED: " + "; ".join(parts) + " (the reply would be too "
            "large)" if parts else "")


def fetch_snapshot(target: Target, timeout: float = 5.0,
                   procs: bool = False) -> Dict[str, Any]:
    conn = target.connect(timeout)
    try:
        snapshot = conn.request({"op": "snapshot", "procs": procs})
    finally:
        conn.close()
    del snapshot["op"]
    return snapshot


# ---------------------------------------------------------------------------
# Tables: shared by --once and the live screen
# ---------------------------------------------------------------------------

# An alarm's marker, drawn just left of the number it is about, so that a
# row that needs a look stands out without colour too.
ABOVE = "!"        # above its threshold, or a pool exhausted
LEAKED = "*"       # a long holder leaked for sure (leaked, thread gone)

# What a snapshot from a daemon that sends no "thresholds" is judged by.
DEFAULT_THRESHOLDS = {"oldest": connmon.DEFAULT_HOLD_WARN,
                      "hold_ms": connmon.DEFAULT_HOLD_MS_WARN}


def above(key: str) -> Callable[[Dict[str, Any], Dict[str, float]], str]:
    """The alarm of a number column with a threshold in the snapshot's
    "thresholds" (the daemon's hold_warn_seconds and hold_ms_warn)."""
    def alarm(row: Dict[str, Any], thresholds: Dict[str, float]) -> str:
        value = row.get(key)
        return ABOVE if value is not None and value > thresholds[key] else ""
    return alarm


oldest_above = above("oldest")


def oldest_alarm(row: Dict[str, Any], thresholds: Dict[str, float]) -> str:
    return LEAKED if leaked(row) else oldest_above(row, thresholds)


def exhausted_alarm(row: Dict[str, Any], _: Dict[str, float]) -> str:
    return ABOVE if row.get("exhausted") else ""


def waiting_alarm(row: Dict[str, Any], _: Dict[str, float]) -> str:
    """Threads wait for a connection: the pool pressure's alarm."""
    return ABOVE if row.get("waiting") else ""


def timeouts_alarm(row: Dict[str, Any], _: Dict[str, float]) -> str:
    """Checkouts gave up waiting within the last TIMEOUT_WINDOW seconds."""
    return ABOVE if row.get("timeouts_recent") else ""


def near_limit_alarm(row: Dict[str, Any], _: Dict[str, float]) -> str:
    """A database server's connections at NEAR_LIMIT % of its
    max_connections or over."""
    percent = row.get("use_percent")
    return ABOVE if percent is not None and percent >= NEAR_LIMIT else ""


def over_server_alarm(row: Dict[str, Any], _: Dict[str, float]) -> str:
    """The pools' summed limits exceed the database server's own."""
    return ABOVE if row.get("over_server") else ""


LEAK_VERDICTS = ("leaked", "thread gone")   # the app's "held_at" for sure


def is_leak(holder: Dict[str, Any]) -> bool:
    """Whether the application judged a long holder a leak for sure:
    "leaked" or "thread gone" (a task's verdict adds its name: "leaked
    (task Task-12)")."""
    return (holder.get("held_at") or "").startswith(LEAK_VERDICTS)


def leaked(row: Dict[str, Any]) -> bool:
    """Whether a long holder of the row's connections is a leak for sure:
    one of its own (a process, a site) or of its sites' (a program)."""
    return any(map(is_leak, row.get("long_holders") or ())) or any(
        is_leak(holder) for site in row.get("sites") or ()
        for holder in site.get("long_holders", ()))


def holder_alarm(holder: Dict[str, Any], _: Dict[str, float]) -> str:
    """A long holder is past hold_warn_seconds: a leak for sure, or a
    look."""
    return LEAKED if is_leak(holder) else ABOVE


class Column:
    """One column of a table.

    ``kind`` is "text" (left-aligned, as wide as the screen allows, cut in
    the middle with a mark), "number" (right-aligned, as wide as its
    heading or its widest visible value: never cut) or "location"
    ("file.py:123 in func": cut from the left, its end tells lines apart;
    it takes what the other columns leave).  ``keep`` orders dropping on
    a narrow screen: the lowest goes first.  ``descending`` is the sort
    order a column starts with (by default numbers biggest first, as in
    top, and names from A).
    ``alarm`` gives a row's marker for this cell ("" when calm).  A text
    column is at least ``width`` wide and at most ``most`` (longer names
    are cut); a location takes what the other columns leave.
    """

    def __init__(self, heading: str, key: str, kind: str = "number",
                 keep: int = 50, width: int = 0, most: int = 0,
                 descending: Optional[bool] = None,
                 alarm: Optional[Callable[[Dict[str, Any], Dict[str, float]],
                                          str]] = None,
                 show: Optional[Callable[[Any], str]] = None):
        self.heading = heading
        self.key = key
        self.kind = kind
        self.text = kind != "number"
        self.keep = keep
        self.min_width = width or (len(heading) + 2)
        self.most = most or (1 << 20)   # a text column's widest
        self.descending = (kind == "number" if descending is None
                           else descending)
        self.alarm = alarm
        self.show = show or cell

    def value(self, row: Dict[str, Any]) -> Any:
        """The row's value; None ("-") for a key a snapshot lacks (one
        from an older daemon)."""
        return row.get(self.key)

    def sort_key(self, row: Dict[str, Any]) -> Any:
        """Order rows by this column; "-" (None) below every number."""
        value = self.value(row)
        return value if self.text else (value is not None, value or 0)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value < 1e5 else str(int(value))
    return str(value)


def duration(seconds: Any) -> str:
    """An age as people read it: seconds to a tenth under a minute, then
    5m44s, 2h05m, 3d04h (top's and htop's habit)."""
    if not isinstance(seconds, (int, float)):
        return cell(seconds)
    if seconds < 60:
        return cell(float(seconds))
    whole = int(seconds)
    for unit, small, name, small_name in ((86400, 3600, "d", "h"),
                                          (3600, 60, "h", "m"),
                                          (60, 1, "m", "s")):
        if whole >= unit:
            return (f"{whole // unit}{name}"
                    f"{whole % unit // small:02d}{small_name}")
    return cell(seconds)


def since_text(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


CUT_MARK = "\N{HORIZONTAL ELLIPSIS}"   # where a name lost characters

# A column kept less than this goes before any name is cut.
NAMES_FIRST = 90

# The main table.  keep: MAX* go first on a narrow screen, then the rates,
# LIMIT and NPROC (all before a name is cut); then CONN, CKOUT and OLDEST
# (the leak finder), and the names last.
COLUMNS = [
    Column("HOSTNAME", "hostname", "text", keep=96, width=7, most=21),
    Column("PROGNAME", "progname", "text", keep=100, width=9, most=29),
    Column("NPROC", "nproc", keep=50),
    Column("CONN", "conn", keep=92),
    Column("CKOUT", "ckout", keep=95, alarm=exhausted_alarm),
    Column("LIMIT", "limit", keep=40),
    Column("WAIT", "waiting", keep=89, alarm=waiting_alarm),
    Column("TMOUT/S", "timeouts_recent", keep=85, alarm=timeouts_alarm),
    Column("MAXNPROC", "maxnproc", keep=10),
    Column("MAXCONN", "maxconn", keep=30),
    Column("MAXCKOUT", "maxckout", keep=20),
    Column("CKOUT/S", "ckout_per_sec", keep=35),
    Column("HOLD_MS", "hold_ms", keep=45, alarm=above("hold_ms")),
    Column("OLDEST", "oldest", keep=95, alarm=oldest_alarm, show=duration),
]

PROC_COLUMNS = [
    Column("HOSTNAME", "hostname", "text", keep=60, width=7),
    Column("PID", "pid", keep=100),
    Column("CONN", "conn", keep=80),
    Column("CKOUT", "ckout", keep=90, alarm=exhausted_alarm),
    Column("LIMIT", "limit", keep=40),
    Column("WAIT", "waiting", keep=85, alarm=waiting_alarm),
    Column("MAXCONN", "maxconn", keep=30),
    Column("MAXCKOUT", "maxckout", keep=20),
    Column("MAXWAIT", "maxwaiting", keep=25),
    Column("OLDEST", "oldest", keep=90, alarm=oldest_alarm, show=duration),
    Column("CONNECTED SINCE", "since", "text", keep=10, show=since_text),
]

# The drill-down's pools: each process's engines and their databases.
POOL_COLUMNS = [
    Column("PID", "pid", keep=100),
    Column("POOL", "pool", keep=60),
    Column("CONN", "conn", keep=80),
    Column("CKOUT", "ckout", keep=90),
    Column("WAIT", "waiting", keep=85, alarm=waiting_alarm),
    Column("LIMIT", "limit", keep=40),
    Column("DATABASE", "endpoint", "location", keep=70, width=10,
           show=lambda endpoint: endpoint_text(endpoint)),
]

# The databases view: per database server, its total, its databases and
# the programs holding its connections (their host in a cell of its own).
# Its numbers are what it is for: a name is cut before any of them goes,
# but MAX_CONN (USE% says it) and NPROC go before a name is cut.
DATABASE_COLUMNS = [
    Column("SERVER", "hostname", "text", keep=100, width=15),
    Column("DATABASE / PROGRAM", "progname", "text", keep=99, width=9),
    Column("HOST", "host", "text", keep=98, width=6),
    Column("CONN", "conn", keep=97, alarm=near_limit_alarm),
    Column("USE%", "use_percent", keep=96, alarm=near_limit_alarm),
    Column("CKOUT", "ckout", keep=96),
    Column("WAIT", "waiting", keep=95, alarm=waiting_alarm),
    Column("LIMIT", "limit", keep=94, alarm=over_server_alarm),
    Column("MAX_CONN", "max_connections", keep=60),
    Column("NPROC", "nproc", keep=70),
]

# The drill-down's long holders: connections held past the apps'
# hold_warn_seconds, with where they were checked out and what they are
# now: held at a line, "leaked" or "thread gone" (see docs/leaks.txt).
HOLDER_COLUMNS = [
    Column("PID", "pid", keep=100),
    Column("AGE", "age", keep=100, alarm=holder_alarm, show=duration),
    Column("SITE", "site", "location", keep=90, width=10),
    Column("HELD AT", "held_at", "location", keep=80, width=10),
]

# The alarms view: every alarm the header's alarm line names.
ALARM_COLUMNS = [
    Column("HOSTNAME", "hostname", "text", keep=90, width=7),
    Column("PROGNAME", "progname", "text", keep=95, width=9),
    Column("ALARM", "alarm", "location", keep=100, width=10),
]

# The sites view: every program's checkout sites, for the whole fleet.
SITE_COLUMNS = [
    Column("HOSTNAME", "hostname", "text", keep=60, width=7),
    Column("PROGNAME", "progname", "text", keep=90, width=9),
    Column("HELD", "held", keep=100),
    Column("OLDEST", "oldest", keep=80, alarm=oldest_alarm, show=duration),
    Column("SITE", "site", "location", keep=100, width=12),
]

Layout = List[Tuple[Column, int]]


def plan(columns: List[Column], width: int, rows: List[Dict[str, Any]],
         visible: List[Dict[str, Any]]) -> Layout:
    """The columns that fit ``width``, each whole, and their widths.

    A number column is as wide as its heading or its widest value among
    the ``visible`` rows (plus a marker and a space), so no number is ever
    cut.  Names come first: columns kept less than NAMES_FIRST go, the
    lowest ``keep`` first, until the names fit whole (up to their
    ``most``); then names shrink to their least, and columns (names
    among them) go in ``keep`` order until the rest fits.  Spare room
    widens the names again, then the locations share what is left.
    """
    widths = whole_widths(columns, rows, visible)
    whole = dict(widths)
    longest = {c: min(c.most, widths[c]) for c in columns if c.text}
    for column in longest:
        widths[column] = max(column.min_width, longest[column]) if (
            column.kind == "text") else max(column.min_width, min(
                whole[column], location_floor(column, rows)))
    kept = list(columns)

    def too_wide() -> bool:
        return len(kept) > 1 and sum(widths[c] for c in kept) > width

    while too_wide() and min(c.keep for c in kept) < NAMES_FIRST:
        kept.remove(min(kept, key=lambda c: c.keep))
    if too_wide():
        for column in kept:
            if column.text:
                widths[column] = column.min_width
        while too_wide():
            kept.remove(min(kept, key=lambda c: c.keep))
    spare = width - sum(widths[c] for c in kept)
    for column in sorted((c for c in kept if c.kind == "text"),
                         key=lambda c: -c.keep):
        grow = max(0, min(spare, longest[column] - widths[column]))
        widths[column] += grow
        spare -= grow
    # Each location as wide as its longest text, if there is room: fair
    # shares, the least needing first (the last takes what is left).
    locations = sorted((c for c in kept if c.kind == "location"),
                       key=lambda c: whole[c] - widths[c])
    for left, column in zip(range(len(locations), 0, -1), locations):
        grow = spare if left == 1 else min(spare // left,
                                           whole[column] - widths[column])
        widths[column] += grow
        spare -= grow
    return [(column, widths[column]) for column in kept]


def location_floor(column: Column, rows: List[Dict[str, Any]]) -> int:
    """The least width of a location column: its line numbers and
    functions whole (see cut_location)."""
    return max((len(place_tail(column.show(column.value(row))))
                for row in rows), default=0) + len(CUT_MARK) + 1


def whole_widths(columns: List[Column], rows: List[Dict[str, Any]],
                 visible: List[Dict[str, Any]]) -> Dict[Column, int]:
    """The width each column needs to show every value whole: a number
    among the ``visible`` rows with its marker, a name among all."""
    widths = {}
    for column in columns:
        values = rows if column.text else visible
        widths[column] = max([len(column.heading) + column.text] + [
            len(column.show(column.value(row))) for row in values]) + 1 + (
                not column.text)
    return widths


def natural(columns: List[Column], rows: List[Dict[str, Any]]) -> Layout:
    """Widths for plain text: every column, nothing cut."""
    widths = whole_widths(columns, rows, rows)
    return [(column, widths[column]) for column in columns]


class Cutter:
    """Cuts a column's names to a width so that they stay told apart:
    the cut (one mark) goes where it leaves every name different, near a
    third of the way in when that works ("nova-c…ute" / "nova-c…tor",
    "neut…p-agent" / "neut…3-agent").  Remembered per set of names and
    width, so a refresh of a thousand rows does not search again."""

    def __init__(self, mark: str = CUT_MARK):
        self.mark = mark
        self.cache: Dict[tuple, Dict[str, str]] = {}

    def cuts(self, names: Iterable[str], room: int) -> Dict[str, str]:
        """name -> how it is shown in ``room`` characters (only the names
        that need cutting are in it)."""
        names = frozenset(names)
        key = (names, room)
        found = self.cache.get(key)
        if found is None:
            if len(self.cache) > 64:
                self.cache.clear()
            found = self.cache[key] = self._search(names, room)
        return found

    def _search(self, names: frozenset, room: int) -> Dict[str, str]:
        long = [name for name in names if len(name) > room]
        if not long or room <= len(self.mark):
            return {name: name[:room] for name in long}
        kept = room - len(self.mark)
        short = names.difference(long)
        best: Optional[Dict[str, str]] = None
        for head in sorted(range(kept + 1), key=lambda h: abs(h - kept // 3)):
            cut = {name: self.cut(name, head, kept - head) for name in long}
            if len(set(cut.values()) | short) == len(names):
                return cut
            best = best or cut
        return best or {}

    def cut(self, name: str, head: int, tail: int) -> str:
        return name[:head] + self.mark + (name[len(name) - tail:] if tail
                                          else "")


# Where a location's line begins: "…/nova/db/api.py:123 in api_get".
PLACE_LINE = re.compile(r".*(:[0-9]+ in )", re.DOTALL)


def place_tail(text: str) -> str:
    """A location's line and function (and what follows them), or ""."""
    found = PLACE_LINE.match(text)
    return text[found.start(1):] if found else ""


def cut_location(text: str, room: int, mark: str) -> str:
    """A location loses the beginning of its path, never its line and
    function (the column is made wide enough for them: see plan); on a
    screen too narrow even for those, their beginning is what shows."""
    if len(text) <= room:
        return text
    tail = place_tail(text)
    if room < len(mark) + len(tail):
        return tail[:room] if tail else text[:room]
    return mark + text[len(text) - room + len(mark):]


def format_cells(layout: Layout, texts: List[str],
                 marks: Optional[List[str]] = None) -> str:
    """One line of ``layout``: text left-aligned, numbers right-aligned
    with their marker (or the sort arrow) just left of them and a space
    after; every cell fits its width (the caller cut the texts)."""
    out = []
    for index, ((column, width), text) in enumerate(zip(layout, texts)):
        if column.text:
            out.append(text[:width - 1].ljust(width))
        else:
            mark = marks[index] if marks else ""
            out.append((mark + text).rjust(width - 1) + " ")
    return "".join(out)


class Formatter:
    """Formats rows for one layout: names cut (told apart), markers by
    the alarms of the snapshot's thresholds."""

    def __init__(self, layout: Layout, rows: List[Dict[str, Any]],
                 thresholds: Dict[str, float], cutter: Cutter):
        self.layout = layout
        self.thresholds = thresholds
        self.mark = cutter.mark
        self.cuts = [cutter.cuts((column.show(column.value(row))
                                  for row in rows), width - 1)
                     if column.kind == "text" else None
                     for column, width in layout]

    def texts(self, row: Dict[str, Any]) -> List[str]:
        texts = []
        for (column, width), cuts in zip(self.layout, self.cuts):
            text = column.show(column.value(row))
            if cuts is not None:
                text = cuts.get(text, text)
            elif column.kind == "location":
                text = cut_location(text, width - 1, self.mark)
            texts.append(text)
        return texts

    def marks(self, row: Dict[str, Any]) -> List[str]:
        return [column.alarm(row, self.thresholds) if column.alarm else ""
                for column, _ in self.layout]

    def line(self, row: Dict[str, Any]) -> str:
        return format_cells(self.layout, self.texts(row), self.marks(row))


def headings(layout: Layout, mark: str = CUT_MARK) -> str:
    return format_cells(layout, [
        column.heading if len(column.heading) < width
        else column.heading[:max(0, width - 1 - len(mark))] + mark
        for column, width in layout])


def thresholds_of(snapshot: Dict[str, Any]) -> Dict[str, float]:
    return {**DEFAULT_THRESHOLDS, **(snapshot.get("thresholds") or {})}


def summary_words(snapshot: Dict[str, Any]) -> List[str]:
    """The header's totals, each a word that is never cut (see pack): now
    and at most, the checkouts a second, the timeouts a second over the
    last TIMEOUT_WINDOW seconds, the fullest database server against its
    max_connections; and since when the maxima run."""
    words = [
        f"Hosts {snapshot['hosts']}/{snapshot['max_hosts']}",
        f"Procs {snapshot['processes']}/{snapshot['max_processes']}",
        f"Conn {snapshot['connections']}/{snapshot['max_connections']}",
        f"Ckout {snapshot['checkouts']}/{snapshot['max_checkouts']} "
        f"{cell(snapshot['checkouts_per_sec'])}/s",
        f"Wait {snapshot.get('waiting', 0)}/"
        f"{snapshot.get('max_waiting', 0)}",
        f"Tmout {cell(snapshot.get('timeouts_recent', 0))}/s",
    ]
    fullest = fullest_server(snapshot)
    if fullest is not None:
        words.append(f"Fullest DB {server_text(fullest)} "
                     f"{fullest['conn']}/{fullest['max_connections']} "
                     f"{server_percent(fullest)}%")
    since = snapshot.get("max_since")
    if since:
        words.append("max since "
                     + time.strftime("%H:%M", time.localtime(since)))
    return words


def pack(words: List[str], width: int, lines: int = 1 << 20) -> List[str]:
    """``words`` in at most ``lines`` lines of ``width``, two spaces apart,
    each word whole (one wider than a line is cut at its end, its start
    says what it is); the words that do not fit are left out (the least
    needed come last)."""
    packed: List[str] = []
    for word in words:
        word = word if len(word) <= width else word[:max(0, width - 1)] + (
            CUT_MARK)
        if packed and len(packed[-1]) + 2 + len(word) <= width:
            packed[-1] += "  " + word
        elif len(packed) < lines:
            packed.append(word)
    return packed


def fitting(words: List[str], width: int, lines: int) -> int:
    """How many of ``words`` pack (see pack) into ``lines`` lines."""
    used, line = 0, -1   # lines used, the current line's length
    for count, word in enumerate(words):
        size = min(len(word), width)
        if used and line + 2 + size <= width:
            line += 2 + size
        elif used < lines:
            used, line = used + 1, size
        else:
            return count
    return len(words)


def fullest_server(snapshot: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The database server whose connections come nearest its
    max_connections (of those the operator gave one)."""
    return max((server for server in snapshot.get("databases", ())
                if server.get("max_connections")),
               key=server_percent, default=None)


def server_percent(server: Dict[str, Any]) -> int:
    """A database server's connections as a percentage of its
    max_connections (0 when it has none)."""
    most = server.get("max_connections")
    return round(100 * server["conn"] / most) if most else 0


def server_text(server: Dict[str, Any]) -> str:
    return server.get("server") or "(not reported)"


NEAR_LIMIT = 90    # percent of a server's max_connections: an alarm

# How far back TMOUT/S looks: timeouts come in bursts, a second's rate
# flickers between 0 and a few.
TIMEOUT_WINDOW = 10.0


class RecentTimeouts:
    """Each row's timeouts a second over the last TIMEOUT_WINDOW seconds,
    from the running totals of the snapshots seen ("timeouts_recent" in
    each row, and the sum in the snapshot); until a window has passed,
    over what there is, at least the daemon's last second."""

    def __init__(self) -> None:
        self.totals: Dict[Tuple[str, str], List[Tuple[float, int]]] = {}

    def annotate(self, snapshot: Dict[str, Any], now: float) -> None:
        seen = {}
        for row in snapshot["rows"]:
            total = row.get("timeouts_total") or 0
            if not total:   # (most rows: nothing to remember)
                row["timeouts_recent"] = 0
                continue
            key = (row["hostname"], row["progname"])
            samples = [(when, count) for when, count in self.totals.get(
                key, ()) if when >= now - TIMEOUT_WINDOW and count <= total]
            samples.append((now, total))
            seen[key] = samples
            first_when, first_total = samples[0]
            rate = ((total - first_total) / (now - first_when)
                    if now > first_when else 0.0)
            rate = max(rate, row.get("timeouts_per_sec") or 0)
            row["timeouts_recent"] = round(rate, 1) or 0
        self.totals = seen
        snapshot["timeouts_recent"] = round(sum(
            row["timeouts_recent"] for row in snapshot["rows"]), 1) or 0


def row_alarms(row: Dict[str, Any]) -> List[str]:
    """What needs a look in a row: checkouts waiting, timeouts, the pools
    exhausted, a leak."""
    return [text for text, raised in (
        (f"WAIT {row.get('waiting')}", row.get("waiting")),
        (f"TMOUT {cell(row.get('timeouts_recent'))}/s",
         row.get("timeouts_recent")),
        ("EXHAUSTED", row.get("exhausted")),
        ("LEAK", leaked(row))) if raised]


def alarm_rows(snapshot: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every alarm of a snapshot, one row each (hostname, progname,
    alarm): programs whose checkouts wait or time out first, database
    servers at NEAR_LIMIT % of their max_connections or over, then
    exhausted pools, then leaks."""
    found = []
    for row in snapshot.get("rows", ()):
        if not (row.get("waiting") or row.get("timeouts_recent")
                or row.get("exhausted") or row.get("sites")):
            continue   # (most rows: calm)
        alarms = row_alarms(row)
        if alarms:
            rank = 0 if row.get("waiting") or row.get(
                "timeouts_recent") else 2 if row.get("exhausted") else 3
            found.append((rank, {"hostname": row["hostname"],
                                 "progname": row["progname"],
                                 "alarm": " ".join(alarms)}))
    for server in snapshot.get("databases", ()):
        if server.get("max_connections") and server_percent(
                server) >= NEAR_LIMIT:
            found.append((1, {"hostname": server_text(server),
                              "progname": "(database server)",
                              "alarm": f"CONN {server['conn']}/"
                              f"{server['max_connections']} "
                              f"{server_percent(server)}%"}))
    return [alarm for _, alarm in sorted(found, key=lambda item: item[0])]


def alarm_lines(alarms: List[Dict[str, Any]], width: int,
                lines: int = 1 << 20) -> List[str]:
    """The header's lines naming the alarms, in at most ``lines`` lines
    of ``width``: as many as fit, then how many more (the alarms view, a,
    lists them all).  A program is named with its host when it has
    alarms on more than one."""
    if not alarms:
        return ["No alarms"]
    programs = collections.Counter(alarm["progname"] for alarm in alarms)
    words = [f"DB {alarm['hostname']} {alarm['alarm']}"
             if alarm["progname"] == "(database server)" else
             f"{alarm['progname']}@{alarm['hostname']} {alarm['alarm']}"
             if programs[alarm["progname"]] > 1 else
             f"{alarm['progname']} {alarm['alarm']}" for alarm in alarms]
    words[0] = f"ALARMS {len(alarms)}: {words[0]}"
    # (from as many as fit without the "+N more" word: a step or two)
    for shown in range(fitting(words, width, lines), 0, -1):
        more = [f"+{len(words) - shown} more (a)"] if shown < len(
            words) else []
        packed = pack(words[:shown] + more, width)
        if len(packed) <= lines:
            return packed
    return pack(words[:1], width, lines)   # the first, cut at its end


def row_state(row: Dict[str, Any]) -> str:
    """"waiting", "exhausted", "live" or "gone": what a row's colour says.
    (A process, in the drill-down, has no "connected": it is live.)
    Checkouts waiting for a connection are the alarm."""
    if row.get("waiting"):
        return "waiting"
    if row.get("exhausted"):
        return "exhausted"
    return "live" if row.get("connected", True) else "gone"


def row_identity(row: Dict[str, Any]) -> Any:
    """What a row is, whatever its numbers: a process's pid, else the
    host+program (and the checkout site, in the sites view)."""
    return row["pid"] if "pid" in row else (
        row["hostname"], row["progname"], row.get("site"))


# The fleet view's pool pressure: counts and rates summed over the hosts,
# times the worst host's.
PRESSURE_SUMS = ("waiting", "maxwaiting", "timeouts_per_sec",
                 "timeouts_recent", "timeouts_total", "connect_errors_per_sec",
                 "connect_errors_total", "invalidations_per_sec",
                 "invalidations_total")
PRESSURE_WORST = ("longest_wait_ms", "wait_ms", "wait_max_ms", "connect_ms")


def by_program(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The fleet view's rows: one per program, over every host.  Counts,
    maxima (each host's, summed) and rates are sums of the host rows;
    LIMIT sums the live hosts' pools ("-" when any is unlimited); HOLD_MS,
    OLDEST and the pressure's times are the worst host's."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["progname"], []).append(row)
    fleet = []
    for progname, group in sorted(groups.items()):
        live = [row for row in group if row["connected"]]
        limits = [row["limit"] for row in live]
        merged = {key: sum(row[key] for row in group) for key in (
            "nproc", "conn", "ckout", "maxnproc", "maxconn", "maxckout",
            "ckout_per_sec", *PRESSURE_SUMS)}
        merged.update({key: max((row[key] for row in group
                                 if row[key] is not None), default=None)
                       for key in PRESSURE_WORST})
        merged.update(
            hostname=connmon.plural(len(group), "host"), progname=progname,
            hosts=[row["hostname"] for row in group],
            connected=bool(live),
            limit=sum(limits) if limits and None not in limits else None,
            exhausted=any(row["exhausted"] for row in group),
            hold_ms=max((row["hold_ms"] for row in group
                         if row["hold_ms"] is not None), default=None),
            oldest=max((row["oldest"] for row in group
                        if row["oldest"] is not None), default=None),
            sites=[site for row in group for site in row.get("sites") or ()])
        fleet.append(merged)
    return fleet


def format_table(snapshot: Dict[str, Any], width: Optional[int] = None
                 ) -> str:
    """The plain table of ``connmon --once``: sorted as the screen starts
    (CONN, the biggest first), in ``width`` columns as the screen would
    lay them out (None: every column, nothing cut)."""
    RecentTimeouts().annotate(snapshot, time.monotonic())
    sort = COLUMNS[3]
    rows = sorted(snapshot["rows"], key=sort.sort_key, reverse=True)
    marks = {"live": "", "gone": "  (gone)", "exhausted": "  (exhausted)",
             "waiting": "  (waiting)"}
    mark_room = max((len(marks[row_state(row)]) for row in rows), default=0)
    layout = natural(COLUMNS, rows) if width is None else plan(
        COLUMNS, width - mark_room, rows, rows)
    formatter = Formatter(layout, rows, thresholds_of(snapshot), Cutter())
    room = width or 1 << 20
    lines = [f"connmon: service {snapshot['service']} node {snapshot['node']}"]
    lines += pack(summary_words(snapshot), room)
    lines += alarm_lines(alarm_rows(snapshot), room)
    if trimmed_text(snapshot):
        lines.append(trimmed_text(snapshot))
    lines.append(f"{connmon.plural(len(rows), 'row')}, sorted by "
                 f"{sort.heading} descending")
    lines.append(headings(layout).rstrip())
    for row in rows:
        lines.append(formatter.line(row).rstrip() + marks[row_state(row)])
        under = pressure_lines(row) + site_lines(row)
        for proc in row.get("procs", ()):
            under += process_lines(proc)
        for line in under:
            lines += fold(line, width)
    for line in database_lines(snapshot):
        lines += fold(line, width)
    return "\n".join(lines)


def fold(line: str, width: Optional[int]) -> List[str]:
    """A line of the plain table in lines of ``width`` (None: as it is),
    the continuations indented under it."""
    if width is None or len(line) <= width:
        return [line]
    indent = " " * min(len(line) - len(line.lstrip()) + 4, width // 2)
    return textwrap.wrap(line, width, subsequent_indent=indent,
                         break_on_hyphens=False) or [line]


def ms(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def pressure_lines(row: Dict[str, Any], always: bool = False) -> List[str]:
    """Under a row of the plain table, when its pools were ever under
    pressure (or ``always``): checkouts waiting (now, at most, the
    longest wait going on), wait times over the last second, timeouts,
    connect errors and times, invalidations (per second, and in all)."""
    if not (always or row.get("maxwaiting") or row.get("timeouts_total")
            or row.get("connect_errors_total")
            or row.get("invalidations_total")):
        return []
    return [f"    waiting {row['waiting']} (max {row['maxwaiting']}, "
            f"longest {ms(row['longest_wait_ms'])})  wait mean "
            f"{ms(row['wait_ms'])} max {ms(row['wait_max_ms'])}  timeouts "
            f"{row['timeouts_per_sec']}/s ({row['timeouts_total']})",
            f"    connect {ms(row['connect_ms'])}  connect errors "
            f"{row['connect_errors_per_sec']}/s "
            f"({row['connect_errors_total']})  invalidations "
            f"{row['invalidations_per_sec']}/s "
            f"({row['invalidations_total']})"]


def endpoint_text(endpoint: Optional[Dict[str, Any]]) -> str:
    """backend://user@host:port/database, as far as it is known."""
    if endpoint is None:
        return "(database not reported)"
    server = connmon.server_name(endpoint) or ""
    user = f"{endpoint['user']}@" if endpoint["user"] else ""
    where = "" if server == endpoint["backend"] else user + server
    return f"{endpoint['backend']}://{where}/{endpoint['database'] or ''}"


def process_lines(proc: Dict[str, Any]) -> List[str]:
    """With --procs: a row's process, and each of its pools."""
    lines = [f"    pid {proc['pid']}  conn {proc['conn']}  ckout "
             f"{proc['ckout']}  waiting {proc.get('waiting', 0)}  limit "
             f"{cell(proc['limit'])}"]
    for pool in proc.get("pools", ()):
        lines.append(f"        pool {pool['pool']}  "
                     f"{endpoint_text(pool['endpoint'])}  conn "
                     f"{pool['conn']}  ckout {pool['ckout']}  waiting "
                     f"{pool['waiting']}  limit {cell(pool['limit'])}")
    return lines


def database_lines(snapshot: Dict[str, Any]) -> List[str]:
    """The plain table's databases: per server (its connections and the
    pools' summed limits against its max_connections, when the operator
    gave it), then per database; and what the daemon left out."""
    servers = snapshot.get("databases", ())
    lines = ["", "Databases"] if servers else []
    for server in servers:
        most = server["max_connections"]
        lines.append(f"  {server['server'] or '(not reported)'} "
                     f"({server['backend'] or '?'}): conn {server['conn']}"
                     f"{'' if most is None else f' of {most}'}  ckout "
                     f"{server['ckout']}  waiting {server['waiting']}  pool "
                     f"limits {cell(server['limit'])}"
                     f"{'' if most is None else f' of {most}'}  "
                     f"{server['nproc']} processes, {server['nprog']} "
                     "programs")
        for database in server["databases"]:
            users = "; ".join(filter(None, (
                ",".join(database["users"]) or "-",
                left_out(database, "users", "user"))))
            lines.append(f"    {database['database'] or '-'} (users "
                         f"{users}): conn {database['conn']}  ckout "
                         f"{database['ckout']}  waiting "
                         f"{database['waiting']}  pool limits "
                         f"{cell(database['limit'])}  {database['nproc']} "
                         f"processes, {database['nprog']} programs")
        more = left_out(server, "databases", "database")
        if more:
            lines.append(f"    ({more})")
    more = left_out(snapshot, "databases", "database server")
    if more:
        lines.append(f"  ({more})")
    return lines


def left_out(part: Dict[str, Any], key: str, noun: str) -> str:
    """"12 more databases not shown": what the daemon left out of
    ``part``'s ``key`` list (those holding the fewest connections); ""
    when it left nothing out."""
    count = part.get(f"{key}_trimmed", 0)
    return (f"{connmon.plural(count, 'more ' + noun)} not shown" if count
            else "")


def site_lines(row: Dict[str, Any]) -> List[str]:
    """Under a row of the plain table: where its held connections were
    checked out, one line a site (those without a known site are left
    out: capture off, or an older app)."""
    return [f"    held {site['held']:>4}  oldest {cell(site['oldest']):>7}"
            f"  {site['site']}" for site in row.get("sites") or ()
            if site["site"]]


# ---------------------------------------------------------------------------
# The feed: one connection to connmond, polled from its own thread
# ---------------------------------------------------------------------------


# What another server's first bytes say it is (see failure_text).
LOOKS_LIKE = [
    (("mariadb", "mysql", "\\x00\\x00\\x00\\n"), "a MySQL/MariaDB server"),
    (("sfatal", "postgres"), "a PostgreSQL server"),
    (("http/",), "a web server"),
]


def failure_text(err: Exception) -> str:
    """Why the console could not attach, in words: for a server that is
    not connmond, what it looks like rather than its raw bytes."""
    text = connmon.printable(str(err))
    if not isinstance(err, connmon.NotConnmond):
        return text
    lowered = text.lower()
    for needles, kind in LOOKS_LIKE:
        if any(needle in lowered for needle in needles):
            return (f"not connmond: this looks like {kind}; is the port "
                    f"connmond's (default {connmon.DEFAULT_PORT})?")
    return text


class Feed:
    """Keeps the console's one connection to connmond and fetches a
    snapshot every interval on a thread of its own, so that a slow or dead
    daemon never freezes the screen.  When the connection is lost it keeps
    the last snapshot and tries every node of the service again, backing
    off: up to RETRY_MAX seconds between tries, NOT_CONNMOND_RETRY when
    what answers is not connmond (a database's port: every try would be
    an aborted connection in its log)."""

    CONNECT_TIMEOUT = 3.0
    REPLY_TIMEOUT = 10.0
    RETRY_MAX = 5.0
    NOT_CONNMOND_RETRY = 60.0

    def __init__(self, target: Target, interval: float):
        self.target = target
        self.interval = interval
        self.lock = threading.Lock()
        self.snapshot: Optional[Dict[str, Any]] = None
        self.state = "connecting"      # then "connected" / "disconnected"
        self.attached_to = ""          # the address of the current daemon
        self.error = ""
        self.generation = 0            # bumped on every change
        self.want_procs = False        # a drill-down is open
        # the drill-down's row: (hostname or None for every host, progname)
        self.want_history: Optional[Tuple[Optional[str], str]] = None
        self.history: Optional[Dict[str, Any]] = None
        self._requests: List[Dict[str, Any]] = []
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="connmon-feed")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def refresh_now(self) -> None:
        self._wake.set()

    def ask(self, request: Dict[str, Any]) -> None:
        """Send ``request`` (e.g. clear_maxima) before the next snapshot;
        kept until a daemon has answered it."""
        with self.lock:
            self._requests.append(request)
        self._wake.set()

    def _publish(self, **changes: Any) -> None:
        with self.lock:
            for name, value in changes.items():
                setattr(self, name, value)
            self.generation += 1

    def _run(self) -> None:
        conn: Optional[connmon.Connection] = None
        address = ""
        delay = 0.0
        while not self._stopping:
            try:
                if conn is None:
                    conn = self.target.connect(self.CONNECT_TIMEOUT)
                    conn.sock.settimeout(self.REPLY_TIMEOUT)
                    address = connmon.format_address(
                        conn.sock.getpeername()[:2])
                self._serve_requests(conn)
                snapshot = conn.request({"op": "snapshot",
                                         "procs": self.want_procs})
                history = self._fetch_history(conn)
            except (OSError, connmon.ProtocolError) as err:
                if conn is not None:
                    conn.close()
                    conn = None
                if isinstance(err, connmon.NotConnmond):
                    delay = self.NOT_CONNMOND_RETRY   # at once: no backoff
                else:
                    delay = min(self.RETRY_MAX, max(self.interval, delay * 2))
                self._publish(state="disconnected",
                              error=f"{failure_text(err)} (next try in "
                              f"{delay:.0f}s)")
                self._sleep(delay)
                continue
            delay = 0.0
            del snapshot["op"]
            self._publish(snapshot=escaped(snapshot), history=history,
                          state="connected", error="", attached_to=address)
            self._sleep(self.interval)
        if conn is not None:
            conn.close()

    def _fetch_history(self, conn: connmon.Connection
                       ) -> Optional[Dict[str, Any]]:
        """The daemon's history of the drilled-into row, if one is open."""
        wanted = self.want_history
        if wanted is None:
            return None
        hostname, progname = wanted
        reply = conn.request({"op": "history", "hostname": hostname,
                              "progname": progname})
        reply["row"] = wanted
        return reply

    def _serve_requests(self, conn: connmon.Connection) -> None:
        while self._requests:
            conn.request(self._requests[0])
            with self.lock:
                self._requests.pop(0)

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()


# ---------------------------------------------------------------------------
# The live screen
# ---------------------------------------------------------------------------

HELP = """\
connmon keys (Up/Down/PgUp/PgDn scroll this help; any other key returns)

  F10 q        quit
  F1 ? h       this help
  Up Down j k  select a row
  PgUp PgDn    scroll a page
  Home End     first / last row
  < >          sort by the previous / next column (numbers start
               with the biggest first, as in top)
  F6           the sort menu: pick the column
  r            reverse the sort order
  / F3 F4      filter: keep the rows whose hostname or progname
               contains the text (F3's search is this filter; Enter
               keeps it, Esc clears it)
  Space p      pause / resume updates (the title says PAUSED)
  Ctrl-L       redraw the screen
  F5 f         fleet view: one row per program over every host, and
               back to one row per host+program
  w o          sort by WAIT / by OLDEST (the biggest first)
  + -          refresh less / more often (the title says how often)
  a            alarms: every alarm the header's alarm line names
               (Enter: that program's processes)
  x            hide / show the rows of programs that are gone
  Enter        the selected row's processes, their long holders
               (where each was checked out, where it is held now) and
               the daemon's ten-minute history of conn and ckout; the
               moving keys scroll it
  s            sites: which line of which program holds the most
               connections, fleet-wide, programs whose checkouts wait
               first (Enter: that program's processes)
  d            databases: per database server, its databases and the
               programs holding its connections, against its limit
  Esc Bkspc    back to the previous view (in the table: clear the filter)
  c            clear the maxima in connmond, for every console and for
               Prometheus (asks first)

Rows: green = program has live processes, red = none left (dim without
colours), highlighted = every pooled connection is checked out
(ckout >= limit), white on red = checkouts are waiting for a connection
(WAIT > 0).  A marker left of a number needs a look:
  !  OLDEST or a long holder's AGE above the apps' hold_warn_seconds,
     HOLD_MS above the daemon's hold_ms_warn, CKOUT at the pools' limit
     (exhausted), WAIT above 0 (checkouts waiting), TMOUT/S above 0 in
     the last 10 seconds, or, in the databases view, LIMIT above the
     server's MAX_CONN
  *  OLDEST, AGE: a long holder leaked for sure (HELD AT "leaked" or
     "thread gone"), the same in the table, the drill-down and the
     sites view
OLDEST: age of the longest checked-out connection (seconds under a
minute, then 5m44s, 2h05m, 3d04h).
HOLD_MS: mean checkout hold time over the last second.
WAIT: checkouts waiting for a connection; TMOUT/S: checkouts that gave
up waiting (pool timeout), a second over the last 10 seconds (! while
any did).
The alarm line under the totals names every program whose checkouts
wait or time out, every database server at 90% of its MAX_CONN or
over, every exhausted pool and every leak (a lists them all).
MAX*: the highest values since the time in the header (c clears them).
"""

UNICODE_GLYPHS = {"dash": "\N{EM DASH}", "up": "\N{UPWARDS ARROW}",
                  "down": "\N{DOWNWARDS ARROW}", "cut": CUT_MARK,
                  "spark": "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"}
ASCII_GLYPHS = {"dash": "-", "up": "^", "down": "v", "cut": "~",
                "spark": "_.:-=+*#"}
ESC = 27
CTRL_L = 12
ENTER_KEYS = (curses.KEY_ENTER, 10, 13)
BACK_KEYS = (ESC, curses.KEY_BACKSPACE, 127, 8)
MOVE_KEYS = (curses.KEY_UP, curses.KEY_DOWN, curses.KEY_PPAGE,
             curses.KEY_NPAGE, curses.KEY_HOME, curses.KEY_END, ord("j"),
             ord("k"))
HEADER_LINES = 7           # title, totals, alarms, context, column headings
SUMMARY_LINES = 4          # the totals and the alarms
SUMMARY_COUNTS = 6         # summary_words' counts, before the optional
MESSAGE_SECONDS = 3.0      # how long a message stays in the footer
INTERVALS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)   # + and -


class Binding(NamedTuple):
    """Keys of a view, the footer's word for them ("" for none: moving
    is taken for granted) and the Console method they call."""
    keys: Tuple[int, ...]
    label: str
    action: str


# Every view's keys, in the footer's order (it shows what fits): help
# and quit, the view's own, then pause.
COMMON_KEYS = [
    Binding((curses.KEY_F1, ord("?"), ord("h")), "F1 help", "open_help"),
    Binding((curses.KEY_F10, ord("q")), "F10 quit", "quit"),
]
LAST_KEYS = [
    Binding((ord(" "), ord("p")), "Space pause", "toggle_pause"),
    Binding(MOVE_KEYS, "", "move"),
]
VIEW_KEYS = {
    "table": [
        Binding(ENTER_KEYS, "Enter procs", "drill_into"),
        Binding((curses.KEY_F5, ord("f")), "F5 fleet", "toggle_fleet"),
        Binding((ord("/"), curses.KEY_F3, curses.KEY_F4), "/ filter",
                "edit_filter"),
        Binding((curses.KEY_F6, ord("<"), ord(">")), "F6 sort",
                "change_sort"),
        Binding((ord("s"),), "s sites", "open_sites"),
        Binding((ord("d"),), "d databases", "open_databases"),
        Binding((ord("c"),), "c clear max", "confirm_clear"),
        Binding((ord("x"),), "x gone", "toggle_gone"),
        Binding((ord("r"),), "r reverse", "reverse_sort"),
        Binding((ord("a"),), "a alarms", "open_alarms"),
        Binding((ord("w"), ord("o")), "w/o sort WAIT/OLDEST", "sort_key"),
        Binding((ord("+"), ord("-")), "+/- rate", "change_interval"),
        Binding((ESC,), "", "clear_filter"),
    ],
    "procs": [Binding(BACK_KEYS, "Esc back", "close_view")],
    "alarms": [Binding(ENTER_KEYS, "Enter procs", "drill_into"),
               Binding(BACK_KEYS + (ord("a"),), "Esc back", "close_view")],
    "sites": [Binding(ENTER_KEYS, "Enter procs", "drill_into"),
              Binding(BACK_KEYS + (ord("s"),), "Esc back", "close_view")],
    "databases": [Binding(BACK_KEYS + (ord("d"),), "Esc back",
                          "close_view")],
    "sort": [Binding(ENTER_KEYS, "Enter sort by it", "choose_sort"),
             Binding(BACK_KEYS, "Esc back", "close_view")],
}


def sparkline(values: List[int], top: int, ramp: str) -> str:
    """One character a value, from ramp[0] (0) up to ramp[-1] (``top``)."""
    steps = len(ramp) - 1
    return "".join(ramp[min(steps, round(value * steps / top))]
                   if top > 0 else ramp[0] for value in values)


class Styles:
    """The curses attribute for each kind of line, with colours when the
    terminal has them and plain attributes otherwise."""

    def __init__(self, colors: bool):
        self.attrs = {"live": curses.A_NORMAL, "gone": curses.A_DIM,
                      "exhausted": curses.A_BOLD, "stale": curses.A_DIM,
                      "waiting": curses.A_BOLD | curses.A_UNDERLINE,
                      "title": curses.A_BOLD, "heading": curses.A_REVERSE,
                      "sorted": curses.A_REVERSE | curses.A_BOLD,
                      "alarm": curses.A_BOLD | curses.A_UNDERLINE,
                      "paused": curses.A_REVERSE | curses.A_BOLD}
        if colors:
            curses.start_color()
            curses.use_default_colors()
            grey = 8 if curses.COLORS > 8 else curses.COLOR_WHITE
            for number, (name, fg, bg) in enumerate((
                    ("live", curses.COLOR_GREEN, -1),
                    ("gone", curses.COLOR_RED, -1),
                    ("exhausted", curses.COLOR_BLACK, curses.COLOR_YELLOW),
                    ("waiting", curses.COLOR_WHITE, curses.COLOR_RED),
                    ("stale", grey, -1),
                    ("sorted", curses.COLOR_BLACK, curses.COLOR_CYAN),
                    ("alarm", curses.COLOR_WHITE, curses.COLOR_RED),
                    ("paused", curses.COLOR_BLACK, curses.COLOR_YELLOW)), 1):
                curses.init_pair(number, fg, bg)
                self.attrs[name] = curses.color_pair(number) | (
                    curses.A_BOLD if name in ("alarm", "paused") else 0)

    def __getitem__(self, name: str) -> int:
        return self.attrs[name]


class Console:
    """The interactive screen: what is shown (table, fleet, processes,
    sites, sort menu, help), in which order, filtered how, paused or not,
    and the keys that change it.  Only the visible rows are formatted, so
    thousands of rows are cheap."""

    def __init__(self, window, feed: Feed, colors: bool,
                 hide_gone: bool = False):
        self.window = window
        self.feed = feed   # its interval is the refresh's (+ and - set it)
        self.styles = Styles(colors)
        # curses encodes text for the locale: only UTF-8 has the pretty ones
        self.glyphs = (UNICODE_GLYPHS
                       if codecs.lookup(window.encoding).name == "utf-8"
                       else ASCII_GLYPHS)
        self.cutter = Cutter(self.glyphs["cut"])
        self.picture: Optional[Dict[str, Any]] = None
        self.recent = RecentTimeouts()
        self.alarms: List[Dict[str, Any]] = []   # the picture's alarm_rows
        self.seen_generation = -1
        self.view = "table"      # or "procs", "sites", "sort", "help"
        self.sort_column = COLUMNS[3]    # CONN, the biggest first
        self.descending = True
        self.fleet = False               # one row per program
        self.hide_gone = hide_gone
        self.filter = ""
        self.editing_filter = False
        self.confirming = False          # "clear the maxima?" asked
        self.paused = False
        self.selected = 0
        # The selection follows its row when rows move, once the operator
        # has chosen one; until then it stays on the top row.
        self.selected_key: Any = None
        self.follow = False
        self.top = 0
        self.drill: Tuple[Optional[str], str] = (None, "")
        # the views under this one, each with its selection and scroll
        self.previous: List[tuple] = []
        self.message = ""
        self.message_until = 0.0
        self.shown = ""     # "1-16 of 19" when the view's lines are cut
        self.running = True

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass   # a terminal that cannot hide its cursor
        self.window.timeout(100)           # poll the feed ten times a second
        self.window.keypad(True)
        drawn, key = -1, -1
        while self.running:
            # Draw after a key, or when the feed has news, or to take a
            # message away; else stay idle.
            generation = self.feed.generation
            expired = self.message and time.monotonic() > self.message_until
            if key != -1 or generation != drawn or expired:
                if expired:
                    self.message = ""
                self.adopt()
                self.draw()
                drawn = generation
            key = self.window.getch()
            if key != -1:
                self.handle(key)

    def adopt(self) -> None:
        """Take the feed's newest snapshot, unless paused."""
        feed = self.feed
        if feed.generation != self.seen_generation and not self.paused:
            with feed.lock:
                self.seen_generation = feed.generation
                fresh = feed.snapshot
            if fresh is not None and fresh is not self.picture:
                self.recent.annotate(fresh, time.monotonic())
                self.picture = fresh
                self.alarms = alarm_rows(fresh)

    def say(self, text: str) -> None:
        self.message = text
        self.message_until = time.monotonic() + MESSAGE_SECONDS

    # -- keys -----------------------------------------------------------------

    def bindings(self) -> List[Binding]:
        return COMMON_KEYS + VIEW_KEYS.get(self.view, []) + LAST_KEYS

    def handle(self, key: int) -> None:
        """Act on one key."""
        if key in (curses.KEY_RESIZE, CTRL_L):
            self.window.clear()   # repaint everything
        elif self.editing_filter:
            self.edit_filter_key(key)
        elif self.confirming:
            self.confirming = False
            if key in (ord("y"), ord("Y")):
                self.feed.ask({"op": "clear_maxima"})
                self.say("maxima cleared in connmond (every console and "
                         "Prometheus see it)")
            else:
                self.say("maxima kept")
        elif self.view == "help":
            if key in MOVE_KEYS:
                self.move(key)
            else:
                self.close_view()
        else:
            for binding in self.bindings():
                if key in binding.keys:
                    getattr(self, binding.action)(key)
                    return
            self.say("unknown key: ? for help")

    def quit(self, key: int) -> None:
        self.running = False

    def open_help(self, key: int) -> None:
        self.open_view("help")

    def toggle_pause(self, key: int) -> None:
        self.paused = not self.paused

    def confirm_clear(self, key: int) -> None:
        self.confirming = True

    def edit_filter(self, key: int) -> None:
        self.editing_filter = True

    def clear_filter(self, key: int) -> None:
        self.filter = ""

    def change_sort(self, key: int) -> None:
        if key == curses.KEY_F6:
            self.open_view("sort")
            self.selected = COLUMNS.index(self.sort_column)
            return
        step = 1 if key == ord(">") else -1
        index = (COLUMNS.index(self.sort_column) + step) % len(COLUMNS)
        self.sort_by(COLUMNS[index])

    def sort_by(self, column: Column) -> None:
        self.sort_column, self.descending = column, column.descending

    def choose_sort(self, key: int) -> None:
        column = COLUMNS[max(0, min(self.selected, len(COLUMNS) - 1))]
        self.close_view()
        self.sort_by(column)

    def reverse_sort(self, key: int) -> None:
        self.descending = not self.descending

    def toggle_fleet(self, key: int) -> None:
        self.fleet = not self.fleet
        self.selected = self.top = 0
        self.selected_key = None

    def toggle_gone(self, key: int) -> None:
        self.hide_gone = not self.hide_gone

    def sort_key(self, key: int) -> None:
        """w: sort by WAIT, o: by OLDEST (both the biggest first)."""
        heading = "WAIT" if key == ord("w") else "OLDEST"
        self.sort_by(next(c for c in COLUMNS if c.heading == heading))

    def change_interval(self, key: int) -> None:
        """+ refreshes less often, - more often (a step of INTERVALS)."""
        now = self.feed.interval
        if key == ord("+"):
            steps = [step for step in INTERVALS if step > now]
            self.feed.interval = steps[0] if steps else now
        else:
            steps = [step for step in INTERVALS if step < now]
            self.feed.interval = steps[-1] if steps else now
        self.feed.refresh_now()
        self.say(f"refreshing every {self.feed.interval:g}s")

    def open_alarms(self, key: int) -> None:
        self.open_view("alarms")

    def open_sites(self, key: int) -> None:
        self.open_view("sites")

    def open_databases(self, key: int) -> None:
        self.open_view("databases")

    def edit_filter_key(self, key: int) -> None:
        if key == ESC:
            self.filter, self.editing_filter = "", False
        elif key in ENTER_KEYS:
            self.editing_filter = False
        elif key in (curses.KEY_BACKSPACE, 127, 8):
            self.filter = self.filter[:-1]
        elif 32 <= key < 127:
            self.filter += chr(key)
        self.selected = self.top = 0
        self.selected_key = None

    def move(self, key: int) -> None:
        """Move the selection; a page key scrolls the view with it."""
        page = max(1, self.body_height())
        steps = {curses.KEY_UP: -1, curses.KEY_DOWN: 1, ord("k"): -1,
                 ord("j"): 1, curses.KEY_PPAGE: -page,
                 curses.KEY_NPAGE: page, curses.KEY_HOME: -1 << 30,
                 curses.KEY_END: 1 << 30}
        if self.view == "procs":   # a document: the keys scroll it (a page
            # less its last line, which may have said "more lines")
            self.top = max(0, self.top + max(-page + 1, min(
                page - 1, steps[key])) if abs(steps[key]) == page
                else self.top + steps[key])
            return
        self.selected += steps[key]
        self.selected_key = None
        self.follow = True
        if key in (curses.KEY_PPAGE, curses.KEY_NPAGE):
            self.top += steps[key]

    def drill_into(self, key: int) -> None:
        """Open the processes of the selected row (in the fleet view: of
        the program on every host)."""
        rows = {"sites": self.site_rows, "alarms": self.alarm_rows}.get(
            self.view, self.table_rows)()
        if rows:
            row = rows[min(self.selected, len(rows) - 1)]
            if row["progname"] == "(database server)":
                self.open_view("databases")
                return
            host = None if self.fleet and self.view == "table" else (
                row["hostname"])
            self.drill = (host, row["progname"])
            self.open_view("procs")

    def open_view(self, view: str) -> None:
        """Show ``view`` over the current one, which Esc comes back to
        with its selection where it was."""
        self.previous.append((self.view, self.selected, self.top,
                              self.selected_key))
        self.view = view
        self.selected = self.top = 0
        self.selected_key = None
        self.want_details()

    def close_view(self, key: int = 0) -> None:
        if self.previous:
            (self.view, self.selected, self.top,
             self.selected_key) = self.previous.pop()
            self.want_details()

    def want_details(self) -> None:
        """Only the drill-down needs the (bigger) snapshot with processes
        and the row's history: ask for them at once when it opens."""
        feed = self.feed
        wanted = self.view == "procs"
        feed.want_history = self.drill if wanted else None
        if wanted and not feed.want_procs:
            feed.refresh_now()
        feed.want_procs = wanted

    # -- what to show ---------------------------------------------------------

    def host_rows(self) -> List[Dict[str, Any]]:
        """The snapshot's host+program rows that the filter and the gone
        switch leave."""
        if self.picture is None:
            return []
        rows = self.picture["rows"]
        if self.hide_gone:
            rows = [row for row in rows if row["connected"]]
        if self.filter:
            needle = self.filter.lower()
            rows = [row for row in rows if needle in row["hostname"].lower()
                    or needle in row["progname"].lower()]
        return rows

    def table_rows(self) -> List[Dict[str, Any]]:
        rows = self.host_rows()
        if self.fleet:
            rows = by_program(rows)
        # Ties keep the snapshot's hostname, progname order.
        return sorted(rows, key=self.sort_column.sort_key,
                      reverse=self.descending)

    def site_rows(self) -> List[Dict[str, Any]]:
        """Every (filtered) row's checkout sites in one list: those of
        programs whose checkouts wait for a connection first (where the
        connections they wait for are held), then the sites holding the
        most connections, then the oldest."""
        rows = [{"hostname": row["hostname"], "progname": row["progname"],
                 "waiting": row.get("waiting", 0), **site}
                for row in self.host_rows()
                for site in row.get("sites") or ()]
        return sorted(rows, key=lambda r: (not r["waiting"], -r["held"],
                                           -r["oldest"], r["hostname"],
                                           r["progname"], r["site"] or ""))

    def alarm_rows(self) -> List[Dict[str, Any]]:
        """Every alarm (see alarm_rows), those matching the filter."""
        needle = self.filter.lower()
        return [alarm for alarm in self.alarms
                if needle in (alarm["hostname"] + alarm["progname"]).lower()]

    def database_rows(self) -> List[Dict[str, Any]]:
        """Per database server: its total, its databases, then the
        programs holding its connections (those matching the filter)."""
        rows = []
        needle = self.filter.lower()
        for server in (self.picture or {}).get("databases", ()):
            name = server["server"] or "(not reported)"
            lines = [{**server, "hostname": name,
                      "progname": f"all ({server['backend'] or '?'})"}]
            lines += [{**database, "hostname": name,
                       "progname": f"db {database['database'] or '-'}"}
                      for database in server["databases"]]
            lines += [{**program, "hostname": name,
                       "host": program["hostname"],
                       "progname": program["progname"]}
                      for program in server["programs"]]
            most = server["max_connections"]
            lines[0]["use_percent"] = server_percent(server) if most else None
            rows += [{"max_connections": most, "host": "", **line,
                      "over_server": None not in (most, line["limit"])
                      and line["limit"] > most} for line in lines
                     if needle in (name + line["host"] if "host" in line
                                   else name).lower()
                     + line["progname"].lower()]
        return rows

    def proc_rows(self) -> Optional[List[Dict[str, Any]]]:
        """The drilled-into row's processes (on every host, from the
        fleet view); None until they arrive."""
        host, prog = self.drill
        procs: List[Dict[str, Any]] = []
        for row in (self.picture or {}).get("rows", []):
            if row["progname"] == prog and host in (None, row["hostname"]):
                if row.get("procs") is None:
                    return None
                procs += [{"hostname": row["hostname"], **proc}
                          for proc in row["procs"]]
        return procs

    def body_height(self) -> int:
        height, _ = self.window.getmaxyx()
        return max(0, height - HEADER_LINES - 1)

    # -- drawing --------------------------------------------------------------

    def put(self, y: int, text: str, attr: int = curses.A_NORMAL,
            x: Optional[int] = None) -> None:
        """Draw a whole line (``x`` None: padded to the width, in
        ``attr``), or ``text`` alone from column ``x`` over what is
        there (a cell, PAUSED)."""
        height, width = self.window.getmaxyx()
        if x is None:
            x, text = 0, text.ljust(width)
        if 0 <= y < height and x < width:
            try:
                self.window.addnstr(y, x, text, width - x, attr)
            except curses.error:
                pass   # writing the bottom-right cell; the text is drawn

    def draw(self) -> None:
        self.window.erase()
        self.shown = ""
        self.draw_title()
        if self.view == "help":
            self.draw_help()
        else:
            self.draw_summary()
            getattr(self, "draw_" + self.view)()
            if self.picture is None and self.feed.error:
                self.draw_failure()
        self.draw_footer()
        self.window.refresh()

    def draw_title(self) -> None:
        """The title line; PAUSED first, so that any width shows it."""
        feed = self.feed
        where = feed.target.description
        if self.picture is not None:
            where = (f"service {self.picture['service']} node "
                     f"{self.picture['node']}")
        if feed.state == "connected":
            state = f"attached to {feed.attached_to}"
        elif feed.state == "connecting":
            state = "connecting"
        else:
            state = f"disconnected {self.glyphs['dash']} retrying"
        parts = [f"connmon {connmon.__version__}", where, state,
                 f"every {self.feed.interval:g}s",
                 time.strftime("%H:%M:%S")]
        title = f" {self.glyphs['dash']} ".join(parts)
        if self.picture is not None and trimmed_text(self.picture):
            title = trimmed_text(self.picture) + " " + title
        if self.paused:
            title = "PAUSED " + title
        _, width = self.window.getmaxyx()
        if len(title) > width:
            title = title[:width - 1] + self.glyphs["cut"]
        self.put(0, title, self.styles["title"])
        if self.paused:
            self.put(0, "PAUSED", self.styles["paused"], 0)

    def draw_failure(self) -> None:
        """Why the console is not attached yet, whole, over the lines it
        needs (the footer's one line would cut it)."""
        height, width = self.window.getmaxyx()
        lines = textwrap.wrap(self.feed.error, max(10, width - 1))
        for y, line in enumerate(lines[:max(0, height - 2)], 1):
            self.put(y, line)

    def draw_summary(self) -> None:
        """The totals (never a number cut: whole words, over up to three
        lines) and under them the alarms, named as far as the lines left
        go (``a`` lists them all)."""
        if self.picture is None:
            return
        _, width = self.window.getmaxyx()
        words = summary_words(self.picture)
        alarms = self.alarms
        # The counts first, then the alarms, then what room is left for
        # the fullest server and the maxima's start.
        counts = pack(words[:SUMMARY_COUNTS], width, SUMMARY_LINES - 1)
        named = alarm_lines(alarms, width, SUMMARY_LINES - len(counts))
        totals = pack(words, width, SUMMARY_LINES - len(named))
        attr = self.styles["alarm"] if alarms else curses.A_NORMAL
        for y, line in enumerate(totals, 1):
            self.put(y, line)
        for y, line in enumerate(named, len(totals) + 1):
            self.put(y, line, attr)

    def draw_help(self) -> None:
        lines = HELP.splitlines()
        height, _ = self.window.getmaxyx()
        room = max(1, height - 2)
        self.selected = max(0, min(self.selected, len(lines) - room))
        for y, line in enumerate(lines[self.selected:self.selected + room],
                                 1):
            self.put(y, line)

    def row_attr(self, row: Dict[str, Any], selected: bool) -> int:
        attr = self.styles["stale" if self.feed.state != "connected"
                           else row_state(row)]
        return attr | curses.A_REVERSE if selected else attr

    def formatter(self, columns: List[Column], rows: List[Dict[str, Any]],
                  height: int) -> Formatter:
        """Fit ``columns`` to the screen for ``rows``, of which the
        selection's ``height`` are visible (scrolling follows the
        selection, htop style)."""
        if self.selected_key is not None:
            for index, row in enumerate(rows):
                if row_identity(row) == self.selected_key:
                    self.selected = index
                    break
        self.selected = max(0, min(self.selected, len(rows) - 1))
        if self.selected < self.top:
            self.top = self.selected
        elif self.selected >= self.top + height:
            self.top = self.selected - height + 1
        self.top = max(0, min(self.top, len(rows) - height))
        if self.follow and rows:
            self.selected_key = row_identity(rows[self.selected])
        _, width = self.window.getmaxyx()
        layout = plan(columns, width, rows, rows[self.top:self.top + height])
        thresholds = thresholds_of(self.picture or {})
        return Formatter(layout, rows, thresholds, self.cutter)

    def draw_rows(self, formatter: Formatter, rows: List[Dict[str, Any]],
                  y: int, height: int) -> None:
        """The visible slice of ``rows`` from line ``y``; a cell with an
        alarm is drawn in the alarm style over its row."""
        alarm = self.styles["alarm"]
        for y, index in enumerate(range(self.top, min(len(rows),
                                                      self.top + height)), y):
            row = rows[index]
            texts, marks = formatter.texts(row), formatter.marks(row)
            self.put(y, format_cells(formatter.layout, texts, marks),
                     self.row_attr(row, index == self.selected))
            x = 0
            for (column, width), text, mark in zip(formatter.layout, texts,
                                                   marks):
                if mark:
                    self.put(y, (mark + text).rjust(width - 1), alarm, x)
                x += width

    def draw_headings(self, y: int, layout: Layout,
                      sort: Optional[Column] = None) -> None:
        """Column headings; the sort column's highlighted, its arrow in
        its own cell (so two headings never run together)."""
        self.put(y, headings(layout, self.glyphs["cut"]),
                 self.styles["heading"])
        x = 0
        for column, width in layout:
            if column is sort:
                arrow = self.glyphs["down" if self.descending else "up"]
                text = (column.heading + arrow).ljust(width)[:width] if (
                    column.text) else (arrow + column.heading).rjust(
                        width - 1)[-(width - 1):] + " "
                self.put(y, text, self.styles["sorted"], x)
            x += width

    def draw_table(self) -> None:
        rows = self.table_rows()
        order = "descending" if self.descending else "ascending"
        what = connmon.plural(len(rows), "program" if self.fleet else "row")
        formatter = self.formatter(COLUMNS, rows, self.body_height())
        context = (f"{what}{' over every host' if self.fleet else ''}, "
                   f"sorted by {self.sort_column.heading} {order}"
                   + self.filter_text()
                   + (", gone hidden" if self.hide_gone else "")
                   + self.more_text(len(rows)))
        if self.picture is not None and not self.picture["rows"]:
            context = ("No applications yet: waiting for applications "
                       "to report" + self.glyphs["cut"])
        self.put(HEADER_LINES - 2, context)
        self.draw_headings(HEADER_LINES - 1, formatter.layout,
                           self.sort_column)
        self.draw_rows(formatter, rows, HEADER_LINES, self.body_height())

    def more_text(self, count: int) -> str:
        """What the context line adds when ``count`` lines do not all fit:
        which are shown, and how many more there are (the footer says it
        too, first, for a narrow screen)."""
        height = self.body_height()
        self.shown = ""
        if count <= height:
            return ""
        last = min(count, self.top + height)
        self.shown = f"{self.top + 1}-{last} of {count}"
        return (f" ({self.top + 1}-{last} shown, "
                f"{count - last + self.top} more)")

    def filter_text(self) -> str:
        return f", filter {self.filter!r}" if self.filter else ""

    def draw_sort(self) -> None:
        self.put(HEADER_LINES - 2, "Sort by (Enter chooses, Esc returns):",
                 self.styles["title"])
        height = self.body_height() + 1
        self.selected = max(0, min(self.selected, len(COLUMNS) - 1))
        self.top = max(0, min(self.top, self.selected,
                              len(COLUMNS) - height))
        self.top = max(self.top, self.selected - height + 1)
        for y, column in enumerate(COLUMNS[self.top:self.top + height],
                                   HEADER_LINES - 1):
            order = "descending" if column.descending else "ascending"
            attr = curses.A_REVERSE if column is COLUMNS[self.selected] else (
                curses.A_NORMAL)
            self.put(y, f"  {column.heading:<10} {order}", attr)

    def draw_sites(self) -> None:
        rows = self.site_rows()
        self.draw_listing(
            f"{connmon.plural(len(rows), 'checkout site')} holding "
            "connections, most held first (a program waiting on top)"
            + self.filter_text(), SITE_COLUMNS, rows)

    def draw_alarms(self) -> None:
        rows = self.alarm_rows()
        self.draw_listing(
            f"{connmon.plural(len(rows), 'alarm')}: checkouts waiting or "
            "timing out first, then database servers near their limit, "
            "exhausted pools, leaks" + self.filter_text(), ALARM_COLUMNS,
            rows)

    def draw_databases(self) -> None:
        rows = self.database_rows()
        picture = self.picture or {}
        servers = connmon.plural(len(picture.get("databases", ())),
                                 "database server")
        more = left_out(picture, "databases", "server")
        self.draw_listing(
            f"{servers}{f' ({more})' if more else ''}: the pools' "
            "connections (USE% of MAX_CONN, ! from 90%) and summed limits"
            + self.filter_text(), DATABASE_COLUMNS, rows)

    def draw_listing(self, caption: str, columns: List[Column],
                     rows: List[Dict[str, Any]]) -> None:
        """A view of one table under its caption (sites, databases)."""
        formatter = self.formatter(columns, rows, self.body_height())
        self.put(HEADER_LINES - 2, caption + self.more_text(len(rows)),
                 self.styles["title"])
        self.draw_headings(HEADER_LINES - 1, formatter.layout)
        self.draw_rows(formatter, rows, HEADER_LINES, self.body_height())

    def draw_procs(self) -> None:
        """The drilled-into program: its processes, its pool pressure, the
        daemon's history of its conn and ckout, its long holders (oldest
        first) and its pools; one document under the processes' headings,
        scrolled by the moving keys."""
        host, prog = self.drill
        procs = self.proc_rows()
        count = connmon.plural(len(procs), "process", "processes") if (
            procs is not None) else ("paused (Space resumes)" if self.paused
                                     else "loading")
        where = f"on {host}" if host else "on every host"
        columns = PROC_COLUMNS if host is None else PROC_COLUMNS[1:]
        holders = sorted(({"pid": proc["pid"], **holder}
                          for proc in procs or ()
                          for holder in proc.get("long_holders", ())),
                         key=lambda holder: -holder["age"])
        pools = [{"pid": proc["pid"], **pool} for proc in procs or ()
                 for pool in proc.get("pools", ())]
        _, width = self.window.getmaxyx()
        thresholds = thresholds_of(self.picture or {})
        layout = plan(columns, width, procs or [], procs or [])
        document = self.listing_lines(layout, procs or [], thresholds)
        document += [(line.strip(), curses.A_NORMAL)
                     for line in self.pressure_of_drilled()]
        document += self.history_lines()
        for caption, columns, lines in (
                (f"{connmon.plural(len(holders), 'long holder')} (held past "
                 "the apps' hold_warn_seconds), oldest first",
                 HOLDER_COLUMNS, holders),
                (f"{connmon.plural(len(pools), 'pool')}, with the "
                 "database of each", POOL_COLUMNS, pools)):
            document.append((caption, self.styles["title"]))
            if lines:   # an empty section shows no headings
                layout_below = plan(columns, width, lines, lines)
                document.append((headings(layout_below, self.glyphs["cut"]),
                                 self.styles["heading"]))
                document += self.listing_lines(layout_below, lines, {})
            document.append(("", curses.A_NORMAL))
        height = self.body_height()
        self.top = max(0, min(self.top, len(document) - height))
        self.put(HEADER_LINES - 2, f"{prog} {where}: {count}"
                 + self.more_text(len(document)), self.styles["title"])
        self.draw_headings(HEADER_LINES - 1, layout)
        shown = document[self.top:self.top + height]
        below = len(document) - self.top - len(shown)
        if below and shown:
            shown[-1] = (f"{self.glyphs['down']} {below + 1} more lines "
                         "(Down/j, PgDn, End)", self.styles["title"])
        for y, (text, attr) in enumerate(shown, HEADER_LINES):
            self.put(y, text() if callable(text) else text, attr)

    def listing_lines(self, layout: Layout, rows: List[Dict[str, Any]],
                      thresholds: Dict[str, float]) -> List[tuple]:
        """A document's lines for ``rows`` (formatted when drawn)."""
        line_format = Formatter(layout, rows, thresholds, self.cutter)
        return [(functools.partial(line_format.line, row),
                 self.row_attr(row, False)) for row in rows]

    def pressure_of_drilled(self) -> List[str]:
        """The drilled-into row's pool pressure, all of it (two lines);
        from the fleet view, the program's over every host."""
        host, prog = self.drill
        rows = (self.picture or {}).get("rows", [])
        for row in by_program(rows) if host is None else rows:
            if row["progname"] == prog and host in (None, row["hostname"]):
                return pressure_lines(row, always=True)
        return ["", ""]

    def history_lines(self) -> List[tuple]:
        """Sparklines of the drilled-into row's conn and ckout as the
        daemon kept them (one sample a second), on one scale (the
        highest conn): a caption and two lines."""
        history = self.feed.history
        title = self.styles["title"]
        if history is None or history.get("row") != self.drill:
            return [("History: loading", title), ("", 0), ("", 0)]
        _, width = self.window.getmaxyx()
        room = max(0, width - 13)
        series = [history["conn"][-room:] if room else [],
                  history["ckout"][-room:] if room else []]
        top = max(history["conn"], default=0)
        seconds = len(history["conn"]) * history["interval"]
        lines = [(f"History of the last {seconds:g}s (connmond's, one "
                  f"sample every {history['interval']:g}s), 0 to "
                  f"{connmon.plural(top, 'connection')}", title)]
        for label, values in zip(("CONN", "CKOUT"), series):
            now = cell(values[-1] if values else None)
            lines.append((f"{label:<6}{now:>6} "
                          + sparkline(values, top, self.glyphs["spark"]),
                          curses.A_NORMAL))
        return lines

    def draw_footer(self) -> None:
        height, width = self.window.getmaxyx()
        if self.editing_filter:
            text = f"Filter: {self.filter}_  (Enter keeps, Esc clears)"
        elif self.confirming:
            text = ("Clear the maxima for every console and Prometheus? "
                    "y clears, any other key keeps them")
        elif self.message:
            text = self.message
        elif self.feed.state == "disconnected":
            text = self.feed.error
        elif self.view == "help":
            text = "Up/Down/PgUp/PgDn scroll  any other key returns"
        else:
            words = [("F5 by host" if self.fleet and binding.action ==
                      "toggle_fleet" else binding.label)
                     for binding in self.bindings() if binding.label]
            if self.filter:
                words.insert(0, f"[filter: {self.filter}]")
            if self.shown:
                words.insert(0, f"[{self.shown}]")
            text = ""   # as many whole words as fit
            for word in words:
                if len(text) + len(word) > width:
                    break
                text += word + "  "
        self.put(height - 1, text, curses.A_REVERSE)


def run_screen(target: Target, interval: float, colors: bool,
               hide_gone: bool = False) -> None:
    """Draw the live screen until ``q`` or Ctrl-C; the terminal is restored
    either way.  (curses.wrapper would start colours even for --no-color.)
    """
    os.environ.setdefault("ESCDELAY", "25")    # Esc answers at once
    feed = Feed(target, interval)
    feed.start()
    window = curses.initscr()
    try:
        curses.noecho()
        curses.cbreak()
        Console(window, feed, colors and curses.has_colors(),
                hide_gone).run()
    finally:
        feed.stop()
        window.keypad(False)
        curses.echo()
        curses.nocbreak()
        curses.endwin()


# ---------------------------------------------------------------------------
# The demo: a private connmond and a few demo applications
# ---------------------------------------------------------------------------

# progname, copies, engine options, behaviour (see demo_app)
DEMO_PROGRAMS = [
    ("nova-api", 2, {}, "web"),
    ("nova-conductor", 1, {}, "holder"),
    ("keystone-leaky", 1, {"pool_size": 3, "max_overflow": 4,
                           "pool_timeout": 5}, "leaker"),
    ("glance-api", 1, {"pool_size": 2, "max_overflow": 1,
                       "pool_timeout": 1}, "exhauster"),
    ("cinder-cron", 1, {}, "cron"),
]
DEMO_RESTART_DELAY = 4.0     # seconds before a demo app that ended returns
DEMO_HOLD_WARN = 5           # the demo apps say where after 5 s, not 10


class Demo:
    """``connmon --demo``: a private connmond on a free loopback port and
    demo applications (SQLite engines through the plugin) that come and
    go.  ``stop`` ends every process it started."""

    def __init__(self) -> None:
        self.workdir = tempfile.TemporaryDirectory(prefix="connmon-demo-")
        self.address = ("127.0.0.1", free_port())
        here = os.path.dirname(os.path.abspath(connmon.__file__))
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [here] + [p for p in os.environ.get("PYTHONPATH", "").split(
                os.pathsep) if p]))
        self.daemon: Optional[subprocess.Popen] = None
        self.apps: List[Tuple[subprocess.Popen, tuple]] = []
        self.stopping = threading.Event()
        self.log = os.path.join(self.workdir.name, "demo.log")
        self.config = os.path.join(self.workdir.name, "demo.cfg")

    def start(self) -> None:
        with open(self.config, "w") as file:
            file.write(f"[connmon_service_demo]\nname: demo\n"
                       f"hold_warn_seconds: {DEMO_HOLD_WARN}\nnodes:\n"
                       f"    demo hostname=127.0.0.1:{self.address[1]} "
                       "bind=127.0.0.1\n")
        self.daemon = self.spawn(["-m", "connmon_server", "-c", self.config,
                                  "-s", "demo", "--log-level", "WARNING"])
        deadline = time.monotonic() + 15
        while not self.listening():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                with open(self.log) as file:
                    raise OSError("the demo connmond did not start: "
                                  + file.read())
            time.sleep(0.05)
        for program in DEMO_PROGRAMS:
            for _ in range(program[1]):
                self.start_app(program)
        threading.Thread(target=self.supervise, daemon=True,
                         name="connmon-demo").start()

    def spawn(self, argv: List[str]) -> subprocess.Popen:
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                [sys.executable, *argv], env=self.env,
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=log, start_new_session=True,
                preexec_fn=die_with(os.getpid()))

    def listening(self) -> bool:
        try:
            socket.create_connection(self.address, 0.5).close()
            return True
        except OSError:
            return False

    def start_app(self, program: tuple) -> None:
        name, _, options, behaviour = program
        url = (f"sqlite+pysqlite_connmon:///{self.workdir.name}/demo.sqlite"
               f"?connmon_service=demo&connmon_config={self.config}")
        code = (f"import connmon_console; connmon_console.demo_app("
                f"{name!r}, {url!r}, {options!r}, {behaviour!r})")
        self.apps.append((self.spawn(["-c", code]), program))

    def supervise(self) -> None:
        """Bring back demo apps that ended, after a pause (so their row
        turns red for a while)."""
        while not self.stopping.wait(DEMO_RESTART_DELAY):
            for proc, program in list(self.apps):
                if proc.poll() is not None and not self.stopping.is_set():
                    self.apps.remove((proc, program))
                    self.start_app(program)

    def stop(self) -> None:
        self.stopping.set()
        procs = [proc for proc, _ in self.apps] + [self.daemon]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in procs:
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                if proc.stdin is not None:
                    proc.stdin.close()
        self.workdir.cleanup()


PR_SET_PDEATHSIG = 1   # linux/prctl.h


def die_with(parent: int) -> Optional[Callable[[], None]]:
    """What a demo child runs before it starts (Linux): the kernel sends
    it SIGTERM when the console ends, however it ends (SIGKILL included),
    so that its connmond and applications never outlive it.  The demo
    applications also end when their stdin closes; elsewhere, that is
    all there is."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arrange() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:   # it died before prctl took effect
            os._exit(1)
    return arrange


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def leaky_request(engine: Any, leaked: List[Any]) -> None:
    """The demo's leak, as the sites view shows it: a request handler that
    keeps its connection in a list that outlives it, so the connection
    stays checked out after the thread has ended ("thread gone")."""
    import sqlalchemy as sa

    try:
        leaked.append(engine.connect())   # never closed: the leak
    except sa.exc.TimeoutError:
        os._exit(1)   # "crashes" when its pool is dry; the demo restarts it


def demo_app(name: str, url: str, options: Dict[str, Any],
             behaviour: str) -> None:
    """One demo application process (run by ``Demo`` with ``-c``).

    web: four threads doing short queries.  holder: holds two connections
    for half a minute at a time.  leaker: every few seconds a request
    thread that never returns its connection, until the pool is dry and it
    dies.  exhauster: more threads than its pool allows, holding for
    seconds.  cron: works a few seconds and exits.  It exits when its
    parent (the console) goes away.
    """
    import sqlalchemy as sa
    from sqlalchemy.dialects import registry

    sys.argv[0] = name                     # the progname connmon shows
    # Also works from a plain checkout, without installed entry points.
    registry.register("sqlite.pysqlite_connmon", "connmon", "sqlite_pysqlite")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)),
                     daemon=True).start()
    engine = sa.create_engine(url, poolclass=sa.pool.QueuePool,
                              connect_args={"check_same_thread": False},
                              **options)

    def use(hold: float) -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
                time.sleep(hold)
        except sa.exc.TimeoutError:
            pass   # the pool is exhausted: that is the point of the demo

    def forever(pause: Callable[[], float], hold: Callable[[], float]):
        while True:
            use(hold())
            time.sleep(pause())

    def threads(count: int, pause, hold) -> None:
        for _ in range(count):
            threading.Thread(target=forever, args=(pause, hold),
                             daemon=True).start()

    if behaviour == "web":
        threads(4, lambda: random.uniform(0, 0.3),
                lambda: random.expovariate(1 / 0.05))
    elif behaviour == "holder":
        threads(2, lambda: random.uniform(1, 3),
                lambda: random.uniform(20, 40))
    elif behaviour == "exhauster":
        threads(5, lambda: random.uniform(0, 0.5),
                lambda: random.uniform(1, 3))
    elif behaviour == "leaker":
        leaked: List[Any] = []
        while True:
            request = threading.Thread(target=leaky_request,
                                       args=(engine, leaked))
            request.start()
            request.join()
            time.sleep(random.uniform(2, 4))
    elif behaviour == "cron":
        deadline = time.monotonic() + random.uniform(6, 12)
        while time.monotonic() < deadline:
            use(random.uniform(0.05, 0.5))
        os._exit(0)
    threading.Event().wait()


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds from 0.05 to 3600")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connmon", description="Show the database connections that "
        "connmond knows of.",
        epilog="The manual: docs/ in connmon's source (README.txt lists it).")
    parser.add_argument("-c", "--config", help="config file (default "
                        f"{connmon.DEFAULT_CONFIG_FILE} if present)")
    parser.add_argument("-s", "--service", default=connmon.DEFAULT_SERVICE,
                        help="service name (default: %(default)s)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-n", "--node", help="attach to this node of the "
                       "service (default: any that answers)")
    where.add_argument("-H", "--host", help="attach to connmond at "
                       "HOST[:PORT] directly, without a config file")
    where.add_argument("--demo", action="store_true",
                       help="start a private connmond and demo "
                       "applications, and watch them")
    parser.add_argument("-i", "--interval", type=positive_float, default=1.0,
                        help="seconds between refreshes (default: "
                        "%(default)s)")
    parser.add_argument("--no-color", action="store_true",
                        help="no colours, attributes only")
    parser.add_argument("-u", "--secret-file", help="file holding the "
                        "secret consoles prove (default: the config's "
                        "console_secret_file or console_secret, else its "
                        "auth_secret_file or auth_secret)")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --once: print the snapshot as JSON")
    parser.add_argument("--wide", action="store_true",
                        help="with --once: every column, nothing cut, "
                        "whatever the terminal's width")
    parser.add_argument("--procs", action="store_true",
                        help="with --once: list each row's processes and "
                        "their pools")
    parser.add_argument("--hide-gone", action="store_true",
                        help="start with the rows of programs that are gone "
                        "hidden (x shows them)")
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {connmon.__version__}")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not args.once:
        parser.error("--json goes with --once")
    if args.procs and not args.once:
        parser.error("--procs goes with --once")
    if args.wide and not args.once:
        parser.error("--wide goes with --once")
    if args.demo and args.once:
        parser.error("--demo is interactive; it does not go with --once")
    if args.demo:
        return run_demo(args)
    try:
        target = Target(args)
    except connmon.ConfigError as err:
        print(f"connmon: error: {err}", file=sys.stderr)
        return 2
    if not args.once:
        return watch(target, args)
    try:
        return print_once(target, args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (connmon --once --json | head -1): no
        # traceback, and none at exit when Python flushes stdout again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def print_once(target: Target, args: argparse.Namespace) -> int:
    try:
        snapshot = fetch_snapshot(target, procs=args.procs)
    except connmon.NotConnmond as err:
        print(f"connmon: {err}", file=sys.stderr)
        return 1
    except (OSError, connmon.ProtocolError) as err:
        print(f"connmon: cannot get a snapshot from {target.description}: "
              f"{err}", file=sys.stderr)
        return 1
    if args.json:   # (dumps: one write, not one for each bit of JSON)
        print(json.dumps(snapshot, indent=1))
    else:
        print(format_table(escaped(snapshot), once_width(args)))
    sys.stdout.flush()
    return 0


def once_width(args: argparse.Namespace) -> Optional[int]:
    """The plain table's width: the terminal's (or $COLUMNS), unless
    --wide or the output is no terminal (a file, a pipe: nothing cut)."""
    if args.wide:
        return None
    if os.isatty(sys.stdout.fileno()):
        return shutil.get_terminal_size().columns
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else None


def no_terminal() -> bool:
    if sys.stdin.isatty() and sys.stdout.isatty():
        return False
    print("connmon: the live screen needs a terminal; use --once for "
          "scripts", file=sys.stderr)
    return True


def watch(target: Target, args: argparse.Namespace) -> int:
    if no_terminal():
        return 2
    # SIGTERM and SIGHUP end the screen like Ctrl-C: terminal restored.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.default_int_handler)
    try:
        run_screen(target, args.interval, not args.no_color, args.hide_gone)
    except KeyboardInterrupt:
        pass
    return 0


def run_demo(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("sqlalchemy") is None:
        print("connmon: error: --demo needs SQLAlchemy for its demo "
              "applications: pip install SQLAlchemy (or, in a checkout of "
              "this project, pip install '.[sqlalchemy]'; the PyPI "
              "package named connmon is another, older project)",
              file=sys.stderr)
        return 2
    if no_terminal():
        return 2
    demo = Demo()
    try:
        demo.start()
        args.host = connmon.format_address(demo.address)
        return watch(Target(args), args)
    except OSError as err:
        print(f"connmon: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:   # Ctrl-C while the demo was starting
        return 0
    finally:
        demo.stop()


if __name__ == "__main__":
    sys.exit(main())
