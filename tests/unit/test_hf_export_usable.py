"""An exported megaglm-trained model works in the Hugging Face ecosystem as is (issue 13).

* The tokenizer files: ``tokenizer.json`` encodes text exactly as megaglm's tiktoken tokenizer (stdlib
  sources, CJK, emoji, digits, whitespace runs), and ``AutoTokenizer``'s chat template renders the ids of
  :func:`megaglm.data.chat.render_chat`.
* A model megaglm trained (a few steps of a small GLM), exported with ``megaglm-ckpt convert megaglm-to-hf``,
  loads with ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained(DIR)`` and nothing else; its
  ``config.json`` / ``generation_config.json`` carry the tokenizer's pad id and GLM-4's stop ids; its
  greedy ``generate`` (no arguments but the prompt) equals ``megaglm-generate`` token for token.
"""

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


def test_oniguruma_pattern_keeps_tiktoken_splits():
    from megaglm.convert.hf_tokenizer import oniguruma_pattern

    pat = r"\p{N}{1,3}+|[^\r\n\p{L}]?+\p{L}++|\s++$|\s*[\r\n]|\s+(?!\S)|\s"
    assert oniguruma_pattern(pat) == r"\p{N}{1,3}|[^\r\n\p{L}]?\p{L}+|\s+\z|\s*[\r\n]|\s+(?!\S)|\s"


@pytest.fixture(scope="module", params=[None, 4096], ids=["cl100k", "max_ranks4096"])
def tokenizer_dir(tmp_path_factory, request):
    from megaglm.convert.hf_tokenizer import write_hf_tokenizer
    from megaglm.data.tokenizer import GLMTokenizer

    d = tmp_path_factory.mktemp("tok")
    tok = GLMTokenizer(max_ranks=request.param)
    write_hf_tokenizer(tok, d, 256)
    return d, tok


def test_tokenizer_json_equals_tiktoken(tokenizer_dir):
    from tokenizers import Tokenizer

    d, tok = tokenizer_dir
    hf = Tokenizer.from_file(str(d / "tokenizer.json"))
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    texts = [p.read_text(errors="replace")[:6000] for p in files]
    texts += ["héllo wörld 你好世界 こんにちは 🙂  \n\n  x", "numbers 1234567 3.14159", "don't I'LL you're",
              "end   ", "a\n\n\nb  \n", "\t\ttabs\r\nwindows\r\n"]
    total = 0
    for s in texts:
        assert hf.encode(s).ids == tok.encode(s), s[:60]
        total += len(tok.encode(s))
    assert total > 50_000
    assert hf.get_vocab_size() == tok.vocab_size


def test_chat_template_renders_megaglm_ids(tokenizer_dir):
    from megaglm.data.chat import render_chat

    d, tok = tokenizer_dir
    auto = transformers.AutoTokenizer.from_pretrained(str(d))
    conv = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What does `json.dumps` do?"},
            {"role": "assistant", "content": "Serialize obj to a JSON str."}, {"role": "user", "content": "和 loads?"}]
    ids = auto.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == render_chat(tok, conv, add_generation_prompt=True, require_assistant=False).ids.tolist()
    assert auto.eos_token == auto.pad_token == "<|endoftext|>"
    assert auto.convert_tokens_to_ids("<|user|>") == tok.convert_special("<|user|>")


def _run(args, **kw):
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_exported_model_loads_and_generates_like_megaglm(tmp_path):
    import torch

    from megaglm.data.chat import render_chat
    from megaglm.data.tokenizer import GLMTokenizer

    run = tmp_path / "run"
    _run(["megaglm.train", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
          "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16", "train.train_iters=3",
          "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_interval=0",
          "train.lr_warmup_iters=0", "logging.tensorboard_dir=null", f"run.output_dir={run}", "run.device=cpu"])
    out = tmp_path / "hf"
    _run(["megaglm.convert.cli", "convert", "megaglm-to-hf", "--input", str(run / "checkpoints"), "--output", str(out),
          "--format", "glm"])
    tok = GLMTokenizer()
    cfg = json.loads((out / "config.json").read_text())
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    stops = [tok.convert_special(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert cfg["vocab_size"] == tok.vocab_size and cfg["pad_token_id"] == tok.pad
    assert cfg["eos_token_id"] == gen_cfg["eos_token_id"] == stops

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    auto = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "What does the function `os.path.join(a, *p)` do?"}]
    prompt = auto.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert prompt["input_ids"][0].tolist() == render_chat(tok, msgs, add_generation_prompt=True,
                                                          require_assistant=False).ids.tolist()
    with torch.no_grad():
        hf_ids = model.generate(**prompt, max_new_tokens=12)[0, prompt["input_ids"].shape[1]:].tolist()

    (tmp_path / "in.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    _run(["megaglm.app.generate", str(run), "--input", str(tmp_path / "in.jsonl"), "--output",
          str(tmp_path / "out.jsonl"), "--max-new-tokens", "12"])
    ours = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert ours["ids"] == hf_ids
    assert ours["finish_reason"] == ("stop" if hf_ids[-1] in stops else "length")
