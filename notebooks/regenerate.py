"""Execute the notebooks in full and store them with their outputs and figures.

    python notebooks/regenerate.py              # all nine, one after the other
    python notebooks/regenerate.py 04 07        # a few: a number, a stem or a file name

Each notebook runs in a fresh ``python3`` kernel (nbclient), in full mode (``MINILORA_QUICK`` is
removed from the kernel's environment), from the notebooks folder, as a reader runs it. A notebook
whose cell raises (or whose kernel dies) is left as it was, and the script exits with status 1
after trying the others. A good run replaces the file atomically (a temporary file, then
``os.replace``), without what changes from run to run by itself (cell timings, the kernel's
Python version, widget state, where printing was cut into messages), so a rerun on the same
commit differs only where the notebook prints a timing.

The stored notebooks are what the repository's web page and the documentation site show
(mkdocs-jupyter renders them without executing them); tests/test_notebooks.py fails when one of
them lacks its outputs.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, DeadKernelError

NOTEBOOKS = Path(__file__).resolve().parent
KEPT_METADATA = ("kernelspec",)  # the notebook-level keys a stored notebook keeps


def select(names: list[str]) -> list[Path]:
    """The notebooks that ``names`` (numbers, stems or file names) designate; all when empty."""
    every = sorted(NOTEBOOKS.glob("*.ipynb"))
    if not names:
        return every
    chosen = []
    for name in names:
        matches = [p for p in every if p.name == name or p.stem == name or p.stem[:2] == name]
        if len(matches) != 1:
            known = ", ".join(p.stem for p in every)
            raise SystemExit(f"notebook {name!r}: expected a number, a stem or a file of {known}")
        chosen.append(matches[0])
    return chosen


def execute(path: Path) -> nbformat.NotebookNode:
    """``path`` run from a clean state in a fresh kernel, in full mode."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=None,  # the full runs take minutes on a busy laptop
        record_timing=False,  # no timestamps in the cells' metadata
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


def strip_volatile(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop the metadata that a rerun changes without the notebook having changed."""
    nb.metadata = nbformat.NotebookNode(
        {key: nb.metadata[key] for key in KEPT_METADATA if key in nb.metadata}
    )
    nb.metadata["language_info"] = {"name": "python"}  # not the kernel's Python version
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs = coalesce_streams(cell.outputs)
    return nb


def coalesce_streams(outputs: list) -> list:
    """Consecutive prints to one stream as one output: how a cell's printing is cut into
    messages depends on the machine's timing."""
    merged = []
    for out in outputs:
        last = merged[-1] if merged else None
        if last and out.output_type == last.output_type == "stream" and out.name == last.name:
            last.text += out.text
        else:
            merged.append(out)
    return merged


def write_atomically(nb: nbformat.NotebookNode, path: Path) -> None:
    """Write ``nb`` to ``path`` so that a reader sees the old file or the new one, never half."""
    nbformat.validate(nb)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    paths = select(parser.parse_args(argv).names)
    os.environ.pop("MINILORA_QUICK", None)  # full mode: each kernel inherits this environment
    failed = []
    for path in paths:
        start = time.perf_counter()
        try:
            nb = execute(path)
        except (CellExecutionError, DeadKernelError) as error:
            print(f"{path.name}: failed, the file is unchanged\n{error}", file=sys.stderr)
            failed.append(path.name)
            continue
        write_atomically(strip_volatile(nb), path)
        print(f"{path.name}: {time.perf_counter() - start:.0f} s", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
