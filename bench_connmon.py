"""connmon benchmarks: they print figures, they assert nothing.

    python bench_connmon.py [--quick] [SCENARIO ...]

Every figure is a ratio or count inside one run (plugin vs plain engine,
interleaved), because the machines this runs on are shared and noisy.
"""

from __future__ import annotations

import argparse
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


def thread_cpu_seconds(native_id: int) -> float:
    """CPU time (user + system) of one thread of this process."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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

    rounds, cycles = (7, 2000) if quick else (15, 5000)
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
            medians = interleaved(engines, rounds, cycles)
            threads = {}
            for name, address in faults.items():
                (sender,) = [s for s in connmon._senders.values()
                             if s.addresses == [connmon.parse_address(
                                 address)]]
                threads[name] = [t.native_id for t in sender.threads]
            before = {name: sum(map(thread_cpu_seconds, ids))
                      for name, ids in threads.items()}
            time.sleep(idle)
            spent = {name: sum(map(thread_cpu_seconds, ids)) - before[name]
                     for name, ids in threads.items()}
        finally:
            blackhole.close()
    plain = medians["plain"]
    report(f"blackhole: connect()+close() on SQLite QueuePool with connmond "
           f"unreachable, median of {rounds} interleaved runs x {cycles} "
           f"cycles (target ratio <= 1.3); sender threads' CPU seconds "
           f"over {idle:g} s idle",
           [(f"{name:<12}", f"{us:7.2f} us", f"ratio {us / plain:.3f}",
             f"sender cpu {spent[name]:.2f} s" if name in spent else "")
            for name, us in medians.items()])


SCENARIOS: Dict[str, Callable[[bool], None]] = {
    "hotpath": bench_hotpath,
    "blackhole": bench_blackhole,
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
