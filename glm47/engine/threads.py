"""ThreadGovernor: as many CPU threads per step as the machine has cores to spare.

A decode step runs dozens of parallel regions, each ending in a barrier. When another process takes a core,
one of our two threads waits at every barrier for its sibling to be scheduled again: measured on a 2-core VM
(bench preset, batch-1 decode, one competing busy process), 2 threads fell to 0.28x of their quiet speed with
OpenMP's default (spinning) wait, 0.5x with OMP_WAIT_POLICY=PASSIVE (which costs 0.6x on a quiet machine:
every region pays a wake-up), and 1 thread ran at 0.5x (no barriers at all). So the governor measures, every
`interval` seconds, how much CPU the rest of the machine uses (/proc/stat minus this process) and gives the
step the cores that are left: all of them on a quiet machine (no change), fewer while something else runs.

Only decode-sized steps (at most `max_rows` tokens, where the CPU kernels compute every row the same way
whatever the thread count) run on fewer threads; a step with a larger prefill chunk keeps every thread, since
torch's GEMMs block their sums by thread count and their results would change. So greedy tokens never
depend on the machine's load (tests/engine/test_engine_threads.py).
"""

from __future__ import annotations

import os
import time

import torch


def _cpu_busy_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process), from /proc; None where /proc has no such files."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, int(own[11]) + int(own[12])  # utime + stime of this process


class ThreadGovernor:
    def __init__(self, max_threads: int | None = None, max_rows: int = 32, interval: float = 0.5,
                 enabled: bool = True):
        self.max_threads = max_threads or torch.get_num_threads()
        self.max_rows, self.interval = max_rows, interval
        self.enabled = enabled and self.max_threads > 1 and _cpu_busy_ticks() is not None
        self.spare = float(self.max_threads)  # cores the rest of the machine leaves us, as last measured
        self.threads = self.max_threads  # what decode steps run on now
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = (time.monotonic(), _cpu_busy_ticks())
        self._pending = 0  # a changed count must be measured twice in a row before it is taken

    def threads_for(self, num_tokens: int) -> int:
        """The thread count for a step of num_tokens, re-measuring the machine once per interval."""
        if not self.enabled:
            return self.max_threads
        now = time.monotonic()
        if now - self._last[0] >= self.interval:
            self._measure(now)
        return self.threads if num_tokens <= self.max_rows else self.max_threads

    def _measure(self, now: float) -> None:
        ticks = _cpu_busy_ticks()
        (then, before), self._last = self._last, (now, ticks)
        if ticks is None or before is None:
            return
        others = max(0.0, (ticks[0] - before[0]) - (ticks[1] - before[1])) / self._tick / (now - then)
        cores = os.cpu_count() or self.max_threads
        self.spare = max(0.0, cores - others)
        # Round generously: a thread is worth having once ~0.6 of a core is free for it.
        want = max(1, min(self.max_threads, int(self.spare + 0.4)))
        if want == self.threads:
            self._pending = 0
        elif want == self._pending:
            self.threads, self._pending = want, 0
        else:
            self._pending = want


def wait_policy() -> str:
    """OpenMP's wait policy as this process runs it (for benchmark reports)."""
    policy = os.environ.get("OMP_WAIT_POLICY")
    spin = os.environ.get("GOMP_SPINCOUNT")
    text = policy.upper() if policy else "default (spin, then sleep)"
    return text + (f", GOMP_SPINCOUNT={spin}" if spin else "")
