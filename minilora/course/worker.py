"""The untrusted side of grading: a process that imports the student's ``minilora`` and
serves requests on a pipe. It computes and never judges.

The grader (minilora/course/sandbox.py) starts it as a script, by path, in isolated mode::

    python -I -B .../minilora/course/worker.py READ_FD WRITE_FD

so it imports nothing of the installed ``minilora`` (this file needs only the standard
library and NumPy): it puts the student's folder first on ``sys.path``, imports the
student's ``minilora``, replaces every target of the assignment's *other* tasks by the
reference implementation (whose source the grader sends as text: :func:`reference_function`
compiles it into the student's module), installs an audit hook that refuses to open any
file of the grader's (the installed package, the hidden tests), and then answers requests
until the pipe closes: get or set an attribute, call, index, iterate, combine with an
operator, copy a value out. The grader holds the checks, the expected values and the score;
what this process prints goes to a capped file and is never read as a result.

The wire (:func:`send`, :func:`receive`): a message is a 4-byte header length, a 4-byte
buffer count, one 8-byte length per buffer, the header (JSON), then the raw buffers. A
value is None, a bool, int, float or str, a NumPy array of a numeric or bool dtype (its
bytes travel as a buffer), a NumPy scalar, dtype or scalar type, or a tuple, list or
str-keyed dict of values (:func:`pack`). Anything else stays in this process, in a table,
and crosses as a handle: ``{"t": "h", "id": 7}``. Nothing is ever pickled, and a message
longer than the reader's cap is refused before anything is allocated for it.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import math
import operator
import os
import select
import struct
import sys
import textwrap
import time
import traceback
import types

import numpy as np

PREFIX = struct.Struct("!II")  # header length, buffer count
LENGTH = struct.Struct("!Q")
MAX_DEPTH = 32  # nesting of tuples, lists and dicts in one value
NUMERIC = "biufc"  # bool, signed, unsigned, float, complex: the dtypes that cross by value
PY_TYPES = {"bool": bool, "int": int, "float": float, "complex": complex}
PROGRAMS = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen"}
OPERATORS = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "truediv": operator.truediv,
    "matmul": operator.matmul,
    "pow": operator.pow,
    "neg": operator.neg,
}


class ProtocolError(Exception):
    """A message that breaks the wire format (too long, malformed, truncated)."""


# ======================================================================================
# The wire: values, handles, messages
# ======================================================================================


def pack(x, buffers: list, other, depth: int = 0):
    """``x`` as JSON-able data, its arrays' bytes appended to ``buffers``; ``other(x)``
    turns what is not a value into a handle (or refuses it)."""
    if x is None or type(x) in (bool, int, str):
        return x
    if type(x) is float:
        return x if math.isfinite(x) else {"t": "float", "v": repr(x)}
    if depth > MAX_DEPTH:
        return other(x)
    if type(x) in (tuple, list):
        return {"t": type(x).__name__, "v": [pack(v, buffers, other, depth + 1) for v in x]}
    if type(x) is dict and all(type(k) is str for k in x):
        return {"t": "dict", "v": {k: pack(v, buffers, other, depth + 1) for k, v in x.items()}}
    if type(x) is np.ndarray and x.dtype.kind in NUMERIC:
        buffers.append(np.ascontiguousarray(x).tobytes())
        return {"t": "array", "dtype": x.dtype.str, "shape": list(x.shape), "b": len(buffers) - 1}
    if isinstance(x, np.generic) and x.dtype.kind in NUMERIC:
        buffers.append(np.asarray(x).tobytes())
        return {"t": "scalar", "dtype": x.dtype.str, "b": len(buffers) - 1}
    if isinstance(x, np.dtype) and x.kind in NUMERIC:
        return {"t": "dtype", "v": x.str}
    if isinstance(x, type) and issubclass(x, np.generic) and np.dtype(x).kind in NUMERIC:
        return {"t": "stype", "v": np.dtype(x).str}
    if isinstance(x, type) and x.__name__ in PY_TYPES and PY_TYPES[x.__name__] is x:
        return {"t": "pytype", "v": x.__name__}
    return other(x)


def _dtype(text) -> np.dtype:
    dtype = np.dtype(str(text))
    if dtype.kind not in NUMERIC:
        raise ProtocolError(f"dtype {text!r} may not cross")
    return dtype


def unpack(data, buffers: list, handle, depth: int = 0):
    """The value :func:`pack` wrote; ``handle(id)`` gives what a handle stands for."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if depth > MAX_DEPTH + 1 or type(data) is not dict:
        raise ProtocolError("malformed value")
    kind = data.get("t")
    if kind in ("tuple", "list"):
        items = [unpack(v, buffers, handle, depth + 1) for v in data["v"]]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {str(k): unpack(v, buffers, handle, depth + 1) for k, v in data["v"].items()}
    if kind == "float":
        return float(data["v"])
    if kind in ("array", "scalar"):
        dtype, raw = _dtype(data["dtype"]), buffers[int(data["b"])]
        shape = tuple(int(n) for n in data.get("shape", ()))
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise ProtocolError("an array's buffer does not match its shape")
        array = np.frombuffer(raw, dtype).reshape(shape).copy()
        return array if kind == "array" else array[()]
    if kind == "dtype":
        return _dtype(data["v"])
    if kind == "stype":
        return _dtype(data["v"]).type
    if kind == "pytype":
        return PY_TYPES[data["v"]]
    if kind == "h":
        return handle(int(data["id"]))
    raise ProtocolError(f"unknown kind {kind!r}")


def send(fd: int, header: dict, buffers: list) -> None:
    """One message: header (JSON, ASCII) and raw buffers."""
    head = json.dumps(header, ensure_ascii=True).encode("ascii")
    parts = [PREFIX.pack(len(head), len(buffers))]
    parts += [LENGTH.pack(len(b)) for b in buffers] + [head] + list(buffers)
    data = memoryview(b"".join(parts))
    while data:
        data = data[os.write(fd, data) :]


def _read(fd: int, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int, cap: int, deadline: float | None = None) -> tuple[dict, list]:
    """One message: ``(header, buffers)``. Raises EOFError when the pipe closes,
    TimeoutError past ``deadline`` (a ``time.monotonic()``), and ProtocolError for a
    message over ``cap`` bytes (refused before it is read) or a malformed one."""
    head_len, count = PREFIX.unpack(_read(fd, PREFIX.size, deadline))
    if count > cap // LENGTH.size:
        raise ProtocolError(f"a message of {count} buffers")
    lengths = [LENGTH.unpack(_read(fd, LENGTH.size, deadline))[0] for _ in range(count)]
    if head_len + sum(lengths) > cap:
        raise ProtocolError(f"a message of {head_len + sum(lengths)} bytes (cap {cap})")
    try:
        header = json.loads(_read(fd, head_len, deadline).decode("ascii"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"a malformed header: {e}") from None
    if type(header) is not dict:
        raise ProtocolError("a header that is not an object")
    return header, [_read(fd, n, deadline) for n in lengths]


# ======================================================================================
# Inside the worker: the student's package, isolated, and the requests it serves
# ======================================================================================


def reference_function(swap: dict, module):
    """The reference implementation of ``swap["qualname"]`` (its ``def``'s source, sent by
    the grader), compiled here and bound to the student's ``module`` (its globals, its
    classes, the student's defaults)."""
    qualname = swap["qualname"]
    node = ast.parse(textwrap.dedent(swap["source"])).body[0]
    ast.increment_lineno(node, swap["line"] - 1)
    owner_name, _, name = qualname.rpartition(".")
    # compiled inside a class of the same name, so that super() finds its __class__ cell
    fields = {"type_params": []} if sys.version_info >= (3, 12) else {}
    wrapped = ast.ClassDef(
        name=owner_name or "_", bases=[], keywords=[], body=[node], decorator_list=[], **fields
    )
    tree = ast.fix_missing_locations(ast.Module(body=[wrapped], type_ignores=[]))
    code = compile(tree, swap["file"], "exec")
    class_code = next(c for c in code.co_consts if isinstance(c, types.CodeType))
    fcode = next(
        c for c in class_code.co_consts if isinstance(c, types.CodeType) and c.co_name == name
    )
    current = _lookup(module, qualname)
    owner = _lookup(module, owner_name) if owner_name else None
    closure = tuple(types.CellType(owner) for _ in fcode.co_freevars) or None  # super()
    fn = types.FunctionType(fcode, module.__dict__, fcode.co_name, current.__defaults__, closure)
    fn.__kwdefaults__, fn.__qualname__ = current.__kwdefaults__, qualname
    return fn


def _lookup(module, qualname: str):
    obj = module
    for part in qualname.split("."):
        if part not in vars(obj):
            raise LookupError(
                f"{module.__name__} has no {qualname}: keep every function the assignment "
                "names, under its name (renamed or deleted?)"
            )
        obj = vars(obj)[part]
    return obj


def isolate(swaps: list[dict]) -> None:
    """Every target the grader names runs the reference implementation."""
    import importlib

    for swap in swaps:
        module = importlib.import_module(f"minilora.{swap['module']}")
        owner_name, _, name = swap["qualname"].rpartition(".")
        fn = reference_function(swap, module)
        setattr(_lookup(module, owner_name) if owner_name else module, name, fn)


def refuse_opening(protected: list[str], hidden: list[str]) -> None:
    """An audit hook: opening any file under ``protected`` (the grader's files) raises
    PermissionError, so the student's code can neither read the installed reference nor
    change the grader; and so does starting a program (which the hook would not see).
    ``hidden`` holds the SHA-256 of folders whose path this process must not learn (the
    hidden tests'): a file is refused if the hash of one of its folders is there."""
    roots = tuple(os.path.join(os.path.realpath(p), "") for p in protected)
    hidden_set = set(hidden)

    def in_hidden(path: str) -> bool:
        folder = os.path.dirname(path)
        while folder and hidden_set:
            if hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest() in hidden_set:
                return True
            folder, previous = os.path.dirname(folder), folder
            if folder == previous:
                return False
        return False

    def hook(event, args):
        if event in PROGRAMS:
            raise PermissionError("the grader runs no programs for your code")
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        real = os.path.realpath(os.fsdecode(args[0]))
        if os.path.join(real, "").startswith(roots) or in_hidden(real):
            raise PermissionError(
                f"the grader refused to open {os.fsdecode(args[0])}: it is one of the grader's "
                "files (your code must not read the installed minilora or the grader)"
            )

    sys.addaudithook(hook)


def error_data(error: BaseException, folder: str) -> dict:
    """What the grader learns of an exception: its type's name (and the built-in exception
    it derives from), its message, and the innermost frame in the student's package."""
    package = os.path.join(os.path.realpath(folder), "minilora", "")
    where = None
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        path = os.path.realpath(frame.filename)
        # the innermost line of the student's package, above backend's helpers
        if path.startswith(package) and os.path.basename(path) != "backend.py":
            where = [os.path.relpath(path, os.path.dirname(package[:-1])), frame.lineno, frame.name]
            break
    base = next(
        (c.__name__ for c in type(error).__mro__ if getattr(builtins, c.__name__, None) is c),
        "Exception",
    )
    try:
        message = str(error)
    except BaseException:  # a message that cannot be written is a message too
        message = "(its message could not be written)"
    return {"type": type(error).__name__, "base": base, "message": message[:2000], "where": where}


class Server:
    """The requests of one check, served on the student's imported package."""

    def __init__(self, folder: str):
        self.folder, self.table, self.next_id = folder, {}, 0

    def handle_of(self, x) -> dict:
        self.next_id += 1
        self.table[self.next_id] = x
        return {"t": "h", "id": self.next_id}

    def value(self, x):
        """A plain copy of ``x``: a tensor's data, an array, or ``x`` itself."""
        import minilora.autograd
        import minilora.backend

        if isinstance(x, minilora.autograd.Tensor):
            x = x.data
        return np.array(minilora.backend.to_numpy(x)) if hasattr(x, "shape") else x

    def answer(self, op: str, args: list, kwargs: dict):
        import importlib

        if op == "module":
            return importlib.import_module(f"minilora.{args[0]}")
        if op == "getattr":
            return getattr(args[0], args[1])
        if op == "setattr":
            return setattr(args[0], args[1], args[2])
        if op == "call":
            return args[0](*args[1:], **kwargs)
        if op == "getitem":
            return args[0][args[1]]
        if op == "setitem":
            args[0][args[1]] = args[2]
            return None
        if op in ("len", "bool", "repr"):
            result = {"len": len, "bool": bool, "repr": repr}[op](args[0])
            return result[:200] if op == "repr" else result
        if op == "contains":
            return args[1] in args[0]
        if op == "iter":
            return list(args[0])
        if op == "operator":
            fn = OPERATORS[args[0]]
            return fn(*args[1:]) if not kwargs.get("reflected") else fn(args[2], args[1])
        if op == "is_tensor":
            return isinstance(args[0], importlib.import_module("minilora.autograd").Tensor)
        if op == "same":
            return args[0] is args[1]
        if op == "id":
            return id(args[0])
        if op == "value":
            return self.value(args[0])
        raise ProtocolError(f"unknown request {op!r}")

    def serve(self, read_fd: int, write_fd: int, cap: int) -> None:
        while True:
            try:
                header, buffers = receive(read_fd, cap)
            except EOFError:
                return
            args = unpack(header.get("args", []), buffers, self.table.__getitem__)
            kwargs = unpack(header.get("kwargs", {}), buffers, self.table.__getitem__)
            try:
                result = self.answer(header["op"], args, kwargs)
            except BaseException as e:  # whatever the student's code raises is an answer
                send(write_fd, {"error": error_data(e, self.folder)}, [])
                continue
            out: list = []
            try:
                send(write_fd, {"ok": pack(result, out, self.handle_of)}, out)
            except BaseException as e:  # an array too odd to copy, say
                send(write_fd, {"error": error_data(e, self.folder)}, [])


def main(argv: list[str]) -> None:
    """Import the student's package as soon as the first message (folder, protected paths)
    comes; apply the swaps of the second; then serve."""
    read_fd, write_fd = int(argv[1]), int(argv[2])
    setup, _ = receive(read_fd, 1 << 16)
    folder = setup["folder"]
    sys.path.insert(0, folder)
    refuse_opening(setup["protected"], setup["hidden"])
    try:
        import minilora
    except BaseException as e:
        send(write_fd, {"error": error_data(e, folder)}, [])
        return
    found = os.path.dirname(os.path.realpath(minilora.__file__))
    if found != os.path.join(os.path.realpath(folder), "minilora"):
        send(write_fd, {"fatal": f"imported minilora from {found}, not from the submission"}, [])
        return
    swaps, _ = receive(read_fd, 1 << 26)
    try:
        isolate(swaps["swaps"])
    except LookupError as e:  # the student's package lacks a function the grader swaps
        send(write_fd, {"fatal": str(e)}, [])
        return
    send(write_fd, {"ok": None}, [])
    Server(folder).serve(read_fd, write_fd, setup["cap"])


if __name__ == "__main__":
    main(sys.argv)
