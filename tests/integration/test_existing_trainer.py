"""A user's own LightningModule federated by adding the callback to its Trainer, and nothing else."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from pl_parablock import FederatedBlockStrategy
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.service import FederationService
from tests.helpers import run_clients


class TinyTransformerLM(pl.LightningModule):
    """A user's small nn.Transformer language model with its own optimizer and LR schedule."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(64, 32)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True) for _ in range(3))
        self.out = nn.Linear(32, 64)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h = self.embed(x[:, :-1])
        mask = nn.Transformer.generate_square_subsequent_mask(h.size(1))
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        loss = nn.functional.cross_entropy(self.out(h).flatten(0, 1).float(), x[:, 1:].flatten())
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5), "interval": "step"},
        }

    def train_dataloader(self):
        data = torch.randint(0, 64, (64, 12), generator=torch.Generator().manual_seed(self.global_rank + 1))
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(data), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)
        )


def test_callback_federates_a_user_module_alongside_checkpoint_accumulation_clipping_precision_and_scheduler(tmp_path):
    agg = Aggregator(clients=2, rounds=6, mode="parablock")
    server = FederationServer(FederationService(agg))
    address = server.start()
    try:
        jobs, strategies, checkpoints = [], [], []
        for cid in range(2):
            module = TinyTransformerLM()
            strategy = FederatedBlockStrategy(server=address, client_id=cid, local_steps=2, timeout_s=60)
            ckpt = ModelCheckpoint(dirpath=tmp_path / f"c{cid}", every_n_train_steps=4, save_top_k=-1)
            trainer = pl.Trainer(
                callbacks=[strategy, ckpt],
                accelerator="cpu",
                devices=1,
                max_epochs=-1,
                accumulate_grad_batches=2,
                gradient_clip_val=1.0,
                precision="bf16-mixed",
                logger=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            jobs.append((trainer, module, None))
            strategies.append(strategy)
            checkpoints.append(tmp_path / f"c{cid}")
        run_clients([(t, m, None) for t, m, _ in jobs])
        assert agg.finished
        glob = agg.global_state()
        for (_, module, _), strategy in zip(jobs, strategies):
            assert [b.name for b in strategy.partition.blocks] == ["layers.0", "layers.1", "layers.2"]
            assert all(n.startswith("blocks.") for b in strategy.partition.blocks for n in b.params)
            local = dict(module.named_parameters())
            assert all(torch.equal(local[n].detach(), v) for n, v in glob.items())
            # a round is local_steps optimizer steps = local_steps * accumulate batches of 4
            assert all(r["samples"] == 2 * 2 * 4 for r in strategy.records)
        saved = sorted(checkpoints[0].glob("*.ckpt"))
        assert saved, "ModelCheckpoint saved"
        state = torch.load(saved[-1], weights_only=False)
        key = next(k for k in state["callbacks"] if "FederatedBlockStrategy" in k)
        assert state["callbacks"][key]["round"] >= 1 and state["callbacks"][key]["fingerprint"]["hash"]
    finally:
        server.stop()
