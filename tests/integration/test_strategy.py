"""FederatedBlockStrategy on its own: freezing, optimizer state, checkpoints, any LightningModule."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from pl_parablock import FederatedBlockStrategy, ParaBlockError
from tests.helpers import tiny_data, tiny_module, tiny_trainer


class Probe(pl.Callback):
    """Records, at each batch, which parameters train and which hold optimizer state."""

    def __init__(self) -> None:
        self.trainable: list[set[str]] = []
        self.with_state: list[set[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})
        self.with_state.append({names[id(p)] for p in trainer.optimizers[0].state})


def layer_of(names: set[str]) -> set[str]:
    return {n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n}


def test_only_the_active_block_trains_and_holds_optimizer_state():
    module = tiny_module()
    probe = Probe()
    strategy = FederatedBlockStrategy(None, local_steps=2, rounds=4)
    tiny_trainer(strategy, callbacks=[probe]).fit(module, datamodule=tiny_data(module))
    assert [layer_of(t) for t in probe.trainable] == [{"0"}, {"0"}, {"1"}, {"1"}, {"2"}, {"2"}, {"3"}, {"3"}]
    # the first step of a round starts with no state; the second holds only the active block's
    assert probe.with_state[2] == set() and layer_of(probe.with_state[3]) == {"1"}
    assert not any("embed" in n or "lm_head" in n for t in probe.trainable for n in t)


def test_keep_optimizer_state_keeps_it():
    module = tiny_module()
    probe = Probe()
    strategy = FederatedBlockStrategy(None, local_steps=2, rounds=3, keep_optimizer_state=True)
    tiny_trainer(strategy, callbacks=[probe]).fit(module, datamodule=tiny_data(module))
    assert layer_of(probe.with_state[4]) == {"0", "1"}


def test_invalid_arguments_are_reported_together():
    with pytest.raises(ParaBlockError) as err:
        FederatedBlockStrategy(None, local_steps=0, mode="turbo", rounds=None)
    msg = str(err.value)
    assert "local_steps=0" in msg and "mode='turbo'" in msg and "rounds=None" in msg


def test_only_floating_wire_dtypes_and_shard_weighting_with_a_shard_size_are_accepted():
    with pytest.raises(ParaBlockError, match="wire_dtype='int64' must be one of float32, bfloat16, float16"):
        FederatedBlockStrategy("127.0.0.1:1", wire_dtype="int64")
    with pytest.raises(ParaBlockError, match="weighting='shard' needs shard_size"):
        FederatedBlockStrategy("127.0.0.1:1", weighting="shard")
    FederatedBlockStrategy("127.0.0.1:1", wire_dtype="bfloat16", weighting="shard", shard_size=10)


def test_an_explicit_token_wins_over_the_environment(monkeypatch):
    from pl_parablock.client.session import ClientSession

    monkeypatch.setenv("PL_PARABLOCK_TOKEN", "from-env")
    explicit = ClientSession("127.0.0.1:1", 0, timeout_s=1.0, token="explicit")
    fallback = ClientSession("127.0.0.1:1", 0, timeout_s=1.0)
    try:
        assert explicit.transport is not None and explicit.transport.token == "explicit"
        assert fallback.transport is not None and fallback.transport.token == "from-env"
    finally:
        explicit.close(cancel_pending=True)
        fallback.close(cancel_pending=True)


class UserLM(pl.LightningModule):
    """Not ours, not Hugging Face: a small transformer LM a user might write."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True) for _ in range(3))
        self.out = nn.Linear(16, 50)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        h = self.embed(x[:, :-1])
        for layer in self.layers:
            h = layer(h)
        return nn.functional.cross_entropy(self.out(h).flatten(0, 1), x[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.randint(0, 50, (32, 9), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)


def test_any_lightning_module_with_a_layer_list():
    module = UserLM()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    strategy = FederatedBlockStrategy(None, local_steps=1, rounds=3)
    tiny_trainer(strategy).fit(module)
    assert [b.name for b in strategy.partition.blocks] == ["layers.0", "layers.1", "layers.2"]
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p)}
    assert changed and all(n.startswith("layers.") for n in changed), "only blocks train; embed/out stay frozen"


def test_a_module_without_layers_needs_patterns():
    class Flat(UserLM):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(*self.layers)

    with pytest.raises(ParaBlockError, match="patterns"):
        tiny_trainer(FederatedBlockStrategy(None, local_steps=1, rounds=1)).fit(Flat())
    module = Flat()
    strategy = FederatedBlockStrategy(None, local_steps=1, rounds=2, blocks=[r"layers\.0\..*", r"out\..*"])
    tiny_trainer(strategy).fit(module)
    assert strategy.schedule == [0, 1]


def test_an_optimizer_over_part_of_the_blocks_is_extended_with_a_warning():
    class Partial(UserLM):
        def configure_optimizers(self):
            return torch.optim.SGD(self.layers[0].parameters(), lr=0.1)

    module = Partial()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with pytest.warns(UserWarning, match="added .* block parameters"):
        tiny_trainer(FederatedBlockStrategy(None, local_steps=1, rounds=3)).fit(module)
    assert not torch.equal(before["layers.2.linear1.weight"], module.layers[2].linear1.weight)


def test_state_round_trips_through_a_lightning_checkpoint(tmp_path):
    module = tiny_module()
    first = FederatedBlockStrategy(None, local_steps=2, rounds=6)
    trainer = tiny_trainer(first, max_steps=6)
    with pytest.warns(UserWarning, match="stopped after 3 of 6 rounds"):
        trainer.fit(module, datamodule=tiny_data(module))
    state = first.state_dict()
    assert state["round"] == 3 and state["schedule"] == [0, 1, 2, 3, 0, 1]
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed_module = tiny_module()
    resumed = FederatedBlockStrategy(None, local_steps=2, rounds=6)
    tiny_trainer(resumed, max_steps=12).fit(resumed_module, datamodule=tiny_data(resumed_module), ckpt_path=str(ckpt))
    assert resumed.round == 6
    assert [r["round"] for r in resumed.records] == list(range(6))
    assert [r["block"] for r in resumed.records] == [0, 1, 2, 3, 0, 1]
