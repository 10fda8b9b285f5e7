"""The settings resolver (revision/settings.py): one frozen Settings from the arguments, the checkpoint continued and
the store; every refusal there; each default written once (revision/defaults.py) and taken from there by train.py's
flags, RevisionConfig, data_utils.py and the launchers."""
import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from demo.tiny.lm import make_tiny_training_world
from revision import defaults
from revision.align import make_alignment
from revision.arguments import ModelArguments, TrainingArguments, installed_spelling, parse_args
from revision.data import InputError
from revision.model import RevisionConfig
from revision.settings import Settings, resolve
from revision.store import EmbeddingStore
from revision.train import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_tiny_training_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def stage1(world, tmp_path_factory):
    """A stage-1 folder as far as the resolver reads one: its revision_config.json (linear projector, 3 visual tokens,
    2 projector tokens) and the alignment it records."""
    folder = tmp_path_factory.mktemp("stage1")
    stats = make_alignment("mean_shift").fit(EmbeddingStore(world["text"][0]), EmbeddingStore(world["image"][0]))
    stats.save(folder / "align_stats.json")
    RevisionConfig(embed_dim=16, hidden_size=32, projector_type="linear", projector_tokens=2, num_visual_tokens=3,
                   template="plain", encoder="tiny/random-prototypes", base_model=world["model"], llm_weights="base",
                   alignment="align_stats.json").save(folder)
    return folder


def argv(world, tmp_path, stage="pretrain", *extra):
    store, data = world["text" if stage == "pretrain" else "image"]
    return ["--model_name_or_path", world["model"], "--data_path", data, "--embed_folder", store,
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra]


def settle(*args):
    return resolve(*parse_args(list(args)))


def test_settings_are_frozen_and_the_arguments_are_left_as_parsed(world, stage1, tmp_path):
    parsed = parse_args(argv(world, tmp_path, "finetune", "--pretrain_mm_mlp_adapter", str(stage1)))
    before = [copy.deepcopy(parsed[0]), copy.deepcopy(parsed[1]), parsed[2].to_dict()]
    settings = resolve(*parsed)
    assert [parsed[0], parsed[1], parsed[2].to_dict()] == before  # nothing filled in: the Settings hold it
    assert parsed[0].num_visual_tokens is None and settings.num_visual_tokens == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.num_visual_tokens = 576
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.store.kind = "text"
    assert settings.training is parsed[2]  # HF's arguments go to the Trainer as they were parsed


def test_a_run_with_nothing_to_inherit_takes_the_defaults_and_the_stores_alignment(world, tmp_path):
    settings = settle(*argv(world, tmp_path, "pretrain", "--model_max_length", "600"))
    assert (settings.num_visual_tokens, settings.projector_type, settings.projector_tokens, settings.template) == (
        defaults.NUM_VISUAL_TOKENS, defaults.PROJECTOR_TYPE, defaults.PROJECTOR_TOKENS, defaults.TEMPLATE)
    assert settings.model_max_length == 600 and settings.store.kind == "text" and settings.store.dim == 16
    assert not settings.continues_model and settings.adapter is None and settings.projector_only is False
    assert (settings.noise_std, settings.noise_source, settings.align_stats) == (0.0, "default: none", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's choice")
def test_training_on_cpu_takes_eager_attention_for_short_rows_and_the_flag_over_it(world, tmp_path):
    tokens = ("--num_visual_tokens", "3")
    assert settle(*argv(world, tmp_path, "pretrain", "--model_max_length", "512", *tokens)).attn_implementation == "eager"
    assert settle(*argv(world, tmp_path, "pretrain", "--model_max_length", "600", *tokens)).attn_implementation == "sdpa"
    given = settle(*argv(world, tmp_path, "pretrain", "--model_max_length", "128", *tokens, "--attn_implementation", "sdpa"))
    assert given.attn_implementation == "sdpa"


def test_stage2_inherits_the_stage1_folder(world, stage1, tmp_path):
    settings = settle(*argv(world, tmp_path, "finetune", "--pretrain_mm_mlp_adapter", str(stage1)))
    assert (settings.projector_type, settings.num_visual_tokens, settings.projector_tokens) == ("linear", 3, 2)
    assert settings.align_stats == str(stage1 / "align_stats.json") and settings.adapter == str(stage1)
    assert settings.noise_source == "default: none on real image embeddings"
    # a ReVision checkpoint as --model_name_or_path is continued the same way
    shutil.copytree(world["model"], tmp_path / "ckpt")
    shutil.copy(stage1 / "align_stats.json", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "revision_config.json").write_text((stage1 / "revision_config.json").read_text())
    settings = settle(*argv(world, tmp_path, "finetune", "--model_name_or_path", str(tmp_path / "ckpt")))
    assert settings.continues_model and (settings.projector_type, settings.num_visual_tokens) == ("linear", 3)


def test_a_flag_that_contradicts_stage1_is_refused_naming_both(world, stage1, tmp_path, caplog):
    adapter = ["--pretrain_mm_mlp_adapter", str(stage1)]
    where = re.escape(str(stage1 / "revision_config.json"))
    with pytest.raises(InputError, match=f"^--mm_projector_type mlp2x_gelu contradicts projector_type linear recorded in "
                                         f"{where}; drop the flag to continue that projector$"):
        settle(*argv(world, tmp_path, "finetune", *adapter, "--mm_projector_type", "mlp2x_gelu"))
    with pytest.raises(InputError, match=f"^--mm_projector_tokens 1 contradicts projector_tokens 2 recorded in {where}"):
        settle(*argv(world, tmp_path, "finetune", *adapter, "--mm_projector_tokens", "1"))
    settings = settle(*argv(world, tmp_path, "finetune", *adapter, "--num_visual_tokens", "5"))  # may differ: warned
    assert settings.num_visual_tokens == 5 and "--num_visual_tokens 5 differs from num_visual_tokens 3" in caplog.text


def test_a_contradicting_flag_is_one_line_from_main(world, stage1, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv(world, tmp_path, "finetune", "--pretrain_mm_mlp_adapter", str(stage1), "--mm_projector_type", "linear",
                  "--mm_projector_tokens", "3"))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --mm_projector_tokens 3 contradicts projector_tokens 2 recorded in "
                      f"{stage1 / 'revision_config.json'}; drop the flag to continue that projector"]


def test_refusals_come_before_anything_is_loaded(world, tmp_path):
    with pytest.raises(InputError, match="model_max_length 100 leaves no room for text"):
        settle(*argv(world, tmp_path, "pretrain", "--model_max_length", "100"))  # the default 576 visual tokens
    with pytest.raises(InputError, match=r"^--weight_decay -1.0: expected a finite number >= 0$"):
        settle(*argv(world, tmp_path, "pretrain", "--weight_decay", "-1", "--num_visual_tokens", "2"))
    with pytest.raises(InputError, match="--data_path is required"):
        settle("--model_name_or_path", world["model"], "--output_dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_training_the_llms_top_layers_is_one_choice_of_what_trains(world, tmp_path):
    tokens = ("--num_visual_tokens", "3")
    assert settle(*argv(world, tmp_path, "finetune", *tokens, "--tune_llm_top_layers", "2")).tune_llm_top_layers == 2
    for other in (("--tune_mm_mlp_adapter",), ("--lora_enable", "true")):
        with pytest.raises(InputError, match=f"^--tune_llm_top_layers trains part of the LLM; {other[0]} says what trains"):
            settle(*argv(world, tmp_path, "finetune", *tokens, "--tune_llm_top_layers", "2", *other))
    with pytest.raises(InputError, match="^--tune_llm_top_layers 0: expected at least 1 layer$"):
        settle(*argv(world, tmp_path, "finetune", *tokens, "--tune_llm_top_layers", "0"))


def test_the_default_visual_tokens_are_written_once():
    """576 appears in the library only in revision/defaults.py; launchers and data_utils.py hold no default value."""
    literal = re.compile(r"\b576\b")
    holders = [p.relative_to(REPO) for p in (REPO / "revision").rglob("*.py") if literal.search(p.read_text())]
    assert holders == [Path("revision/defaults.py")]
    for path in [REPO / "data_utils.py", REPO / "train.py", *(REPO / "script" / "train").glob("*.sh")]:
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
        for value in ("576", "129", "2048", "mlp2x_gelu"):
            assert not re.search(rf"\b{value}\b", code), f"{path.name} writes the default {value} itself"


def test_the_schema_model_config_and_data_utils_take_their_defaults_from_one_place():
    visual = next(f for f in dataclasses.fields(ModelArguments) if f.name == "num_visual_tokens")
    assert ModelArguments().version == defaults.TEMPLATE and "else 576)" in visual.metadata["help"]
    assert next(f for f in dataclasses.fields(TrainingArguments) if f.name == "model_max_length").default == defaults.MODEL_MAX_LENGTH
    config = RevisionConfig(embed_dim=1, hidden_size=1)
    assert (config.num_visual_tokens, config.projector_type, config.projector_tokens, config.template) == (
        defaults.NUM_VISUAL_TOKENS, defaults.PROJECTOR_TYPE, defaults.PROJECTOR_TOKENS, defaults.TEMPLATE)
    sys.path.insert(0, str(REPO))
    try:
        import data_utils
    finally:
        sys.path.remove(str(REPO))
    args = data_utils.build_parser().parse_args(["--data_path", "d.json", "--model_name_or_path", "m", "--embed_folder", "s"])
    assert (args.num_visual_tokens, args.model_max_length, args.version) == (
        defaults.NUM_VISUAL_TOKENS, defaults.MODEL_MAX_LENGTH, defaults.TEMPLATE)
    assert args.skip_missing is False and data_utils.build_parser().parse_args(
        ["--data_path", "d", "--model_name_or_path", "m", "--skip_missing"]).skip_missing is True


def test_the_launchers_take_their_defaults_from_revision_defaults(tmp_path):
    """A copy of the launchers beside an edited revision/defaults.py passes the edited values."""
    (tmp_path / "script").mkdir()
    shutil.copytree(REPO / "script" / "train", tmp_path / "script" / "train")
    (tmp_path / "revision").mkdir()
    source = (REPO / "revision" / "defaults.py").read_text()
    edited = source
    for pattern, value in ((r"^NUM_VISUAL_TOKENS = \d+", "NUM_VISUAL_TOKENS = 7"),
                           (r'^PROJECTOR_TYPE = "[^"]+"', 'PROJECTOR_TYPE = "mlp3x_gelu"'),
                           (r"^MODEL_MAX_LENGTH = \d+", "MODEL_MAX_LENGTH = 99"),
                           (r'^INSTRUCT_TEMPLATE = "[^"]+"', 'INSTRUCT_TEMPLATE = "vicuna"')):
        edited, count = re.subn(pattern, value, edited, flags=re.M)
        assert count == 1, pattern
    (tmp_path / "revision" / "defaults.py").write_text(edited)
    env = {k: v for k, v in os.environ.items() if k not in ("PRESET", "EXTRA", "VISUAL_TOKENS", "MAX_LENGTH", "VERSION")}
    env.update(PY=sys.executable, DRY_RUN="1", GPUS="0", MODEL="m", DATA="d.json", EMBED_FOLDER="s")

    def flags(script: str) -> dict[str, str]:
        done = subprocess.run(["bash", str(tmp_path / "script" / "train" / script)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        command = json.loads(done.stdout.strip().splitlines()[-1])
        return {a: b for a, b in zip(command, command[1:]) if a.startswith("--")}

    stage1, stage2 = flags("pretrain.sh"), flags("finetune_full.sh")
    assert (stage1["--num_visual_tokens"], stage1["--mm_projector_type"], stage1["--model_max_length"]) == ("7", "mlp3x_gelu", "99")
    assert (stage2["--version"], stage2["--model_max_length"]) == ("vicuna", "99") and "--num_visual_tokens" not in stage2


def test_shell_assignments_are_the_values():
    lines = dict(line.split("=", 1) for line in defaults.shell_assignments().splitlines())
    assert lines["DEFAULT_VISUAL_TOKENS"] == str(defaults.NUM_VISUAL_TOKENS)
    assert lines["DEFAULT_MAX_LENGTH"] == str(defaults.MODEL_MAX_LENGTH) and lines["DEFAULT_PROJECTOR"] == defaults.PROJECTOR_TYPE
    assert Settings.__dataclass_params__.frozen


def test_the_launchers_checkpointing_flag_is_spelled_as_the_installed_transformers_knows_it(tmp_path):
    """The GPU launchers pass --activation_checkpointing; transformers 5.17 (an H200 image's) knows only
    --gradient_checkpointing and stopped there ("arguments are not used by the HfArgumentParser")."""
    before = {"gradient_checkpointing", "gradient_checkpointing_kwargs", "bf16"}  # 5.17's fields (those that matter)
    after = before | {"activation_checkpointing", "activation_checkpointing_kwargs"}
    argv = ["--activation_checkpointing", "true", "--activation_checkpointing_kwargs={}", "--bf16", "true", "--x=1"]
    assert installed_spelling(argv, before) == ["--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs={}",
                                                "--bf16", "true", "--x=1"]
    assert installed_spelling(argv, after) == argv
    assert installed_spelling(["--gradient_checkpointing"], after) == ["--gradient_checkpointing"]  # the old name stays
    _, _, training = parse_args(["--output_dir", str(tmp_path), "--activation_checkpointing", "true"])
    assert training.gradient_checkpointing is True
