"""Helpers the benchmark scripts share (not part of the package).

Every benchmark prints one JSON object as its last line of output; this
module holds what they have in common: the machine's description and load,
peak-memory readings from ``/proc``, a federation server in a separate
process that answers commands on its stdin (see ``_server.py``), and
synthetic block fingerprints for lightweight clients.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pl_parablock.recipe.schema import ModelSection

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
MB = 1_000_000
# the overlap and scaling benchmarks' model: the quickstart's (4 Llama layers, 128 wide, a 0.74 MB block per layer)
SMALL_LLAMA: dict[str, Any] = dict(ModelSection().config)


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _LoadMeter:
    """How much CPU other processes used while the benchmark ran (the machine is shared)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.busy0 = _busy_cpu_s()
        self.own0 = _own_cpu_s()

    def other_cpus(self) -> float:
        """Average number of CPUs busy with work that is not this benchmark's, since it started."""
        wall = time.perf_counter() - self.t0
        other = (_busy_cpu_s() - self.busy0) - (_own_cpu_s() - self.own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


_METER = _LoadMeter()


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how loaded it was when the benchmark started."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return info


def finish(result: dict[str, Any], started: float) -> None:
    """Add the run's duration and the machine load at the end, then print the JSON line (last)."""
    result.setdefault("machine", machine())
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # CPUs that processes other than this benchmark (and its children) kept busy on average while it ran
    result["machine"]["other_load_cpus"] = round(_METER.other_cpus(), 2)
    result["benchmark_s"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result, default=_plain), flush=True)


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def say(msg: str) -> None:
    """Progress for people, on stderr (stdout's last line is the JSON)."""
    print(msg, file=sys.stderr, flush=True)


def median(xs: Iterable[float]) -> float:
    values = list(xs)
    return statistics.median(values) if values else float("nan")


def proc_status_kb(*keys: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM`` = peak RSS)."""
    out: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0])
    return out


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; ``False`` where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def last_json(text: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of a benchmark's output."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


def block_fingerprint(blocks: Sequence[Mapping[str, Any]], mode: str = "parablock") -> dict[str, Any]:
    """A model fingerprint for lightweight clients that push synthetic blocks.

    ``blocks``: one mapping per block from tensor name to tensor (its dtype and
    shape are what the server checks).
    """
    partition = [{"name": f"block{i}", "params": list(b)} for i, b in enumerate(blocks)]
    tensors = {}
    for b in blocks:
        for name, t in b.items():
            dtype = str(t.dtype).removeprefix("torch.")
            tensors[name] = {"dtype": dtype, "shape": list(t.shape), "nbytes": t.numel() * t.element_size()}
    return {"mode": mode, "partition": partition, "tensors": tensors, "hash": "synthetic-benchmark-blocks"}


class ServerProcess:
    """A federation server (``_server.py``) in a child process, driven through its stdin.

    Its first output line gives its gRPC address (and the raw TCP echo port
    with ``echo=True``); every command then answers with one JSON line.
    """

    def __init__(
        self,
        *,
        clients: int,
        rounds: int,
        mode: str = "parablock",
        chunk_kb: int = 1024,
        echo: bool = False,
        min_clients: int | None = None,
        round_timeout_s: float | None = None,
        server_args: Sequence[str] = (),
    ) -> None:
        cmd = [sys.executable, os.path.join(HERE, "_server.py"), "--clients", str(clients), "--rounds", str(rounds), *server_args]
        cmd += ["--mode", mode, "--chunk-kb", str(chunk_kb)] + (["--echo"] if echo else [])
        if min_clients is not None:
            cmd += ["--min-clients", str(min_clients)]
        if round_timeout_s is not None:
            cmd += ["--round-timeout-s", str(round_timeout_s)]
        # the server process imports this checkout's package (the script's own folder comes first on its path)
        path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
        hello = self._read()
        self.address: str = hello["address"]
        self.echo_port: int | None = hello.get("echo_port")
        self.raw_grpc_port: int | None = hello.get("raw_grpc_port")
        self.started: dict[str, Any] = hello

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark server exited (status {self.proc.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("quit")
            except (OSError, RuntimeError, ValueError):
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
