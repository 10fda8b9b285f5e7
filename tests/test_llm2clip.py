"""LLM2CLIP loaded natively (revision/llm2clip.py): tiny random checkpoints saved in LLM2CLIP's own key layout and
config fields, with code files that raise if anything imports them, encoded through image_embed.py and compared
with a forward pass written here in plain torch (CLIP ViT, bidirectional Llama, LLM2Vec mean pooling, adapter)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoImageProcessor, PreTrainedTokenizerFast

from revision.embed import main as image_embed
from revision.encoders import load_encoder
from revision.store import EmbeddingStore

V = dict(hidden=32, layers=2, heads=2, patch=8, image=32, projection=16)  # vision tower
L = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=48, theta=500000.0, eps=1e-5)  # LLM2Vec Llama
BLOCKS, EXPANSION = 2, 2  # the adapter (the real one: 4 blocks of 4096 -> 8192 -> 4096)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
WORDS = "user a an the red green blue big small circle square star cross on left right of in middle".split()
TEXTS = ["a red circle", "the big blue star on the left", "green", "a small square in the middle of the right"]
RAISES = "raise RuntimeError('remote code was executed')\n"


def _tensors(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        out[name] = 1 + 0.1 * t if name.endswith(("norm.weight", "ln.weight", "layrnorm.weight", "layernorm.weight",
                                                    "layer_norm1.weight", "layer_norm2.weight")) else 0.2 * t
    return out


def vision_shapes() -> dict[str, tuple]:
    h, n = V["hidden"], (V["image"] // V["patch"]) ** 2 + 1
    p = "vision_model."
    shapes = {p + "embeddings.class_embedding": (h,), p + "embeddings.patch_embedding.weight": (h, 3, V["patch"], V["patch"]),
              p + "embeddings.position_embedding.weight": (n, h), p + "pre_layrnorm.weight": (h,), p + "pre_layrnorm.bias": (h,),
              p + "post_layernorm.weight": (h,), p + "post_layernorm.bias": (h,), "visual_projection.weight": (V["projection"], h)}
    for i in range(V["layers"]):
        layer = f"{p}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{layer}self_attn.{proj}.weight": (h, h), f"{layer}self_attn.{proj}.bias": (h,)})
        shapes.update({f"{layer}mlp.fc1.weight": (4 * h, h), f"{layer}mlp.fc1.bias": (4 * h,), f"{layer}mlp.fc2.weight": (h, 4 * h),
                       f"{layer}mlp.fc2.bias": (h,)})
        for norm in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{layer}{norm}.weight": (h,), f"{layer}{norm}.bias": (h,)})
    d, a = L["hidden"], "text_adapter.adaptor."
    for b in range(BLOCKS):
        shapes.update({f"{a}{b}.fn.0.weight": (EXPANSION * d, d), f"{a}{b}.fn.0.bias": (EXPANSION * d,),
                       f"{a}{b}.fn.3.weight": (d, EXPANSION * d), f"{a}{b}.fn.3.bias": (d,), f"{a}{b}.ln.weight": (d,),
                       f"{a}{b}.ln.bias": (d,)})
    shapes.update({f"{a}{BLOCKS}.weight": (d,), f"{a}{BLOCKS}.bias": (d,), f"{a}{BLOCKS + 1}.weight": (V["projection"], d),
                   f"{a}{BLOCKS + 1}.bias": (V["projection"],), "logit_scale": ()})
    return shapes


def llama_shapes(vocab: int) -> dict[str, tuple]:
    d, hd = L["hidden"], L["hidden"] // L["heads"]
    shapes = {"embed_tokens.weight": (vocab, d), "norm.weight": (d,)}
    for i in range(L["layers"]):
        x = f"layers.{i}."
        shapes.update({x + "self_attn.q_proj.weight": (d, d), x + "self_attn.k_proj.weight": (L["kv_heads"] * hd, d),
                       x + "self_attn.v_proj.weight": (L["kv_heads"] * hd, d), x + "self_attn.o_proj.weight": (d, d),
                       x + "mlp.gate_proj.weight": (L["intermediate"], d), x + "mlp.up_proj.weight": (L["intermediate"], d),
                       x + "mlp.down_proj.weight": (d, L["intermediate"]), x + "input_layernorm.weight": (d,),
                       x + "post_attention_layernorm.weight": (d,)})
    return shapes


def llama3_like_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + ["[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   unk_token="[UNK]", additional_special_tokens=SPECIALS[1:4])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(vision folder, text folder, their tensors) in the layouts of microsoft/LLM2CLIP-Openai-L-14-336 and
    microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned."""
    root = tmp_path_factory.mktemp("llm2clip")
    vision, text = root / "LLM2CLIP-Openai-L-14-336", root / "LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned"
    vision.mkdir(), text.mkdir()
    vision_weights = _tensors(vision_shapes(), seed=0)
    save_file(vision_weights, vision / "model.safetensors")
    (vision / "config.json").write_text(json.dumps({
        "_name_or_path": "LLM2CLIP-Openai-L-14-336", "architectures": ["LLM2CLIPModel"],
        "auto_map": {"AutoConfig": "configuration_clip.CLIPConfig", "AutoModel": "modeling_clip.LLM2CLIPModel"},
        "initializer_factor": 1.0, "logit_scale_init_value": 2.6592, "model_type": "clip", "projection_dim": V["projection"],
        "text_config": {"model_type": "clip_text_model"}, "torch_dtype": "float32", "transformers_version": "4.40.2",
        "vision_config": {"dropout": 0.0, "hidden_size": V["hidden"], "image_size": V["image"], "intermediate_size": 4 * V["hidden"],
                          "model_type": "clip_vision_model", "num_attention_heads": V["heads"],
                          "num_hidden_layers": V["layers"], "patch_size": V["patch"], "projection_dim": V["projection"]}}))
    (vision / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": V["image"]},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": V["image"], "width": V["image"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    tokenizer = llama3_like_tokenizer()
    tokenizer.save_pretrained(text)
    text_weights = _tensors(llama_shapes(len(tokenizer)), seed=1)
    save_file(text_weights, text / "model.safetensors")  # LlamaEncoderModel is a LlamaModel: no "model." prefix
    (text / "config.json").write_text(json.dumps({
        "architectures": ["LlamaEncoderModel"], "auto_map": {"AutoModel": "modeling_llama_encoder.LlamaEncoderModel"},
        "model_type": "llama", "hidden_size": L["hidden"], "intermediate_size": L["intermediate"],
        "num_hidden_layers": L["layers"], "num_attention_heads": L["heads"], "num_key_value_heads": L["kv_heads"],
        "rope_theta": L["theta"], "rms_norm_eps": L["eps"], "vocab_size": len(tokenizer), "hidden_act": "silu",
        "max_position_embeddings": 512, "bos_token_id": 0, "eos_token_id": 4, "torch_dtype": "float32"}))
    for folder, names in ((vision, ("modeling_clip.py", "configuration_clip.py")), (text, ("modeling_llama_encoder.py",))):
        for name in names:
            (folder / name).write_text(RAISES)
    return vision, text, vision_weights, text_weights, tokenizer


# ---- the reference: LLM2CLIP's forward written out in plain torch --------------------------------------------

def _ln(x, w, name, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], eps)


def reference_image_features(w: dict, pixels: torch.Tensor) -> torch.Tensor:
    p, (b, h, heads) = "vision_model.", (pixels.shape[0], V["hidden"], V["heads"])
    x = F.conv2d(pixels, w[p + "embeddings.patch_embedding.weight"], stride=V["patch"]).flatten(2).transpose(1, 2)
    x = torch.cat([w[p + "embeddings.class_embedding"].expand(b, 1, h), x], 1) + w[p + "embeddings.position_embedding.weight"]
    x = _ln(x, w, p + "pre_layrnorm")
    for i in range(V["layers"]):
        layer = f"{p}encoder.layers.{i}."
        y = _ln(x, w, layer + "layer_norm1")
        q, k, v = (F.linear(y, w[f"{layer}self_attn.{n}.weight"], w[f"{layer}self_attn.{n}.bias"])
                   .view(b, -1, heads, h // heads).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(h // heads), -1) @ v
        x = x + F.linear(att.transpose(1, 2).reshape(b, -1, h), w[layer + "self_attn.out_proj.weight"],
                         w[layer + "self_attn.out_proj.bias"])
        y = F.linear(_ln(x, w, layer + "layer_norm2"), w[layer + "mlp.fc1.weight"], w[layer + "mlp.fc1.bias"])
        x = x + F.linear(y * torch.sigmoid(1.702 * y), w[layer + "mlp.fc2.weight"], w[layer + "mlp.fc2.bias"])  # quick_gelu
    return _ln(x[:, 0], w, p + "post_layernorm") @ w["visual_projection.weight"].T


def _rms(x, weight):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + L["eps"])


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_text_features(w: dict, wv: dict, tokenizer, texts: list[str]) -> torch.Tensor:
    """LLM2Vec's encode (Llama-3 user-turn wrapping, left padding, bidirectional attention, mean over the caption's
    tokens), then LLM2CLIP's adapter (L2-normalise, residual blocks, LayerNorm, Linear)."""
    captions = [t.strip() + "<|eot_id|>" for t in texts]
    rows = [tokenizer("<|start_header_id|>user<|end_header_id|>\n\n" + c)["input_ids"] for c in captions]
    counts = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in captions]
    t, pad = max(map(len, rows)), tokenizer.convert_tokens_to_ids("<|eot_id|>")
    ids = torch.tensor([[pad] * (t - len(r)) + r for r in rows])
    keep = torch.tensor([[False] * (t - len(r)) + [True] * len(r) for r in rows])
    b, d, heads, kv = ids.shape[0], L["hidden"], L["heads"], L["kv_heads"]
    hd = d // heads
    angles = torch.arange(t).float()[:, None] / L["theta"] ** (torch.arange(0, hd, 2).float() / hd)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    bias = torch.where(keep[:, None, None, :], 0.0, float("-inf"))
    x = w["embed_tokens.weight"][ids]
    for i in range(L["layers"]):
        y, a = _rms(x, w[f"layers.{i}.input_layernorm.weight"]), f"layers.{i}.self_attn."
        q = (y @ w[a + "q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
        k, v = ((y @ w[a + n].T).view(b, t, kv, hd).transpose(1, 2).repeat_interleave(heads // kv, 1)
                for n in ("k_proj.weight", "v_proj.weight"))
        att = torch.softmax(_rotate(q, cos, sin) @ _rotate(k, cos, sin).transpose(-1, -2) / math.sqrt(hd) + bias, -1) @ v
        x = x + att.transpose(1, 2).reshape(b, t, d) @ w[a + "o_proj.weight"].T
        y, m = _rms(x, w[f"layers.{i}.post_attention_layernorm.weight"]), f"layers.{i}.mlp."
        x = x + (F.silu(y @ w[m + "gate_proj.weight"].T) * (y @ w[m + "up_proj.weight"].T)) @ w[m + "down_proj.weight"].T
    hidden = _rms(x, w["norm.weight"])
    pooled = torch.stack([hidden[i, -n:].mean(0) for i, n in enumerate(counts)])
    x, a = F.normalize(pooled, dim=-1), "text_adapter.adaptor."
    for blk in range(BLOCKS):
        y = F.gelu(F.linear(_ln(x, wv, f"{a}{blk}.ln"), wv[f"{a}{blk}.fn.0.weight"], wv[f"{a}{blk}.fn.0.bias"]))
        x = x + F.linear(y, wv[f"{a}{blk}.fn.3.weight"], wv[f"{a}{blk}.fn.3.bias"])
    x = _ln(x, wv, f"{a}{BLOCKS}")
    return F.linear(x, wv[f"{a}{BLOCKS + 1}.weight"], wv[f"{a}{BLOCKS + 1}.bias"])


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 4 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


# ---- the tests -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(checkpoints):
    vision, text, *_ = checkpoints
    return load_encoder(f"llm2clip:{vision}?text={text}", device="cpu", batch_size=3)


def test_equals_the_reference_forward(checkpoints, encoder):
    _, _, vision_weights, text_weights, tokenizer = checkpoints
    assert encoder.dim == V["projection"]
    images = _images(4)
    pixels = encoder.preprocess.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_ref = F.normalize(reference_image_features(vision_weights, pixels.float()), dim=-1)
        text_ref = F.normalize(reference_text_features(text_weights, vision_weights, tokenizer, TEXTS), dim=-1)
    assert (encoder.encode_images(images) - image_ref).abs().max() < 1e-5
    assert (encoder.encode_texts(TEXTS, batch_size=4) - text_ref).abs().max() < 1e-5
    # LLM2Vec pads on the left; RoPE sees only relative positions, so a caption alone embeds as in a batch
    assert (encoder.encode_texts(TEXTS[1:2])[0] - text_ref[1]).abs().max() < 1e-5
    assert (text_ref[0] - text_ref[2]).abs().max() > 1e-2 and (image_ref[0] - image_ref[1]).abs().max() > 1e-2


def test_through_image_embed_and_no_remote_code_runs(checkpoints, tmp_path):
    vision, text, vision_weights, text_weights, tokenizer = checkpoints
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images(3)):
        image.save(folder / f"im{i}.png")
    (tmp_path / "captions.txt").write_text("\n".join(TEXTS) + "\n")
    # the checkpoints' modeling_*.py raise when imported: a run that finishes imported none of them
    assert image_embed(["--images", str(folder), "--texts", str(tmp_path / "captions.txt"), "--encoder",
                        f"llm2clip:{vision}?text={text}", "--out", str(tmp_path / "out"), "--num_workers", "0",
                        "--store_dtype", "float32", "--device", "cpu"]) in (0, None)
    images, texts = EmbeddingStore(tmp_path / "out" / "image").load_all(), EmbeddingStore(tmp_path / "out" / "text").load_all()
    assert EmbeddingStore(tmp_path / "out" / "image").encoder == f"llm2clip:{vision}?text={text}"
    with torch.no_grad():
        text_ref = F.normalize(reference_text_features(text_weights, vision_weights, tokenizer, TEXTS), dim=-1)
    assert len(texts) == 4 and np.abs(texts.embeds - text_ref.numpy()).max() < 1e-5
    stored = [Image.open(folder / i) for i in images.ids]
    pixels = AutoImageProcessor.from_pretrained(vision)(images=stored, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image_ref = F.normalize(reference_image_features(vision_weights, pixels.float()), dim=-1)
    assert images.ids == ["im0.png", "im1.png", "im2.png"] and np.abs(images.embeds - image_ref.numpy()).max() < 1e-5


def test_a_checkpoint_in_another_layout_is_refused(checkpoints, tmp_path):
    vision, text, vision_weights, *_ = checkpoints
    for name, change in (("no projection", lambda w: w.pop("visual_projection.weight")),
                         ("renamed adapter", lambda w: w.update(
                             {"text_adapter.adaptor.0.fn.9.weight": w.pop("text_adapter.adaptor.0.fn.3.weight")}))):
        broken = tmp_path / name.replace(" ", "_")
        broken.mkdir()
        weights = dict(vision_weights)
        change(weights)
        save_file(weights, broken / "model.safetensors")
        for f in ("config.json", "preprocessor_config.json"):
            (broken / f).write_text((vision / f).read_text())
        with pytest.raises(ValueError, match="visual_projection|missing|unexpected"):
            load_encoder(f"llm2clip:{broken}?text={text}", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_on_cuda_matches_fp32_on_cpu(checkpoints, encoder):
    vision, text, *_ = checkpoints
    gpu = load_encoder(f"llm2clip:{vision}?text={text}", device="cuda")
    assert gpu.device.type == "cuda" and gpu.dtype in (torch.bfloat16, torch.float16)
    for cpu_rows, gpu_rows in ((encoder.encode_images(_images(4)), gpu.encode_images(_images(4))),
                               (encoder.encode_texts(TEXTS), gpu.encode_texts(TEXTS))):
        assert F.cosine_similarity(cpu_rows, gpu_rows.float(), dim=-1).min() > 0.99
