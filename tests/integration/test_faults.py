"""Faults inside one process: injected transport faults, client sampling, rogue clients, TLS."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import torch

from pl_parablock import FederatedBlockStrategy
from pl_parablock.client.strategy import model_fingerprint
from pl_parablock.client.transport import GrpcTransport
from pl_parablock.errors import FederationError
from pl_parablock.server.aggregator import Aggregator
from pl_parablock.server.grpc_server import FederationServer
from pl_parablock.server.service import FederationService
from pl_parablock.wire.channel import TLS
from pl_parablock.wire.framing import header_bytes
from tests.helpers import federated_client, params, run_clients, service, tiny_data, tiny_module, tiny_trainer

ROUNDS = 4


def two_clients(svc, mode="sync", **kw):
    jobs = []
    for cid in range(2):
        trainer, module, _data, strategy = federated_client(svc, cid, mode, local_steps=2, **kw)
        jobs.append((trainer, module, tiny_data(module, seed=cid), strategy))
    return jobs


@pytest.fixture(scope="module")
def clean_global() -> dict[str, torch.Tensor]:
    svc = service(2, ROUNDS, "sync")
    run_clients([job[:3] for job in two_clients(svc)])
    return dict(svc.aggregator.global_state())


def test_dropped_and_corrupted_transfers_are_retried_without_double_application(clean_global, monkeypatch):
    monkeypatch.setenv("PL_PARABLOCK_TEST_FAULTS", "drop_after_push=2,corrupt_push=4,drop_pull=2")
    monkeypatch.setattr("pl_parablock.client.transmitter.BACKOFF_S", (0.05, 0.2))
    svc = service(2, ROUNDS, "sync")
    jobs = two_clients(svc)
    run_clients([job[:3] for job in jobs])
    for name, value in svc.aggregator.global_state().items():
        assert torch.equal(value, clean_global[name]), name
    retried = [r for _, _, _, s in jobs for r in s.records if r.get("retries")]
    assert len(retried) >= 3
    report = svc.aggregator.report()
    assert all(r["arrived"] == 2 for r in report["rounds"])


@pytest.mark.parametrize("mode", ["sync", "parablock"])
def test_clients_per_round_trains_a_sample_and_everyone_ends_global(mode):
    svc = service(3, 6, mode, clients_per_round=2, seed=1)
    jobs = []
    for cid in range(3):
        trainer, module, _data, strategy = federated_client(svc, cid, mode, local_steps=2)
        jobs.append((trainer, module, tiny_data(module, seed=cid), strategy))
    run_clients([job[:3] for job in jobs])
    glob = svc.aggregator.global_state()
    for _, module, _, strategy in jobs:
        local = params(module)
        assert all(torch.equal(local[n], v) for n, v in glob.items())
        skipped = [r["round"] for r in strategy.records if r.get("participated") is False]
        assert skipped == [r for r in range(6) if strategy.client_id not in svc.aggregator.participants[r]]
    assert all(r["arrived"] == 2 for r in svc.aggregator.report()["rounds"])


def test_a_rogue_client_is_refused_and_the_federation_is_unharmed(clean_global):
    agg = Aggregator(clients=3, rounds=ROUNDS, mode="sync", min_clients=2, round_timeout_s=0.5)
    server = FederationServer(FederationService(agg, token="t0ken"))
    address = server.start()
    try:
        with pytest.raises(FederationError, match="missing or wrong token"):
            GrpcTransport(address, token="wrong", connect_timeout_s=5).join(2, {"partition": [], "tensors": {}, "hash": ""}, 5)

        rogue_module = tiny_module()
        strategy = FederatedBlockStrategy(None, local_steps=1, rounds=1)
        strategy.setup(tiny_trainer(strategy), rogue_module, "fit")
        rogue = GrpcTransport(address, token="t0ken", connect_timeout_s=5)
        reply = rogue.join(2, model_fingerprint(rogue_module, strategy.partition, "sync"), 5)
        assert reply["need_state"]
        state = {n: p.detach().clone() for n, p in rogue_module.named_parameters() if n in set(strategy.partition.param_names)}
        rogue.upload_state(2, state, 5)
        block0 = {n: state[n] for n in strategy.partition.blocks[0].params}
        base = {"client_id": 2, "round": 0, "block": 0, "kind": "value", "base_version": -1, "weight": 8.0}

        def refused(header, tensors):
            pushed = rogue.push(header, tensors, 5)
            assert not pushed.accepted, pushed
            return pushed.reason

        first = next(iter(block0))
        assert "shape" in refused(base, {**block0, first: torch.zeros(3, 3)})
        assert "NaN" in refused(base, {**block0, first: torch.full_like(block0[first], float("nan"))})
        assert "trains block 0" in refused({**base, "block": 1}, block0)
        assert "outside" in refused({**base, "round": 99}, block0)
        huge = header_bytes(
            {**base, "tensors": [{"name": first, "dtype": "float32", "shape": [1 << 28], "nbytes": 1 << 30}], "nbytes": 1 << 30}
        )
        reply = rogue._stream_unary("Push", iter([huge, b"x" * 1024]), 5)
        assert b"more than" in reply and b'"accepted":false' in reply
        rogue.close()

        jobs = []
        for cid in range(2):
            module = tiny_module()
            s = FederatedBlockStrategy(address, cid, local_steps=2, mode="sync", token="t0ken", timeout_s=30)
            jobs.append((tiny_trainer(s), module, tiny_data(module, seed=cid)))
        run_clients(jobs)
        for name, value in agg.global_state().items():
            assert torch.equal(value, clean_global[name]), name
        report = agg.report()
        rejections = [r["reason"] for rnd in report["rounds"] for r in rnd["rejections"]] + [
            r["reason"] for r in report["rejected_outside_rounds"]
        ]
        assert len(rejections) == 5, rejections
        assert all(r["arrived"] == 2 and r["expected"] == 3 for r in report["rounds"])
        assert report["dropped"] == [2]
    finally:
        server.stop()


@pytest.fixture
def self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_round_trip_with_a_self_signed_certificate(self_signed):
    cert, key = self_signed
    agg = Aggregator(clients=1, rounds=2, mode="sync")
    server = FederationServer(FederationService(agg), tls=TLS(cert=cert, key=key))
    port = server.start().rsplit(":", 1)[1]
    try:
        module = tiny_module()
        strategy = FederatedBlockStrategy(f"localhost:{port}", 0, local_steps=2, mode="sync", tls=TLS(ca=cert), timeout_s=30)
        tiny_trainer(strategy).fit(module, datamodule=tiny_data(module))
        assert agg.finished
        local = params(module)
        assert all(torch.equal(local[n], v) for n, v in agg.global_state().items())
        assert server.data_plane is not None and server.data_plane.calls.get("Push") == 2, "blocks went over the data plane, in TLS"
        plaintext = GrpcTransport(f"localhost:{port}", connect_timeout_s=2)
        with pytest.raises(FederationError, match="cannot reach"):
            plaintext.versions(0, 2)
        plaintext.close()
    finally:
        server.stop()


def test_a_token_protected_federation_runs_through_the_launcher(tmp_path, monkeypatch):
    from pl_parablock.fit import main

    monkeypatch.setenv("PL_PARABLOCK_TOKEN", "from-the-environment")
    args = ["federation.clients=2", "federation.rounds=2", "federation.token=ignored-when-the-variable-is-set", "data.num_samples=64"]
    args += ["eval.max_samples=4", "train.batch_size=4", "train.max_length=64", f"output_dir={tmp_path}"]
    assert (
        main([*args, "model.config.num_hidden_layers=2", "model.config.hidden_size=32", "model.config.intermediate_size=64", "--inprocess"])
        == 0
    )
