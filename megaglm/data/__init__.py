"""Data layer: the GLM tokenizer, corpus building, preprocessing into megatron indexed datasets,
pretraining datasets (megatron-core ``GPTDataset`` / ``BlendedDataset``) and dataset statistics.

Submodules are imported lazily by their users (``import megaglm.data.tokenizer`` etc.) so that
importing this package stays cheap.
"""
