"""Keep every cache the tests could touch inside a temp dir: tests must never write to ~/.cache."""
import os
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="revision-test-cache-")
for var in ("HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
    os.environ[var] = os.path.join(_CACHE_ROOT, var.lower())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core machine OpenMP threads of tiny
    matmuls mostly wait for each other (a tiny Trainer step ran ~30x slower with 2 threads under load)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
