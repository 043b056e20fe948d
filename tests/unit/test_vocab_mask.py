"""megaglm.models.glm.vocab: the padded-vocabulary mask, filled in place, gives the values and gradients of
an out-of-place masked_fill (bit for bit), on the full vocabulary and on tensor-parallel shards."""

import pytest
import torch
import torch.nn.functional as F

from megaglm.models.glm.vocab import first_padded_column, mask_padded_vocab, padded_column_mask


def test_first_padded_column_full_and_shards():
    assert first_padded_column(1024, 1024, 1000, 0) == 1000
    assert first_padded_column(1024, 1024, 1024, 0) is None
    # shards of 256 columns: ids 0..255 | 256..511 | 512..767 | 768..1023; padding starts at id 1000
    assert [first_padded_column(256, 1024, 1000, r) for r in range(4)] == [None, None, None, 232]
    assert first_padded_column(512, 1024, 500, 1) == 0  # a shard made only of padding
    with pytest.raises(ValueError, match="neither the padded vocabulary"):
        first_padded_column(300, 1024, 1000, 0)
    mask = padded_column_mask(256, 1024, 1000, 3)
    assert mask.tolist() == [i >= 232 for i in range(256)]
    assert padded_column_mask(256, 1024, 1000, 0) is None


class _Model(torch.nn.Module):
    """What the hook reads of a GPTModel chunk: ``output_layer``, ``vocab_size``, ``post_process``."""

    def __init__(self, hidden: int, padded: int):
        super().__init__()
        self.output_layer = torch.nn.Linear(hidden, padded, bias=False)
        self.vocab_size = padded
        self.post_process = True


def test_in_place_mask_equals_masked_fill_in_values_and_gradients():
    torch.manual_seed(0)
    hidden, padded, real = 16, 64, 50
    model = _Model(hidden, padded)
    with torch.no_grad():
        model.output_layer.weight[real:] = 0.0  # zero padded rows, as a converted checkpoint has
    x = torch.randn(12, hidden, requires_grad=True)
    target = torch.randint(0, real, (12,))

    ref_w = model.output_layer.weight.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_logits = (ref_x @ ref_w.t()).masked_fill(torch.arange(padded) >= real, torch.finfo(torch.float32).min)
    F.cross_entropy(ref_logits, target, reduction="sum").backward()

    assert mask_padded_vocab(model, real)
    logits = model.output_layer(x)
    assert torch.equal(logits, ref_logits)
    F.cross_entropy(logits, target, reduction="sum").backward()
    assert torch.equal(x.grad, ref_x.grad)
    assert torch.equal(model.output_layer.weight.grad, ref_w.grad)
    assert torch.all(model.output_layer.weight.grad[real:] == 0)
    assert int(logits.argmax(-1).max()) < real
