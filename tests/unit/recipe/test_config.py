from __future__ import annotations

import glob
import os

import pytest
import yaml
from omegaconf import OmegaConf

from pl_parablock.errors import ConfigError
from pl_parablock.recipe.load import load_recipe, to_yaml
from pl_parablock.recipe.schema import Recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def write(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_are_the_offline_quickstart():
    recipe = load_recipe(None)
    assert isinstance(recipe, Recipe)
    assert recipe.mode == "parablock"
    assert recipe.model.config is not None and recipe.model.config["model_type"] == "llama"
    assert recipe.model.path is None
    assert recipe.data.format == "synthetic"


RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True))


def user_values(recipe_path: str, files: dict[str, str]) -> dict[str, str]:
    """What a user gives on the command line for the keys a shipped recipe leaves as ???."""
    fmt = yaml.safe_load(open(recipe_path, encoding="utf-8")).get("data", {}).get("format")
    return {
        "model.path": files["model"],
        "data.path": files["gsm8k_train"] if fmt == "gsm8k" else files["alpaca"],
        "eval.path": files["gsm8k_test"] if fmt == "gsm8k" else files["alpaca"],
    }


def test_recipes_ship_for_each_workload_and_baseline():
    names = {os.path.relpath(p, os.path.join(ROOT, "recipes")) for p in RECIPES}
    for work in ("instruct", "math"):
        for row in ("parablock", "sync", "fedavg", "fedit_lora", "ffa_lora"):
            assert f"{work}/{row}.yaml" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_shipped_recipe_is_valid(path, fixture_files):
    """Each recipe is valid as shipped, or with only the values it leaves to the user (???) given."""
    text = open(path, encoding="utf-8").read()
    command = any(f"python -m pl_parablock.{entry} recipes/" in text for entry in ("fit", "simulate"))
    assert text.startswith("#") and command, "start with a comment giving the command"
    required = sorted(OmegaConf.missing_keys(OmegaConf.create(yaml.safe_load(text))))
    if required:
        with pytest.raises(ConfigError) as err:
            load_recipe(path)
        assert sorted(p.split("`")[1] for p in err.value.problems) == required, "only the ??? keys are missing"
        values = user_values(path, fixture_files)
        assert set(required) <= set(values), f"the test does not know what a user gives for {required}"
        for key in required:
            assert f"{key}=" in text, f"the recipe's command must show {key}=..."
        recipe = load_recipe(path, [f"{k}={values[k]}" for k in required])
    else:
        recipe = load_recipe(path)
    assert recipe.federation.clients >= 1
    row = os.path.basename(path)[: -len(".yaml")]
    expected = {"parablock": ("parablock", None), "sync": ("sync", None), "fedavg": ("fedavg", None)}
    expected |= {"fedit_lora": ("fedavg", "lora"), "ffa_lora": ("fedavg", "ffa_lora")}
    if row in expected:
        assert (recipe.mode, recipe.model.peft.method) == expected[row]


def test_overrides_apply_in_dotlist_form():
    recipe = load_recipe(
        None, ["mode=sync", "federation.clients=2", "train.lr=1e-4", "blocks.schedule=[1,0,2]", "model.config.hidden_size=64"]
    )
    assert recipe.mode == "sync"
    assert recipe.federation.clients == 2
    assert recipe.train.lr == pytest.approx(1e-4)
    assert recipe.blocks.schedule == [1, 0, 2]
    assert recipe.model.config["hidden_size"] == 64
    assert recipe.model.config["model_type"] == "llama"  # the rest of the config is kept


def test_a_recipe_config_replaces_the_default_config(tmp_path):
    recipe = load_recipe(write(tmp_path, "model:\n  config: {model_type: gpt2, n_layer: 2}\n"))
    assert recipe.model.config == {"model_type": "gpt2", "n_layer": 2}


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "train:\n  local_stepz: 3\n"))
    assert "train.local_stepz" in str(err.value)
    assert "local_steps" in str(err.value)


def test_all_problems_are_reported_at_once(tmp_path):
    text = "mode: turbo\ntrain:\n  local_steps: 0\n  batch_size: abc\nfederation:\n  clients: 0\n"
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, text))
    # the type error stops before semantic checks; fix it and the rest show together
    assert "train.batch_size" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, text.replace("abc", "8")))
    msg = str(err.value)
    for key in ("`mode`", "train.local_steps", "federation.clients"):
        assert key in msg
    assert len(err.value.problems) >= 3


def test_model_config_and_path_are_exclusive(tmp_path):
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="exclusive"):
        load_recipe(None, [f"model.path={model_dir}"])
    recipe = load_recipe(None, ["model.config=null", f"model.path={model_dir}"])
    assert recipe.model.path == str(model_dir) and recipe.model.config is None


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(None, ["data.format=alpaca", f"data.path={tmp_path / 'nope.json'}"])


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_recipe(write(tmp_path, "mode: sync\ntrain: [unclosed\n"))
    with pytest.raises(ConfigError, match="key=value"):
        load_recipe(None, ["mode"])


def test_explicit_schedule_must_hold_indices():
    with pytest.raises(ConfigError, match="blocks.schedule"):
        load_recipe(None, ["blocks.schedule=[0,-1]"])
    with pytest.raises(ConfigError, match="blocks.schedule"):
        load_recipe(None, ["blocks.schedule=zigzag"])


def test_yaml_round_trip_keeps_every_key():
    recipe = load_recipe(None, ["mode=fedavg", "link.uplink_mbps=8"])
    again = load_recipe(None, [])
    assert to_yaml(recipe) != to_yaml(again)
    data = yaml.safe_load(to_yaml(recipe))
    assert data["mode"] == "fedavg" and data["link"]["uplink_mbps"] == 8


def test_a_missing_mandatory_value_is_named(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, "model:\n  config: null\n  path: ???\n"))
    assert "`model.path` must be given" in str(err.value) and "model.path=" in str(err.value)


def test_peft_keys_are_validated(tmp_path):
    recipe = load_recipe(None, ["model.peft.method=lora", "blocks.embeddings=false", "model.peft.target_modules=[q_proj,v_proj]"])
    assert recipe.model.peft.method == "lora" and recipe.model.peft.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["model.peft.method=dora", "model.peft.r=0", "model.peft.dropout=1.5", "blocks.head=true"])
    msg = str(err.value)
    for key in ("model.peft.method", "model.peft.r", "model.peft.dropout"):
        assert key in msg
    with pytest.raises(ConfigError, match=r"blocks.head.*\(the head stays frozen\)"):
        load_recipe(None, ["model.peft.method=lora", "blocks.head=true"])
    with pytest.raises(ConfigError, match="model.peft.merge"):
        load_recipe(None, ["model.peft.merge=true"])
    with pytest.raises(ConfigError, match="target_modules"):
        load_recipe(None, ["model.peft.method=lora", "model.peft.target_modules=[]"])


def test_data_keys_are_validated(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("{}\n")
    b.write_text("{}\n")
    ok = load_recipe(None, ["data.format=alpaca", "data.partition.kind=natural", f"data.client_paths=[{a},{b}]", "federation.clients=2"])
    assert ok.data.client_paths == [str(a), str(b)]
    problems = {
        "data.client_paths": ["data.format=alpaca", "data.partition.kind=natural", f"data.client_paths=[{a}]", "federation.clients=2"],
        "data.on_error": ["data.on_error=ignore"],
        "data.columns.questoin": ["data.format=gsm8k", f"data.path={a}", "data.columns={questoin: q}"],
        "data.row_format": ["data.format=alpaca", f"data.path={a}", "data.row_format=chat"],
        "data.path": ["data.format=chat"],
        "eval.split": ["eval.split=test"],
    }
    for key, overrides in problems.items():
        with pytest.raises(ConfigError) as err:
            load_recipe(None, overrides)
        assert key in str(err.value), (key, str(err.value))
    with pytest.raises(ConfigError, match="natural"):
        load_recipe(None, ["data.partition.kind=natural"])  # synthetic data has no files
    with pytest.raises(ConfigError, match="is a directory"):
        load_recipe(None, ["data.format=alpaca", f"data.path={tmp_path}"])
    assert load_recipe(None, ["data.format=hf", f"data.path={tmp_path}"]).data.path == str(tmp_path)
    assert load_recipe(None, ["train.packing=true"]).train.packing is True


def test_the_servers_receive_window_is_bounded_or_adaptive(tmp_path):
    for value, ok in (("16", False), ("4096", True), ("null", True), ("2000000", False)):
        text = f"federation:\n  receive_window_kb: {value}\n"
        if ok:
            assert load_recipe(write(tmp_path, text)).federation.receive_window_kb == (None if value == "null" else int(value))
        else:
            with pytest.raises(ConfigError, match="federation.receive_window_kb"):
                load_recipe(write(tmp_path, text))


def test_window_and_admission_out_of_range_exit_2_with_one_message_naming_the_key(capsys):
    from pl_parablock.fit import main

    assert load_recipe(None).federation.receive_window_kb is None  # gRPC's adaptive window by default
    assert load_recipe(None, ["federation.max_uploads=3"]).federation.max_uploads == 3
    for override, key in (
        ("federation.max_uploads=0", "federation.max_uploads"),
        ("federation.max_uploads=100000", "federation.max_uploads"),
        ("federation.receive_window_kb=8", "federation.receive_window_kb"),
    ):
        assert main([override, "--inprocess"]) == 2, override
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0] and "Traceback" not in err[0], err


def test_scientific_notation_reads_as_a_number_in_free_form_sections(tmp_path):
    text = "model:\n  config:\n    model_type: llama\n    rms_norm_eps: 1e-05\ntrain:\n  lr: 3e-4\n"
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.model.config["rms_norm_eps"] == 1e-05 and isinstance(recipe.model.config["rms_norm_eps"], float)
    assert recipe.train.lr == 3e-4


def test_server_optimizer_keys_are_validated():
    recipe = load_recipe(None, ["federation.server_optimizer.name=yogi", "federation.server_optimizer.tau=0.01"])
    assert recipe.federation.server_optimizer.name == "yogi"
    with pytest.raises(ConfigError) as err:
        load_recipe(None, ["federation.server_optimizer.name=lamb", "federation.server_optimizer.betas=[0.9]"])
    assert "federation.server_optimizer.name" in str(err.value) and "federation.server_optimizer.betas" in str(err.value)
    with pytest.raises(ConfigError, match="cannot follow"):
        load_recipe(None, ["federation.server_optimizer.name=adam", "federation.aggregation=median"])


def test_the_servers_defences_are_validated_with_the_key_named():
    for override, key in (
        ("federation.max_weight=0.5", "federation.max_weight"),
        ("federation.max_weight=1e300", "federation.max_weight"),
        ("federation.idle_timeout_s=0", "federation.idle_timeout_s"),
        ("federation.idle_timeout_s=nan", "federation.idle_timeout_s"),
        ("federation.max_calls=1", "federation.max_calls"),
        ("federation.max_calls_per_peer=0", "federation.max_calls_per_peer"),
        ("federation.token={0: same, 1: same}", "federation.token"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_recipe(None, [override])
        assert len(err.value.problems) == 1, err.value.problems


def test_the_weight_bound_follows_the_weighting():
    from pl_parablock.recipe.build import weight_bound

    base = ["train.local_steps=3", "train.batch_size=4", "train.accumulate_grad_batches=2", "train.max_length=16"]
    assert weight_bound(load_recipe(None, base)) == 24
    assert weight_bound(load_recipe(None, [*base, "federation.weighting=tokens"])) == 24 * 16
    assert weight_bound(load_recipe(None, [*base, "federation.weighting=uniform"])) == 1
    assert weight_bound(load_recipe(None, [*base, "federation.weighting=shard", "data.num_samples=500"])) == 500
    assert weight_bound(load_recipe(None, [*base, "federation.max_weight=100"])) == 100


def test_assignment_and_cyclic_keys_are_validated():
    assert load_recipe(None, ["blocks.assignment=staggered", "mode=sync"]).blocks.assignment == "staggered"
    for overrides, key in (
        (["blocks.assignment=diagonal"], "blocks.assignment"),
        (["blocks.assignment=staggered", "mode=fedavg"], "blocks.assignment"),
        (["blocks.assignment=staggered", "federation.aggregation=median"], "blocks.assignment"),
        (["mode=cyclic", "federation.clients_per_round=2"], "federation.clients_per_round"),
        (["mode=cyclic", "blocks.schedule=[0,1]"], "blocks.schedule"),
        (["mode=cyclic", "federation.server_optimizer.name=adam"], "federation.server_optimizer"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_recipe(None, overrides)


def test_compression_keys_are_validated_with_the_key_named():
    from pl_parablock.recipe.build import compression_of

    recipe = load_recipe(None, ["federation.compression.codec=topk", "federation.compression.fraction=0.02"])
    c = compression_of(recipe)
    assert c.upload.name == c.download.name == "topk" and c.error_feedback
    assert compression_of(
        load_recipe(None, ["federation.compression.codec=int8", "federation.compression.download=none"])
    ).download.lossless
    shorthand = compression_of(load_recipe(None, ["federation.wire_dtype=bfloat16"]))
    assert (shorthand.upload.name, shorthand.download.name, shorthand.error_feedback) == ("bf16", "none", False)
    for override, key in (
        ("federation.compression.codec=zstd", "federation.compression.codec"),
        ("federation.compression.download=gzip", "federation.compression.download"),
        ("federation.compression.fraction=0", "federation.compression.fraction"),
        ("federation.compression.fraction=1.5", "federation.compression.fraction"),
        ("federation.compression.group=0", "federation.compression.group"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
            load_recipe(None, [override])
        assert len(err.value.problems) == 1, err.value.problems
    with pytest.raises(ConfigError, match="keep `compression` alone"):
        load_recipe(None, ["federation.wire_dtype=bfloat16", "federation.compression.codec=int8"])


def test_a_codec_declares_its_options_and_the_recipe_holds_them():
    import dataclasses

    from pl_parablock.core.codecs import CODEC_OPTIONS, CODECS, CodecError, codec_of
    from pl_parablock.recipe.schema import CompressionSection

    fields = {f.name for f in dataclasses.fields(CompressionSection)}
    given = {"group": 64, "fraction": 0.5}
    for name, cls in CODECS.items():
        assert set(cls.OPTIONS) <= set(CODEC_OPTIONS) <= fields
        codec = codec_of(name, {**given, "codec": name, "error_feedback": False})  # keys it does not take are ignored
        assert all(getattr(codec, option) == given[option] for option in cls.OPTIONS)
        assert type(codec_of(name, CompressionSection())) is cls
    with pytest.raises(CodecError, match="group must be a positive integer"):
        codec_of("int8", CompressionSection(group=0))


def test_a_rule_between_sections_is_its_owners_word():
    from pl_parablock.core.plan import mode_of
    from pl_parablock.recipe.validate import validate

    recipe = load_recipe(None, ["mode=cyclic"])
    recipe.blocks.schedule = [0, 1]
    recipe.federation.server_lr = 2.0
    refused = mode_of("cyclic").refusals(schedule=[0, 1], server_lr=2.0)
    assert len(refused) == 2 and all(line in validate(recipe) for line in refused)
    with pytest.raises(ConfigError, match=r"federation\.server_optimizer"):
        load_recipe(None, ["mode=cyclic", "federation.server_lr=2", "federation.server_optimizer.lr=1"])
