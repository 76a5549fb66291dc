"""The evaluator: evaluates the global model off the training path, in a process (or thread) of its own.

``python -m pl_parablock.fit RECIPE --role evaluator --server HOST:PORT``
(the local launcher starts one when ``eval.evaluator`` is ``process``)
builds the recipe's model, then, for every point of the curve (the
initial model and every ``eval.every`` rounds, :func:`~pl_parablock.recipe.build.evaluation_points`)
and for the final model, reads the global blocks after that many rounds
from the server, evaluates them and, at the end, saves the model exactly as
client 0 would (:class:`~pl_parablock.client.evaluation.ModelEvaluation`)
and sends its report to the server. It is not a client: it trains nothing,
no round waits for it, and the clients never wait for an evaluation. An
evaluator behind the rounds skips to a later point the server could hold
for it (:mod:`pl_parablock.server.evaluator`); the report lists the points
it skipped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from functools import partial
from typing import Any

import torch
from torch import Tensor

from pl_parablock.client.evaluation import ModelEvaluation
from pl_parablock.client.transport import Transport
from pl_parablock.data import client_data
from pl_parablock.errors import FederationError
from pl_parablock.model.build import build_model, save_base, save_merged
from pl_parablock.model.module import ParaBlockModule
from pl_parablock.recipe.build import client_threads, client_token, evaluation_points
from pl_parablock.recipe.schema import Recipe

__all__ = ["Evaluator", "evaluate_in_thread", "evaluate_remote"]

log = logging.getLogger(__name__)

_TRUE_PRECISION = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


class Evaluator:
    """Evaluates the global model of a federation as its rounds close, and saves the final one.

    Args:
        recipe: the federation's recipe (the model, the evaluation data, ``eval.every``).
        transport: a connection to the federation's server (its token presented as a client's).

    Example::

        >>> evaluator = Evaluator(recipe, GrpcTransport("10.0.0.5:50051", token=token))  # doctest: +SKIP
        >>> report = evaluator.run()  # doctest: +SKIP
    """

    def __init__(self, recipe: Recipe, transport: Transport) -> None:
        if recipe.train.threads:
            torch.set_num_threads(recipe.train.threads)  # as client 0 has them: the same arithmetic
        self.recipe = recipe
        self.transport = transport
        self.rounds = recipe.federation.rounds
        self.points = evaluation_points(recipe)
        self.timeout_s = recipe.federation.timeout_s * (self.rounds + 2)  # the whole run, as the server waits for it
        data = client_data(recipe.data, 0, clients=recipe.federation.clients, seed=recipe.seed, evaluation=recipe.eval, evaluate=True)
        model, tokenizer = build_model(recipe.model, recipe.seed)
        t, pe, out = recipe.train, recipe.model.peft, recipe.output_dir
        self.module = ParaBlockModule(model, tokenizer, lr=t.lr, weight_decay=t.weight_decay)
        if t.precision in _TRUE_PRECISION:  # Lightning converts client 0's module to that dtype
            self.module.to(_TRUE_PRECISION[t.precision])
        self.module.eval()
        merged = bool(pe.method and pe.merge)
        based = bool(pe.method and recipe.model.config)
        self.evaluation = ModelEvaluation(
            data.evals,
            tokenizer,
            batch_size=t.batch_size,
            max_length=t.max_length,
            max_new_tokens=recipe.eval.max_new_tokens,
            model_dir=os.path.join(out, "model"),
            on_error=recipe.data.on_error,
            merged_dir=os.path.join(out, "merged_model") if merged else None,
            merge=partial(save_merged, recipe.model, recipe.seed, tokenizer=tokenizer) if merged else None,
            base_dir=os.path.join(out, "base_model") if based else None,
            save_base=partial(save_base, recipe.model, recipe.seed, tokenizer=tokenizer) if based else None,
        )
        self._params = dict(self.module.named_parameters())
        self.curve: list[dict[str, Any]] = []
        self.skipped: list[int] = []

    def _apply(self, tensors: dict[str, Tensor]) -> None:
        for name, value in tensors.items():
            p = self._params.get(name)
            if p is None or p.shape != value.shape or p.dtype != value.dtype:
                raise FederationError(
                    f"the server's model has {name!r} {tuple(value.shape)} {value.dtype}, which this recipe's model "
                    f"{'lacks' if p is None else f'has as {tuple(p.shape)} {p.dtype}'}: run the evaluator with the federation's recipe"
                )
            with torch.no_grad():
                p.copy_(value)

    def load(self, after: int) -> int:
        """Load the global model after ``after`` rounds (or after a later point the server held); returns the point loaded."""
        target = after
        while True:
            point: int | None = None
            block, count = 0, 1
            while block < count:
                got, count, tensors = self.transport.evaluator_pull(target if point is None else point, block, self.timeout_s)
                if point is not None and got != point:  # the server dropped that point meanwhile: start again on this one
                    break
                point = got
                self._apply(tensors)
                block += 1
            else:
                assert point is not None
                return point
            target = got

    def run(self) -> dict[str, Any]:
        """Evaluate every point of the curve and the final model, save it, and send the report; returns the report."""
        start = time.perf_counter()
        last = -1
        for n in self.points:
            if n <= last:
                continue
            point = self.load(n)
            if point > n:
                self.skipped.extend(p for p in self.points if n <= p < point)
            if point >= self.rounds:
                break
            metrics = self.evaluation.evaluate(self.module.model)
            if metrics:
                self.curve.append({"round": point, **metrics})
                log.info("global model after round %d: %s", point, metrics)
            last = point
        self.load(self.rounds)
        final = self.evaluation.final(self.module, self.rounds, self.curve if self.recipe.eval.every > 0 else None)
        log.info("global model: %s", {k: v for k, v in final.items() if k != "eval_curve"})
        report = {
            "final": final,
            "eval_curve": list(self.curve),
            "skipped_points": sorted(set(self.skipped)),
            "eval_samples": len(self.evaluation.records),
            "data_skipped": len(self.evaluation.skipped),
            "wall_s": time.perf_counter() - start,
        }
        self.transport.evaluator_leave(report, self.recipe.federation.timeout_s)
        return report


def evaluate_in_thread(recipe: Recipe, service: Any) -> threading.Thread:
    """Start an :class:`Evaluator` as a thread of this process, on ``service``.

    It never fails the federation: an error is logged (and kept in the thread's ``error``).
    """
    from pl_parablock.client.inprocess import InProcessTransport

    f = recipe.federation
    transport = InProcessTransport(service, chunk_bytes=f.chunk_kb * 1024, token=client_token(recipe, 0))  # no emulated link: not a client
    evaluator = Evaluator(recipe, transport)  # builds the model here: a bad recipe stops the run before it starts

    def target() -> None:
        try:
            evaluator.run()
        except BaseException as exc:  # the federation goes on without its evaluation
            thread.error = exc  # type: ignore[attr-defined]
            log.warning("the evaluator failed: %r", exc)

    thread = threading.Thread(target=target, name="pl_parablock-evaluator", daemon=True)
    thread.error = None  # type: ignore[attr-defined]
    thread.start()
    return thread


def evaluate_remote(recipe: Recipe, server: str) -> dict[str, Any]:
    """Evaluate the federation at ``server`` (``HOST:PORT``) over gRPC, as ``--role evaluator`` does; its report."""
    from pl_parablock.client.transport import GrpcTransport
    from pl_parablock.wire.channel import TLS

    f = recipe.federation
    recipe.train.threads = client_threads(recipe)
    transport = GrpcTransport(
        server,
        chunk_bytes=f.chunk_kb * 1024,  # no emulated link: the clients' links are emulated, the evaluator's is its own
        token=client_token(recipe, 0),
        tls=TLS(ca=f.tls.ca) if f.tls.ca else None,
    )
    try:
        return Evaluator(recipe, transport).run()
    finally:
        transport.close()
