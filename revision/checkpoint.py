"""Atomic checkpoints with a hash manifest (docs/checkpoints.md).

Every save (an intermediate `checkpoint-N` and the final model) is written into a staging folder first.
When every rank has finished writing, one process (HF's `should_save`: the main process, or each node's
with --save_on_each_node) hashes every file, writes `checkpoint_manifest.json` LAST, and renames the
staging folder into place. So a `checkpoint-N` folder exists only once it is complete, and its manifest
says exactly which bytes this run wrote.

Loading checks the manifest: resuming verifies every file's sha256 and refuses anything that differs, is
missing, or was added. DeepSpeed unpickles its `.pt` files with weights_only=False: resuming forces
weights_only=True with a minimal allow-list (weights_only_loads), so a prepared file never runs code.
`latest` is the newest checkpoint with a manifest. Prediction, the lmms-eval adapter and a run starting from
a checkpoint verify every listed file by sha256 too (`--no_verify` skips the hashes knowingly), and refuse a
folder whose save was interrupted.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from revision import nofollow
from revision.hashing import file_sha256
from revision.nofollow import LinkError, open_nofollow

logger = logging.getLogger(__name__)

MANIFEST = "checkpoint_manifest.json"
FORMAT = "revision.checkpoint/1"
STAGING_PREFIX = "tmp-"  # tmp-checkpoint-N: HF's checkpoint globs ("checkpoint-*") never see it
FINAL_STAGING = "tmp-final"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
PAUSE_ENV = "REVISION_TEST_PAUSE_AT"  # tests: stop (sleep) at a named point of a save, to be killed there
# What DeepSpeed's own state files (global_stepN/*.pt) hold beyond tensors and plain data: ZeRO-2/3 optimizer
# states pickle the loss scaler, the ZeRO stage and fragment addresses. Nothing else is unpickled at resume.
DEEPSPEED_SAFE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
)


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded: incomplete, changed since it was written, or lacking state."""


class ChangedFileError(CheckpointError):
    """A file whose sha256 differs from the manifest's."""


def pause_point(name: str) -> None:
    """For the kill tests only: with REVISION_TEST_PAUSE_AT=name, say so on stderr and sleep (to be SIGKILLed)."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"REVISION_TEST_PAUSED {name}", file=sys.stderr, flush=True)
        time.sleep(3600)


# ---- hashing and the manifest -------------------------------------------------------------------

def _hash_file(path: Path) -> dict:
    # fsync: on disk before the manifest says it is complete (power loss, not just a kill)
    digest = file_sha256(path, fsync=True)
    return {"size": path.stat().st_size, "sha256": digest}


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {size, sha256}}; files hash in parallel threads (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: _hash_file(folder / n), names)))


def write_manifest(folder: str | os.PathLike, names: list[str] | None = None) -> dict:
    """Hash the folder's files (or `names`) and write the manifest atomically; it is the last file written."""
    folder = Path(folder)
    manifest = {"format": FORMAT, "files": hash_files(folder, _files(folder) if names is None else names)}
    tmp = folder / (MANIFEST + ".tmp")
    with open_nofollow(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    for name in manifest["files"]:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: lists {name!r}, which is not a file inside the checkpoint")
    return manifest


def verify(folder: str | os.PathLike, hashes: bool = True, exact: bool = True) -> dict:
    """Check a folder against its manifest: every listed file present with its size (and, with `hashes`,
    its sha256); with `exact`, no other file either. Raises CheckpointError naming the first difference."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(f"{folder}: no {MANIFEST}: the save did not finish (killed?), or the folder was not "
                              "written by a ReVision train.py that records one")
    listed = manifest["files"]
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {MANIFEST} but missing")
        if path.stat().st_size != entry["size"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, {MANIFEST} says {entry['size']} (changed since saved)")
    if exact:
        extra = sorted(set(_files(folder)) - set(listed))
        if extra:
            raise CheckpointError(f"{folder / extra[0]}: not in {MANIFEST} (added after the save); refusing to load")
    if hashes:
        names = list(listed)
        for name, got in hash_files(folder, names).items():
            if got["sha256"] != listed[name]["sha256"]:
                raise ChangedFileError(f"{folder / name}: sha256 {got['sha256'][:12]}… differs from {MANIFEST} "
                                      "(changed since this run saved it); refusing to load it")
    return manifest


# ---- atomic publishing -------------------------------------------------------------------------

def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fresh_staging(staging: Path) -> None:
    """An empty staging folder (leftovers of a killed save removed)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Write the manifest into a fully written checkpoint folder and rename it to its final name."""
    write_manifest(staged)
    pause_point("checkpoint-publish")
    if final.exists():  # the same step saved by an earlier run: replaced as a whole
        old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        pause_point("checkpoint-swap")  # killed here: `final` is gone, both complete saves remain (recover_swaps)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync_dir(final.parent)


def publish_final(staging: Path, out: Path) -> None:
    """Move a fully written final save from `out/tmp-final` into `out`, replacing an earlier save there.

    The old manifest goes first, the new one comes last: while files move, `out` has no manifest and the
    staging folder is there, so nothing loads a mix of old and new files (predict refuses it)."""
    manifest = write_manifest(staging)
    try:
        old = read_manifest(out)
    except CheckpointError:  # unreadable: its files cannot be told apart, they stay (the new ones overwrite theirs)
        old = None
    (out / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(out)
    for name in (old or {}).get("files", {}):
        if name not in manifest["files"] and not CHECKPOINT_RE.match(Path(name).parts[0]):
            (out / name).unlink(missing_ok=True)
    for i, name in enumerate(manifest["files"]):
        linked = next((p for p in (out / name).parents if p != out and out in p.parents and p.is_symlink()), None)
        if linked is not None:
            raise LinkError(f"{linked}: is a symbolic link where this save puts a folder; refusing to write through it")
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, out / name)
        if i == 0:
            pause_point("final-publish")
    os.replace(staging / MANIFEST, out / MANIFEST)
    _fsync_dir(out)
    shutil.rmtree(staging, ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------

def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-N folders of a run, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_complete(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint-N with a manifest whose files are all there (sizes checked); incomplete ones are
    skipped with a warning. Hashes are checked afterwards by `check_resumable`: a complete checkpoint whose
    bytes changed is refused, not silently passed over."""
    for folder in checkpoints(output_dir):
        try:
            verify(folder, hashes=False, exact=False)
            return folder
        except CheckpointError as e:
            logger.warning("skipping %s for --resume_from_checkpoint latest: %s", folder, e)
    return None


def has_training_state(folder: Path, names: list[str]) -> tuple[bool, bool]:
    """(optimizer state, scheduler state) present: HF's optimizer.pt / scheduler.pt, or DeepSpeed's global_stepN."""
    deepspeed = any(re.fullmatch(r"global_step\d+/.*optim_states\.pt", n) for n in names)
    optimizer = deepspeed or any(n in ("optimizer.pt", "optimizer.bin") or n.startswith("optimizer.pt_") for n in names)
    return optimizer, deepspeed or "scheduler.pt" in names


def check_resumable(folder: str | os.PathLike, hashes: bool = True) -> Path:
    """Verify a checkpoint before resuming from it: manifest, every hash, no extra file, optimizer and
    scheduler state present. Raises CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    start = time.time()
    manifest = verify(folder, hashes=hashes, exact=True)
    optimizer, scheduler = has_training_state(folder, list(manifest["files"]))
    if not (optimizer and scheduler):
        missing = " and ".join(n for n, ok in (("optimizer", optimizer), ("scheduler", scheduler)) if not ok)
        raise CheckpointError(f"{folder}: holds no {missing} state (saved with --save_only_model?); resuming would "
                              "restart the schedule silently. Start a new run from it with --model_name_or_path instead")
    logger.info("verified %s (%d files) in %.1fs", folder, len(manifest["files"]), time.time() - start)
    return folder


def resolve_resume(resume: str | bool | None, output_dir: str | os.PathLike, hashes: bool = True) -> str | None:
    """--resume_from_checkpoint: `latest` (or True) is the newest complete checkpoint in output_dir (none: a
    fresh start); a path is used as given. Either is verified by check_resumable (`hashes`: by every sha256;
    other ranks, after the main process did that, check names and sizes)."""
    if resume in (None, False, ""):
        return None
    if resume is True or str(resume) == "latest":
        folder = latest_complete(output_dir)
        if folder is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint in %s; starting from scratch", output_dir)
            return None
        resume = folder
    return str(check_resumable(resume, hashes))


def resume_for(args) -> str | None:
    """The checkpoint this process resumes from (HF TrainingArguments `args`), verified. The main process (each
    node's with --save_on_each_node) drops killed saves' staging folders and hashes every file first; the
    others then find the same checkpoint complete by names and sizes."""
    local = args.save_on_each_node
    with args.main_process_first(local=local, desc="verify the checkpoint"):
        if args.should_save:
            remove_stale_staging(args.output_dir)
        is_main = (args.local_process_index if local else args.process_index) == 0
        return resolve_resume(args.resume_from_checkpoint, args.output_dir, hashes=is_main)


def refuse_links(output_dir: str | os.PathLike) -> None:
    """Before a run writes anything: HF's Trainer writes trainer_state.json straight into output_dir (every other
    file goes through a staging folder and a rename, which replaces a link instead of following it)."""
    nofollow.refuse_links(Path(output_dir) / "trainer_state.json")


def recover_swaps(output_dir: str | os.PathLike) -> None:
    """A re-save killed between its two renames leaves checkpoint-N missing, the old one moved to tmp-old-checkpoint-N
    and the new one, complete, in tmp-checkpoint-N/checkpoint-N: put the new one in place if its manifest is there,
    else the old one back. Either way checkpoint-N is complete again before anything is removed."""
    folder = Path(output_dir)
    for old in sorted(folder.glob(f"{STAGING_PREFIX}old-checkpoint-*")) if folder.is_dir() else []:
        final = folder / old.name[len(f"{STAGING_PREFIX}old-"):]
        staged = folder / f"{STAGING_PREFIX}{final.name}" / final.name
        if final.exists() or not CHECKPOINT_RE.match(final.name):
            continue
        try:
            verify(staged, hashes=False, exact=False)
            newer = True
        except CheckpointError:
            newer = False
        logger.warning("%s: its re-save was interrupted between two renames; restoring the %s complete save", final,
                       "new" if newer else "previous")
        os.rename(staged if newer else old, final)
        _fsync_dir(folder)


def remove_stale_staging(output_dir: str | os.PathLike) -> None:
    """Drop the staging folders of killed saves (they hold no complete checkpoint, once recover_swaps has run)."""
    recover_swaps(output_dir)
    folder = Path(output_dir)
    for stale in folder.glob(f"{STAGING_PREFIX}*checkpoint-*") if folder.is_dir() else []:
        logger.warning("removing %s: a checkpoint save that did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)


def check_loadable(folder: str | os.PathLike, hashes: bool = True) -> None:
    """Refuse a model folder for loading whose save did not finish or whose files do not match its manifest
    (sizes, and with `hashes` every sha256: ~1.7 GB/s, under a second for a 135M model). A folder with no
    manifest and no interrupted save (RevisionModel.save_pretrained, older versions) loads as it is."""
    folder = Path(folder)
    interrupted = (folder / FINAL_STAGING).exists()
    if (folder / MANIFEST).exists():
        try:
            verify(folder, hashes=hashes, exact=False)
        except ChangedFileError as e:
            raise ChangedFileError(f"{e} (to load it anyway, knowingly: --no_verify)") from None
        if interrupted:
            logger.warning("%s: a later save into this folder did not finish (%s is left); loading the previous "
                           "complete save", folder, FINAL_STAGING)
    elif interrupted:
        raise CheckpointError(f"{folder}: a save into this folder was interrupted ({FINAL_STAGING} is there, "
                              f"{MANIFEST} is not): its files may mix two saves. Rerun the training, or load a "
                              "complete checkpoint-N")


def _deepspeed_safe_globals() -> list:
    found = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, attr = name.rsplit(".", 1)
        with contextlib.suppress(ImportError, AttributeError):  # an older DeepSpeed without one of them
            found.append(getattr(importlib.import_module(module), attr))
    return found


@contextlib.contextmanager
def weights_only_loads(folder: str | os.PathLike | None) -> Iterator[None]:
    """Resuming from a checkpoint with DeepSpeed state (global_stepN/*.pt, which DeepSpeed unpickles with
    weights_only=False): each of those files is checked first (a pickle global outside tensors, plain data and
    DEEPSPEED_SAFE_GLOBALS is refused naming the file), and every torch.load inside the block runs weights-only
    with that allow-list (HF's own loads already are). A hash manifest guards against accidents only: this is
    what stops a checkpoint someone else prepared from running code. Without DeepSpeed state: nothing changes."""
    files = sorted(Path(folder).glob("global_step*/*.pt")) if folder else []
    if not files:
        yield
        return
    import torch

    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        for path in files:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
            except Exception as e:  # not a zip-format torch file (DeepSpeed writes only those)
                raise CheckpointError(f"{path}: not a torch checkpoint file DeepSpeed writes ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]}); refused before loading") from None
            if unsafe:
                raise CheckpointError(f"{path}: would unpickle {unsafe[0]}, which DeepSpeed's state never holds; refused "
                                      "before loading (nothing in it ran)")
        previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"  # read by every torch.load, DeepSpeed's weights_only=False included
        try:
            yield
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{folder}: DeepSpeed's state asked to unpickle something outside tensors and plain "
                                  f"data ({str(e).splitlines()[0][:200]}); refused, nothing in it ran") from None
        finally:
            if previous is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
