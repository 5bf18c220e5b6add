"""``minilora count``: the table, the JSON object, presets, shape flags and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minilora import GPT, GPTConfig
from minilora.cli import main
from minilora.study import accounting as acc

REQUIRED_KEYS = {
    "total_params",
    "trainable_params",
    "trainable_fraction",
    "adapter_bytes",
    "full_ft_train_bytes",
    "lora_train_bytes",
    "flops_per_token_full_ft",
    "flops_per_token_lora",
}

GPT3 = ["count", "--preset", "gpt3-175b", "--targets", "q_proj,v_proj", "--r", "4"]


def run_json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object on one line
    return json.loads(out)


def run_error(capsys, argv) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_gpt3_json_has_the_documented_keys_and_numbers(capsys):
    rep = run_json(capsys, GPT3 + ["--dtype", "float16"])
    assert REQUIRED_KEYS <= set(rep)
    assert rep["total_params"] == 174_604_259_328
    assert rep["trainable_params"] == 18_874_368
    assert rep["adapter_bytes"] == 2 * 18_874_368
    assert rep["trainable_fraction"] == 18_874_368 / (174_604_259_328 + 18_874_368)
    assert rep["preset"] == "gpt3-175b" and rep["published_params"] == 175_000_000_000
    shape = acc.get_preset("gpt3-175b").shape
    spec = acc.LoRASpec(["q_proj", "v_proj"], 4)
    assert rep["full_ft_train_bytes"] == acc.train_memory(shape, None, "float16")["total"]
    assert rep["lora_train_bytes"] == acc.train_memory(shape, spec, "float16")["total"]
    assert rep["flops_per_token_full_ft"] == acc.flops_per_token(shape)["total"]
    assert rep["flops_per_token_lora"] == acc.flops_per_token(shape, spec)["total"]
    assert rep["lora_train_bytes"] < rep["full_ft_train_bytes"] / 3


def test_table_is_readable(capsys):
    assert main(GPT3 + ["--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    for text in (
        "GPT-3 175B",
        "174,604,259,328",
        "18,874,368",
        "37,748,736",
        "Training memory",
        "full fine-tuning",
        "optimizer state (adamw)",
        "FLOPs per token",
        "published 175B (-0.23%)",
    ):
        assert text in out, text


@pytest.mark.parametrize("name", list(acc.PRESETS) + list(acc.PRESET_ALIASES))
def test_preset_totals_within_one_percent_of_published(capsys, name):
    rep = run_json(capsys, ["count", "--preset", name])
    published = acc.get_preset(name).published_params
    assert abs(rep["total_params"] - published) <= 0.01 * published
    assert rep["shape"]["tied"] is True


def test_shape_flags_instead_of_a_preset_count_the_live_model(capsys):
    flags = [
        "--n-layer",
        "2",
        "--n-embd",
        "12",
        "--n-head",
        "3",
        "--vocab-size",
        "17",
        "--block-size",
        "9",
    ]
    rep = run_json(capsys, ["count", *flags, "--targets", "q_proj,fc2", "--r", "q_proj=2,fc2=3"])
    model = GPT(GPTConfig(vocab_size=17, block_size=9, n_layer=2, n_head=3, n_embd=12))
    assert rep["total_params"] == sum(p.size for p in model.parameters())  # untied by default
    assert rep["lora"]["ranks"] == {"q_proj": 2, "fc2": 3}
    assert rep["trainable_params"] == 2 * (2 * (12 + 12) + 3 * (48 + 12))
    assert "preset" not in rep
    tied = run_json(capsys, ["count", *flags, "--tied", "--no-model-bias"])
    assert tied["total_params"] == acc.total_params(acc.ModelShape(2, 12, 3, 17, 9, False, True))


def test_preset_fields_can_be_overridden(capsys):
    rep = run_json(capsys, ["count", "--preset", "gpt2", "--block-size", "512"])
    assert rep["shape"]["block_size"] == 512 and rep["seq_len"] == 512
    assert "preset" not in rep  # no longer the published model


def test_training_setup_flags(capsys):
    base = ["count", "--preset", "gpt2"]
    a = run_json(capsys, base + ["--optimizer", "sgd", "--batch-size", "4", "--seq-len", "128"])
    assert a["memory_full_ft"]["optimizer_state"] == 0
    assert (a["batch_size"], a["seq_len"]) == (4, 128)
    b = run_json(capsys, base + ["--optimizer", "sgd-momentum", "--bias", "all"])
    assert b["memory_lora"]["optimizer_state"] == 4 * b["trainable_params"]
    biases = acc.bias_params(acc.PRESETS["gpt2-small"].shape)
    assert b["trainable_params"] == b["lora_params"] + biases


def test_unknown_preset_lists_the_known_ones(capsys):
    err = run_error(capsys, ["count", "--preset", "gpt5"])
    assert "unknown preset 'gpt5'" in err
    assert all(name in err for name in acc.PRESETS)


def test_unknown_target_lists_valid_names(capsys):
    err = run_error(capsys, ["count", "--preset", "gpt2", "--targets", "q_proj,c_attn"])
    assert "'c_attn'" in err and all(name in err for name in acc.TARGET_MODULES)


@pytest.mark.parametrize(
    "r, expected",
    [
        ("0", "r=0 for q_proj (weight shape (768, 768) = (out, in)) is not a positive integer"),
        ("-2", "r=-2 for q_proj (weight shape (768, 768)"),
        ("four", "r='four' for q_proj (weight shape (768, 768)"),
        ("1.5", "r='1.5' for q_proj"),
        ("769", "r=769 for q_proj (weight shape (768, 768) = (out, in)) is larger than min"),
        ("q_proj=4,v_proj=x", "r='x' for v_proj (weight shape (768, 768)"),
    ],
)
def test_bad_rank_is_refused_naming_module_and_shape(capsys, r, expected):
    err = run_error(capsys, ["count", "--preset", "gpt2", "--r", r])
    assert expected in err


def test_rank_above_the_lm_head_bound(capsys):
    flags = [
        "--n-layer",
        "1",
        "--n-embd",
        "64",
        "--n-head",
        "1",
        "--vocab-size",
        "10",
        "--block-size",
        "4",
    ]
    err = run_error(capsys, ["count", *flags, "--targets", "lm_head", "--r", "11"])
    assert "r=11 for lm_head (weight shape (10, 64) = (out, in))" in err


def test_missing_shape_flags_are_named(capsys):
    err = run_error(capsys, ["count", "--n-layer", "2", "--n-embd", "8"])
    assert "--n-head" in err and "--vocab-size" in err and "--block-size" in err


def test_sequence_longer_than_the_block_is_refused(capsys):
    err = run_error(capsys, ["count", "--preset", "gpt2", "--seq-len", "2048"])
    assert "seq_len=2048 is larger than block_size=1024" in err


# Beyond any real model (count.MAX_FLAG, count.MAX_PARAMS): refused, naming the flag, the
# value and the bound; the counts printed for such a shape described nothing ("whole step:
# 0.0%").
SIZE_FLAGS = ["--n-layer", "--n-embd", "--n-head", "--vocab-size", "--block-size"]


@pytest.mark.parametrize("flag", [*SIZE_FLAGS, "--batch-size", "--seq-len"])
def test_an_integer_flag_beyond_any_real_model_is_refused_naming_it(capsys, flag):
    with pytest.raises(SystemExit) as info:  # argparse: refused as the command line is read
        main(["count", "--preset", "gpt2", flag, str(10**30)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: 1e+30 is more than 1,000,000,000, beyond any real model" in err
    with pytest.raises(SystemExit):
        main(["count", "--preset", "gpt2", flag, str(10**9 + 1)])
    assert f"argument {flag}: 1000000001 is more than 1,000,000,000" in capsys.readouterr().err


def test_the_flag_bound_itself_is_accepted(capsys):
    rep = run_json(capsys, ["count", "--preset", "gpt2", "--batch-size", str(10**9)])
    assert rep["batch_size"] == 10**9


def test_a_shape_beyond_any_real_model_is_refused_naming_its_flags(capsys):
    flags = ["--n-layer", "100000000", "--n-embd", "100000", "--n-head", "1"]
    err = run_error(capsys, ["count", "--preset", "gpt2", *flags])
    assert (
        "--n-layer 100000000 --n-embd 100000 --n-head 1 gives a model of 1.2e+19 parameters, "
        "more than 1e+15, beyond any real model"
    ) in err


@pytest.mark.parametrize(
    "flag, value, key",
    [
        ("--r", "q_proj=4,q_proj=8", "q_proj"),  # the last value used to win silently
        ("--r", "q_proj=4, v_proj=2,v_proj =2", "v_proj"),
        ("--targets", "q_proj,v_proj,q_proj", "q_proj"),
    ],
)
def test_a_key_given_twice_in_a_flag_is_refused_naming_it(capsys, flag, value, key):
    err = run_error(capsys, ["count", "--preset", "gpt2", flag, value])
    assert f"{flag}: {key} is given twice; give each once" in err


def test_python_m_and_console_script_both_work():
    args = ["count", "--preset", "gpt2", "--r", "4", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "minilora", *args], capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out)["trainable_params"] == 12 * 2 * 4 * (768 + 768)
    script = os.path.join(os.path.dirname(sys.executable), "minilora")
    if not os.path.exists(script):
        pytest.skip(f"console script not installed next to {sys.executable}")
    out2 = subprocess.run([script, *args], capture_output=True, text=True, check=True).stdout
    assert out2 == out
