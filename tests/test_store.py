import json
import os
import pickle

import numpy as np
import pytest

from revision.store import (
    EmbeddingStore, Shard, StoreError, StoreWriter, UnsafePickleError, check_unique_ids, load_shard,
    safe_load, write_reference_shard, write_store,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rows():
    rng = np.random.default_rng(0)
    return [f"id{i}" for i in range(10)], rng.normal(size=(10, 12)), [f"caption {i}" for i in range(10)]


def test_columnar_round_trip_normalises_and_shards(tmp_path, rows):
    ids, embeds, captions = rows
    manifest = write_store(tmp_path / "s", "text", ids, embeds, captions, encoder="hf:tiny", shard_size=4)
    assert [e["rows"] for e in manifest["shards"]] == [4, 4, 2]
    assert manifest["count"] == 10 and manifest["complete"] and manifest["encoder"] == "hf:tiny"
    store = EmbeddingStore(tmp_path / "s")
    store.verify()
    got = store.load_all()
    assert got.ids == ids and got.captions == captions and got.embeds.dtype == np.float16
    np.testing.assert_allclose(got.embeds.astype(np.float64), _unit(embeds), atol=2e-3)
    assert len(store) == 10 and store.dim == 12 and store.kind == "text"


def test_float32_store_keeps_precision(tmp_path, rows):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "image", ids, embeds, captions, dtype="float32")
    got = EmbeddingStore(tmp_path / "s", kind="image").load_all()
    assert got.image_paths == captions
    np.testing.assert_allclose(got.embeds, _unit(embeds), atol=1e-6)


def test_reference_layout_read_in_numeric_order(tmp_path, rows):
    ids, embeds, captions = rows
    folder = tmp_path / "ref"
    folder.mkdir()
    # "text_embeds_10" must come after "text_embeds_2", as the reference code numbers its parts
    write_reference_shard(folder / "text_embeds_10.pkl", Shard("text", ids[5:], embeds[5:], captions[5:]))
    write_reference_shard(folder / "text_embeds_2.pkl", Shard("text", ids[:5], embeds[:5], captions[:5]))
    store = EmbeddingStore(folder)
    assert store.kind == "text" and store.dim == 12 and store.encoder is None
    got = store.load_all()
    assert got.ids == ids and got.captions == captions
    assert len(store) == 10


def test_reference_layout_mixed_dtypes_and_list_rows_decode_like_numpy_stack(tmp_path):
    path = tmp_path / "mixed.pkl"
    rows = [np.arange(4, dtype=np.float16), np.arange(4, dtype=np.float32) + 1, [9.0, 8.0, 7.0, 6.0]]
    for embeds in (rows[:2], rows):  # all arrays (the fast path), then a plain list among them (row by row)
        path.write_bytes(pickle.dumps([{"id": i, "caption": f"c{i}", "embed": e} for i, e in enumerate(embeds)]))
        shard = load_shard(path)
        want = np.stack([np.asarray(e) for e in embeds])
        assert shard.embeds.dtype == want.dtype and shard.ids == [str(i) for i in range(len(embeds))]
        np.testing.assert_array_equal(shard.embeds, want)


def test_writer_unit_rows_and_dropped_page_cache_keep_the_bytes(tmp_path, rows):
    ids, embeds, captions = rows
    unit = (embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).astype(np.float32)
    writer = StoreWriter(tmp_path / "s", "text", "enc", 12, "float32", shard_size=4, drop_page_cache=True)
    writer.add(ids, unit, captions, unit_rows=True)  # copied as they are: no check, no renormalisation
    writer.close()
    store = EmbeddingStore(tmp_path / "s")
    store.verify()
    np.testing.assert_array_equal(store.load_all().embeds, unit)


def test_reference_layout_row_errors_name_file_and_row(tmp_path):
    path = tmp_path / "bad.pkl"
    records = [{"id": "a", "caption": "x", "embed": np.ones(4)}, {"id": "b", "caption": "y", "embed": np.ones(5)}]
    path.write_bytes(pickle.dumps(records))
    with pytest.raises(StoreError, match=r"bad\.pkl: row 1 \(id 'b'\)"):
        load_shard(path)
    path.write_bytes(pickle.dumps([{"id": "a"}]))
    with pytest.raises(StoreError, match="row 0 lacks"):
        load_shard(path)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([{"id": "a", "caption": "x", "embed": _Payload(marker)}]))
    with pytest.raises(UnsafePickleError, match=r"evil\.pkl: refused to unpickle global '(posix|os)\.system'"):
        load_shard(path)
    assert not marker.exists()
    # also refused when the folder is opened as a store
    with pytest.raises(UnsafePickleError):
        EmbeddingStore(tmp_path)
    assert not marker.exists()


def test_truncated_pickle_is_a_clear_error(tmp_path, rows):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions)
    shard = tmp_path / "s" / "text_embeds_00000.pkl"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(StoreError, match="text_embeds_00000.pkl: not a readable pickle"):
        safe_load(shard)
    with pytest.raises(StoreError, match="sha256"):
        EmbeddingStore(tmp_path / "s").verify()


def test_manifest_naming_missing_shard_is_an_error(tmp_path, rows):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions, shard_size=5)
    (tmp_path / "s" / "text_embeds_00001.pkl").unlink()
    with pytest.raises(StoreError, match="text_embeds_00001.pkl which is missing"):
        EmbeddingStore(tmp_path / "s")


def test_writer_resumes_after_a_crash_and_adopts_renamed_shards(tmp_path, rows):
    ids, embeds, captions = rows
    root = tmp_path / "s"
    writer = StoreWriter(root, "text", "enc", 12, shard_size=3)
    writer.add(ids[:7], embeds[:7], captions[:7])  # two full shards written, one row buffered
    writer._shard_writer.shutdown(wait=True)  # the second shard's background write has reached the disk (no race)
    # a crash after a shard was renamed into place but before the manifest recorded it
    write_reference_shard(root / "ignored.tmp", Shard("text", ids[6:7], embeds[6:7]))  # a half write
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"].pop()
    manifest["count"] = 3
    (root / "manifest.json").write_text(json.dumps(manifest))
    del writer

    resumed = StoreWriter(root, "text", "enc", 12, shard_size=3)
    assert resumed.done_ids == set(ids[:6])  # the orphan shard was adopted
    assert not (root / "ignored.tmp").exists()
    todo = [i for i in range(10) if ids[i] not in resumed.done_ids]
    resumed.add([ids[i] for i in todo], embeds[todo], [captions[i] for i in todo])
    resumed.close()
    got = EmbeddingStore(root).load_all()
    assert sorted(got.ids) == sorted(ids) and len(got.ids) == len(set(got.ids))


def test_writer_refuses_other_encoder_or_dim_unless_overwrite(tmp_path, rows):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions, encoder="hf:a")
    with pytest.raises(StoreError, match=r"encoder 'hf:a' \(asked for 'hf:b'\).*--overwrite"):
        StoreWriter(tmp_path / "s", "text", "hf:b", 12)
    with pytest.raises(StoreError, match=r"dim 12 \(asked for 16\)"):
        StoreWriter(tmp_path / "s", "text", "hf:a", 16)
    write_store(tmp_path / "s", "text", ids[:2], np.ones((2, 16)), encoder="hf:b", overwrite=True)
    store = EmbeddingStore(tmp_path / "s")
    assert store.encoder == "hf:b" and store.dim == 16 and len(store) == 2
    assert sorted(p.name for p in (tmp_path / "s").glob("*.pkl")) == ["text_embeds_00000.pkl"]


def test_writer_rejects_nan_zero_and_wrong_shape(tmp_path):
    writer = StoreWriter(tmp_path / "s", "image", "enc", 4)
    bad = np.ones((3, 4))
    bad[1, 2] = np.nan
    with pytest.raises(StoreError, match=r"id 'b' has an unusable embedding \(NaN\)"):
        writer.add(["a", "b", "c"], bad)
    with pytest.raises(StoreError, match=r"id 'a' has an unusable embedding \(all-zero vector\)"):
        writer.add(["a"], np.zeros((1, 4)))
    with pytest.raises(StoreError, match=r"shape \(2, 5\)"):
        writer.add(["a", "b"], np.ones((2, 5)))


def test_duplicate_ids_named():
    with pytest.raises(StoreError, match="duplicate id 'x' \\(row 2\\)"):
        check_unique_ids(["x", "y", "x"], "data.jsonl")
