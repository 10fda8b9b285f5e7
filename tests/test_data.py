"""Data: the memory-mapped table, id resolution and its errors, tokenization and truncation, the collator."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from demo.tiny.lm import build_tokenizer, make_tiny_corpus
from revision.conversation import Segment
from revision.data import DataCollator, EmbeddingTable, InputError, SupervisedDataset, check_lengths, image_map_from, tokenize
from revision.errors import StoreError
from revision.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from revision.shards import Shard, write_reference_shard
from revision.store import EmbeddingStore
from revision.store_writer import write_store

VISUAL = 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("text"), "text", n=32, dim=8)


@pytest.fixture(scope="module")
def image_corpus(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("image"), "image", n=32, dim=8)


def write_json(path, samples):
    path.write_text(json.dumps(samples))
    return path


def dataset(data, tokenizer, store, template="plain", max_length=64, **kwargs):
    return SupervisedDataset(data, tokenizer, EmbeddingTable(store), template, VISUAL, max_length, **kwargs)


def test_table_looks_up_ids_and_image_paths(image_corpus):
    store, _ = image_corpus
    table = EmbeddingTable(store)
    assert (len(table), table.dim, table.kind) == (32, 8, "image")
    assert isinstance(table.embeds, np.memmap)
    rows = table.rows(["image000005", "nope", "image000005-but-longer-than-any-id"])
    assert list(rows) == [5, -1, -1]
    assert list(table.rows(["images/image000007.png"], by_source=True)) == [7]
    shard = next(EmbeddingStore(store).iter_shards())
    assert np.allclose(table[5], shard.embeds[5])


def test_table_cache_is_reused_and_rebuilt_when_the_store_changes(tmp_path):
    write_store(tmp_path / "s", "text", ["a", "b"], np.eye(2, 4), encoder="e")
    first = EmbeddingTable(tmp_path / "s")
    caches = list((tmp_path / "s" / ".revision_cache").iterdir())
    assert len(caches) == 1
    assert EmbeddingTable(tmp_path / "s").embeds.filename == first.embeds.filename
    write_store(tmp_path / "s", "text", ["a", "c"], np.eye(2, 4)[::-1], encoder="e", overwrite=True)
    table = EmbeddingTable(tmp_path / "s")
    assert list(table.rows(["a", "b", "c"])) == [0, -1, 1]
    assert table[0].argmax() == 1


def test_reference_layout_folder_and_duplicate_ids(tmp_path):
    (tmp_path / "ref").mkdir()
    (tmp_path / "dup").mkdir()
    write_reference_shard(tmp_path / "ref" / "text_embeds_1.pkl", Shard("text", ["x", "y"], np.eye(2, 4), ["c1", "c2"]))
    write_reference_shard(tmp_path / "ref" / "text_embeds_2.pkl", Shard("text", ["z"], np.eye(1, 4), ["c3"]))
    table = EmbeddingTable(tmp_path / "ref", cache_dir=tmp_path / "cache")
    assert list(table.rows(["z", "x"])) == [2, 0]
    write_reference_shard(tmp_path / "dup" / "text_embeds_1.pkl", Shard("text", ["x", "x"], np.eye(2, 4), ["a", "b"]))
    with pytest.raises(StoreError, match="duplicate id 'x'"):
        EmbeddingTable(tmp_path / "dup", cache_dir=tmp_path / "cache")


def test_pretraining_sample_tokens(text_corpus, tokenizer):
    store, data = text_corpus
    ds = dataset(data, tokenizer, store)
    item = ds[0]
    caption = json.loads(data.read_text())[0]["conversations"][1]["value"]
    ids, labels = item["input_ids"], item["labels"]
    assert ids[0] == tokenizer.bos_token_id and (ids[1:1 + VISUAL] == IMAGE_TOKEN_INDEX).all()
    assert (labels[:1 + VISUAL] == IGNORE_INDEX).all()
    assert tokenizer.decode(labels[1 + VISUAL:]) == caption + " </s>"
    # the aligned text store is used as it is: no map, no noise
    assert torch.allclose(item["image_embeds"], torch.from_numpy(EmbeddingTable(store)[0]))


def test_caption_records_and_jsonl(tmp_path, text_corpus, tokenizer):
    store, _ = text_corpus
    data = tmp_path / "captions.jsonl"
    data.write_text('{"id": "text000003", "caption": "a blue star"}\n\n{"id": "text000004", "caption": "a red circle"}\n')
    ds = dataset(data, tokenizer, store)
    assert len(ds) == 2 and list(ds.rows) == [3, 4]
    assert tokenizer.decode(ds[0]["labels"][ds[0]["labels"] >= 0]) == "a blue star </s>"


def test_missing_id_names_id_and_file_or_is_skipped(tmp_path, text_corpus, tokenizer):
    store, _ = text_corpus
    data = write_json(tmp_path / "d.json", [{"id": "text000001", "caption": "a red star"},
                                            {"id": "ghost", "caption": "a red star"}])
    with pytest.raises(LookupError, match=r"d.json: sample 1 id 'ghost' has no embedding in .*--skip_missing"):
        dataset(data, tokenizer, store)
    ds = dataset(data, tokenizer, store, skip_missing=True)
    assert (len(ds), ds.skipped) == (1, 1)


def test_image_count_errors_name_file_and_sample(tmp_path, image_corpus, tokenizer):
    store, _ = image_corpus
    two = write_json(tmp_path / "two.json", [{"id": "image000001", "conversations": [
        {"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "red"}]}])
    with pytest.raises(ValueError, match=r"two.json: sample 0 \(id 'image000001'\): 2 <image> placeholders"):
        dataset(two, tokenizer, store, "chat")
    none = write_json(tmp_path / "none.json", [{"id": "image000001", "image": "images/image000001.png",
                                                "conversations": [{"from": "human", "value": "what ?"},
                                                                  {"from": "gpt", "value": "red"}]}])
    with pytest.raises(ValueError, match=r"none.json: sample 0 .*no <image> placeholder, but it names an image"):
        dataset(none, tokenizer, store, "chat")
    plain = write_json(tmp_path / "plain.json", [{"id": "image000001", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]}])
    with pytest.raises(ValueError, match="pretraining \\(plain\\) needs one per sample"):
        dataset(plain, tokenizer, store, "plain")


def test_instruction_data_image_map_noise_and_image_free_samples(image_corpus, tokenizer):
    store, data = image_corpus
    calls = []

    def image_map(x):  # stands in for the alignment's image_map: flips the sign, then normalises
        calls.append(x.shape)
        return -x / np.linalg.norm(x, axis=1, keepdims=True)

    ds = dataset(data, tokenizer, store, "chat", image_map=image_map)
    assert len(ds) == 32 + 4 and (ds.rows[-4:] == -1).all()
    item = ds[0]
    assert calls == [(1, 8)]
    assert torch.allclose(item["image_embeds"], -torch.from_numpy(EmbeddingTable(store)[0]), atol=1e-6)
    colour, shape = (json.loads(data.read_text())[0]["conversations"][1]["value"],
                     json.loads(data.read_text())[0]["conversations"][3]["value"])
    assert tokenizer.decode(item["labels"][item["labels"] >= 0]) == f"{colour} <|end|> {shape} <|end|>"
    assert ds[len(ds) - 1]["image_embeds"] is None
    noisy = dataset(data, tokenizer, store, "chat", embed_noise_std=0.1)
    a, b = noisy[0]["image_embeds"], noisy[0]["image_embeds"]
    noisy.set_epoch(1)
    c = noisy[0]["image_embeds"]
    assert torch.equal(a, b) and not torch.equal(a, c) and abs(c.norm().item() - 1) < 1e-5
    assert 0.9 < float(a @ ds[0]["image_embeds"].neg()) < 0.999  # the same direction, corrupted
    assert ds.lengths[0] > VISUAL and ds.lengths[-1] < VISUAL + 10


def test_lengths_are_checked_and_truncation_keeps_the_visual_block(tokenizer):
    with pytest.raises(ValueError, match="model_max_length 10 leaves no room for text.*num_visual_tokens=8"):
        check_lengths(10, 8)
    long_before = " ".join(["red"] * 30)
    segments = [Segment(long_before + " <image>", False), Segment(" blue star", True)]
    ids, labels, cut = tokenize(segments, tokenizer, VISUAL, 20)
    assert cut and len(ids) == 20
    assert (ids == IMAGE_TOKEN_INDEX).sum() == VISUAL and (ids[-VISUAL:] == IMAGE_TOKEN_INDEX).all()
    ids, labels, cut = tokenize([Segment("<image>", False), Segment(long_before, True)], tokenizer, VISUAL, 20)
    assert cut and len(ids) == 20 and (ids[:VISUAL] == IMAGE_TOKEN_INDEX).all() and (labels[VISUAL:] >= 0).all()


def test_truncation_is_counted_across_loader_workers_once_per_sample(tmp_path, tokenizer):
    long = " ".join(["red"] * 40)
    records = [{"id": f"s{i}", "conversations": [{"from": "human", "value": "what colour ?"},
                                                 {"from": "gpt", "value": long if i % 3 == 0 else "red"}]} for i in range(12)]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(records))
    ds = SupervisedDataset(data, tokenizer, None, "chat", VISUAL, 24)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=lambda batch: len(batch))
    for _ in range(2):  # two epochs: a sample cut twice still counts once
        assert sum(loader) == 12
    assert ds.truncated == 4  # samples 0, 3, 6, 9, all cut in the workers


def test_collator_pads_and_fills_image_free_rows_with_zeros():
    features = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "image_embeds": torch.ones(4)},
                {"input_ids": torch.tensor([5]), "labels": torch.tensor([5]), "image_embeds": None}]
    out = DataCollator(pad_token_id=0, embed_dim=4)(features)
    assert out["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert out["attention_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert out["image_embeds"].sum(1).tolist() == [4.0, 0.0]


def test_a_million_row_table_is_memory_mapped(tmp_path):
    n, dim = 1_000_000, 64
    ids = [f"{i:07d}" for i in range(n)]
    embeds = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
    write_store(tmp_path / "big", "text", ids, embeds, encoder="e", shard_size=n)
    del embeds
    EmbeddingTable(tmp_path / "big")  # builds the cache here, so the child below only opens it
    child = (
        "import sys\n"
        "from revision.data import EmbeddingTable\n"
        "def rss():\n"
        "    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('Rss')}\n"
        "before = rss()\n"
        "t = EmbeddingTable(sys.argv[1])\n"
        "rows = t.rows(['0000007', '0999999', '0500000'])\n"
        "x = sum(float(t[r][0]) for r in rows)\n"
        "after = rss()\n"
        "print(after['RssAnon'] - before['RssAnon'], after['RssFile'] - before['RssFile'], t.embeds.nbytes, rows.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", child, str(tmp_path / "big")], capture_output=True, text=True, check=True)
    anon, file_backed, table_bytes, rows = out.stdout.split(maxsplit=3)
    assert int(table_bytes) == n * dim * 2  # float16 on disk
    # Private memory does not grow; the few pages read are shared, reclaimable page cache (kernel read-around).
    assert int(anon) < 2 * 2**20, f"private RSS grew by {int(anon) / 2**20:.1f} MiB"
    assert int(file_backed) < 0.25 * int(table_bytes), f"mapped {int(file_backed) / 2**20:.1f} MiB of the table"
    assert rows.strip() == "[7, 999999, 500000]"


def test_unusable_rows_name_file_shard_row_and_id_or_are_skipped(tmp_path, tokenizer):
    # a reference-layout store (no manifest, no row checks when written): NaN, Inf and all-zero rows get through
    (tmp_path / "ref").mkdir()
    ids = [f"t{i}" for i in range(6)]
    embeds = np.eye(6, 4, dtype=np.float32) + 0.5
    embeds[1, 2], embeds[4, 0] = np.nan, np.inf
    write_reference_shard(tmp_path / "ref" / "text_embeds_1.pkl", Shard("text", ids[:3], embeds[:3], ["c"] * 3), "float32")
    embeds[5] = 0
    write_reference_shard(tmp_path / "ref" / "text_embeds_2.pkl", Shard("text", ids[3:], embeds[3:], ["c"] * 3), "float32")
    data = write_json(tmp_path / "d.json", [{"id": i, "caption": "a red star"} for i in ids])
    table = EmbeddingTable(tmp_path / "ref")
    assert table.unusable_rows.tolist() == [1, 4, 5]
    with pytest.raises(InputError, match=r"d.json: sample 1 id 't1': unusable embedding in .*ref/text_embeds_1.pkl row 1 "
                                         r"\(id 't1'\): NaN \(3 samples like it\); pass --skip_bad_embeddings"):
        dataset(data, tokenizer, tmp_path / "ref")
    assert table.describe(4).endswith("text_embeds_2.pkl row 1 (id 't4'): Inf")
    assert table.describe(5).endswith("text_embeds_2.pkl row 2 (id 't5'): all-zero vector")
    ds = dataset(data, tokenizer, tmp_path / "ref", skip_bad_embeddings=True)
    assert (len(ds), ds.skipped_bad, ds.ids) == (3, 3, ["t0", "t2", "t3"])
    assert all(torch.isfinite(ds[i]["image_embeds"]).all() for i in range(len(ds)))


def test_non_finite_alignment_statistics_are_refused(tmp_path):
    dim = 4
    stats = {"format": "revision.align/1", "method": "realign", "dim": dim, "info": {}, "mu_text": [0.1] * dim,
             "mu_image": [0.2] * dim, "mu_hat": [0.2] * dim, "scale": float("nan")}
    (tmp_path / "align_stats.json").write_text(json.dumps(stats))
    with pytest.raises(StoreError, match=r"align_stats.json: alignment statistic 'scale' is nan; it must be a finite number"):
        image_map_from(tmp_path / "align_stats.json")


def test_empty_conversations_and_samples_with_no_answer_are_skipped_and_counted(tmp_path, image_corpus, tokenizer):
    store, _ = image_corpus
    good = {"id": "image000001", "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]}
    samples = [good, {"id": "image000002", "conversations": []},
               {"id": "image000003", "conversations": [{"from": "human", "value": "<image>\nwhat ?"}]},
               {"id": "image000004", "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": " "}]}]
    ds = dataset(write_json(tmp_path / "d.json", samples), tokenizer, store, "chat")
    assert (len(ds), ds.skipped_empty, ds.ids) == (1, 3, ["image000001"])
    with pytest.raises(InputError, match=r"none.json: no sample left to train on \(3 samples: 3 with no assistant turn"):
        dataset(write_json(tmp_path / "none.json", samples[1:]), tokenizer, store, "chat")


def test_empty_and_non_utf8_data_files_are_named(tmp_path, text_corpus, tokenizer):
    store, _ = text_corpus
    (tmp_path / "empty.json").write_text("\n")
    with pytest.raises(InputError, match=r"empty.json: empty file \(no samples\)"):
        dataset(tmp_path / "empty.json", tokenizer, store)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"id": "text000001", "caption": "a red star"}\n{"id": "x", "caption": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9"):
        dataset(tmp_path / "latin1.jsonl", tokenizer, store)


def test_data_utils_check_reports_unusable_rows(tmp_path, tokenizer, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "ref").mkdir()
    embeds = np.eye(3, 4, dtype=np.float32)
    embeds[2] = np.inf
    write_reference_shard(tmp_path / "ref" / "text_embeds_1.pkl", Shard("text", ["a", "b", "c"], embeds, ["x"] * 3), "float32")
    data = write_json(tmp_path / "d.json", [{"id": i, "caption": "a red star"} for i in "abc"])
    script = str(Path(__file__).resolve().parents[1] / "data_utils.py")

    def check(*extra):
        argv = ["data_utils.py", "--data_path", str(data), "--embed_folder", str(tmp_path / "ref"),
                "--model_name_or_path", str(tmp_path / "tok"), "--num_visual_tokens", str(VISUAL), *extra]
        monkeypatch.setattr(sys, "argv", argv)
        runpy.run_path(script, run_name="__main__")
        return capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        check()
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert "1 unusable rows (NaN / Inf / all zero), e.g. " in out and "text_embeds_1.pkl row 2 (id 'c'): Inf" in out
    assert err.count("\n") == 1 and "d.json: sample 2 id 'c': unusable embedding" in err
    out, _ = check("--skip_bad_embeddings")
    assert "d.json: 2 samples (2 with an embedding; skipped: 0 with no embedding, 1 with an unusable one" in out


def test_ids_match_exactly_and_one_long_id_costs_its_own_bytes(tmp_path):
    ids = [f"t{i}" for i in range(2000)]
    ids[3], ids[7] = "trail\0", "x" * 400_000
    write_store(tmp_path / "s", "text", ids, np.random.default_rng(0).normal(size=(2000, 8)), encoder="e")
    table = EmbeddingTable(tmp_path / "s")
    assert table.rows(["trail", "trail\0", "x" * 400_000, "x" * 399_999, "t5", "t1999", "nope"]).tolist() == [-1, 3, 7, -1, 5, 1999, -1]
    cache = next((tmp_path / "s" / ".revision_cache").iterdir())
    index_bytes = sum(f.stat().st_size for f in cache.glob("ids_*.npy"))
    assert index_bytes < 400_000 + 2000 * 40 + 5 * 128  # the keys' bytes, 32 bytes a row of index + offsets, npy headers
    assert "text_embeds_00000.pkl row 3 (id 'trail\\x00')" in table.describe(3)  # named exactly


def test_samples_render_would_refuse_are_refused_before_training(tmp_path, text_corpus, tokenizer):
    store, data = text_corpus
    samples = json.loads(open(data).read())
    first_gpt = [dict(samples[0], conversations=[{"from": "gpt", "value": "a caption"}, {"from": "human", "value": "<image>"},
                                                 {"from": "gpt", "value": "again"}])] + samples[1:]
    with pytest.raises(InputError, match=r"d.json: sample 0 \(id 'text000000'\): begins with a gpt turn; a conversation "
                                         r"begins with a human turn"):
        dataset(write_json(tmp_path / "d.json", first_gpt), tokenizer, store)
    two = [dict(samples[0], conversations=[{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"},
                                           {"from": "human", "value": "?"}, {"from": "gpt", "value": "b"}])] + samples[1:]
    with pytest.raises(InputError, match=r"sample 0 \(id 'text000000'\): 2 gpt turns; pretraining \(plain\) takes one caption"):
        dataset(write_json(tmp_path / "d.json", two), tokenizer, store)


def test_a_data_file_holding_an_object_says_it_expects_a_list(tmp_path, text_corpus, tokenizer):
    store, data = text_corpus
    (tmp_path / "d.json").write_text(json.dumps({"data": json.loads(open(data).read())}, indent=1))
    with pytest.raises(InputError, match=r"d.json: a JSON object \(keys 'data'\), expected a list of records \(a JSON array, "
                                         r"or JSONL: one record a line\); are the records under 'data'\?"):
        dataset(tmp_path / "d.json", tokenizer, store)


def test_one_sample_per_question_and_the_image_after_it(image_corpus, tokenizer):
    """--split_turns: each question of a conversation is its own sample with the same image row and one answer;
    --image_placement last: the visual block comes after the question's tokens."""
    store, data = image_corpus
    whole = dataset(data, tokenizer, store, "chat")
    split = dataset(data, tokenizer, store, "chat", split=True, image_placement="last")
    assert len(whole) == 32 + 4 and len(split) == 2 * 32 + 4
    assert list(split.rows[:4]) == [whole.rows[0], whole.rows[0], whole.rows[1], whole.rows[1]]
    assert split.ids[:2] == [whole.ids[0]] * 2 and (split.rows[-4:] == -1).all()
    first, second = split[0], split[1]
    colour, shape = (turn["value"] for turn in json.loads(data.read_text())[0]["conversations"][1::2])
    assert tokenizer.decode(first["labels"][first["labels"] >= 0]) == f"{colour} <|end|>"
    assert tokenizer.decode(second["labels"][second["labels"] >= 0]) == f"{shape} <|end|>"
    assert torch.equal(first["image_embeds"], second["image_embeds"])
    for item in (first, second):
        visual = torch.nonzero(item["input_ids"] == IMAGE_TOKEN_INDEX).flatten()
        question = tokenizer.decode(item["input_ids"][: int(visual[0])])
        assert len(visual) == VISUAL and "?" in question  # the question is read before the image
    before = whole[0]["input_ids"]
    assert "?" not in tokenizer.decode(before[: int(torch.nonzero(before == IMAGE_TOKEN_INDEX)[0])])
