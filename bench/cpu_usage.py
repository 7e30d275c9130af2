"""Where the CPU time of a timed pass went: this process, the server, everything else.

On a small CPU the load generator, the server and any other work share the cores, so a report
says how much each took. Process and machine figures come from ``/proc`` (Linux); elsewhere
they are ``None``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative CPU seconds at one moment."""

    own: float
    server: float | None
    machine: float | None


@dataclass(frozen=True, kw_only=True, slots=True)
class CpuUse:
    """CPU seconds used between two samples."""

    client_s: float
    server_s: float | None = None
    other_s: float | None = None


def sample(server_pid: int | None = None) -> CpuSample:
    return CpuSample(time.process_time(), process_cpu_s(server_pid), machine_busy_s())


def used(before: CpuSample, after: CpuSample) -> CpuUse:
    """This process's, the server's and everybody else's CPU time between the samples."""
    client = after.own - before.own
    server = None
    if before.server is not None and after.server is not None:
        server = after.server - before.server
    other = None
    if before.machine is not None and after.machine is not None:
        # Clock-tick granularity can leave a few hundredths below zero.
        other = max(0.0, after.machine - before.machine - client - (server or 0.0))
    return CpuUse(client_s=client, server_s=server, other_s=other)


def process_cpu_s(pid: int | None) -> float | None:
    """User + system seconds of a process, all its threads included."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces): utime and stime are the 12th and
    # 13th of them (fields 14 and 15 of proc(5)).
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot, summed over its CPUs."""
    try:
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already within user).
    ticks = [int(value) for value in line.split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def busy_cpus(interval_s: float = 0.5) -> float | None:
    """How many CPUs' worth of work the machine is doing now (0 when idle)."""
    before = machine_busy_s()
    time.sleep(interval_s)
    after = machine_busy_s()
    if before is None or after is None:
        return None
    return (after - before) / interval_s
