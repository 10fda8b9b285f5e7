"""The launchers (script/train/*.sh): every default in README's tables is what they pass to train.py (DRY_RUN=1
prints the command as JSON), the paper preset, the global batch on other GPU counts."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo import pipeline, prepare, runner

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"stage 1": "pretrain.sh", "stage 2": "finetune_full.sh", "stage 2 LoRA": "finetune_lora.sh"}
USER = {"MODEL": "my-llm", "DATA": "data.json", "EMBED_FOLDER": "store"}  # no toy world in dry runs


def launch(script: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PRESET", "EXTRA", "BATCH", "LR", "VISUAL_TOKENS")}
    return subprocess.run(["bash", str(REPO / "script" / "train" / script)], env={**base, **env},
                          capture_output=True, text=True, timeout=timeout)


def dry_run(script: str, **env: str) -> list[str]:
    done = launch(script, DRY_RUN="1", **env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs of a command line (a flag followed by another flag has the value None)."""
    flags = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            following = argv[i + 1] if i + 1 < len(argv) else None
            flags[arg] = None if following is None or following.startswith("--") else following
    return flags


def readme_table(marker: str) -> list[dict[str, str]]:
    """The rows of the README table between <!-- MARKER:begin --> and <!-- MARKER:end -->."""
    text = (REPO / "README.md").read_text()
    body = text.split(f"<!-- {marker}:begin -->")[1].split(f"<!-- {marker}:end -->")[0]
    lines = [line for line in body.strip().splitlines() if line.startswith("|")]
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    header = cells[0]
    return [dict(zip(header, row)) for row in cells[2:]]


def expected(cell: str) -> str | None:
    """A table cell's value: its first word without backticks; — means the flag is not passed."""
    value = cell.split()[0].strip("`")
    return None if value == "—" else value


def same(actual: str | None, wanted: str | None) -> bool:
    try:
        return float(actual) == float(wanted)
    except (TypeError, ValueError):
        return actual == wanted


def check_table(marker: str, **env: str) -> int:
    rows = [r for r in readme_table(marker) if r["`train.py` flag"].strip("`").startswith("--")]
    assert len(rows) >= 2
    for column, script in SCRIPTS.items():
        flags = flag_values(dry_run(script, GPUS="8", **env))
        for row in rows:
            flag, wanted = row["`train.py` flag"].strip("`"), expected(row[column])
            if wanted is None:
                assert flag not in flags, f"{script} passes {flag} {flags[flag]}; README says it does not"
            else:
                assert flag in flags and same(flags[flag], wanted), \
                    f"{script}: {flag} is {flags.get(flag)!r}, README's table says {wanted!r} ({row['source'][:60]})"
    return len(rows)


def test_every_default_is_the_readme_tables():
    assert check_table("launcher-defaults", **USER) >= 20


def test_paper_preset_is_the_readme_tables():
    env = {k: v for k, v in USER.items() if k != "MODEL"}
    assert check_table("launcher-paper", PRESET="paper", **env) == 2


def test_paper_preset_keeps_every_default_it_does_not_name():
    env = {k: v for k, v in USER.items() if k != "MODEL"}
    overridden = {r["`train.py` flag"].strip("`") for r in readme_table("launcher-paper")}
    for script in SCRIPTS.values():
        plain, paper = flag_values(dry_run(script, GPUS="8", **USER)), flag_values(dry_run(script, GPUS="8", PRESET="paper", **env))
        assert {k: v for k, v in plain.items() if k not in overridden} == {k: v for k, v in paper.items() if k not in overridden}


def test_global_batch_is_kept_on_other_gpu_counts():
    for gpus, accumulation in (("4", "8"), ("16", "2"), ("0", "32")):  # 0: one CPU process
        flags = flag_values(dry_run("pretrain.sh", GPUS=gpus, **USER))
        assert (flags["--per_device_train_batch_size"], flags["--gradient_accumulation_steps"]) == ("8", accumulation)
    uneven = launch("finetune_full.sh", GPUS="3", DRY_RUN="1", **USER)
    assert uneven.returncode == 0 and "global batch is 240" in uneven.stderr  # 16 x 3 x 5


def test_bad_presets_and_the_paper_preset_without_a_gpu_stop():
    unknown = launch("pretrain.sh", PRESET="papr", DRY_RUN="1", **USER)
    assert unknown.returncode == 2 and "unknown PRESET=papr" in unknown.stderr
    cpu = launch("pretrain.sh", PRESET="paper", GPUS="0", DATA="data.json", EMBED_FOLDER="store")
    assert cpu.returncode == 2 and "no GPU found" in cpu.stderr


def test_paper_preset_warns_about_another_encoder(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"encoder": "hf:openai/clip-vit-large-patch14-336"}))
    done = launch("pretrain.sh", PRESET="paper", GPUS="8", DRY_RUN="1", DATA="d.json", EMBED_FOLDER=str(tmp_path))
    assert done.returncode == 0 and "not encoded with LLM2CLIP" in done.stderr
    (tmp_path / "manifest.json").write_text(json.dumps({"encoder": "llm2clip:microsoft/LLM2CLIP-Openai-L-14-336"}))
    done = launch("pretrain.sh", PRESET="paper", GPUS="8", DRY_RUN="1", DATA="d.json", EMBED_FOLDER=str(tmp_path))
    assert done.returncode == 0 and "LLM2CLIP" not in done.stderr


def test_stage2_passes_tokens_projector_and_alignment_only_when_set():
    inherit = flag_values(dry_run("finetune_full.sh", GPUS="0", PRETRAIN_ADAPTER="stage1", **USER))
    assert inherit["--pretrain_mm_mlp_adapter"] == "stage1"
    assert not {"--num_visual_tokens", "--mm_projector_type", "--align_stats"} & set(inherit)  # train.py reads stage 1's
    told = flag_values(dry_run("finetune_full.sh", GPUS="0", VISUAL_TOKENS="64", PROJECTOR="linear", ALIGN_STATS="a.json", **USER))
    assert (told["--num_visual_tokens"], told["--mm_projector_type"], told["--align_stats"]) == ("64", "linear", "a.json")


def test_extra_is_split_like_a_shell_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    argv = dry_run("pretrain.sh", GPUS="0", EXTRA=f"--run_name \"toy run\" --seed 3 --note '$(touch {marker})'", **USER)
    assert argv[-6:] == ["--run_name", "toy run", "--seed", "3", "--note", f"$(touch {marker})"]
    assert not marker.exists()
    broken = launch("pretrain.sh", GPUS="0", DRY_RUN="1", EXTRA='--run_name "toy run', **USER)
    assert broken.returncode == 2 and "not a shell word list: No closing quotation" in broken.stderr


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    """The launchers' default world in miniature, prepared in this process; the commands it ran."""
    out, commands = tmp_path_factory.mktemp("default"), []
    real_popen = runner.subprocess.Popen  # every command-line stage starts through it

    def recording_popen(cmd, *args, **kwargs):
        commands.append(list(cmd))
        return real_popen(cmd, *args, **kwargs)

    runner.subprocess.Popen = recording_popen
    try:
        prepare.main(["--out", str(out), "--preset", "mini", "--repo", str(REPO)])
    finally:
        runner.subprocess.Popen = real_popen
    return out, commands


def test_prepare_builds_the_default_world_without_a_launcher(default_world):
    out, commands = default_world
    scripts = [next(a for a in cmd if a.endswith((".py", ".sh"))) for cmd in commands]
    assert scripts == ["embed_mean.py"]  # the world, CLIP, LLM and image_embed.py's main run in-process
    for path in ("world/pretrain.json", "world/instruct.json", "llm/config.json", "embeds/unpaired/image/manifest.json",
                 "align/realign/align_stats.json"):
        assert (out / path).is_file(), path


@pytest.mark.parametrize("main", [pipeline.main, prepare.main], ids=["pipeline", "prepare"])
def test_a_folder_that_is_not_a_checkout_is_refused_before_any_stage(main, tmp_path, capsys):
    """The demo runs a checkout's scripts: outside one (no script/train/pretrain.sh, ...) it says so up front."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--preset", "mini", "--repo", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not a ReVision checkout" in err and "script/train/pretrain.sh" in err and "--repo" in err
    assert not (tmp_path / "out").exists()  # nothing was built


def test_launcher_trains_on_the_prepared_world_with_a_quoted_extra(default_world):
    out, _ = default_world
    done = launch("pretrain.sh", timeout=600, GPUS="0", PY=sys.executable, DEFAULT_DIR=str(out), TOY_PRESET="mini", MAX_LENGTH="64",
                  EXTRA='--max_steps 1 --disable_tqdm true --run_name "toy run"', OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cached" in done.stderr  # prepare found every step done: nothing rebuilt
    args = torch.load(out / "pretrain" / "training_args.bin", weights_only=False)
    assert args.run_name == "toy run" and args.max_steps == 1
    config = json.loads((out / "pretrain" / "revision_config.json").read_text())  # stage 1: plain template, LLM frozen
    assert (config["template"], config["llm_weights"]) == ("plain", "base")
