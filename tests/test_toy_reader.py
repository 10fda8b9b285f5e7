"""demo.reader: the conditional reader answers two-object questions from embeddings that bind each attribute to its
object, and cannot from embeddings that only list what is there, or carry nothing."""
import json

import numpy as np
import pytest

from demo.clip import ATTRIBUTES
from demo.reader import ANSWERS, IDEAL_CODES, binding_questions, ideal_embeddings, main, object_code, reader_accuracy
from demo.world import WorldSizes, build_world, make_world
from revision.store_writer import write_store

pytestmark = pytest.mark.usefixtures("one_thread")


def scenes_of(seed, n):
    world = make_world(seed, WorldSizes(paired=0, unpaired_images=n, unpaired_texts=0, instruct=0, text_only=0, eval=0))
    return [item.scene.attributes() for item in world.unpaired_images]


def one_hot(kind, value):
    return np.eye(len(ATTRIBUTES[kind]))[ATTRIBUTES[kind].index(value)]


CODED = tuple(ATTRIBUTES)  # colour, shape, size, position: 8 + 6 + 2 + 9 = 25 values


def bag_code(scene):
    """Which colours, shapes and positions occur, summed over the objects: nothing says which goes with which."""
    return sum(np.concatenate([one_hot(k, o[k]) for k in CODED]) for o in scene["objects"])


@pytest.fixture(scope="module")
def worlds():
    return scenes_of(5, 1000), scenes_of(6, 150)


def test_questions_of_a_two_object_scene():
    scene = {"count": 2, "objects": [{"shape": "star", "colour": "blue", "size": "small", "position": "top left"},
                                     {"shape": "square", "colour": "red", "size": "large", "position": "middle"}]}
    embeds, queries, answers, asked = binding_questions(np.eye(2, dtype=np.float32), [{"count": 1, "objects": []}, scene])
    # per object: named by colour -> its shape, by shape -> its colour, by size or position -> both: 6 each
    assert len(answers) == 12 and (embeds == [0, 1]).all()
    star_colour = [i for i in range(12) if asked[i] == "colour" and queries[i][8 + 3] == 1]  # named by shape "star"
    assert [ANSWERS[answers[i]] for i in star_colour] == [("colour", "blue")]
    assert len(binding_questions(np.eye(2), [{"count": 1, "objects": []}, scene], per_image=3)[2]) == 3
    same_size = {**scene, "objects": [dict(scene["objects"][0], size="large"), scene["objects"][1]]}
    assert len(binding_questions(np.eye(1), [same_size])[2]) == 8  # size no longer names either object
    with pytest.raises(ValueError, match="no two-object scenes"):
        binding_questions(np.eye(1), [{"count": 1, "objects": []}])


def test_reader_answers_from_bound_embeddings_only(worlds):
    train, held_out = worlds
    rng = np.random.default_rng(0)

    def score(code):
        def embed(scenes):
            return np.array([code(s) for s in scenes]) + 0.05 * rng.standard_normal((len(scenes), 51))

        return reader_accuracy(embed(train), train, embed(held_out), held_out, epochs=30)

    bound, bag = score(object_code), score(lambda s: np.pad(bag_code(s), (0, 26)))
    assert bound["colour"] > 0.75 and bound["shape"] > 0.75, bound  # 500 two-object scenes: more would read more
    # a bag of attributes: the reader names one of the two objects' colours, right about half the time
    assert bag["colour"] < 0.65 and bag["shape"] < 0.6, bag
    noise = reader_accuracy(rng.standard_normal((len(train), 50)), train, rng.standard_normal((len(held_out), 50)),
                            held_out, epochs=5)
    assert noise["colour"] < 0.3 and noise["shape"] < 0.35, noise  # chance: 1/8 and 1/6


def test_cli_reads_stores_and_names_foreign_ids(tmp_path, capsys):
    world = build_world(tmp_path / "world", seed=2, sizes=WorldSizes(4, 60, 4, 0, 0, 40, 1, 1))
    scenes = {it.id: it.scene.attributes() for it in world.unpaired_images + world.eval}
    for split, items in (("train", world.unpaired_images), ("eval", world.eval)):
        ids = [it.id for it in items]
        write_store(tmp_path / split, "image", ids, np.array([object_code(scenes[i]) for i in ids], np.float32), dtype="float32")
    main(["--world", str(tmp_path / "world"), "--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"),
          "--epochs", "2", "--out", str(tmp_path / "reader.json")])
    assert "binding reader (60 images" in capsys.readouterr().out and (tmp_path / "reader.json").is_file()
    main(["--world", str(tmp_path / "world"), "--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"),
          "--epochs", "1,2", "--code", "pairs", "--out", str(tmp_path / "pairs.json")])
    printed = capsys.readouterr().out
    assert "1 epochs, pairs code" in printed and "2 epochs, pairs code" in printed
    assert [r["epochs"] for r in json.loads((tmp_path / "pairs.json").read_text())["results"]] == [1, 2]
    with pytest.raises(SystemExit):
        main(["--world", str(tmp_path / "world"), "--train", str(tmp_path / "train"), "--eval", str(tmp_path / "eval"),
              "--epochs", "1,ten"])
    assert "--epochs: whole numbers" in capsys.readouterr().err
    write_store(tmp_path / "foreign", "image", ["nobody"], np.ones((1, 50), np.float32), dtype="float32")
    with pytest.raises(ValueError, match="1 ids are not scenes of"):
        main(["--world", str(tmp_path / "world"), "--train", str(tmp_path / "foreign"), "--eval", str(tmp_path / "eval")])


SCENE = {"count": 2, "objects": [{"shape": "square", "colour": "red", "size": "large", "position": "middle"},
                                 {"shape": "star", "colour": "blue", "size": "small", "position": "top left"}]}


def test_ideal_codes_say_which_attribute_goes_with_which_object():
    objects = object_code(SCENE)
    first = np.concatenate([one_hot(k, SCENE["objects"][1][k]) for k in CODED])  # the star comes first in reading order
    assert objects.shape == (51,) and (objects[:25] == first).all() and objects[-1] == 1
    assert (object_code({"count": 1, "objects": SCENE["objects"][:1]})[25:] == 0).all()  # no second object, count 1
    places = IDEAL_CODES["places"](SCENE).reshape(9, -1)
    assert places[4].sum() == 3 and places[0].sum() == 3 and places[[1, 2, 3, 5, 6, 7, 8]].sum() == 0
    pairs = IDEAL_CODES["pairs"](SCENE)
    colour_shape = pairs[:48].reshape(8, 6)  # the first pair of attributes: colour x shape
    assert colour_shape.sum() == 2 and colour_shape[ATTRIBUTES["colour"].index("red"), ATTRIBUTES["shape"].index("square")] == 1
    assert colour_shape[ATTRIBUTES["colour"].index("red"), ATTRIBUTES["shape"].index("star")] == 0  # not swapped


def test_ideal_embeddings_rotate_without_losing_the_code():
    scenes = [SCENE, {"count": 1, "objects": SCENE["objects"][1:]}]
    codes = np.stack([object_code(s) for s in scenes])
    rotated = ideal_embeddings(scenes, "objects", width=64)
    assert rotated.shape == (2, 64) and np.allclose(rotated @ rotated.T, codes @ codes.T, atol=1e-5)  # orthonormal
    assert np.allclose(ideal_embeddings(scenes, "objects", width=64), rotated)  # one fixed map per seed
    assert ideal_embeddings(scenes, "pairs", width=32).shape == (2, 32)  # wider codes are projected
