"""safetensors files, read and written: the one place minilora parses and writes them.

``serialize`` gives canonical bytes (the same tensors give the same bytes); the checked
readers refuse a truncated or corrupt file, a dtype minilora does not use, NaN or infinite
values, a device or a pipe, naming the file; ``atomic_write`` moves fully written, fsync'ed
temporary files into place. Why and how: docs/porting.md, "Conventions".
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import warnings
from pathlib import Path

import safetensors
import safetensors.numpy

from minilora import backend
from minilora.backend import check_regular_file

# The dtypes minilora computes in; anything else in a model file is refused, not
# converted. Adapters may also be bfloat16 (NumPy has none): upcast to float32, with a warning.
SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}
_HALF_DTYPES = {"BF16": "bfloat16", "F16": "float16"}


# ======================================================================================
# Bytes and checked readers
# ======================================================================================


def serialize(tensors: dict, metadata: dict) -> bytes:
    """safetensors bytes with a canonical header, so equal inputs give equal bytes.

    The safetensors library lays out the data and writes the header, but its
    ``__metadata__`` is a Rust HashMap whose key order changes from call to call. We
    re-emit the header with sorted keys; data offsets are relative to the end of the
    header, so the data bytes stay valid. The header is padded with spaces to a multiple
    of 8 bytes, as the library does, so the data stays aligned.
    """
    raw = safetensors.numpy.save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def read_safetensors(path: Path, caller: str, half_to_float32: bool = False) -> tuple[dict, dict]:
    """(tensors as host arrays, metadata) from a safetensors file, or a ValueError that
    names the file and what is wrong with it: :func:`read_header`, then
    :func:`read_tensors`."""
    entries, metadata, data_start = read_header(path, caller, half_to_float32)
    return read_tensors(path, caller, entries, data_start, half_to_float32), metadata


def read_header(path: Path, caller: str, half_to_float32: bool = False):
    """(entries, metadata, data_start) of a safetensors file whose structure and dtypes are
    valid, or a ValueError that names the file and what is wrong with it. ``entries``:
    (name, {"dtype", "shape", "data_offsets"}) in the file's order; the data begins at
    byte ``data_start``. No tensor is read: a caller can check shapes first."""
    check_regular_file(path, caller)
    with open(path, "rb") as f:  # a file we may not read: PermissionError, saying so
        # The library validates the structure from the file's header: header length,
        # JSON, dtypes, shapes, offsets that tile the data and end where the file ends.
        # Its errors (SafetensorError, or anything else a hostile file provokes) become
        # one ValueError that names the file.
        try:
            with safetensors.safe_open(str(path), framework="numpy"):
                pass
        except BaseException as e:  # a Rust panic surfaces as a BaseException subclass
            if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                raise
            raise ValueError(
                f"{caller}: {path} is not a valid safetensors file (truncated or corrupt?): {e}"
            ) from e
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
            metadata = header.pop("__metadata__", None) or {}
            entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
        except Exception as e:  # validated above, so this is not expected; still never leak
            raise ValueError(f"{caller}: {path} could not be read: {e}") from e
    if not isinstance(metadata, dict):
        raise ValueError(f"{caller}: {path} has a __metadata__ that is not a JSON object")
    known = {**SAFETENSORS_DTYPES, **(_HALF_DTYPES if half_to_float32 else {})}
    bad = [f"{name}: {v['dtype']}" for name, v in entries if v["dtype"] not in known]
    if bad:
        raise ValueError(
            f"{caller}: {path} holds tensors of a dtype minilora does not use ({', '.join(bad)}); "
            f"expected one of {sorted(known.values())}"
        )
    return entries, metadata, 8 + n


def read_tensors(path: Path, caller: str, entries, data_start: int, half_to_float32=False):
    """The tensors of :func:`read_header`'s ``entries``, as host arrays by name.

    Each tensor is read from the file straight into its own new array, one at a time, so
    reading holds the tensors once (not the file's bytes beside them).

    NaN and infinite values are refused, naming the tensor: no trained model holds them,
    and loading them would only print "loss nan" later. With ``half_to_float32`` (adapters)
    float16 and bfloat16 tensors are upcast to float32 (exactly), with a warning.
    """
    try:
        with open(path, "rb") as f:  # in the file's order: one pass over it
            tensors = {name: _read_tensor(f, data_start, v) for name, v in entries}
    except Exception as e:  # validated by read_header, so this is not expected either
        raise ValueError(f"{caller}: {path} could not be read: {e}") from e
    xp = backend.module_for("cpu")
    not_finite = sorted(name for name, a in tensors.items() if not xp.isfinite(a).all())
    if not_finite:
        raise ValueError(
            f"{caller}: {path} holds NaN or infinite values in {', '.join(not_finite)}; "
            "a trained model never does (did training diverge?)"
        )
    half = sorted({_HALF_DTYPES[v["dtype"]] for _, v in entries if v["dtype"] in _HALF_DTYPES})
    if half and half_to_float32:
        tensors = {name: a.astype(xp.float32) for name, a in tensors.items()}
        warnings.warn(
            f"{caller}: {path} holds {' and '.join(half)} tensors; they were upcast to float32 "
            "(exactly: every such value is a float32 value)",
            stacklevel=4,
        )
    return tensors


def _read_tensor(f, data_start: int, entry: dict):
    """One tensor of a safetensors file (header ``entry``; the data begins at byte
    ``data_start``) read into a new native-order host array: the file's bytes go straight
    into it, with no second copy (little-endian machines; bfloat16 is widened)."""
    xp = backend.module_for("cpu")
    begin, end = entry["data_offsets"]
    if entry["dtype"] == "BF16":  # NumPy has no bfloat16: its bits are a float32's top half
        dtype = xp.dtype("<u2")
    else:
        dtype = xp.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
    array = xp.empty(entry["shape"], dtype=dtype)
    f.seek(data_start + begin)
    if f.readinto(array.reshape(-1).view(xp.uint8)) != end - begin:
        raise ValueError("the file ended inside a tensor (changed while being read?)")
    if entry["dtype"] == "BF16":
        return (array.astype(xp.uint32) << 16).view(xp.float32)
    return array.astype(dtype.newbyteorder("="), copy=False)  # no copy when already native


def host_copy(array):
    """A contiguous host (NumPy) copy of a parameter array, from any device."""
    return backend.to_numpy(array).copy()  # ndarray.copy() is C-contiguous


# ======================================================================================
# Atomic writes
# ======================================================================================


def check_destination(path: Path, caller: str) -> Path:
    """``path`` as the destination of a one-file save: refused when it is a folder or its
    folder does not exist (so a save fails before any work, naming ``caller``)."""
    if path.is_dir():
        raise ValueError(
            f"{caller}: {path} is a folder; give a file name such as model.safetensors"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{caller}: the folder {path.parent} does not exist")
    return path


# Temporary files are named ".<destination name>.minilora-tmp-<random>", beside the
# destination; a process killed mid-save leaves one, removed by the next save there.
_TEMP_MARK = ".minilora-tmp-"


def atomic_write(files: list[tuple[Path, bytes]]) -> None:
    """Write each (destination, bytes) to a temporary file beside it, flushed and fsync'ed,
    then move them into place with ``os.replace``. Nothing is replaced until every
    temporary file is complete; on any error the temporary files are removed and the
    destinations keep their previous content.

    A destination that is a symbolic link is written through to its target (the link
    stays a link); one that is not a regular file (a device, a pipe) is refused.
    Temporary files a killed save left beside a destination are removed first (two
    processes saving to the same file at once are not supported: one fails).

    (With several files there is still a short window between the replaces in which a
    crash leaves a new file beside an old one; each file on its own is never partial.
    ``save_adapter`` records a digest that makes such a pair refused on load.)
    """
    files = [(Path(os.path.realpath(dest)), data) for dest, data in files]
    for dest, _ in files:
        if dest.exists() and not dest.is_file():  # /dev/null, a pipe: never replace one
            raise ValueError(f"{dest} exists and is not a regular file; refusing to replace it")
    for dest, _ in files:
        stale = glob.escape(str(dest.parent / f".{dest.name}{_TEMP_MARK}")) + "*"
        for leftover in glob.glob(stale):
            _remove_quietly(leftover)
    pending = []  # temporary paths not yet moved into place
    try:
        for dest, data in files:
            pending.append((_write_temp(dest, data), dest))
        while pending:
            tmp, dest = pending[0]
            os.replace(tmp, dest)
            pending.pop(0)
            _fsync_dir(dest.parent)
    finally:
        for tmp, _ in pending:
            _remove_quietly(tmp)


def _write_temp(dest: Path, data: bytes) -> str:
    # Same folder as the destination: os.replace is only atomic within one filesystem.
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}{_TEMP_MARK}", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        # mkstemp creates the file private (0600); give it the mode a normal save would
        os.chmod(tmp, _file_mode(dest))
    except BaseException:
        _remove_quietly(tmp)
        raise
    return tmp


def _file_mode(dest: Path) -> int:
    """Keep the permissions of the file being replaced, else 0666 minus the umask."""
    try:
        return dest.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)  # the only way to read the umask is to set it
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); folders cannot be opened on Windows, so skip."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
