"""Safe reading of pickle shards: an allow-list unpickler (plain data and numpy arrays only, so no code runs) that
can hash the bytes as it reads them, verifying a shard against its manifest digest in the same pass."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
from typing import Any


class StoreError(ValueError):
    """A store or shard that cannot be used as it is (the message names the file and, where known, the row)."""


class UnsafePickleError(StoreError):
    """A pickle that asks for anything beyond plain data and numpy arrays."""


# Globals a pickle of plain data + numpy arrays needs (numpy 1.x and 2.x spellings). Nothing here
# can run a command, open a file or import a module.
_ALLOWED_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "str"), ("builtins", "int"),
    ("builtins", "float"), ("builtins", "bool"), ("builtins", "tuple"), ("builtins", "bytes"),
    ("builtins", "bytearray"), ("_codecs", "encode"), ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}
_NUMPY_DTYPE_MODULES = ("numpy.dtypes",)  # numpy 2 pickles dtypes as e.g. numpy.dtypes.Float16DType


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (module in _NUMPY_DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle global '{module}.{name}'; embedding shards may hold only "
            "numpy arrays, dicts, lists, strings and numbers. The file was not executed. If you trust it, "
            "convert it to the revision.embeddings/1 layout in a separate, sandboxed process."
        )


class _HashingReader:
    """File wrapper that hashes what is read: a shard is verified in the same pass that loads it (no second read)."""

    def __init__(self, f: io.BufferedReader):
        self.f, self.sha256 = f, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.sha256.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        got = self.f.readinto(buffer)
        self.sha256.update(memoryview(buffer)[:got])
        return got

    def readline(self) -> bytes:
        data = self.f.readline()
        self.sha256.update(data)
        return data

    def hexdigest(self) -> str:
        for block in iter(lambda: self.f.read(1 << 22), b""):  # bytes after the pickle's STOP count too
            self.sha256.update(block)
        return self.sha256.hexdigest()


def safe_load(path: str | os.PathLike, sha256: str | None = None) -> Any:
    """Unpickle a file allowing only plain data and numpy arrays; anything else raises UnsafePickleError.
    With `sha256`, the bytes are hashed as they are read and a mismatch raises StoreError (nothing is returned)."""
    path = str(path)
    with open(path, "rb") as f:
        reader = _HashingReader(f) if sha256 else f
        try:
            obj = _RestrictedUnpickler(reader, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated file, garbage bytes, ...
            if sha256:
                check_digest(path, reader.hexdigest(), sha256)  # a tampered shard says so, not "unreadable"
            raise StoreError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
        if sha256:
            check_digest(path, reader.hexdigest(), sha256)
    return obj


def check_digest(path: str | os.PathLike, digest: str, expected: str) -> None:
    if digest != expected:
        raise StoreError(f"{path}: sha256 {digest[:12]}… differs from the manifest's {expected[:12]}…: the shard "
                         "changed after it was written (tampered or corrupted); re-embed it, or pass --no_verify "
                         "if you changed it on purpose")
