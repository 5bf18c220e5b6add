"""`minilora compare`: every method's row, measured on held-out data, with honest counts."""

import json

import pytest

from minilora import backend
from minilora.cli import main
from minilora.cli.options import PACKAGE_DIR
from minilora.data import PRETRAIN_TASKS, DigitTasks
from minilora.experiments import compare
from minilora.experiments.demo import load_base
from minilora.relatives.adapters import AdapterConfig, adapter_parameter_count
from minilora.relatives.prefix import PrefixConfig, apply_prefix_tuning, prefix_parameter_count
from minilora.train import evaluate

# a run small enough for the suite: a few steps, a few examples, one point per sweep
TINY_RUN = compare.CompareSettings(
    steps=3,
    batch_size=8,
    eval_examples=24,
    latency_repeats=1,
    sweep_ranks=(2,),
    sweep_bottlenecks=(2,),
    sweep_prefix=(1,),
    sweep_svd_ranks=(16,),
    sweep_sparsities=(0.5,),
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    lines = []
    res = compare.run_compare(TINY_RUN, out, progress=False, echo=lines.append)
    return res, out, "\n".join(lines)


def test_every_method_has_a_row_with_every_field(results):
    res, out, printed = results
    assert [r["method"] for r in res["rows"]] == list(compare.METHODS)
    fields = {
        "trainable_params",
        "step_ms",
        "storage_bytes",
        "base_bytes",
        "accuracy",
        "pretrain_accuracy",
        "latency_b1",
        "latency_b64",
        "context_length",
    }
    for row in res["rows"]:
        assert fields <= set(row), row["method"]
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["pretrain_accuracy"] <= 1.0
        for batch in ("latency_b1", "latency_b64"):  # a paired ratio to the base, with spread
            latency = row[batch]
            assert latency["q1"] <= latency["median"] <= latency["q3"], row["method"]
            assert latency["median"] > 0 and latency["rounds"] == TINY_RUN.latency_repeats
            assert isinstance(latency["within_noise"], bool)
        assert row["method"] in printed  # the table shows every row
    assert json.loads((out / "compare.json").read_text())["rows"] == res["rows"]
    assert "paired ratios (one per alternating round)" in printed and "IQR" in printed


def test_counts_and_bytes_follow_the_closed_forms(results):
    rows = {r["method"]: r for r in results[0]["rows"]}
    cfg = load_base().config
    L, C, s = cfg.n_layer, cfg.n_embd, TINY_RUN
    base_bytes = rows["full"]["storage_bytes"]
    assert base_bytes == 4 * sum(p.size for p in load_base().parameters())  # float32
    assert rows["lora"]["trainable_params"] == L * 2 * s.r * (C + C)  # q and v: r(in + out)
    houlsby = AdapterConfig("houlsby", s.bottleneck)
    assert rows["adapter_houlsby"]["trainable_params"] == adapter_parameter_count(cfg, houlsby)
    P = s.num_virtual_tokens
    assert rows["prefix_layer"]["trainable_params"] == prefix_parameter_count(
        PrefixConfig("layer", P), L, C
    )
    assert rows["dora"]["trainable_params"] == rows["lora"]["trainable_params"] + L * 2 * C
    assert rows["vera"]["trainable_params"] == L * 2 * (s.vera_r + C)  # λ_d (r,), λ_b (out,)
    assert rows["pissa"]["storage_bytes"] == 2 * 4 * rows["pissa"]["trainable_params"]  # 2r
    per_task = ("lora", "dora", "vera", "adapter_houlsby", "adapter_lin", "prefix_layer", "qlora")
    for method in per_task:
        row = rows[method]  # a per-task method keeps its float32 trained arrays
        assert row["storage_bytes"] == 4 * row["trainable_params"], method
    assert rows["lora"]["base_bytes"] == base_bytes
    assert rows["qlora"]["base_bytes"] < base_bytes / 4  # NF4: about 4 bits a weight
    for method in ("int8", "int4", "nf4"):
        assert rows[method]["storage_bytes"] < base_bytes and rows[method]["base_bytes"] == 0


def test_merging_changes_nothing_but_the_prefix_takes_context(results):
    rows = {r["method"]: r for r in results[0]["rows"]}
    assert rows["lora_merged"]["accuracy"] == rows["lora"]["accuracy"]
    assert rows["lora_merged"]["pretrain_accuracy"] == rows["lora"]["pretrain_accuracy"]
    block = load_base().config.block_size
    for method in compare.METHODS:
        prefix = method.startswith("prefix")
        want = block - TINY_RUN.num_virtual_tokens if prefix else block
        assert rows[method]["context_length"] == want, method


def test_sweep_has_every_point(results):
    sweep = results[0]["sweep"]
    kinds = [(p["method"], p["size"]) for p in sweep["adaptation"]]
    assert kinds == [("lora", 2), ("adapter_houlsby", 2), ("prefix_layer", 1)]
    methods = [p["method"] for p in sweep["compression"]]
    assert methods == ["svd", "prune", "int8", "int4", "nf4"]


class ShortContext:
    """The base model, accepting only ``context_length`` positions (as a prefix would make
    it, without a prefix's shifted positions, so that what fits is still answered)."""

    def __init__(self, model, context_length: int):
        self.model, self.context_length = model, context_length

    def eval(self):
        return self.model.eval()

    def __call__(self, x, y):
        assert x.shape[1] <= self.context_length, "accuracy() passed a too-long input"
        return self.model(x, y)


def test_inputs_longer_than_the_context_count_as_wrong():
    base = load_base()
    prefixed = load_base()
    apply_prefix_tuning(prefixed, PrefixConfig("layer", 4))  # context 18 - 4 = 14: 6 digits
    assert compare.longest_input(prefixed) == 6 and compare.longest_input(base) == 8
    x, y = DigitTasks(PRETRAIN_TASKS).eval_set(7, 64)  # tasks the base model can do
    lengths = (x[:, 1:] == 10).argmax(axis=1)  # '=' (id 10) follows the digits
    fits = backend.to_numpy(lengths <= 6)
    assert 0 < fits.sum() < len(fits)  # both kinds of example are in the set
    kept = evaluate(base, x[fits][:, :14], y[fits][:, :14])["accuracy"]
    assert kept > 0.5  # the base model answers what fits
    short = ShortContext(base, 14)
    assert compare.accuracy(short, x, y) == pytest.approx(kept * fits.sum() / len(fits))
    # without a shorter context nothing is cut: the plain evaluation
    assert compare.accuracy(base, x, y) == evaluate(base, x, y)["accuracy"]


def test_cli_refuses_to_write_inside_the_package(capsys):
    assert main(["compare", "--quick", "--out", str(PACKAGE_DIR / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "inside the installed minilora package" in err and "Traceback" not in err
