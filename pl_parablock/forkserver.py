"""Local client processes forked from a process that imported torch, Lightning and transformers once.

``python -m pl_parablock.fit RECIPE`` runs one process per client. Started
as ``python -m pl_parablock.fit --role client ...``, every client imports
torch, Lightning, transformers and the package itself (seconds each, all
clients at once on the same cores) before it trains. The launcher instead
starts one **fork server** as its first act: a fresh interpreter with the
clients' environment (``OMP_NUM_THREADS``, ``TOKENIZERS_PARALLELISM``) that
imports those modules while the launcher reads the recipe and starts the
server, checks that it has started no thread, and then forks one child per
client. A child sends its output to ``OUTPUT_DIR/logs/client_I.log`` and
runs ``--role client`` exactly as a process of its own would (the same
``main``, arguments and environment), so every federation ends where it did.

The fork server serves only the launcher that started it: commands and
events travel as JSON lines over two pipes of their own. It reaps its
children and reports each exit status; when the launcher goes away it stops
the children still running and exits. On platforms without a safe ``fork``
(macOS, Windows), or with ``PL_PARABLOCK_FORKSERVER=0``, the launcher starts
each client as a process of its own instead.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import IO, Any

from pl_parablock.recipe.cores import available_cores

__all__ = ["EVALUATOR_ID", "PRELOAD", "ForkServer", "ForkedClient", "available", "client_env", "peek_threads", "started_from_fork_server"]

EVALUATOR_ID = -1  # the evaluator, forked like a client (client ids are 0..N-1)

PRELOAD = (
    "torch",
    "lightning.pytorch",
    "transformers",
    "pl_parablock.fit",
    "pl_parablock.client.runner",
    "pl_parablock.client.evaluator",
    "pl_parablock.client.transport",
    "pl_parablock.model.build",
    "pl_parablock.data",
    "transformers.models.llama.modeling_llama",
)
"""What the fork server imports once for all its clients: every client imports these before it trains."""

READY_TIMEOUT_S = 300.0
"""How long the launcher waits for the fork server's imports before it starts its clients as processes of their own."""

_FORKED = False
"""True in a client forked from the fork server (what its report says)."""


def available() -> bool:
    """Whether this platform forks safely (Linux) and ``PL_PARABLOCK_FORKSERVER`` does not turn the fork server off."""
    return sys.platform.startswith("linux") and hasattr(os, "fork") and os.environ.get("PL_PARABLOCK_FORKSERVER", "1") != "0"


def started_from_fork_server() -> bool:
    """Whether this process is a client forked from a fork server."""
    return _FORKED


def client_env(threads: int) -> dict[str, str]:
    """The environment of a local client process computing with ``threads`` CPU threads."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


CHILD_OMP = "PL_PARABLOCK_CHILD_OMP_NUM_THREADS"
"""The children's ``OMP_NUM_THREADS`` (empty: unset), kept aside while the fork server imports with one thread."""


def _importing_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for the fork server's imports: one OpenMP thread, the children's own count kept in :data:`CHILD_OMP`.

    Importing torch with ``OMP_NUM_THREADS`` above 1 starts OpenMP's worker threads, and a process with threads
    must not fork. Each child gets its count back (:func:`_restore_threads`) before any of its code runs.
    """
    return {**env, CHILD_OMP: env.get("OMP_NUM_THREADS", ""), "OMP_NUM_THREADS": "1"}


def _restore_threads() -> None:
    """In a child: the environment and torch's thread count a process of its own would have started with."""
    wanted = os.environ.pop(CHILD_OMP, "")
    if wanted:
        os.environ["OMP_NUM_THREADS"] = wanted
    else:
        os.environ.pop("OMP_NUM_THREADS", None)
    import torch

    torch.set_num_threads(int(wanted) if wanted else available_cores())


def peek_threads(recipe_path: str | None, overrides: Sequence[str]) -> int | None:
    """The clients' thread count read from the recipe's YAML without loading it (no torch), or ``None`` if unsure.

    A guess that lets the fork server start before the recipe is loaded and
    validated; the launcher compares it with the loaded recipe's
    (:func:`pl_parablock.recipe.build.client_threads`) and starts another
    fork server when they differ.
    """
    import yaml

    try:
        user: Any = {}
        if recipe_path is not None:
            with open(recipe_path, encoding="utf-8") as fh:
                user = yaml.safe_load(fh) or {}
        train, federation = (user.get("train") or {}), (user.get("federation") or {})
        threads, clients = train.get("threads"), federation.get("clients")
        for item in overrides:
            key, _, value = item.partition("=")
            if key.strip() == "train.threads":
                threads = yaml.safe_load(value)
            elif key.strip() == "federation.clients":
                clients = yaml.safe_load(value)
        if threads:
            return int(threads)
        return None if clients is None else max(1, available_cores() // int(clients))
    except Exception:  # a recipe this cannot read is the loader's to report
        return None


class ForkedClient:
    """A client forked by the fork server, seen from the launcher like a :class:`subprocess.Popen`."""

    def __init__(self, server: ForkServer, client_id: int) -> None:
        self.server = server
        self.client_id = client_id
        self.pid: int | None = None
        self.returncode: int | None = None

    def poll(self) -> int | None:
        self.server.pump(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"client {self.client_id}", timeout or 0.0)
            self.server.pump(min(left, 1.0))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.server.command({"op": "signal", "id": self.client_id, "sig": int(sig)})

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The launcher's handle on its fork server: start it, wait until it is ready, fork clients, close it.

    Args:
        threads: the clients' CPU threads (``OMP_NUM_THREADS`` of the fork
            server, set before it imports torch).
    """

    def __init__(self, threads: int | None, preload: Sequence[str] = ()) -> None:
        self.threads = threads
        cmd_r, self._cmd_w = os.pipe()
        self._ev_r, ev_w = os.pipe()
        self._output: IO[bytes] = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pl_parablock.forkserver", str(cmd_r), str(ev_w), *preload],
            env=_importing_env(client_env(threads) if threads is not None else {**os.environ, "PYTHONUNBUFFERED": "1"}),
            pass_fds=(cmd_r, ev_w),
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        os.close(cmd_r)
        os.close(ev_w)
        self._buf = b""
        self._eof = False
        self.ready: bool | None = None
        self.reason = ""
        self.clients: dict[int, ForkedClient] = {}
        self._closed = False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> bool:
        """Wait until the fork server has imported its modules; ``False`` (see :attr:`reason`) if it cannot fork clients."""
        deadline = time.monotonic() + timeout
        while self.ready is None and not self._eof:
            left = deadline - time.monotonic()
            if left <= 0:
                self.reason = f"its imports took over {timeout:g} s"
                break
            self.pump(min(left, 1.0))
        if self.ready is None:
            self.ready = False
            self.reason = self.reason or f"it exited with status {self._proc.poll()}: {self.output_tail()}"
        return self.ready

    def spawn(self, client_id: int, argv: Sequence[str], log_path: str, module: str = "pl_parablock.fit") -> ForkedClient:
        """Fork child ``client_id``: ``python -m MODULE *argv`` (``main(argv)`` of ``module``) with its output to ``log_path``."""
        client = self.clients[client_id] = ForkedClient(self, client_id)
        self.command({"op": "spawn", "id": client_id, "argv": list(argv), "log": os.path.abspath(log_path), "module": module})
        return client

    def command(self, msg: dict[str, Any]) -> None:
        try:
            os.write(self._cmd_w, json.dumps(msg).encode() + b"\n")
        except OSError:  # the fork server is gone: pump() reports its clients as failed
            self._lost()

    def pump(self, timeout: float) -> None:
        """Read the fork server's events for up to ``timeout`` seconds (pids, exit statuses)."""
        if self._eof:
            return
        ready, _, _ = select.select([self._ev_r], [], [], timeout)
        if not ready:
            return
        data = os.read(self._ev_r, 1 << 16)
        if not data:
            self._lost()
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            self._event(json.loads(line))

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev["ev"]
        if kind == "ready":
            self.ready = True
        elif kind == "nofork":
            self.ready, self.reason = False, str(ev["reason"])
        elif kind == "pid":
            self.clients[int(ev["id"])].pid = int(ev["pid"])
        elif kind == "exit":
            self.clients[int(ev["id"])].returncode = int(ev["rc"])

    def _lost(self) -> None:
        """The fork server went away: its clients it did not report are stopped and counted as failed."""
        self._eof = True
        for client in self.clients.values():
            if client.returncode is None:
                if client.pid is not None:
                    try:
                        os.kill(client.pid, signal.SIGKILL)
                    except OSError:
                        pass
                client.returncode = -int(signal.SIGKILL)

    def output_tail(self, chars: int = 2000) -> str:
        """The end of the fork server's own output (its import warnings or errors)."""
        self._output.seek(0)
        return self._output.read().decode("utf-8", "replace")[-chars:].strip() or "(no output)"

    def close(self) -> None:
        """Stop the fork server: its clients still running are stopped, every process is reaped (once; again is a no-op)."""
        if self._closed:
            return
        self._closed = True
        if self._proc.poll() is None and self.ready is None:
            self._proc.kill()  # still importing: it has no client yet
        try:
            os.close(self._cmd_w)  # the fork server stops what still runs, reaps it and exits
        except OSError:
            pass
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        while not self._eof:  # the last exits, then the end of the pipe
            self.pump(1.0)
        os.close(self._ev_r)
        self._output.close()


# --- the fork server's side -------------------------------------------------------------------------------------------


def _send(fd: int, ev: dict[str, Any]) -> None:
    os.write(fd, json.dumps(ev).encode() + b"\n")


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def _serve(cmd_fd: int, ev_fd: int) -> dict[str, Any] | None:
    """Fork a child per ``spawn`` command and report its pid and exit; returns the command in a child, ``None`` at the end."""
    children: dict[int, int] = {}  # pid -> client id
    buf = b""
    eof = False
    while not (eof and not children):
        ready, _, _ = select.select([] if eof else [cmd_fd], [], [], 0.05)
        if ready:
            data = os.read(cmd_fd, 1 << 16)
            if not data:  # the launcher closed or went away: stop what still runs
                eof = True
                for pid in children:
                    os.kill(pid, signal.SIGTERM)
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if msg["op"] == "spawn":
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        os.close(cmd_fd)
                        os.close(ev_fd)
                        return dict(msg)
                    children[pid] = int(msg["id"])
                    _report(ev_fd, {"ev": "pid", "id": msg["id"], "pid": pid})
                elif msg["op"] == "signal":
                    for pid, cid in children.items():
                        if cid == msg["id"]:
                            os.kill(pid, int(msg["sig"]))
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            cid = children.pop(pid)
            _report(ev_fd, {"ev": "exit", "id": cid, "rc": os.waitstatus_to_exitcode(status)})
    return None


def _report(fd: int, ev: dict[str, Any]) -> None:
    try:
        _send(fd, ev)
    except OSError:  # the launcher is gone; its command pipe's end stops the children
        pass


def _run_client(msg: dict[str, Any], on_interrupt: Any) -> int:
    """In a forked child: become ``python -m MODULE *argv`` (``pl_parablock.fit`` unless told) with its output in its log."""
    global _FORKED
    _FORKED = True
    signal.signal(signal.SIGINT, on_interrupt)  # as the interpreter set it up: a KeyboardInterrupt, or ignored as the launcher's
    fd = os.open(msg["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    _restore_threads()
    entry = importlib.import_module(msg.get("module", "pl_parablock.fit"))
    sys.argv = [str(entry.__file__), *msg["argv"]]
    return int(entry.main(msg["argv"]))


def main(argv: Sequence[str]) -> int:
    """The fork server: import :data:`PRELOAD`, say whether it can fork, then fork clients on command."""
    cmd_fd, ev_fd, extra = int(argv[0]), int(argv[1]), list(argv[2:])  # extra: modules its children run besides fit
    on_interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the launcher and the clients; this one reaps them
    try:
        for name in (*PRELOAD, *extra):
            importlib.import_module(name)
    except Exception as exc:
        _report(ev_fd, {"ev": "nofork", "reason": f"importing {name} failed: {type(exc).__name__}: {exc}"})
        return 1
    if _threads() > 1:
        _report(ev_fd, {"ev": "nofork", "reason": f"its imports started {_threads() - 1} thread(s); forking it would be unsafe"})
        return 1
    _report(ev_fd, {"ev": "ready"})
    child = _serve(cmd_fd, ev_fd)
    return 0 if child is None else _run_client(child, on_interrupt)


if __name__ == "__main__":
    sys.modules.setdefault("pl_parablock.forkserver", sys.modules[__name__])  # one module: the clients read its _FORKED
    sys.exit(main(sys.argv[1:]))
