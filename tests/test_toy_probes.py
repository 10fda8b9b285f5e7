"""demo.probes: what embeddings carry, measured by linear probes; at chance when they carry nothing."""
import numpy as np
import pytest

from demo.probes import PROBED, logistic_probe, probe_embeddings, probe_store
from demo.world import COLOURS, POSITIONS, SHAPES, SIZES, WorldSizes, make_world
from revision.store_writer import write_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes():
    world = make_world(3, WorldSizes(paired=0, unpaired_images=600, unpaired_texts=0, instruct=0, text_only=0, eval=0))
    return [item.scene.attributes() for item in world.unpaired_images]


def one_hot_embeddings(scenes, carried, rng):
    """Per scene: one-hot blocks of the carried attributes of its first object (+ count), plus noise, unit rows."""
    values = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}
    blocks = []
    for s in scenes:
        parts = [np.eye(len(values[k]))[values[k].index(s["objects"][0][k])] for k in carried]
        parts.append(np.eye(2)[s["count"] - 1])
        blocks.append(np.concatenate(parts))
    x = np.array(blocks) + 0.05 * rng.standard_normal((len(scenes), sum(len(values[k]) for k in carried) + 2))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_probes_read_what_is_carried_and_nothing_else(scenes):
    rng = np.random.default_rng(0)
    results = probe_embeddings(one_hot_embeddings(scenes, ["colour", "size"], rng), scenes)
    assert set(results) == set(PROBED)
    assert results["colour"]["acc"] > 0.95 and results["size"]["acc"] > 0.95 and results["count"]["acc"] > 0.95
    for name in ("shape", "position"):  # not in the embeddings: at chance (within a few binomial SE of ~150 rows)
        assert results[name]["acc"] < 1 / {"shape": 6, "position": 9}[name] + 0.12, (name, results[name])


def test_two_object_probes_read_attributes_bound_to_their_object(scenes):
    """Embeddings of each object's colour in reading order bind it: two-object colour near 1; the colour of the
    first object listed only (not bound to a place) leaves the second object's colour at chance."""
    rng = np.random.default_rng(4)
    colours, positions = list(COLOURS), list(POSITIONS)

    def colour_blocks(scene, slots):
        ordered = sorted(scene["objects"], key=lambda o: positions.index(o["position"]))
        return np.concatenate([np.eye(len(colours))[colours.index(ordered[k]["colour"])] if k < len(ordered) else
                               np.zeros(len(colours)) for k in slots] + [np.eye(2)[scene["count"] - 1]])

    bound = np.array([colour_blocks(s, (0, 1)) for s in scenes]) + 0.05 * rng.standard_normal((len(scenes), 2 * len(colours) + 2))
    first = np.array([colour_blocks(s, (0,)) for s in scenes]) + 0.05 * rng.standard_normal((len(scenes), len(colours) + 2))
    assert probe_embeddings(bound, scenes)["two-object colour"]["acc"] > 0.95
    half = probe_embeddings(first, scenes)["two-object colour"]  # the mean of slot 0 (read) and slot 1 (chance)
    assert 0.45 < half["acc"] < 0.5 + 1 / len(colours) + 0.1, half
    assert probe_embeddings(bound, scenes)["two-object shape"]["acc"] < 1 / 6 + 0.12


def test_random_embeddings_probe_at_chance(scenes):
    results = probe_embeddings(np.random.default_rng(1).standard_normal((len(scenes), 32)), scenes)
    for name, r in results.items():
        assert r["acc"] < r["chance"] + 0.15, (name, r)


def test_probe_store_keys_rows_by_id_and_refuses_foreign_ids(tmp_path, scenes):
    world = make_world(3, WorldSizes(paired=0, unpaired_images=600, unpaired_texts=0, instruct=0, text_only=0, eval=0))
    (tmp_path / "world").mkdir()
    import json
    (tmp_path / "world" / "scenes.jsonl").write_text("".join(
        json.dumps({"id": it.id, "split": it.split, "attributes": it.scene.attributes()}) + "\n" for it in world.unpaired_images))
    ids = [it.id for it in world.unpaired_images]
    embeds = one_hot_embeddings(scenes, ["shape"], np.random.default_rng(2)).astype(np.float32)
    write_store(tmp_path / "store", "image", ids, embeds, dtype="float32")
    assert probe_store(tmp_path / "store", tmp_path / "world")["shape"]["acc"] > 0.95
    write_store(tmp_path / "other", "image", ["nobody"] + ids[1:], embeds, dtype="float32")
    with pytest.raises(ValueError, match="not scenes of"):
        probe_store(tmp_path / "other", tmp_path / "world")


def test_logistic_probe_separates_a_linearly_separable_problem():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    assert logistic_probe(x[:100], y[:100], x[100:], y[100:]) > 0.93
