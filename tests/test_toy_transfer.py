"""The text->image readout that explains the toy table: a planted gap orthogonal to the classes does not hurt it,
a gap along them does (the run on a pipeline folder is in test_toy_pipeline.py)."""
import numpy as np

from demo.transfer import readout_accuracy


def test_readout_ignores_an_orthogonal_gap_but_not_one_along_the_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    prototypes = np.eye(8)[:3] * 2.0
    images = prototypes[labels] + 0.3 * rng.standard_normal((600, 8))
    texts = prototypes[labels] + 0.3 * rng.standard_normal((600, 8))
    assert readout_accuracy(texts, labels, images, labels, 3) > 0.95
    orthogonal = np.eye(8)[7] * 5.0  # the gap lives in a dimension no class uses
    assert readout_accuracy(texts + orthogonal, labels, images, labels, 3) > 0.95
    along = (prototypes[0] - prototypes[1]) * 1.5  # the gap moves texts of class 1 onto class 0's region
    assert readout_accuracy(texts + along, labels, images, labels, 3) < 0.8

