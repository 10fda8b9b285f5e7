"""image_embed.py / revision.embed end to end on a tiny HF CLIP checkpoint: inputs, bad input, resume."""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from demo.tiny.clip import build_tiny_clip
from revision.decode import image_batches, load_image, worker_chunk
from revision.embed import main
from revision.encode import BATCH_DELAY_ENV
from revision.encoders import load_encoder
from revision.errors import InputError, StoreError, UnsafePickleError
from revision.inputs import Sample
from revision.lists import read_data_json, read_images, read_texts
from revision.store import EmbeddingStore

REPO = Path(__file__).resolve().parents[1]
GOOD = ["good/gray.png", "good/gray16.png", "good/palette.png", "good/rgb.jpg", "good/rgba.png", "good/sub/cmyk.jpg"]
BAD = {"bad/corrupt.png": "OSError", "bad/notes.txt": "UnidentifiedImageError", "bad/random.jpg": "UnidentifiedImageError",
       "bad/truncated.jpg": "truncated", "bad/zero.png": "empty file"}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return load_encoder(str(clip_dir), device="cpu")


def _random_rgb(seed: int, size=(48, 36)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six decodable images in awkward modes and five files that are not usable images."""
    root = tmp_path_factory.mktemp("images")
    (root / "good" / "sub").mkdir(parents=True)
    (root / "bad").mkdir()
    base = _random_rgb(0)
    base.convert("L").save(root / "good/gray.png")
    Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257).save(root / "good/gray16.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "good/palette.png")
    base.save(root / "good/rgb.jpg")
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "good/rgba.png")
    base.convert("CMYK").save(root / "good/sub/cmyk.jpg")
    png = _encoded(_random_rgb(1), "PNG")
    (root / "bad/corrupt.png").write_bytes(png[: len(png) // 2] + bytes(len(png) - len(png) // 2))
    (root / "bad/notes.txt").write_text("this is not an image\n")
    (root / "bad/random.jpg").write_bytes(np.random.default_rng(2).bytes(3000))
    jpg = _encoded(_random_rgb(3), "JPEG")
    (root / "bad/truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "bad/zero.png").write_bytes(b"")
    (root / ".hidden.png").write_bytes(png)  # hidden files are not inputs
    return root


@pytest.fixture()
def texts_file(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("a red circle\n\n   \na big blue star on the left\n\t\nsmall green cross\n")
    return path


def _args(clip_dir, out, *extra) -> list[str]:
    # on the CPU wherever the tests run: the reference embeddings below are fp32 CPU ones
    return ["--encoder", str(clip_dir), "--out", str(out), "--batch_size", "4", "--num_workers", "0", "--device", "cpu", *extra]


def test_folder_and_txt_end_to_end(clip_dir, encoder, image_dir, texts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--images", str(image_dir), "--texts", str(texts_file), "--shard_size", "4")) == 0
    printed = capsys.readouterr().out
    assert "image: 11 inputs, 6 encoded, 0 done before (resumed), 5 skipped, 6 in store" in printed
    assert "text : 6 inputs, 3 encoded, 0 done before (resumed), 3 skipped, 3 in store" in printed

    images = EmbeddingStore(out / "image", kind="image")
    images.verify()
    shard = images.load_all()
    assert shard.ids == GOOD and shard.image_paths == GOOD and images.dim == 16
    assert [p.name for p in images.shard_paths] == ["image_embeds_00000.pkl", "image_embeds_00001.pkl"]
    expected = encoder.encode_images([load_image(image_dir / p) for p in GOOD]).numpy()
    np.testing.assert_allclose(shard.embeds.astype(np.float32), expected, atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(shard.embeds.astype(np.float32), axis=1), 1, atol=2e-3)
    assert images.manifest["summary"]["skipped"] == 5 and images.manifest["summary"]["items_per_s"] > 0
    assert images.manifest["encoder"] == encoder.name and images.manifest["complete"]

    skipped = {r["id"]: r["reason"] for r in map(json.loads, (out / "image/skipped.jsonl").read_text().splitlines())}
    assert skipped.keys() == BAD.keys()
    for name, why in BAD.items():
        assert why in skipped[name], (name, skipped[name])

    texts = EmbeddingStore(out / "text", kind="text").load_all()
    assert texts.ids == ["1", "4", "6"]  # line numbers: stable ids
    assert texts.captions == ["a red circle", "a big blue star on the left", "small green cross"]
    np.testing.assert_allclose(texts.embeds.astype(np.float32), encoder.encode_texts(texts.captions).numpy(), atol=2e-3)
    text_skips = [json.loads(r)["id"] for r in (out / "text/skipped.jsonl").read_text().splitlines()]
    assert text_skips == ["2", "3", "5"]

    # A second run over the same inputs finds everything stored and encodes nothing.
    assert main(_args(clip_dir, out, "--images", str(image_dir), "--texts", str(texts_file))) == 0
    assert "image: 11 inputs, 0 encoded, 11 done before (resumed), 5 skipped, 6 in store" in capsys.readouterr().out
    assert len((out / "image/skipped.jsonl").read_text().splitlines()) == 5  # still listed
    assert EmbeddingStore(out / "image").load_all().ids == GOOD


def test_dataloader_workers_give_the_same_store(clip_dir, image_dir, tmp_path):
    serial, parallel = tmp_path / "w0", tmp_path / "w2"
    assert main(_args(clip_dir, serial, "--images", str(image_dir))) == 0
    assert main(_args(clip_dir, parallel, "--images", str(image_dir), "--num_workers", "2")) == 0
    a, b = EmbeddingStore(serial / "image").load_all(), EmbeddingStore(parallel / "image").load_all()
    assert a.ids == b.ids == GOOD and np.array_equal(a.embeds, b.embeds)
    assert (serial / "image/skipped.jsonl").read_text() == (parallel / "image/skipped.jsonl").read_text()


def _tiny_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.resize((4, 4)))).permute(2, 0, 1)


def test_worker_chunks_make_whole_batches_in_order(image_dir):
    assert [worker_chunk(256, w) for w in (0, 1, 2, 8, 15, 300)] == [256, 256, 128, 32, 16, 1]
    assert worker_chunk(6, 4) == 1  # 6 = 6 x 1: the first divisor >= 4 parts
    samples = [Sample(i.id, i.path, i.source, (0, n)) for n, i in enumerate(read_images(image_dir))]  # good and bad mixed
    batches = list(image_batches(iter(samples), _tiny_pixels, batch_size=4, num_workers=2))
    seen = [s for kept, _, failed in batches for s in sorted(kept + [f for f, _ in failed], key=lambda s: s.position)]
    assert seen == samples  # every item once, in input order
    assert [len(kept) + len(failed) for kept, _, failed in batches] == [4, 4, 3]  # 11 items, batches of 4
    for kept, chunks, _failed in batches:
        assert sum(len(c) for c in chunks) == len(kept) and all(len(c) <= 2 for c in chunks)


def test_data_json_with_image_root_and_max_items(clip_dir, image_dir, tmp_path):
    data = {
        "images": [{"id": "img-a", "image": "good/rgb.jpg"}, {"id": "img-b", "image": "good/gray.png"},
                   {"id": "img-c", "image": "bad/zero.png"}],
        "texts": [{"id": "t1", "text": "a red circle"}, {"id": "t2", "text": "  "}, {"id": "t3", "text": "a star"}],
    }
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--data_json", str(path), "--image_root", str(image_dir))) == 0
    assert EmbeddingStore(out / "image").load_all().ids == ["img-a", "img-b"]
    assert EmbeddingStore(out / "image").load_all().image_paths == ["good/rgb.jpg", "good/gray.png"]
    assert EmbeddingStore(out / "text").load_all().ids == ["t1", "t3"]
    assert EmbeddingStore(out / "text").manifest["summary"]["skipped"] == 1

    limited = tmp_path / "limited"
    assert main(_args(clip_dir, limited, "--data_json", str(path), "--image_root", str(image_dir), "--max_items", "1")) == 0
    assert EmbeddingStore(limited / "image").load_all().ids == ["img-a"]
    assert EmbeddingStore(limited / "text").load_all().ids == ["t1"]


def test_list_file_forms(image_dir, tmp_path):
    (tmp_path / "list.txt").write_text("good/rgb.jpg\n\ngood/gray.png\n")
    items = read_images(tmp_path / "list.txt", image_root=image_dir)
    assert [(i.id, i.path) for i in items] == [("good/rgb.jpg", image_dir / "good/rgb.jpg"), ("good/gray.png", image_dir / "good/gray.png")]
    (image_dir / "list.jsonl").write_text('{"id": 7, "image": "good/rgb.jpg"}\n{"image": "good/gray.png"}\n')
    try:
        items = read_images(image_dir / "list.jsonl")  # relative to the list's own folder
    finally:
        (image_dir / "list.jsonl").unlink()
    assert [(i.id, i.path) for i in items] == [("7", image_dir / "good/rgb.jpg"), ("good/gray.png", image_dir / "good/gray.png")]

    (tmp_path / "t.jsonl").write_text('{"id": "a", "text": "x"}\n{"caption": "y"}\n')
    assert [(t.id, t.text) for t in read_texts(tmp_path / "t.jsonl")] == [("a", "x"), ("2", "y")]
    (tmp_path / "t.json").write_text(json.dumps(["x", "y"]))
    assert [(t.id, t.text) for t in read_texts(tmp_path / "t.json")] == [("1", "x"), ("2", "y")]
    (tmp_path / "d.json").write_text(json.dumps({"images": [{"id": "i", "image": "a.png"}], "texts": [{"id": "t", "text": "z"}]}))
    images, texts = read_data_json(tmp_path / "d.json", image_root="/data")
    assert images[0].path == Path("/data/a.png") and texts[0].text == "z"

    (tmp_path / "broken.jsonl").write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:2: not valid JSON"):
        read_texts(tmp_path / "broken.jsonl")
    (tmp_path / "noimage.json").write_text(json.dumps([{"id": "a", "img": "x.png"}]))
    with pytest.raises(InputError, match=r"noimage.json: record 1 has no 'image' path"):
        read_images(tmp_path / "noimage.json")


def test_duplicate_ids_fail_before_encoding(clip_dir, tmp_path, capsys):
    path = tmp_path / "texts.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n')
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--texts", str(path))) == 2
    assert "duplicate id 'a' (row 2)" in capsys.readouterr().err
    assert not out.exists()  # nothing was encoded or written


def test_store_of_another_encoder_is_refused_unless_overwrite(clip_dir, texts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--texts", str(texts_file))) == 0
    before = (out / "text/text_embeds_00000.pkl").read_bytes()
    siglip = build_tiny_clip(tmp_path / "siglip", siglip=True)  # another encoder, dim 32
    assert main(_args(siglip, out, "--texts", str(texts_file))) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "encoder" in err and "dim 16 (asked for 32)" in err and "--overwrite" in err
    assert (out / "text/text_embeds_00000.pkl").read_bytes() == before
    assert main(_args(siglip, out, "--texts", str(texts_file), "--overwrite")) == 0
    store = EmbeddingStore(out / "text")
    assert store.dim == 32 and store.encoder == f"hf:{siglip.resolve()}" and len(store) == 3


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_with_code_payload_is_refused_never_run(clip_dir, texts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--texts", str(texts_file), "--shard_size", "2")) == 0
    marker = tmp_path / "pwned"
    (out / "text/text_embeds_00000.pkl").write_bytes(pickle.dumps([{"id": "1", "embed": _Payload(marker)}]))
    assert main(_args(clip_dir, out, "--texts", str(texts_file))) == 0  # resuming reads bookkeeping, never shards
    with pytest.raises(StoreError, match=r"text_embeds_00000.pkl: sha256 .* differs"):  # hashed before unpickling
        EmbeddingStore(out / "text").load_all()
    with pytest.raises(UnsafePickleError, match=r"text_embeds_00000.pkl: refused to unpickle global"):
        EmbeddingStore(out / "text", verify=False).load_all()
    (tmp_path / "payload.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    assert main(_args(clip_dir, tmp_path / "o2", "--images", str(tmp_path / "payload.pkl"))) == 2
    assert "expected a folder, a .txt list" in capsys.readouterr().err
    assert not marker.exists()


def _png_folder(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir()
    for i in range(count):
        _random_rgb(seed + i, size=(24, 24)).save(folder / f"{i:03d}.png")
    return folder


def test_kill_9_mid_run_then_resume(clip_dir, tmp_path, kill_9_after_shards):
    images = _png_folder(tmp_path / "imgs", 40, seed=100)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "image_embed.py"), *_args(clip_dir, out, "--images", str(images), "--shard_size", "8")]
    env = {**os.environ, BATCH_DELAY_ENV: "0.25"}  # 10 batches of 4: ~2.5 s of encoding, time to kill it mid-way
    manifest = out / "image/manifest.json"
    kill_9_after_shards(cmd, env, manifest, shards=2, timeout=60)
    killed = json.loads(manifest.read_text())
    assert not killed["complete"] and 2 <= len(killed["shards"]) < 5
    first_shard = (out / "image/image_embeds_00000.pkl").read_bytes()

    assert main(_args(clip_dir, out, "--images", str(images), "--shard_size", "8")) == 0
    store = EmbeddingStore(out / "image")
    store.verify()
    ids = store.load_all().ids
    assert sorted(ids) == sorted(f"{i:03d}.png" for i in range(40)) and len(ids) == len(set(ids)) == 40
    assert store.manifest["complete"] and store.manifest["summary"]["resumed"] >= 16
    assert store.manifest["summary"]["encoded"] == 40 - store.manifest["summary"]["resumed"]
    assert (out / "image/image_embeds_00000.pkl").read_bytes() == first_shard  # kept, not recomputed


def test_overwrite_never_follows_manifest_names_out_of_the_store(clip_dir, texts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--texts", str(texts_file))) == 0
    victims = [tmp_path / "victim_abs.txt", tmp_path / "victim_rel.txt"]
    for victim in victims:
        victim.write_text("keep me")
    manifest = json.loads((out / "text/manifest.json").read_text())
    manifest["shards"] += [{"name": str(victims[0]), "rows": 1, "sha256": "0"}, {"name": "../../victim_rel.txt", "rows": 1, "sha256": "0"}]
    (out / "text/manifest.json").write_text(json.dumps(manifest))
    assert main(_args(clip_dir, out, "--texts", str(texts_file), "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "manifest.json: shard entry 1 has name" in err and "not a plain file name" in err
    assert all(v.read_text() == "keep me" for v in victims)


def test_second_writer_is_refused_and_the_first_completes(clip_dir, tmp_path, capsys):
    images = _png_folder(tmp_path / "imgs", 12, seed=200)
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "image_embed.py"), *_args(clip_dir, out, "--images", str(images), "--shard_size", "4")]
    first = subprocess.Popen(cmd, env={**os.environ, BATCH_DELAY_ENV: "0.5"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "image/manifest.json").exists():
        time.sleep(0.05)
    (tmp_path / "other").mkdir()
    _random_rgb(999, size=(24, 24)).save(tmp_path / "other/x.png")
    assert main(_args(clip_dir, out, "--images", str(tmp_path / "other"))) == 2  # other inputs, same --out
    err = capsys.readouterr().err
    assert f"being written by pid {first.pid} on host" in err and "image_embed.py" in err
    stdout, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "12 in store" in stdout
    store = EmbeddingStore(out / "image")
    assert sorted(store.load_all().ids) == [f"{i:03d}.png" for i in range(12)] and store.manifest["complete"]


def test_pixel_cap_skips_from_the_header(clip_dir, tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(bomb)  # ~20 KB on disk, 169 MP (under PIL's own bomb limit)
    assert bomb.stat().st_size < 100_000
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"13000x13000 = 169 MP is over the 100 MP pixel cap"):
        load_image(bomb)
    assert time.perf_counter() - start < 1  # refused from the header: nothing decoded
    images = tmp_path / "imgs"
    images.mkdir()
    _random_rgb(0, size=(40, 30)).save(images / "small.png")
    _random_rgb(1, size=(60, 50)).save(images / "large.png")
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--images", str(images), "--max_pixels", "2000")) == 0
    assert "2 inputs, 1 encoded, 0 done before (resumed), 1 skipped" in capsys.readouterr().out
    skipped = [json.loads(line) for line in (out / "image/skipped.jsonl").read_text().splitlines()]
    assert [(s["id"], "60x50 = 0 MP is over the 0.002 MP pixel cap" in s["reason"]) for s in skipped] == [("large.png", True)]


def test_empty_inputs_are_errors(clip_dir, image_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notimages").mkdir()
    (tmp_path / "notimages/readme.txt").write_text("no images here\n")
    assert main(_args(clip_dir, tmp_path / "o1", "--images", str(tmp_path / "empty"))) == 2
    assert "--images" in (err := capsys.readouterr().err) and "empty: no inputs" in err
    assert main(_args(clip_dir, tmp_path / "o2", "--texts", str(tmp_path / "empty.txt"))) == 2
    assert "empty.txt: no inputs" in capsys.readouterr().err
    assert main(_args(clip_dir, tmp_path / "o3", "--images", str(tmp_path / "notimages"))) == 2
    assert "nothing stored: 1 inputs, all skipped" in capsys.readouterr().err


def _dies_on_wide_images(image: Image.Image) -> torch.Tensor:
    if image.size[0] == 30:  # as a decoder crash or the OOM killer would end a worker
        os.kill(os.getpid(), signal.SIGKILL)
    return _tiny_pixels(image)


def test_a_dead_decoding_worker_stops_the_run_instead_of_hanging(tmp_path):
    for i in range(8):
        _random_rgb(i, size=(30 if i == 5 else 20, 20)).save(tmp_path / f"{i}.png")
    samples = [Sample(str(i), tmp_path / f"{i}.png", f"{i}.png", (0, i)) for i in range(8)]
    assert [len(kept) for kept, _, _ in image_batches(iter(samples[:5]), _dies_on_wide_images, 2, 2)] == [2, 2, 1]
    with pytest.raises(RuntimeError, match=r"a decoding worker died .* being decoded start at id '\d' \(\d.png\)"):
        list(image_batches(iter(samples), _dies_on_wide_images, batch_size=2, num_workers=2))


def test_photos_are_turned_upright_by_their_exif_orientation(clip_dir, tmp_path, sideways_photo):
    (tmp_path / "imgs").mkdir()
    paths = sideways_photo(tmp_path / "imgs")
    upright, exif, raw = (load_image(paths[n]) for n in ("upright", "exif", "raw"))
    assert exif.size == upright.size == (64, 48) and raw.size == (48, 64)
    assert np.abs(np.asarray(exif, np.int16) - np.asarray(upright, np.int16)).mean() < 2
    assert main(_args(clip_dir, tmp_path / "out", "--images", str(tmp_path / "imgs"), "--num_workers", "1")) == 0
    store = EmbeddingStore(tmp_path / "out" / "image").load_all()
    got = dict(zip(store.ids, store.embeds.astype(np.float32)))
    np.testing.assert_allclose(got["exif.jpg"], got["upright.jpg"], atol=2e-3)
    assert np.abs(got["raw.jpg"] - got["upright.jpg"]).max() > 1e-2  # the sideways pixels embed differently


def test_pixel_cap_bounds_the_resized_size_for_any_aspect_ratio(clip_dir, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (100_000, 1)).save(tmp_path / "imgs" / "thin.png")  # 377 bytes, 0.1 MP: under the 100 MP cap
    Image.new("RGB", (1, 4000)).save(tmp_path / "imgs" / "tall.png")
    _random_rgb(0, size=(40, 30)).save(tmp_path / "imgs" / "normal.png")
    with pytest.raises(ValueError, match=r"100000x1: resized to 448 px on its short side it would be 20070 MP \(aspect "
                                         r"ratio 100000:1\), over the 100 MP pixel cap \(--max_pixels\)"):
        load_image(tmp_path / "imgs" / "thin.png")
    assert main(_args(clip_dir, tmp_path / "out", "--images", str(tmp_path / "imgs"), "--max_pixels", "1000000")) == 0
    assert "3 inputs, 1 encoded, 0 done before (resumed), 2 skipped" in capsys.readouterr().out
    skipped = {s["id"]: s["reason"] for s in map(json.loads, (tmp_path / "out/image/skipped.jsonl").read_text().splitlines())}
    assert skipped["thin.png"].startswith("ValueError: 100000x1: resized to 32 px on its short side it would be 102 MP")
    assert skipped["tall.png"].startswith("ValueError: 1x4000: resized to 32 px on its short side it would be 4 MP")


def test_a_byte_order_mark_is_not_part_of_the_first_text_or_path(tmp_path):
    (tmp_path / "t.txt").write_bytes("\ufeffa red cube\na blue ball\n".encode())
    assert [t.text for t in read_texts(tmp_path / "t.txt")] == ["a red cube", "a blue ball"]
    (tmp_path / "i.txt").write_bytes("\ufeffimgs/a.png\n".encode())
    assert [i.source for i in read_images(tmp_path / "i.txt")] == ["imgs/a.png"]


def test_a_refused_store_leaves_the_other_kinds_complete_store_as_it_was(clip_dir, image_dir, texts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(clip_dir, out, "--images", str(image_dir))) == 0
    before = (out / "image" / "manifest.json").read_bytes()
    siglip = build_tiny_clip(tmp_path / "siglip", siglip=True)
    main(_args(siglip, out, "--texts", str(texts_file)))  # a text store of another encoder (dim 32)
    capsys.readouterr()
    assert main(_args(clip_dir, out, "--images", str(image_dir), "--texts", str(texts_file))) == 2
    assert "out/text: existing store has encoder" in capsys.readouterr().err  # refused after the image store was opened
    assert (out / "image" / "manifest.json").read_bytes() == before  # still complete, not restamped
    EmbeddingStore(out / "image").require_complete()
