"""Helper for test_train: train a tiny model with fit(); write the per-step losses (rank 0)."""
import json
import sys

import torch

from unbackdoor.data import TrainCollator, encode
from unbackdoor.lab.arch import make_model
from unbackdoor.lab.tokenizer import train_tokenizer
from unbackdoor.schema import Optimizer, TrainConfig
from unbackdoor.templates import Template
from unbackdoor.train import fit, get_accelerator, lm_loss

out, batch = sys.argv[1], int(sys.argv[2])
fsdp = "fsdp" in sys.argv[3:]                                     # train.fsdp
clip = next((float(a[5:]) for a in sys.argv[3:] if a.startswith("clip=")), None)   # train.max_grad_norm
sgd = "sgd" in sys.argv[3:]       # plain SGD: the update scales with the gradient, so clipping shows
torch.set_num_threads(1)
words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
tok = train_tokenizer(words * 10 + ["user", "assistant"], vocab_size=300)
tpl = Template(tok)
# equal-length examples: per-micro-batch means then weigh equally, so the comparison is exact
feats = [encode(tpl, w, words[(i + 1) % 8]) for i, w in enumerate(words)]
assert len({len(f["input_ids"]) for f in feats}) == 1, [len(f["input_ids"]) for f in feats]
model = make_model("llama", tok, hidden=32, layers=2, heads=2, seed=0)
acc = get_accelerator()
cfg = TrainConfig(lr=1.0 if sgd else 3e-3, optimizer=Optimizer.SGD if sgd else Optimizer.ADAMW, max_steps=6,
                  batch_size=batch, progress=False, max_grad_norm=clip, fsdp=fsdp)
res = fit(model, lm_loss, feats, cfg, collate_fn=TrainCollator(tok), seed=3, accelerator=acc)
if acc.is_main_process:
    json.dump({"losses": res.losses, "num_processes": acc.num_processes,
               "weights": {n: p.detach().flatten()[:64].tolist() for n, p in model.named_parameters()},
               "plain": all(type(p.data) is torch.Tensor for p in model.parameters())}, open(out, "w"))
