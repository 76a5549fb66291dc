"""``python -m pl_parablock.fit``: run a federation from a recipe.

Usage::

    python -m pl_parablock.fit [RECIPE.yaml] [key=value ...]
        [--role local|server|client|evaluator] [--listen HOST:PORT]
        [--server HOST:PORT] [--client-id I] [--inprocess]

``--role local`` (the default) starts the server in this process and one
process per client on this machine, shows the rounds as they close, and ends
with a summary table, ``OUTPUT_DIR/report.json`` and the global model in
``OUTPUT_DIR/model``. ``--inprocess`` runs the clients as threads of this
process instead (one-process debugging). ``--role server`` serves a
federation for clients on other machines and prints the address it listens
on; ``--role client --client-id I --server HOST:PORT`` runs one client;
``--role evaluator --server HOST:PORT`` evaluates and saves the global model
off the training path (``eval.evaluator``: the local launcher starts one
itself when it is ``process``, or ``auto`` with ``eval.every`` > 0).

A bad recipe, a missing file or an unreachable server prints one clear
message and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Any

from pl_parablock.errors import ParaBlockError

if TYPE_CHECKING:
    from pl_parablock.forkserver import ForkServer
    from pl_parablock.recipe.schema import Recipe
    from pl_parablock.server.aggregator import Aggregator
    from pl_parablock.server.grpc_server import FederationServer
    from pl_parablock.server.service import FederationService

# torch, Lightning, transformers, gRPC and the package's modules that need them are imported where they are used:
# the launcher starts its clients' fork server before it pays for them (pl_parablock.forkserver).

log = logging.getLogger("pl_parablock")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pl_parablock.fit",
        description="Federated fine-tuning of a causal LM by block coordinate descent (ParaBlock).",
        epilog="Example: python -m pl_parablock.fit recipes/quickstart.yaml mode=sync federation.clients=2",
    )
    p.add_argument("recipe", nargs="?", help="YAML recipe (default: the built-in quickstart defaults)")
    p.add_argument("overrides", nargs="*", help="OmegaConf dotlist overrides, e.g. train.lr=1e-4")
    p.add_argument(
        "--role", choices=("local", "server", "client", "evaluator"), default="local", help="what this process runs (default: local)"
    )
    p.add_argument("--listen", default="127.0.0.1:0", help="server: HOST:PORT to bind (default 127.0.0.1 and a free port)")
    p.add_argument("--server", help="client, evaluator: HOST:PORT of the federation server")
    p.add_argument("--client-id", type=int, help="client: this client's id, 0..clients-1")
    p.add_argument("--inprocess", action="store_true", help="local: run the clients as threads of this process")
    p.add_argument("--reference", action="store_true", help="print every recipe key (type, default, meaning) and exit")
    return p


def _say(msg: str) -> None:
    print(msg, flush=True)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("pl_parablock").setLevel(logging.INFO if verbose else logging.WARNING)


class RoundPrinter:
    """What the server does with each closed round's record: its loggers (OUTPUT_DIR/logs/server) and the console.

    On a terminal, one line that redraws itself (rounds, a bar, ETA, loss);
    otherwise one plain line per round.
    """

    def __init__(self, recipe: Recipe, progress: bool, open_loggers: bool = True) -> None:
        self.recipe = recipe
        self.total = recipe.federation.rounds
        self.progress = progress
        self.tty = progress and sys.stdout.isatty()
        self._loggers: list[Any] | None = None
        self._lock = threading.Lock()
        self.start = time.time()
        if open_loggers:
            self.open()

    def open(self) -> None:
        """Create the loggers (they import Lightning: the launcher does it once its clients are started)."""
        from pl_parablock.recipe.build import run_loggers

        with self._lock:  # the launcher's thread, or the server's at a round's close
            if self._loggers is None:
                self._loggers = run_loggers(self.recipe, "server")

    @property
    def loggers(self) -> list[Any]:
        self.open()
        assert self._loggers is not None
        return self._loggers

    def __call__(self, rec: dict[str, Any]) -> None:
        metrics = {
            k: float(rec[k])
            for k in ("block", "arrived", "expected", "rejected", "late", "aggregation_s", "loss")
            if rec.get(k) is not None
        }
        for logger in self.loggers:
            logger.log_metrics(metrics, step=int(rec["round"]))
            logger.save()
        if not self.progress:
            return
        loss = rec.get("loss")
        elapsed = time.time() - self.start
        done = rec["round"] + 1
        if self.tty:
            eta = elapsed / done * (self.total - done)
            bar = "#" * int(24 * done / self.total)
            text = f"\r  round {done:>3}/{self.total} [{bar:<24}] ETA {eta:5.0f} s" + (f"  loss {loss:.4f}" if loss is not None else "")
            print(text, end="\n" if done >= self.total else "", flush=True)
            return
        missing = f" ({rec['arrived']}/{rec['expected']}: {rec['close_reason']})" if rec["arrived"] < rec["expected"] else ""
        _say(
            f"  round {done:>3}/{self.total}  block {rec['block']:>2}  {rec['arrived']}/{rec['expected']} clients  "
            + (f"loss {loss:.4f}  " if loss is not None else "")
            + f"t={elapsed:6.1f} s"
            + missing
        )

    def close(self) -> None:
        for logger in self.loggers:
            logger.finalize("success")


def _aggregator(recipe: Recipe, progress: bool, launcher: bool = False, open_loggers: bool = True) -> Aggregator:
    """The server state of a recipe, resumed from OUTPUT_DIR/server when a checkpoint is there.

    With an evaluator of its own (``eval.evaluator``; ``launcher``: the local
    launcher starts the processes), the server holds the curve's points for it.
    """
    from pl_parablock.core.plan import mode_of
    from pl_parablock.recipe.build import compression_of, evaluation_points, evaluator_of, server_optimizer_of, weight_bound
    from pl_parablock.server.aggregator import Aggregator

    f = recipe.federation
    schedule = mode_of(recipe.mode).schedule(recipe.blocks.schedule)
    checkpoint_dir = os.path.join(recipe.output_dir, "server")
    agg = Aggregator(
        clients=f.clients,
        rounds=f.rounds,
        schedule=schedule,
        seed=recipe.seed,
        server_lr=f.server_lr,
        server_optimizer=server_optimizer_of(recipe),
        mode=recipe.mode,
        assignment=recipe.blocks.assignment,
        staleness=f.staleness,
        stale_mix=f.stale_mix,
        gather_s=f.gather_s,
        min_clients=f.min_clients,
        round_timeout_s=f.round_timeout_s,
        clients_per_round=f.clients_per_round,
        aggregation=f.aggregation,
        trim_fraction=f.trim_fraction,
        clip_norm=f.clip_norm,
        max_update_norm=f.max_update_norm,
        checkpoint_dir=checkpoint_dir if f.checkpoint_every > 0 else None,
        checkpoint_every=f.checkpoint_every,
        on_round_closed=RoundPrinter(recipe, progress, open_loggers),
        weighting=f.weighting,
        max_weight=weight_bound(recipe),
        compression=compression_of(recipe),
    )
    if evaluator_of(recipe, launcher=launcher) == "process":
        agg.evaluator.configure(evaluation_points(recipe), recipe.eval.hold_models)
    if f.weighting == "shard" and weight_bound(recipe) is None:
        log.warning(
            "federation.weighting=shard with data files: the server cannot know the largest shard, so one client's weight "
            "can outweigh the others; set federation.max_weight to the largest shard"
        )
    if f.checkpoint_every > 0 and os.path.isfile(os.path.join(checkpoint_dir, "state.json")):
        resumed = agg.load_checkpoint(checkpoint_dir)
        if resumed >= f.rounds:
            raise ParaBlockError(f"the federation in {recipe.output_dir} already finished its {f.rounds} rounds; use another output_dir")
        _say(f"resuming the federation at round {resumed + 1}/{f.rounds} from the checkpoint in {checkpoint_dir}")
    return agg


def _service(recipe: Recipe, agg: Aggregator) -> FederationService:
    from pl_parablock.recipe.build import server_token
    from pl_parablock.server.service import FederationService

    f = recipe.federation
    return FederationService(agg, chunk_bytes=f.chunk_kb * 1024, token=server_token(recipe), max_wait_s=f.timeout_s)


def _server(recipe: Recipe, agg: Aggregator, listen: str) -> FederationServer:
    from pl_parablock.recipe.build import min_upload_mbps
    from pl_parablock.server.grpc_server import FederationServer
    from pl_parablock.wire.channel import TLS
    from pl_parablock.wire.framing import MAX_LARGE_HEADER_BYTES

    f = recipe.federation
    tls = TLS(cert=f.tls.cert, key=f.tls.key) if f.tls.cert else None
    tune_server_memory()  # this process serves; its clients train in their own processes
    return FederationServer(
        _service(recipe, agg),
        listen=listen,
        tls=tls,
        max_workers=f.max_calls,
        max_calls_per_peer=f.max_calls_per_peer,
        idle_timeout_s=f.idle_timeout_s,
        call_timeout_s=f.timeout_s + 60.0,
        max_message_bytes=max(f.chunk_kb * 1024, MAX_LARGE_HEADER_BYTES) + (64 << 10),
        receive_window_kb=f.receive_window_kb,
        max_uploads=f.max_uploads,
        data_port=f.data_port,
        body_timeout_s=f.body_timeout_s,
        min_upload_bps=min_upload_mbps(recipe) * 1e6 / 8,
    )


def tune_server_memory() -> bool:
    """Tune this process's allocator for serving (:func:`pl_parablock.server.grpc_server.tune_server_memory`)."""
    from pl_parablock.server.grpc_server import tune_server_memory as tune

    return tune()


def _client_address(address: str, recipe: Recipe) -> str:
    """Where local client processes reach a server bound to ``address``."""
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    if recipe.federation.tls.cert:
        host = "localhost"  # certificates name hosts; a self-signed one for local runs names localhost
    return f"{host}:{port}"


def _describe_data(recipe: Recipe) -> str:
    from pl_parablock.data import describe_data

    return "\n  ".join(describe_data(recipe.data, clients=recipe.federation.clients, seed=recipe.seed, evaluation=recipe.eval))


def _finish(recipe: Recipe, agg: Aggregator, wall_s: float) -> int:
    from pl_parablock.report import build_report, format_summary, write_pictures, write_report
    from pl_parablock.wire.link import Link

    if isinstance(agg.on_round_closed, RoundPrinter):
        agg.on_round_closed.close()
    report = build_report(recipe, agg.report(), wall_s=wall_s, link=Link.from_section(recipe.link), output_dir=recipe.output_dir)
    try:
        report["pictures"] = write_pictures(report, recipe.output_dir)
    except Exception as exc:  # the pictures must not cost the run its report
        log.warning("could not draw the run's pictures: %r", exc)
        _say(f"warning: no pictures ({type(exc).__name__}: {exc}); report.json is complete")
    path = write_report(report, recipe.output_dir)
    _say("")
    _say(format_summary(report, path))
    return 0


def _banner(recipe: Recipe, where: str, data: str | None = None) -> None:
    from pl_parablock.wire.link import Link

    f = recipe.federation
    steps = recipe.train.local_steps
    _say(f"pl_parablock: mode={recipe.mode}, {f.clients} clients, {f.rounds} rounds, {steps} local steps per round ({where})")
    _say(f"  {Link.from_section(recipe.link).describe()}")
    _say(f"  {data if data is not None else _describe_data(recipe)}")


def _quorum_survives(recipe: Recipe, alive: int) -> bool:
    f = recipe.federation
    return f.round_timeout_s is not None and alive >= (f.min_clients or f.clients)


def _start_evaluator(recipe: Recipe, fork: ForkServer | None, resolved: str, address: str, logs: str) -> tuple[Any, IO[bytes] | None]:
    """Start the evaluator process (``--role evaluator``) against the server at ``address``; its log goes to logs/evaluator.log.

    Forked from the fork server like a client when there is one, else ``python -m pl_parablock.fit --role evaluator``.
    """
    from pl_parablock.forkserver import EVALUATOR_ID, client_env
    from pl_parablock.recipe.build import client_threads

    argv = [resolved, "--role", "evaluator", "--server", address]
    log_path = os.path.join(logs, "evaluator.log")
    if fork is not None and fork.ready:
        return fork.spawn(EVALUATOR_ID, argv, log_path), None
    log_file = open(log_path, "wb")
    cmd = [sys.executable, "-m", "pl_parablock.fit", *argv]
    return subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=client_env(client_threads(recipe))), log_file


def _end_evaluator(evaluator: tuple[Any, IO[bytes] | None] | None, grace_s: float, logs: str, wait: bool) -> None:
    """The clients are done: give the evaluator ``grace_s`` to finish (``wait``), else stop it; it never fails the run."""
    if evaluator is None:
        return
    p, log_file = evaluator
    try:
        if wait and p.poll() is None:
            _say("training done; the evaluator evaluates and saves the final model")
            p.wait(grace_s)
    except (subprocess.TimeoutExpired, TimeoutError):
        _say(f"the evaluator did not finish within {grace_s:g} s (federation.timeout_s): stopped, the report has no final evaluation")
    finally:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except (subprocess.TimeoutExpired, TimeoutError):
                p.kill()
                p.wait(5)
        if log_file is not None:
            log_file.close()
    if wait and p.returncode not in (0, None, -15):
        where = os.path.join(logs, "evaluator.log")
        _say(f"the evaluator failed (exit status {p.returncode}); the report has no final evaluation. Its log ({where}):\n{_tail(where)}")


def _fork_server(recipe: Recipe, fork: ForkServer | None) -> ForkServer | None:
    """The fork server started early if its thread count is the recipe's, else a new one (or none where fork is unsafe)."""
    from pl_parablock import forkserver
    from pl_parablock.recipe.build import client_threads

    threads = client_threads(recipe)
    if fork is not None and fork.threads == threads:
        return fork
    if fork is not None:
        fork.close()
    return forkserver.ForkServer(threads) if forkserver.available() else None


def _start_clients(
    recipe: Recipe, fork: ForkServer | None, resolved: str, address: str, logs: str, meanwhile: Any = None
) -> dict[int, tuple[Any, IO[bytes] | None]]:
    """One process per client: forked from the fork server once it is ready, else ``python -m pl_parablock.fit --role client``.

    ``meanwhile`` is called first if the fork server is still importing (work for this process while it waits).
    """
    from pl_parablock.forkserver import client_env
    from pl_parablock.recipe.build import client_threads

    argv = [resolved, "--role", "client", "--server", address]
    procs: dict[int, tuple[Any, IO[bytes] | None]] = {}
    if fork is not None and meanwhile is not None:
        fork.pump(0.0)
        if fork.ready is None:
            meanwhile()
    if fork is not None and not fork.wait_ready():
        _say(f"warning: starting each client as a process of its own: the fork server cannot fork them ({fork.reason})")
        fork = None
    for i in range(recipe.federation.clients):
        log_path = os.path.join(logs, f"client_{i}.log")
        if fork is not None:
            procs[i] = (fork.spawn(i, [*argv, "--client-id", str(i)], log_path), None)
            continue
        log_file = open(log_path, "wb")
        cmd = [sys.executable, "-m", "pl_parablock.fit", *argv, "--client-id", str(i)]
        procs[i] = (subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=client_env(client_threads(recipe))), log_file)
    return procs


def _local_processes(recipe: Recipe, fork: ForkServer | None = None) -> int:
    from pl_parablock.recipe.build import client_threads, evaluator_of
    from pl_parablock.recipe.load import to_yaml

    recipe.train.threads = client_threads(recipe)
    recipe.eval.evaluator = evaluator_of(recipe, launcher=True)  # the clients read it from the resolved recipe
    fork = _fork_server(recipe, fork)  # it imports while this process reads the data and starts the server
    try:
        return _run_local(recipe, fork, to_yaml(recipe))
    finally:
        if fork is not None:
            fork.close()


def _run_local(recipe: Recipe, fork: ForkServer | None, resolved_yaml: str) -> int:
    out = recipe.output_dir
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    resolved = os.path.join(out, "recipe.yaml")
    with open(resolved, "w", encoding="utf-8") as fh:
        fh.write(resolved_yaml)
    data = _describe_data(recipe)  # reads the data: a bad file stops the run before the server starts
    agg = _aggregator(recipe, progress=True, launcher=True, open_loggers=False)  # Lightning's loggers: once the clients are started
    server = _server(recipe, agg, "127.0.0.1:0")
    address = _client_address(server.start(), recipe)
    _banner(recipe, f"server {address}, client logs in {logs}", data)
    procs: dict[int, tuple[Any, IO[bytes] | None]] = {}
    evaluator = None
    start = time.perf_counter()
    failed: tuple[int, int] | None = None
    dropped: list[int] = []
    try:
        printer = agg.on_round_closed if isinstance(agg.on_round_closed, RoundPrinter) else None
        procs = _start_clients(recipe, fork, resolved, address, logs, meanwhile=printer.open if printer else None)
        if recipe.eval.evaluator == "process":
            evaluator = _start_evaluator(recipe, fork, resolved, address, logs)
        if printer is not None:
            printer.open()
        while any(p.poll() is None for p, _ in procs.values()):
            for i, (p, _) in procs.items():
                rc = p.poll()
                if rc in (None, 0) or i in dropped:
                    continue
                alive = sum(1 for q, _ in procs.values() if q.poll() is None)
                if _quorum_survives(recipe, alive):
                    dropped.append(i)
                    where = os.path.join(logs, f"client_{i}.log")
                    _say(f"client {i} exited with status {rc} (log: {where}); the federation goes on with {alive}")
                else:
                    failed = (i, rc)
                    break
            if failed:
                break
            time.sleep(0.2)
        if failed is None:
            failed = next(((i, p.returncode) for i, (p, _) in procs.items() if p.returncode != 0 and i not in dropped), None)
    except KeyboardInterrupt:
        _say("interrupted: stopping the clients")
        failed = (-1, 130)
    finally:
        _end_evaluator(evaluator, leave_grace_s(recipe), logs, wait=failed is None)
        for p, _ in procs.values():
            if p.poll() is None:
                p.terminate()
        for p, log_file in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            if log_file is not None:
                log_file.close()
        server.stop()
    wall = time.perf_counter() - start
    if failed is not None:
        i, rc = failed
        if i >= 0:
            tail = _tail(os.path.join(logs, f"client_{i}.log"))
            _say(f"client {i} failed (exit status {rc}); the end of its log ({os.path.join(logs, f'client_{i}.log')}):\n{tail}")
        return 2 if rc in (2, 130) else 1
    return _finish(recipe, agg, wall)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def federate_in_process(recipe: Recipe, progress: bool = False) -> tuple[Aggregator, list[Any], float]:
    """Run ``recipe``'s federation in this process, clients as threads over the in-process transport.

    Returns the aggregator, the client runs and the wall time. The first
    client failure is raised (a :class:`ParaBlockError` as it is). With
    ``eval.evaluator: process`` an evaluator runs as one more thread
    (:func:`~pl_parablock.client.evaluator.evaluate_in_thread`); ``auto`` is client 0 here.
    """
    from pl_parablock.client.evaluator import evaluate_in_thread
    from pl_parablock.client.inprocess import InProcessTransport
    from pl_parablock.client.runner import prepare_client, quiet_third_party
    from pl_parablock.recipe.build import client_threads, client_token, evaluator_of
    from pl_parablock.wire.link import Link

    quiet_third_party()
    f = recipe.federation
    recipe.train.threads = client_threads(recipe)  # as a local process client has them (the clients share the process's)
    agg = _aggregator(recipe, progress=progress)
    service = _service(recipe, agg)
    link = Link.from_section(recipe.link)
    runs = [
        prepare_client(
            recipe,
            i,
            InProcessTransport(service, link=link, chunk_bytes=f.chunk_kb * 1024, token=client_token(recipe, i)),
        )
        for i in range(f.clients)
    ]
    errors: list[tuple[int, BaseException]] = []  # in the order they happened: the first is the cause

    def target(run: Any) -> None:
        try:
            run.fit()
        except BaseException as exc:
            errors.append((run.client_id, exc))
            agg.shutdown()

    start = time.perf_counter()
    evaluator = evaluate_in_thread(recipe, service) if evaluator_of(recipe, launcher=False) == "process" else None
    threads = [threading.Thread(target=target, args=(r,), name=f"pl_parablock-client-{r.client_id}") for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if evaluator is not None:
        evaluator.join(leave_grace_s(recipe))
        if evaluator.is_alive():  # its waits end at the shutdown
            log.warning("the evaluator did not finish within %g s: stopped", leave_grace_s(recipe))
            agg.shutdown()
            evaluator.join(leave_grace_s(recipe))  # a daemon: one still evaluating a model ends with the process
    wall = time.perf_counter() - start
    if errors:
        first, exc = errors[0]
        if isinstance(exc, ParaBlockError):
            raise exc
        raise RuntimeError(f"client {first} failed") from exc
    return agg, runs, wall


def _local_inprocess(recipe: Recipe) -> int:
    _banner(recipe, "one process, clients as threads")
    agg, _, wall = federate_in_process(recipe, progress=True)
    return _finish(recipe, agg, wall)


def leave_grace_s(recipe: Recipe) -> float:
    """How long a server waits, after the last round closed, for every joined client's Leave.

    A client evaluates and saves the final model before it leaves, which may
    take long: the server waits as long as any network wait may take
    (``federation.timeout_s``), and at least a round's timeout; a client that
    has not left by then is counted as dropped.
    """
    f = recipe.federation
    return max(f.timeout_s, f.round_timeout_s or 0.0)


def _waiting_for(clients: list[int], grace_s: float) -> None:
    """The last round closed: say whose report the server still waits for, and how long at most."""
    who = ("clients " if len(clients) > 1 else "client ") + ", ".join(str(c) for c in clients)
    _say(f"every round closed; waiting up to {grace_s:g} s for {who}'s report (federation.timeout_s)")


def _serve(recipe: Recipe, listen: str) -> int:
    from pl_parablock.recipe.build import server_token

    f = recipe.federation
    agg = _aggregator(recipe, progress=True)
    server = _server(recipe, agg, listen)
    address = server.start()
    _say(f"listening on {address}")
    if server.data_port is not None:
        _say(f"blocks on the data plane, port {server.data_port} (federation.data_port; open it beside the gRPC port)")
    auth = "token required" if server_token(recipe) else "no token (trusted network only)"
    tls = ", TLS" if f.tls.cert else ""
    _say(f"pl_parablock server: mode={recipe.mode}, waiting for {f.clients} clients, {f.rounds} rounds, {auth}{tls}")
    start = time.perf_counter()
    limit = f.timeout_s * (f.rounds + 2)
    grace = leave_grace_s(recipe)
    try:
        finished = agg.wait_finished(timeout=limit, grace_s=grace, on_wait=_waiting_for)
    except KeyboardInterrupt:
        _say("interrupted: stopping the server")
        server.stop()
        return 130
    if finished:
        _await_evaluator(agg, grace)
    server.stop()
    if not finished:
        raise ParaBlockError(f"the federation did not finish within {limit:g} s: rounds closed {agg.next_round()}/{f.rounds}")
    return _finish(recipe, agg, time.perf_counter() - start)


def _await_evaluator(agg: Aggregator, grace_s: float) -> None:
    """Every round closed and the clients left: an evaluator that has read and not reported gets ``grace_s`` to report."""
    desk, deadline = agg.evaluator, time.monotonic() + grace_s
    if desk.seen is not None and not desk.left:
        _say(f"every client left; waiting up to {grace_s:g} s for the evaluator's report (federation.timeout_s)")
    while desk.seen is not None and not desk.left and time.monotonic() < deadline:
        time.sleep(0.2)


def _client(recipe: Recipe, client_id: int | None, server: str | None, preloaded: list[str] | None = None) -> int:
    from pl_parablock.client.runner import prepare_client, quiet_third_party
    from pl_parablock.forkserver import started_from_fork_server

    if client_id is None or server is None:
        raise ParaBlockError("--role client needs --client-id I and --server HOST:PORT")
    if not 0 <= client_id < recipe.federation.clients:
        raise ParaBlockError(
            f"--client-id {client_id} is outside 0..{recipe.federation.clients - 1} (federation.clients={recipe.federation.clients})"
        )
    quiet_third_party()
    run = prepare_client(recipe, client_id, server)
    run.fit()
    path = os.path.join(recipe.output_dir, "clients", f"client_{client_id}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        start = {"forked": started_from_fork_server(), "preloaded": preloaded or []}
        json.dump({**run.report(), "process_start": start}, fh, indent=1, default=str)
    log.info("client %d done; report in %s", client_id, path)
    return 0


def _evaluate(recipe: Recipe, server: str | None) -> int:
    """``--role evaluator``: evaluate the global model of the federation at ``server`` off the training path, and save it."""
    from pl_parablock.client.evaluator import evaluate_remote
    from pl_parablock.client.runner import quiet_third_party
    from pl_parablock.recipe.build import evaluator_of

    if server is None:
        raise ParaBlockError("--role evaluator needs --server HOST:PORT (the address the server printed)")
    quiet_third_party()
    if evaluator_of(recipe, launcher=False) != "process":
        _say(
            f"warning: eval.evaluator is {recipe.eval.evaluator}: client 0 evaluates and saves the model too; "
            "give every host eval.evaluator=process"
        )
    report = evaluate_remote(recipe, server)
    path = os.path.join(recipe.output_dir, "evaluator.json")
    os.makedirs(recipe.output_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=1, default=str)
    log.info("evaluator done; report in %s", path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.reference:
        from pl_parablock.recipe.docs import reference_markdown

        print(reference_markdown())
        return 0
    recipe_path = args.recipe
    overrides = list(args.overrides)
    if recipe_path is not None and "=" in recipe_path and not os.path.exists(recipe_path):
        overrides.insert(0, recipe_path)
        recipe_path = None
    preloaded = [m for m in _PRELOADED if m in sys.modules]  # before this process imports anything for its role
    _setup_logging(verbose=args.role in ("client", "evaluator"))
    fork = _early_fork_server(recipe_path, overrides) if args.role == "local" and not args.inprocess else None
    try:
        from pl_parablock.recipe.load import load_recipe

        recipe = load_recipe(recipe_path, overrides)
        if args.role == "client":
            return _client(recipe, args.client_id, args.server, preloaded)
        if args.role == "evaluator":
            return _evaluate(recipe, args.server)
        if args.role == "server":
            return _serve(recipe, args.listen)
        if args.inprocess:
            return _local_inprocess(recipe)
        used, fork = fork, None
        return _local_processes(recipe, used)
    except ParaBlockError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if fork is not None:
            fork.close()


_PRELOADED = ("torch", "lightning", "transformers")
"""Modules a client's report says were imported before its code began (by the fork server it was forked from)."""


def _early_fork_server(recipe_path: str | None, overrides: list[str]) -> ForkServer | None:
    """The launcher's first act: start the clients' fork server, so that it imports while the launcher starts the server."""
    from pl_parablock import forkserver

    threads = forkserver.peek_threads(recipe_path, overrides) if forkserver.available() else None
    return forkserver.ForkServer(threads) if threads is not None else None


if __name__ == "__main__":
    sys.exit(main())
