"""GLM-4 chat format: ids equal GLM-4's own tokenizer + chat template (transformers), and the label
table says exactly which tokens carry loss."""

from __future__ import annotations

import base64
import json
import shutil

import numpy as np
import pytest
import tiktoken

from megaglm.data.chat import (
    GLM4_CHAT_TEMPLATE,
    ChatFormatError,
    label_table,
    normalize_messages,
    render_chat,
    render_text,
)
from megaglm.data.tokenizer import GLM4_PAT_STR, GLM_SPECIAL_TOKENS, GLMTokenizer, find_cl100k_file

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city (摄氏度)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "\n\n  And 3+3?  "},  # BPE boundary right after the role's "\n"
        {"role": "assistant", "content": " 6\n"},
    ],
    [
        {"role": "system", "content": "", "tools": [WEATHER_TOOL, {"type": "python"}]},
        {"role": "user", "content": "北京天气怎么样？ Grüße 🙂"},
        {"role": "assistant", "metadata": "get_weather", "content": json.dumps({"city": "北京"}, ensure_ascii=False)},
        {"role": "observation", "content": "{\"temperature\": 21, \"sky\": \"clear\"}"},
        {"role": "assistant", "content": "北京现在 21 度，晴。"},
    ],
    [
        {"role": "user", "content": "def f(x):\n    return x ** 2\r\n\twhat does this do?"},
        {"role": "assistant", "content": "It squares x."},
        {"role": "user", "content": "Thanks"},
    ],
]


# --- GLM-4's tokenizer, as published: a slow transformers tokenizer over a tiktoken file ------------


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory):
    """A GLM-4-style tokenizer directory written by the test: ``tokenizer.model`` (tiktoken BPE ranks;
    cl100k's) and ``tokenizer_config.json`` with GLM-4's special tokens right after the file's ranks
    (as in GLM-4's own files, where they start at 151329 = its rank count) and the chat template."""
    d = tmp_path_factory.mktemp("glm4tok")
    shutil.copy(find_cl100k_file(), d / "tokenizer.model")
    n_ranks = sum(1 for line in open(d / "tokenizer.model", "rb") if line.strip())
    config = {
        "added_tokens_decoder": {
            str(n_ranks + i): {"content": t, "special": True, "normalized": False,
                                               "lstrip": False, "rstrip": False, "single_word": False}
            for i, t in enumerate(GLM_SPECIAL_TOKENS)
        },
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": GLM4_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return d


def _hf_glm4_tokenizer_class():
    from transformers import PreTrainedTokenizer

    class GLM4HFTokenizer(PreTrainedTokenizer):
        """The architecture of GLM-4's ``tokenization_chatglm.py``: tiktoken BPE with GLM-4's regex for
        ordinary text; special tokens are transformers added tokens (split out before BPE)."""

        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file, **kwargs):
            ranks = {}
            with open(vocab_file, "rb") as f:
                for line in f:
                    if line.strip():
                        token, rank = line.split()
                        ranks[base64.b64decode(token)] = int(rank)
            self.ranks, self.decoder = ranks, {r: t for t, r in ranks.items()}
            self.bpe = tiktoken.Encoding("glm4_hf_test", pat_str=GLM4_PAT_STR, mergeable_ranks=ranks,
                                         special_tokens={})
            super().__init__(**kwargs)

        @property
        def vocab_size(self):
            return len(self.ranks)

        def get_vocab(self):
            return {**self.ranks, **self.added_tokens_encoder}

        def _tokenize(self, text, **kwargs):
            return [self.decoder[i] for i in self.bpe.encode_ordinary(text)]

        def _convert_token_to_id(self, token):
            return self.ranks[token]

        def _convert_id_to_token(self, index):
            return self.decoder[index]

        def convert_tokens_to_string(self, tokens):
            return b"".join(t if isinstance(t, bytes) else t.encode() for t in tokens).decode("utf-8", "replace")

    return GLM4HFTokenizer


@pytest.fixture(scope="module")
def hf_glm4(glm4_dir):
    return _hf_glm4_tokenizer_class().from_pretrained(str(glm4_dir))


@pytest.fixture(scope="module")
def ours(glm4_dir):
    return GLMTokenizer("glm4", glm4_dir / "tokenizer.model")


def _ids(out):
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [False, True])
def test_ids_equal_glm4_template_and_tokenizer(hf_glm4, ours, k, gen):
    msgs = CONVERSATIONS[k]
    assert hf_glm4.convert_tokens_to_ids("<|observation|>") == ours.special_tokens["<|observation|>"]
    text = hf_glm4.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render_text(msgs, add_generation_prompt=gen) == text
    expected = _ids(hf_glm4.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))
    got = render_chat(ours, msgs, add_generation_prompt=gen, end_token=None).ids.tolist()
    assert got == expected
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == expected
    # and the whole rendered text through our tokenizer with specials allowed
    assert ours.encode(text, allowed_special="all") == expected


def test_ids_equal_an_independent_bpe(glm4_dir, ours):
    """Same ids from transformers' own BPE (a fast tokenizer converted from the tiktoken file with
    TikTokenConverter, whose default pattern is GLM-4's); it numbers the specials right after the ranks,
    which is where ours puts them too."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(vocab_file=str(glm4_dir / "tokenizer.model"),
                             extra_special_tokens=list(GLM_SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(tokenizer_object=conv.converted(), chat_template=GLM4_CHAT_TEMPLATE)
    assert fast.convert_tokens_to_ids("<|endoftext|>") == ours.eod
    for msgs in CONVERSATIONS:
        ids = _ids(fast.apply_chat_template(msgs, tokenize=True))
        assert render_chat(ours, msgs, end_token=None).ids.tolist() == ids


# --- the label table ---------------------------------------------------------------------------------

TABLE_CONVERSATION = [
    {"role": "system", "content": "You answer questions about the weather."},
    {"role": "user", "content": "Is it warm in Paris?"},
    {"role": "assistant", "content": "Let me check."},
    {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"Paris\"}"},
    {"role": "observation", "content": "{\"temperature\": 24}"},
    {"role": "assistant", "content": "Yes: 24 degrees."},
]


def test_label_table(ours, capsys):
    tok = ours
    sp = tok.special_tokens
    chat = render_chat(tok, TABLE_CONVERSATION)
    n = chat.num_targets
    with capsys.disabled():
        print("\nGLM-4 chat labels (LOSS = target; weight = 1/N for per_sequence weighting):")
        print(label_table(tok, chat, weights=chat.targets / n))
    # Build the expected ids piece by piece, with the expected target flag of each piece.
    pieces = [
        ([sp["[gMASK]"], sp["<sop>"]], False),
        ([sp["<|system|>"]], False), (tok.encode("\nYou answer questions about the weather."), False),
        ([sp["<|user|>"]], False), (tok.encode("\nIs it warm in Paris?"), False),
        ([sp["<|assistant|>"]], False), (tok.encode("\nLet me check."), True),
        # the next turn's opener ends the first assistant turn: GLM-4 writes <|assistant|> itself before
        # a tool call, so it is a target; the tool name, "\n" and the arguments are targets
        ([sp["<|assistant|>"]], True), (tok.encode("get_weather\n{\"city\": \"Paris\"}"), True),
        # <|observation|> ends the tool call (GLM-4 stops there at inference): a target
        ([sp["<|observation|>"]], True), (tok.encode("\n{\"temperature\": 24}"), False),
        ([sp["<|assistant|>"]], False), (tok.encode("\nYes: 24 degrees."), True),
        # the final turn's end token: <|user|> (one of GLM-4's eos ids), a target
        ([sp["<|user|>"]], True),
    ]
    ids = [i for p, _ in pieces for i in p]
    flags = [f for p, f in pieces for _ in p]
    assert chat.ids.tolist() == ids
    assert chat.targets.tolist() == flags
    # spelled out: the supervised text is exactly the assistant's writing plus the three turn ends
    supervised = tok.decode(chat.ids[chat.targets])
    assert supervised == ("\nLet me check.<|assistant|>get_weather\n{\"city\": \"Paris\"}<|observation|>"
                          "\nYes: 24 degrees.<|user|>")
    assert chat.ids[-1] == sp["<|user|>"] and chat.targets[-1]
    for special in ("[gMASK]", "<sop>", "<|system|>", "<|user|>"):
        positions = np.flatnonzero(chat.ids == sp[special])
        if special == "<|user|>":
            positions = positions[:-1]
        assert not chat.targets[positions].any(), special
    # no system / user / observation text is a target
    for j, role in enumerate(chat.roles):
        if role in ("system", "user", "prefix"):
            assert not chat.targets[j], j
        if role == "observation" and chat.ids[j] != sp["<|observation|>"]:
            assert not chat.targets[j], j
    # the training view: loss_mask[t] = targets[t + 1]
    assert n == len(tok.encode("\nLet me check.")) + 1 + len(tok.encode("get_weather\n{\"city\": \"Paris\"}")) \
        + 1 + len(tok.encode("\nYes: 24 degrees.")) + 1


def test_conversation_not_ending_with_assistant_has_no_end_token(ours):
    chat = render_chat(ours, CONVERSATIONS[3])
    assert chat.ids[-1] != ours.special_tokens["<|user|>"] or not chat.targets[-1]
    last_target = np.flatnonzero(chat.targets)[-1]
    assert chat.ids[last_target] == ours.special_tokens["<|user|>"]  # the end of "It squares x."


def test_openai_style_tool_calls_and_tool_role(ours):
    a = render_chat(ours, [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "24"},
        {"role": "assistant", "content": "24 degrees."},
    ])
    b = render_chat(ours, [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": "{\"city\": \"Paris\"}"},
        {"role": "observation", "content": "24"},
        {"role": "assistant", "content": "24 degrees."},
    ])
    assert a.ids.tolist() == b.ids.tolist() and a.targets.tolist() == b.targets.tolist()


def test_special_text_in_content_stays_text(ours):
    chat = render_chat(ours, [{"role": "user", "content": "say <|assistant|>"},
                              {"role": "assistant", "content": "<|user|> ok"}])
    assert (chat.ids == ours.special_tokens["<|assistant|>"]).sum() == 1
    # the user opener and the appended end token; the text "<|user|>" in the reply stays text
    assert (chat.ids == ours.special_tokens["<|user|>"]).sum() == 2


@pytest.mark.parametrize("messages, reason", [
    ([{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], "empty assistant content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant"}], "empty assistant content"),
    ([{"role": "user", "content": "x"}], "no assistant message"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "content not a string"),
    ({"role": "user"}, "messages not a list"),
    ([], "no messages"),
    (["hi"], "message not an object"),
    ([{"role": "system", "content": "", "tools": [{"type": "browser"}]}, {"role": "assistant", "content": "y"}],
     "bad tools"),
])
def test_bad_conversations(ours, messages, reason):
    with pytest.raises(ChatFormatError) as err:
        render_chat(ours, messages)
    assert err.value.reason == reason
    if isinstance(messages, list) and messages and reason not in ("no assistant message",):
        assert str(err.value).startswith("message ")


def test_normalize_keeps_metadata_and_tools():
    out = normalize_messages(CONVERSATIONS[2])
    assert out[0]["tools"][0]["function"]["name"] == "get_weather"
    assert out[2]["metadata"] == "get_weather" and out[3]["role"] == "observation"
