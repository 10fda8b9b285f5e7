"""Atomic checkpoints: a run killed while saving leaves nothing that loads as complete; resume verifies hashes."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from revision import checkpoint
from revision.checkpoint import MANIFEST, CheckpointError, check_resumable, latest_complete, write_manifest
from revision.infer import Predictor
from revision.predict import main as predict_main
from revision.train import parse_args, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def flags(tiny_world, out, *extra):
    store, data = tiny_world["text"]
    return ["--model_name_or_path", tiny_world["model"], "--data_path", data, "--embed_folder", store, "--output_dir", str(out),
            "--num_visual_tokens", "2", "--model_max_length", "48", "--per_device_train_batch_size", "16",
            "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "0",
            "--tune_mm_mlp_adapter", "--version", "plain", "--learning_rate", "1e-2", *extra]


def run(tiny_world, out, *extra):
    return train(*parse_args(flags(tiny_world, out, *extra)))


def killed_at(tiny_world, out, pause, *extra):
    """Run train.py in a subprocess, SIGKILL it when it reaches the named point of a save."""
    env = {**os.environ, checkpoint.PAUSE_ENV: pause, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = "import sys\nfrom revision.train import main\nmain(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", child, *flags(tiny_world, out, *extra)], env=env, cwd=REPO,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline, seen = time.time() + 240, []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith(f"REVISION_TEST_PAUSED {pause}"):
                proc.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "the run never reached the pause point"
        else:
            pytest.fail(f"the run ended without reaching {pause!r}: {''.join(seen)[-2000:]}")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_kill_during_an_intermediate_save_resumes_from_the_last_complete_checkpoint(tiny_world, tmp_path):
    out = tmp_path / "out"
    killed_at(tiny_world, out, "model-saved:checkpoint-4", "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "tmp-"))) == ["checkpoint-2", "tmp-checkpoint-4"]
    checkpoint.verify(out / "checkpoint-2")  # complete: every hash matches
    # a partial checkpoint-N as older versions (or a copy) leave it: newer, but not complete
    partial = out / "checkpoint-5"
    partial.mkdir()
    (partial / "projector.safetensors").write_bytes((out / "checkpoint-2" / "projector.safetensors").read_bytes())
    assert latest_complete(out) == out / "checkpoint-2"
    resumed = run(tiny_world, out, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                  "--resume_from_checkpoint", "latest")
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2, 3, 4, 5, 6]  # 1-2 from checkpoint-2
    assert not (out / "tmp-checkpoint-4").exists()  # the killed save's staging folder is cleaned up
    for name in ("checkpoint-4", "checkpoint-6"):
        checkpoint.verify(out / name)
    Predictor(out, device="cpu")  # the final save is complete


def test_kill_during_the_final_save_into_an_existing_folder_is_refused_by_predict(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_world, out, "--max_steps", "1", "--save_strategy", "no")
    old = json.loads((out / MANIFEST).read_text())["files"]
    assert {"projector.safetensors", "revision_config.json", "training_args.bin"} <= set(old)
    Predictor(out, device="cpu")
    killed_at(tiny_world, out, "final-publish", "--max_steps", "2", "--save_strategy", "no", "--learning_rate", "5e-2")
    assert not (out / MANIFEST).exists() and (out / checkpoint.FINAL_STAGING).exists()
    with pytest.raises(CheckpointError, match=r"out: a save into this folder was interrupted \(tmp-final is there"):
        Predictor(out, device="cpu")
    assert predict_main(["--model", str(out), "--embedding", "x.npy", "--device", "cpu"]) == 2
    assert "a save into this folder was interrupted" in capsys.readouterr().err


def test_a_killed_final_save_before_publishing_leaves_the_previous_model(tiny_world, tmp_path):
    out = tmp_path / "out"
    first = run(tiny_world, out, "--max_steps", "1", "--save_strategy", "no").model.projector[0].weight.detach().clone()
    (out / checkpoint.FINAL_STAGING).mkdir()  # what a kill while writing the new save leaves (its files half written)
    (out / checkpoint.FINAL_STAGING / "projector.safetensors").write_bytes(b"half")
    assert torch.equal(Predictor(out, device="cpu").model.projector[0].weight, first)  # old, complete, consistent


def test_tampered_or_extended_checkpoints_are_refused_at_resume(tiny_world, tmp_path):
    out = tmp_path / "out"
    run(tiny_world, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    ckpt = out / "checkpoint-2"
    check_resumable(ckpt)
    data = bytearray((ckpt / "optimizer.pt").read_bytes())
    data[-20] ^= 1
    (ckpt / "optimizer.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint-2/optimizer.pt: sha256 .* differs from checkpoint_manifest.json"):
        run(tiny_world, out, "--max_steps", "4", "--resume_from_checkpoint", str(ckpt))
    with pytest.raises(CheckpointError, match="sha256"):  # latest finds it complete by names and sizes, then refuses it
        run(tiny_world, out, "--max_steps", "4", "--resume_from_checkpoint", "latest")
    data[-20] ^= 1
    (ckpt / "optimizer.pt").write_bytes(bytes(data))
    (ckpt / "global_step2").mkdir()
    (ckpt / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"an object that runs code when unpickled")
    with pytest.raises(CheckpointError, match=r"global_step2/mp_rank_00_model_states.pt: not in checkpoint_manifest.json"):
        check_resumable(ckpt)


def test_checkpoints_without_optimizer_or_scheduler_state_are_refused(tmp_path):
    for name in ("trainer_state.json", "projector.safetensors", "scheduler.pt"):
        (tmp_path / name).write_text("x")
    write_manifest(tmp_path)
    with pytest.raises(CheckpointError, match=r"holds no optimizer state \(saved with --save_only_model\?\)"):
        check_resumable(tmp_path)
    (tmp_path / "optimizer.pt").write_text("x")
    (tmp_path / "scheduler.pt").unlink()
    write_manifest(tmp_path)
    with pytest.raises(CheckpointError, match="holds no scheduler state"):
        check_resumable(tmp_path)
    (tmp_path / "scheduler.pt").write_text("x")
    write_manifest(tmp_path)
    assert check_resumable(tmp_path) == tmp_path


def test_manifest_names_outside_the_folder_are_refused(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": checkpoint.FORMAT, "files": {"../x": {"size": 1, "sha256": ""}}}))
    with pytest.raises(CheckpointError, match=r"lists '../x', which is not a file inside the checkpoint"):
        checkpoint.verify(tmp_path)


def error_lines(capsys) -> list[str]:
    """stderr without progress bars: what the user reads."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not re.search(r"\d+%\|", line)]


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # same size: only the hash tells
    path.write_bytes(bytes(data))


def test_a_changed_checkpoint_file_is_refused_by_prediction_the_adapter_and_stage_2(tiny_world, tmp_path, capsys):
    from revision.lmms_eval_model import ReVision

    out = tmp_path / "out"
    run(tiny_world, out, "--max_steps", "1", "--save_strategy", "no")
    flip_a_bit(out / "projector.safetensors")
    np.save(tmp_path / "e.npy", np.ones(16, np.float32))
    predict = ["--model", str(out), "--embedding", str(tmp_path / "e.npy"), "--device", "cpu", "--max_new_tokens", "2"]
    assert predict_main(predict) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "out/projector.safetensors: sha256" in err[0] and "--no_verify" in err[0]
    with pytest.raises(CheckpointError, match=r"projector.safetensors: sha256 .* differs"):
        ReVision(pretrained=str(out), device="cpu")
    with pytest.raises(CheckpointError, match=r"out/projector.safetensors: sha256 .* differs"):
        run(tiny_world, tmp_path / "s2", "--max_steps", "1", "--save_strategy", "no", "--pretrain_mm_mlp_adapter", str(out))
    assert not (tmp_path / "s2").exists()
    # knowingly: the same checkpoint loads
    assert predict_main([*predict, "--no_verify"]) == 0
    ReVision(pretrained=str(out), device="cpu", no_verify="True")
    run(tiny_world, tmp_path / "s2", "--max_steps", "1", "--save_strategy", "no", "--pretrain_mm_mlp_adapter", str(out),
        "--no_verify")


def test_a_weights_file_that_is_not_safetensors_is_one_line(tiny_world, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_world, out, "--max_steps", "1", "--save_strategy", "no")
    (out / "projector.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    write_manifest(out)  # the manifest says these bytes are what was saved: only the format check is left
    np.save(tmp_path / "e.npy", np.ones(16, np.float32))
    assert predict_main(["--model", str(out), "--embedding", str(tmp_path / "e.npy"), "--device", "cpu"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith(f"error: {out}/projector.safetensors: not a readable weights file (SafetensorError: ")


def resave_killed_at(tiny_world, out: Path, pause: str) -> dict:
    """A run that saved checkpoint-2, then the same run again (not resumed, another learning rate) whose re-save of
    checkpoint-2 is killed at `pause`; returns the first save's manifest entries."""
    run(tiny_world, out, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    old = checkpoint.verify(out / "checkpoint-2")["files"]
    killed_at(tiny_world, out, pause, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
              "--learning_rate", "5e-2")
    return old


def test_a_kill_between_the_two_renames_of_a_re_save_resumes_from_a_complete_checkpoint(tiny_world, tmp_path):
    out = tmp_path / "out"
    old = resave_killed_at(tiny_world, out, "checkpoint-swap")
    assert not (out / "checkpoint-2").exists()
    assert (out / "tmp-old-checkpoint-2").is_dir() and (out / "tmp-checkpoint-2" / "checkpoint-2" / MANIFEST).is_file()
    new = checkpoint.verify(out / "tmp-checkpoint-2" / "checkpoint-2")["files"]
    assert new["projector.safetensors"] != old["projector.safetensors"]
    saved = json.loads((out / "tmp-checkpoint-2" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    resumed = run(tiny_world, out, "--max_steps", "3", "--save_strategy", "no", "--resume_from_checkpoint", "latest")
    history = [h for h in resumed.state.log_history if "loss" in h]
    assert [h["step"] for h in history] == [1, 2, 3]  # steps 1-2 from the new, complete checkpoint-2
    assert [h["loss"] for h in history[:2]] == [h["loss"] for h in saved if "loss" in h]
    assert checkpoint.verify(out / "checkpoint-2")["files"] == new
    assert not list(out.glob("tmp-*"))
    # killed before the new save's manifest was written: the previous checkpoint is put back
    os.rename(out / "checkpoint-2", out / "tmp-old-checkpoint-2")
    (out / "tmp-checkpoint-2" / "checkpoint-2").mkdir(parents=True)
    (out / "tmp-checkpoint-2" / "checkpoint-2" / "projector.safetensors").write_bytes(b"half")
    checkpoint.remove_stale_staging(out)
    assert checkpoint.verify(out / "checkpoint-2")["files"] == new and not list(out.glob("tmp-*"))


def test_a_link_where_training_writes_its_state_is_refused_before_training(tiny_world, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text("precious\n")
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / "trainer_state.json")
    with pytest.raises(OSError, match=r"out/trainer_state.json: is a symbolic link where this program writes its own file"):
        run(tiny_world, tmp_path / "out", "--max_steps", "1", "--save_strategy", "no")
    assert outside.read_text() == "precious\n" and not (tmp_path / "out" / "projector.safetensors").exists()


def test_a_kill_after_the_new_manifest_but_before_the_swap_resumes_from_the_previous_checkpoint(tiny_world, tmp_path):
    out = tmp_path / "out"
    old = resave_killed_at(tiny_world, out, "checkpoint-publish")
    assert checkpoint.verify(out / "checkpoint-2")["files"] == old  # untouched: the swap had not begun
    run(tiny_world, out, "--max_steps", "3", "--save_strategy", "no", "--resume_from_checkpoint", "latest")
    assert checkpoint.verify(out / "checkpoint-2")["files"] == old and not list(out.glob("tmp-*"))
