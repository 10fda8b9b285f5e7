"""embed_mean.py / align_stores: the written store, statistics, report, bad input and crash recovery."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import revision.shards as store_module
from revision.align import STATS_FILE, align_stores, load_alignment
from revision.data import EmbeddingTable
from revision.errors import StoreError
from revision.shards import Shard, write_reference_shard
from revision.store import EmbeddingStore
from revision.store_writer import StoreWriter, write_store

ROOT = Path(__file__).resolve().parents[1]


def gap_pair(n_text=600, n_image=400, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n_text, dim)) + 2 * np.eye(dim)[0]
    v = 0.5 * rng.standard_normal((n_image, dim)) + 2 * np.eye(dim)[1]
    return t.astype(np.float32), v.astype(np.float32)


@pytest.fixture
def inputs(tmp_path):
    t, v = gap_pair()
    write_store(tmp_path / "text", "text", [f"t{i}" for i in range(len(t))], t, [f"cap {i}" for i in range(len(t))],
                encoder="hf:clip", shard_size=250)
    write_store(tmp_path / "image", "image", [f"v{i}" for i in range(len(v))], v, [f"img{i}.jpg" for i in range(len(v))],
                encoder="hf:clip", shard_size=250)
    return tmp_path


def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "embed_mean.py"), "--quiet", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_writes_aligned_store_stats_and_report_from_record_layout(tmp_path):
    t, v = gap_pair(seed=1)
    for kind, x in (("text", t), ("image", v)):
        (tmp_path / kind).mkdir()
        key = "caption" if kind == "text" else "image_path"
        for part, rows in enumerate(np.array_split(np.arange(len(x)), 2)):
            write_reference_shard(tmp_path / kind / f"{kind}_embeds_{part + 1}.pkl",
                                  Shard(kind, [f"{kind}{i}" for i in rows], x[rows], [f"{key} {i}" for i in rows]))
    done = run_cli("--text", tmp_path / "text", "--image", tmp_path / "image", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["rows_written"] == len(t)
    assert summary["gap"]["after"]["centroid_distance"] < summary["gap"]["before"]["centroid_distance"] / 5
    out = EmbeddingStore(tmp_path / "out")
    assert out.manifest["method"] == "realign" and out.manifest["complete"] and out.manifest["dtype"] == "float32"
    got = out.load_all()
    assert got.ids == [f"text{i}" for i in range(len(t))] and got.captions[7] == "caption 7"
    np.testing.assert_allclose(got.embeds, load_alignment(tmp_path / "out").text_map(t.astype(np.float16)), atol=1e-6)
    report = json.loads((tmp_path / "out" / "gap_report.json").read_text())
    assert report["before"]["linear_probe_acc"] > 0.95 and report["after"]["knn_overlap_kept"] > 0.5
    assert (tmp_path / "out" / "gap_report.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out" / ".align_cache").exists()

    refused = run_cli("--text", tmp_path / "text", "--image", tmp_path / "image", "--out", tmp_path / "text")
    assert refused.returncode == 2 and "is the input folder" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("method", ["mean_shift", "c3", "none"])
def test_other_methods_write_their_maps(inputs, method):
    summary = align_stores(inputs / "text", inputs / "image", inputs / method, method=method, dtype="float16",
                           report=False, progress=False)
    assert summary["rows_written"] == 600
    got = EmbeddingStore(inputs / method).load_all()
    assert got.embeds.dtype == np.float16
    alignment = load_alignment(inputs / method)
    assert alignment.method == method
    want = alignment.text_map(EmbeddingStore(inputs / "text").load_all().embeds)
    np.testing.assert_allclose(got.embeds.astype(np.float32), want, atol=2e-3)


def test_memory_budget_only_moves_the_text_cache_between_ram_and_disk(inputs):
    runs = {budget: align_stores(inputs / "text", inputs / "image", inputs / f"b{budget}", report=False, progress=False,
                                 memory_budget=budget) for budget in (0, 250 * 32 * 4, 1 << 30)}
    got = {budget: EmbeddingStore(inputs / f"b{budget}").load_all() for budget in runs}
    for budget in runs:  # all in RAM, one shard in RAM, all spilled to the temp cache: the same bytes
        np.testing.assert_array_equal(got[budget].embeds, got[0].embeds)
        assert got[budget].ids == got[0].ids and not (inputs / f"b{budget}" / ".align_cache").exists()


def test_apply_stats_aligns_new_texts_without_images(inputs):
    align_stores(inputs / "text", inputs / "image", inputs / "first", report=False, progress=False)
    align_stores(inputs / "text", None, inputs / "again", apply_stats=inputs / "first" / STATS_FILE, progress=False)
    a, b = (EmbeddingStore(inputs / name).load_all() for name in ("first", "again"))
    np.testing.assert_array_equal(a.embeds, b.embeds)
    sampled = align_stores(inputs / "text", inputs / "image", inputs / "sampled", stats_sample=200, report=False,
                           progress=False)
    assert sampled["rows_written"] == 600 and load_alignment(inputs / "sampled").info["text_rows"] == 200
    with pytest.raises(StoreError, match="statistics are for 'realign', not 'mean_shift'"):
        align_stores(inputs / "text", None, inputs / "x", method="mean_shift", apply_stats=inputs / "first")
    with pytest.raises(ValueError, match="an image store is needed"):
        align_stores(inputs / "text", None, inputs / "x")


def test_encoder_mismatch_needs_force_but_dims_never_pass(inputs):
    t, v = gap_pair()
    write_store(inputs / "other", "image", [f"v{i}" for i in range(len(v))], v, encoder="hf:siglip")
    with pytest.raises(StoreError, match=r"different encoders .*'hf:clip'.*'hf:siglip'.*--force"):
        align_stores(inputs / "text", inputs / "other", inputs / "out", report=False)
    summary = align_stores(inputs / "text", inputs / "other", inputs / "out", force=True, report=False, progress=False)
    assert summary["rows_written"] == 600
    write_store(inputs / "wide", "image", ["a", "b"], np.ones((2, 64)), encoder="hf:clip")
    with pytest.raises(StoreError, match="holds 32-d embeddings but .*wide holds 64-d"):
        align_stores(inputs / "text", inputs / "wide", inputs / "out2", force=True)


def test_empty_store_refused(inputs):
    (inputs / "empty").mkdir()
    (inputs / "empty" / "text_embeds_1.pkl").write_bytes(__import__("pickle").dumps([]))
    with pytest.raises(StoreError, match="empty text store"):
        align_stores(inputs / "empty", inputs / "image", inputs / "out")
    writer = StoreWriter(inputs / "empty2", "image", "hf:clip", 32)
    writer.close()
    with pytest.raises(StoreError, match="empty image store"):
        align_stores(inputs / "text", inputs / "empty2", inputs / "out")


def test_incomplete_input_store_refused_by_alignment_and_training(inputs):
    """A store whose image_embed.py run was killed says complete: false: its statistics would miss rows."""
    manifest = json.loads((inputs / "image" / "manifest.json").read_text())
    (inputs / "image" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    done = run_cli("--text", inputs / "text", "--image", inputs / "image", "--out", inputs / "out")
    assert done.returncode != 0 and "incomplete store" in done.stderr and str(inputs / "image") in done.stderr
    assert not (inputs / "out").exists()
    with pytest.raises(StoreError, match="incomplete store"):
        EmbeddingTable(inputs / "image")


def test_bad_rows_fail_naming_shard_or_are_dropped_and_counted(inputs):
    shard = EmbeddingStore(inputs / "text").load_all()
    embeds = shard.embeds.astype(np.float32)
    embeds[260, 5] = np.inf
    embeds[10] = 0
    (inputs / "bad").mkdir()
    for part, rows in enumerate((slice(0, 250), slice(250, 600))):
        write_reference_shard(inputs / "bad" / f"text_embeds_{part}.pkl",
                              Shard("text", shard.ids[rows], embeds[rows], shard.captions[rows]))
    with pytest.raises(StoreError, match=r"text_embeds_0.pkl: row 10 \(id 't10'\) has an unusable embedding \(all-zero vector\)"):
        align_stores(inputs / "bad", inputs / "image", inputs / "out", report=False, progress=False)
    summary = align_stores(inputs / "bad", inputs / "image", inputs / "out", drop_bad=True, progress=False)
    assert summary["rows_written"] == 598 and summary["text_rows_dropped"] == 2
    got = EmbeddingStore(inputs / "out").load_all()
    assert "t10" not in got.ids and "t260" not in got.ids and np.isfinite(got.embeds).all()
    assert load_alignment(inputs / "out").info["dropped_rows"]["text"] == 2


def test_killed_run_leaves_no_half_shard_and_rerun_finishes(inputs, monkeypatch):
    reference = align_stores(inputs / "text", inputs / "image", inputs / "whole", shard_size=100, report=False, progress=False)
    real_write = store_module.write_shard
    calls = []

    def crash_on_third_shard(path, shard, dtype="float16", *options):
        calls.append(path)
        if len(calls) == 3:  # die half-way through writing: a partial temp file, never renamed
            Path(str(path) + ".tmp").write_bytes(b"\x80\x05half")
            raise KeyboardInterrupt
        return real_write(path, shard, dtype, *options)

    monkeypatch.setattr(store_module, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        align_stores(inputs / "text", inputs / "image", inputs / "crashed", shard_size=100, report=False, progress=False)
    monkeypatch.setattr(store_module, "write_shard", real_write)
    assert sorted(p.name for p in (inputs / "crashed").glob("*.pkl")) == ["text_embeds_00000.pkl", "text_embeds_00001.pkl"]
    with pytest.raises(StoreError, match=r"crashed holds a store aligned with 'realign' \(200 rows\); nothing was changed"):
        align_stores(inputs / "text", inputs / "image", inputs / "crashed", method="mean_shift", shard_size=100)
    align_stores(inputs / "text", inputs / "image", inputs / "crashed", shard_size=100, report=False, progress=False)
    assert not list((inputs / "crashed").glob("*.tmp"))
    a, b = (EmbeddingStore(inputs / name) for name in ("whole", "crashed"))
    assert b.manifest["complete"] and len(b) == reference["rows_written"] == 600
    np.testing.assert_array_equal(a.load_all().embeds, b.load_all().embeds)
    assert a.load_all().ids == b.load_all().ids


def test_a_method_defined_here_runs_through_embed_mean(inputs, monkeypatch, capsys):
    """A new method is one registered class: its statistics, its passes, its map; nothing else to edit."""
    from revision.align import REGISTRY, Alignment, unit_mean, vector

    embed_mean = embed_mean_cli()

    class HalfwayToImages(Alignment):
        method = "halfway"
        stats = {"mu_image": vector}
        text_passes = 0  # reads the images only

        def _fit(self, texts, images, bad):
            self.mu_image, self.info["image_rows"] = unit_mean(images, bad, "images")

        def text_unit(self, x):
            return x + self.mu_image

    monkeypatch.setitem(REGISTRY, "halfway", HalfwayToImages)
    embed_mean.main(["--text", str(inputs / "text"), "--image", str(inputs / "image"), "--out", str(inputs / "half"),
                     "--method", "halfway", "--quiet", "--no_report"])
    assert json.loads(capsys.readouterr().out)["rows_written"] == 600
    t, v = (EmbeddingStore(inputs / kind).load_all().embeds.astype(np.float64) for kind in ("text", "image"))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    want = unit(unit(t) + unit(v).mean(0))
    np.testing.assert_allclose(EmbeddingStore(inputs / "half").load_all().embeds, want, atol=1e-6)
    loaded = load_alignment(inputs / "half")
    assert isinstance(loaded, HalfwayToImages) and loaded.info["image_rows"] == 400
    np.testing.assert_allclose(loaded.mu_image, unit(v).mean(0), atol=1e-12)


def bad_stats_file(inputs, name, **change):
    align_stores(inputs / "text", inputs / "image", inputs / "fitted", report=False, progress=False)
    stats = json.loads((inputs / "fitted" / STATS_FILE).read_text())
    path = inputs / name
    path.write_text(json.dumps({**stats, **change}))  # json writes NaN / Infinity, and reads them back
    return path


@pytest.mark.parametrize("field, value", [("scale", float("nan")), ("scale", float("inf")), ("scale", 0.0),
                                          ("scale", -1.0), ("mu_hat", [float("nan")] * 32), ("mu_text", [1.0] * 31)])
def test_apply_stats_refuses_unusable_statistics_before_writing(inputs, field, value):
    path = bad_stats_file(inputs, "bad_stats.json", **{field: value})
    with pytest.raises(StoreError, match=rf"bad_stats.json: alignment statistic '{field}'"):
        align_stores(inputs / "text", None, inputs / "out", apply_stats=path, progress=False)
    assert not (inputs / "out").exists()


def test_apply_stats_bad_files_give_one_line_from_the_cli(inputs):
    path = bad_stats_file(inputs, "nan_scale.json", scale=float("nan"))
    done = run_cli("--text", inputs / "text", "--out", inputs / "out", "--apply_stats", path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{path}: alignment statistic 'scale' is nan" in done.stderr and not (inputs / "out").exists()
    (inputs / "list.json").write_text("[1, 2, 3]")
    done = run_cli("--text", inputs / "text", "--out", inputs / "out", "--apply_stats", inputs / "list.json")
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "list.json: not alignment statistics: a JSON list" in done.stderr


def test_write_pass_never_writes_non_finite_rows(inputs, monkeypatch):
    """The writer copies mapped rows unchecked; a map gone wrong must stop the run, not fill a store with NaN."""
    from revision.align import ReAlign

    def broken(self, rows, inv_norm, out):
        out[:] = rows * inv_norm[:, None]
        out[3] = np.nan

    monkeypatch.setattr(ReAlign, "_text_rows", broken)
    with pytest.raises(StoreError, match=r"text_embeds_00000.pkl: row 3 \(id 't3'\) maps to a non-finite embedding"):
        align_stores(inputs / "text", inputs / "image", inputs / "out", report=False, progress=False)
    assert not list((inputs / "out").glob("*.pkl"))


def embed_mean_cli():
    spec = importlib.util.spec_from_file_location("embed_mean", ROOT / "embed_mean.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_part(cli, capsys, *args):
    """embed_mean.main in this process: (exit code, JSON summary or the error line)."""
    try:
        cli.main(["--quiet", *map(str, args)])
    except SystemExit as e:
        return e.code, capsys.readouterr().err
    return 0, json.loads(capsys.readouterr().out)


def test_apply_stats_over_two_parts_gives_the_one_process_store(inputs, capsys):
    """Text store: 600 rows in shards of 250, 250, 100; part 0 maps shard 0, part 1 shards 1-2 (contiguous)."""
    align_stores(inputs / "text", inputs / "image", inputs / "fit", stats_sample=300, report=False, progress=False)
    stats = inputs / "fit" / STATS_FILE
    one = align_stores(inputs / "text", None, inputs / "one", apply_stats=stats, shard_size=100, progress=False)
    cli = embed_mean_cli()
    apply = ("--text", inputs / "text", "--out", inputs / "two", "--apply_stats", stats, "--shard_size", 100)
    code, part0 = run_part(cli, capsys, *apply, "--num_shards", 2, "--shard_index", 0)
    assert code == 0 and part0["part"] == [0, 2] and part0["rows_written"] == 250 and part0["merged_rows"] is None
    with pytest.raises(StoreError, match="never merged"):
        EmbeddingStore(inputs / "two")
    code, err = run_part(cli, capsys, "--out", inputs / "two", "--merge")
    assert code == 2 and "cannot merge: 1 of 2 parts never started (part-00001-of-00002.json)" in err
    code, part1 = run_part(cli, capsys, *apply, "--num_shards", 2, "--shard_index", 1)
    assert code == 0 and part1["rows_written"] == 350 and part1["merged_rows"] == 600  # the last part merged

    a, b = (EmbeddingStore(inputs / name) for name in ("one", "two"))
    assert b.manifest["parts"] == 2 and b.manifest["count"] == one["rows_written"] == 600
    assert b.manifest["method"] == "realign" and b.manifest["alignment"] == STATS_FILE and b.manifest["rows_written"] == 600
    got, want = b.load_all(), a.load_all()
    assert got.ids == want.ids and got.captions == want.captions  # contiguous ranges: the rows in store order too
    np.testing.assert_allclose(got.embeds, want.embeds, atol=1e-6)
    for name in ("one", "two"):  # the folder carries the statistics it was mapped with (training records them)
        assert load_alignment(inputs / name).to_dict() == load_alignment(stats).to_dict()
    assert not (inputs / "two" / "gap_report.json").exists()

    shards = {p.name: p.stat().st_mtime_ns for p in (inputs / "two").glob("*.pkl")}
    code, again = run_part(cli, capsys, *apply, "--num_shards", 2, "--shard_index", 0)  # a finished part: a no-op
    assert code == 0 and again["rows_written"] == 250 and again["merged_rows"] == 600
    assert {p.name: p.stat().st_mtime_ns for p in (inputs / "two").glob("*.pkl")} == shards
    assert EmbeddingStore(inputs / "two").load_all().ids == want.ids

    refit = inputs / "refit.json"
    align_stores(inputs / "text", inputs / "image", inputs / "fit2", method="realign", report=False, progress=False)
    refit.write_text((inputs / "fit2" / STATS_FILE).read_text())
    code, err = run_part(cli, capsys, "--text", inputs / "text", "--out", inputs / "two", "--apply_stats", refit,
                         "--num_shards", 2, "--shard_index", 1)
    assert code == 2 and "holds other statistics than --apply_stats" in err


def test_killed_part_resumes_and_every_id_is_stored_once(inputs, monkeypatch):
    stats = align_stores(inputs / "text", inputs / "image", inputs / "fit", report=False, progress=False)["out"]
    whole = align_stores(inputs / "text", None, inputs / "whole", apply_stats=stats, progress=False)
    real_write = store_module.write_shard
    calls = []

    def crash_on_third_shard(path, shard, dtype="float16", *options):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write(path, shard, dtype, *options)

    run = {"apply_stats": stats, "shard_size": 100, "progress": False}
    align_stores(inputs / "text", None, inputs / "parts", part=(0, 2), **run)
    monkeypatch.setattr(store_module, "write_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):  # part 1 (350 rows) dies writing its third shard
        align_stores(inputs / "text", None, inputs / "parts", part=(1, 2), **run)
    monkeypatch.setattr(store_module, "write_shard", real_write)
    book = json.loads((inputs / "parts" / "part-00001-of-00002.json").read_text())
    assert not book["complete"] and book["count"] == 200
    with pytest.raises(StoreError, match="cannot merge: 0 of 2 parts never started .* 1 unfinished"):
        __import__("revision.align.run", fromlist=["merge_aligned"]).merge_aligned(inputs / "parts")
    resumed = align_stores(inputs / "text", None, inputs / "parts", part=(1, 2), **run)
    assert resumed["rows_written"] == 350 and resumed["merged_rows"] == 600
    got, want = EmbeddingStore(inputs / "parts").load_all(), EmbeddingStore(inputs / "whole").load_all()
    assert got.ids == want.ids and len(set(got.ids)) == whole["rows_written"] == 600
    np.testing.assert_allclose(got.embeds, want.embeds, atol=1e-6)


def test_fitting_over_parts_is_refused(inputs):
    done = run_cli("--text", inputs / "text", "--image", inputs / "image", "--out", inputs / "out",
                   "--num_shards", 2, "--shard_index", 1)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "fitting runs in one process, not over 2 parts" in done.stderr and "--apply_stats" in done.stderr
    env = {**__import__("os").environ, "WORLD_SIZE": "2", "RANK": "1"}  # torchrun's ranks are parts too
    torchrun = subprocess.run([sys.executable, str(ROOT / "embed_mean.py"), "--quiet", "--text", str(inputs / "text"),
                               "--image", str(inputs / "image"), "--out", str(inputs / "out")],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, env=env, check=False)
    assert torchrun.returncode == 2 and "not over 2 parts" in torchrun.stderr and not (inputs / "out").exists()


def test_out_holding_another_store_is_refused_before_any_file_changes(inputs):
    done = run_cli("--text", inputs / "text", "--image", inputs / "image", "--out", inputs / "image")
    assert done.returncode == 2 and "is the input folder" in done.stderr
    write_store(inputs / "other", "text", ["a", "b"], np.eye(2, 32), encoder="hf:clip")
    before = {p.name: p.read_bytes() for p in (inputs / "other").iterdir() if p.name != ".lock"}
    done = run_cli("--text", inputs / "text", "--image", inputs / "image", "--out", inputs / "other")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"embed_mean.py: error: --out {inputs / 'other'} holds a store not written by embed_mean.py "
                                   "(2 rows); nothing was changed. Write the realign alignment to a new folder, or pass "
                                   "--overwrite to replace that store")
    assert {p.name: p.read_bytes() for p in (inputs / "other").iterdir() if p.name != ".lock"} == before
    EmbeddingStore(inputs / "other").require_complete()


def test_a_failed_first_run_leaves_no_manifest_in_out(inputs):
    shard = EmbeddingStore(inputs / "text").load_all()
    embeds = shard.embeds.astype(np.float32)
    embeds[3, 2] = np.nan
    (inputs / "nan").mkdir()
    write_reference_shard(inputs / "nan" / "text_embeds_1.pkl", Shard("text", shard.ids, embeds, shard.captions))
    done = run_cli("--text", inputs / "nan", "--image", inputs / "image", "--out", inputs / "out")
    assert done.returncode == 2 and "row 3 (id 't3') has an unusable embedding (NaN)" in done.stderr
    assert sorted(p.name for p in (inputs / "out").iterdir()) == [".lock"]


def test_stores_smaller_than_the_report_neighbourhoods_align_and_report(tmp_path):
    t, v = gap_pair(n_text=5, n_image=4)
    write_store(tmp_path / "text", "text", [f"t{i}" for i in range(5)], t, encoder="hf:clip")
    write_store(tmp_path / "image", "image", [f"v{i}" for i in range(4)], v, encoder="hf:clip")
    done = run_cli("--text", tmp_path / "text", "--image", tmp_path / "image", "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "gap_report.json").read_text())
    assert 0 <= report["after"]["knn_mixing"] <= 1 and report["after"]["knn_overlap_kept"] == 1.0


def test_statistics_messages_say_what_is_wrong(inputs):
    nan = [0.1] * 32
    nan[7] = float("nan")
    with pytest.raises(StoreError, match=r"alignment statistic 'mu_text' holds nan at index 7 \(1 non-finite values of 32\)"):
        align_stores(inputs / "text", None, inputs / "out", apply_stats=bad_stats_file(inputs, "a.json", mu_text=nan), progress=False)
    with pytest.raises(StoreError, match=r"alignment statistic 'mu_text' has shape \(31,\), expected \(32,\)$"):
        align_stores(inputs / "text", None, inputs / "out", apply_stats=bad_stats_file(inputs, "b.json", mu_text=[1.0] * 31),
                     progress=False)


def test_a_link_where_the_report_goes_is_refused_before_any_write(inputs):
    (inputs / "out").mkdir()
    (inputs / "outside.json").write_text("precious\n")
    os.symlink(inputs / "outside.json", inputs / "out" / "gap_report.json")
    done = run_cli("--text", inputs / "text", "--image", inputs / "image", "--out", inputs / "out")
    assert done.returncode == 2 and done.stderr.strip().endswith(
        "out/gap_report.json: is a symbolic link where this program writes its own file; refusing to write through it "
        "(remove the link)")
    assert (inputs / "outside.json").read_text() == "precious\n"
    assert sorted(p.name for p in (inputs / "out").iterdir()) == ["gap_report.json"]
