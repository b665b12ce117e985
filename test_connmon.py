"""connmon's tests: real connmond processes on loopback ports, real
SQLAlchemy engines against the real MariaDB, PostgreSQL and SQLite, real
forked workers.  Every wait is bounded.

Run with ``python -m pytest -v test_connmon.py`` (see README.txt).
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import hypothesis
import hypothesis.strategies as st
import pytest

import connmon
import connmon_console

HERE = os.path.dirname(os.path.abspath(__file__))
# Subprocesses import connmon from this checkout, whatever is installed.
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [HERE] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
              if p]))
IN_CI = os.environ.get("CI") == "true"
MYSQL_URL = os.environ.get("CONNMON_TEST_MYSQL",
                           "mysql+pymysql://root@127.0.0.1:3306/test")
POSTGRESQL_URL = os.environ.get("CONNMON_TEST_POSTGRESQL",
                                "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        message = f"database at {url} not reachable: {err}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class Daemon:
    """A real connmond subprocess on a free loopback port."""

    def __init__(self, tmp_path, port: Optional[int] = None,
                 extra_config: str = "", config=None,
                 node: str = "node1"):
        """A one-node service "test" of its own, or ``node`` of the service
        "test" in an existing ``config`` file."""
        self.port = port or free_port()
        self.node = node
        if config is None:
            config = tmp_path / f"connmon-{self.port}.cfg"
            config.write_text(textwrap.dedent(f"""\
                [connmon_service_test]
                name: test
                nodes:
                    node1 hostname=127.0.0.1:{self.port} bind=127.0.0.1
                """) + extra_config)
        self.config = config
        self.log = tmp_path / f"connmond-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

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
            socket.create_connection(("127.0.0.1", self.port), 0.5).close()
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
        conn = connmon.open_connection([("127.0.0.1", self.port)], "console")
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
import json, os, signal, sys, threading, time
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

def sender_ticks():
    import connmon
    (sender,) = connmon._senders.values()
    with open(f"/proc/self/task/{sender._thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])

for line in sys.stdin:
    cmd, *args = line.split()
    n = int(args[0]) if args else 0
    if cmd == "hold":
        hold(n)
    elif cmd == "release":
        for _ in range(n):
            held.pop().close()
    elif cmd == "query":
        for _ in range(n):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1")).scalar()
    elif cmd == "invalidate":
        conn = held.pop()
        conn.invalidate()
        conn.close()
    elif cmd == "dispose":
        engine.dispose()
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
    elif cmd == "ticks":
        answer("ok", sender_ticks())
        continue
    elif cmd == "exit":
        break
    answer("ok")
'''


class App:
    """A real application process, driven one command at a time."""

    def __init__(self, tmp_path, url: str, progname: str = "app.py",
                 **engine_options: Any):
        script = tmp_path / progname
        script.write_text(APP_SCRIPT)
        self.progname = progname
        self.proc = subprocess.Popen(
            [sys.executable, str(script), url, json.dumps(engine_options)],
            cwd=HERE, env=CHILD_ENV, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"{progname}.log", "ab"),
            start_new_session=True, text=True)
        self.log = tmp_path / f"{progname}.log"
        self.workers: List[int] = []

    def __call__(self, command: str, timeout: float = 30.0) -> List[str]:
        """Send a command; return the words after "ok"."""
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        assert line.startswith("ok"), (
            f"{command!r} failed: {line!r}\n{self.log.read_text()}")
        return line.split()[1:]

    def fork(self, n: int) -> List[int]:
        self.workers = [int(pid) for pid in self(f"fork {n}")]
        return self.workers

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def apps(tmp_path):
    started: List[App] = []

    def start(url: str, progname: str = "app.py", **options: Any) -> App:
        app = App(tmp_path, url, progname, **options)
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


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


def write(tmp_path, text: str):
    path = tmp_path / "connmon.cfg"
    path.write_text(textwrap.dedent(text))
    return str(path)


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


@pytest.mark.parametrize("text, message", [
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
     "File contains no section headers."),
])
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


# ---------------------------------------------------------------------------
# The plugin against real databases
# ---------------------------------------------------------------------------

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
    daemon.wait_row("queuepool.py", nproc=1, conn=0, ckout=0)
    app("hold 5")
    daemon.wait_row("queuepool.py", conn=5, ckout=5, maxconn=5, maxckout=5)
    app("release 3")
    # Two returns fill the pool (size 2); the third is overflow and closed.
    daemon.wait_row("queuepool.py", conn=4, ckout=2)
    app("release 2")   # two more overflow closes
    daemon.wait_row("queuepool.py", conn=2, ckout=0)
    app("query 20")
    daemon.wait_row("queuepool.py", conn=2, ckout=0)
    app("dispose")
    row = daemon.wait_row("queuepool.py", conn=0, ckout=0, nproc=1)
    assert (row["maxconn"], row["maxckout"], row["maxnproc"]) == (5, 5, 1)
    snapshot = daemon.snapshot()
    assert (snapshot["connections"], snapshot["max_connections"],
            snapshot["max_checkouts"], snapshot["processes"]) == (0, 5, 5, 1)


def test_dispose_with_connections_checked_out(daemon, apps):
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "dispose.py", pool_size=5)
    app("hold 3")
    app("release 1")
    daemon.wait_row("dispose.py", conn=3, ckout=2)
    app("dispose")   # the idle one is closed; the two held belong to the
    daemon.wait_row("dispose.py", conn=2, ckout=2)   # old pool...
    app("release 2")  # ...and are gone once returned to it
    daemon.wait_row("dispose.py", conn=0, ckout=0)
    app("hold 1")     # the new pool works and is counted
    daemon.wait_row("dispose.py", conn=1, ckout=1)


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


def test_forked_workers(daemon, apps):
    require_database(MYSQL_URL)
    app = apps(monitored(MYSQL_URL, daemon), "forking.py")
    daemon.wait_row("forking.py", nproc=1)
    workers = app.fork(8)
    held = {pid: i % 3 + 1 for i, pid in enumerate(workers)}
    total = sum(held.values())
    # The parent that created the engine is a process of the program too.
    row = daemon.wait_row("forking.py", procs=True, nproc=9, conn=total,
                          ckout=total)
    by_pid = {p["pid"]: (p["conn"], p["ckout"]) for p in row["procs"]}
    assert by_pid == {app.proc.pid: (0, 0),
                      **{pid: (n, n) for pid, n in held.items()}}

    victim = workers[2]
    os.kill(victim, signal.SIGKILL)
    row = daemon.wait_row("forking.py", procs=True, timeout=5, nproc=8,
                          conn=total - held[victim])
    assert victim not in {p["pid"] for p in row["procs"]}

    app.stop()   # the parent and all its workers
    row = daemon.wait_row("forking.py", connected=False, nproc=0, conn=0,
                          ckout=0)
    assert (row["maxnproc"], row["maxconn"], row["maxckout"]) == (
        9, total, total)


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


class Relay(threading.Thread):
    """A loopback TCP relay that records every byte clients send."""

    def __init__(self, target_port: int):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        self.received = bytearray()
        self.lock = threading.Lock()
        self.start()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1",
                                                 self.target_port))
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


def test_no_credentials_on_the_wire_and_none_to_the_driver(daemon, apps):
    require_database(POSTGRESQL_URL)
    relay = Relay(daemon.port)
    password = "s3cr3t-Pa55word"   # trust auth: the server ignores it
    url = POSTGRESQL_URL.replace("postgres@", f"postgres:{password}@")
    url = url.replace("postgresql+psycopg2://", "postgresql+psycopg2_connmon://")
    url += f"?connmon_addr=127.0.0.1:{relay.port}"
    app = apps(url, "secret.py")
    app("hold 2")
    daemon.wait_row("secret.py", conn=2, ckout=2)
    relay.close()
    with relay.lock:
        wire = bytes(relay.received)
    assert b'"role":"app"' in wire and b'"op":"update"' in wire
    for secret in (password.encode(), b"postgresql", b"5432", b"connmon_addr"):
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
    ("connmon_service=nosuch&connmon_config={cfg}", "unknown service 'nosuch'"),
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


# ---------------------------------------------------------------------------
# Daemon and console behaviour
# ---------------------------------------------------------------------------


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
    assert "Connections [1 / 1]" in result.stdout
    assert "console_app.py" in result.stdout


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


def test_sigterm_stops_the_daemon_cleanly(tmp_path):
    daemon = Daemon(tmp_path)
    daemon.kill(signal.SIGTERM)
    assert daemon.proc.returncode == 0
    assert "connmond stopping" in daemon.log.read_text()


# ---------------------------------------------------------------------------
# HA cluster (issue 4): three real connmond nodes on loopback
# ---------------------------------------------------------------------------


class ThreeNodes:
    """Nodes node1..node3 of service "test", each its own connmond."""

    def __init__(self, tmp_path):
        ports = [free_port() for _ in range(3)]
        self.config = tmp_path / "cluster.cfg"
        self.config.write_text(
            "[connmon_service_test]\nname: test\nnodes:\n" + "".join(
                f"    node{i} hostname=127.0.0.1:{port} bind=127.0.0.1\n"
                for i, port in enumerate(ports, 1)))
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
    pooled = dict(held)   # a released connection stays in the pool
    started = {name: apps(cluster.url(tmp_path, name), name, pool_size=20)
               for name in held}
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


def _session_news(ident: str, session: int, held: int, ends: bool
                  ) -> List[tuple]:
    """What one node tells others about one session of a process: it
    attached (with ``held`` connections checked out), and maybe it ended."""
    proc = connmon.ProcessState(ident, "host", "prog.py", 42, session)
    for conn in range(held):
        proc.apply(connmon.CHECKOUT, conn, 0.0, 1)
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
    picture = connmon.Picture()
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
