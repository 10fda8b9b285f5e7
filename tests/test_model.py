"""RevisionModel: one class over several HF backbones, the splice, save / load."""
import importlib.util

import pytest
import torch
from peft import LoraConfig, get_peft_model

from demo.tiny.lm import build_tiny_lm, build_tokenizer
from revision.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, RevisionConfig, RevisionModel, default_attn_implementation
from revision.projector import build_projector, load_projector_weights

EMBED_DIM, HIDDEN, VISUAL = 16, 32, 3
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_model(tokenizer, family="llama", projector_type="mlp2x_gelu", seed=0):
    llm = build_tiny_lm(family, tokenizer, seed=seed, hidden_size=HIDDEN)
    config = RevisionConfig(embed_dim=EMBED_DIM, hidden_size=HIDDEN, projector_type=projector_type,
                            num_visual_tokens=VISUAL, base_model="unused")
    return RevisionModel(llm, config)


def batch(tokenizer, n=4, seed=0):
    """input_ids with a visual block after BOS, text after it; labels are the ids."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(10, len(tokenizer), (n, 6), generator=g)
    ids = torch.cat([torch.full((n, 1), tokenizer.bos_token_id), torch.full((n, VISUAL), IMAGE_TOKEN_INDEX), text], 1)
    return ids, torch.randn(n, EMBED_DIM, generator=g)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_same_class_trains_each_backbone(tokenizer, family):
    model = make_model(tokenizer, family)
    ids, embeds = batch(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(input_ids=ids, labels=ids, image_embeds=embeds).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    new = model.generate(ids[:1], image_embeds=embeds[:1], max_new_tokens=4, do_sample=False)
    assert new.shape == (1, 4)


def test_project_once_equals_repeat_then_project(tokenizer):
    model = make_model(tokenizer).eval()
    ids, embeds = batch(tokenizer)
    ours = model.embed(ids, embeds)
    # The paper's way: copy the embedding to every visual position, then project each copy.
    repeated = embeds[:, None, :].expand(-1, VISUAL, -1)
    projected = model.projector(repeated)
    reference = model.llm.get_input_embeddings()(ids.clamp(min=0)).clone()
    reference[:, 1:1 + VISUAL] = projected
    assert torch.allclose(ours, reference, atol=1e-6)
    # And the text positions are the LLM's own embeddings.
    assert torch.equal(ours[:, 1 + VISUAL:], model.llm.get_input_embeddings()(ids[:, 1 + VISUAL:]))


def test_visual_positions_never_carry_loss(tokenizer):
    model = make_model(tokenizer).eval()
    ids, embeds = batch(tokenizer)
    labels = ids.clone()
    labels[:, 1:1 + VISUAL] = -100
    assert torch.equal(model(input_ids=ids, labels=ids, image_embeds=embeds).loss,
                       model(input_ids=ids, labels=labels, image_embeds=embeds).loss)


def test_projector_gets_gradient_from_every_visual_position(tokenizer):
    """One projected vector fills all VISUAL positions: each position's gradient is nonzero, and the projector's
    gradient is their sum over every position (none dropped, none counted twice)."""
    model = make_model(tokenizer, projector_type="linear")
    ids, embeds = batch(tokenizer)
    seen = {}

    def keep_inputs_embeds(module, args, kwargs):
        kwargs["inputs_embeds"].retain_grad()
        seen["inputs_embeds"] = kwargs["inputs_embeds"]

    model.llm.get_decoder().register_forward_pre_hook(keep_inputs_embeds, with_kwargs=True)  # both loss paths run it
    model(input_ids=ids, labels=ids, image_embeds=embeds).loss.backward()
    per_position = seen["inputs_embeds"].grad[:, 1:1 + VISUAL]  # [n, VISUAL, HIDDEN]
    assert (per_position.abs().amax(-1) > 1e-6).all(), per_position.abs().amax(-1)
    linear = model.projector[0]
    assert torch.allclose(linear.bias.grad, per_position.sum((0, 1)), rtol=1e-5, atol=1e-8)
    assert torch.allclose(linear.weight.grad, torch.einsum("nph,ne->he", per_position, embeds), rtol=1e-5, atol=1e-8)


def test_projector_types():
    assert [type(m).__name__ for m in build_projector("mlp3x_gelu", 8, 4)] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    assert len(build_projector("linear", 8, 4)) == 1
    with pytest.raises(ValueError, match="unknown projector type 'mlp_relu'"):
        build_projector("mlp_relu", 8, 4)


def test_bad_inputs_give_clear_errors(tokenizer):
    model = make_model(tokenizer)
    ids, embeds = batch(tokenizer)
    with pytest.raises(ValueError, match="image_embeds have dim 20, but the projector takes 16"):
        model(input_ids=ids, image_embeds=torch.randn(len(ids), 20))
    with pytest.raises(ValueError, match="no image_embeds"):
        model(input_ids=ids)


@pytest.mark.parametrize("cuda, flash_attn, max_length, expected", [
    (False, False, None, "sdpa"), (False, True, None, "sdpa"), (True, False, None, "sdpa"), (True, True, None, "flash_attention_2"),
    # training on CPU: eager for short rows, where SDPA's CPU flash kernel is the slower one
    (False, False, 136, "eager"), (False, True, 512, "eager"), (False, False, 513, "sdpa"), (True, False, 136, "sdpa"),
    (True, True, 136, "flash_attention_2")])
def test_attention_is_flash_attention_2_only_with_cuda_and_flash_attn(monkeypatch, cuda, flash_attn, max_length, expected):
    # each machine's case, whatever machine runs the suite (a CPU box, or CUDA with flash-attn for the packing test)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: (object() if flash_attn else None) if name == "flash_attn" else find_spec(name, *args))
    assert default_attn_implementation(max_length) == expected


@pytest.mark.parametrize("stage", ["full", "lora", "base"])
def test_save_then_from_pretrained_gives_same_logits(tokenizer, tmp_path, stage):
    base = tmp_path / "base"
    make_model(tokenizer).llm.save_pretrained(base)
    model = RevisionModel.from_llm(str(base), EMBED_DIM, num_visual_tokens=VISUAL, encoder="tiny-encoder")
    if stage == "lora":
        model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if stage == "base":
        model.freeze_llm()
    with torch.no_grad():  # make the projector differ from a fresh one
        model.projector[0].bias.add_(1.0)
    ids, embeds = batch(tokenizer)
    before = model.eval()(input_ids=ids, image_embeds=embeds).logits
    model.save_pretrained(tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = RevisionModel.from_pretrained(tmp_path / "ckpt").eval()
    after = loaded(input_ids=ids, image_embeds=embeds).logits
    assert torch.allclose(before, after, atol=1e-5)
    saved = RevisionConfig.load(tmp_path / "ckpt")
    assert (saved.llm_weights, saved.encoder, saved.num_visual_tokens) == (stage, "tiny-encoder", VISUAL)
    assert (tmp_path / "ckpt" / "model.safetensors").exists() == (stage == "full")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").exists() == (stage == "lora")


def test_projector_weights_load_from_llava_style_file(tokenizer, tmp_path):
    model = make_model(tokenizer)
    torch.save({f"model.mm_projector.{k}": v for k, v in model.projector.state_dict().items()}, tmp_path / "mm_projector.bin")
    weights = load_projector_weights(tmp_path / "mm_projector.bin")
    assert torch.equal(weights["0.weight"], model.projector[0].weight)
    with pytest.raises(FileNotFoundError, match="no projector weights"):
        load_projector_weights(tmp_path / "nowhere")


def test_batched_generation_with_left_padding_matches_one_by_one(tokenizer):
    model = make_model(tokenizer).eval()
    ids, embeds = batch(tokenizer, n=2)
    short = ids[1, :-2]  # the second prompt two tokens shorter, left-padded in the batch
    padded = torch.stack([ids[0], torch.cat([torch.zeros(2, dtype=torch.long), short])])
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    together = model.generate(padded, embeds, attention_mask=mask, max_new_tokens=5, do_sample=False)
    alone = [model.generate(ids[:1], embeds[:1], max_new_tokens=5, do_sample=False),
             model.generate(short[None], embeds[1:], max_new_tokens=5, do_sample=False)]
    assert torch.equal(together, torch.cat(alone))


def test_projector_tokens_fill_the_visual_positions_in_turn_and_packing_agrees(tokenizer):
    """k distinct vectors: visual position n of a sample takes vector n mod k, in padded and in packed rows."""
    llm = build_tiny_lm("llama", tokenizer, seed=0, hidden_size=HIDDEN)
    config = RevisionConfig(embed_dim=EMBED_DIM, hidden_size=HIDDEN, num_visual_tokens=VISUAL, projector_tokens=2)
    model = RevisionModel(llm, config).eval()
    ids, embeds = batch(tokenizer, n=2)
    vectors = model.project(embeds)  # [2, 2, HIDDEN]
    assert vectors.shape == (2, 2, HIDDEN) and not torch.allclose(vectors[:, 0], vectors[:, 1])
    padded = model.embed(ids, embeds)
    for position, token in zip(range(1, 1 + VISUAL), (0, 1, 0)):
        assert torch.allclose(padded[:, position], vectors[:, token], atol=1e-6)
    # both samples in one packed row: each counts its visual positions from its own start
    packed_ids = torch.cat([ids[0], ids[1]])[None]
    index = torch.cat([torch.zeros(ids.shape[1], dtype=torch.long), torch.ones(ids.shape[1], dtype=torch.long)])[None]
    packed = model.embed(packed_ids, embeds, image_index=index)
    assert torch.allclose(packed[0], torch.cat([padded[0], padded[1]]), atol=1e-6)


def test_projector_input_statistics_standardise_and_travel_with_the_weights(tokenizer, tmp_path):
    from safetensors.torch import save_file

    from revision.projector import load_projector_state, set_input_statistics

    projector = build_projector("mlp2x_gelu", EMBED_DIM, HIDDEN)
    data = torch.randn(500, EMBED_DIM).numpy() * 0.05 + 3.0  # a large common offset, a small spread
    mean_norm, scale = set_input_statistics(projector, data)
    assert mean_norm == pytest.approx(3.0 * EMBED_DIM ** 0.5, rel=0.01) and scale == pytest.approx(0.05, rel=0.1)
    standardised = (torch.from_numpy(data).float() - projector.input_mean) / projector.input_scale
    assert standardised.mean().abs() < 0.05 and standardised.std().item() == pytest.approx(1.0, rel=0.1)
    save_file(projector.state_dict(), str(tmp_path / "p.safetensors"))
    again = build_projector("mlp2x_gelu", EMBED_DIM, HIDDEN)
    load_projector_state(again, load_projector_weights(tmp_path / "p.safetensors"))
    assert torch.equal(again.input_mean, projector.input_mean) and torch.equal(again.input_scale, projector.input_scale)
    # a projector file from before the statistics existed loads as the identity
    old = {k: v for k, v in projector.state_dict().items() if not k.startswith("input_")}
    fresh = build_projector("mlp2x_gelu", EMBED_DIM, HIDDEN)
    load_projector_state(fresh, old)
    assert torch.equal(fresh.input_mean, torch.zeros(EMBED_DIM)) and fresh.input_scale.item() == 1.0
    with pytest.raises(RuntimeError, match="unexpected"):
        load_projector_state(fresh, {**old, "9.weight": torch.zeros(1)})


def test_training_loss_runs_the_head_on_labelled_positions_only(tokenizer):
    """revision/loss.py: in training the loss equals HF's (mean over labelled tokens, or sum / num_items_in_batch) and
    so do the gradients, while the head sees only the labelled rows; eval mode keeps HF's logits."""
    model = make_model(tokenizer, projector_type="linear")
    ids, embeds = batch(tokenizer)
    labels = ids.clone()
    labels[:, : ids.shape[1] - 3] = IGNORE_INDEX  # the last three tokens of each row are targets
    rows = []
    model.llm.get_output_embeddings().register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))
    results = []
    for training in (False, True):
        model.train(training).zero_grad()
        for items in (None, torch.tensor(17)):
            out = model(input_ids=ids, labels=labels, image_embeds=embeds, num_items_in_batch=items)
            (out.loss if items is None else out.loss * 0).backward()
            results.append(out.loss.detach())
        results.append(model.projector[0].weight.grad.clone())
        assert (out.logits is None) is training
    hf_mean, hf_sum, hf_grad, mean, summed, grad = results
    assert mean == pytest.approx(hf_mean.item(), rel=1e-6) and summed == pytest.approx(hf_sum.item(), rel=1e-6)
    assert summed == pytest.approx(mean.item() * 3 * len(ids) / 17, rel=1e-6)  # 3 labelled next tokens a row
    assert torch.allclose(grad, hf_grad, rtol=1e-5, atol=1e-8)
    assert rows[-1] == 3 * len(ids) and rows[0] == len(ids) * ids.shape[1]  # eval: every position; training: 3 a row
