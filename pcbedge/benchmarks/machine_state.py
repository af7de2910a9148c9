"""Machine state around a bench: was the box quiet enough for its latencies to mean anything?

MLPerf measures latency on an unloaded system; a CI runner is often not one (a neighbour's job,
an update, a stuck process). The bench samples the machine before it times anything (a short
window) and during the latency pass (a background thread every :data:`SAMPLE_EVERY_S`), and
judges it busy by one documented rule (:func:`judge_busy`, docs/bench.md "Machine state"):

* **other processes' CPU share**: all CPUs' busy time minus this process's own CPU time, as a
  percentage of the machine (psutil), median over the samples, above ``max_other_cpu_pct``;
* **other runnable tasks**: ``procs_running`` of /proc/stat (threads on a CPU or waiting for
  one) minus this process's own running threads, median over the samples, above
  ``max_other_runnable_per_cpu`` x logical CPUs.

CPU frequency and governor, the busiest other processes and, on a Jetson, the power mode and
clocks (nvpmodel, jetson_clocks, tegrastats, jtop) are recorded, never judged. A tool or file
that is absent is recorded as ``"absent"``. Only the standard library and psutil.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pcbedge.errors import PcbEdgeError

ACTIONS = ("flag", "refuse")
DEFAULT_MAX_OTHER_CPU_PCT = 20.0
DEFAULT_MAX_OTHER_RUNNABLE_PER_CPU = 0.25
PRECHECK_S = 1.0          # the window before anything is timed
SAMPLE_EVERY_S = 0.5      # the background sampler's period during the latency pass
TOP_PROCESS_MIN_PCT = 10.0  # a process listed as busy uses at least this % of one core
TOP_PROCESSES = 5
RULE = ("busy when, before or during the timed pass, other processes' CPU share (median of the "
        "samples, % of all CPUs) > max_other_cpu_pct, or other runnable tasks (median of "
        "/proc/stat procs_running minus the bench's own running threads) > "
        "max_other_runnable_per_cpu x logical CPUs")


@dataclass(frozen=True)
class BusyPolicy:
    """What a busy machine means and what bench does about it (profile ``[bench]``)."""

    action: str = "flag"
    max_other_cpu_pct: float = DEFAULT_MAX_OTHER_CPU_PCT
    max_other_runnable_per_cpu: float = DEFAULT_MAX_OTHER_RUNNABLE_PER_CPU
    source: str = "default"


def resolve_policy(manifest: dict | None, action: str | None = None) -> BusyPolicy:
    """The bundle's target profile ``[bench]`` block (manifest ``target.bench``), with
    ``action`` ("flag" / "refuse", e.g. ``--busy-machine``) overriding its ``busy_machine``."""
    if action is not None and action not in ACTIONS:
        raise PcbEdgeError(f"busy_machine {action!r} is not one of {', '.join(ACTIONS)}",
                           fix="pass busy_machine='flag' (time and flag) or 'refuse'")
    target = (manifest or {}).get("target")
    block = target.get("bench") if isinstance(target, dict) else None
    block = block if isinstance(block, dict) else {}
    source = f"target profile {target.get('name', '?')!r}" if block else "default"
    kw = {k: block[k] for k in ("max_other_cpu_pct", "max_other_runnable_per_cpu")
          if isinstance(block.get(k), (int, float)) and not isinstance(block.get(k), bool)}
    chosen = block.get("busy_machine") if block.get("busy_machine") in ACTIONS else "flag"
    if action is not None:
        chosen, source = action, "override"
    return BusyPolicy(chosen, source=source, **kw)


# ----------------------------------------------------------------------------- raw readings

def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _own_running_threads() -> int:
    """This process's threads in state R (the one reading /proc counts itself)."""
    n = 0
    try:
        tasks = list(Path("/proc/self/task").iterdir())
    except OSError:
        return 1
    for t in tasks:
        try:
            stat = (t / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2:].startswith("R"):
            n += 1
    return max(n, 1)


class _CpuClock:
    """CPU shares between two readings: the whole machine's busy share and this process's."""

    def __init__(self):
        import psutil
        self._psutil, self._proc = psutil, psutil.Process()
        self.ncpu = psutil.cpu_count() or 1
        self._last = self._read()

    def _read(self):
        t = self._psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        own = self._proc.cpu_times()
        return sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0), idle, \
            own.user + own.system, time.monotonic()

    def shares(self) -> dict | None:
        """{system, own, other} CPU % of the whole machine since the previous call."""
        now = self._read()
        (tot0, idle0, own0, w0), (tot1, idle1, own1, w1) = self._last, now
        self._last = now
        if tot1 - tot0 <= 0 or w1 - w0 <= 0:
            return None
        system = 100.0 * (1.0 - (idle1 - idle0) / (tot1 - tot0))
        own = 100.0 * (own1 - own0) / ((w1 - w0) * self.ncpu)
        return {"system_cpu_pct": system, "own_cpu_pct": own,
                "other_cpu_pct": max(0.0, system - own)}


def _sample(clock: _CpuClock) -> dict | None:
    s = clock.shares()
    running = _procs_running()
    if s is None:
        return None
    s["other_runnable"] = None if running is None else max(0, running - _own_running_threads())
    return s


def _median(samples: list[dict], key: str) -> float | None:
    vals = [s[key] for s in samples if isinstance(s.get(key), (int, float))]
    return float(statistics.median(vals)) if vals else None


def summarize(samples: list[dict], seconds: float) -> dict:
    """Medians and maxima of a phase's samples (what :func:`judge_busy` reads)."""
    return {"n_samples": len(samples), "seconds": round(seconds, 2),
            **{f"{k}_median": _median(samples, k) for k in
               ("other_cpu_pct", "own_cpu_pct", "system_cpu_pct", "other_runnable")},
            "other_cpu_pct_max": max((s["other_cpu_pct"] for s in samples), default=None),
            "other_runnable_max": max((s["other_runnable"] for s in samples
                                       if s.get("other_runnable") is not None), default=None)}


class _TopProcesses:
    """Other processes' CPU over a window: psutil's cpu_percent between two passes."""

    def __init__(self):
        import psutil
        self._psutil, self._own = psutil, os.getpid()
        self._procs = {}
        for p in psutil.process_iter(["name", "username"]):
            try:
                p.cpu_percent(None)
                self._procs[p.pid] = p
            except (psutil.Error, OSError):
                continue

    def finish(self, limit: int = TOP_PROCESSES) -> list[dict]:
        rows = []
        for pid, p in self._procs.items():
            if pid == self._own:
                continue
            try:
                pct = p.cpu_percent(None)
            except (self._psutil.Error, OSError):
                continue
            if pct >= TOP_PROCESS_MIN_PCT:
                rows.append({"pid": pid, "name": p.info.get("name"),
                             "user": p.info.get("username"), "cpu_pct_of_one_core": pct})
        rows.sort(key=lambda r: -r["cpu_pct_of_one_core"])
        return rows[:limit]


# ----------------------------------------------------------------------------- phases

def precheck(seconds: float = PRECHECK_S) -> dict:
    """The machine before anything is timed: ``seconds`` of samples (10 a second)."""
    clock, top = _CpuClock(), _TopProcesses()
    samples, t0 = [], time.monotonic()
    step = max(seconds / 10, 0.01)
    while time.monotonic() - t0 < seconds:
        time.sleep(step)
        s = _sample(clock)
        if s is not None:
            samples.append(s)
    out = summarize(samples, time.monotonic() - t0)
    out["busy_processes"] = top.finish()
    out["loadavg"] = _loadavg()
    return out


class Sampler:
    """Samples the machine every ``period`` seconds in a daemon thread while the block runs.

    >>> with Sampler() as s:
    ...     time_the_queries()
    >>> s.summary()

    The thread wakes twice a second and reads a few /proc files (microseconds), so its own
    cost on the timed queries is negligible; its own CPU counts as the bench's."""

    def __init__(self, period: float = SAMPLE_EVERY_S):
        self.period = period
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t1 = 0.0
        self._top: _TopProcesses | None = None
        self._busy: list[dict] = []

    def _loop(self, clock: _CpuClock) -> None:
        while True:  # one last sample when stopped: a pass shorter than the period has one too
            stopped = self._stop.wait(self.period)
            s = _sample(clock)
            if s is not None:
                self.samples.append(s)
            if stopped:
                return

    def __enter__(self) -> "Sampler":
        self._top = _TopProcesses()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, args=(_CpuClock(),),
                                        name="pcbedge-machine-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._t1 = time.monotonic()
        self._busy = self._top.finish() if self._top is not None else []

    def summary(self) -> dict:
        out = summarize(self.samples, self._t1 - self._t0)
        out["busy_processes"] = self._busy
        out["loadavg"] = _loadavg()
        return out


# ----------------------------------------------------------------------------- recorded facts

def _loadavg() -> dict | None:
    try:
        a, b, c, runq, _ = Path("/proc/loadavg").read_text().split()
        running, total = runq.split("/")
        return {"1m": float(a), "5m": float(b), "15m": float(c), "running": int(running),
                "tasks": int(total)}
    except (OSError, ValueError):
        return None


def cpu_frequency() -> dict:
    """Governors and current / max frequency over the CPUs (cpufreq sysfs), or "absent"."""
    govs, cur, mx = {}, [], []
    for d in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        try:
            g = (d / "scaling_governor").read_text().strip()
            govs[g] = govs.get(g, 0) + 1
            cur.append(int((d / "scaling_cur_freq").read_text()) / 1000)
            mx.append(int((d / "scaling_max_freq").read_text()) / 1000)
        except (OSError, ValueError):
            continue
    if not govs:
        return {"governor": "absent", "note": "no cpufreq in sysfs (a VM or container)"}
    out = {"governor": ", ".join(f"{g} x{n}" for g, n in govs.items()),
           "cur_mhz_min": min(cur, default=None), "cur_mhz_max": max(cur, default=None),
           "max_mhz": max(mx, default=None)}
    if set(govs) != {"performance"}:
        out["note"] = "governor is not 'performance': the clock may change during the run"
    return out


def _run_tool(argv: list[str], timeout: float = 5.0) -> str:
    if shutil.which(argv[0]) is None:
        return "absent"
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {e}"
    text = (p.stdout or p.stderr).strip()
    return "\n".join(text.splitlines()[:12]) or f"exit {p.returncode}, no output"


def _tegrastats_line(timeout: float = 3.0) -> str:
    exe = shutil.which("tegrastats")
    if exe is None:
        return "absent"
    try:
        p = subprocess.Popen([exe, "--interval", "500"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    except OSError as e:
        return f"error: {e}"
    try:
        line = ""
        t0 = time.monotonic()
        while not line and time.monotonic() - t0 < timeout:
            line = (p.stdout.readline() if p.stdout else "").strip()
        return line or "no output"
    finally:
        p.kill()
        p.wait(timeout=5)


def jetson_state() -> dict:
    """Power mode and clocks where the Jetson tools exist (each "absent" elsewhere)."""
    nv = _run_tool(["nvpmodel", "-q"])
    mode = None
    for line in nv.splitlines():
        if "Power Mode" in line:
            mode = line.split(":", 1)[-1].strip()
    return {"nvpmodel": nv, "power_mode": mode, "jetson_clocks": _run_tool(["jetson_clocks",
                                                                             "--show"]),
            "tegrastats": _tegrastats_line(),
            "jtop": "present" if importlib.util.find_spec("jtop") is not None else "absent"}


# ----------------------------------------------------------------------------- the judgement

def judge_busy(before: dict | None, during: dict | None, policy: BusyPolicy,
               ncpu: int | None = None) -> dict:
    """{"busy", "reasons", "rule", "limits"} from the phases' summaries (see :data:`RULE`)."""
    ncpu = ncpu or os.cpu_count() or 1
    max_run = policy.max_other_runnable_per_cpu * ncpu
    reasons = []
    for phase, s in (("before timing", before), ("during the latency pass", during)):
        if not s:
            continue
        cpu, run = s.get("other_cpu_pct_median"), s.get("other_runnable_median")
        found = []
        if cpu is not None and cpu > policy.max_other_cpu_pct:
            found.append(f"{phase}: other processes used {cpu:.0f}% of the CPUs "
                         f"(limit {policy.max_other_cpu_pct:g}%)")
        if run is not None and run > max_run:
            found.append(f"{phase}: {run:g} other runnable tasks (limit {max_run:g} = "
                         f"{policy.max_other_runnable_per_cpu:g} x {ncpu} CPUs)")
        names = ", ".join(f"{p['name']} pid {p['pid']} ({p['cpu_pct_of_one_core']:.0f}% of a "
                          "core)" for p in s.get("busy_processes") or [])
        if found and names:
            found.append(f"{phase}: busiest other processes: {names}")
        reasons += found
    return {"busy": bool(reasons), "reasons": reasons, "rule": RULE,
            "limits": {"max_other_cpu_pct": policy.max_other_cpu_pct,
                       "max_other_runnable": max_run}}


def machine_block(before: dict | None, during: dict | None, policy: BusyPolicy) -> dict:
    """The report's ``machine_state``: phases, judgement, policy, frequency, Jetson."""
    verdict = judge_busy(before, during, policy)
    return {**verdict, "action": policy.action, "policy_source": policy.source,
            "logical_cpus": os.cpu_count(), "before": before, "during": during,
            "cpu_frequency": cpu_frequency(), "jetson": jetson_state()}
