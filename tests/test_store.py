import json
import os
import pickle
import re
import socket

import numpy as np
import pytest

from revision.errors import StoreError, UnsafePickleError
from revision.locks import LockedError
from revision.nofollow import LinkError
from revision.safe_pickle import safe_load
from revision.shards import Shard, load_shard, write_reference_shard, write_shard
from revision.store import EmbeddingStore, check_unique_ids
from revision.store_writer import StoreWriter, write_store


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


def test_writer_resumes_after_a_crash_rewriting_unrecorded_shards(tmp_path, rows):
    ids, embeds, captions = rows
    root = tmp_path / "s"
    writer = StoreWriter(root, "text", "enc", 12, shard_size=3)
    positions = [(0, i) for i in range(10)]
    writer.add(ids[:7], embeds[:7], captions[:7], positions=positions[:7])  # two full shards written, one row buffered
    writer._shard_writer.shutdown(wait=True)  # the second shard's background write has reached the disk (no race)
    # a crash after the second shard was renamed into place but before the manifest recorded it, and a half write
    assert json.loads((root / "manifest.json").read_text())["shards"][-1]["end"] == [0, 3]
    write_reference_shard(root / "text_embeds_00002.pkl.tmp", Shard("text", ids[6:7], embeds[6:7]))
    (root / "someone_elses.tmp").write_text("not ours")
    writer.lock.release()  # what the kernel does when the process dies
    del writer

    resumed = StoreWriter(root, "text", "enc", 12, shard_size=3)
    assert resumed.resume.end == (0, 3) and resumed.resume.consumed == 3  # after the one recorded shard
    assert resumed.done_ids == set(ids[:3])
    assert not (root / "text_embeds_00001.pkl").exists() and not (root / "text_embeds_00002.pkl.tmp").exists()
    assert (root / "someone_elses.tmp").read_text() == "not ours"  # never another writer's temp file
    resumed.add(ids[3:], embeds[3:], captions[3:], positions=positions[3:])
    resumed.close()
    got = EmbeddingStore(root).load_all()
    assert got.ids == ids


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


@pytest.mark.parametrize("name", ["../victim.txt", "ABSOLUTE", "sub/x.pkl", "..", ".lock", ""])
def test_manifest_shard_names_must_stay_inside_the_store(tmp_path, rows, name):
    ids, embeds, captions = rows
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    write_store(tmp_path / "s", "text", ids, embeds, captions)
    manifest_path = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"].append({"name": str(victim) if name == "ABSOLUTE" else name, "rows": 1, "sha256": "0"})
    manifest_path.write_text(json.dumps(manifest))
    for opening in (lambda: StoreWriter(tmp_path / "s", "text", "unknown", 12, overwrite=True),
                    lambda: EmbeddingStore(tmp_path / "s")):
        with pytest.raises(StoreError, match=r"manifest.json: shard entry 1 has name .* not a plain file name"):
            opening()
    assert victim.read_text() == "keep me"
    assert (tmp_path / "s" / "text_embeds_00000.pkl").exists()  # refused before any file was touched


def test_tampered_shard_is_refused_naming_it(tmp_path, rows):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions, shard_size=4)
    path = tmp_path / "s" / "text_embeds_00001.pkl"
    shard = load_shard(path)
    shard.embeds[0] = -shard.embeds[0]  # still a valid shard of unit rows: only the hash can tell
    write_shard(path, shard)
    with pytest.raises(StoreError, match=r"text_embeds_00001.pkl: sha256 .* differs from the manifest"):
        EmbeddingStore(tmp_path / "s").load_all()
    with pytest.raises(StoreError, match=r"text_embeds_00001.pkl: sha256"):
        EmbeddingStore(tmp_path / "s").verify()
    assert len(EmbeddingStore(tmp_path / "s", verify=False).load_all()) == 10  # --no_verify: the user's call


def test_second_writer_is_refused_naming_the_first_and_keeps_its_temp_files(tmp_path, rows):
    ids, embeds, captions = rows
    first = StoreWriter(tmp_path / "s", "text", "enc", 12, shard_size=4)
    first.add(ids[:5], embeds[:5], captions[:5])
    (tmp_path / "s" / "text_embeds_00001.pkl.tmp").write_bytes(b"first writer's half-written shard")
    with pytest.raises(LockedError, match=rf"being written by pid {os.getpid()} on host {socket.gethostname()}"):
        StoreWriter(tmp_path / "s", "text", "enc", 12, overwrite=True)
    assert (tmp_path / "s" / "text_embeds_00001.pkl.tmp").exists()
    first.add(ids[5:], embeds[5:], captions[5:])
    first.close()
    assert EmbeddingStore(tmp_path / "s").load_all().ids == ids
    StoreWriter(tmp_path / "s", "text", "enc", 12).close()  # released: the next writer gets in


def test_rank_parts_share_a_store_but_not_with_a_whole_store_writer(tmp_path, rows):
    ids, embeds, captions = rows
    part0 = StoreWriter(tmp_path / "s", "text", "enc", 12, part=(0, 2))
    part1 = StoreWriter(tmp_path / "s", "text", "enc", 12, part=(1, 2))  # ranks coexist
    with pytest.raises(LockedError, match=r"part-00000-of-00002: pid \d+"):
        StoreWriter(tmp_path / "s", "text", "enc", 12, part=(0, 2))  # the same rank twice
    with pytest.raises(LockedError, match=r"part-00000-of-00002: pid .*part-00001-of-00002: pid"):
        StoreWriter(tmp_path / "s", "text", "enc", 12)  # a whole-store writer beside ranks
    part0.add(ids[:5], embeds[:5], captions[:5])
    part1.add(ids[5:], embeds[5:], captions[5:])
    part0.close(), part1.close()
    assert sorted(p.name for p in (tmp_path / "s").glob("*.pkl")) == [
        "text_embeds_part-00000-of-00002_00000.pkl", "text_embeds_part-00001-of-00002_00000.pkl"]
    assert not (tmp_path / "s" / "manifest.json").exists()  # only the merge writes it
    with pytest.raises(StoreError, match="never merged"):
        EmbeddingStore(tmp_path / "s")
    with pytest.raises(StoreError, match="was written by 2 ranks, but this run writes it as a single process"):
        StoreWriter(tmp_path / "s", "text", "enc", 12)
    with pytest.raises(StoreError, match="was written by 2 ranks, but this run writes it as one of 3 ranks"):
        StoreWriter(tmp_path / "s", "text", "enc", 12, part=(0, 3))


def test_tampered_shard_is_refused_by_training_and_alignment(tmp_path, rows):
    from revision.align import align_stores
    from revision.data import EmbeddingTable

    ids, embeds, captions = rows
    for kind in ("text", "image"):
        write_store(tmp_path / kind, kind, ids, embeds, captions, shard_size=4)
    path = tmp_path / "image" / "image_embeds_00002.pkl"
    shard = load_shard(path)
    write_shard(path, Shard("image", shard.ids, shard.embeds[::-1].copy(), shard.sources))  # rows swapped
    with pytest.raises(StoreError, match=r"image_embeds_00002.pkl: sha256"):
        EmbeddingTable(tmp_path / "image", tmp_path / "cache")
    with pytest.raises(StoreError, match=r"image_embeds_00002.pkl: sha256"):
        align_stores(tmp_path / "text", tmp_path / "image", tmp_path / "aligned", method="mean_shift", report=False,
                     progress=False)
    assert len(EmbeddingTable(tmp_path / "image", tmp_path / "cache", verify=False)) == 10  # --no_verify


@pytest.mark.parametrize("name", [".lock", "skipped.jsonl", "manifest.json", "text_embeds_00001.pkl.tmp", "manifest.json.tmp"])
def test_no_write_goes_through_a_link_planted_in_the_store(tmp_path, rows, name):
    """A link where one of our files goes is refused; one where a stale temp file of ours was is removed (the link,
    not what it points to). Either way the file outside is untouched."""
    ids, embeds, captions = rows
    root = tmp_path / "s"
    writer = StoreWriter(root, "text", "enc", 12, shard_size=4)
    writer.add(ids[:4], embeds[:4], captions[:4], positions=[(0, i) for i in range(4)])
    writer.skip({"id": "x", "reason": "test"}, (0, 1))
    writer._record_pending() if writer._pending else None
    writer.shutdown()  # an interrupted run: one shard recorded, the store incomplete
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (root / name).unlink(missing_ok=True)
    os.symlink(outside, root / name)
    def rerun():
        resumed = StoreWriter(root, "text", "enc", 12, shard_size=4)
        resumed.add(ids[4:], embeds[4:], captions[4:], positions=[(0, i) for i in range(4, 10)])
        resumed.close()

    if name == "manifest.json.tmp":
        rerun()
        assert EmbeddingStore(root).load_all().ids == ids
    else:
        with pytest.raises(LinkError, match=rf"s/{re.escape(name)}: is a symbolic link where this program writes its own file"):
            rerun()
    assert outside.read_text() == "precious\n"


def test_a_hard_link_where_a_lock_goes_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (tmp_path / "s").mkdir()
    os.link(outside, tmp_path / "s" / ".lock")
    with pytest.raises(LinkError, match=r"s/.lock: has other hard links; refusing to write through it"):
        StoreWriter(tmp_path / "s", "text", "enc", 12)
    assert outside.read_text() == "precious\n"


def test_a_rerun_deletes_only_files_the_writer_wrote(tmp_path, rows, caplog):
    ids, embeds, captions = rows
    root = tmp_path / "s"
    write_store(root, "text", ids, embeds, captions, shard_size=4)
    backup = root / "text_embeds_backup.pkl"
    backup.write_bytes((root / "text_embeds_00000.pkl").read_bytes())
    (root / "text_embeds_7.pkl").write_bytes(b"the user's")  # the official layout's naming
    (root / "text_embeds_00009.pkl").write_bytes(b"a killed run's unrecorded shard: ours by its name")
    with caplog.at_level("WARNING"):
        StoreWriter(root, "text", "unknown", 12).close()  # a plain rerun of a complete store
    assert backup.read_bytes() == (root / "text_embeds_00000.pkl").read_bytes()
    assert (root / "text_embeds_7.pkl").read_bytes() == b"the user's"
    assert not (root / "text_embeds_00009.pkl").exists()
    warned = sorted(r.getMessage().split(":")[0] for r in caplog.records if "looks like a shard" in r.getMessage())
    assert warned == [str(root / "text_embeds_7.pkl"), str(backup)]
    assert EmbeddingStore(root).load_all().ids == ids


def test_a_first_run_that_fails_before_a_shard_leaves_no_manifest(tmp_path):
    writer = StoreWriter(tmp_path / "s", "text", "enc", 12)
    with pytest.raises(StoreError, match="unusable embedding"):
        writer.add(["a"], np.zeros((1, 12)))
    writer.shutdown()
    assert not (tmp_path / "s" / "manifest.json").exists()
    StoreWriter(tmp_path / "s", "text", "enc", 12).close()  # a store with no rows, but complete
    resumed = StoreWriter(tmp_path / "s", "text", "enc", 12)  # not its first run: the manifest stays
    resumed.shutdown()
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["count"] == 0


@pytest.mark.parametrize("change, message", [
    ({"dtype": "int8"}, r"dtype is 'int8', expected 'float16' or 'float32'"),
    ({"dtype": "float8"}, r"dtype is 'float8', expected 'float16' or 'float32'"),
    ({"kind": None}, r"kind is None, expected 'text' or 'image'"),
    ({"count": 15}, r"count is 15, expected 10, the sum of its shards' rows"),
    ({"dim": "12"}, r"dim is '12', expected a positive integer"),
])
def test_manifest_fields_a_reader_relies_on_are_checked_first(tmp_path, rows, change, message):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions, dtype="float32", shard_size=4)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest.update(change)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if v is not None}))
    with pytest.raises(StoreError, match=r"s/manifest.json: " + message):
        EmbeddingStore(tmp_path / "s")


def test_shards_must_hold_the_manifests_dtype(tmp_path, rows):
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions, dtype="float32")
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "dtype": "float16"}))
    with pytest.raises(StoreError, match=r"text_embeds_00000.pkl: holds float32 embeddings, but manifest.json says dtype float16"):
        EmbeddingStore(tmp_path / "s").load_all()


def test_a_memory_bomb_shard_costs_nothing(tmp_path, rows):
    """bytearray(10**12) in a 30-byte pickle: with a manifest the hash refuses it before unpickling; without one
    (the official layout) the unpickler refuses the size. Either way nothing is allocated (it would be 1 TB)."""
    ids, embeds, captions = rows
    write_store(tmp_path / "s", "text", ids, embeds, captions)
    bomb = b"\x80\x02cbuiltins\nbytearray\n\x8a\x06\x00\x10\xa5\xd4\xe8\x00\x85R."  # protocol 2: bytearray(10**12)
    (tmp_path / "s" / "text_embeds_00000.pkl").write_bytes(bomb)
    with pytest.raises(StoreError, match=r"text_embeds_00000.pkl: sha256 .* differs from the manifest's"):
        EmbeddingStore(tmp_path / "s").load_all()
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "text_embeds_1.pkl").write_bytes(bomb)
    with pytest.raises(UnsafePickleError, match=r"refused to unpickle bytearray\(1000000000000\)"):
        EmbeddingStore(tmp_path / "ref")
    assert safe_load_bytes(pickle.dumps({"b": bytearray(b"ok"), "c": b"x"}, protocol=4), tmp_path) == {"b": bytearray(b"ok"), "c": b"x"}


def safe_load_bytes(data: bytes, folder) -> object:
    (folder / "x.pkl").write_bytes(data)
    return safe_load(folder / "x.pkl")


def test_rows_written_in_place_into_free_rows_are_stored_as_written(tmp_path, rows):
    ids, embeds, captions = rows
    unit = (embeds / np.linalg.norm(embeds, axis=1, keepdims=True)).astype(np.float32)
    writer = StoreWriter(tmp_path / "s", "text", "enc", 12, "float32", shard_size=4)
    start = 0
    while start < len(ids):
        view = writer.free_rows(min(3, len(ids) - start))  # 3, 1 (the shard's room), 3, 1, 2
        view[:] = unit[start : start + len(view)]
        writer.add(ids[start : start + len(view)], view, captions[start : start + len(view)], unit_rows=True)
        start += len(view)
    manifest = writer.close()
    assert [e["rows"] for e in manifest["shards"]] == [4, 4, 2]
    got = EmbeddingStore(tmp_path / "s").load_all()
    assert got.ids == ids and got.captions == captions
    np.testing.assert_array_equal(got.embeds, unit)
