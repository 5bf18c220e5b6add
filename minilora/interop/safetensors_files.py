"""safetensors files, read and written: the one place minilora parses and writes them.

``serialize`` gives canonical bytes (the same tensors give the same bytes); the checked
readers refuse a truncated or corrupt file, a dtype minilora does not use, NaN or infinite
values, a device or a pipe, naming the file; every file ``serialize`` writes records the
SHA-256 of its tensor data, which the readers check (:func:`check_data_sha256`);
``atomic_write`` moves fully written, fsync'ed temporary files into place, several files as
one commit (a journal, completed on the next save or load when a process was killed after
its commit point). Why and how: docs/porting.md, "Conventions", "Checksums" and "The files
of a save are one commit".
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import safetensors
import safetensors.numpy

from minilora import backend
from minilora.interop.files import JSON_LIMIT, check_regular_file, read_file

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
    of 8 bytes, as the library does, so the data stays aligned. The metadata gains
    ``DATA_SHA256_KEY``: the SHA-256 of the data section (see :func:`check_data_sha256`).
    """
    raw = safetensors.numpy.save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    digest = data_sha256(io.BytesIO(raw), 8 + n)
    header["__metadata__"] = {**header.get("__metadata__", {}), DATA_SHA256_KEY: digest}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


# ======================================================================================
# Checksum of the tensor data
# ======================================================================================

# The metadata key of the checksum: the lowercase hex SHA-256 of the file's data section,
# every byte after the header (the tensors' raw bytes in offset order). safetensors has no
# checksum of its own, so a bit flipped on disk or in transfer would load without a word.
DATA_SHA256_KEY = "minilora.data_sha256"


def data_sha256(f, data_start: int) -> str:
    """The hex SHA-256 of everything from byte ``data_start`` to the end of the binary
    file object ``f``: a safetensors file's data section. Reads 1 MiB at a time."""
    f.seek(data_start)
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def check_data_sha256(path: Path, caller: str) -> None:
    """Refuse a safetensors file whose data section does not hash to the SHA-256 recorded
    under ``DATA_SHA256_KEY`` when it was written, naming the file. A file without the key
    (written by PEFT, transformers or an older minilora) passes unchecked. The header must
    have been validated first (:func:`read_header`, or the safetensors library)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        expected = (json.loads(f.read(n)).get("__metadata__") or {}).get(DATA_SHA256_KEY)
        if expected is None or data_sha256(f, 8 + n) == expected:
            return
    raise ValueError(
        f"{caller}: {path} is corrupt: its tensor data does not match the SHA-256 recorded "
        f"when it was written ({DATA_SHA256_KEY}), so some bytes changed on disk or in "
        "transfer (bit flips?); restore it from a good copy"
    )


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
    float16 and bfloat16 tensors are upcast to float32 (exactly), with a warning. A file
    whose data does not match its recorded checksum is refused first (a flipped bit can
    also make a NaN: the message names the real cause).
    """
    check_data_sha256(path, caller)
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
# The commit record of a save of several files, in their folder (see atomic_write)
JOURNAL_NAME = ".minilora-journal.json"


def atomic_write(files: list[tuple[Path, bytes]]) -> None:
    """Write each (destination, bytes) to a temporary file beside it, flushed and fsync'ed,
    then move them into place with ``os.replace``. Nothing is replaced until every
    temporary file is complete; an error before then removes the temporary files and the
    destinations keep their previous content.

    Several files (an adapter's config and weights, a vector set) are one commit, as a
    database commits a transaction: they must share a folder, and once every temporary
    file is complete a journal naming them (``JOURNAL_NAME``, itself written to a
    temporary name and renamed) is the commit point. Then the files are replaced and the
    journal removed. A process killed before the journal exists leaves the old files; one
    killed after it leaves a journal that :func:`finish_interrupted_write` (called by the
    next save and by the loaders) completes, so the folder holds the new files. Never a mix.

    A destination that is a symbolic link is written through to its target (the link
    stays a link); one that is not a regular file (a device, a pipe) is refused.
    Temporary files a killed save left beside a destination are removed first (two
    processes saving to the same file at once are not supported: one fails).
    """
    folders = {Path(dest).parent for dest, _ in files}
    if len(folders) != 1:
        raise ValueError(f"atomic_write: the files of one commit must share a folder: {folders}")
    folder = folders.pop()
    if len(files) > 1:
        finish_interrupted_write(folder, "atomic_write")  # before its temporary files go
    names = [Path(dest).name for dest, _ in files]
    files = [(Path(os.path.realpath(dest)), data) for dest, data in files]
    for dest, _ in files:
        if dest.exists() and not dest.is_file():  # /dev/null, a pipe: never replace one
            raise ValueError(f"{dest} exists and is not a regular file; refusing to replace it")
    written = [dest for dest, _ in files]
    if len(files) > 1:
        written.append(folder / JOURNAL_NAME)  # a journal a killed save was writing
    for dest in written:
        stale = glob.escape(str(dest.parent / f".{dest.name}{_TEMP_MARK}")) + "*"
        for leftover in glob.glob(stale):
            _remove_quietly(leftover)
    pending = []  # (temporary path, destination), not yet moved into place
    committed = False
    try:
        for dest, data in files:
            pending.append((_write_temp(dest, data), dest))
        if len(pending) > 1:  # the commit point: from here on the new files are the truth
            record = {name: Path(tmp).name for name, (tmp, _) in zip(names, pending, strict=True)}
            _write_journal(folder, record)
            committed = True
        for tmp, dest in pending:
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
    finally:
        if not committed:  # an error before the commit point (or one file): nothing left
            for tmp, _ in pending:
                _remove_quietly(tmp)
    if committed:
        os.remove(folder / JOURNAL_NAME)
        _fsync_dir(folder)


def _write_journal(folder: Path, record: dict) -> None:
    """{destination name: temporary file name}, as ``folder``'s journal, durably."""
    data = (json.dumps({"minilora_journal": record}, sort_keys=True) + "\n").encode()
    tmp = _write_temp(folder / JOURNAL_NAME, data)
    try:
        os.replace(tmp, folder / JOURNAL_NAME)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(folder)


def finish_interrupted_write(folder, caller: str) -> None:
    """Complete a save of several files to ``folder`` that was killed after its commit
    point (:func:`atomic_write`): move the temporary files its journal names into place,
    then remove the journal. Nothing to do without a journal. A journal that is not one
    minilora wrote is refused (ValueError naming it), never followed: it may only move a
    destination's own temporary file onto that destination, in ``folder``."""
    journal = Path(folder) / JOURNAL_NAME
    if not os.path.lexists(journal):
        return
    data = read_file(journal, caller, "a JSON file", JSON_LIMIT)
    try:
        record = json.loads(data)["minilora_journal"]
        moves = []
        for name, tmp_name in record.items():
            plain = all(n == Path(n).name and n not in ("", ".", "..") for n in (name, tmp_name))
            dest = Path(os.path.realpath(Path(folder) / name))
            if not plain or not tmp_name.startswith(f".{dest.name}{_TEMP_MARK}"):
                raise ValueError(f"{name!r}: {tmp_name!r}")
            moves.append((dest.parent / tmp_name, dest))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(
            f"{caller}: {journal} is not the journal of a minilora save ({e}); it was not "
            "followed: remove it if you know where it comes from"
        ) from None
    for tmp, dest in moves:
        if os.path.lexists(tmp):  # else already moved before the save was killed
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
    os.remove(journal)
    _fsync_dir(Path(folder))


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
