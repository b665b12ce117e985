"""connmon benchmarks: they print figures, they assert nothing.

    python bench_connmon.py [--quick] [SCENARIO ...]

Every figure is a ratio or count inside one run (plugin vs plain engine,
interleaved), because the machines this runs on are shared and noisy; the
console's figure is CPU time (not wall time) per refresh, against a target.

A developer's tool, run where the test extra is installed: it shares the
tests' loopback port picker (``free_port`` from test_connmon.py), so that a
benchmark's daemons never take the ports a test run hands out.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Tuple

from test_connmon import CHECKIN, CHECKOUT, PoolListeners, free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def write_config(workdir: str, ports: List[int], options: str = "") -> str:
    """A service "bench" with one node a port, n1, n2... (and ``options``,
    lines of the service's section)."""
    config = os.path.join(workdir, f"bench-{ports[0]}.cfg")
    with open(config, "w") as file:
        file.write("[connmon_service_bench]\nname: bench\n" + options
                   + "nodes:\n" + "".join(
            f"    n{i} hostname=127.0.0.1:{port} bind=127.0.0.1\n"
            for i, port in enumerate(ports, 1)))
    return config


class Daemon:
    """A connmond subprocess on a free loopback port (or node ``node`` of
    an existing ``config``)."""

    def __init__(self, workdir: str, config: str = "", node: str = "n1",
                 port: int = 0, options: str = ""):
        self.port = port or free_port()
        config = config or write_config(workdir, [self.port], options)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_server", "-c", config, "-s",
             "bench", "-n", node, "--log-level", "ERROR"], cwd=HERE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("connmond did not start")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:   # (a machine far past its load)
            self.proc.kill()
            self.proc.wait()


# Rounds, and cycles a round, of the SQLite hot path (quick or not).
SQLITE_ROUNDS = {False: (25, 20000), True: (9, 8000)}


def fold_queued(engine) -> None:
    """Fold, here and now, what a monitored engine's listeners queued: the
    end of a timed round, so that connmon's fold of a round's events is
    paid in that round, not by whichever engine's round its fold thread's
    next batch (every FLUSH_DELAY) would fall in."""
    probe = getattr(engine.pool, "connmon_probe", None)
    if probe is not None:
        with probe.sender.lock:
            probe.sender._drain()


def cycle_time(engine, cycles: int) -> float:
    """Microseconds per connect()+close() cycle."""
    connect = engine.connect
    start = time.perf_counter()
    for _ in range(cycles):
        connect().close()
    fold_queued(engine)
    return (time.perf_counter() - start) / cycles * 1e6


def select_one_time(make_engine: Callable[[], object], cycles: int
                    ) -> float:
    """Microseconds per connect(); SELECT 1; close() cycle, on a new
    engine and so a new database connection: two engines, two connections
    of one server differ by a per cent or more on their own (measured),
    which must not pass for the cost of a listener.  The cycles are timed
    once connmon has told the daemon of the connection: the steady state."""
    engine = make_engine()

    def run(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
        fold_queued(engine)
        return time.perf_counter() - start

    run(5)            # connect, and warm up
    time.sleep(0.1)   # connmon tells the daemon of the new connection
    spent = run(cycles)
    engine.dispose()
    return spent / cycles * 1e6


def listening_engine(url: str, queue=None, **kwargs):
    """An engine with the two pool listeners any monitor needs, doing
    nothing, or appending an event tuple to ``queue``: the floor."""
    import sqlalchemy as sa
    from sqlalchemy import event

    engine = sa.create_engine(url, **kwargs)
    clock = time.monotonic
    if queue is None:
        event.listen(engine, "checkout", lambda d, r, p: None)
        event.listen(engine, "checkin", lambda d, r: None)
    else:
        event.listen(engine, "checkout", lambda d, r, p: queue.append(
            ("checkout", r.info.get("id"), clock(), 1, None, None)))
        event.listen(engine, "checkin", lambda d, r: queue.append(
            ("checkin", r.info.get("id"), clock(), None, None, None)))
    return engine


class Paired(NamedTuple):
    us: float      # median microseconds per cycle
    ratio: float   # median of the per-round ratios to the plain engines
    low: float     # that median's 95 % confidence interval (see
    high: float    # median_interval): what of the ratio is noise


def median_interval(values: List[float]) -> Tuple[float, float]:
    """A 95 % confidence interval of the median of ``values``, from their
    order statistics alone (the 8th and the 18th of 25), since the noise of
    a shared machine follows no known distribution: a ratio whose interval
    holds 1.0 is within the noise of its run."""
    ordered = sorted(values)
    half = 0.98 * math.sqrt(len(ordered))   # 1.96 standard deviations / 2
    low = max(0, math.floor(len(ordered) / 2 - half))
    high = min(len(ordered) - 1, math.ceil(len(ordered) / 2 + half) - 1)
    return ordered[low], ordered[high]


def interleaved(engines: Dict[str, Any], rounds: int, cycles: int,
                measure: Callable[[Any, int], float] = cycle_time
                ) -> Dict[str, Paired]:
    """Each engine (or whatever ``measure`` takes: for MariaDB, a function
    that makes one) measured once a round, in an order that turns round by
    round; its ratio to the plain engines of the same round (their mean,
    where there are two), so that a slow spell of the machine falls on both
    sides of each ratio."""
    samples: Dict[str, List[float]] = {name: [] for name in engines}
    ratios: Dict[str, List[float]] = {name: [] for name in engines}
    names = list(engines)
    plain = [name for name in names if name.startswith("plain")]
    for _ in range(2):   # warm up: pools filled, caches primed, sites named
        for engine in engines.values():
            measure(engine, cycles)
    time.sleep(0.1)      # connmon has told the daemon all that
    for turn in range(rounds):
        order = names[turn % len(names):] + names[:turn % len(names)]
        times = {name: measure(engines[name], cycles) for name in order}
        reference = statistics.mean(times[name] for name in plain)
        for name, us in times.items():
            samples[name].append(us)
            ratios[name].append(us / reference)
    return {name: Paired(statistics.median(samples[name]),
                         statistics.median(ratios[name]),
                         *median_interval(ratios[name]))
            for name in engines}


def report(title: str, rows: List[tuple]) -> None:
    print(f"\n{title}")
    for row in rows:
        print("  " + "  ".join(str(cell) for cell in row))


def ratio_rows(results: Dict[str, Paired], width: int) -> List[tuple]:
    return [(f"{name:<{width}}", f"{result.us:8.2f} us",
             f"ratio {result.ratio:.3f} ({result.low:.3f}-{result.high:.3f})")
            for name, result in results.items()]


def bench_hotpath(quick: bool) -> None:
    """App hot path: engine.connect(); close() on a SQLite QueuePool engine,
    plugin vs plain, with connmond up and down, checkout sites noted (the
    default) and not (connmon_sites=0) (target ratio <= 1.25)."""
    import sqlalchemy as sa

    rounds, cycles = SQLITE_ROUNDS[quick]
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        down = f"127.0.0.1:{free_port()}"   # nothing listens there
        db = os.path.join(workdir, "bench.sqlite")
        try:
            engines = {
                "plain": sa.create_engine(f"sqlite:///{db}"),
                "daemon up": sa.create_engine(
                    f"sqlite:///{db}?plugin=connmon"
                    f"&connmon_addr={daemon.address}"),
                "up, sites=0": sa.create_engine(
                    f"sqlite:///{db}?plugin=connmon&connmon_sites=0"
                    f"&connmon_addr={daemon.address}"),
                "daemon down": sa.create_engine(
                    f"sqlite+pysqlite_connmon:///{db}?connmon_addr={down}"),
                "down, sites=0": sa.create_engine(
                    f"sqlite+pysqlite_connmon:///{db}?connmon_addr={down}"
                    "&connmon_sites=0"),
            }
            results = interleaved(engines, rounds, cycles)
        finally:
            daemon.stop()
    report(f"hotpath: connect()+close() on SQLite QueuePool, {rounds} "
           f"rounds x {cycles} cycles, median of the rounds' ratios "
           "(target ratio <= 1.25)", ratio_rows(results, 13))


def bench_hotpath_mysql(quick: bool) -> None:
    """The same cycle with a real MariaDB SELECT 1 in it (target <= 1.02)."""
    import sqlalchemy as sa

    url = os.environ.get("CONNMON_TEST_MYSQL",
                         "mysql+pymysql://root@127.0.0.1:3306/test")
    rounds, cycles = (25, 100) if quick else (101, 100)
    floor: collections.deque = collections.deque(maxlen=1000)
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        try:
            # A second plain engine shows how far apart two identical
            # engines measure here: the noise a ratio must be read against;
            # the bare listeners, what any listener costs.
            engines = {
                "plain": lambda: sa.create_engine(url),
                "plain again": lambda: sa.create_engine(url),
                "no-op listeners": lambda: listening_engine(url),
                "append a tuple": lambda: listening_engine(url, floor),
                "connmon sites=0": lambda: sa.create_engine(
                    f"{url}?plugin=connmon&connmon_sites=0"
                    f"&connmon_addr={daemon.address}"),
                "connmon": lambda: sa.create_engine(
                    url.replace("+pymysql", "+pymysql_connmon")
                    + f"?connmon_addr={daemon.address}"),
            }
            results = interleaved(engines, rounds, cycles, select_one_time)
        finally:
            daemon.stop()
    report(f"hotpath-mysql: connect(); SELECT 1; close() on MariaDB, "
           f"{rounds} rounds x {cycles} cycles, median of the rounds' "
           "ratios (target ratio <= 1.02)", ratio_rows(results, 15))


class DrainedQueue:
    """A deque of event tuples that a thread empties every 10 ms, like
    a sender that queued tuples would: the design connmon left."""

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()
        self.stopped = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        popleft = self.queue.popleft
        while not self.stopped.wait(0.01):
            for _ in range(len(self.queue)):
                popleft()


def gc_runs(engine, cycles: int) -> float:
    """Collections of the cyclic garbage collector per 1,000 cycles."""
    before = sum(generation["collections"] for generation in gc.get_stats())
    cycle_time(engine, cycles)
    after = sum(generation["collections"] for generation in gc.get_stats())
    return (after - before) / cycles * 1000


def thread_cpu_us(thread: threading.Thread) -> float:
    """CPU microseconds one thread of this process has used."""
    clock = time.pthread_getcpuclockid(thread.ident)
    return time.clock_gettime(clock) * 1e6


def bench_breakdown(quick: bool) -> None:
    """Where the hot-path cost goes: the same cycle with listeners that do
    more and more of what connmon's do, how often each makes the garbage
    collector run, and the CPU connmon's fold thread spends per cycle."""
    import sqlalchemy as sa

    import connmon

    rounds, cycles = SQLITE_ROUNDS[quick]
    floor: collections.deque = collections.deque(maxlen=1000)
    drained = DrainedQueue()
    with tempfile.TemporaryDirectory() as workdir:
        db = os.path.join(workdir, "bench.sqlite")
        down = f"127.0.0.1:{free_port()}"   # nothing listens there
        engines = {
            "plain": sa.create_engine(f"sqlite:///{db}"),
            "no-op listeners": listening_engine(f"sqlite:///{db}"),
            "append a tuple": listening_engine(f"sqlite:///{db}", floor),
            "queue tuples": listening_engine(f"sqlite:///{db}",
                                             drained.queue),
            "connmon sites=0": sa.create_engine(
                f"sqlite:///{db}?plugin=connmon&connmon_addr={down}"
                "&connmon_sites=0"),
            "connmon": sa.create_engine(
                f"sqlite:///{db}?plugin=connmon&connmon_addr={down}"),
        }
        results = interleaved(engines, rounds, cycles)
        collections_per_1000 = {name: gc_runs(engine, 2 * cycles)
                                for name, engine in engines.items()}
        (sender,) = [s for s in connmon._senders.values()
                     if s.addresses == [connmon.parse_address(down)]]
        fold_cycles = 5 * cycles
        before = thread_cpu_us(sender.threads[0])
        cycle_time(engines["connmon"], fold_cycles)
        time.sleep(3 * connmon.FLUSH_DELAY)   # the last batch folded
        fold_us = (thread_cpu_us(sender.threads[0]) - before) / fold_cycles
        drained.stopped.set()
    plain = results["plain"].us
    report("breakdown: the cycle (two pool events) with listeners doing "
           "more and more; collections of the app's garbage collector per "
           "1,000 cycles",
           [row + (f"+{result.us - plain:5.2f} us",
                   f"gc {collections_per_1000[name]:4.2f}")
            for row, (name, result) in zip(ratio_rows(results, 16),
                                           results.items())])
    print(f"  connmon's fold thread: {fold_us:.2f} us CPU per cycle "
          f"(included above: it holds the GIL while it folds)")


class SyntheticApp:
    """A client that speaks the app protocol like a real process would,
    with pre-encoded messages so that it costs the generator little CPU."""

    def __init__(self, port: int, name: str, conns: int,
                 hostname: str = "bench-host", checked_out: int = 0):
        import connmon
        self.proc = connmon.ProcessState(os.urandom(8).hex(), hostname,
                                         name, os.getpid(), 1)
        self.conn = connmon.open_connection([("127.0.0.1", port)], "app",
                                            proc=self.proc.describe())
        listeners = PoolListeners(self.proc)
        for ident in range(conns):
            listeners(connmon.CONNECT, ident, 0.0, 1)
        for ident in range(checked_out):
            listeners(CHECKOUT, ident, 0.0, 1)
        self.conn.send(self.proc.message(0.0))
        ids = list(range(conns))
        base = {"connect": [], "close": [], "checkouts": 0, "hold": [0, 0],
                "peak": [conns, conns]}
        self.checkout_all = connmon.encode(dict(
            base, op="update", checkout=[[c, 0.001] for c in ids],
            checkin=[], checkouts=conns))
        self.checkin_all = connmon.encode(dict(
            base, op="update", checkout=[], checkin=ids,
            hold=[0.001 * conns, conns]))
        self.close_all = connmon.encode(dict(
            base, op="update", checkout=[], checkin=[], close=ids))

    def send(self, data: bytes) -> None:
        self.conn.sock.sendall(data)


def _drive(port: int, clients: int, rounds: int, conns: int,
           ready, go, done) -> None:
    """Run in a separate process: synthetic apps flooding one daemon."""
    apps = [SyntheticApp(port, f"flood{i}", conns) for i in range(clients)]
    ready.set()
    go.wait()
    burst = 20   # checkout/checkin pairs written per sendall
    for _ in range(0, rounds, burst):
        for app in apps:
            app.send((app.checkout_all + app.checkin_all) * burst)
    for app in apps:
        app.send(app.close_all)
    done.wait()


def cpu_seconds(stat_path: str) -> float:
    """User + system CPU seconds from a /proc/.../stat file."""
    with open(stat_path) as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu_seconds(pid: int) -> float:
    return cpu_seconds(f"/proc/{pid}/stat")


def daemon_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def snapshot(port: int) -> dict:
    import connmon
    conn = connmon.open_connection([("127.0.0.1", port)], "console",
                                   timeout=60)
    try:
        return conn.request({"op": "snapshot"})
    finally:
        conn.close()


def flood(port: int, watch_port: int, pid: int, clients: int, rounds: int,
          conns: int = 50) -> tuple:
    """Events/s and daemon CPU% for ``clients`` synthetic apps flooding the
    daemon on ``port``, finished when the daemon on ``watch_port`` has seen
    every last close."""
    import multiprocessing
    context = multiprocessing.get_context("fork")
    ready, go, done = context.Event(), context.Event(), context.Event()
    driver = context.Process(target=_drive, args=(
        port, clients, rounds, conns, ready, go, done))
    driver.start()
    try:
        ready.wait(60)
        deadline = time.monotonic() + 60
        while snapshot(watch_port)["connections"] != clients * conns:
            if time.monotonic() > deadline:
                raise RuntimeError("the synthetic apps never all arrived")
            time.sleep(0.01)
        cpu = daemon_cpu_seconds(pid)
        start = time.perf_counter()
        go.set()
        deadline = time.monotonic() + 300
        while True:
            now = snapshot(watch_port)
            if now["connections"] == 0 and now["processes"] == clients:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all events arrived: {now}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        cpu = daemon_cpu_seconds(pid) - cpu
    finally:
        done.set()
        driver.join(30)
    events = clients * (2 * rounds * conns + conns)
    return events / elapsed, 100 * cpu / elapsed, now


def bench_ingest(quick: bool) -> None:
    """Events/s one connmond takes from 1, 10 and 50 synthetic clients
    (target >= 300,000/s with 50); each checkout or checkin of a connection
    is one event."""
    rows = []
    rounds = 100 if quick else 400
    with tempfile.TemporaryDirectory() as workdir:
        for clients in (1, 10, 50):
            daemon = Daemon(workdir)
            try:
                rate, cpu, final = flood(daemon.port, daemon.port,
                                         daemon.proc.pid, clients,
                                         rounds * 50 // clients)
            finally:
                daemon.stop()
            rows.append((f"{clients:3d} clients", f"{rate:12,.0f} events/s",
                         f"daemon CPU {cpu:5.1f}%",
                         f"final conn {final['connections']} "
                         f"ckout {final['checkouts']} "
                         f"processes {final['processes']}"))
    report("ingest: events/s into one connmond (target >= 300,000 with 50 "
           "clients)", rows)


def _hold_clients(port: int, pipe) -> None:
    """Run in a separate process: open synthetic apps on command (each with
    three connections) and keep a trickle of updates going on all of them."""
    import threading
    apps: List[SyntheticApp] = []
    lock = threading.Lock()

    def trickle() -> None:
        while True:
            with lock:
                batch = apps[::10]
            for app in batch:
                app.send(app.checkout_all + app.checkin_all)
            time.sleep(0.5)

    threading.Thread(target=trickle, daemon=True).start()
    while True:
        wanted = pipe.recv()
        if wanted is None:
            return
        while len(apps) < wanted:
            app = SyntheticApp(port, f"scale{len(apps) % 500}", 3)
            with lock:
                apps.append(app)
        pipe.send(len(apps))


def bench_scale(quick: bool) -> None:
    """Thousands of concurrent client connections on one connmond: its RSS
    and how long a snapshot takes (targets: 5,000 clients, RSS <= 512 MB,
    connmon --once --json <= 1 s)."""
    import multiprocessing
    steps = (500, 1000, 2000, 5000) if not quick else (500, 2000, 5000)
    context = multiprocessing.get_context("fork")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        here, there = context.Pipe()
        holder = context.Process(target=_hold_clients,
                                 args=(daemon.port, there))
        holder.start()
        try:
            base = daemon_rss_mb(daemon.proc.pid)
            for clients in steps:
                here.send(clients)
                if not here.poll(300):
                    raise RuntimeError("the synthetic clients did not open")
                here.recv()
                start = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, "-m", "connmon_console", "--once",
                     "--json", "-H", daemon.address], cwd=HERE,
                    capture_output=True, text=True, timeout=60)
                once = time.perf_counter() - start
                processes = json.loads(result.stdout)["processes"]
                rss = daemon_rss_mb(daemon.proc.pid)
                rows.append((f"{clients:5d} clients", f"processes {processes}",
                             f"RSS {rss:6.1f} MB",
                             f"{(rss - base) / clients * 1000:5.1f} MB per "
                             "1,000 clients",
                             f"--once --json {once:5.2f} s"))
        finally:
            here.send(None)
            holder.join(30)
            daemon.stop()
    report("scale: concurrent clients on one connmond (targets: RSS <= 512 "
           "MB at 5,000, --once --json <= 1 s)", rows)


def bench_latency(quick: bool) -> None:
    """From a pool event in an application to the daemon's picture: p50 and
    p99 while the same process makes 1,000 and 50,000 events/s.  Each
    event comes just after the message that showed the one before, so
    it waits for the next (target p99 <= 1.25 s: COUNTERS_DELAY after
    that message, and the fold within FLUSH_DELAY)."""
    import threading

    import sqlalchemy as sa

    import connmon

    samples_wanted = 50 if quick else 200
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        db = os.path.join(workdir, "bench.sqlite")
        url = f"sqlite:///{db}?plugin=connmon&connmon_addr={daemon.address}"
        churn = sa.create_engine(url)
        probe = sa.create_engine(url, poolclass=sa.pool.NullPool)
        console = connmon.open_connection([("127.0.0.1", daemon.port)],
                                          "console")
        progname = connmon.progname()

        def conns() -> int:
            for row in console.request({"op": "snapshot"})["rows"]:
                if row["progname"] == progname:
                    return row["conn"]
            return 0

        def wait_for(count: int) -> float:
            start = time.perf_counter()
            while conns() != count:
                if time.perf_counter() - start > 10:
                    raise RuntimeError("event never arrived")
            return time.perf_counter() - start

        try:
            for rate in (1_000, 50_000):
                stop = threading.Event()
                achieved = []

                def load() -> None:
                    # Two events a cycle, paced to the rate on average.
                    start, done = time.perf_counter(), 0
                    while not stop.is_set():
                        churn.connect().close()
                        done += 2
                        ahead = done / rate - (time.perf_counter() - start)
                        if ahead > 0:
                            time.sleep(ahead)
                    achieved.append(done / (time.perf_counter() - start))

                worker = threading.Thread(target=load, daemon=True)
                worker.start()
                time.sleep(0.5)
                base = conns()
                samples = []
                for _ in range(samples_wanted):
                    conn = probe.connect()   # connect + checkout events
                    samples.append(wait_for(base + 1))
                    conn.close()             # checkin + close events
                    wait_for(base)
                stop.set()
                worker.join(10)
                samples.sort()
                p50 = samples[len(samples) // 2] * 1000
                p99 = samples[int(len(samples) * 0.99) - 1] * 1000
                rows.append((f"{rate:7,d} events/s (achieved "
                             f"{achieved[0]:7,.0f})", f"p50 {p50:6.1f} ms",
                             f"p99 {p99:6.1f} ms",
                             f"({len(samples)} samples)"))
        finally:
            console.close()
            daemon.stop()
    report("latency: pool event in the app -> in connmond's picture "
           "(target p99 <= 1.25 s)", rows)


class Blackhole:
    """A listener that accepts connections and never reads nor writes."""

    def __init__(self) -> None:
        import threading
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for sock in self.held:
            sock.close()


def bench_blackhole(quick: bool) -> None:
    """The app when connmond is unreachable in three ways: the hot-path
    ratio (as in hotpath) and the sender's CPU time while idle."""
    import sqlalchemy as sa

    import connmon

    rounds, cycles = SQLITE_ROUNDS[quick]
    idle = 5.0
    blackhole = Blackhole()
    faults = {
        "daemon down": f"127.0.0.1:{free_port()}",
        "never reads": blackhole.address,
        "unresolvable": "connmon-bench.invalid:5800",
    }
    with tempfile.TemporaryDirectory() as workdir:
        db = os.path.join(workdir, "bench.sqlite")
        engines = {"plain": sa.create_engine(f"sqlite:///{db}")}
        for name, address in faults.items():
            engines[name] = sa.create_engine(
                f"sqlite:///{db}?plugin=connmon&connmon_addr={address}")
        try:
            results = interleaved(engines, rounds, cycles)
            threads = {}
            for name, address in faults.items():
                (sender,) = [s for s in connmon._senders.values()
                             if s.addresses == [connmon.parse_address(
                                 address)]]
                threads[name] = sender.threads
            before = {name: sum(map(thread_cpu_us, pair))
                      for name, pair in threads.items()}
            time.sleep(idle)
            spent = {name: (sum(map(thread_cpu_us, pair)) - before[name]) / 1e6
                     for name, pair in threads.items()}
        finally:
            blackhole.close()
    report(f"blackhole: connect()+close() on SQLite QueuePool with connmond "
           f"unreachable, {rounds} rounds x {cycles} cycles, median of the "
           f"rounds' ratios (target ratio <= 1.25); the sender threads' CPU "
           f"seconds over {idle:g} s idle",
           [row + (f"sender cpu {spent[name]:.3f} s" if name in spent
                   else "",)
            for row, name in zip(ratio_rows(results, 12), results)])


def bench_cluster(quick: bool) -> None:
    """Events/s from 50 synthetic clients into node n1 of a three-node
    cluster until node n3 has seen them all, against a single node."""
    rounds = 20 if quick else 80
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        try:
            single, cpu, _ = flood(daemon.port, daemon.port,
                                   daemon.proc.pid, 50, rounds)
        finally:
            daemon.stop()
        rows.append(("single node ", f"{single:12,.0f} events/s",
                     f"daemon CPU {cpu:5.1f}%"))
        ports = [free_port() for _ in range(3)]
        config = write_config(workdir, ports)
        nodes = [Daemon(workdir, config, f"n{i}", port)
                 for i, port in enumerate(ports, 1)]
        try:
            deadline = time.monotonic() + 30
            while not all(all(snapshot(port)["peers"].values())
                          for port in ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster never formed")
                time.sleep(0.1)
            clustered, cpu, _ = flood(ports[0], ports[2], nodes[0].proc.pid,
                                      50, rounds)
        finally:
            for node in nodes:
                node.stop()
        rows.append(("3-node cluster", f"{clustered:12,.0f} events/s",
                     f"n1 CPU {cpu:5.1f}%",
                     f"ratio {clustered / single:.2f} of a single node"))
    report("cluster: events/s in at n1, seen at n3, vs one node", rows)


class FakeFleet:
    """Many application processes speaking connmon's protocol (a thousand
    real engines would swamp a small machine): each row is one host+program
    with one process of two connections, a third of them idle."""

    def __init__(self, address: tuple, rows: int, live: int):
        self.live: List[SyntheticApp] = []
        for index in range(rows):
            app = SyntheticApp(address[1], f"program-{index:04d}", 2,
                               f"host{index // 40:03d}",
                               checked_out=1 if index % 3 else 0)
            if index < live:
                self.live.append(app)
            else:
                app.conn.close()   # the row stays, as a program that is gone
        self.out = [False] * live

    def churn(self, count: int) -> None:
        """Check the connections out or in on ``count`` random live rows."""
        import random
        for index in random.sample(range(len(self.live)), count):
            app = self.live[index]
            out = self.out[index] = not self.out[index]
            app.send(app.checkout_all if out else app.checkin_all)

    def close(self) -> None:
        for app in self.live:
            app.conn.close()


CONSOLE_CHILD = r"""
import json, sys, time
import connmon, connmon_console as cc

address, refreshes, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
target = cc.Target(cc.build_parser().parse_args(["-H", address]))
feed = cc.Feed(target, 1.0)            # not started: fed by hand below
conn = target.connect()
window = cc.curses.initscr()
try:
    console = cc.Console(window, feed, True)
    samples = []
    for refresh in range(refreshes):
        if refresh == refreshes // 2:   # half the time sorted by name
            console.sort_by(cc.COLUMNS[0])
        start = time.process_time()
        snapshot = conn.request({"op": "snapshot", "procs": False})
        del snapshot["op"]
        feed._publish(snapshot=snapshot, state="connected",
                      attached_to=address)
        console.adopt()
        console.draw()
        samples.append(time.process_time() - start)
        time.sleep(0.02)               # let the fleet change the numbers
finally:
    cc.curses.endwin()
with open(out, "w") as file:
    json.dump({"samples": samples, "rows": len(snapshot["rows"])}, file)
"""


def bench_console(quick: bool) -> None:
    """Console CPU per refresh with 1,000 rows: fetch and decode a snapshot
    from a real connmond, sort, fit the columns and cut the names, draw
    with curses into a real pty, colours and alarms on (thresholds low
    enough that most rows have a marked cell) (target <= 20 ms)."""
    import pty
    import select
    refreshes = 40 if quick else 150
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir, options="hold_warn_seconds: 0.1\n"
                        "hold_ms_warn: 0.5\n")
        fleet = FakeFleet(("127.0.0.1", daemon.port), 1000, 300)
        out = os.path.join(workdir, "console.json")
        pid, master = pty.fork()
        if pid == 0:   # the console, on the pty's slave side
            os.environ.update(TERM="xterm-256color", LINES="50",
                              COLUMNS="160", PYTHONPATH=HERE)
            os.execv(sys.executable, [sys.executable, "-c", CONSOLE_CHILD,
                                      daemon.address, str(refreshes), out])
        try:
            while True:   # read the screen output, and keep rows changing
                fleet.churn(20)
                if select.select([master], [], [], 0.01)[0]:
                    try:
                        if not os.read(master, 1 << 16):
                            break
                    except OSError:   # the console closed the pty
                        break
            _, status = os.waitpid(pid, 0)
        finally:
            fleet.close()
            daemon.stop()
        if status != 0:
            raise RuntimeError(f"console child failed (status {status})")
        with open(out) as file:
            result = json.load(file)
    samples = sorted(result["samples"][5:])   # after warm-up
    ms = [sample * 1000 for sample in samples]
    report(f"console: CPU per refresh (snapshot request + JSON decode + "
           f"sort + curses draw), {result['rows']} rows, 160x50 pty, "
           f"{len(ms)} refreshes (target <= 20 ms)",
           [("median", f"{statistics.median(ms):6.2f} ms"),
            ("p90   ", f"{ms[int(len(ms) * 0.9)]:6.2f} ms"),
            ("max   ", f"{ms[-1]:6.2f} ms")])


def bench_history(quick: bool) -> None:
    """The daemon's history: memory for 10,000 rows once its rings are
    full, the CPU of one sample of them all (once a second, under the
    state lock), and of a console's history of a program on all of those
    hosts (the copy under the lock, the summing outside it)."""
    import tracemalloc
    import connmon_server
    rows = 10_000
    picture = connmon_server.Picture()
    for index in range(rows):
        row = picture._row((f"host{index:05d}", "nova-api"))
        row.conn, row.ckout = index % 50, index % 7
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    history = connmon_server.History()
    for _ in range(history.length):   # every ring full
        history.record(picture.rows)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    samples, picks, sums = [], [], []
    for _ in range(20 if quick else 100):   # timed without tracemalloc
        start = time.process_time()
        history.record(picture.rows)
        samples.append(time.process_time() - start)
    for _ in range(5 if quick else 20):
        start = time.process_time()
        picked = history.picked("nova-api", None)
        picks.append(time.process_time() - start)
        start = time.process_time()
        picked.sums()
        sums.append(time.process_time() - start)
    ms = {name: sorted(sample * 1000 for sample in times)
          for name, times in (("sample", samples), ("pick", picks),
                              ("sum", sums))}
    report(f"history: {rows:,} rows, {history.length} samples each "
           f"(target: within docs/performance.txt's 30 MB)",
           [("memory", f"{held / 1e6:6.1f} MB",
             f"{held / rows / 1000:.2f} KB a row")] + [
            (what, f"median {statistics.median(ms[name]):.1f} ms CPU",
             f"max {ms[name][-1]:.1f} ms") for what, name in (
                ("one sample of every row", "sample"),
                ("a program on every host: copy (lock held)", "pick"),
                ("  its sums (lock free)", "sum"))])


def hostile_messages(n: int) -> List[bytes]:
    """What one hostile client sends to sit at every cap the daemon has:
    its hello, then the most connections, all checked out, the most sites
    and held-at places, every text as long as allowed (each message under
    the 1 MiB limit)."""
    import connmon

    def place(kind: str, i: int) -> str:
        return (f"/{kind}/{i:04d}/" + "x" * connmon.MAX_LOCATION
                )[:connmon.MAX_LOCATION]

    def update(**fields: Any) -> dict:
        return {"op": "update", "connect": [], "close": [], "checkout": [],
                "checkin": [], "checkouts": 0, "hold": [0, 0],
                "peak": [0, 0], **fields}
    conns, sites = connmon.MAX_PROCESS_CONNECTIONS, connmon.MAX_SITES
    messages = [
        {"op": "hello", "version": 1, "role": "app", "proc": {
            "id": f"hostile-{n}", "hostname": "h" * connmon.MAX_NAME,
            "progname": f"{n:05d}" + "p" * 250, "pid": n + 1,
            "session": 1}},
        {"op": "state", "connect": [[c, 1] for c in range(conns)],
         "close": [], "checkout": [[c, 1.0] for c in range(conns)],
         "checkin": [], "checkouts": 0, "hold": [0, 0],
         "peak": [conns, conns], "pools": [[1, None]]},
        update(sites=[[i, place("site", i)] for i in range(sites)]),
        update(checkout_sites=[[c, c % sites] for c in range(conns)])]
    messages += [update(held_at=[[c, place("held", c)]
                                 for c in range(start, start + 1000)])
                 for start in range(0, conns, 1000)]
    return [connmon.encode(message) for message in messages]


def open_hostile(port: int, n: int) -> socket.socket:
    """A hostile client at every cap, its messages all taken in."""
    import connmon
    sock = socket.create_connection(("127.0.0.1", port), 30)
    rfile = sock.makefile("rb")
    connmon.read_message(rfile)   # welcome
    sock.sendall(b"".join(hostile_messages(n)) + connmon.encode(
        {"op": "ping"}))
    while connmon.read_message(rfile)["op"] != "pong":
        pass
    return sock


def timed_snapshot(port: int, procs: bool) -> tuple:
    """(seconds, bytes) of one snapshot request on a fresh console."""
    import connmon
    conn = connmon.open_connection([("127.0.0.1", port)], "console",
                                   timeout=60)
    try:
        start = time.perf_counter()
        conn.send({"op": "snapshot", "procs": procs})
        line = conn.rfile.readline(connmon.MAX_REPLY_BYTES + 1)
        return time.perf_counter() - start, len(line)
    finally:
        conn.close()


def bench_hostile(quick: bool) -> None:
    """Clients at every cap (trust boundaries): the daemon's RSS per such
    client (target <= 4 MiB), and the time and size of a snapshot with N of
    them (consoles always get one)."""
    steps = (1, 4, 8, 16) if not quick else (1, 8)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for clients in steps:
            daemon = Daemon(workdir)
            try:
                base = daemon_rss_mb(daemon.proc.pid)
                hostile = [open_hostile(daemon.port, n)
                           for n in range(clients)]
                rss = daemon_rss_mb(daemon.proc.pid)
                plain = min(timed_snapshot(daemon.port, False)
                            for _ in range(3))
                procs = min(timed_snapshot(daemon.port, True)
                            for _ in range(3))
                rows.append((f"{clients:3d} hostile clients",
                             f"RSS {(rss - base) / clients:5.2f} MiB each",
                             f"snapshot {plain[0] * 1000:6.1f} ms "
                             f"{plain[1] / 1024:6.0f} KiB",
                             f"with procs {procs[0] * 1000:6.1f} ms "
                             f"{procs[1] / 1024:6.0f} KiB"))
                for sock in hostile:
                    sock.close()
            finally:
                daemon.stop()
    report("hostile: clients at every cap (5,000 connections checked out, "
           "1,000 sites, 1,000 held-at places, 255-character texts)", rows)


def _mass_clients(port: int, clients: int, pipe) -> None:
    """Run in a separate process: ``clients`` apps (one connection each)
    attach, then all drop at once when this process exits."""
    import resource
    import connmon
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state = connmon.encode({"op": "state", "connect": [[1, 1]], "close": [],
                            "checkout": [[1, 0.5]], "checkin": [],
                            "checkouts": 0, "hold": [0, 0], "peak": [1, 1],
                            "pools": [[1, 5]]})
    socks = []
    for n in range(clients):   # from 200 hosts (loopback addresses)
        sock = socket.create_connection(
            ("127.0.0.1", port), 60,
            source_address=(f"127.0.0.{n % 200 + 2}", 0))
        sock.sendall(connmon.encode({
            "op": "hello", "version": 1, "role": "app", "proc": {
                "id": f"mass-{n}", "hostname": f"host{n % 200}",
                "progname": f"prog{n % 50}", "pid": n + 1,
                "session": 1}}) + state)
        socks.append(sock)
    pipe.send(len(socks))
    pipe.recv()
    os._exit(0)   # every connection drops at once


def bench_disconnect(quick: bool) -> None:
    """10,000 clients (1,000 quick) that drop at once: how long until they
    have left the picture (target <= 10 s), and how long consoles wait for
    a snapshot meanwhile (target <= 2 s)."""
    import multiprocessing
    import connmon
    clients = 1000 if quick else 10000
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        here, there = context.Pipe()
        mass = context.Process(target=_mass_clients,
                               args=(daemon.port, clients, there))
        mass.start()
        try:
            if not here.poll(600):
                raise RuntimeError("the clients did not open")
            here.recv()
            deadline = time.monotonic() + 300
            attached = 0
            while attached < clients:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {attached} clients attached")
                time.sleep(0.5)
                try:
                    attached = snapshot(daemon.port)["processes"]
                except OSError:   # still accepting the others
                    pass
            rss = daemon_rss_mb(daemon.proc.pid)
            console = connmon.open_connection([("127.0.0.1", daemon.port)],
                                              "console", timeout=60)
            waits = []
            start = time.perf_counter()
            here.send("drop")
            while True:
                asked = time.perf_counter()
                left = console.request({"op": "snapshot"})["processes"]
                waits.append(time.perf_counter() - asked)
                if not left:
                    break
                if asked - start > 300:
                    raise RuntimeError(f"{left} processes never left")
                time.sleep(0.05)
            gone = time.perf_counter() - start
            console.close()
        finally:
            mass.join(30)
            daemon.stop()
    waits.sort()
    report(f"disconnect: {clients:,} clients drop at once (targets: gone "
           "within 10 s, snapshots within 2 s meanwhile)",
           [(f"daemon RSS with them {rss:6.1f} MB",),
            (f"all gone from the picture after {gone:6.2f} s",),
            (f"snapshots meanwhile: {len(waits)}, median "
             f"{statistics.median(waits) * 1000:6.1f} ms, max "
             f"{waits[-1] * 1000:6.1f} ms",)])


# An application serving requests on 8 workers at once, each request a
# checkout, QUERIES MariaDB SELECT 1 and a checkin: threads, or green
# threads once eventlet or gevent has patched the process (so it runs in a
# process of its own).  The engines, plain, with two no-op pool listeners
# (what any monitor of pool events costs), monitored without checkout sites
# (what the leak finder costs) and monitored, take turns as in
# interleaved().
RUNTIME_APP = r'''
import json, sys, threading, time
runtime, url, address, rounds, requests, queries, daemon_pid = sys.argv[1:8]
if runtime == "eventlet":
    import eventlet
    eventlet.monkey_patch()
elif runtime == "gevent":
    from gevent import monkey
    monkey.patch_all()
import sqlalchemy as sa
import bench_connmon

WORKERS = 8
QUERIES = range(int(queries))

def served(engine, requests):
    """Microseconds per request, WORKERS workers serving their shares."""
    def worker():
        for _ in range(requests // WORKERS):
            with engine.connect() as conn:
                for _ in QUERIES:
                    conn.execute(sa.text("SELECT 1"))
    workers = [threading.Thread(target=worker) for _ in range(WORKERS)]
    start = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    bench_connmon.fold_queued(engine)
    return (time.perf_counter() - start) * 1e6 / requests

engines = {
    "plain": sa.create_engine(url, pool_size=WORKERS),
    "plain again": sa.create_engine(url, pool_size=WORKERS),
    "no-op listeners": bench_connmon.listening_engine(url,
                                                      pool_size=WORKERS),
    "connmon sites=0": sa.create_engine(
        f"{url}?plugin=connmon&connmon_sites=0&connmon_addr={address}",
        pool_size=WORKERS),
    "connmon": sa.create_engine(
        f"{url}?plugin=connmon&connmon_addr={address}", pool_size=WORKERS),
}
results = bench_connmon.interleaved(engines, int(rounds), int(requests),
                                    served)
print(json.dumps({name: list(result) for name, result in results.items()}))
print(json.dumps(bench_connmon.connmon_cpu(engines["connmon"], served,
                                           5 * int(requests),
                                           int(daemon_pid))))
'''


def daemon_cpu_us(pid: int) -> float:
    """CPU microseconds all threads of process ``pid`` have used (from
    the scheduler's nanosecond counts: connmond's share of a few
    seconds is far below the clock ticks of /proc/PID/stat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                total += int(stat.read().split()[0])
        except FileNotFoundError:   # a thread that ended meanwhile
            pass
    return total / 1000


def connmon_cpu(engine, serve: Callable[[Any, int], float], requests: int,
                daemon_pid: int) -> Dict[str, float]:
    """CPU microseconds a request of connmon's own threads (folding and
    sending) and of connmond, while ``engine`` serves ``requests``: counted
    per thread, so the machine's load moves them little, unlike the
    ratios; run in the process that made the engine."""
    import connmon

    (sender,) = connmon._senders.values()
    threads_before = sum(map(thread_cpu_us, sender.threads))
    daemon_before = daemon_cpu_us(daemon_pid)
    serve(engine, requests)
    # the last batch folded and sent
    time.sleep(connmon.COUNTERS_DELAY + 3 * connmon.FLUSH_DELAY)
    return {"threads": (sum(map(thread_cpu_us, sender.threads))
                        - threads_before) / requests,
            "daemon": (daemon_cpu_us(daemon_pid) - daemon_before) / requests}


# An application serving RATE requests a second (a checkout, a MariaDB
# SELECT 1, a checkin) on one thread, steady: it says "start" and "end"
# around SECONDS of it, with the voluntary context switches of connmon's
# threads so far (each one a wake-up: a sleep, a poll or a lock waited).
PACED_APP = r'''
import sys, time
import sqlalchemy as sa
import connmon

url, rate, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
engine = sa.create_engine(url)

def wake_ups():
    (sender,) = connmon._senders.values()
    total = 0
    for thread in sender.threads:
        with open(f"/proc/self/task/{thread.native_id}/status") as status:
            for line in status:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total

def serve(seconds):
    next_at = time.monotonic()
    end = next_at + seconds
    while next_at < end:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1").scalar()
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))

serve(2.0)   # attached, and steady
print("start", wake_ups(), flush=True)
serve(seconds)
print("end", wake_ups(), flush=True)
'''


class WireCounter:
    """A loopback relay to a daemon that counts the messages (lines) its
    clients send through it."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.target_port = target_port
        self.messages = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client = self.listener.accept()[0]
                upstream = socket.create_connection(("127.0.0.1",
                                                     self.target_port))
            except OSError:
                return
            for src, dst, count in ((client, upstream, True),
                                    (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, count),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket,
              count: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if count:
                    self.messages += data.count(b"\n")
                dst.sendall(data)
        except OSError:
            pass
        finally:
            src.close()
            dst.close()

    def close(self) -> None:
        self.listener.close()


def paced_figures(url: str, daemon: Daemon, rate: float,
                  seconds: float) -> Tuple[float, float]:
    """Messages a second a steady process serving ``rate`` requests a
    second sends (counted on the wire, pings included), and wake-ups a
    second of connmon's threads in it."""
    wire = WireCounter(daemon.port)
    child = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", PACED_APP,
         f"{url}?plugin=connmon&connmon_addr={wire.address}", str(rate),
         str(seconds)], cwd=HERE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONPATH=HERE))
    try:
        _, wake_ups_before = child.stdout.readline().split()
        began, messages_before = time.monotonic(), wire.messages
        _, wake_ups_after = child.stdout.readline().split()
        spent, messages = (time.monotonic() - began,
                           wire.messages - messages_before)
    finally:
        child.wait(30)
        wire.close()
    return (messages / spent,
            (int(wake_ups_after) - int(wake_ups_before)) / spent)


def floor_row(results: Dict[str, Paired], floor: str) -> Tuple[str, ...]:
    """connmon's ratio beside the floor's, measured in the same rounds."""
    excess = results["connmon"].ratio - results[floor].ratio
    return (f"connmon {results['connmon'].ratio:.3f} vs {floor} "
            f"{results[floor].ratio:.3f}: {excess:+.3f}",)


def bench_runtimes(quick: bool) -> None:
    """App throughput with and without connmon on 8 busy threads, and on 8
    green threads under eventlet and under gevent, for requests of one
    query and of ten (target ratio <= 1.03), beside two no-op pool
    listeners (the floor of any listener design); the CPU a request of
    connmon's own threads and of connmond; the SQLite hot path, sites on,
    beside the same floor (target: within +0.10 of it); and, from a
    steady process serving 10 and 200 requests a second, the messages a
    second it sends and the wake-ups a second of connmon's threads."""
    import sqlalchemy as sa

    url = os.environ.get("CONNMON_TEST_MYSQL",
                         "mysql+pymysql://root@127.0.0.1:3306/test")
    rounds, requests = (9, 800) if quick else (25, 2000)
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
        try:
            for queries, count in ((1, requests), (10, requests // 5)):
                rows = []
                for runtime in ("threads", "eventlet", "gevent"):
                    child = subprocess.run(
                        [sys.executable, "-W", "ignore", "-c", RUNTIME_APP,
                         runtime, url, daemon.address, str(rounds),
                         str(count), str(queries), str(daemon.proc.pid)],
                        cwd=HERE, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ, PYTHONPATH=HERE))
                    if child.returncode:
                        raise RuntimeError(f"{runtime}: {child.stderr}")
                    ratios, cpu = map(json.loads, child.stdout.splitlines())
                    results = {name: Paired(*values)
                               for name, values in ratios.items()}
                    rows += [(f"{runtime:<8}",) + row
                             for row in ratio_rows(results, 15)]
                    rows.append((f"{runtime:<8}",)
                                + floor_row(results, "no-op listeners"))
                    rows.append((f"{runtime:<8}", "CPU a request: connmon's "
                                 f"threads {cpu['threads']:.2f} us, connmond "
                                 f"{cpu['daemon']:.2f} us"))
                report(f"runtimes: requests (a checkout, {queries} MariaDB "
                       "SELECT 1, a checkin) on 8 workers at once, "
                       f"{rounds} rounds x {count} requests, median of the "
                       "rounds' ratios "
                       "(target ratio <= 1.03)", rows)

            sqlite_rounds, cycles = SQLITE_ROUNDS[quick]
            db = os.path.join(workdir, "bench.sqlite")
            results = interleaved({
                "plain": sa.create_engine(f"sqlite:///{db}"),
                "no-op listeners": listening_engine(f"sqlite:///{db}"),
                "connmon": sa.create_engine(
                    f"sqlite:///{db}?plugin=connmon"
                    f"&connmon_addr={daemon.address}"),
            }, sqlite_rounds, cycles)
            report(f"runtimes: connect()+close() on SQLite QueuePool, sites "
                   f"on, {sqlite_rounds} rounds x {cycles} cycles, median "
                   "of the rounds' ratios (target: within +0.10 of two "
                   "no-op listeners)", ratio_rows(results, 15)
                   + [floor_row(results, "no-op listeners")])

            seconds = 5.0 if quick else 15.0
            rows = []
            for rate in (10, 200):
                messages, wake_ups = paced_figures(url, daemon, rate,
                                                   seconds)
                rows.append((f"{rate:>3} requests/s:",
                             f"{messages:5.2f} messages/s sent,",
                             f"{wake_ups:6.1f} wake-ups/s of connmon's "
                             "threads"))
            report(f"runtimes: a steady process serving requests (a "
                   f"checkout, a MariaDB SELECT 1, a checkin), {seconds:g} s "
                   "(targets: <= 1.5 messages/s, a few wake-ups/s)", rows)
        finally:
            daemon.stop()


# -- fleet: a cloud's processes on one connmond (and on a 3-node cluster) ---

FLEET_SIZES = {False: (1000, 3000, 10000), True: (1000, 3000)}
FLEET_DRIVERS = 3             # processes driving the simulated fleet
FLEET_REQUESTS = 7.5          # requests a second a simulated process serves
FLEET_VARIANTS = 16           # different replays, handed out in turn
FLEET_PROGRAMS = ("nova-api", "nova-conductor", "neutron-server",
                  "cinder-api")
FLEET_STALL_BYTES = 1 << 16   # unsent bytes after which a client reconnects
FLEET_ANSWER_WAIT = 5.0       # the plugin's wait for the welcome, the ready
FLEET_POOL = 139_800_000_000  # ids as CPython's id() spells them
FLEET_CONNS = 4               # connections of a simulated process


class Replay(NamedTuple):
    """What one plugin process sends: its "state", then its updates, each
    with the seconds since the one before and its checkout count."""

    state: bytes
    updates: List[Tuple[float, bytes, int]]


def plugin_replay(seed: int, seconds: float, rhythm: float) -> Replay:
    """A replay made as the plugin makes its messages: the pool events of
    FLEET_REQUESTS requests a second (in spells of twice that rate, with
    pauses between) folded into a ProcessState, and ``message`` of the
    difference from what was sent, counters reset after each.

    ``rhythm`` 1.0: a message a second (the sender of issue 27);
    0: the current sender's rhythm (a batch FLUSH_DELAY after its first
    event, sent when the daemon's counts change or when the events stop).
    The replay ends with every connection checked in, so it loops."""
    import connmon
    rand = random.Random(seed)
    conns = [FLEET_POOL + 64 * (n + 1) for n in range(FLEET_CONNS)]
    events: List[tuple] = []
    free_at = dict.fromkeys(conns, 0.0)
    now, busy = 0.5, True
    while now < seconds - 1.0:
        spell = now + rand.uniform(0.5, 1.5)
        while busy and now < min(spell, seconds - 1.0):
            conn = min(conns, key=free_at.__getitem__)
            began = max(now, free_at[conn])
            when = began + rand.uniform(0.0001, 0.0005)
            hold = rand.expovariate(1 / 0.02)
            events.append((when, (CHECKOUT, conn, when, FLEET_POOL, None,
                                  began)))
            events.append((when + hold, (CHECKIN, conn, when + hold)))
            free_at[conn] = when + hold
            now += rand.expovariate(2 * FLEET_REQUESTS)
        now, busy = max(now, spell), not busy
    events.sort(key=lambda pair: pair[0])
    proc = connmon.ProcessState("replay", "host", "prog", 1, 1)
    listeners = PoolListeners(proc, measured=True)
    listeners(connmon.POOL, FLEET_POOL, 0.0, 15,
              ("mysql", "db.cloud.example", 3306, "nova", "nova"))
    for conn in conns:
        listeners(connmon.CONNECT, conn, 0.01, FLEET_POOL, began=0.0)
    state = connmon.encode(proc.message(0.1))
    sent, sent_at, updates = proc.copy(), 0.1, []
    proc.reset_counters()

    def send(at: float) -> None:
        nonlocal sent, sent_at
        message = proc.message(at, sent)
        updates.append((at - sent_at, connmon.encode(message),
                        message["checkouts"]))
        sent, sent_at = proc.copy(), at
        proc.reset_counters()

    index = 0
    if rhythm:
        for tick in range(1, int(seconds) + 1):
            while index < len(events) and events[index][0] < tick:
                listeners(*events[index][1])
                index += 1
            send(float(tick))
        return Replay(state, updates)
    while index < len(events):   # batches of FLUSH_DELAY
        end = events[index][0] + connmon.FLUSH_DELAY
        while index < len(events) and events[index][0] < end:
            listeners(*events[index][1])
            index += 1
        quiet = index == len(events) or events[index][0] >= end + (
            connmon.FLUSH_DELAY)
        counted = proc.checkouts or proc.holds or proc.waits
        if proc.differs_visibly(sent) or counted and (
                quiet or end - sent_at >= connmon.COUNTERS_DELAY):
            send(end)
    return Replay(state, updates)


class FleetClient:
    """One simulated process: its connection and where it is in its
    replay."""

    __slots__ = ("number", "ident", "replay", "step", "sock", "out",
                 "backoff", "session", "state", "address", "source",
                 "due_at")

    def __init__(self, number: int, replay: Replay, address: tuple):
        import connmon
        self.number = number
        self.ident = f"fleet-{number}-{os.urandom(4).hex()}"
        self.replay = replay
        self.step = 0
        self.sock: Any = None
        self.out = bytearray()
        self.backoff = connmon.Backoff()
        self.session = 0
        self.state = "down"   # down, connecting, welcome, ready, live
        self.due_at = 0.0   # its one time due (other times are stale)
        self.address = address
        self.source = f"127.0.{number // 250 % 250 + 1}.{number % 250 + 2}"

    def hello(self) -> bytes:
        import connmon
        self.session += 1
        return connmon.encode({
            "op": "hello", "version": connmon.PROTOCOL_VERSION,
            "role": "app", "proc": {
                "id": self.ident, "hostname": f"compute{self.number // 8:04d}",
                "progname": FLEET_PROGRAMS[self.number % 4],
                "pid": 1000 + self.number, "session": self.session}})


class FleetDriver:
    """Run in a child process: simulated plugin processes, each on its own
    TCP connection (from its own loopback address, as from its own host),
    all driven by one thread with a selector.  Each replays its Replay in
    a loop from a random phase; each connects as the plugin does (its
    hello once welcomed, its state once ready, giving up after
    FLEET_ANSWER_WAIT), reconnects as it does (its jittered Backoff) and
    then sends its whole state again.  A client
    whose daemon does not read FLEET_STALL_BYTES is dropped and
    reconnects, as the plugin does on its send timeout."""

    def __init__(self, clients: List[FleetClient], pipe):
        import selectors
        self.clients = clients
        self.pipe = pipe
        self.selector = selectors.DefaultSelector()
        self.due: List[tuple] = []
        self.counts = collections.Counter()
        self.sending = False

    def run(self) -> None:
        import heapq
        import resource
        import selectors
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.selector.register(self.pipe, selectors.EVENT_READ, None)
        start = time.monotonic()
        for place, client in enumerate(self.clients):   # 400 a second
            self._schedule(client, start + place / 400)
        while True:
            timeout = max(0.0, self.due[0][0] - time.monotonic()) \
                if self.due else 1.0
            for key, mask in self.selector.select(min(timeout, 1.0)):
                if key.data is None:
                    command = self.pipe.recv()
                    if command == "stop":
                        return
                    if command == "go":
                        self.sending = True
                    self.pipe.send(dict(self.counts, live=sum(
                        c.state == "live" for c in self.clients)))
                    continue
                client = key.data
                if mask & selectors.EVENT_WRITE:
                    self._writable(client)
                if mask & selectors.EVENT_READ and client.sock is not None:
                    self._readable(client)
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                when, _, client = heapq.heappop(self.due)
                self._due(client, when, now)

    def _schedule(self, client: FleetClient, when: float) -> None:
        """Make ``client`` due at ``when``, and at no other time."""
        import heapq
        client.due_at = when
        heapq.heappush(self.due, (when, id(client), client))

    def _due(self, client: FleetClient, when: float, now: float) -> None:
        if when != client.due_at:
            return
        if client.state == "down":
            self._connect(client)
            return
        if client.state != "live":   # its answer did not come in time
            self.counts["timeouts"] += 1   # (as open_connection's)
            self._drop(client)
            return
        delay, line, checkouts = client.replay.updates[client.step]
        if self.sending:
            client.out += line
            self.counts["sent"] += 1
            self.counts["checkouts"] += checkouts
            self._flush(client)
        if client.sock is not None:
            client.step = (client.step + 1) % len(client.replay.updates)
            self._schedule(client, max(when, now - 1.0)
                           + client.replay.updates[client.step][0])

    def _connect(self, client: FleetClient) -> None:
        import selectors
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.bind((client.source, 0))
        except OSError:
            pass
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sock, client.state = sock, "connecting"
        sock.connect_ex(client.address)
        self.selector.register(sock, selectors.EVENT_WRITE, client)

    def _writable(self, client: FleetClient) -> None:
        import selectors
        if client.state == "connecting":
            if client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                self._drop(client)
                return
            self._await(client, "welcome")
            self.selector.modify(client.sock, selectors.EVENT_READ, client)
        self._flush(client)

    def _await(self, client: FleetClient, answer: str) -> None:
        """Wait for the daemon's ``answer`` as the plugin does, at most
        its connect timeout."""
        client.state = answer
        self._schedule(client, time.monotonic() + FLEET_ANSWER_WAIT)

    def _answered(self, client: FleetClient, data: bytes) -> None:
        """The plugin's handshake: its hello once welcomed, its state
        once ready; then its updates."""
        if client.state == "welcome" and b'"welcome"' in data:
            client.out += client.hello()
            self._await(client, "ready")
            self._flush(client)
        if client.state == "ready" and b'"ready"' in data:
            client.state = "live"
            self.counts["connects"] += 1
            client.out += client.replay.state
            client.step = random.randrange(len(client.replay.updates))
            self._schedule(client, time.monotonic() + random.random())
            self._flush(client)

    def _flush(self, client: FleetClient) -> None:
        import selectors
        if not client.out:
            return
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop(client)
            return
        del client.out[:sent]
        if len(client.out) > FLEET_STALL_BYTES:
            self.counts["stalls"] += 1
            self._drop(client)
            return
        self.selector.modify(client.sock, selectors.EVENT_READ | (
            selectors.EVENT_WRITE if client.out else 0), client)

    def _readable(self, client: FleetClient) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if b'"error"' in data:
            self.counts["refused"] += 1
        if not data:
            self._drop(client)
        elif client.state != "live":
            self._answered(client, data)

    def _drop(self, client: FleetClient) -> None:
        if client.state == "live":
            self.counts["drops"] += 1
        self.selector.unregister(client.sock)
        client.sock.close()
        client.sock, client.state = None, "down"
        client.out.clear()
        client.backoff.failed(time.monotonic())
        self._schedule(client, client.backoff.retry_at)


def _run_fleet_driver(clients: List[FleetClient], pipe) -> None:
    FleetDriver(clients, pipe).run()


class Fleet:
    """``size`` simulated plugin processes driven from FLEET_DRIVERS child
    processes, spread over the daemons on ``ports`` in turn."""

    def __init__(self, ports: List[int], size: int, rhythm: float):
        import multiprocessing
        replays = [plugin_replay(seed, 60.0, rhythm)
                   for seed in range(FLEET_VARIANTS)]
        self.rate = sum(len(r.updates) for r in replays) / (
            60.0 * len(replays)) * size
        self.checkouts_per_update = sum(
            c for r in replays for _, _, c in r.updates) / sum(
            len(r.updates) for r in replays)
        clients = [FleetClient(n, replays[n % FLEET_VARIANTS],
                               ("127.0.0.1", ports[n % len(ports)]))
                   for n in range(size)]
        context = multiprocessing.get_context("fork")
        self.pipes, self.drivers = [], []
        for first in range(FLEET_DRIVERS):
            here, there = context.Pipe()
            driver = context.Process(target=_run_fleet_driver, args=(
                clients[first::FLEET_DRIVERS], there), daemon=True)
            driver.start()
            self.pipes.append(here)
            self.drivers.append(driver)

    def counts(self, command: str = "counts") -> collections.Counter:
        total: collections.Counter = collections.Counter()
        for pipe in self.pipes:
            pipe.send(command)
        for pipe in self.pipes:
            total.update(pipe.recv())
        return total

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send("stop")
        for driver in self.drivers:
            driver.join(10)


def wait_for(condition: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {seconds:g} s")
        time.sleep(0.2)


def processes_seen(port: int, wanted: int) -> bool:
    return snapshot(port)["processes"] >= wanted


def checkouts_total(port: int) -> int:
    return sum(row["ckout_total"] for row in snapshot(port)["rows"])


def daemon_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def greet_time(port: int) -> float:
    """Seconds from connect() to the daemon's welcome line."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), 30) as sock:
        sock.makefile("rb").readline()
    return time.perf_counter() - start


def once_json_time(port: int) -> float:
    """Seconds ``connmon --once --json`` takes; negative if it failed
    (its minus its time)."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "connmon_console",
                             "--once", "--json", "-H", f"127.0.0.1:{port}"],
                            cwd=HERE, capture_output=True, timeout=120)
    took = time.perf_counter() - start
    return -took if result.returncode else took


def applied_lag(port: int, samples: int) -> List[float]:
    """Seconds from an update sent to its effect in the picture: a probe
    process checks a connection out (in), then asks for a pong on the same
    connection; the daemon reads a connection's messages in order, so the
    pong comes once the update is applied."""
    import connmon
    proc = connmon.ProcessState(f"probe-{os.urandom(4).hex()}", "probe",
                                "probe", os.getpid(), 1)
    conn = connmon.open_connection([("127.0.0.1", port)], "app", timeout=30,
                                   proc=proc.describe())
    try:
        base = {"op": "update", "connect": [], "close": [],
                "checkouts": 0, "hold": [0, 0], "peak": [1, 1]}
        conn.send({**base, "op": "state", "connect": [[1, 1]],
                   "checkout": [], "checkin": [], "pools": [[1, 5]]})
        lags = []
        for n in range(samples):
            flip = {"checkout": [[1, 0.0]], "checkin": []} if n % 2 else {
                "checkout": [], "checkin": [1]}
            start = time.perf_counter()
            conn.sock.sendall(connmon.encode({**base, **flip})
                              + connmon.encode({"op": "ping"}))
            connmon.expect(connmon.read_message(conn.rfile), "pong")
            lags.append(time.perf_counter() - start)
            time.sleep(0.1)
        return sorted(lags)
    finally:
        conn.close()


class FleetFigures(NamedTuple):
    sent: int
    applied: int
    cpu: float
    seconds: float
    rss: float
    threads: int
    once: float
    greet: float
    lag: List[float]
    counts: collections.Counter


def measure_fleet(fleet: Fleet, ports: List[int], pids: List[int],
                  seconds: float) -> FleetFigures:
    """Let the fleet send for ``seconds``: the daemons' CPU per update
    applied (checkouts applied over checkouts an update carries), what
    was sent and applied, and, on the first daemon meanwhile, the time a
    snapshot takes, a newcomer waits for its welcome, and an update takes
    to reach the picture."""
    fleet.counts("go")
    time.sleep(2.0)   # every client has begun its rhythm
    before_sent = fleet.counts()
    before_applied = checkouts_total(ports[0])   # (every node sees all)
    before_cpu = [daemon_cpu_seconds(pid) for pid in pids]
    start = time.monotonic()
    lag = applied_lag(ports[0], max(5, int(seconds * 2)))
    greet = max(greet_time(ports[0]) for _ in range(3))
    time.sleep(max(0.0, seconds - (time.monotonic() - start)))
    after_cpu = [daemon_cpu_seconds(pid) for pid in pids]
    after_sent = fleet.counts()
    elapsed = time.monotonic() - start
    after_applied = checkouts_total(ports[0])
    once = once_json_time(ports[0])
    per_update = fleet.checkouts_per_update
    sent = after_sent["checkouts"] - before_sent["checkouts"]
    return FleetFigures(
        sent=round(sent / per_update),
        applied=round((after_applied - before_applied) / per_update),
        cpu=max(a - b for a, b in zip(after_cpu, before_cpu)),
        seconds=elapsed, rss=max(map(daemon_rss_mb, pids)),
        threads=max(map(daemon_threads, pids)), once=once, greet=greet,
        lag=lag, counts=after_sent)


def fleet_row(label: str, figures: FleetFigures) -> tuple:
    lag = figures.lag
    applied = max(1, figures.applied)
    return (label,
            f"sent {figures.sent / figures.seconds:7,.0f}/s",
            f"applied {figures.applied / figures.seconds:7,.0f}/s "
            f"({figures.applied / max(1, figures.sent):4.0%})",
            f"CPU {figures.cpu / figures.seconds:4.0%} "
            f"= {figures.cpu / applied * 1e6:5.0f} us/update",
            f"RSS {figures.rss:5.0f} MB",
            f"threads {figures.threads:5d}",
            f"--once --json {figures.once:5.2f} s" if figures.once > 0 else
            f"--once --json FAILED after {-figures.once:5.2f} s",
            f"greet {figures.greet * 1000:5.0f} ms",
            f"lag p50 {lag[len(lag) // 2] * 1000:5.0f} ms "
            f"max {lag[-1] * 1000:5.0f} ms",
            f"drops {figures.counts['drops']} stalls "
            f"{figures.counts['stalls']} refused "
            f"{figures.counts['refused']} unanswered "
            f"{figures.counts['timeouts']}")


def restart_convergence(daemon: Daemon, workdir: str, size: int
                        ) -> Tuple[float, Daemon]:
    """Stop the daemon, start it again on the same port: seconds until
    every process of the fleet is back in its picture."""
    config = write_config(workdir, [daemon.port], "max_clients: 20000\n")
    daemon.stop()
    start = time.monotonic()
    daemon = Daemon(workdir, config, "n1", daemon.port)
    try:
        attached(daemon.port, size, 120)
    except RuntimeError as err:
        raise RuntimeError(f"after a restart, {err}") from None
    return time.monotonic() - start, daemon


def bench_fleet(quick: bool) -> None:
    """A cloud's processes on one connmond: N simulated plugin processes,
    each on its own connection, replaying messages made as the plugin
    makes them, at a message a second and at the current sender's rhythm
    (targets: <= 80 us of connmond CPU an update with 3,000 at 1/s;
    10,000 under one core, RSS <= 512 MB, --once --json and a greeting
    <= 1 s, the picture within 1 s; back within 30 s of a restart)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    seconds = 8.0 if quick else 20.0
    report("fleet: simulated plugin processes on one connmond (CPU from "
           "/proc; targets: <= 80 us/update at 3,000 x 1/s; 10,000 under "
           "one core, RSS <= 512 MB, --once --json and greeting <= 1 s, "
           "lag <= 1 s)", [])
    with tempfile.TemporaryDirectory() as workdir:
        for rhythm, label in ((1.0, "1/s"), (0.0, "now")):
            for size in FLEET_SIZES[quick]:
                if rhythm == 0.0 and size > 3000:
                    continue   # (far past one core: see the figures)
                daemon = Daemon(workdir, options="max_clients: 20000\n")
                fleet = Fleet([daemon.port], size, rhythm)
                title = f"{size:6,d} at {label}"
                try:
                    attached(daemon.port, size)
                    figures = measure_fleet(fleet, [daemon.port],
                                            [daemon.proc.pid], seconds)
                    report_row(fleet_row(f"{title} ({fleet.rate:6,.0f} "
                                         "msg/s)", figures))
                    if rhythm == 1.0 and size == max(FLEET_SIZES[quick]):
                        took, daemon = restart_convergence(daemon, workdir,
                                                           size)
                        report_row((f"{title}: back in the picture "
                                    f"{took:5.1f} s after a restart",))
                except RuntimeError as err:   # (said why: go on)
                    report_row((f"{title}: {err}",))
                except OSError as err:   # (a probe not answered in time)
                    report_row((f"{title}: connmond did not answer a probe "
                                f"({err})",))
                finally:
                    fleet.close()
                    daemon.stop()


def report_row(row: tuple) -> None:
    """One row of a report, printed as soon as it is measured."""
    print("  " + "  ".join(str(cell) for cell in row), flush=True)


def attached(port: int, size: int, seconds: float = 300) -> None:
    """Wait for ``size`` processes in the picture; RuntimeError saying how
    many came if they did not all come within ``seconds``."""
    try:
        wait_for(lambda: processes_seen(port, size), seconds,
                 f"{size} processes attached")
    except RuntimeError:
        raise RuntimeError(f"only {snapshot(port)['processes']:,d} of "
                           f"{size:,d} processes attached within "
                           f"{seconds:g} s") from None


def bench_cluster_fleet(quick: bool) -> None:
    """The same fleet on one node, then spread over a 3-node cluster:
    each node's CPU against the single node's (target <= 1.3x)."""
    size = 1000 if quick else 3000
    seconds = 8.0 if quick else 15.0
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir, options="max_clients: 20000\n")
        fleet = Fleet([daemon.port], size, 1.0)
        try:
            wait_for(lambda: processes_seen(daemon.port, size), 300,
                     "the fleet attached")
            single = measure_fleet(fleet, [daemon.port], [daemon.proc.pid],
                                   seconds)
        finally:
            fleet.close()
            daemon.stop()
        rows.append(fleet_row(f"{size:,d} on 1 node ", single))
        ports = [free_port() for _ in range(3)]
        config = write_config(workdir, ports, "max_clients: 20000\n")
        nodes = [Daemon(workdir, config, f"n{i}", port)
                 for i, port in enumerate(ports, 1)]
        fleet = None
        try:
            wait_for(lambda: all(all(snapshot(port)["peers"].values())
                                 for port in ports), 30, "the cluster")
            fleet = Fleet(ports, size, 1.0)
            wait_for(lambda: all(processes_seen(port, size)
                                 for port in ports), 300,
                     "the fleet in every node's picture")
            spread = measure_fleet(fleet, ports,
                                   [node.proc.pid for node in nodes],
                                   seconds)
        finally:
            if fleet is not None:
                fleet.close()
            for node in nodes:
                node.stop()
        rows.append(fleet_row(f"{size:,d} on 3 nodes", spread))
        single_rate = single.cpu / single.seconds
        rows.append((f"busiest node's CPU / single node's: "
                     f"{spread.cpu / spread.seconds / single_rate:4.2f} "
                     "(target <= 1.3)",))
    report("cluster-fleet: a fleet at 1/s on one node vs spread over 3 "
           "nodes (each node holds the whole picture)", rows)


SCENARIOS: Dict[str, Callable[[bool], None]] = {
    "hotpath": bench_hotpath,
    "hotpath-mysql": bench_hotpath_mysql,
    "breakdown": bench_breakdown,
    "ingest": bench_ingest,
    "scale": bench_scale,
    "latency": bench_latency,
    "cluster": bench_cluster,
    "console": bench_console,
    "history": bench_history,
    "runtimes": bench_runtimes,
    "blackhole": bench_blackhole,
    "hostile": bench_hostile,
    "disconnect": bench_disconnect,
    "fleet": bench_fleet,
    "cluster-fleet": bench_cluster_fleet,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer rounds: well under a minute")
    parser.add_argument("scenarios", nargs="*", choices=[[]] + list(SCENARIOS),
                        metavar="SCENARIO",
                        help="one or more of: " + ", ".join(SCENARIOS))
    args = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.ERROR)
    for name in args.scenarios or SCENARIOS:
        SCENARIOS[name](args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
