"""The numbers the docs and the README quote that can be checked without training: parameter
counts, trainable percentages, optimizer-state and storage bytes, read from the pages' own
tables and recomputed here from the shipped base model with minilora's functions.

Accuracies and timings need a training run or a busy clock and are not checked here; the pages
say which commit and run they come from.
"""

import copy
import re
from pathlib import Path

import numpy as np
import pytest

from minilora import GPT, GPTConfig, LoRAConfig, apply_lora, manual_seed
from minilora.compression import compress
from minilora.experiments.compare import METHODS, lora_config
from minilora.experiments.demo import load_base
from minilora.lora import count_parameters, print_trainable_parameters
from minilora.relatives.adapters import AdapterConfig, adapter_parameter_count, apply_adapters
from minilora.relatives.prefix import PrefixConfig, apply_prefix_tuning
from minilora.variants.vera import VeraConfig, apply_vera

ROOT = Path(__file__).resolve().parents[1]


def number(text: str) -> float:
    """'103,296' -> 103296, '1.94%' -> 1.94."""
    return float(text.replace(",", "").rstrip("%"))


def table_rows(page: str, first_words: tuple[str, ...], key_cells: int = 1) -> dict:
    """The table lines of ``page`` that start with one of ``first_words`` followed by a
    count, split on spaces, keyed by their first ``key_cells`` cells (the demo's `lora 4`)."""
    rows = {}
    for line in (ROOT / page).read_text().splitlines():
        cells = line.split()
        if len(cells) > key_cells and cells[0] in first_words:
            if re.fullmatch(r"[\d,]+", cells[key_cells]):
                rows[" ".join(cells[:key_cells])] = cells
    return rows


@pytest.fixture(scope="module")
def base():
    return load_base()


def with_lora(base, r: int):
    model = copy.deepcopy(base)
    apply_lora(model, lora_config(r))
    return model


def test_the_readme_demo_table_counts_trainable_percent_and_optimizer_bytes(base):
    rows = table_rows("README.md", ("full", "lora"), key_cells=2)
    assert set(rows) == {"full -", "lora 1", "lora 4", "lora 16"}
    for key, cells in rows.items():
        model = base if key == "full -" else with_lora(base, int(key.split()[1]))
        trainable, total = count_parameters(model)
        assert number(cells[2]) == trainable, key
        assert cells[3] == f"{100 * trainable / total:.2f}%", key
        assert number(cells[4]) == 2 * 4 * trainable, key  # AdamW: two float32 moments


def test_the_readme_sentence_matches_its_table():
    readme = (ROOT / "README.md").read_text()
    rows = table_rows("README.md", ("full", "lora"), key_cells=2)
    accuracy = {key: number(cells[-1]) for key, cells in rows.items()}
    short = accuracy["full -"] - accuracy["lora 4"]
    close = accuracy["full -"] - accuracy["lora 16"]
    flat = " ".join(readme.split())
    assert f"LoRA r=4 falls {short:.1f} points short of full fine-tuning" in flat
    assert f"r=16 comes within {close:.1f} points" in flat


def test_the_quick_start_snippet_prints_what_the_readme_says(capsys):
    manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=16, n_layer=2, n_head=2, n_embd=32))
    apply_lora(model, LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    print_trainable_parameters(model)
    printed = capsys.readouterr().out.strip()
    shown = printed.rsplit(" || ", 1)[0] + " || ..."  # the pages elide the percentage
    for page in ("README.md", "docs/index.md"):
        assert shown in (ROOT / page).read_text(), page


def test_the_accounting_page_example_prints_its_line(capsys):
    model = GPT(GPTConfig())
    apply_lora(model, LoRAConfig(r=4))
    print_trainable_parameters(model)
    assert capsys.readouterr().out.strip() in (ROOT / "docs/accounting.md").read_text()


def relatives_models(base) -> dict:
    """A model per row of `minilora compare`, untrained: counts and bytes depend only on
    the shapes, which training does not change."""

    def copy_with(insert):
        model = copy.deepcopy(base)
        insert(model)
        return model

    models = {
        "full": base,
        "lora": with_lora(base, 4),
        "lora_merged": with_lora(base, 4),
        "dora": copy_with(lambda m: apply_lora(m, lora_config(4, use_dora=True))),
        "pissa": copy_with(lambda m: apply_lora(m, lora_config(4, init_lora_weights="pissa"))),
        "vera": copy_with(lambda m: apply_vera(m, VeraConfig(r=256))),
        "adapter_houlsby": copy_with(lambda m: apply_adapters(m, AdapterConfig("houlsby", 4))),
        "adapter_lin": copy_with(lambda m: apply_adapters(m, AdapterConfig("lin", 4))),
        "prefix_layer": copy_with(lambda m: apply_prefix_tuning(m, PrefixConfig("layer", 2))),
        "prefix_embedding": copy_with(
            lambda m: apply_prefix_tuning(m, PrefixConfig("embedding", 2))
        ),
        "qlora": compress.compressed(base, "qlora", config=lora_config(4)),
    }
    options = {"svd": {"rank": 32}, "int8": {}, "int4": {}, "nf4": {}, "prune": {"sparsity": 0.3}}
    for method, kwargs in options.items():
        models[method] = compress.compressed(base, method, **kwargs)
    return models


def test_the_relatives_table_counts_and_bytes(base):
    rows = table_rows("docs/relatives.md", METHODS)
    assert set(rows) <= set(METHODS) and len(rows) >= 15
    base_bytes = compress.storage_bytes(base)
    page = (ROOT / "docs/relatives.md").read_text()
    assert f"base: {count_parameters(base)[1]:,} parameters, {base_bytes:,} bytes" in page
    nf4_base = compress.compressed(base, "nf4", double_quant=True)
    assert f"{compress.storage_bytes(nf4_base):,} bytes in NF4 for QLoRA" in page
    for method, model in relatives_models(base).items():
        if method not in rows:
            continue
        cells = rows[method]
        trained = sum(int(p.data.nbytes) for p in model.parameters() if p.requires_grad)
        if method == "full":
            trainable, stored = count_parameters(base)[0], base_bytes
        elif method in ("svd", "int8", "int4", "nf4", "prune"):  # the full model, compressed
            trainable, stored = count_parameters(base)[0], compress.storage_bytes(model)
        else:  # PiSSA keeps the rank-2r conversion for the original base: twice its arrays
            trainable = count_parameters(model)[0]
            stored = (2 if method == "pissa" else 1) * trained
        assert number(cells[1]) == trainable, method
        assert number(cells[3]) == stored, method


def test_the_little_data_table_counts_and_epochs(base):
    lines = [
        line.split()
        for line in (ROOT / "docs/little_data.md").read_text().splitlines()
        if re.match(r"^\s*\d+ (full|lora r=\d+)\s", line)
    ]
    assert len(lines) == 16
    for cells in lines:
        n = int(cells[0])
        if cells[1] == "full":
            model, rest = base, cells[2:]
        else:
            model, rest = with_lora(base, int(cells[2].removeprefix("r="))), cells[3:]
        assert number(rest[0]) == count_parameters(model)[0], cells
        assert rest[1] == f"{100 * 32 / n:.1f}", cells  # 100 steps of 32 examples over n


COMPRESSION_ROWS = {
    "float32 base": ("float32", {}),
    "int8 per tensor": ("int8", {"block_size": None}),
    "int8 per channel": ("int8", {}),
    "int4, blocks of 64": ("int4", {}),
    "NF4, blocks of 64": ("nf4", {}),
    "NF4 + double quantization": ("nf4", {"double_quant": True}),
    "SVD rank 32": ("svd", {"rank": 32}),
    "SVD rank 8": ("svd", {"rank": 8}),
    "prune 30% of connections (per layer)": ("prune", {"sparsity": 0.3}),
    "prune 50% of MLP units": ("prune-neurons", {"sparsity": 0.5}),
    "drop block 0 (of 2)": ("drop-blocks", {"blocks": [0]}),
}


def test_the_compression_table_counts_and_bytes(base):
    page = (ROOT / "docs/compression.md").read_text()
    base_bytes = compress.storage_bytes(base)
    for label, (method, options) in COMPRESSION_ROWS.items():
        line = next(x for x in page.splitlines() if x.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        model = base if method == "float32" else compress.compressed(base, method, **options)
        stored = compress.storage_bytes(model)
        assert number(cells[3]) == compress.stored_parameters(model), label
        assert number(cells[4]) == stored, label
        assert cells[5] == f"{stored / base_bytes:.3f}", label


def test_the_accounting_api_block_prints_what_its_comments_say():
    """docs/accounting.md, section 6: each line whose comment starts with a number is run,
    and must give that number."""
    page = (ROOT / "docs/accounting.md").read_text()
    block = page.split("## 6. The API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    checked = 0
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        claim = re.match(r"\s*(\d+)\b", comment)
        if code.startswith(("from ", "import ", "shape =", "spec =")):
            exec(code, namespace)
        elif claim:
            assert eval(code, namespace) == int(claim.group(1)), line
            checked += 1
    assert checked == 4  # total, trainable, adapter bytes, KV cache bytes


def backward_matmuls(lora: bool):
    """docs/math.md's snippet: the backward's counted products, with or without LoRA."""
    from minilora import backend

    model = GPT(GPTConfig())
    idx = np.random.default_rng(0).integers(0, 16, (2, 8))
    if lora:
        apply_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _, loss = model(idx, idx)
    with backend.counting() as c:
        loss.backward()
    return c.flops, c.names().count("linear.dweight")


def test_the_math_page_counts_backward_flops_and_adapter_parameters(base):
    page = " ".join((ROOT / "docs/math.md").read_text().split())
    full_flops, full_dweights = backward_matmuls(lora=False)
    lora_flops, lora_dweights = backward_matmuls(lora=True)
    assert lora_dweights == 0
    assert (
        f"the backward's matmuls cost {full_flops:,} FLOPs with full fine-tuning "
        f"({full_dweights} `linear.dweight` products) and {lora_flops:,} with LoRA (none)"
    ) in page
    houlsby = adapter_parameter_count(base.config, AdapterConfig("houlsby", 8))
    assert f"has 4 · (1024 + 8 + 64) + 2 · 5 · 64 = {houlsby:,} trainable parameters" in page
    assert 4 * (1024 + 8 + 64) + 2 * 5 * 64 == houlsby
