"""The GLM-4 pretraining data recipe (``megaglm-data``): exact and fuzzy deduplication, quality
filters, source mixing, parallel tokenization and the merged BPE tokenizer.

Each command is a list of datatrove pipeline steps run by datatrove's ``LocalPipelineExecutor``
(processes on this machine) or ``RayPipelineExecutor`` (a Ray cluster): the same step list for
both (:mod:`megaglm.data.recipe.executors`). Modules:

* :mod:`~megaglm.data.recipe.documents` - reading JSONL / Parquet / text into datatrove
  ``Document`` s, with every bad line counted and recorded as ``file:line``;
* :mod:`~megaglm.data.recipe.outputs` - per-task output parts written under temporary names and
  renamed when complete, side files, per-task counters;
* :mod:`~megaglm.data.recipe.executors` - the local / Ray executor choice and resumable stages;
* :mod:`~megaglm.data.recipe.words` - an offline word tokenizer for datatrove's filters and MinHash;
* :mod:`~megaglm.data.recipe.dedup` - exact (normalized-text hash) and MinHash-LSH deduplication;
* :mod:`~megaglm.data.recipe.filters` - Gopher / C4 / FineWeb rules, bad words, py3langid;
* :mod:`~megaglm.data.recipe.mix` - source weights -> ``data.blend``, token shares and epochs;
* :mod:`~megaglm.data.recipe.tokenize` - parallel tokenization into megatron indexed datasets;
* :mod:`~megaglm.data.recipe.merged_bpe` - byte-level BPE learned on Chinese and multilingual text,
  appended after cl100k_base's ranks;
* :mod:`~megaglm.data.recipe.summary` - the console table and JSON summary of a run;
* :mod:`~megaglm.data.recipe.cli` - the ``megaglm-data`` command;
* :mod:`~megaglm.data.recipe.demo` - the offline demo corpus (``make data-demo``).

Nothing here imports the training stack; Ray is imported only on the Ray path.
"""
