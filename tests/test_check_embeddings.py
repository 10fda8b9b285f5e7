"""revision.check_embeddings on stores in the official embed.py record layout (pkl lists of {id, caption|image_path,
embed}): duplicate ids, the all-zero rows embed.py writes for unreadable images, missing inputs, a reference store."""
import json
import pickle

import numpy as np

from revision.check_embeddings import main


def _unit(rng, n, d=8):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _official_shards(folder, kind, ids, embeds, per_shard=3):
    folder.mkdir(parents=True)
    key = "caption" if kind == "text" else "image_path"
    for part, start in enumerate(range(0, len(ids), per_shard), 1):
        records = [{"id": i, key: f"{i}.jpg" if kind == "image" else f"caption {i}", "embed": e}
                   for i, e in zip(ids[start:start + per_shard], embeds[start:start + per_shard])]
        with open(folder / f"{kind}_embeds_{part}.pkl", "wb") as f:
            pickle.dump(records, f)


def test_clean_official_stores_pass(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = {"images": [{"id": f"img_{i}", "image": f"{i}.jpg"} for i in range(5)],
            "texts": [{"id": f"txt_{i}", "text": f"caption {i}"} for i in range(7)]}
    (tmp_path / "dataset.json").write_text(json.dumps(data))
    _official_shards(tmp_path / "text", "text", [t["id"] for t in data["texts"]], _unit(rng, 7))
    _official_shards(tmp_path / "image", "image", [t["id"] for t in data["images"]], _unit(rng, 5))
    for kind in ("text", "image"):
        assert main([str(tmp_path / kind), "--data_json", str(tmp_path / "dataset.json"),
                     "--reference", str(tmp_path / kind)]) == 0
    assert "ok: ids unique, one width, unit norms, every input present, cosine to reference >= 0.99" in capsys.readouterr().out


def test_every_problem_is_found_and_named(tmp_path, capsys):
    rng = np.random.default_rng(1)
    ids = ["img_0", "img_1", "img_2", "img_3", "img_1", "img_9"]  # img_1 twice; img_9 is no input
    embeds = _unit(rng, 6)
    embeds[2] = 0  # what embed.py writes for an image it cannot open
    embeds[3] *= 1.5
    _official_shards(tmp_path / "image", "image", ids, embeds)
    (tmp_path / "dataset.json").write_text(json.dumps({"images": [{"id": f"img_{i}", "image": f"{i}.jpg"} for i in range(5)]}))
    reference = embeds.copy()
    reference[0] = _unit(rng, 1)[0]
    _official_shards(tmp_path / "reference", "image", ids, reference)
    report = tmp_path / "report.json"
    assert main([str(tmp_path / "image"), "--data_json", str(tmp_path / "dataset.json"), "--reference",
                 str(tmp_path / "reference"), "--report", str(report)]) == 1
    found = json.loads(report.read_text())
    assert found["rows"] == 6 and found["unique_ids"] == 5 and found["dims"] == [8]
    assert found["duplicate_ids"] == ["img_1"] and found["zero_rows"] == ["img_2"] and found["off_norm_rows"] == ["img_3"]
    assert found["missing_ids"] == ["img_4"] and found["extra_ids"] == ["img_9"]
    assert found["reference"]["below"] == 2 and set(found["reference"]["worst"][:2]) == {"img_0", "img_2"}
    assert found["reference"]["shared"] == 4  # img_1 is twice in the reference: not compared
    printed = capsys.readouterr().out
    assert printed.count("FAIL") == 6 and "all-zero rows: inputs the encoder could not read" in printed


def test_shards_of_two_widths_fail(tmp_path, capsys):
    rng = np.random.default_rng(2)
    folder = tmp_path / "text"
    _official_shards(folder, "text", ["a", "b", "c"], _unit(rng, 3, d=8))
    with open(folder / "text_embeds_2.pkl", "wb") as f:
        pickle.dump([{"id": "d", "caption": "d", "embed": _unit(rng, 1, d=6)[0]}], f)
    assert main([str(folder)]) == 1
    assert "dim 6" in capsys.readouterr().out
