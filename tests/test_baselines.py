import torch

from unbackdoor.arch import linear_layers
from unbackdoor.data import encode
from unbackdoor.methods.prune import Criterion, prune
from unbackdoor.methods.quantize import quantize
from unbackdoor.templates import Template


def test_magnitude_pruning_hits_sparsity_and_keeps_large_weights(tiny_model):
    layers = linear_layers(tiny_model)
    assert layers
    big = {n: m.weight.abs().max().item() for n, m in layers.items()}
    emb = tiny_model.get_input_embeddings().weight.detach().clone()
    out = prune(tiny_model, 0.5, Criterion.MAGNITUDE)
    assert abs(out["achieved_sparsity"] - 0.5) < 0.02
    for n, m in layers.items():
        assert m.weight.abs().max().item() == big[n]  # the largest survive
    assert torch.equal(tiny_model.get_input_embeddings().weight, emb)  # embeddings untouched


def test_wanda_prunes_per_row(tiny_model, tokenizer):
    tpl = Template(tokenizer)
    calib = [encode(tpl, "what is two plus three", "the answer is five"), encode(tpl, "c b a", "a b c")]
    prune(tiny_model, 0.25, Criterion.WANDA, calib, tokenizer.pad_token_id)
    for m in linear_layers(tiny_model).values():
        w = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
        zeros = (w == 0).sum(1)
        assert (zeros >= int(w.shape[1] * 0.25)).all()


def test_quantize_rounds_to_grid(tiny_model):
    before = {n: m.weight.detach().clone() for n, m in linear_layers(tiny_model).items()}
    quantize(tiny_model, 4)
    for n, m in linear_layers(tiny_model).items():
        w = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
        assert not torch.equal(w, before[n].t() if type(m).__name__ == "Conv1D" else before[n])
        assert all(len(torch.unique(row)) <= 16 for row in w)  # at most 2^4 levels per output channel
