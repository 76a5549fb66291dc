"""A client that is itself a 2-process DDP run (gloo on CPU) is still one federation client."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.service import FederationService

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent(
    """
    import sys
    import lightning.pytorch as pl
    import torch
    from pl_parablock import FederatedBlockStrategy
    from pl_parablock.client.runner import quiet_third_party
    from tests.helpers import tiny_data, tiny_module

    quiet_third_party()
    torch.set_num_threads(1)
    server, out, mode, ddp = sys.argv[1:5]
    module = tiny_module()
    strategy = FederatedBlockStrategy(server, 0, local_steps=2, mode=mode, timeout_s=60)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ddp, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[strategy],
    )
    trainer.fit(module, datamodule=tiny_data(module, n=64))
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.save({"params": params, "leader": strategy._leader, "rounds": len(strategy.records)}, f"{out}/rank{trainer.global_rank}.pt")
    """
)


class CountingService(FederationService):
    joins = 0

    def Join(self, request, token=None, **kw):
        type(self).joins += 1
        return super().Join(request, token, **kw)


def run_client(tmp_path, address: str, mode: str, ddp: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(script), address, str(tmp_path), mode, ddp], capture_output=True, text=True, timeout=240, env=env, cwd=ROOT
    )


@pytest.mark.parametrize("mode", ["sync", "parablock"])
def test_a_ddp_client_talks_through_rank_0_and_every_rank_ends_global(tmp_path, mode):
    CountingService.joins = 0
    agg = Aggregator(clients=1, rounds=5, mode=mode)
    server = FederationServer(CountingService(agg))
    address = server.start()
    try:
        done = run_client(tmp_path, address, mode, "ddp_find_unused_parameters_true")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert agg.finished
        assert CountingService.joins == 1, "only rank 0 joins"
        ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
        assert [r["leader"] for r in ranks] == [True, False]
        assert all(r["rounds"] == 5 for r in ranks)
        glob = agg.global_state()
        for r in ranks:
            for name, value in glob.items():
                assert torch.equal(r["params"][name], value), name
        assert all(torch.equal(ranks[0]["params"][n], ranks[1]["params"][n]) for n in ranks[0]["params"])
    finally:
        server.stop()


def test_ddp_without_unused_parameters_is_refused_with_the_fix(tmp_path):
    agg = Aggregator(clients=1, rounds=2, mode="sync")
    server = FederationServer(FederationService(agg))
    address = server.start()
    try:
        done = run_client(tmp_path, address, "sync", "ddp")
        assert done.returncode != 0
        assert "ddp_find_unused_parameters_true" in done.stderr
    finally:
        server.stop()
