"""Safe reading of pickle shards: an allow-list unpickler (plain data and numpy arrays only, so no code runs, and no
call can allocate more than the file holds). With a manifest digest, the file's bytes are hashed before a byte of
it is unpickled: a changed shard is refused before it can cost anything."""
from __future__ import annotations

import io
import os
import pickle
from typing import Any

from revision.errors import StoreError, UnsafePickleError
from revision.hashing import file_sha256

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


def _from_data(cls: type, source: str) -> Any:
    """bytes / bytearray as a pickle may call them: from data it holds. bytearray(4_000_000_000) would allocate 4 GB
    from a 39-byte file, so a size (an int) is refused."""
    def build(*args: Any) -> Any:
        if args and isinstance(args[0], int):
            raise UnsafePickleError(f"{source}: refused to unpickle {cls.__name__}({args[0]}): a pickle of data never "
                                    "asks for an empty buffer of a given size (a memory bomb?). The file was not loaded")
        return cls(*args)

    return build


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("builtins", "bytes"), ("builtins", "bytearray")):
            return _from_data(bytes if name == "bytes" else bytearray, self._source)
        if (module, name) in _ALLOWED_GLOBALS or (module in _NUMPY_DTYPE_MODULES and name.endswith("DType")):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to unpickle global '{module}.{name}'; embedding shards may hold only "
            "numpy arrays, dicts, lists, strings and numbers. The file was not executed. If you trust it, "
            "convert it to the revision.embeddings/1 layout in a separate, sandboxed process."
        )


def safe_load(path: str | os.PathLike, sha256: str | None = None) -> Any:
    """Unpickle a file allowing only plain data and numpy arrays; anything else raises UnsafePickleError.
    With `sha256`, the file is hashed first and a mismatch raises StoreError before anything is unpickled (the
    second read comes from the page cache)."""
    path = str(path)
    if sha256:
        check_digest(path, file_sha256(path), sha256)
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except UnsafePickleError:
            raise
        except Exception as e:  # truncated file, garbage bytes, ...
            raise StoreError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e


def check_digest(path: str | os.PathLike, digest: str, expected: str) -> None:
    if digest != expected:
        raise StoreError(f"{path}: sha256 {digest[:12]}… differs from the manifest's {expected[:12]}…: the shard "
                         "changed after it was written (tampered or corrupted); re-embed it, or pass --no_verify "
                         "if you changed it on purpose")
