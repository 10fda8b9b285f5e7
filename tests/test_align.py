"""Alignment methods against independent float64 transcriptions of docs/design.md's formulas."""
import json
import pickle

import numpy as np
import pytest

from revision.align import (
    STATS_FILE,
    BadRows,
    PassCache,
    SpilledRows,
    align_stores,
    load_alignment,
    make_alignment,
    method_names,
    sample_rows,
)
from revision.errors import StoreError
from revision.shards import Shard, write_reference_shard
from revision.store import EmbeddingStore
from revision.store_writer import write_store


def planted_gap(n_text: int, n_image: int, dim: int = 1280, latent: int = 16, seed: int = 0):
    """Two anisotropic cones: each modality is its own mean direction plus a low-rank spread with a decaying
    spectrum (different per modality) and a little isotropic noise; returns unit float32 rows."""
    rng = np.random.default_rng(seed)
    out = []
    for n, spread in ((n_text, 1.0), (n_image, 0.5)):
        direction = rng.standard_normal(dim)
        basis = np.linalg.qr(rng.standard_normal((dim, latent)))[0]
        z = rng.standard_normal((n, latent)) * (spread / np.arange(1, latent + 1) ** 0.7)
        x = 2.0 * direction / np.linalg.norm(direction) + z @ basis.T + 0.01 * rng.standard_normal((n, dim))
        out.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return out


def n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_maps(method: str, t: np.ndarray, v: np.ndarray):
    """docs/design.md "Alignment", transcribed literally in float64 on whole arrays."""
    t, v = np.asarray(t, np.float64), np.asarray(v, np.float64)
    if method == "none":
        return n(t), n(v)
    if method in ("mean_shift", "c3"):
        return n(n(t) - n(t).mean(0)), n(n(v) - n(v).mean(0))
    x, u = n(t), n(v)
    mu_t, mu_i = x.mean(0), u.mean(0)
    if method == "anchor":  # the paper's ablation: step 1 only
        return n(x - mu_t + mu_i), n(v)
    tau_t = np.mean(np.sum((x - mu_t) ** 2, axis=1))
    tau_i = np.mean(np.sum((u - mu_i) ** 2, axis=1))
    s = np.sqrt(tau_i / (tau_t + 1e-10))
    y = n(mu_i + s * (x - mu_t))
    if method == "anchor_trace":  # steps 1-2, no centroid correction
        return y, n(v)
    assert method == "realign", method  # a new built-in method needs its transcription here
    mu_hat = y.mean(0)
    return n(y - mu_hat + mu_i), n(v)


def stores(tmp_path, t, v, shard_size=None, dtype="float32", encoder="enc"):
    ids_t, ids_v = [f"t{i}" for i in range(len(t))], [f"v{i}" for i in range(len(v))]
    write_store(tmp_path / "text", "text", ids_t, t, [f"caption {i}" for i in range(len(t))], encoder=encoder,
                dtype=dtype, shard_size=shard_size or len(t))
    write_store(tmp_path / "image", "image", ids_v, v, encoder=encoder, dtype=dtype, shard_size=shard_size or len(v))
    return EmbeddingStore(tmp_path / "text"), EmbeddingStore(tmp_path / "image")


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((700, 48)) * 3 + rng.standard_normal(48)  # not unit, not centred
    v = rng.standard_normal((500, 48)) * 0.5 - rng.standard_normal(48)
    return t.astype(np.float32), v.astype(np.float32)


@pytest.mark.parametrize("method", method_names())
def test_streaming_fit_matches_float64_transcription(tmp_path, small, method):
    t, v = small
    texts, images = stores(tmp_path, t, v, shard_size=97)  # many shards, the last one short
    alignment = make_alignment(method).fit(texts, images)
    want_t, want_v = reference_maps(method, t, v)
    # stored rows are normalised float32: the reference sees the same numbers up to float32 rounding
    got_t, got_v = alignment.text_map(t), alignment.image_map(v)
    assert got_t.dtype == np.float32 and got_v.dtype == np.float32
    np.testing.assert_allclose(got_t, want_t, atol=1e-6)
    np.testing.assert_allclose(got_v, want_v, atol=1e-6)
    # the statistics survive a save/load round trip through JSON, from the file or its folder
    alignment.save(tmp_path)
    for where in (tmp_path, tmp_path / STATS_FILE):
        np.testing.assert_array_equal(load_alignment(where).text_map(t), got_t)


def official_style_realign(text_dir, image_dir, out_dir, chunk=100):
    """An independent transcription of the official embed_ReAlign.py procedure: read the record-layout shards,
    accumulate DESIGN steps 1-4 in float64 chunk by chunk (one pass per statistic), write float32 records."""
    def records(folder):
        for path in sorted(folder.glob("*.pkl")):
            yield from pickle.loads(path.read_bytes())

    def chunks(folder):
        batch = []
        for rec in records(folder):
            batch.append(rec)
            if len(batch) == chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def unit_stats(folder):
        total, count = 0.0, 0
        for batch in chunks(folder):
            x = n(np.stack([r["embed"] for r in batch]).astype(np.float64))
            total, count = total + x.sum(0), count + len(x)
        mu = total / count
        trace = 0.0
        for batch in chunks(folder):
            x = n(np.stack([r["embed"] for r in batch]).astype(np.float64))
            trace += np.sum((x - mu) ** 2)
        return mu, trace / count

    mu_t, tau_t = unit_stats(text_dir)
    mu_i, tau_i = unit_stats(image_dir)
    s = np.sqrt(tau_i / (tau_t + 1e-10))
    total, count = 0.0, 0
    for batch in chunks(text_dir):
        y = n(mu_i + s * (n(np.stack([r["embed"] for r in batch]).astype(np.float64)) - mu_t))
        total, count = total + y.sum(0), count + len(y)
    mu_hat = total / count
    out = []
    for batch in chunks(text_dir):
        y = n(mu_i + s * (n(np.stack([r["embed"] for r in batch]).astype(np.float64)) - mu_t))
        aligned = n(y - mu_hat + mu_i).astype(np.float32)
        out += [{"id": r["id"], "caption": r["caption"], "embed": e} for r, e in zip(batch, aligned)]
    out_dir.mkdir()
    (out_dir / "text_embeds_1.pkl").write_bytes(pickle.dumps(out))
    return {r["id"]: r["embed"] for r in out}


def test_matches_official_procedure_on_record_layout(tmp_path):
    t, v = planted_gap(1500, 1000, dim=256, seed=3)
    for kind, x, parts in (("text", t, 3), ("image", v, 2)):
        folder = tmp_path / f"ref_{kind}"
        folder.mkdir()
        ids = [f"{kind[0]}{i}" for i in range(len(x))]
        for part, rows in enumerate(np.array_split(np.arange(len(x)), parts)):
            write_reference_shard(folder / f"{kind}_embeds_{part + 1}.pkl",
                                  Shard(kind, [ids[i] for i in rows], x[rows], [f"c{i}" for i in rows]), dtype="float16")
    want = official_style_realign(tmp_path / "ref_text", tmp_path / "ref_image", tmp_path / "official")
    align_stores(tmp_path / "ref_text", tmp_path / "ref_image", tmp_path / "ours", report=False, progress=False)
    got = EmbeddingStore(tmp_path / "ours").load_all()
    assert got.embeds.dtype == np.float32 and set(got.ids) == set(want)
    ref = np.stack([want[i] for i in got.ids]).astype(np.float64)
    cosine = np.sum(ref * got.embeds, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got.embeds, axis=1)
    assert cosine.min() >= 0.99999
    assert got.captions[:3] == [f"c{int(i[1:])}" for i in got.ids[:3]]


@pytest.fixture(scope="module")
def planted_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    t, v = planted_gap(25_000, 12_000, seed=0)
    return t, v, stores(root, t, v, shard_size=15_000, dtype="float16")


def test_realign_closes_planted_gap_and_keeps_neighbours(planted_stores):
    t, v, (texts, images) = planted_stores
    alignment = make_alignment("realign").fit(texts, images)
    text16, image16 = (s.load_all().embeds for s in (texts, images))
    out, img = alignment.text_map(text16), alignment.image_map(image16)
    gap_before = np.linalg.norm(n(text16.astype(np.float64)).mean(0) - n(image16.astype(np.float64)).mean(0))
    gap_after = np.linalg.norm(out.astype(np.float64).mean(0) - img.astype(np.float64).mean(0))
    assert gap_before > 0.5 and gap_after < 1e-3
    # traces match too (the one scalar s)
    trace = lambda x: 1 - np.sum(x.astype(np.float64).mean(0) ** 2)  # noqa: E731
    assert abs(trace(out) - trace(img)) < 0.02 * trace(img)
    # each text keeps >= 80% of its 10 nearest text neighbours (on 3000 of them)
    sample = np.random.default_rng(0).choice(len(out), 3000, replace=False)

    def knn(x):
        x = x.astype(np.float32)
        gram = x @ x.T
        np.fill_diagonal(gram, -np.inf)
        return np.argpartition(gram, -10, axis=1)[:, -10:]

    before, after = knn(n(text16[sample].astype(np.float32))), knn(out[sample])
    kept = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(before, after)])
    assert kept >= 0.8, kept


def test_fit_on_10k_sample_is_close_to_whole_set(planted_stores):
    t, v, (texts, images) = planted_stores
    whole = make_alignment("realign").fit(texts, images)
    sampled = make_alignment("realign").fit(texts, images, sample=10_000, seed=5)
    assert sampled.info["fit_sample"] == 10_000 and sampled.info["text_rows"] == 10_000
    a, b = whole.text_map(t[:5000]), sampled.text_map(t[:5000])
    assert np.min(np.sum(a * b, axis=1)) >= 0.9999
    assert not np.array_equal(a, b)


def test_sample_rows_is_uniform_deterministic_and_skips_bad_rows():
    x = np.arange(1, 1001, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    x[7] = np.nan
    shards = [Shard("text", [str(i) for i in range(lo, lo + 100)], x[lo : lo + 100], path=f"s{lo}") for lo in range(0, 1000, 100)]
    with pytest.raises(StoreError, match=r"s0: row 7 \(id '7'\) has an unusable embedding \(NaN\)"):
        sample_rows(shards, 1000, seed=0, bad=BadRows(drop=False))
    got = sample_rows(shards, 300, seed=0, bad=BadRows(drop=True))
    assert len(got.ids) == 300 and "7" not in got.ids and len(set(got.ids)) == 300
    assert sample_rows(shards, 300, seed=0, bad=BadRows(drop=True)).ids == got.ids
    assert 400 < np.mean([int(i) for i in got.ids]) < 600  # drawn from every shard, not the first ones


def test_bad_rows_name_shard_and_row_or_are_dropped_and_counted(tmp_path, small):
    t, v = small
    t = t.copy()
    texts, images = stores(tmp_path, t, v, shard_size=300)
    shard = EmbeddingStore(tmp_path / "text").load_all()
    for value, word in ((np.nan, "NaN"), (np.inf, "Inf"), (0.0, "all-zero vector")):
        bad = shard.embeds.copy()
        bad[305] = 0.0 if value == 0.0 else bad[305]
        bad[305, 3] = value
        # stores refuse bad rows on write, so plant them in a reference-layout shard
        folder = tmp_path / f"bad_{word[:3]}"
        folder.mkdir()
        write_reference_shard(folder / "text_embeds_1.pkl", Shard("text", shard.ids[:300], bad[:300], shard.captions[:300]))
        write_reference_shard(folder / "text_embeds_2.pkl", Shard("text", shard.ids[300:], bad[300:], shard.captions[300:]))
        with pytest.raises(StoreError, match=rf"text_embeds_2.pkl: row 5 \(id 't305'\) has an unusable embedding \({word}\).*--drop_bad"):
            make_alignment("realign").fit(EmbeddingStore(folder), images)
        fitted = make_alignment("mean_shift").fit(EmbeddingStore(folder), images, drop_bad=True)
        assert fitted.info["dropped_rows"] == {"text": 1, "image": 0} and fitted.info["text_rows"] == len(t) - 1
    with pytest.raises(StoreError, match=r"input: row 1 \(id 'row 1'\) has an unusable embedding \(NaN\)"):
        fitted.text_map(np.array([[1.0] * 48, [np.nan] * 48]))


def test_dims_and_bad_statistics_files_refused(tmp_path, small):
    t, v = small
    texts, _ = stores(tmp_path, t, v)
    write_store(tmp_path / "image16", "image", ["a", "b"], np.ones((2, 16)), encoder="enc")
    with pytest.raises(StoreError, match="dim 48, image store dim 16"):
        make_alignment("realign").fit(texts, EmbeddingStore(tmp_path / "image16"))
    with pytest.raises(StoreError, match="no alignment statistics"):
        load_alignment(tmp_path)
    (tmp_path / STATS_FILE).write_text(json.dumps({"format": "revision.align/1", "method": "realign", "dim": 48}))
    with pytest.raises(StoreError, match=r"realign statistics lack \['mu_text'"):
        load_alignment(tmp_path)
    with pytest.raises(ValueError, match="unknown alignment method 'whiten'"):
        make_alignment("whiten")


def test_pass_cache_replays_shards_and_samples(tmp_path, small):
    t, v = small
    texts, _ = stores(tmp_path, t, v, shard_size=300, dtype="float16")
    cache = PassCache(texts, tmp_path / "cache", sample=50, progress=False)
    first = [s.embeds.copy() for s in cache.iter_shards()]
    again = list(cache.iter_shards())
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3 and cache.rows == len(t)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b.embeds)
    assert again[2].ids == texts.load_all().ids[600:] and again[0].path.endswith("text_embeds_00000.pkl")
    assert len(cache.sample.ids) == 50


def test_pass_cache_keeps_shards_in_ram_within_budget_and_spills_the_rest(tmp_path, small):
    t, v = small
    texts, _ = stores(tmp_path, t, v, shard_size=300, dtype="float16")
    one_shard = 300 * 48 * 2
    cache = PassCache(texts, tmp_path / "cache", progress=False, memory_budget=one_shard)
    first = [s.embeds.copy() for s in cache.iter_shards()]
    again = list(cache.iter_shards())
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.npy")) == ["text_00001.npy", "text_00002.npy"]
    assert isinstance(again[0].embeds, np.ndarray) and isinstance(again[1].embeds, SpilledRows)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, np.asarray(b.embeds))
    spilled = again[2].embeds
    assert len(spilled) == 100 and spilled.shape == (100, 48) and spilled.dtype == np.float16
    np.testing.assert_array_equal(spilled[10:37], first[2][10:37])
    np.testing.assert_array_equal(spilled[99], first[2][99])
    assert spilled[95:200].shape == (5, 48)


def test_threads_change_no_number(tmp_path, small, monkeypatch):
    """Chunks are shared between threads at chunk boundaries and reduced in order: the same bits as one thread."""
    import revision.align.streams as streams

    t, v = small
    texts, images = stores(tmp_path, t, v, shard_size=650)  # 3 chunks and a short one per shard
    fitted = {}
    for workers in (1, 3):
        monkeypatch.setattr(streams, "WORKERS", workers)
        alignment = make_alignment("realign").fit(texts, images)
        fitted[workers] = (alignment.to_dict(), alignment.text_map(t), alignment.image_map(v))
    assert fitted[1][0] == fitted[3][0]
    np.testing.assert_array_equal(fitted[1][1], fitted[3][1])
    np.testing.assert_array_equal(fitted[1][2], fitted[3][2])
