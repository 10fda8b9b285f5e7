"""One error path: every command reports a refused input as one line `error: ...` on stderr and exits with status 2;
one InputError, one StoreError (alignment statistics: its subclass AlignmentError), one rule for an unusable row."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from revision import errors
from revision.align import load_alignment
from revision.check_embeddings import check_store, main as check_embeddings
from revision.embedding_rows import bad_rows
from revision.errors import AlignmentError, InputError, StoreError, exit_with, report
from revision.evaluate import main as evaluate
from revision.lists import read_texts
from revision.shards import Shard, write_reference_shard

REPO = Path(__file__).resolve().parents[1]


def test_report_prints_one_line_and_returns_2(capsys):
    assert report(StoreError("shard.pkl: row 3\n  (id 'a') is\tbad")) == errors.BAD_INPUT == 2
    assert capsys.readouterr().err == "error: shard.pkl: row 3 (id 'a') is bad\n"
    assert report("x: ids do not match", code=3, prog="tool.py") == 3
    assert capsys.readouterr().err == "tool.py: error: x: ids do not match\n"


def test_exit_with_exits_2_without_a_chained_traceback(capsys):
    with pytest.raises(SystemExit) as caught:
        try:
            raise InputError("data.json: sample 2: no image")
        except InputError as e:
            exit_with(e)
    assert caught.value.code == 2 and caught.value.__suppress_context__
    assert capsys.readouterr().err == "error: data.json: sample 2: no image\n"


def test_the_error_classes_are_one_family():
    assert issubclass(AlignmentError, StoreError) and issubclass(errors.UnsafePickleError, StoreError)
    assert issubclass(InputError, ValueError) and issubclass(StoreError, ValueError)


def test_input_lists_and_alignment_statistics_raise_the_shared_classes(tmp_path):
    with pytest.raises(InputError, match="--texts .*missing.txt: no such file"):
        read_texts(tmp_path / "missing.txt")
    (tmp_path / "align_stats.json").write_text(json.dumps({"format": "revision.align/1", "method": "mean_shift", "dim": 2}))
    with pytest.raises(AlignmentError, match=r"align_stats.json: mean_shift statistics lack \['mu_text', 'mu_image'\]"):
        load_alignment(tmp_path)


def test_commands_share_the_error_line(tmp_path, capsys):
    assert evaluate(["--answers", str(tmp_path / "none.jsonl"), "--references", str(tmp_path / "none.jsonl"),
                     "--task", "mc", "--out", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert check_embeddings([str(tmp_path / "no_store")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'no_store'}: no such store folder\n"


def test_a_command_line_run_exits_2_with_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "revision.check_embeddings", str(tmp_path / "no_store")],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and done.stderr == f"error: {tmp_path / 'no_store'}: no such store folder\n"


def test_check_embeddings_flags_exactly_the_rows_the_readers_refuse(tmp_path):
    rows = np.eye(6, dtype=np.float32)
    rows[1, 0], rows[2, 1], rows[3] = np.nan, np.inf, 0.0
    rows[4] = 1e-8  # tiny but a direction: usable (readers renormalise it); its norm is off 1, so the check flags that
    (tmp_path / "text").mkdir()
    ids = [f"t{i}" for i in range(6)]
    write_reference_shard(tmp_path / "text" / "text_embeds_1.pkl", Shard("text", ids, rows, ids), dtype="float32")
    found = check_store(tmp_path / "text")
    refused = {ids[i] for i in bad_rows(rows)}
    assert set(found["zero_rows"]) | set(found["non_finite_rows"]) == refused == {"t1", "t2", "t3"}
    assert found["zero_rows"] == ["t3"] and found["off_norm_rows"] == ["t4"]
