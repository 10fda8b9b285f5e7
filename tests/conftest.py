"""Keep every cache the tests could touch inside a temp dir: tests must never write to ~/.cache."""
import os
import tempfile

_CACHE_ROOT = tempfile.mkdtemp(prefix="revision-test-cache-")
for var in ("HF_HOME", "TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR", "XDG_CACHE_HOME"):
    os.environ[var] = os.path.join(_CACHE_ROOT, var.lower())
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker gets its share of the cores (it and its subprocesses), not all of them each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))


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


@pytest.fixture
def free_port() -> str:
    """A TCP port nobody listens on now: tests that start a process group (torchrun, DeepSpeed) must not share a
    fixed port, since the suite runs its files in parallel (pytest-xdist)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """make_tiny_training_world's defaults (a one-layer llama of hidden size 32; 64 text and 64 image samples of
    dim 16), built once per test module: {"model": folder, "text" | "image": (store folder, data file)}."""
    from demo.tiny.lm import make_tiny_training_world

    return make_tiny_training_world(tmp_path_factory.mktemp("tiny-world"))


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    """The toy world's mini preset (seed 0), built once per test module."""
    from demo.world import PRESETS, build_world

    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0, sizes=PRESETS["mini"], workers=1)
    return out


@pytest.fixture(scope="session")
def mini_demo(tmp_path_factory, worker_id):
    """The toy pipeline's miniature run (mini preset, rows realign and no_stage1, seed 0), once per test session:
    trained checkpoints of the mini world in OUT/seed-0/runs/ROW/stage1|stage2, the world in OUT/seed-0/world.
    Under pytest-xdist the workers share one run (the first builds it under a file lock, the others wait for it):
    each of its two modules used to build its own, about a minute of both cores each."""
    from filelock import FileLock

    from demo import pipeline

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout whose scripts the stages run
    args = ["--preset", "mini", "--rows", "realign,no_stage1", "--repo", repo]
    if worker_id == "master":  # no xdist: this session's own folder
        out = tmp_path_factory.mktemp("toy-demo")
        pipeline.main(["--out", str(out), *args])
        return out
    out = tmp_path_factory.getbasetemp().parent / "toy-demo"  # the folder of this run, shared by its workers
    with FileLock(f"{out}.lock"):
        if not (out / "results.json").is_file():  # written last: a complete run
            pipeline.main(["--out", str(out), *args])
    return out


@pytest.fixture
def kill_9_after_shards():
    """Start a command, SIGKILL it once the JSON file `watched` lists at least `shards` shards (or it exits, or
    `timeout` s pass): a run killed mid-way, for the resume tests."""
    import json
    import signal
    import subprocess
    import time

    def run(cmd: list[str], env: dict, watched, shards: int, timeout: float) -> None:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if watched.exists() and len(json.loads(watched.read_text())["shards"]) >= shards:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    return run


@pytest.fixture
def sideways_photo():
    """make(folder): one picture saved upright, saved with its pixels turned and an EXIF orientation saying so (as
    phones do), and saved turned without EXIF; {"upright" | "exif" | "raw": path}. Sides are multiples of 16: JPEG
    blocks line up whichever way the pixels are turned."""
    import numpy as np
    from PIL import Image

    def make(folder):
        pixels = np.zeros((48, 64, 3), np.uint8)
        pixels[:, :20] = (255, 0, 0)
        pixels[:24, 20:] = (0, 0, 255)
        pixels[24:, 40:] = (0, 200, 0)
        upright = Image.fromarray(pixels)
        turned = upright.transpose(Image.Transpose.ROTATE_90)
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 clockwise to view"
        paths = {name: folder / f"{name}.jpg" for name in ("upright", "exif", "raw")}
        upright.save(paths["upright"], quality=100)
        turned.save(paths["exif"], quality=100, exif=exif)
        turned.save(paths["raw"], quality=100)
        return paths

    return make
