"""megaglm-preprocess --format chat: conversations -> chat dataset; bad input with line numbers; overlong
conversations truncated or dropped (counted) at preprocessing and at training time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megaglm.config import RunConfig
from megaglm.data.chat import render_chat
from megaglm.data.preprocess import PreprocessError, main
from megaglm.data.sft import ChatSource, SFTDataError, build_sft_data
from megaglm.data.sft_preprocess import preprocess_chat
from megaglm.data.tokenizer import GLMTokenizer

GOOD = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to nine."},
                  {"role": "assistant", "content": "one two three four five six seven eight nine"}]},
    {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                  {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"Oslo\"}"},
                  {"role": "observation", "content": "{\"temp\": 3}"},
                  {"role": "assistant", "content": "3 degrees."}]},
]
UNKNOWN_ROLE = {"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Boo"}]}
EMPTY_ASSISTANT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}
INVALID_JSON = '{"messages": [{"role": "user", "content": "Hi"}'


@pytest.fixture(scope="module")
def tok():
    return GLMTokenizer()


def write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_round_trip(tmp_path, tok):
    src = write(tmp_path / "chat.jsonl", GOOD)
    summary = preprocess_chat([src], str(tmp_path / "out" / "chat"), tok)
    assert summary.documents == 3 and summary.skipped == {} and summary.truncated == 0
    data = ChatSource.from_prefixes([str(tmp_path / "out" / "chat")], tok)
    for k, row in enumerate(GOOD):
        chat = render_chat(tok, row["messages"])
        ids, tg = data.get(k)
        assert ids.tolist() == chat.ids.tolist() and tg.tolist() == chat.targets.tolist()
    manifest = json.loads((tmp_path / "out" / "chat.chat.json").read_text())
    assert manifest["tokenizer"] == tok.identity and manifest["conversations"] == 3
    assert manifest["target_tokens"] == summary.target_tokens > 0


@pytest.mark.parametrize("bad, line_message", [
    (UNKNOWN_ROLE, "chat.jsonl:2: message 1: unknown role 'wizard'"),
    (EMPTY_ASSISTANT, "chat.jsonl:2: message 1: assistant message with empty content"),
    (INVALID_JSON, "chat.jsonl:2: invalid JSON"),
    ({"text": "not a chat"}, "chat.jsonl:2: key 'messages' is missing"),
])
def test_bad_lines_stop_with_file_and_line(tmp_path, tok, bad, line_message, capsys):
    src = write(tmp_path / "chat.jsonl", [GOOD[0], bad, GOOD[1]])
    with pytest.raises(PreprocessError) as err:
        preprocess_chat([src], str(tmp_path / "x"), tok)
    assert line_message in str(err.value) and "--skip-bad-lines" in str(err.value)
    assert not list(tmp_path.glob("x*"))  # nothing written
    # the CLI: one line on stderr, exit status 1
    code = main(["--format", "chat", "--input", str(src), "--output-prefix", str(tmp_path / "y")])
    assert code == 1 and line_message in capsys.readouterr().err


def test_skip_bad_lines_counts_reasons_with_line_numbers(tmp_path, tok, capsys):
    src = write(tmp_path / "chat.jsonl", [GOOD[0], UNKNOWN_ROLE, EMPTY_ASSISTANT, INVALID_JSON, GOOD[1],
                                          UNKNOWN_ROLE, ""])
    code = main(["--format", "chat", "--input", str(src), "--output-prefix", str(tmp_path / "c"),
                 "--skip-bad-lines"])
    out = capsys.readouterr().out
    assert code == 0
    assert "conversations: 2" in out
    assert "2 x unknown role" in out and f"{src}:2, {src}:6" in out
    assert "1 x empty assistant content" in out and f"{src}:3" in out
    assert "1 x invalid JSON" in out and f"{src}:4" in out
    manifest = json.loads((tmp_path / "c.chat.json").read_text())
    assert manifest["skipped"] == {"unknown role": 2, "empty assistant content": 1, "invalid JSON": 1,
                                   "blank line": 1}


def test_max_length_truncate_or_drop_is_counted(tmp_path, tok):
    src = write(tmp_path / "chat.jsonl", GOOD)
    lengths = [len(render_chat(tok, r["messages"]).ids) - 1 for r in GOOD]
    cap = sorted(lengths)[1]  # the longest one is over it
    t = preprocess_chat([src], str(tmp_path / "t"), tok, max_length=cap, overlong="truncate")
    longest_line = lengths.index(max(lengths)) + 1
    assert t.documents == 3 and t.truncated == 1 and t.truncated_examples == [f"{src}:{longest_line}"]
    assert max(ChatSource.from_prefixes([str(tmp_path / "t")]).lengths) == cap + 1
    d = preprocess_chat([src], str(tmp_path / "d"), tok, max_length=cap, overlong="drop")
    assert d.documents == 2 and d.skipped == {f"longer than --max-length {cap} (dropped)": 1}


def _run_cfg(prefix, **data):
    cfg = OmegaConf.structured(RunConfig)
    cfg.model.name = "x"
    cfg.data.format = "chat"
    cfg.data.blend = [prefix]
    cfg.data.split = "100,0,0"
    for k, v in data.items():
        cfg.data[k] = v
    cfg.train.seq_length = 16
    cfg.train.global_batch_size = 2
    cfg.train.micro_batch_size = 1
    return cfg


def test_training_time_overlong_counted_and_bad_settings(tmp_path, tok):
    src = write(tmp_path / "chat.jsonl", GOOD)
    prefix = str(tmp_path / "c")
    preprocess_chat([src], prefix, tok)
    lines = []
    sft = build_sft_data(_run_cfg(prefix, overlong="truncate"), tok, log=lines.append)
    assert sft.stats["train"]["truncated to seq_length"] >= 1
    assert "truncated to seq_length" in lines[0]
    dropped = build_sft_data(_run_cfg(prefix, overlong="drop"), tok)
    assert dropped.stats["train"]["dropped: longer than seq_length"] >= 1
    assert len(dropped.train.table) + dropped.stats["train"]["dropped: longer than seq_length"] == 3
    with pytest.raises(SFTDataError, match="data.overlong"):
        build_sft_data(_run_cfg(prefix, overlong="wrap"), tok)
    with pytest.raises(SFTDataError, match="concatenated, not weighted"):
        cfg = _run_cfg(prefix)
        cfg.data.blend = [0.5, prefix]
        build_sft_data(cfg, tok)
    with pytest.raises(SFTDataError, match="megaglm-preprocess --format chat"):
        build_sft_data(_run_cfg(str(tmp_path / "missing")), tok)
    with pytest.raises(SFTDataError, match="data.pack_align"):
        cfg = _run_cfg(prefix, pack_align=2)
        cfg.parallel.context_parallel_size = 2
        build_sft_data(cfg, tok)


def test_other_tokenizer_is_refused(tmp_path, tok):
    src = write(tmp_path / "chat.jsonl", GOOD)
    preprocess_chat([src], str(tmp_path / "c"), tok)
    manifest = tmp_path / "c.chat.json"
    m = json.loads(manifest.read_text())
    m["tokenizer"] = "glm4:0123"
    manifest.write_text(json.dumps(m))
    with pytest.raises(SFTDataError, match="tokenized with 'glm4:0123'"):
        ChatSource.from_prefixes([str(tmp_path / "c")], tok)


def test_sorted_batching_with_a_small_validation_split(tmp_path, tok):
    src = write(tmp_path / "chat.jsonl", GOOD * 4)  # 12 conversations: 9 train, 3 valid
    prefix = str(tmp_path / "c")
    preprocess_chat([src], prefix, tok)
    cfg = _run_cfg(prefix, batching="sort")
    cfg.data.split = "75,25,0"
    cfg.train.seq_length = 64
    cfg.train.global_batch_size = 4
    sft = build_sft_data(cfg, tok)
    assert sft.train.batching == "sort" and len(sft.train) == 8  # two buckets of 4 per epoch
    assert sft.valid is not None and sft.valid.batching == "naive" and sft.valid.row_length(0) == 64
    batch = next(sft.make_iterator(sft.valid, 0))
    assert batch["tokens"].shape == (1, 64) and int(batch["loss_count"]) == 1
