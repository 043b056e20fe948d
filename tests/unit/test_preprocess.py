"""megaglm-preprocess: JSONL / text -> megatron IndexedDataset, read back with megatron's reader."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megaglm.config import TokenizerConfig
from megaglm.data.preprocess import PreprocessError, main, preprocess
from megaglm.data.tokenizer import build_tokenizer

DOCS = [
    "First document.\nWith two lines.",
    "Zweites Dokument: Grüße! 第三 🙂",
    "Special text <|endoftext|> [gMASK] stays ordinary.",
]
TXT = "A plain text file is one document.\n\nEven with paragraphs.\n"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TokenizerConfig())


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_back(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def digest(prefix: str) -> tuple[str, str]:
    return tuple(hashlib.sha256(Path(prefix + s).read_bytes()).hexdigest() for s in (".bin", ".idx"))


def test_jsonl_and_txt_round_trip(tmp_path, tok):
    jl = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(DOCS)])
    txt = tmp_path / "b.txt"
    txt.write_text(TXT, encoding="utf-8")
    prefix = str(tmp_path / "out" / "ds")
    summary = preprocess([jl, txt], prefix, tok, progress=False)

    expected = [tok.encode(d) + [tok.eod] for d in DOCS + [TXT]]
    got = read_back(prefix)
    assert got == expected
    assert IndexedDataset(prefix).index.dtype == np.int32  # vocab 100270 > uint16 range
    assert summary.documents == 4 and summary.files == 2
    assert summary.tokens == sum(map(len, expected))
    assert summary.skipped == {}
    # the special-token text in the data was not turned into special ids
    assert tok.convert_special("[gMASK]") not in got[2] and got[2].count(tok.eod) == 1
    assert [t for t in os.listdir(tmp_path / "out")] and all(
        not n.startswith(".") for n in os.listdir(tmp_path / "out")
    )


def test_directory_input_sorted_and_json_key(tmp_path, tok):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    write_jsonl(d / "sub" / "z.jsonl", [{"body": "zzz"}])
    write_jsonl(d / "a.jsonl", [{"body": "aaa"}, {"body": "bbb"}])
    (d / "ignored.csv").write_text("x,y\n")
    prefix = str(tmp_path / "ds")
    summary = preprocess([d], prefix, tok, json_key="body", progress=False, workers=2)
    assert read_back(prefix) == [tok.encode(t) + [tok.eod] for t in ("aaa", "bbb", "zzz")]
    assert summary.files == 2


def test_malformed_line_names_file_and_line(tmp_path, tok):
    jl = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, '{"text": "unterminated', {"text": "fine"}])
    with pytest.raises(PreprocessError) as err:
        preprocess([jl], str(tmp_path / "ds"), tok, progress=False)
    assert f"{jl}:2" in str(err.value) and "malformed JSON" in str(err.value)

    for row, what in [({"other": "x"}, "missing"), ({"text": 5}, "not a string"), ("[1, 2]", "JSON object")]:
        jl2 = write_jsonl(tmp_path / "bad2.jsonl", [{"text": "ok"}, {"text": "ok"}, row])
        with pytest.raises(PreprocessError, match=rf"bad2.jsonl:3: .*{what}"):
            preprocess([jl2], str(tmp_path / "ds"), tok, progress=False)


def test_skip_bad_lines_counts_reasons(tmp_path, tok):
    jl = write_jsonl(
        tmp_path / "mixed.jsonl",
        [{"text": "one"}, "{broken", {"other": 1}, {"text": None}, {"text": "   \n"}, "", {"text": "two"}],
    )
    prefix = str(tmp_path / "ds")
    summary = preprocess([jl], prefix, tok, skip_bad_lines=True, progress=False)
    assert read_back(prefix) == [tok.encode("one") + [tok.eod], tok.encode("two") + [tok.eod]]
    assert summary.skipped == {
        "malformed JSON": 1,
        "missing key 'text'": 1,
        "'text' is not a string": 1,
        "empty document": 1,
        "blank line": 1,
    }
    assert summary.skipped_examples["malformed JSON"] == [f"{jl}:2"]
    assert "empty document" in summary.format()


def test_empty_documents_are_skipped_without_flag(tmp_path, tok):
    jl = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "x"}])
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text(" \n\t\n")
    summary = preprocess([jl, empty_txt], str(tmp_path / "ds"), tok, progress=False)
    assert summary.skipped == {"empty document": 2} and summary.documents == 1


def test_non_utf8_names_file_and_offset(tmp_path, tok):
    good = b'{"text": "caf\xc3\xa9"}\n'
    bad_line = b'{"text": "caf\xe9"}\n'  # latin-1 e-acute
    jl = tmp_path / "latin.jsonl"
    jl.write_bytes(good + bad_line)
    offset = len(good) + bad_line.index(b"\xe9")
    with pytest.raises(PreprocessError) as err:
        preprocess([jl], str(tmp_path / "ds"), tok, progress=False, skip_bad_lines=True)
    assert str(jl) in str(err.value) and f"byte offset {offset}" in str(err.value)

    txt = tmp_path / "latin.txt"
    txt.write_bytes(b"abc\ndef \xff\n")
    with pytest.raises(PreprocessError, match=r"latin.txt is not valid UTF-8: byte offset 8"):
        preprocess([txt], str(tmp_path / "ds"), tok, progress=False)


def test_failed_run_leaves_existing_dataset_untouched(tmp_path, tok):
    prefix = str(tmp_path / "ds")
    preprocess([write_jsonl(tmp_path / "ok.jsonl", [{"text": d} for d in DOCS])], prefix, tok, progress=False)
    before = digest(prefix)
    listing = sorted(os.listdir(tmp_path))
    # many good lines first so the failure happens after data was written to the temporary file
    rows = [{"text": f"doc {i}"} for i in range(2000)] + ["not json"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PreprocessError):
        preprocess([bad], prefix, tok, progress=False)
    assert digest(prefix) == before
    assert sorted(os.listdir(tmp_path)) == sorted(listing + ["bad.jsonl"])
    assert read_back(prefix) == [tok.encode(d) + [tok.eod] for d in DOCS]


def test_missing_input_and_no_documents(tmp_path, tok):
    with pytest.raises(PreprocessError, match="does not exist"):
        preprocess([tmp_path / "nope.jsonl"], str(tmp_path / "ds"), tok, progress=False)
    only_empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}])
    with pytest.raises(PreprocessError, match="no documents"):
        preprocess([only_empty], str(tmp_path / "ds"), tok, progress=False)
    assert not (tmp_path / "ds.bin").exists()


def test_cli_in_process(tmp_path, capsys):
    jl = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in DOCS])
    rc = main(["--input", str(jl), "--output-prefix", str(tmp_path / "cli"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "documents: 3" in out
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": 1}'])
    rc = main(["--input", str(bad), "--output-prefix", str(tmp_path / "cli2"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{bad}:1" in err and "Traceback" not in err
    rc = main(["--input", str(jl), "--output-prefix", str(tmp_path / "x"), "--tokenizer-type", "glm4"])
    assert rc == 1 and "--tokenizer-model" in capsys.readouterr().err


def test_cli_subprocess_exit_code(tmp_path):
    missing = tmp_path / "missing.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "megaglm.data.preprocess", "--input", str(missing), "--output-prefix",
         str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert str(missing) in proc.stderr and "Traceback" not in proc.stderr
