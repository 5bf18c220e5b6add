"""--threads' default fits the model it runs (minilora/cli/options.py): 1 thread below
ALL_CORES_FROM parameters, every usable core from there; a --threads given is used as given.
The rule is tested, not its timings (those are in docs/performance.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_files import VOCAB_SIZE, write_small_tokenizer

from minilora import fast
from minilora.cli import build_parser, main, options
from minilora.experiments import demo
from minilora.lora import count_parameters

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
BIG = options.ALL_CORES_FROM
GPT2_SMALL = 124_439_808  # parameters, the tied head counted once


@pytest.mark.parametrize(
    "n_parameters, cores, threads",
    [
        (count_parameters(demo.load_base())[1], 2, 1),  # the shipped base: one thread
        (BIG - 1, 16, 1),
        (BIG, 16, 16),
        (GPT2_SMALL, 2, 2),
        (GPT2_SMALL, 1, 1),
    ],
)
def test_the_default_is_one_thread_for_small_models_and_every_core_for_large(
    n_parameters, cores, threads
):
    assert options.default_threads(n_parameters, cores) == threads


def test_the_help_states_the_rule(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"1 below {BIG // 10**6}M parameters" in text and "every core" in text


@pytest.fixture
def threads_set(monkeypatch) -> list[int]:
    """The BLAS thread counts the command sets, in order, on a machine of 3 usable cores."""
    calls = []
    monkeypatch.setattr(fast.process, "set_num_threads", calls.append)
    monkeypatch.setattr(options, "usable_cores", lambda: 3)
    return calls


def eval_base(*extra) -> None:
    assert main(["eval", "--examples", "8", *extra]) == 0


def test_the_shipped_base_runs_on_one_thread(threads_set, capsys):
    eval_base()
    assert threads_set[-1] == 1


def test_a_model_over_the_threshold_runs_on_every_core(threads_set, monkeypatch, capsys):
    base = count_parameters(demo.load_base())[1]
    monkeypatch.setattr(options, "ALL_CORES_FROM", base)  # the base counts as large
    eval_base()
    assert threads_set[-1] == 3
    threads_set.clear()
    monkeypatch.setattr(options, "ALL_CORES_FROM", base + 1)  # one parameter short of large
    eval_base()
    assert threads_set[-1] == 1


def test_a_given_thread_count_is_never_replaced(threads_set, monkeypatch, capsys):
    monkeypatch.setattr(options, "ALL_CORES_FROM", 1)
    eval_base("--threads", "2")
    assert threads_set == [2]


def test_text_mode_and_finetune_fit_the_threads_to_their_model(
    threads_set, monkeypatch, tmp_path, capsys
):
    """generate --base (a GPT-2 folder) and finetune --base (a model file)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import load_memory

    gpt2 = tmp_path / "gpt2"
    load_memory.write_gpt2_folder(
        gpt2, dict(vocab_size=VOCAB_SIZE, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    )
    write_small_tokenizer(gpt2 / "tokenizer.json")
    monkeypatch.setattr(options, "ALL_CORES_FROM", 1)
    argv = ["generate", "--base", str(gpt2), "--prompt", "the", "--max-new-tokens", "1"]
    assert main(argv) == 0
    assert threads_set[-1] == 3
    threads_set.clear()
    argv = ["finetune", "--base", str(demo.base_model_path()), "--steps", "1", "--batch-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "adapter"), "--no-progress"]) == 0
    assert threads_set[-1] == 3
