"""Keep every cache the tests could touch inside a temp dir: tests must never write to ~/.cache."""
import os
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="revision-test-cache-")
for var in ("HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
    os.environ[var] = os.path.join(_CACHE_ROOT, var.lower())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
