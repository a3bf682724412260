"""`/healthz` of a real daemon under slowloris: half-open connections plus request bursts.

    python -m bench.healthz_slowloris [--seconds 30] [--half-open 500] [--burst 500]
                                      [--baseline-commit REV]

Starts `reconciler run --mode prod` on a SQLite target with HTTP on a loopback port, opens
--half-open connections that never finish their request (half a request line, half a header, or
nothing; each re-opened as soon as the server closes it, as an attacker would), sends bursts of
--burst concurrent requests (/healthz, /status, /metrics in turn) back to back, and probes
/healthz at 2 Hz for --seconds with a 5 s client timeout (kubelet's default is 1 s). Prints the
probes' p50 / p99 latency, how many were not 200, how many took over 1 s, and what the attack
and the bursts saw. Runs it against:
- this tree (the default limits),
- this tree with RECONCILER_UNSAFE_DISABLE=http_shed (the limits of before on the new loop),
- with --baseline-commit, the package as it was at that commit (the thread-per-connection server).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from bench.common import ROOT, env_for, percentile, project, reconciler
from tests.slowloris import Slowloris, burst, raise_fd_limit

PROBE_PERIOD = 0.5  # 2 Hz
PROBE_TIMEOUT = 5.0
PATHS = ("/healthz", "/status", "/metrics")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe(address: tuple[str, int]) -> tuple[str, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=PROBE_TIMEOUT)
    try:
        conn.request("GET", "/healthz")
        status = str(conn.getresponse().status)
    except TimeoutError:
        status = "timeout"
    except OSError as exc:
        status = type(exc).__name__
    finally:
        conn.close()
    return status, time.perf_counter() - started


def wait_healthy(address: tuple[str, int], proc: subprocess.Popen[bytes], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    while probe(address)[0] != "200":
        if proc.poll() is not None or time.monotonic() > end:
            raise SystemExit(f"the daemon did not answer /healthz (exit {proc.poll()}); see its log")
        time.sleep(0.1)


class Bursts(threading.Thread):
    """Bursts of `size` concurrent requests, back to back, until stopped."""

    def __init__(self, address: tuple[str, int], size: int) -> None:
        super().__init__(daemon=True)
        self.address, self.size = address, size
        self.statuses: dict[str, Counter[int]] = {path: Counter() for path in PATHS}
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            path = PATHS[self.count % len(PATHS)]
            try:
                self.statuses[path].update(burst(self.address, self.size, path=path, timeout=PROBE_TIMEOUT))
            except OSError:
                self.statuses[path][0] += self.size
            self.count += 1


def measure(label: str, folder: Path, env: dict[str, str], args: argparse.Namespace) -> None:
    url = f"sqlite:///{folder / 'app.db'}"
    with contextlib.redirect_stdout(io.StringIO()):  # Alembic's init chatter
        proj = project(folder, url, revisions=3)
    env = {**env_for(url), **env}
    port = free_port()
    address = ("127.0.0.1", port)
    cmd = reconciler(proj, "run", "--mode", "prod", "--http", f"127.0.0.1:{port}")
    with open(folder / "daemon.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=proj.root, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_healthy(address, proc)
        results: list[tuple[str, float]] = []
        with Slowloris(address, args.half_open) as attack:
            attack.wait_open(10)
            bursts = Bursts(address, args.burst)
            bursts.start()
            start = time.monotonic()
            for n in range(int(args.seconds / PROBE_PERIOD)):
                time.sleep(max(0.0, start + n * PROBE_PERIOD - time.monotonic()))
                results.append(probe(address))
            open_at_end = attack.open
            bursts.stop.set()
            bursts.join(60)
        report(label, results, attack, open_at_end, bursts)
    finally:
        proc.terminate()
        proc.wait(30)


def report(
    label: str, results: list[tuple[str, float]], attack: Slowloris, open_at_end: int, bursts: Bursts
) -> None:
    latencies = [seconds for _, seconds in results]
    statuses = Counter(status for status, _ in results)
    not_ok = len(results) - statuses["200"]
    slow = sum(1 for seconds in latencies if seconds > 1.0)
    print(f"\n{label}")
    print(
        f"  /healthz probes {len(results)}: p50 {percentile(latencies, 50) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; "
        f"non-200 {not_ok}, over 1 s {slow}; statuses {dict(statuses)}"
    )
    print(
        f"  attack: {attack.opened} half-open connections opened, {attack.closed_by_server} closed by the "
        f"server ({attack.answered} with an answer), {open_at_end} open at the end"
    )
    answers = ", ".join(f"{path} {dict(counts)}" for path, counts in bursts.statuses.items())
    print(f"  bursts: {bursts.count} of {bursts.size} requests (status 0: no answer); {answers}")


def baseline_tree(commit: str, folder: Path) -> Path:
    """The `reconciler` package as it was at `commit`, exported to `folder`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", commit, "reconciler"], check=True, capture_output=True
    ).stdout
    folder.mkdir()
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--half-open", type=int, default=500)
    parser.add_argument("--burst", type=int, default=500)
    parser.add_argument("--baseline-commit", default="")
    args = parser.parse_args()
    raise_fd_limit(4 * (args.half_open + args.burst) + 512)
    print(
        f"{args.half_open} half-open connections (re-opened when closed), bursts of {args.burst} "
        f"concurrent requests, /healthz probed at 2 Hz for {args.seconds:.0f} s; "
        f"python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs: list[tuple[str, dict[str, str]]] = [
            ("this tree, default limits", {}),
            ("this tree, RECONCILER_UNSAFE_DISABLE=http_shed", {"RECONCILER_UNSAFE_DISABLE": "http_shed"}),
        ]
        if args.baseline_commit:
            old = baseline_tree(args.baseline_commit, Path(tmp) / "baseline")
            path = os.pathsep.join([str(old), str(ROOT)])  # the old package first; tests/ for the project
            runs.append((f"the package at {args.baseline_commit}", {"PYTHONPATH": path}))
        for n, (label, env) in enumerate(runs):
            measure(label, Path(tmp) / f"run{n}", env, args)


if __name__ == "__main__":
    main()
