"""Inference: image → encoder → image_map → projector → LLM, batching, precomputed embeddings, the CLI, bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo.tiny.clip import build_tiny_clip
from demo.tiny.lm import build_tiny_lm, build_tokenizer
from revision.align import MeanShift, load_alignment
from revision.conversation import render
from revision.data import tokenize
from revision.encoders import load_encoder
from revision.infer import Predictor, StopOnStrings, cut_at_stop, left_pad
from revision.model import CONFIG_FILE, RevisionConfig, RevisionModel
from revision.predict import main
from revision.store_writer import write_store

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
QUESTION = "what colour is it ?"
VISUAL = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def build_checkpoint(root: Path) -> dict:
    """A tiny CLIP, one image per colour, mean-shift statistics fitted on those images, and a tiny chat model
    trained until it names each image's colour; saved as a checkpoint folder."""
    clip = build_tiny_clip(root / "clip")
    encoder = load_encoder(str(clip), device="cpu")
    images = {}
    for name, rgb in COLOURS.items():
        pixels = np.zeros((32, 32, 3), np.uint8)
        pixels[:] = rgb
        pixels[8:24, 8:24] = 255 - np.array(rgb)
        images[name] = root / f"{name}.png"
        Image.fromarray(pixels).save(images[name])
    raw = encoder.encode_images([Image.open(p) for p in images.values()]).numpy()
    # Mean shift has a non-trivial image_map (realign's is n(v)): the test can see whether it was applied.
    alignment = MeanShift(encoder.dim, {}, mu_text=np.full(encoder.dim, 0.1), mu_image=raw.mean(0))
    stats = alignment.save(root / "align_stats.json")

    tokenizer = build_tokenizer()
    llm = build_tiny_lm("llama", tokenizer, hidden_size=32, num_layers=1)
    model = RevisionModel(llm, RevisionConfig(embed_dim=encoder.dim, hidden_size=32, num_visual_tokens=VISUAL,
                                              template="chat", encoder=encoder.name, base_model="unused"))
    samples = [tokenize(render([{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": name}],
                               "chat", tokenizer), tokenizer, VISUAL, 64) for name in COLOURS]
    input_ids, labels = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    embeds = torch.from_numpy(alignment.image_map(raw))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        model(input_ids=input_ids, labels=labels, image_embeds=embeds).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "ckpt", tokenizer=tokenizer, alignment=stats)
    return {"ckpt": root / "ckpt", "images": images, "raw": dict(zip(COLOURS, raw)), "stats": stats,
            "encoder": encoder, "tokenizer": tokenizer}


def cli(argv):
    return main(["--device", "cpu", *map(str, argv)])


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_thread):
    return build_checkpoint(tmp_path_factory.mktemp("infer"))


@pytest.fixture(scope="module")
def predictor(world):
    return Predictor(world["ckpt"], device="cpu")


def test_answers_name_each_images_colour(world, predictor):
    # Right answers need the whole path: the encoder, the checkpoint's image_map, the projector; and the answer
    # stops at the chat template's end-of-turn token instead of running on.
    for name, path in world["images"].items():
        assert predictor.answer(QUESTION, path) == name


def test_batch_and_single_answers_agree_under_greedy(world, predictor):
    prompts = [QUESTION, "describe this", f"{QUESTION} describe this picture of a", "what"]  # different lengths: left padding
    paths = list(world["images"].values())
    single = [predictor.answer(p, v, max_new_tokens=6) for p, v in zip(prompts, paths)]
    assert predictor.answer_batch(prompts, paths, batch_size=4, max_new_tokens=6) == single
    assert predictor.answer_batch(prompts, paths, batch_size=3, max_new_tokens=6) == single
    assert all(isinstance(a, str) and a for a in single)


def test_precomputed_embedding_gives_the_same_answer_as_the_image(world):
    predictor = Predictor(world["ckpt"], device="cpu")
    embeddings = list(world["raw"].values())
    assert predictor.answer_batch([QUESTION] * 4, embeddings) == list(COLOURS)
    assert predictor._encoder is None  # embeddings alone never load the encoder
    for name, path in world["images"].items():
        from_image = predictor.loglikelihood(QUESTION, name, path)
        from_embedding = predictor.loglikelihood(QUESTION, name, world["raw"][name])
        assert from_image[1] and from_embedding[1]
        assert from_image[0] == pytest.approx(from_embedding[0], abs=1e-4)


def test_image_map_from_the_checkpoint_is_applied(world, predictor):
    paths = list(world["images"].values())
    fed = predictor.image_embeddings(paths + [None])
    raw = world["encoder"].encode_images([Image.open(p) for p in paths]).numpy()
    expected = load_alignment(world["stats"]).image_map(raw)
    np.testing.assert_allclose(fed[:4], expected, atol=1e-5)
    assert np.abs(fed[:4] - raw).max() > 0.1  # the map changed them: a raw embedding would be wrong
    assert not fed[4].any()  # no image: nothing fed


def test_mapped_embeddings_skip_the_image_map(world, predictor):
    """--mapped: a synthetic image embedding (aligned text) reaches the projector as it is; an image cannot be mapped."""
    raw = world["encoder"].encode_images([Image.open(p) for p in world["images"].values()]).numpy()
    np.testing.assert_array_equal(predictor.image_embeddings(list(raw), mapped=True), raw)
    assert np.abs(predictor.image_embeddings(list(raw)) - raw).max() > 0.1  # unmapped: the image_map applies
    with pytest.raises(ValueError, match="only embeddings can be mapped"):
        predictor.image_embeddings([next(iter(world["images"].values()))], mapped=True)


def test_loglikelihood_prefers_the_right_option(world, predictor):
    path = world["images"]["blue"]
    scores = {name: predictor.loglikelihood(QUESTION, name, path) for name in COLOURS}
    assert max(scores, key=lambda n: scores[n][0]) == "blue"
    assert scores["blue"][1] and not scores["red"][1]
    assert all(ll < 0 for ll, _ in scores.values())


def test_prompt_is_formatted_as_in_training(world, predictor, tmp_path):
    tokenizer = world["tokenizer"]
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]
    trained_prefix = tokenize(render(turns, "chat", tokenizer)[:-1], tokenizer, VISUAL, 64)[0]
    assert torch.equal(predictor.prompt_ids(QUESTION, has_image=True), trained_prefix)
    assert torch.equal(predictor.prompt_ids(f"<image>\n{QUESTION}", has_image=True), trained_prefix)
    with pytest.raises(ValueError, match="holds <image> but no image"):
        predictor.format_prompt(f"<image>\n{QUESTION}", has_image=False)
    # a conversation (revision.serve's follow-up questions): rendered as training rendered the same turns
    talk = [*turns, {"from": "human", "value": "and the square ?"}, {"from": "gpt", "value": "white"}]
    asked = [{"from": "human", "value": QUESTION}, *talk[1:3]]  # the image goes into the first user turn
    trained_prefix = tokenize(render(talk, "chat", tokenizer)[:-1], tokenizer, VISUAL, 64)[0]
    assert torch.equal(predictor.prompt_ids(asked, has_image=True), trained_prefix)
    with pytest.raises(ValueError, match="must end with a user turn"):
        predictor.format_prompt(turns, has_image=True)
    # A checkpoint trained with --system_prompt: its prompts carry that system message, as its training samples did.
    briefed = shutil.copytree(world["ckpt"], tmp_path / "briefed")
    config = json.loads((briefed / CONFIG_FILE).read_text())
    (briefed / CONFIG_FILE).write_text(json.dumps({**config, "system_prompt": "red or blue"}))
    trained_prefix = tokenize(render(turns, "chat", tokenizer, "red or blue")[:-1], tokenizer, VISUAL, 64)[0]
    assert torch.equal(Predictor(briefed, device="cpu").prompt_ids(QUESTION, has_image=True), trained_prefix)
    assert len(trained_prefix) > len(predictor.prompt_ids(QUESTION, has_image=True))
    # A checkpoint trained with the image after the question (--image_placement last) is asked the same way; a
    # prompt that holds the image keeps it where it is.
    after = shutil.copytree(world["ckpt"], tmp_path / "after")
    config = json.loads((after / CONFIG_FILE).read_text())
    (after / CONFIG_FILE).write_text(json.dumps({**config, "image_placement": "last"}))
    reader = Predictor(after, device="cpu")
    last = [{"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": "red"}]
    assert torch.equal(reader.prompt_ids(QUESTION, has_image=True),
                       tokenize(render(last, "chat", tokenizer)[:-1], tokenizer, VISUAL, 64)[0])
    assert reader.format_prompt(f"<image>\n{QUESTION}", True) == predictor.format_prompt(QUESTION, True)
    assert reader.format_prompt(QUESTION, True) != predictor.format_prompt(QUESTION, True)
    # A stage-1 checkpoint captions: the prompt is the image alone, whatever was asked.
    plain = shutil.copytree(world["ckpt"], tmp_path / "plain")
    config = json.loads((plain / CONFIG_FILE).read_text())
    (plain / CONFIG_FILE).write_text(json.dumps({**config, "template": "plain"}))
    captioner = Predictor(plain, device="cpu")
    assert captioner.format_prompt(QUESTION, has_image=True) == "<s><image>"
    assert captioner.stop_token_ids == [tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="captioning .plain template. checkpoint: it needs an image"):
        captioner.answer(QUESTION)


def test_sampling_and_stop_strings(world, predictor):
    torch.manual_seed(0)
    sampled = predictor.answer_batch([QUESTION] * 2, list(world["images"].values())[:2], temperature=1.0, top_p=0.9,
                                     max_new_tokens=4)
    assert len(sampled) == 2 and all(isinstance(s, str) for s in sampled)
    tokenizer = world["tokenizer"]
    done = StopOnStrings(["picture white", "blue"], tokenizer)
    rows = torch.tensor([tokenizer.convert_tokens_to_ids(t.split()) for t in ("a red star", "picture white a", "a blue .")])
    assert done(rows, None).tolist() == [False, True, True]
    assert predictor.answer_batch([QUESTION] * 2, list(world["images"].values())[:2], stop=["ed"]) == ["r", "green"]
    assert cut_at_stop("red star . blue", [".", "blue"]) == "red star "
    assert cut_at_stop("red", ["", "\n"]) == "red"
    ids, mask = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_bad_visuals_give_clear_errors(world, predictor, tmp_path):
    with pytest.raises(ValueError, match=r"nowhere\.png: cannot read the image \(FileNotFoundError"):
        predictor.prepare(tmp_path / "nowhere.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ValueError, match="broken.png: cannot read the image"):
        predictor.prepare(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match=r"shape \(8,\), but the projector takes \(16,\)"):
        predictor.prepare(np.ones(8))
    with pytest.raises(ValueError, match="NaN"):
        predictor.prepare(np.full(16, np.nan))


def test_non_finite_image_embeddings_never_reach_the_model(world, predictor, monkeypatch):
    monkeypatch.setattr(predictor.model, "image_map", lambda x: x * np.nan)  # e.g. broken statistics
    with pytest.raises(ValueError, match=r"red.png: its embedding holds NaN / Inf after .*ckpt's image_map"):
        predictor.answer(QUESTION, world["images"]["red"])
    monkeypatch.setattr(predictor.encoder, "encode_images", lambda images: torch.full((len(images), 16), torch.inf))
    with pytest.raises(ValueError, match=r"red.png: its embedding holds NaN / Inf after the encoder"):  # an fp16 overflow
        predictor.answer(QUESTION, world["images"]["red"])


def test_an_encoder_with_remote_code_needs_trust_remote_code(world, tmp_path):
    """A checkpoint naming an encoder folder that ships its own Python (config auto_map, an unknown model_type):
    prediction never runs that code unless --trust_remote_code is passed."""
    clip = shutil.copytree(world["ckpt"].parent / "clip", tmp_path / "remote-clip")
    marker = tmp_path / "remote-code-ran"
    (clip / "modeling_marker.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import CLIPConfig, CLIPModel\n\n\n"
        "class MarkerConfig(CLIPConfig):\n    model_type = 'marker_clip'\n\n\n"
        "class MarkerModel(CLIPModel):\n    config_class = MarkerConfig\n")
    config = json.loads((clip / "config.json").read_text())
    config.update(model_type="marker_clip", auto_map={"AutoConfig": "modeling_marker.MarkerConfig",
                                                      "AutoModel": "modeling_marker.MarkerModel"})
    (clip / "config.json").write_text(json.dumps(config))
    folder = shutil.copytree(world["ckpt"], tmp_path / "remote")
    revision_config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**revision_config, "encoder": str(clip)}))
    with pytest.raises(ValueError, match="trust_remote_code"):
        Predictor(folder, device="cpu").encoder  # noqa: B018 (a property: loading the encoder is what is refused)
    assert cli(["--model", folder, "--image", world["images"]["red"], "--prompt", QUESTION]) == 2
    assert not marker.exists()
    trusted = Predictor(folder, device="cpu", trust_remote_code=True)
    assert trusted.encoder.dim == world["encoder"].dim and marker.read_text() == "ran"  # trusted: its code ran


def test_checkpoint_without_config_is_refused(world, tmp_path):
    folder = shutil.copytree(world["ckpt"], tmp_path / "no-config")
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="not a ReVision checkpoint: revision_config.json is missing"):
        Predictor(folder, device="cpu")


def test_projector_that_does_not_fit_the_encoder_is_refused(world, tmp_path):
    llm = build_tiny_lm("llama", world["tokenizer"], hidden_size=32, num_layers=1)
    model = RevisionModel(llm, RevisionConfig(embed_dim=8, hidden_size=32, num_visual_tokens=VISUAL, template="chat",
                                              encoder=world["encoder"].name))
    model.save_pretrained(tmp_path / "ckpt8", tokenizer=world["tokenizer"])
    predictor = Predictor(tmp_path / "ckpt8", device="cpu")
    with pytest.raises(ValueError, match=r"gives 16-dim embeddings, but the projector in .*ckpt8 takes 8"):
        predictor.answer(QUESTION, world["images"]["red"])
    code = cli(["--model", tmp_path / "ckpt8", "--image", world["images"]["red"], "--prompt", QUESTION])
    assert code == 2


# ---- the CLI ------------------------------------------------------------------------------------------


def test_cli_answers_one_image(world, tmp_path, capsys):
    assert cli(["--model", world["ckpt"], "--image", world["images"]["green"], "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out.strip() == "green"
    np.save(tmp_path / "yellow.npy", world["raw"]["yellow"])
    assert cli(["--model", world["ckpt"], "--embedding", tmp_path / "yellow.npy", "--prompt", QUESTION]) == 0
    assert capsys.readouterr().out.strip() == "yellow"


def test_cli_question_file_records_bad_images_as_errors_and_goes_on(world, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("red", "green"):
        shutil.copy(world["images"][name], images / f"{name}.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    store = tmp_path / "store"
    write_store(store, "image", ["img-blue"], world["raw"]["blue"][None], ["blue.png"], encoder=world["encoder"].name,
                dtype="float32")
    questions = [
        {"question_id": 1, "image": "red.png", "text": QUESTION},
        {"question_id": 2, "image": "missing.png", "text": QUESTION},
        {"question_id": 3, "image": "green.png", "text": QUESTION},
        {"question_id": 4, "image": "corrupt.png", "text": QUESTION},
        {"question_id": 5, "embedding": world["raw"]["yellow"].tolist(), "text": QUESTION},
        {"question_id": 6, "embedding": "img-blue", "text": QUESTION},
    ]
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    refs = tmp_path / "refs.jsonl"
    truth = ["red", "red", "green", "red", "yellow", "blue"]
    refs.write_text("".join(json.dumps({"question_id": i + 1, "answer": a}) + "\n" for i, a in enumerate(truth)))
    answers = tmp_path / "out" / "answers.jsonl"
    code = cli(["--model", world["ckpt"], "--questions", qfile, "--image_root", images,
                 "--embed_folder", store, "--answers", answers, "--batch_size", "4",
                 "--references", refs, "--task", "short"])
    assert code == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r.get("text") for r in rows] == ["red", None, "green", None, "yellow", "blue"]
    assert "missing.png: cannot read the image" in rows[1]["error"]
    assert "corrupt.png: cannot read the image" in rows[3]["error"]
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (summary["questions"], summary["answered"], summary["errors"]) == (6, 4, 2)
    metrics = json.loads((tmp_path / "out" / "answers.metrics.json").read_text())
    assert (metrics["errors"], metrics["accuracy"]) == (2, pytest.approx(4 / 6))


def test_cli_clear_errors_for_bad_checkpoint_and_question_file(world, tmp_path, capsys):
    assert cli(["--model", tmp_path, "--image", world["images"]["red"]]) == 2
    assert "revision_config.json is missing" in capsys.readouterr().err
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "image": "red.png"}) + "\n")
    assert cli(["--model", world["ckpt"], "--questions", qfile]) == 2
    assert "row 0 (question_id 1) has no string 'text'" in capsys.readouterr().err
    qfile.write_text(json.dumps({"question_id": 1, "embedding": "x", "text": "?"}) + "\n")
    assert cli(["--model", world["ckpt"], "--questions", qfile, "--answers", tmp_path / "a.jsonl"]) == 0
    assert "no --embed_folder" in json.loads((tmp_path / "a.jsonl").read_text())["error"]


def test_an_unusable_store_row_is_named_not_answered(tmp_path):
    from revision.data import EmbeddingTable
    from revision.predict import store_embedding
    from revision.shards import Shard, write_reference_shard

    embeds = np.eye(3, 16, dtype=np.float32)
    embeds[1, 4] = np.nan
    (tmp_path / "s").mkdir()  # the reference layout: written without row checks
    write_reference_shard(tmp_path / "s" / "image_embeds_1.pkl", Shard("image", ["a", "b", "c"], embeds, ["a.png", "b.png", "c.png"]),
                          "float32")
    with pytest.raises(ValueError, match=r"'b.png': unusable embedding in .*s/image_embeds_1.pkl row 1 \(id 'b'\): NaN"):
        store_embedding(EmbeddingTable(tmp_path / "s"), "b.png")


def test_prediction_turns_photos_upright_like_image_embed(world, predictor, tmp_path, sideways_photo):
    paths = sideways_photo(tmp_path)
    upright = predictor.image_embeddings([paths["upright"]])
    np.testing.assert_allclose(predictor.image_embeddings([paths["exif"]]), upright, atol=1e-3)
    np.testing.assert_allclose(predictor.image_embeddings([Image.open(paths["exif"])]), upright, atol=1e-3)  # lmms-eval's PIL visuals
    assert np.abs(predictor.image_embeddings([paths["raw"]]) - upright).max() > 1e-2
    with pytest.raises(ValueError, match=r"100000x1: resized to 448 px on its short side"):
        predictor.prepare(Image.new("RGB", (100_000, 1)))


def test_a_projector_output_too_large_to_normalise_is_refused(world, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(world["ckpt"], tmp_path / "ckpt")
    weights = load_file(str(tmp_path / "ckpt" / "projector.safetensors"))
    save_file({k: v.fill_(1e38) if k.endswith("bias") else v for k, v in weights.items()}, str(tmp_path / "ckpt" / "projector.safetensors"))
    with pytest.raises(ValueError, match=r"the projector's output holds NaN / Inf, or values too large to normalise"):
        Predictor(tmp_path / "ckpt", device="cpu").answer(QUESTION, world["images"]["red"])
    assert cli(["--model", tmp_path / "ckpt", "--image", world["images"]["red"], "--prompt", QUESTION]) == 2
    assert "error: the projector's output holds NaN / Inf" in capsys.readouterr().err
