"""Encoders on tiny HF CLIP / SigLIP checkpoints built from a config and saved like real ones (no mocks)."""
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from demo.tiny.clip import build_tiny_clip
from revision.encoders import load_encoder, resolve_dtype, to_rgb
from revision.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]

TEXTS = ["a red circle on the left", "a big blue star", "purple", "a tiny green cross at the bottom in the middle"]


def _images(n: int, seed: int = 0, size=(40, 30)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return load_encoder(str(clip_dir), device="cpu", batch_size=3)


def test_shapes_unit_norms_and_name(encoder, clip_dir):
    images = encoder.encode_images(_images(7))
    texts = encoder.encode_texts(TEXTS)
    assert encoder.dim == 16 and images.shape == (7, 16) and texts.shape == (4, 16)
    assert images.dtype == torch.float32 and texts.dtype == torch.float32
    torch.testing.assert_close(images.norm(dim=1), torch.ones(7))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(4))
    assert encoder.name == f"hf:{clip_dir.resolve()}"
    assert encoder.dtype == torch.float32  # 'auto' on CPU
    assert encoder.encode_images([]).shape == (0, 16)
    # Different inputs give different vectors (the model is not degenerate).
    assert (images[0] - images[1]).abs().max() > 1e-3 and (texts[0] - texts[1]).abs().max() > 1e-3


def test_alone_equals_inside_a_batch(encoder):
    images = _images(5, seed=1)
    batch = encoder.encode_images(images, batch_size=5)
    for i in (0, 3):
        alone = encoder.encode_images([images[i]])
        assert (alone[0] - batch[i]).abs().max() < 1e-5
    texts = encoder.encode_texts(TEXTS, batch_size=4)  # padded to the longest text in the batch
    alone = encoder.encode_texts([TEXTS[2]])
    assert (alone[0] - texts[2]).abs().max() < 1e-5


def test_deterministic_across_builds_and_runs(encoder, clip_dir, tmp_path):
    again = build_tiny_clip(tmp_path / "again", seed=0)
    first, second = load_file(clip_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (again / "tokenizer.json").read_text() == (clip_dir / "tokenizer.json").read_text()
    other = load_encoder(f"hf:{again}", device="cpu")
    images = _images(3, seed=2)
    assert torch.equal(encoder.encode_images(images), other.encode_images(images))
    assert torch.equal(encoder.encode_texts(TEXTS), encoder.encode_texts(TEXTS))
    different = load_file(build_tiny_clip(tmp_path / "seed1", seed=1) / "model.safetensors")
    assert not torch.equal(first["visual_projection.weight"], different["visual_projection.weight"])


def test_pixel_path_matches_image_path_and_preprocess_pickles(encoder):
    images = _images(4, seed=3)
    preprocess = pickle.loads(pickle.dumps(encoder.preprocess))  # what a spawned DataLoader worker would get
    pixels = torch.stack([preprocess(im) for im in images])
    assert pixels.shape == (4, 3, 32, 32) and pixels.dtype == torch.uint8  # workers hand over bytes, not floats
    torch.testing.assert_close(encoder.encode_pixels(pixels), encoder.encode_images(images), atol=1e-6, rtol=0)
    assert_device_normalisation_is_the_processors(encoder, images)


def assert_device_normalisation_is_the_processors(encoder, images):
    """uint8 pixels * scale + shift (done on the device) equal the processor's own rescaled, normalised output,
    and so do the embeddings."""
    pixels = torch.stack([encoder.preprocess(im) for im in images])
    scale, shift = (t.view(1, -1, 1, 1) for t in encoder.pixel_affine)
    processed = encoder.preprocess.image_processor(images=[to_rgb(im) for im in images], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels.float() * scale + shift, processed.float(), atol=1e-5, rtol=0)
    with torch.no_grad():
        direct = torch.nn.functional.normalize(encoder._image_features(processed), dim=-1)
    torch.testing.assert_close(encoder.encode_pixels(pixels), direct, atol=1e-5, rtol=0)


def test_every_pil_mode_becomes_rgb(encoder):
    rgb = Image.new("RGB", (20, 20), (200, 30, 30))
    gray16 = Image.fromarray(np.full((20, 20), 32768, np.uint16))  # mid-grey in 16 bits
    assert gray16.mode == "I;16"
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    modes = [rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("CMYK"), palette, gray16, transparent, rgb.convert("1")]
    converted = [to_rgb(im) for im in modes]
    assert all(im.mode == "RGB" and im.size == (20, 20) for im in converted)
    assert converted[4].getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to white
    assert converted[5].getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    assert converted[3].getpixel((0, 0)) == converted[1].getpixel((0, 0)) == (200, 30, 30)
    embeds = encoder.encode_images(modes)
    assert embeds.shape == (7, 16) and torch.isfinite(embeds).all()
    torch.testing.assert_close(embeds[1], encoder.encode_images([rgb])[0])  # opaque RGBA == its RGB


def test_siglip(tmp_path):
    siglip = load_encoder(f"hf:{build_tiny_clip(tmp_path / 'siglip', siglip=True)}", device="cpu")
    assert siglip.pad_to_max and siglip.dim == 32
    texts = siglip.encode_texts(TEXTS)
    images = siglip.encode_images(_images(2))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(4))
    assert images.shape == (2, 32)
    assert (siglip.encode_texts([TEXTS[1]])[0] - texts[1]).abs().max() < 1e-5
    assert_device_normalisation_is_the_processors(siglip, _images(3, seed=5))  # mean = std = 0.5, unlike CLIP


def test_specs_and_dtypes(tmp_path):
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_encoder(str(tmp_path / "missing" / "model"))
    with pytest.raises(FileNotFoundError, match="LLM2CLIP checkpoint .* no such folder"):
        load_encoder(f"llm2clip:{tmp_path / 'missing'}")


def test_open_clip_local_dir(tmp_path):
    """open_clip's `local-dir:` form, on a tiny random open_clip CLIP saved the way open_clip saves one."""
    import open_clip
    model_cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    reference = open_clip.CLIP(**model_cfg).eval()
    torch.save(reference.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    encoder = load_encoder(f"open_clip:local-dir:{tmp_path}", device="cpu")
    assert encoder.dim == 32 and encoder.name == f"open_clip:local-dir:{tmp_path}"
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)) for _ in range(3)]
    image_embeds, text_embeds = encoder.encode_images(images), encoder.encode_texts(TEXTS[:3])
    for embeds in (image_embeds, text_embeds):
        assert embeds.shape == (3, 32) and torch.allclose(embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    with torch.no_grad():  # the loaded weights are the saved ones: same features as the reference model
        pixels = torch.stack([encoder.preprocess(im) for im in images])
        expected = torch.nn.functional.normalize(reference.encode_image(pixels), dim=-1)
    assert (image_embeds - expected).abs().max() < 1e-5
    assert (encoder.encode_images(images[1:2])[0] - image_embeds[1]).abs().max() < 1e-5


def test_open_clip_checkpoint_through_image_embed(tmp_path):
    """A real open_clip architecture (ViT-S-32-alt, the smallest ViT config open_clip ships; random weights), saved
    the way open_clip's trainer saves a checkpoint, encoded by `image_embed.py --encoder open_clip:ARCH/CKPT`:
    the stored features equal open_clip's own encode_image / encode_text after its own preprocessing."""
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32-alt")
    model.eval()
    checkpoint = tmp_path / "epoch_1.pt"  # open_clip's training/main.py layout: DDP-prefixed state_dict + epoch/name
    torch.save({"epoch": 1, "name": "revision-test", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               checkpoint)
    rng = np.random.default_rng(1)
    (tmp_path / "images").mkdir()
    for i, size in enumerate([(48, 40), (300, 260), (224, 224)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(tmp_path / "images" / f"im{i}.png")
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS[:3]) + "\n")
    proc = subprocess.run([sys.executable, "image_embed.py", "--images", str(tmp_path / "images"), "--texts",
                           str(tmp_path / "texts.txt"), "--encoder", f"open_clip:ViT-S-32-alt/{checkpoint}",
                           "--out", str(tmp_path / "emb"), "--device", "cpu", "--store_dtype", "float32",
                           "--num_workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    images, texts = EmbeddingStore(tmp_path / "emb" / "image").load_all(), EmbeddingStore(tmp_path / "emb" / "text").load_all()
    tokenizer = open_clip.get_tokenizer("ViT-S-32-alt")
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(tmp_path / "images" / Path(p).name)) for p in images.image_paths])
        expected_images = F.normalize(model.encode_image(pixels), dim=-1).numpy()
        expected_texts = F.normalize(model.encode_text(tokenizer(texts.captions)), dim=-1).numpy()
    assert images.embeds.shape == (3, 256) and texts.embeds.shape == (3, 256)
    assert np.abs(images.embeds - expected_images).max() < 1e-5
    assert np.abs(texts.embeds - expected_texts).max() < 1e-5
    assert json.loads((tmp_path / "emb" / "image" / "manifest.json").read_text())["encoder"] == f"open_clip:ViT-S-32-alt/{checkpoint}"


def test_optional_parts_without_their_extra_name_it():
    """With open_clip / lmms-eval missing (blocked in a fresh interpreter), each says which extra to install."""
    script = textwrap.dedent("""
        import sys
        sys.modules["open_clip"] = None; sys.modules["lmms_eval"] = None  # as if not installed
        from revision.encoders import load_encoder
        from revision.lmms_eval_model import ReVision
        for make in (lambda: load_encoder("open_clip:ViT-S-32-alt", device="cpu"), lambda: ReVision("unused")):
            try:
                make()
            except ImportError as e:
                print(e)
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2, proc.stdout + proc.stderr
    assert "pip install 'revision[openclip]'" in lines[0] and "pip install 'revision[lmms]'" in lines[1]


def test_requirement_floors_name_found_and_needed():
    from revision.requirements import requirement_problems

    assert requirement_problems((3, 11, 7), {"torch": "2.14.1+cu130", "transformers": "5.7.0"}) == []
    assert requirement_problems((3, 9, 18), {"torch": "2.12.1", "transformers": "5.1.0"}) == [
        "ReVision needs Python >= 3.10, found 3.9.18",
        "ReVision needs torch >= 2.13, found torch 2.12.1: pip install 'torch>=2.13'",
        "ReVision needs transformers >= 5.7, found transformers 5.1.0: pip install 'transformers>=5.7'",
    ]
    assert requirement_problems((3, 11), {"torch": None, "transformers": "5.24.0"}) == [
        "ReVision needs torch >= 2.13, which is not installed (README: Installing)"]
