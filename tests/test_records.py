"""The one JSON / JSONL reader: formats, locations, and errors that name the file and line."""
import json

import pytest

from revision.records import RecordsError, located_records, read_dicts, read_records


def test_jsonl_json_list_and_document(tmp_path):
    rows = [{"id": "a", "text": "héllo"}, {"id": "b"}]
    (tmp_path / "r.jsonl").write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n" + json.dumps(rows[1]) + "\n")
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSONL named .json
    (tmp_path / "doc.json").write_text(json.dumps({"images": rows}, indent=2))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[1]).encode() + b"\n")
    for name in ("r.jsonl", "list.json", "lines.json"):
        assert read_records(tmp_path / name) == rows and read_dicts(tmp_path / name) == rows
    assert read_records(tmp_path / "doc.json", document=True) == {"images": rows}
    assert read_records(tmp_path / "r.jsonl", document=True) == rows  # JSONL is records, document or not
    assert read_records(tmp_path / "bom.jsonl") == [rows[1]]
    assert [w for w, _ in located_records(tmp_path / "r.jsonl")] == [f"{tmp_path / 'r.jsonl'}:1", f"{tmp_path / 'r.jsonl'}:3"]
    assert [w for w, _ in located_records(tmp_path / "list.json")][1] == f"{tmp_path / 'list.json'}: record 2"


def test_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n\n{"id": 2,}\n')
    with pytest.raises(RecordsError, match=r"bad\.jsonl:3: not valid JSON \(.* at column 10\)"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[\n {"id": 1},\n {"id" 2}\n]')
    with pytest.raises(RecordsError, match=r"bad\.json:3: not valid JSON \(Expecting ':' delimiter at column 8\)"):
        read_records(tmp_path / "bad.json")
    (tmp_path / "latin1.jsonl").write_bytes('{"t": "a"}\n{"t": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(RecordsError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9 at column 11\)"):
        read_records(tmp_path / "latin1.jsonl")
    (tmp_path / "mixed.jsonl").write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(RecordsError, match=r"mixed\.jsonl:2: a list, expected a JSON object"):
        read_dicts(tmp_path / "mixed.jsonl")
    assert issubclass(RecordsError, ValueError)  # callers that catch ValueError keep working
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "absent.jsonl")
