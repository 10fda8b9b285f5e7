"""Training stages through HF Trainer: what trains, what is saved, resuming, DeepSpeed, start-up errors."""
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_pt_utils import LengthGroupedSampler

from demo.tiny.lm import make_tiny_corpus, tiny_embeddings
from revision.align import make_alignment
from revision.build import top_decoder_modules
from revision.checkpoint import check_resumable, weights_only_loads, write_manifest
from revision.data import InputError, SupervisedDataset
from revision.model import IMAGE_TOKEN_INDEX, RevisionModel
from revision.shards import Shard, write_reference_shard
from revision.store import EmbeddingStore
from revision.store_writer import write_store
from revision.train import TrainingDivergedError, parse_args, train

VISUAL = 2
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def flags(tiny_world, out, stage, *extra):
    store, data = tiny_world["text" if stage == "pretrain" else "image"]
    base = ["--model_name_or_path", tiny_world["model"], "--data_path", data, "--embed_folder", store, "--output_dir", str(out),
            "--num_visual_tokens", str(VISUAL), "--model_max_length", "48", "--per_device_train_batch_size", "8",
            "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--save_strategy", "no",
            "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--seed", "0"]
    base += ["--tune_mm_mlp_adapter", "--version", "plain"] if stage == "pretrain" else ["--version", "chat"]
    return base + list(extra)


def run(tiny_world, out, stage, *extra):
    return train(*parse_args(flags(tiny_world, out, stage, *extra)))


def losses(trainer, after_step=0):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and h["step"] > after_step]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_stage1_trains_only_the_projector(tiny_world, tmp_path):
    trainer = run(tiny_world, tmp_path / "s1", "pretrain", "--max_steps", "6", "--learning_rate", "1e-2",
                  "--gradient_checkpointing")
    model = trainer.model
    initial = RevisionModel.from_llm(tiny_world["model"], 16, num_visual_tokens=VISUAL)
    for name, value in initial.llm.state_dict().items():
        assert torch.equal(value, model.llm.state_dict()[name]), f"LLM weight {name} changed in stage 1"
    assert not torch.equal(model.projector[0].weight, initial.projector[0].weight)
    saved = sorted(p.name for p in (tmp_path / "s1").iterdir())
    assert "projector.safetensors" in saved and "model.safetensors" not in saved
    loaded = RevisionModel.from_pretrained(tmp_path / "s1")
    assert loaded.revision_config.llm_weights == "base" and torch.equal(loaded.projector[2].bias, model.projector[2].bias)


@pytest.mark.parametrize("mode", ["full", "lora", "top"])
def test_stage2_trains_the_right_sets(tiny_world, tmp_path, mode):
    s1 = run(tiny_world, tmp_path / "s1", "pretrain", "--max_steps", "2", "--learning_rate", "1e-2")
    stage1_projector = snapshot(s1.model.projector)
    extra = {"full": [], "lora": ["--lora_enable", "--lora_r", "4"], "top": ["--tune_llm_top_layers", "1"]}[mode]
    trainer = run(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "3", "--learning_rate", "1e-2",
                  "--pretrain_mm_mlp_adapter", str(tmp_path / "s1" / "projector.safetensors"), *extra)
    model, initial = trainer.model, RevisionModel.from_llm(tiny_world["model"], 16).llm.state_dict()
    assert not torch.equal(model.projector[0].weight, stage1_projector["0.weight"])
    llm = model.llm.get_base_model() if mode == "lora" else model.llm
    changed = {name for name, value in llm.state_dict().items()
               if name.replace(".base_layer", "") in initial and not torch.equal(value, initial[name.replace(".base_layer", "")])}
    if mode == "full":
        assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"} <= changed
        assert (tmp_path / "s2" / "model.safetensors").exists()
    elif mode == "top":  # the last decoder layer and the final norm; the embeddings, head (and any lower layer) as they were
        last = f"model.layers.{len(llm.model.layers) - 1}."
        assert {f"{last}mlp.up_proj.weight", f"{last}self_attn.q_proj.weight"} <= changed
        assert {n for n in changed if not n.startswith(last)} <= {"model.norm.weight"}  # not embed_tokens, not lm_head
        assert (tmp_path / "s2" / "model.safetensors").exists()
        with pytest.raises(ValueError, match=f"--tune_llm_top_layers 99: the LLM has {len(llm.model.layers)} decoder layers"):
            top_decoder_modules(llm, 99)
    else:
        assert changed == set(), f"LoRA changed base weights {sorted(changed)[:3]}"
        lora_b = [v for k, v in llm.state_dict().items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero, so nonzero means trained
        assert (tmp_path / "s2" / "adapter_model.safetensors").exists()
    reloaded = RevisionModel.from_pretrained(tmp_path / "s2")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch.pop("sample_index").tolist() == [0, 1, 2]  # the trainer's NaN guard names the batch's ids with it
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(**batch).logits, model.eval()(**batch).logits, atol=1e-5)


def test_the_top_layers_are_the_last_ones_and_the_final_norm():
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=3,
                                       num_attention_heads=2, num_key_value_heads=2))
    layers = llm.model.layers
    assert top_decoder_modules(llm, 2) == [layers[1], layers[2], llm.model.norm]
    assert top_decoder_modules(llm, 3)[:3] == list(layers)
    with pytest.raises(ValueError, match="--tune_llm_top_layers 0: the LLM has 3 decoder layers"):
        top_decoder_modules(llm, 0)


def test_loss_decreases_on_a_learnable_task(tiny_world, tmp_path):
    stats = make_alignment("mean_shift").fit(EmbeddingStore(tiny_world["text"][0]), EmbeddingStore(tiny_world["image"][0]))
    stats.save(tmp_path / "align_stats.json")
    trainer = run(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "40", "--learning_rate", "3e-3",
                  "--align_stats", str(tmp_path / "align_stats.json"))
    curve = losses(trainer)
    assert sum(curve[-5:]) / 5 < 0.6 * sum(curve[:5]) / 5, curve
    # the image_map the data used travels with the checkpoint
    loaded = RevisionModel.from_pretrained(tmp_path / "s2")
    row = EmbeddingStore(tiny_world["image"][0]).load_all().embeds[:1]
    assert loaded.revision_config.alignment == "align_stats.json"
    assert np.allclose(loaded.image_map(row), stats.image_map(row))
    assert torch.allclose(trainer.train_dataset[0]["image_embeds"], torch.from_numpy(stats.image_map(row)[0]), atol=1e-6)


def test_system_prompt_is_trained_saved_and_inherited(tiny_world, tmp_path):
    """--system_prompt goes into every training sample, into the checkpoint (inference renders the same), and into
    a run that continues that checkpoint without the flag."""
    trainer = run(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "1", "--system_prompt", "")
    tokenizer = trainer.train_dataset.tokenizer
    system = tokenizer.convert_tokens_to_ids("<|system|>")
    assert int((trainer.train_dataset[0]["input_ids"] == system).sum()) == 1
    assert RevisionModel.from_pretrained(tmp_path / "s2").revision_config.system_prompt == ""
    flags_again = flags(tiny_world, tmp_path / "s2b", "finetune", "--max_steps", "1")
    flags_again[flags_again.index("--model_name_or_path") + 1] = str(tmp_path / "s2")
    continued = train(*parse_args(flags_again))
    assert continued.model.revision_config.system_prompt == "" and continued.train_dataset.system_prompt == ""
    plain = run(tiny_world, tmp_path / "s2c", "finetune", "--max_steps", "1")  # unset: the template's own (none here)
    assert int((plain.train_dataset[0]["input_ids"] == system).sum()) == 0 and plain.model.revision_config.system_prompt is None


def test_split_turns_and_image_placement_train_and_are_saved_for_inference(tiny_world, tmp_path):
    """--split_turns: one sample per question (the tiny world's conversations ask two); --image_placement is saved in
    the checkpoint, so Predictor asks as training did, and a run continuing it places the image the same way."""
    whole = run(tiny_world, tmp_path / "s2a", "finetune", "--max_steps", "1")
    split = run(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "1", "--split_turns", "true",
                "--image_placement", "last")
    images = int((whole.train_dataset.rows >= 0).sum())
    assert len(split.train_dataset) == len(whole.train_dataset) + images
    assert RevisionModel.from_pretrained(tmp_path / "s2").revision_config.image_placement == "last"
    assert whole.model.revision_config.image_placement is None
    flags_again = flags(tiny_world, tmp_path / "s2b", "finetune", "--max_steps", "1")
    flags_again[flags_again.index("--model_name_or_path") + 1] = str(tmp_path / "s2")
    continued = train(*parse_args(flags_again))
    assert continued.model.revision_config.image_placement == "last"
    assert len(continued.train_dataset) == len(whole.train_dataset)  # splitting is this run's data option only
    ids = continued.train_dataset[0]["input_ids"]
    assert "?" in continued.train_dataset.tokenizer.decode(ids[: int(torch.nonzero(ids == IMAGE_TOKEN_INDEX)[0])])
    with pytest.raises(InputError, match="--image_placement 'middle': choose from first, last"):
        run(tiny_world, tmp_path / "s2c", "finetune", "--max_steps", "1", "--image_placement", "middle")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_resume_gives_the_same_losses(tiny_world, tmp_path, stage):
    common = ["--max_steps", "12", "--learning_rate", "1e-2", "--embed_noise_std", "0.05"]
    full = run(tiny_world, tmp_path / "full", stage, *common, "--save_strategy", "steps", "--save_steps", "6")
    checkpoint = tmp_path / "full" / "checkpoint-6"
    assert (checkpoint / "projector.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    resumed = run(tiny_world, tmp_path / "resumed", stage, *common, "--resume_from_checkpoint", str(checkpoint))
    assert len(losses(resumed, after_step=6)) == 6  # the history up to step 6 comes from the checkpoint
    assert losses(resumed, after_step=6) == pytest.approx(losses(full, after_step=6), rel=1e-5)


def test_same_seed_gives_the_same_losses(tiny_world, tmp_path):
    # projector init, noise and data order all come from --seed: two runs agree step by step, another seed does not
    common = ["--max_steps", "4", "--learning_rate", "1e-2", "--embed_noise_std", "0.05"]
    first, second = (losses(run(tiny_world, tmp_path / name, "pretrain", *common)) for name in ("a", "b"))
    other = losses(run(tiny_world, tmp_path / "c", "pretrain", *common, "--seed", "1"))
    assert len(first) == 4 and first == second
    assert other[0] != first[0]


def fitted(tiny_world, method, path):
    stats = make_alignment(method).fit(EmbeddingStore(tiny_world["text"][0]), EmbeddingStore(tiny_world["image"][0]))
    stats.save(path)
    return stats


def without_visual_tokens(args):
    i = args.index("--num_visual_tokens")
    return args[:i] + args[i + 2:]


def first_image_sample(tiny_world, trainer):
    """The first training sample's image embedding and the raw store row it came from."""
    row = EmbeddingStore(tiny_world["image"][0]).load_all().embeds[:1]
    return trainer.train_dataset[0]["image_embeds"].numpy(), row


@pytest.fixture(scope="module")
def stage1(tiny_world, tmp_path_factory):
    """A stage-1 folder with a linear projector, 3 visual tokens and ReAlign statistics."""
    root = tmp_path_factory.mktemp("stage1")
    stats = fitted(tiny_world, "realign", root / "realign.json")
    run(tiny_world, root / "s1", "pretrain", "--max_steps", "1", "--mm_projector_type", "linear", "--num_visual_tokens", "3",
        "--align_stats", str(root / "realign.json"))
    return root / "s1", stats


def test_stage2_inherits_the_stage1_folder(tiny_world, stage1, tmp_path):
    folder, stats = stage1
    args = without_visual_tokens(flags(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "1", "--learning_rate", "1e-2",
                                       "--pretrain_mm_mlp_adapter", str(folder)))
    trainer = train(*parse_args(args))  # no projector type, visual tokens or alignment given
    model = trainer.model
    assert model.revision_config.projector_type == "linear" and [type(m).__name__ for m in model.projector] == ["Linear"]
    assert int((trainer.train_dataset[0]["input_ids"] == IMAGE_TOKEN_INDEX).sum()) == 3
    embeds, row = first_image_sample(tiny_world, trainer)
    assert np.allclose(embeds, stats.image_map(row)[0], atol=1e-6)
    saved = RevisionModel.from_pretrained(tmp_path / "s2")
    assert saved.alignment.method == "realign" and saved.revision_config.num_visual_tokens == 3
    assert saved.alignment.to_dict()["mu_hat"] == stats.to_dict()["mu_hat"]


def test_stage1_records_its_text_stores_alignment_for_stage2(tiny_world, tmp_path):
    # embed_mean.py's aligned store names its statistics: stage 1 records them, stage 2 applies their image_map
    stats = fitted(tiny_world, "mean_shift", tmp_path / "stats.json")
    captions, embeds = tiny_embeddings(64, 16)
    aligned = tmp_path / "aligned"
    write_store(aligned, "text", [f"text{i:06d}" for i in range(64)], stats.text_map(embeds), captions,
                encoder="tiny/random-prototypes", dtype="float32", extra={"alignment": "align_stats.json"})
    stats.save(aligned / "align_stats.json")
    run(tiny_world, tmp_path / "s1", "pretrain", "--max_steps", "1", "--embed_folder", str(aligned))
    assert json.loads((tmp_path / "s1" / "revision_config.json").read_text())["alignment"] == "align_stats.json"
    trainer = run(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "1", "--pretrain_mm_mlp_adapter", str(tmp_path / "s1"))
    embeds, row = first_image_sample(tiny_world, trainer)
    assert np.allclose(embeds, stats.image_map(row)[0], atol=1e-6)
    assert not np.allclose(embeds, row[0] / np.linalg.norm(row[0]), atol=1e-3)  # centred: not plain normalisation


def test_stage2_flags_that_contradict_the_stage1_folder(tiny_world, stage1, tmp_path, caplog):
    folder, _ = stage1
    adapter = ["--pretrain_mm_mlp_adapter", str(folder)]
    with pytest.raises(ValueError, match="--mm_projector_type mlp2x_gelu contradicts projector_type linear recorded in "
                                         + re.escape(str(folder / "revision_config.json"))):
        run(tiny_world, tmp_path / "a", "finetune", *adapter, "--mm_projector_type", "mlp2x_gelu")
    fitted(tiny_world, "mean_shift", tmp_path / "mean_shift.json")
    with pytest.raises(ValueError, match=re.escape(f"--align_stats {tmp_path / 'mean_shift.json'} (method mean_shift) "
                                                   f"contradicts the alignment {folder / 'align_stats.json'} (method realign)")):
        run(tiny_world, tmp_path / "b", "finetune", *adapter, "--align_stats", str(tmp_path / "mean_shift.json"))
    # a projector file inherits nothing (as before): the default mlp2x_gelu does not fit these linear weights
    with pytest.raises(ValueError, match="projector.safetensors: these projector weights do not fit a mlp2x_gelu projector "
                                         "16 -> 32"):
        run(tiny_world, tmp_path / "d", "finetune", "--pretrain_mm_mlp_adapter", str(folder / "projector.safetensors"))
    fitted(tiny_world, "realign", tmp_path / "same.json")  # the same statistics again: agrees
    with caplog.at_level("WARNING", logger="revision.model"):
        trainer = run(tiny_world, tmp_path / "c", "finetune", *adapter, "--align_stats", str(tmp_path / "same.json"),
                      "--max_steps", "1", "--num_visual_tokens", "2")  # may differ: warned
    assert "--num_visual_tokens 2 differs from num_visual_tokens 3" in caplog.text
    assert trainer.model.revision_config.num_visual_tokens == 2


def test_projector_lr_and_length_grouping(tiny_world, tmp_path):
    trainer = run(tiny_world, tmp_path / "s2", "finetune", "--max_steps", "1", "--learning_rate", "1e-5",
                  "--mm_projector_lr", "2e-4", "--group_by_length", "--weight_decay", "0.1")
    groups = trainer.optimizer.param_groups
    projector = {id(p) for p in trainer.model.projector.parameters()}
    assert {g["initial_lr"] for g in groups if id(g["params"][0]) in projector} == {2e-4}
    assert {g["initial_lr"] for g in groups if id(g["params"][0]) not in projector} == {1e-5}
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU autocast: off a GPU")
def test_bf16_off_a_gpu_trains_under_cpu_autocast_or_says_why_not(tiny_world, tmp_path, monkeypatch):
    import revision.arguments as arguments

    if arguments.cpu_bf16_supported():  # a process of its own: accelerate keeps the first precision a process asks for
        child = ("import json, sys\nfrom revision.train import parse_args, train\n"
                 "for argv in json.loads(sys.argv[1]):\n    t = train(*parse_args(argv))\n"
                 "    trained = [p.dtype for n, p in t.model.llm.named_parameters() if p.requires_grad]\n"
                 "    print('RESULT', t.accelerator.mixed_precision, t.args.use_cpu, next(t.model.llm.parameters()).dtype,"
                 " next(t.model.projector.parameters()).dtype, sorted({str(d) for d in trained}))")
        runs = [flags(tiny_world, tmp_path / "stage1", "pretrain", "--max_steps", "2", "--bf16", "true"),
                flags(tiny_world, tmp_path / "lora", "finetune", "--max_steps", "2", "--bf16", "true", "--lora_enable", "true")]
        done = subprocess.run([sys.executable, "-c", child, json.dumps(runs)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        results = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
        # CPU autocast; the frozen LLM (stage 1) and LoRA's frozen base held in bf16 once; what trains stays fp32
        assert results[0] == "RESULT bf16 True torch.bfloat16 torch.float32 []", done.stdout[-2000:]
        assert results[1] == "RESULT bf16 True torch.bfloat16 torch.float32 ['torch.float32']", done.stdout[-2000:]
        assert (tmp_path / "stage1" / "projector.safetensors").is_file()
    monkeypatch.setattr(arguments, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="no bf16 units"):
        parse_args(flags(tiny_world, tmp_path / "none", "finetune", "--bf16", "true"))


def test_start_up_errors(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="model_max_length 6 leaves no room for text"):
        run(tiny_world, tmp_path / "a", "pretrain", "--model_max_length", "6")
    for flag, value in (("--learning_rate", "nan"), ("--learning_rate", "-1.0"), ("--embed_noise_std", "inf")):
        with pytest.raises(InputError, match=rf"^{flag} {value}: expected a finite number >= 0$"):
            run(tiny_world, tmp_path / "a", "pretrain", flag, value)
    run(tiny_world, tmp_path / "s1", "pretrain", "--max_steps", "1")
    other_store, _ = make_tiny_corpus(tmp_path / "other", "image", n=8, dim=12)
    with pytest.raises(ValueError, match="projector takes dim 16, but the embeddings in .* have dim 12"):
        run(tiny_world, tmp_path / "b", "finetune", "--embed_folder", str(other_store),
            "--pretrain_mm_mlp_adapter", str(tmp_path / "s1"))
    with pytest.raises(ValueError, match="embeddings in .* have dim 12, but the projector takes 16"):
        run(tiny_world, tmp_path / "c", "finetune", "--embed_folder", str(other_store),
            "--model_name_or_path", str(tmp_path / "s1"))


def test_deepspeed_zero2_single_process_on_cpu(tiny_world, tmp_path, free_port):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": free_port, "OMP_NUM_THREADS": "1"}
    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce (a minute of C++) that one process never uses.
    child = ("import importlib, sys; importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None\n"
             "from revision.train import main; main(sys.argv[1:])")
    args = flags(tiny_world, tmp_path / "ds", "finetune", "--max_steps", "3", "--learning_rate", "1e-2",
                 "--deepspeed", str(REPO / "script" / "deepspeed" / "zero2.json"), "--save_strategy", "steps", "--save_steps", "3")
    done = subprocess.run([sys.executable, "-c", child, *args], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "ds" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    model = RevisionModel.from_pretrained(tmp_path / "ds")
    before = RevisionModel.from_llm(tiny_world["model"], 16)
    assert not torch.equal(model.llm.lm_head.weight, before.llm.lm_head.weight)
    assert torch.equal(load_file(str(tmp_path / "ds" / "projector.safetensors"))["0.weight"], model.projector[0].weight)
    # DeepSpeed's own files (global_step3/*.pt, unpickled with weights_only=False at resume) are in the manifest
    check_resumable(tmp_path / "ds" / "checkpoint-3")
    manifest = json.loads((tmp_path / "ds" / "checkpoint-3" / "checkpoint_manifest.json").read_text())["files"]
    assert any(n.startswith("global_step3/") and n.endswith("optim_states.pt") for n in manifest)


def nan_store(tiny_world, root, bad_row=3, n=8):
    """The first n text rows as a reference-layout store (written without row checks), row bad_row NaN, and a
    data file of those n samples."""
    store, data = tiny_world["text"]
    shard = EmbeddingStore(store).load_all()
    embeds = np.array(shard.embeds[:n], np.float32)
    embeds[bad_row, 5] = np.nan
    (root / "nan").mkdir(parents=True)
    write_reference_shard(root / "nan" / "text_embeds_1.pkl", Shard("text", shard.ids[:n], embeds, shard.sources[:n]), "float32")
    (root / "d.json").write_text(json.dumps(json.loads(Path(data).read_text())[:n]))
    return str(root / "nan"), str(root / "d.json")


def test_nan_rows_are_refused_or_skipped_never_trained_on(tiny_world, tmp_path):
    store, data = nan_store(tiny_world, tmp_path)
    with pytest.raises(InputError, match=r"d.json: sample 3 id 'text000003': unusable embedding in .*nan/text_embeds_1.pkl "
                                         r"row 3 \(id 'text000003'\): NaN; pass --skip_bad_embeddings"):
        run(tiny_world, tmp_path / "a", "pretrain", "--embed_folder", store, "--data_path", data, "--max_steps", "2")
    assert not (tmp_path / "a" / "projector.safetensors").exists()
    trainer = run(tiny_world, tmp_path / "b", "pretrain", "--embed_folder", store, "--data_path", data, "--max_steps", "2",
                  "--skip_bad_embeddings")
    assert (len(trainer.train_dataset), trainer.train_dataset.skipped_bad) == (7, 1)
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "b" / "projector.safetensors")).values())
    with torch.no_grad():
        trainer.model.projector[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDivergedError, match=r"step 2: weight projector.0.weight holds NaN / Inf; nothing saved"):
        trainer.save_model(str(tmp_path / "c"))
    assert not (tmp_path / "c" / "projector.safetensors").exists()


def test_training_stops_at_the_first_non_finite_loss(tiny_world, tmp_path, monkeypatch):
    embedding = SupervisedDataset.embedding

    def poisoned(self, row, index):  # a NaN that gets past the data checks (e.g. from a broken image_map)
        vec = embedding(self, row, index)
        return vec * float("nan") if self.ids[index] == "text000005" else vec

    monkeypatch.setattr(SupervisedDataset, "embedding", poisoned)
    _, data = nan_store(tiny_world, tmp_path, bad_row=0)
    clean = [s for s in json.loads(Path(data).read_text()) if s["id"] != "text000000"]
    Path(data).write_text(json.dumps(clean))
    with pytest.raises(TrainingDivergedError, match=r"step 1: the loss is nan on the batch of samples \[.*'text000005'"):
        run(tiny_world, tmp_path / "out", "pretrain", "--data_path", data, "--max_steps", "3",
            "--save_strategy", "steps", "--save_steps", "1")
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "projector.safetensors").exists()


def test_training_stops_at_a_non_finite_gradient_norm(tiny_world, tmp_path, monkeypatch):
    import revision.train as train_module

    build = train_module.build_model

    def with_inf_gradients(*args):  # a finite loss whose backward overflows
        model = build(*args)
        model.projector[0].weight.register_hook(lambda grad: grad * float("inf"))
        return model

    monkeypatch.setattr(train_module, "build_model", with_inf_gradients)
    with pytest.raises(TrainingDivergedError, match=r"step 1: the gradient norm is (inf|nan); stopped before the optimizer step"):
        run(tiny_world, tmp_path / "out", "pretrain", "--max_steps", "2")
    assert not (tmp_path / "out" / "projector.safetensors").exists()


def test_bad_input_prints_one_line_and_exits_2(tiny_world, tmp_path):
    store, data = tiny_world["text"]
    samples = json.loads(Path(data).read_text())[:4]
    files = {"empty.json": b"", "bad.json": b'[{"id": 1,', "latin1.jsonl": b'{"id": "text000001", "caption": "caf\xe9"}\n',
             "ghost.json": json.dumps(samples + [{"id": "ghost", "caption": "a red star"}]).encode(),
             "silent.json": json.dumps([{**s, "conversations": s["conversations"][:1]} for s in samples]).encode()}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    nan_folder, nan_data = nan_store(tiny_world, tmp_path / "nan")
    cases = [  # (flags, what the one line says)
        (["--data_path", str(tmp_path / "empty.json")], "empty.json: empty file (no samples)"),
        (["--data_path", str(tmp_path / "bad.json")], "bad.json:1: not valid JSON"),
        (["--data_path", str(tmp_path / "latin1.jsonl")], "latin1.jsonl:1: not UTF-8 (byte 0xe9"),
        (["--data_path", str(tmp_path / "ghost.json")], "ghost.json: sample 4 id 'ghost' has no embedding in"),
        (["--data_path", str(tmp_path / "silent.json")], "silent.json: no sample left to train on (4 samples: 4 with no assistant turn"),
        (["--data_path", nan_data, "--embed_folder", nan_folder], "d.json: sample 3 id 'text000003': unusable embedding in"),
        (["--embed_folder", str(tmp_path / "nowhere")], "nowhere: no such store folder"),
        (["--pretrain_mm_mlp_adapter", str(tmp_path / "nowhere")], "nowhere: no projector weights here"),
    ]
    # One child runs train.py's main for every case (imports are the slow part); the last case ends the process.
    child = ("import json, sys\nfrom revision.train import main\ncases = json.loads(sys.argv[1])\n"
             "for argv in cases[:-1]:\n    try:\n        main(argv)\n    except SystemExit as e:\n"
             "        print(f'EXIT {e.code}', file=sys.stderr, flush=True)\nmain(cases[-1])\n")
    argvs = [flags(tiny_world, tmp_path / "out", "pretrain", "--max_steps", "1") + extra for extra, _ in cases]
    done = subprocess.run([sys.executable, "-c", child, json.dumps(argvs)], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    outputs = (done.stderr + "EXIT 2").split("EXIT ")
    for (_, message), output in zip(cases, outputs):
        errors = [line for line in output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], output[-2000:]
    assert [o.split("\n", 1)[0] for o in outputs[1:]] == ["2"] * len(cases)


def deepspeed_run(tiny_world, out, port, *extra):
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
    child = ("import importlib, sys; importlib.import_module('deepspeed.comm.torch').build_shm_op = lambda: None\n"
             "from revision.train import main; main(sys.argv[1:])")
    args = flags(tiny_world, out, "finetune", "--learning_rate", "1e-2",
                 "--deepspeed", str(REPO / "script" / "deepspeed" / "zero2.json"), *extra)
    return subprocess.run([sys.executable, "-c", child, *args], env=env, cwd=REPO, capture_output=True, text=True)


def test_deepspeed_resume_unpickles_no_code_even_with_a_regenerated_manifest(tiny_world, tmp_path, free_port):
    out = tmp_path / "ds"
    done = deepspeed_run(tiny_world, out, free_port, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = out / "checkpoint-2"
    clean = tmp_path / "clean"
    shutil.copytree(out, clean)
    # DeepSpeed's real state loads weights-only with the allow-list: the resumed run goes on
    done = deepspeed_run(tiny_world, clean, free_port, "--max_steps", "3",
                         "--resume_from_checkpoint", str(clean / "checkpoint-2"))
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((clean / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    # someone else's checkpoint: a payload in the optimizer state, and a manifest that vouches for it
    marker = tmp_path / "MARKER"
    optim = next(ckpt.glob("global_step2/*_optim_states.pt"))
    torch.save({"optimizer_state_dict": Payload(f"touch {marker}")}, optim)
    write_manifest(ckpt)
    done = deepspeed_run(tiny_world, out, free_port, "--max_steps", "3", "--resume_from_checkpoint", str(ckpt))
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error", "Traceback", "[rank0]: Traceback"))]
    assert done.returncode == 2 and lines == [f"error: {optim}: would unpickle posix.system, which DeepSpeed's state "
                                              "never holds; refused before loading (nothing in it ran)"]
    assert not marker.exists()


class Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_loads_under_weights_only_loads_never_run_pickled_code(tmp_path):
    """The second guard: whatever reaches torch.load while resuming (a file that changed after the check) is weights-only."""
    (tmp_path / "global_step1").mkdir()
    torch.save({"step": torch.ones(2)}, tmp_path / "global_step1" / "mp_rank_00_model_states.pt")
    marker = tmp_path / "MARKER"
    torch.save({"x": Payload(f"touch {marker}")}, tmp_path / "late.pt")
    with weights_only_loads(tmp_path):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "late.pt", weights_only=False)  # what DeepSpeed asks for
        assert torch.equal(torch.load(tmp_path / "global_step1" / "mp_rank_00_model_states.pt", weights_only=False)["step"], torch.ones(2))
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
