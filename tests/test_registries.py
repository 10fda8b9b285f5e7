"""The registries a user picks from by name: encoder families, projector types, alignment methods, evaluation tasks.
A new entry is one class or function plus its registration; an unknown name is one error listing the choices."""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from demo.tiny.lm import build_tiny_lm, build_tokenizer
from revision import projector as projector_module
from revision.align import make_alignment, method_names
from revision.encoders import ENCODERS, Encoder, encoder_families, load_encoder, register_encoder
from revision.eval_tasks import TASKS
from revision.evaluate import load_references
from revision.model import RevisionConfig, RevisionModel
from revision.projector import PROJECTORS, build_projector, projector_types, register_projector
from revision.registry import Registry


class MeanColour(Encoder):
    """A model-free family: an image's mean colour, a text's letter counts of "rgb" (enough to test the plumbing)."""

    def __init__(self, spec, device, dtype, batch_size=64, trust_remote_code=False):
        self.name, self.device, self.dtype, self.batch_size = f"mean_colour:{spec}", device, dtype, batch_size
        self.preprocess = lambda image: torch.from_numpy(np.asarray(image.convert("RGB"), np.float32)).permute(2, 0, 1)
        self._finish_init()

    def _image_features(self, pixels):
        return pixels.mean(dim=(2, 3)) + 1.0

    def _text_features(self, texts):
        return torch.tensor([[t.count(c) + 1.0 for c in "rgb"] for t in texts])


def test_a_new_encoder_family_is_one_class_and_its_registration(monkeypatch):
    monkeypatch.setitem(ENCODERS, "mean_colour", None)  # the test's entry is removed again afterwards
    register_encoder("mean_colour")(MeanColour)
    assert "mean_colour" in encoder_families()
    encoder = load_encoder("mean_colour:v1", device="cpu")
    assert isinstance(encoder, MeanColour) and encoder.name == "mean_colour:v1" and encoder.dim == 3
    rows = encoder.encode_images([Image.new("RGB", (4, 4), (255, 0, 0))])
    assert rows.shape == (1, 3) and torch.allclose(rows.norm(dim=1), torch.ones(1))
    assert encoder.encode_texts(["rr", "gb"]).shape == (2, 3)


def test_an_unknown_encoder_family_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"encoder 'nope:x': unknown encoder family 'nope'; choose one of "
                                         r"\('hf', 'open_clip', 'llm2clip'\)"):
        load_encoder("nope:x", device="cpu")
    # a folder whose name holds a colon is still a folder (here an empty one: no HF model in it)
    (tmp_path / "a:b").mkdir()
    with pytest.raises(Exception) as caught:
        load_encoder(str(tmp_path / "a:b"), device="cpu")
    assert "unknown encoder family" not in str(caught.value)


@pytest.fixture
def projectors(monkeypatch):
    """A copy of the projector registry for one test: registrations in it vanish afterwards."""
    fresh = Registry("projector type")
    fresh.update(PROJECTORS)
    monkeypatch.setattr(projector_module, "PROJECTORS", fresh)
    return fresh


def test_a_new_projector_type_is_one_function_and_its_registration(projectors):
    @register_projector("gated")
    def gated(in_dim, out_dim, tokens):
        return [torch.nn.Linear(in_dim, out_dim * tokens), torch.nn.Tanh()]

    assert "gated" in projectors and projector_types()[-1] == "gated"
    built = build_projector("gated", 8, 4, tokens=2)
    assert [type(m).__name__ for m in built] == ["Linear", "Tanh"] and built(torch.zeros(1, 8)).shape == (1, 8)
    # a checkpoint's projector_type reaches it through the model
    tokenizer = build_tokenizer()
    config = RevisionConfig(embed_dim=8, hidden_size=32, projector_type="gated", num_visual_tokens=2, base_model="unused")
    model = RevisionModel(build_tiny_lm("llama", tokenizer, seed=0, hidden_size=32), config)
    assert isinstance(model.projector[1], torch.nn.Tanh)


def test_a_projector_family_by_pattern_passes_its_groups(projectors):
    @register_projector("resNx", pattern=r"res(\d+)x")
    def residual(in_dim, out_dim, tokens, depth):
        return [torch.nn.Linear(in_dim, out_dim * tokens)] + [torch.nn.Identity() for _ in range(int(depth))]

    assert len(build_projector("res3x", 8, 4)) == 4
    assert len(build_projector("mlp4x_gelu", 8, 4)) == 7  # the registered families still answer


@pytest.mark.parametrize("name", ["mlp_relu", "mlp0x_gelu", "gelu", "linear2"])
def test_an_unknown_projector_type_names_the_choices(name):
    with pytest.raises(ValueError, match=re.escape(f"unknown projector type {name!r}; choose one of ('linear', 'mlpNx_gelu')")):
        build_projector(name, 8, 4)


def test_unknown_alignment_methods_and_tasks_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"unknown alignment method 'nope'; choose one of {method_names()}")):
        make_alignment("nope")
    (tmp_path / "refs.jsonl").write_text('{"question_id": 1, "answer": "yes"}\n')
    with pytest.raises(ValueError, match=re.escape(f"unknown evaluation task 'nope'; choose one of {tuple(TASKS)}")):
        load_references(tmp_path / "refs.jsonl", "nope")
