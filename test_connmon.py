"""connmon's tests: real connmond processes on loopback ports, real
SQLAlchemy engines against the real MariaDB, PostgreSQL and SQLite, real
forked workers.  Every wait is bounded.

Run with ``python -m pytest -v test_connmon.py`` (see README.txt).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List, Optional

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
                 extra_config: str = ""):
        self.port = port or free_port()
        self.config = tmp_path / f"connmon-{self.port}.cfg"
        self.config.write_text(textwrap.dedent(f"""\
            [connmon_service_test]
            name: test
            nodes:
                node1 hostname=127.0.0.1:{self.port} bind=127.0.0.1
            """) + extra_config)
        self.log = tmp_path / f"connmond-{self.port}.log"
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_server", "-c", str(self.config),
             "-s", "test", "--log-level", "DEBUG"],
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
import json, os, signal, sys, time
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
# Issue 5: hardening -- auth, TLS, heartbeats, hostile input; the app never
# notices
# ---------------------------------------------------------------------------

SECRET = "hunter2-Sh4red-Secret"


class SecureDaemon(Daemon):
    """A Daemon whose own snapshots (wait_row, ...) connect like any client
    of its service: with the secret and TLS of its config file."""

    def snapshot(self, procs: bool = False) -> Dict[str, Any]:
        service = connmon.find_service("test", str(self.config))
        conn = connmon.open_connection(
            [("127.0.0.1", self.port)], "console",
            security=connmon.Security.of_service(service))
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
        # (the queries opened a second connection, now idle in the pool)
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
    daemon = Daemon(tmp_path, extra_config="max_clients: 3\n")
    silent = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", daemon.port), 5)
            sock.settimeout(5)
            assert connmon.read_message(sock.makefile("rb"))["op"] == (
                "welcome")
            silent.append(sock)
        with socket.create_connection(("127.0.0.1", daemon.port), 5) as sock:
            sock.settimeout(5)
            rfile = sock.makefile("rb")
            assert connmon.read_message(rfile) == {
                "op": "error", "error": "too many connections (max_clients "
                "is 3)"}
            assert rfile.read() == b""
        full = console("-H", daemon.address)
        assert full.returncode == 1
        assert "refused: too many connections" in full.stderr
        assert "refused: too many connections" in daemon.log.read_text()

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
        assert daemon.snapshot()["service"] == "test"   # slots are free
        assert "no hello within 10s" in daemon.log.read_text()
    finally:
        for sock in silent:
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
    """A listener that misbehaves in one way:

    - "no-accept": never accepts (the kernel completes the TCP handshake;
      nothing is ever read or written);
    - "never-read": says a valid welcome and ready, then never reads nor
      answers a ping (with a tiny receive buffer, so whatever the app sends
      piles up in its send buffer);
    - "garbage": answers every connection with random bytes.
    """

    def __init__(self, behaviour: str):
        super().__init__(daemon=True)
        self.behaviour = behaviour
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.clients: List[socket.socket] = []
        if behaviour != "no-accept":
            self.start()

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.clients.append(client)   # kept open, never read
            if self.behaviour == "never-read":
                answer = connmon.encode(
                    {"op": "welcome", "version": 1, "service": "x",
                     "node": "fake", "nonce": "00", "heartbeat": 2}
                ) + connmon.encode({"op": "ready"})
            else:
                answer = os.urandom(4096) + b"\n"
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
    ("heartbeat_timeout: 0.1\n", "heartbeat_timeout must be a number from 1 "
     "to 3600, not '0.1'"),
    ("max_clients: many\n", "max_clients must be a number from 1 to "
     "1.04858e+06, not 'many'"),
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
                "progname": "fuzz.py", "pid": self.serial}
        sock.sendall(connmon.encode({"op": "hello", "version": 1,
                                     "role": role, "proc": proc}))
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
    return raw, app_lines, console_lines


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

        raw, app_lines, console_lines = hostile_strategies()

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
            "op": "update", "connect": [[i, 1] for i in range(10001)],
            "close": [], "checkout": [], "checkin": [], "checkouts": 0,
            "hold": [0, 0], "peak": [0, 0]}))
        assert connmon.read_message(rfile) == {
            "op": "error",
            "error": "more than 10000 connections in one process"}
    # The rows of programs that are gone make room for new ones.
    monkeypatch.setattr(connmon, "MAX_ROWS", 5)
    picture = connmon.Picture()
    for n in range(8):
        picture.attach(connmon.ProcessState(f"id{n}", "h", f"p{n}", n + 1),
                       owner=n)
        if n != 2:
            picture.detach(f"id{n}", n)
    assert sorted(picture.rows) == [("h", p) for p in
                                    ("p2", "p4", "p5", "p6", "p7")]
