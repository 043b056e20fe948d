import inspect
import json

import pytest


@pytest.fixture(scope="session")
def text_dataset(tmp_path_factory):
    """A small indexed dataset of real text: the documentation of a few standard-library modules."""
    import argparse  # noqa: E401
    import collections
    import json as json_mod
    import pathlib
    import textwrap
    import unittest

    from megaglm.config import TokenizerConfig
    from megaglm.data.preprocess import preprocess
    from megaglm.data.tokenizer import build_tokenizer

    d = tmp_path_factory.mktemp("textdata")
    docs = []
    for mod in (argparse, collections, json_mod, pathlib, textwrap, unittest):
        for name, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200 and not name.startswith("_"):
                docs.append(doc)
    src = d / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prefix = d / "docs_text_document"
    preprocess([str(src)], str(prefix), build_tokenizer(TokenizerConfig()))
    return str(prefix)
