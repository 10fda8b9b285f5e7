"""The pipeline's stage runner: each stage logged, timed, and skipped when a run in the same folder finished it."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from demo.budget import Budget, recipe
from demo.world import WORLD_VERSION
from revision.errors import InputError

# what the stages run, relative to the repository root (the pipeline runs a checkout's scripts, as a user does)
REPO_SCRIPTS = ("script/train/pretrain.sh", "script/train/finetune_full.sh", "image_embed.py", "embed_mean.py")


class Runner:
    """Runs stages as subprocesses in the repository, logs each, prints one progress line per stage with
    its time, and skips a stage that finished before (in a folder made with the same seed and budget)."""

    def __init__(self, run_dir: Path, seed: int, budget: Budget, repo: str | Path | None = None):
        self.repo = repository_root(repo)  # the checkout whose scripts run (default: the current directory)
        self.run_dir, self.threads = run_dir, budget.threads
        self.times: dict[str, float] = {}
        self.overlapped: set[str] = set()  # stages run beside others (background): not added into the wall time
        for sub in ("logs", "done"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        # the world's generator version too: a run folder's finished stages were trained on the world it wrote then
        settings, saved = recipe({"seed": seed, "world_version": WORLD_VERSION, **asdict(budget)}), run_dir / "settings.json"
        if saved.is_file() and recipe(json.loads(saved.read_text())) != settings:
            raise ValueError(f"{run_dir} holds a run with other settings ({saved}); use another --out or delete it")
        saved.write_text(json.dumps(settings, indent=1) + "\n")

    def __call__(self, name: str, cmd: Sequence[str] | Callable[[], Any], env: dict[str, str] | None = None) -> float:
        """Run a stage: a command line (a subprocess in the repository, output to logs/NAME.log) or, for the
        toy world's own steps and prediction, a function called in this process (its CLI's main)."""
        if not callable(cmd):
            return self.background(name, cmd, env)()
        if (seconds := self.cached(name)) is not None:
            return seconds
        log, start = self.run_dir / "logs" / f"{name}.log", time.perf_counter()
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = cmd() or 0
        return self.finished(name, code, time.perf_counter() - start)

    def background(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Callable[[], float]:
        """Start a command-line stage and return what waits for it (returning its seconds, or raising as a
        stage does); a stage that finished before is not started. Stages the caller waits for later run beside
        what it does meanwhile; their time is not added into the seed's wall time (self.overlapped)."""
        if (seconds := self.cached(name)) is not None:
            return lambda: seconds
        threads = str(self.threads)
        full_env = {"PY": sys.executable, **os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "GPUS": "0",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(env or {})}
        log, start = self.run_dir / "logs" / f"{name}.log", time.perf_counter()
        with open(log, "w") as out:
            out.write("+ " + " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items()) + " " + shlex.join(cmd) + "\n")
            out.flush()
            process = subprocess.Popen(list(cmd), cwd=self.repo, env=full_env, stdout=out, stderr=subprocess.STDOUT)
        ended: list[float] = []  # when it exited, not when it was waited for: the stage's own time

        def watch() -> None:
            process.wait()
            ended.append(time.perf_counter())

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        def wait() -> float:
            watcher.join()
            return self.finished(name, process.returncode, ended[0] - start)

        return wait

    def cached(self, name: str) -> float | None:
        """The seconds of a stage that finished before (printed and recorded as this run's), else None."""
        done = self.run_dir / "done" / f"{name}.json"
        if not done.is_file():
            return None
        seconds = json.loads(done.read_text())["seconds"]
        print(f"[{self.run_dir.name}] {name:<28} cached ({seconds:.1f} s earlier)", flush=True)
        self.times[name] = seconds
        return seconds

    def finished(self, name: str, code: int, seconds: float) -> float:
        log = self.run_dir / "logs" / f"{name}.log"
        if code != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            raise RuntimeError(f"stage {name} failed (exit {code}); log {log}:\n{tail}")
        (self.run_dir / "done" / f"{name}.json").write_text(json.dumps({"seconds": seconds}))
        print(f"[{self.run_dir.name}] {name:<28} {seconds:6.1f} s", flush=True)
        self.times[name] = seconds
        return seconds


def repository_root(path: str | Path | None = None) -> Path:
    """The ReVision checkout whose scripts the stages run: `path`, else the current directory. An InputError
    naming what is missing when it is not one (checked before any stage runs)."""
    root = (Path.cwd() if path is None else Path(path)).resolve()
    missing = [name for name in REPO_SCRIPTS if not (root / name).is_file()]
    if missing:
        raise InputError(f"{root} is not a ReVision checkout (no {', '.join(missing)}): run from the repository root "
                         "or pass --repo ROOT")
    return root
