"""Files minilora reads but did not write, read safely: the check every reader makes before
it opens one (a regular file, not a pipe, a device, a folder or a broken link) and size
limits, so that a hostile or mistaken path is refused with its real cause instead of
blocking or reading forever (docs/porting.md). Used by interop/ and text/.
"""

from __future__ import annotations

import errno
import os
import stat

#: The most bytes a JSON file minilora reads may hold (config.json, adapter_config.json,
#: tokenizer.json, a vector set's manifest.json): the largest real ones are tens of MB.
JSON_LIMIT = 64 * 2**20

_NOT_REGULAR = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def check_regular_file(path, caller: str, expected: str = "a file") -> int:
    """The size in bytes of ``path``, if it is a regular file (or a link to one).

    Anything else is refused before it is opened, naming ``caller`` and the real cause: a
    missing file, a dangling or looping symbolic link, a folder, a device such as
    /dev/zero (never ends), a named pipe (blocks until someone writes) or a socket."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(
                f"{caller}: {path} is a dangling symbolic link: its target "
                f"{os.readlink(path)} does not exist"
            ) from None
        raise FileNotFoundError(f"{caller}: no such file: {path}") from None
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ValueError(
            f"{caller}: {path} is a loop of symbolic links (each leads to the next, and "
            "never to a file)"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{caller}: {path} is a folder, expected {expected}")
    if not stat.S_ISREG(info.st_mode):
        kind = _NOT_REGULAR.get(stat.S_IFMT(info.st_mode), "not a file")
        if os.path.islink(path):
            kind += f" (it is a symbolic link to {os.path.realpath(path)})"
        raise ValueError(
            f"{caller}: {path} is not a regular file: it is {kind}; reading it could block "
            "or never end"
        )
    return info.st_size


def read_file(path, caller: str, expected: str = "a file", limit: int | None = None) -> bytes:
    """The bytes of a regular file (:func:`check_regular_file`), never more than its size
    when checked, and refused, unread, when that is over ``limit`` bytes."""
    size = check_regular_file(path, caller, expected)
    if limit is not None and size > limit:
        raise ValueError(
            f"{caller}: {path} holds {size:,} bytes, expected {expected} of at most "
            f"{limit:,} bytes (is it the right file?)"
        )
    with open(path, "rb") as f:
        return f.read(size)
