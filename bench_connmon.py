"""connmon benchmarks: they print figures, they assert nothing.

    python bench_connmon.py [--quick] [SCENARIO ...]

Every figure is a ratio or count inside one run (plugin vs plain engine,
interleaved), because the machines this runs on are shared and noisy; the
console's figure is CPU time (not wall time) per refresh, against a target.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Daemon:
    """A connmond subprocess on a free loopback port."""

    def __init__(self, workdir: str):
        self.port = free_port()
        config = os.path.join(workdir, f"bench-{self.port}.cfg")
        with open(config, "w") as file:
            file.write(textwrap.dedent(f"""\
                [connmon_service_bench]
                name: bench
                nodes:
                    n1 hostname=127.0.0.1:{self.port} bind=127.0.0.1
                """))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connmon_server", "-c", config, "-s",
             "bench", "--log-level", "WARNING"], cwd=HERE)
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
        self.proc.wait(10)


def cycle_time(engine, cycles: int) -> float:
    """Median-friendly sample: microseconds per connect()+close() cycle."""
    connect = engine.connect
    start = time.perf_counter()
    for _ in range(cycles):
        connect().close()
    return (time.perf_counter() - start) / cycles * 1e6


def interleaved(engines: Dict[str, object], rounds: int,
                cycles: int) -> Dict[str, float]:
    """Median µs per cycle for each engine, measured in alternation."""
    samples: Dict[str, List[float]] = {name: [] for name in engines}
    for engine in engines.values():
        cycle_time(engine, cycles)   # warm up: pool filled, caches primed
    for _ in range(rounds):
        for name, engine in engines.items():
            samples[name].append(cycle_time(engine, cycles))
    return {name: statistics.median(values)
            for name, values in samples.items()}


def report(title: str, rows: List[tuple]) -> None:
    print(f"\n{title}")
    for row in rows:
        print("  " + "  ".join(str(cell) for cell in row))


def bench_hotpath(quick: bool) -> None:
    """App hot path: engine.connect(); close() on a SQLite QueuePool engine,
    plugin vs plain, with connmond up and down (target ratio <= 1.3)."""
    import sqlalchemy as sa

    rounds, cycles = (7, 2000) if quick else (15, 5000)
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
                "daemon down": sa.create_engine(
                    f"sqlite+pysqlite_connmon:///{db}?connmon_addr={down}"),
            }
            medians = interleaved(engines, rounds, cycles)
        finally:
            daemon.stop()
    plain = medians["plain"]
    report(f"hotpath: connect()+close() on SQLite QueuePool, median of "
           f"{rounds} interleaved runs x {cycles} cycles (target ratio "
           "<= 1.3)",
           [(f"{name:<12}", f"{us:7.2f} us", f"ratio {us / plain:.3f}")
            for name, us in medians.items()])


class FakeFleet:
    """Many application processes speaking connmon's protocol straight over
    sockets (a thousand real engines would swamp a small machine): each
    row is one host+program with one process."""

    def __init__(self, address: tuple, rows: int, live: int):
        self.live: List[socket.socket] = []
        for index in range(rows):
            sock = socket.create_connection(address, 10)
            rfile = sock.makefile("rb")
            rfile.readline()   # welcome
            proc = {"id": f"bench-{index}",
                    "hostname": f"host{index // 40:03d}",
                    "progname": f"program-{index:04d}", "pid": 1000 + index}
            checked_out = [[1, index % 7 * 10.0]] if index % 3 else []
            self._send(sock, {"op": "hello", "version": 1, "role": "app",
                              "proc": proc})
            self._send(sock, {"op": "state", "connect": [[1, 1], [2, 1]],
                              "close": [], "checkout": checked_out,
                              "checkin": [], "checkouts": 0, "hold": [0, 0],
                              "peak": [2, 1], "pools": [[1, 15]]})
            if index < live:
                self.live.append(sock)
            else:
                sock.close()   # the row stays, as a program that is gone
        self.out = [False] * live

    @staticmethod
    def _send(sock: socket.socket, message: dict) -> None:
        import connmon
        sock.sendall(connmon.encode(message))

    def churn(self, count: int) -> None:
        """Check connection 2 out or in on ``count`` random live rows."""
        import random
        for index in random.sample(range(len(self.live)), count):
            out = self.out[index] = not self.out[index]
            self._send(self.live[index], {
                "op": "update", "connect": [], "close": [],
                "checkout": [[2, 0.0]] if out else [],
                "checkin": [] if out else [2], "checkouts": int(out),
                "hold": [0, 0] if out else [0.02, 1], "peak": [2, 2]})

    def close(self) -> None:
        for sock in self.live:
            sock.close()


CONSOLE_CHILD = r"""
import json, sys, time
import connmon, connmon_console as cc

address, refreshes, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
target = cc.Target(cc.build_parser().parse_args(["-H", address]))
feed = cc.Feed(target, 1.0)            # not started: fed by hand below
conn = target.connect()
window = cc.curses.initscr()
try:
    console = cc.Console(window, feed, 1.0, True)
    samples = []
    for refresh in range(refreshes):
        if refresh == refreshes // 2:
            console.sort_index = 3     # half the time sorted by CONN
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
    from a real connmond, sort, draw with curses into a real pty (target
    <= 20 ms)."""
    import pty
    import select
    refreshes = 40 if quick else 150
    with tempfile.TemporaryDirectory() as workdir:
        daemon = Daemon(workdir)
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


SCENARIOS: Dict[str, Callable[[bool], None]] = {
    "hotpath": bench_hotpath,
    "console": bench_console,
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
