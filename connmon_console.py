"""connmon: the console that shows what connmond knows.

``connmon`` draws a live, ``top``-like screen with curses: one row per
host+program, refreshed every ``-i`` seconds, with htop's keys (``?`` lists
them).  ``connmon --once`` prints one snapshot as a plain table and
``--once --json`` as JSON.  ``connmon --demo`` starts a private connmond and
a few demo applications and watches them: the no-setup way to see it work.

Run ``connmon`` or ``python -m connmon_console``.
"""

from __future__ import annotations

import argparse
import codecs
import curses
import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

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


# ---------------------------------------------------------------------------
# Tables: shared by --once and the live screen
# ---------------------------------------------------------------------------


class Column:
    """One column of a table: its heading, the snapshot key it shows and
    its width.  Text columns are left-aligned and may grow or shrink with
    the terminal; number columns are right-aligned and fixed.  A location
    column ("file.py:123 in func") takes a double share of the width and
    is cut from the left, because its end is what tells lines apart."""

    def __init__(self, heading: str, key: str, width: int,
                 text: bool = False, location: bool = False,
                 show: Optional[Callable[[Any], str]] = None):
        self.heading = heading
        self.key = key
        self.width = width
        self.text = text or location
        self.location = location
        self.show = show or cell

    def cut(self, text: str, room: int) -> str:
        """``text`` in at most ``room`` characters."""
        if len(text) <= room:
            return text
        if self.location and room > len(CUT_MARK):
            return CUT_MARK + text[len(text) - room + len(CUT_MARK):]
        return text[:max(0, room)]

    def sort_key(self, row: Dict[str, Any]) -> Any:
        """Order rows by this column; "-" (None) below every number."""
        value = row[self.key]
        return value if self.text else (value is not None, value or 0)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if value < 1e5 else str(int(value))
    return str(value)


def since_text(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


MIN_TEXT_WIDTH = 8
MAX_TEXT_WIDTH = 40
CUT_MARK = "..."           # where a location lost its beginning

COLUMNS = [
    Column("HOSTNAME", "hostname", 20, text=True),
    Column("PROGNAME", "progname", 24, text=True),
    Column("NPROC", "nproc", 6),
    Column("CONN", "conn", 6),
    Column("CKOUT", "ckout", 6),
    Column("LIMIT", "limit", 6),
    Column("WAIT", "waiting", 5),
    Column("TMOUT/S", "timeouts_per_sec", 8),
    Column("MAXNPROC", "maxnproc", 9),
    Column("MAXCONN", "maxconn", 8),
    Column("MAXCKOUT", "maxckout", 9),
    Column("CKOUT/S", "ckout_per_sec", 8),
    Column("HOLD_MS", "hold_ms", 8),
    Column("OLDEST", "oldest", 8),
]

PROC_COLUMNS = [
    Column("PID", "pid", 9),
    Column("CONN", "conn", 6),
    Column("CKOUT", "ckout", 6),
    Column("LIMIT", "limit", 6),
    Column("WAIT", "waiting", 5),
    Column("MAXCONN", "maxconn", 8),
    Column("MAXCKOUT", "maxckout", 9),
    Column("MAXWAIT", "maxwaiting", 8),
    Column("OLDEST", "oldest", 8),
    Column("CONNECTED SINCE", "since", 21, show=since_text),
]

# The drill-down's pools: each process's engines and their databases.
POOL_COLUMNS = [
    Column("PID", "pid", 9),
    Column("POOL", "pool", 5),
    Column("CONN", "conn", 6),
    Column("CKOUT", "ckout", 6),
    Column("WAIT", "waiting", 5),
    Column("LIMIT", "limit", 6),
    Column("DATABASE", "endpoint", 0, location=True,
           show=lambda endpoint: endpoint_text(endpoint)),
]

# The databases view: per database server, its total, its databases and
# the programs holding its connections.
DATABASE_COLUMNS = [
    Column("SERVER", "hostname", 20, text=True),
    Column("DATABASE / PROGRAM", "progname", 30, text=True),
    Column("CONN", "conn", 6),
    Column("CKOUT", "ckout", 6),
    Column("WAIT", "waiting", 5),
    Column("LIMIT", "limit", 7),
    Column("MAX_CONN", "max_connections", 9),
    Column("NPROC", "nproc", 6),
]

# The drill-down's long holders: connections held past the apps'
# hold_warn_seconds, with where they were checked out and what they are
# now: held at a line, "leaked" or "thread gone" (see README.txt).
HOLDER_COLUMNS = [
    Column("PID", "pid", 9),
    Column("AGE", "age", 8),
    Column("SITE", "site", 0, location=True),
    Column("HELD AT", "held_at", 0, location=True),
]

# The sites view: every program's checkout sites, for the whole fleet.
SITE_COLUMNS = [
    Column("HOSTNAME", "hostname", 20, text=True),
    Column("PROGNAME", "progname", 24, text=True),
    Column("HELD", "held", 6),
    Column("OLDEST", "oldest", 8),
    Column("SITE", "site", 0, location=True),
]

Layout = List[Tuple[Column, int]]


def fit(columns: List[Column], width: int) -> Layout:
    """Share what the number columns leave of ``width`` among the text
    columns (a location counting twice, and taking what the others leave);
    the caller cuts lines at the screen's edge."""
    texts = [column for column in columns if column.text]
    locations = sum(1 for column in texts if column.location)
    spare = width - sum(c.width for c in columns if not c.text)
    share = max(MIN_TEXT_WIDTH, min(MAX_TEXT_WIDTH, spare // max(
        1, len(texts) + locations)))
    rest = (spare - share * (len(texts) - locations)) // max(1, locations)
    wide = max(MIN_TEXT_WIDTH, rest)
    return [(column, (wide if column.location else share) if column.text
             else column.width) for column in columns]


def natural(columns: List[Column], rows: List[Dict[str, Any]]) -> Layout:
    """Widths for plain text: wide enough for every name, nothing cut."""
    return [(column, max([column.width] + [len(column.show(row[column.key]))
                                           + 2 for row in rows])
             if column.text else column.width) for column in columns]


def format_line(layout: Layout, values: List[str]) -> str:
    cells = []
    for (column, width), text in zip(layout, values):
        text = column.cut(text, width - 1)
        cells.append(text.ljust(width) if column.text
                     else text.rjust(width - 1) + " ")
    return "".join(cells)


def headings(layout: Layout) -> str:
    return format_line(layout, [column.heading for column, _ in layout])


def format_row(layout: Layout, row: Dict[str, Any]) -> str:
    return format_line(layout, [column.show(row[column.key])
                                for column, _ in layout])


def summary_lines(snapshot: Dict[str, Any]) -> List[str]:
    return [
        f"Hosts       [{snapshot['hosts']} / {snapshot['max_hosts']}]",
        f"Processes   [{snapshot['processes']} / {snapshot['max_processes']}]",
        f"Connections [{snapshot['connections']} / "
        f"{snapshot['max_connections']}]",
        f"Checkouts   [{snapshot['checkouts']} / {snapshot['max_checkouts']}"
        f" / {snapshot['checkouts_per_sec']}/s]   Waiting "
        f"[{snapshot.get('waiting', 0)} / {snapshot.get('max_waiting', 0)}]"
        f"   Timeouts {snapshot.get('timeouts_per_sec', 0)}/s",
    ]


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


def format_table(snapshot: Dict[str, Any]) -> str:
    layout = natural(COLUMNS, snapshot["rows"])
    lines = [f"connmon: service {snapshot['service']} node {snapshot['node']}"]
    lines += summary_lines(snapshot)
    lines.append("")
    lines.append(headings(layout).rstrip())
    marks = {"live": "", "gone": "  (gone)", "exhausted": "  (exhausted)",
             "waiting": "  (waiting)"}
    for row in snapshot["rows"]:
        lines.append(format_row(layout, row).rstrip() + marks[row_state(row)])
        lines += pressure_lines(row)
        lines += site_lines(row)
        for proc in row.get("procs", ()):
            lines += process_lines(proc)
    lines += database_lines(snapshot.get("databases", ()))
    return "\n".join(lines)


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
    server = connmon.server_name(endpoint)
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


def database_lines(servers: List[Dict[str, Any]]) -> List[str]:
    """The plain table's databases: per server (its connections and the
    pools' summed limits against its max_connections, when the operator
    gave it), then per database."""
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
            users = ",".join(database["users"]) or "-"
            lines.append(f"    {database['database'] or '-'} (users "
                         f"{users}): conn {database['conn']}  ckout "
                         f"{database['ckout']}  waiting "
                         f"{database['waiting']}  pool limits "
                         f"{cell(database['limit'])}  {database['nproc']} "
                         f"processes, {database['nprog']} programs")
    return lines


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


class Feed:
    """Keeps the console's one connection to connmond and fetches a
    snapshot every interval on a thread of its own, so that a slow or dead
    daemon never freezes the screen.  When the connection is lost it keeps
    the last snapshot and tries every node of the service again."""

    CONNECT_TIMEOUT = 3.0
    REPLY_TIMEOUT = 10.0

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
        while not self._stopping:
            if conn is None:
                try:
                    conn = self.target.connect(self.CONNECT_TIMEOUT)
                    conn.sock.settimeout(self.REPLY_TIMEOUT)
                    address = connmon.format_address(
                        conn.sock.getpeername()[:2])
                except (OSError, connmon.ProtocolError) as err:
                    self._publish(state="disconnected", error=str(err))
                    self._sleep()
                    continue
            try:
                self._serve_requests(conn)
                snapshot = conn.request({"op": "snapshot",
                                         "procs": self.want_procs})
            except (OSError, connmon.ProtocolError) as err:
                conn.close()
                conn = None
                self._publish(state="disconnected", error=str(err))
                self._sleep()
                continue
            del snapshot["op"]
            self._publish(snapshot=snapshot, state="connected", error="",
                          attached_to=address)
            self._sleep()
        if conn is not None:
            conn.close()

    def _serve_requests(self, conn: connmon.Connection) -> None:
        while self._requests:
            conn.request(self._requests[0])
            with self.lock:
                self._requests.pop(0)

    def _sleep(self) -> None:
        self._wake.wait(self.interval)
        self._wake.clear()


# ---------------------------------------------------------------------------
# The live screen
# ---------------------------------------------------------------------------

HELP = """\
connmon keys

  q            quit
  ? h          this help (any key returns)
  Up Down      select a row
  PgUp PgDn    scroll a page
  Home End     first / last row
  < >  F6      sort by the previous / next column
  r            reverse the sort order
  /            filter rows by a part of the hostname or progname
               (Enter keeps it, Esc clears it)
  p            pause / resume updates
  Enter        show the processes of the selected row: their long
               holders (where each was checked out, where it is held
               now) and a history of conn and ckout
  s            sites: which line of which program holds the most
               connections, fleet-wide, programs whose checkouts wait
               first (Enter: that program's processes)
  d            databases: per database server, its databases and the
               programs holding its connections, against its limit
  Esc  Bkspc   back to the previous view
  c            clear the maxima (in connmond: every console sees it)

Rows: green = program has live processes, red = none left,
highlighted = every pooled connection is checked out (ckout >= limit),
white on red = checkouts are waiting for a connection (WAIT > 0).
OLDEST: age in seconds of the longest checked-out connection.
HOLD_MS: mean checkout hold time over the last second.
WAIT: checkouts waiting for a connection; TMOUT/S: checkouts that gave
up waiting (pool timeout) in the last second.
"""

UNICODE_GLYPHS = {"dash": "\N{EM DASH}", "up": "\N{UPWARDS ARROW}",
                  "down": "\N{DOWNWARDS ARROW}",
                  "spark": "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"}
ASCII_GLYPHS = {"dash": "-", "up": "^", "down": "v", "spark": "_.:-=+*#"}
ESC = 27
ENTER_KEYS = (curses.KEY_ENTER, 10, 13)
BACK_KEYS = (ESC, curses.KEY_BACKSPACE, 127, 8)
HEADER_LINES = 7           # title, four totals, context, column headings
HISTORY_SAMPLES = 120      # refreshes of conn and ckout kept per row
HISTORY_LINES = 3          # the drill-down's history: caption, two lines
HOLDERS_HEADER_LINES = 2   # the drill-down's long holders: caption, headings
PRESSURE_LINES = 2         # the drill-down's waits, timeouts, connects


class History:
    """The conn and ckout of every row over its last refreshes, for the
    drill-down's sparklines.  Bounded: HISTORY_SAMPLES a row, and rows that
    left the picture are forgotten."""

    def __init__(self) -> None:
        self.series: Dict[Tuple[str, str], Deque[Tuple[int, int]]] = {}

    def record(self, rows: List[Dict[str, Any]]) -> None:
        kept = self.series
        self.series = {}
        for row in rows:
            key = (row["hostname"], row["progname"])
            samples = kept.get(key) or deque(maxlen=HISTORY_SAMPLES)
            samples.append((row["conn"], row["ckout"]))
            self.series[key] = samples

    def of(self, key: Tuple[str, str]) -> List[Tuple[int, int]]:
        return list(self.series.get(key, ()))


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
                      "sorted": curses.A_REVERSE | curses.A_BOLD}
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
                    ("sorted", curses.COLOR_BLACK, curses.COLOR_CYAN)), 1):
                curses.init_pair(number, fg, bg)
                self.attrs[name] = curses.color_pair(number)

    def __getitem__(self, name: str) -> int:
        return self.attrs[name]


class Console:
    """The interactive screen: what is shown (table, processes, help), in
    which order, filtered how, paused or not, and the keys that change it.
    Only the visible rows are formatted, so thousands of rows are cheap."""

    def __init__(self, window, feed: Feed, interval: float, colors: bool):
        self.window = window
        self.feed = feed
        self.interval = interval
        self.styles = Styles(colors)
        # curses encodes text for the locale: only UTF-8 has the pretty ones
        self.glyphs = (UNICODE_GLYPHS
                       if codecs.lookup(window.encoding).name == "utf-8"
                       else ASCII_GLYPHS)
        self.picture: Optional[Dict[str, Any]] = None
        self.history = History()
        self.seen_generation = -1
        self.view = "table"                # or "procs", "sites", "help"
        self.sort_index = 0
        self.reverse = False
        self.filter = ""
        self.editing_filter = False
        self.paused = False
        self.selected = 0
        self.selected_key: Any = None      # the selected row follows its row
        self.top = 0
        self.drill: Tuple[str, str] = ("", "")
        # the views under this one, each with its selection and scroll
        self.previous: List[tuple] = []
        self.message = ""

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        try:
            curses.curs_set(0)
        except curses.error:
            pass   # a terminal that cannot hide its cursor
        self.window.timeout(100)           # poll the feed ten times a second
        self.window.keypad(True)
        drawn, key = -1, -1
        while True:
            # Draw after a key, or when the feed has news; else stay idle.
            generation = self.feed.generation
            if key != -1 or generation != drawn:
                self.adopt()
                self.draw()
                drawn = generation
            key = self.window.getch()
            if key != -1 and not self.handle(key):
                return

    def adopt(self) -> None:
        """Take the feed's newest snapshot, unless paused."""
        feed = self.feed
        if feed.generation != self.seen_generation and not self.paused:
            with feed.lock:
                self.seen_generation = feed.generation
                snapshot = feed.snapshot
            if snapshot is not None and snapshot is not self.picture:
                self.picture = snapshot
                self.history.record(snapshot["rows"])

    # -- keys -----------------------------------------------------------------

    def handle(self, key: int) -> bool:
        """Act on one key; False means quit."""
        if self.editing_filter:
            self.edit_filter(key)
            return True
        if key == ord("q"):
            return False
        if key == curses.KEY_RESIZE:
            self.window.clear()   # repaint everything at the new size
        elif self.view == "help":
            self.close_view()
        elif key in (ord("?"), ord("h")):
            self.open_view("help")
        elif key == ord("p"):
            self.paused = not self.paused
        elif key == ord("c"):
            self.feed.ask({"op": "clear_maxima"})
            self.message = "asked connmond to clear the maxima"
        elif self.view == "table":
            self.handle_table(key)
        elif key in BACK_KEYS or (key == ord("s") and self.view == "sites") \
                or (key == ord("d") and self.view == "databases"):
            self.close_view()
        elif key in ENTER_KEYS and self.view == "sites":
            self.drill_into(self.site_rows())
        else:
            self.move(key)
        return True

    def handle_table(self, key: int) -> None:
        if key in ENTER_KEYS:
            self.drill_into(self.table_rows())
        elif key == ord("s"):
            self.open_view("sites")
        elif key == ord("d"):
            self.open_view("databases")
        elif key in (ord(">"), curses.KEY_F6):
            self.sort_index = (self.sort_index + 1) % len(COLUMNS)
        elif key == ord("<"):
            self.sort_index = (self.sort_index - 1) % len(COLUMNS)
        elif key == ord("r"):
            self.reverse = not self.reverse
        elif key == ord("/"):
            self.editing_filter = True
        elif key == ESC:
            self.filter = ""
        else:
            self.move(key)

    def edit_filter(self, key: int) -> None:
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
        steps = {curses.KEY_UP: -1, curses.KEY_DOWN: 1,
                 curses.KEY_PPAGE: -page, curses.KEY_NPAGE: page,
                 curses.KEY_HOME: -1 << 30, curses.KEY_END: 1 << 30}
        if key in steps:
            self.selected += steps[key]
            self.selected_key = None
        if key in (curses.KEY_PPAGE, curses.KEY_NPAGE):
            self.top += steps[key]

    def drill_into(self, rows: List[Dict[str, Any]]) -> None:
        """Open the processes of the selected one of ``rows``."""
        if rows:
            row = rows[min(self.selected, len(rows) - 1)]
            self.drill = (row["hostname"], row["progname"])
            self.open_view("procs")

    def open_view(self, view: str) -> None:
        """Show ``view`` over the current one, which Esc comes back to
        with its selection where it was."""
        self.previous.append((self.view, self.selected, self.top,
                              self.selected_key))
        self.view = view
        self.selected = self.top = 0
        self.selected_key = None
        self.want_procs()

    def close_view(self) -> None:
        if self.previous:
            (self.view, self.selected, self.top,
             self.selected_key) = self.previous.pop()
            self.want_procs()

    def want_procs(self) -> None:
        """Only the drill-down needs the (bigger) snapshot with processes:
        ask for it at once when it opens."""
        wanted = self.view == "procs"
        if wanted and not self.feed.want_procs:
            self.feed.refresh_now()
        self.feed.want_procs = wanted

    # -- what to show ---------------------------------------------------------

    def table_rows(self) -> List[Dict[str, Any]]:
        if self.picture is None:
            return []
        rows = self.picture["rows"]
        if self.filter:
            needle = self.filter.lower()
            rows = [row for row in rows if needle in row["hostname"].lower()
                    or needle in row["progname"].lower()]
        column = COLUMNS[self.sort_index]
        # Ties keep the snapshot's hostname, progname order.
        return sorted(rows, key=column.sort_key, reverse=self.reverse)

    def site_rows(self) -> List[Dict[str, Any]]:
        """Every (filtered) row's checkout sites in one list: those of
        programs whose checkouts wait for a connection first (where the
        connections they wait for are held), then the sites holding the
        most connections, then the oldest."""
        rows = [{"hostname": row["hostname"], "progname": row["progname"],
                 "waiting": row.get("waiting", 0), **site}
                for row in self.table_rows()
                for site in row.get("sites") or ()]
        return sorted(rows, key=lambda r: (not r["waiting"], -r["held"],
                                           -r["oldest"], r["hostname"],
                                           r["progname"], r["site"] or ""))

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
            lines += [{**program, "hostname": name, "progname":
                       f"{program['hostname']} {program['progname']}"}
                      for program in server["programs"]]
            rows += [{"max_connections": server["max_connections"],
                      **line} for line in lines
                     if needle in name.lower() + line["progname"].lower()]
        return rows

    def proc_rows(self) -> Optional[List[Dict[str, Any]]]:
        """The drilled-into row's processes; None until they arrive."""
        for row in (self.picture or {}).get("rows", []):
            if (row["hostname"], row["progname"]) == self.drill:
                return row.get("procs")
        return []

    def body_height(self) -> int:
        height, _ = self.window.getmaxyx()
        return max(0, height - HEADER_LINES - 1)

    # -- drawing --------------------------------------------------------------

    def put(self, y: int, text: str, attr: int = curses.A_NORMAL) -> None:
        height, width = self.window.getmaxyx()
        if 0 <= y < height:
            try:
                self.window.addnstr(y, 0, text.ljust(width), width, attr)
            except curses.error:
                pass   # writing the bottom-right cell; the text is drawn

    def draw(self) -> None:
        self.window.erase()
        self.put(0, self.title(), self.styles["title"])
        if self.view == "help":
            for y, line in enumerate(HELP.splitlines(), 1):
                self.put(y, line)
        else:
            if self.picture is not None:
                for y, line in enumerate(summary_lines(self.picture), 1):
                    self.put(y, line)
            if self.view == "procs":
                self.draw_procs()
            elif self.view == "sites":
                self.draw_sites()
            elif self.view == "databases":
                self.draw_databases()
            else:
                self.draw_table()
        self.draw_footer()
        self.window.refresh()

    def title(self) -> str:
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
                 f"every {self.interval:g}s"]
        if self.paused:
            parts.append("PAUSED")
        return f" {self.glyphs['dash']} ".join(parts)

    def row_attr(self, row: Dict[str, Any], selected: bool) -> int:
        attr = self.styles["stale" if self.feed.state != "connected"
                           else row_state(row)]
        return attr | curses.A_REVERSE if selected else attr

    def draw_rows(self, layout: Layout, rows: List[Dict[str, Any]],
                  height: Optional[int] = None) -> None:
        """The visible slice of ``rows`` (``height`` lines under the
        headings), keeping the selection on screen and on its row when the
        rows move (htop does the same)."""
        height = self.body_height() if height is None else height
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
        self.selected_key = row_identity(rows[self.selected]) if rows else (
            None)
        for y, row in enumerate(rows[self.top:self.top + height],
                                HEADER_LINES):
            self.put(y, format_row(layout, row),
                     self.row_attr(row, self.top + y - HEADER_LINES
                                   == self.selected))

    def draw_section(self, y: int, caption: str, columns: List[Column],
                     caption_attr: int = curses.A_NORMAL) -> Layout:
        """A caption line and column headings from line ``y``; returns the
        layout for the rows below them."""
        _, width = self.window.getmaxyx()
        layout = fit(columns, width)
        self.put(y, caption, caption_attr)
        self.put(y + 1, headings(layout), self.styles["heading"])
        return layout

    def filter_text(self) -> str:
        return f", filter {self.filter!r}" if self.filter else ""

    def draw_table(self) -> None:
        _, width = self.window.getmaxyx()
        rows = self.table_rows()
        order = "descending" if self.reverse else "ascending"
        layout = self.draw_section(
            HEADER_LINES - 2, f"{len(rows)} rows, sorted by "
            f"{COLUMNS[self.sort_index].heading} {order}"
            + self.filter_text(), COLUMNS)
        column, start = COLUMNS[self.sort_index], 0
        for other, column_width in layout:
            if other is column:
                if start < width:
                    self.put_heading(start, column, column_width)
                break
            start += column_width
        self.draw_rows(layout, rows)

    def put_heading(self, x: int, column: Column, width: int) -> None:
        """Mark the sort column's heading, htop style: highlighted, with
        an arrow in the space after it."""
        mark = self.glyphs["down" if self.reverse else "up"]
        text = format_line([(column, width)], [column.heading])
        text = ((text.rstrip() + mark).ljust(width)[:width] if column.text
                else text[:-1] + mark)
        _, screen_width = self.window.getmaxyx()
        try:
            self.window.addnstr(HEADER_LINES - 1, x, text, screen_width - x,
                                self.styles["sorted"])
        except curses.error:
            pass

    def draw_sites(self) -> None:
        rows = self.site_rows()
        layout = self.draw_section(
            HEADER_LINES - 2, f"{len(rows)} checkout sites holding "
            "connections, most held first (a program waiting on top)"
            + self.filter_text() + " (Enter: processes, Esc returns)",
            SITE_COLUMNS, self.styles["title"])
        self.draw_rows(layout, rows)

    def draw_databases(self) -> None:
        rows = self.database_rows()
        servers = len((self.picture or {}).get("databases", ()))
        layout = self.draw_section(
            HEADER_LINES - 2, f"{servers} database servers: the pools' "
            "connections and summed limits against MAX_CONN"
            + self.filter_text() + " (Esc returns)", DATABASE_COLUMNS,
            self.styles["title"])
        self.draw_rows(layout, rows)

    def draw_procs(self) -> None:
        """The drilled-into program: its processes, the history of its
        conn and ckout, and its long holders, oldest first."""
        host, prog = self.drill
        procs = self.proc_rows()
        count = f"{len(procs)} processes" if procs is not None else (
            "paused (p resumes)" if self.paused else "loading")
        layout = self.draw_section(
            HEADER_LINES - 2, f"{prog} on {host}: {count} (Esc returns)",
            PROC_COLUMNS, self.styles["title"])
        holders = sorted(({"pid": proc["pid"], **holder}
                          for proc in procs or ()
                          for holder in proc.get("long_holders", ())),
                         key=lambda holder: -holder["age"])
        pools = [{"pid": proc["pid"], **pool} for proc in procs or ()
                 for pool in proc.get("pools", ())]
        room = (self.body_height() - PRESSURE_LINES - HISTORY_LINES
                - 2 * HOLDERS_HEADER_LINES)
        below = len(holders) + len(pools)
        shown = min(len(procs or ()), max(1, room - min(below, room // 2)))
        self.draw_rows(layout, procs or [], shown)
        y = HEADER_LINES + shown
        for y, line in enumerate(self.pressure_of_drilled(), y):
            self.put(y, line.strip())
        y += 1
        self.draw_history(y)
        y += HISTORY_LINES
        room = max(0, room - shown)
        for caption, columns, lines in (
                (f"{len(holders)} long holders (held past the apps' "
                 "hold_warn_seconds), oldest first", HOLDER_COLUMNS,
                 holders[:max(1, room // 2)]),
                (f"{len(pools)} pools and their databases", POOL_COLUMNS,
                 pools)):
            layout = self.draw_section(y, caption, columns,
                                       self.styles["title"])
            lines = lines[:room]
            for y, line in enumerate(lines, y + HOLDERS_HEADER_LINES):
                self.put(y, format_row(layout, line),
                         self.row_attr(line, False))
            y += 2   # the last line, and a blank one
            room -= len(lines) + 1

    def pressure_of_drilled(self) -> List[str]:
        """The drilled-into row's pool pressure, all of it (two lines)."""
        for row in (self.picture or {}).get("rows", ()):
            if (row["hostname"], row["progname"]) == self.drill:
                return pressure_lines(row, always=True)
        return ["", ""]

    def draw_history(self, y: int) -> None:
        """Sparklines of the drilled-into row's conn and ckout over the
        console's last refreshes, on one scale (the highest conn)."""
        samples = self.history.of(self.drill)
        _, width = self.window.getmaxyx()
        top = max((conn for conn, _ in samples), default=0)
        self.put(y, f"History of the last {len(samples)} refreshes "
                 f"(every {self.interval:g}s), 0 to {top} connections",
                 self.styles["title"])
        for y, (label, index) in enumerate((("CONN", 0), ("CKOUT", 1)),
                                           y + 1):
            values = [sample[index] for sample in samples]
            now = cell(values[-1] if values else None)
            text = f"{label:<6}{now:>6} "
            room = max(0, width - len(text) - 1)
            self.put(y, text + sparkline(values[-room:] if room else [],
                                         top, self.glyphs["spark"]))

    def draw_footer(self) -> None:
        height, _ = self.window.getmaxyx()
        if self.editing_filter:
            text = f"Filter: {self.filter}_  (Enter keeps, Esc clears)"
        elif self.feed.state == "disconnected":
            text = self.feed.error
        else:
            text = self.message or (
                "q quit  ? help  </> sort  r reverse  / filter  p pause  "
                "Enter processes  s sites  d databases  c clear maxima")
            if self.filter:
                text = f"[filter: {self.filter}]  " + text
        self.put(height - 1, text, curses.A_REVERSE)
        self.message = ""


def run_screen(target: Target, interval: float, colors: bool) -> None:
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
        Console(window, feed, interval, colors and curses.has_colors()).run()
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
                stderr=log, start_new_session=True)

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
                proc.stdin.close()
        self.workdir.cleanup()


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
    where.add_argument("--demo", action="store_true",
                       help="start a private connmond and demo "
                       "applications, and watch them")
    parser.add_argument("-i", "--interval", type=positive_float, default=1.0,
                        help="seconds between refreshes (default: "
                        "%(default)s)")
    parser.add_argument("--no-color", action="store_true",
                        help="no colours, attributes only")
    parser.add_argument("-u", "--secret-file", help="file holding the "
                        "service's shared secret (default: the config's "
                        "auth_secret_file or auth_secret)")
    parser.add_argument("--once", action="store_true",
                        help="print one snapshot and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --once: print the snapshot as JSON")
    parser.add_argument("--procs", action="store_true",
                        help="with --once: list each row's processes and "
                        "their pools")
    return parser


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not args.once:
        parser.error("--json goes with --once")
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
        run_screen(target, args.interval, not args.no_color)
    except KeyboardInterrupt:
        pass
    return 0


def run_demo(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("sqlalchemy") is None:
        print("connmon: error: --demo needs SQLAlchemy for its demo "
              "applications: pip install 'connmon[sqlalchemy]'",
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
