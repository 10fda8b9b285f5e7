"""Opening the files we write inside our own folders (stores, checkpoints, alignment output) without following
links: a symlink (or a hard link) planted where one of our files goes would otherwise send the write, or the
truncation, to a file outside the folder. Such a file is refused with one line; nothing is written."""
from __future__ import annotations

import os
import stat
from typing import IO

_FLAGS = {"w": os.O_WRONLY | os.O_CREAT, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND, "r+": os.O_RDWR}


class LinkError(OSError):
    """One of our file names is a link (or not a regular file): refused before anything is written through it."""


def refuse_links(*paths: str | os.PathLike) -> None:
    """Before anything is written: none of these names of our files may be a symbolic link."""
    for path in paths:
        if os.path.islink(path):
            raise LinkError(f"{path}: is a symbolic link where this program writes its own file; refusing to write "
                            "through it (remove the link)")


def open_fd(path: str | os.PathLike, flags: int, truncate: bool = False, mode: int = 0o644) -> int:
    """os.open with O_NOFOLLOW, then checked to be a regular file with no other hard link; `truncate` empties it
    only after that check (O_TRUNC would truncate before it)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError:
        refuse_links(path)  # O_NOFOLLOW's ELOOP: say what it means
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise LinkError(f"{path}: {what}; refusing to write through it (remove it)")
    if truncate:
        os.ftruncate(fd, 0)
    return fd


def open_nofollow(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> IO:
    """open() for writing ("w", "a", "r+", with or without "b") that refuses links (see open_fd)."""
    base = mode.replace("b", "")
    fd = open_fd(path, _FLAGS[base], truncate=base == "w")
    return os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with open_nofollow(path, "wb") as f:
        f.write(data)
