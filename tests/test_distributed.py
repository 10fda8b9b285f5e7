"""Encoding at scale: webdataset and parquet inputs, rank parts in one store, torchrun, kill -9 of a rank."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.tiny.clip import build_tiny_clip
from revision.distributed import detect_rank
from revision.embed import main
from revision.encode import BATCH_DELAY_ENV
from revision.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("webdataset", reason="tar/parquet inputs need the data extra: pip install -e '.[data]'")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((20, 24, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tars(folder: Path, count: int, per_tar: int) -> list[str]:
    """img2dataset's layout: KEY.jpg + KEY.txt (+ KEY.json) per sample; returns the keys."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for t in range(count):
        members = []
        for i in range(per_tar):
            key = f"{t:05d}{i:04d}"
            keys.append(key)
            members += [(f"{key}.jpg", _jpeg(100 * t + i)), (f"{key}.txt", f"caption {key}".encode()),
                        (f"{key}.json", json.dumps({"key": key}).encode())]
        _write_tar(folder / f"{t:05d}.tar", members)
    return keys


def _args(clip_dir, out, *extra) -> list[str]:
    return ["--encoder", str(clip_dir), "--out", str(out), "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
            "--store_dtype", "float32", *extra]


def _by_id(root: Path) -> dict[str, np.ndarray]:
    shard = EmbeddingStore(root).load_all()
    assert len(shard.ids) == len(set(shard.ids))  # every id once
    return dict(zip(shard.ids, shard.embeds))


def test_rank_from_launchers():
    assert detect_rank(env={}).partial is None
    torchrun = detect_rank(env={"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "2"})
    assert (torchrun.part, torchrun.parts, torchrun.local_rank, torchrun.launcher) == (2, 4, 2, "torchrun")
    slurm = detect_rank(3, 1, env={"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert (slurm.part, slurm.parts) == (3, 6)  # array task 1 of 3, rank 1 of 2 in it
    with pytest.raises(ValueError, match="--shard_index 3 is not in"):
        detect_rank(3, 3, env={})


def test_webdataset_round_trip_with_corrupt_and_truncated_tars(clip_dir, tmp_path, capsys):
    data = tmp_path / "wds"
    keys = _tars(data, 2, 3)
    _write_tar(data / "00002.tar", [("bad.jpg", b"\xff\xd8 not a jpeg"), ("bad.txt", b"caption bad"),
                                    ("nojpg.txt", b"caption only"), ("latin.jpg", _jpeg(7)), ("latin.txt", "café".encode("latin-1"))])
    full = _tars(tmp_path / "tmp", 5, 4)[16:]  # the fifth tar's keys: none of them is in the first tars
    whole = (tmp_path / "tmp/00004.tar").read_bytes()
    with tarfile.open(tmp_path / "tmp/00004.tar") as tar:
        cut = tar.getmember(f"{full[2]}.jpg").offset_data + 100
    (data / "00003.tar").write_bytes(whole[:cut])  # truncated in the middle of the third sample's image
    out = tmp_path / "out"
    pattern = str(data / "{00000..00003}.tar")
    assert main(_args(clip_dir, out, "--images", pattern, "--texts", pattern)) == 0
    images, texts = EmbeddingStore(out / "image").load_all(), EmbeddingStore(out / "text").load_all()
    readable = full[:2]  # of the truncated tar: the members before the cut
    assert images.ids == keys + ["latin"] + readable
    assert images.image_paths[0] == "00000.tar/000000000.jpg"
    assert texts.ids == keys + ["bad", "nojpg"] + readable and texts.captions[0] == "caption 000000000"
    skipped = {(r["id"], r["reason"].split(" (")[0].split(":")[0])
               for r in map(json.loads, (out / "image/skipped.jsonl").read_text().splitlines())}
    assert skipped == {("bad", "UnidentifiedImageError"), ("nojpg", "no image member"),
                       ("00003.tar#rest", "truncated or corrupt tar")}
    text_skips = [json.loads(r) for r in (out / "text/skipped.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reason"][:19]) for r in text_skips] == [("latin", "unreadable caption "),
                                                                 ("00003.tar#rest", "truncated or corrup")]
    np.testing.assert_allclose(np.linalg.norm(images.embeds, axis=1), 1, atol=1e-5)


def test_parquet_images_as_bytes_and_caption_only_texts(clip_dir, tmp_path):
    rows = {"key": ["p0", "p1", "p2", "p3"], "jpg": [_jpeg(1), b"garbage", None, _jpeg(2)],
            "caption": ["one", "two", None, "four"]}
    pq.write_table(pa.table(rows), tmp_path / "images.parquet", row_group_size=2)
    pq.write_table(pa.table({"caption": ["alpha", "  ", "gamma"]}), tmp_path / "captions.parquet")
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--images", str(tmp_path / "images.parquet"), "--texts", str(tmp_path / "captions.parquet"))) == 0
    assert EmbeddingStore(out / "image").load_all().ids == ["p0", "p3"]
    reasons = {r["id"]: r["reason"] for r in map(json.loads, (out / "image/skipped.jsonl").read_text().splitlines())}
    assert reasons.keys() == {"p1", "p2"} and "UnidentifiedImageError" in reasons["p1"] and "no image" in reasons["p2"]
    texts = EmbeddingStore(out / "text").load_all()
    assert texts.ids == ["captions:0", "captions:2"] and texts.captions == ["alpha", "gamma"]  # id: FILE:ROW

    (tmp_path / "pics").mkdir()
    (tmp_path / "pics/a.jpg").write_bytes(_jpeg(1))
    pq.write_table(pa.table({"id": ["x", "y"], "path": ["a.jpg", "missing.jpg"]}), tmp_path / "paths.parquet")
    assert main(_args(clip_dir, tmp_path / "o2", "--images", str(tmp_path / "paths.parquet"), "--image_column", "path",
                      "--image_root", str(tmp_path / "pics"))) == 0
    by_path = EmbeddingStore(tmp_path / "o2/image").load_all()
    assert by_path.ids == ["x"] and by_path.image_paths == ["a.jpg"]
    np.testing.assert_allclose(by_path.embeds[0], EmbeddingStore(out / "image").load_all().embeds[0], atol=1e-6)
    assert "FileNotFoundError" in (tmp_path / "o2/image/skipped.jsonl").read_text()


def test_two_torchrun_ranks_give_the_one_process_store(clip_dir, tmp_path, free_port):
    pattern = str(tmp_path / "wds/{00000..00003}.tar")
    keys = _tars(tmp_path / "wds", 4, 3)
    single = tmp_path / "single"
    assert main(_args(clip_dir, single, "--images", pattern, "--texts", pattern)) == 0
    ranks = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port,
           str(REPO / "image_embed.py"), *_args(clip_dir, ranks, "--images", pattern, "--texts", pattern)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind in ("image", "text"):
        one, two = _by_id(single / kind), _by_id(ranks / kind)
        assert sorted(one) == sorted(two) == sorted(keys)
        for key in keys:
            np.testing.assert_allclose(two[key], one[key], atol=1e-6)
        manifest = json.loads((ranks / kind / "manifest.json").read_text())
        assert manifest["parts"] == 2 and manifest["complete"] and manifest["count"] == 12
        assert {e["name"].split("_")[2] for e in manifest["shards"]} == {"part-00000-of-00002", "part-00001-of-00002"}


def test_kill_9_of_one_rank_then_rerun_keeps_every_id_once(clip_dir, tmp_path, capsys, kill_9_after_shards):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(24):
        Image.open(io.BytesIO(_jpeg(i))).save(images / f"{i:03d}.png")
    out = tmp_path / "out"
    job = lambda index, shards=2: _args(clip_dir, out, "--images", str(images), "--shard_size", "4",  # noqa: E731
                                        "--num_shards", str(shards), "--shard_index", str(index))
    part0 = out / "image/part-00000-of-00002.json"
    kill_9_after_shards([sys.executable, str(REPO / "image_embed.py"), *job(0)], {**os.environ, BATCH_DELAY_ENV: "0.3"},
                        part0, shards=1, timeout=90)
    assert not json.loads(part0.read_text())["complete"]
    assert main(job(1)) == 0  # the other rank finishes; part 0 is not: no merge yet
    assert "not merged yet" in capsys.readouterr().out and not (out / "image/manifest.json").exists()
    assert main(job(0, shards=3)) == 2  # another number of ranks on the partial store
    assert "was written by 2 ranks, but this run writes it as one of 3 ranks" in capsys.readouterr().err
    assert main(job(0)) == 0  # resumes part 0, then merges (it is the last)
    printed = capsys.readouterr().out
    assert "done before (resumed)" in printed and "merged: 24 in store from 2 parts" in printed
    assert sorted(_by_id(out / "image")) == [f"{i:03d}.png" for i in range(24)]
    assert main(["--out", str(out), "--merge"]) == 0  # by hand: the same manifest again
    assert "image: merged 2 parts, 24 in store, 0 skipped" in capsys.readouterr().out


def test_a_key_repeated_across_tars_is_stored_once_and_listed(clip_dir, tmp_path, capsys):
    for t in range(2):
        _write_tar(tmp_path / f"{t}.tar", [(f"k{t}.txt", b"a red cube"), ("same.txt", f"caption from tar {t}".encode())])
    assert main(_args(clip_dir, tmp_path / "out", "--texts", str(tmp_path / "{0..1}.tar"))) == 0
    assert "4 inputs, 4 encoded, 0 done before (resumed), 1 skipped, 3 in store" in capsys.readouterr().out
    stored = EmbeddingStore(tmp_path / "out" / "text").load_all()
    assert sorted(stored.ids) == ["k0", "k1", "same"] and "caption from tar 0" in stored.captions
    skipped = [json.loads(line) for line in (tmp_path / "out" / "text" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"id": "same", "reason": "duplicate id: an earlier input of this run has the same id (kept)"}]
