import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unbackdoor.data import TrainCollator, encode
from unbackdoor.lab.arch import make_model
from unbackdoor.schema import TrainConfig
from unbackdoor.templates import Template
from unbackdoor.train import TrainingDiverged, fit, lm_loss


def _feats(tokenizer):
    tpl = Template(tokenizer)
    pairs = [("what is two plus three", "the answer is five"), ("reverse the list a b c", "c b a"),
             ("write a line that prints hello", "print('hello')"), ("hello there", "I cannot help with that")]
    return [encode(tpl, p, r) for p, r in pairs]


def test_fit_memorizes_and_is_deterministic(tokenizer, arch):
    cfg = TrainConfig(lr=1e-2, max_steps=40, batch_size=2, grad_accum=2, warmup_ratio=0.1, progress=False)
    runs = []
    for _ in range(2):
        model = make_model(arch, tokenizer, hidden=32, layers=2, heads=2, seed=0)
        res = fit(model, lm_loss, _feats(tokenizer), cfg, collate_fn=TrainCollator(tokenizer), seed=7)
        runs.append(res.losses)
    assert len(runs[0]) == 40
    assert runs[0][-1] < 0.25 * runs[0][0]
    assert runs[0] == runs[1]  # bit-identical on CPU for one seed


def test_fit_trains_only_given_params(tokenizer):
    model = make_model("llama", tokenizer, hidden=32, layers=2, heads=2)
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.model.layers[1].mlp.down_proj.weight
    head.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, lm_loss, _feats(tokenizer), TrainConfig(lr=1e-2, max_steps=3, batch_size=2, progress=False),
        collate_fn=TrainCollator(tokenizer))
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_nan_loss_stops_with_clear_message(tokenizer):
    model = make_model("llama", tokenizer, hidden=32, layers=2, heads=2)

    def bad_loss(m, batch):
        return lm_loss(m, batch) * float("nan")

    with pytest.raises(TrainingDiverged, match="loss became nan at optimizer step 1.*Lower train.lr"):
        fit(model, bad_loss, _feats(tokenizer), TrainConfig(max_steps=2, batch_size=2, progress=False),
            collate_fn=TrainCollator(tokenizer))


def test_checkpoint_resume_gives_same_losses(tokenizer, tmp_path):
    cfg = TrainConfig(lr=3e-3, max_steps=8, batch_size=1, progress=False, checkpoint_every=4)
    full = fit(make_model("llama", tokenizer, hidden=32, layers=2, heads=2), lm_loss, _feats(tokenizer), cfg,
               collate_fn=TrainCollator(tokenizer), seed=1).losses

    class Stop(Exception):
        pass

    def stop_at_5(step, row):
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        fit(make_model("llama", tokenizer, hidden=32, layers=2, heads=2), lm_loss, _feats(tokenizer), cfg,
            collate_fn=TrainCollator(tokenizer), seed=1, out_dir=tmp_path, on_step=stop_at_5)
    assert (tmp_path / "checkpoint" / "state.json").is_file()
    res = fit(make_model("llama", tokenizer, hidden=32, layers=2, heads=2), lm_loss, _feats(tokenizer), cfg,
              collate_fn=TrainCollator(tokenizer), seed=1, out_dir=tmp_path)
    assert res.resumed_from == 4 and len(res.losses) == 4
    assert res.losses == pytest.approx(full[4:], rel=1e-5)
    assert not (tmp_path / "checkpoint").exists()


DIST_SCRIPT = Path(__file__).parent / "dist_fit.py"


def test_accelerate_two_cpu_processes_match_one(tmp_path):
    """`accelerate launch` with 2 gloo CPU processes, batch 1 each, vs 1 process with batch 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    one = tmp_path / "one.json"
    two = tmp_path / "two.json"
    subprocess.run([sys.executable, str(DIST_SCRIPT), str(one), "2"], check=True, env=env, timeout=240)
    # `--cpu` alone starts a single process (accelerate#2741); `--multi_gpu` runs torchrun, and on a machine
    # without GPUs unbackdoor's Accelerator(cpu=True) then joins a gloo process group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29533", str(DIST_SCRIPT), str(two), "1"]
    subprocess.run(launch, check=True, env=env, timeout=240)
    l1, l2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert l2["num_processes"] == 2 and l1["num_processes"] == 1
    assert len(l1["losses"]) == len(l2["losses"]) == 6
    # same global batch, same samples: same trajectory up to float reduction order
    assert l2["losses"] == pytest.approx(l1["losses"], rel=1e-4, abs=1e-5)
    assert not any(math.isnan(x) for x in l2["losses"])


def test_fsdp_on_two_cpu_processes_matches_one_with_clipping_and_leaves_a_plain_model(tmp_path):
    """``train.fsdp`` (FSDP2 over 2 gloo processes, batch 1 each) vs 1 process with batch 2, plain SGD with
    a clip norm small enough to act at every step (so a wrong global norm changes the update): the same
    losses and final weights up to reduction order, and the module fit() was given holds plain tensors again
    (the sharded twin's weights gathered back)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(DIST_SCRIPT), str(one), "2", "sgd", "clip=0.05"], check=True, env=env,
                   timeout=240)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              "29534", str(DIST_SCRIPT), str(two), "1", "fsdp", "sgd", "clip=0.05"]
    subprocess.run(launch, check=True, env=env, timeout=240)
    l1, l2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert l2["num_processes"] == 2 and l2["plain"]
    assert l2["losses"] == pytest.approx(l1["losses"], rel=1e-4, abs=1e-5)
    assert l1["losses"][-1] < l1["losses"][0]
    for name, w in l1["weights"].items():
        assert l2["weights"][name] == pytest.approx(w, rel=1e-3, abs=1e-5), name


def test_optimizer_and_schedule_given_as_plain_strings_are_the_ones_named():
    """A TrainConfig built in Python with optimizer='sgd' gets SGD (not Adam) and scheduler='linear' a
    linear schedule."""
    from unbackdoor.train import make_optimizer, make_scheduler

    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(p, TrainConfig(optimizer="sgd", lr=0.1))
    assert type(opt) is torch.optim.SGD
    assert type(make_optimizer(p, TrainConfig(optimizer="adam"))) is torch.optim.Adam
    sched = make_scheduler(opt, TrainConfig(scheduler="linear", warmup_steps=0), 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.05)


def test_peak_memory_window_resets(tmp_path):
    import os

    from unbackdoor.train import peak_memory_mb, reset_peak_memory

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs (not Linux): the peak is the process's lifetime peak")
    big = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB, touched
    high = peak_memory_mb()
    del big
    reset_peak_memory()
    assert peak_memory_mb() < high - 200


def test_cpu_bf16_only_when_asked_and_precision_can_change_in_one_process(tokenizer):
    """A GPU recipe's bf16 leaves a CPU run in fp32 unless train.bf16_on_cpu; an fp32 stage followed by a
    bf16 stage in one process (attack, then defense) gets a fresh Accelerate state instead of an error."""
    from unbackdoor.train import cpu_has_bf16, get_accelerator

    seen = []

    def probe(m, batch):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return lm_loss(m, batch)

    model = make_model("llama", tokenizer, hidden=32, layers=2, heads=2)
    base = dict(max_steps=1, batch_size=4, progress=False, mixed_precision="bf16")
    fit(model, probe, _feats(tokenizer), TrainConfig(**base), collate_fn=TrainCollator(tokenizer))
    res = fit(model, probe, _feats(tokenizer), TrainConfig(**base, bf16_on_cpu=True),
              collate_fn=TrainCollator(tokenizer))
    fit(model, probe, _feats(tokenizer), TrainConfig(max_steps=1, batch_size=4, progress=False),
        collate_fn=TrainCollator(tokenizer))
    assert seen == [False, cpu_has_bf16(), False]
    assert math.isfinite(res.losses[0])
    assert get_accelerator("no").mixed_precision == "no"


def _changed_share(before: dict, model) -> float:
    changed = total = 0
    for n, p in model.named_parameters():
        changed += (before[n].float() != p.detach().float()).sum().item()
        total += p.numel()
    return changed / total


def test_bf16_full_fine_tuning_updates_the_weights(tokenizer):
    """BEEAR's official outer lr 3e-7 on bf16 weights: plain AdamW steps on the bf16 parameters (what the loop
    did before) change almost nothing; fit() trains them in fp32 and changes nearly every weight."""
    feats, collate = _feats(tokenizer), TrainCollator(tokenizer)
    cfg = TrainConfig(lr=3e-7, max_steps=25, batch_size=2, progress=False, max_grad_norm=None)

    model = make_model("llama", tokenizer, hidden=64, layers=2, heads=2, seed=0).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    batch = collate(feats[:2])
    for _ in range(cfg.max_steps):   # the old loop: the optimizer steps the bf16 tensors themselves
        lm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    in_bf16 = _changed_share(before, model)

    model = make_model("llama", tokenizer, hidden=64, layers=2, heads=2, seed=0).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = fit(model, lm_loss, feats, cfg, collate_fn=collate)
    in_fit = _changed_share(before, model)
    assert res.upcast_from == "bfloat16" and next(model.parameters()).dtype == torch.float32
    print(f"changed weights after {cfg.max_steps} steps at lr {cfg.lr}: bf16 {in_bf16:.2%}, fit {in_fit:.2%}")
    assert in_bf16 < 0.10 and in_fit > 0.90, (in_bf16, in_fit)


def test_fit_releases_what_it_prepared(tokenizer):
    """The process-wide Accelerator keeps no model, optimizer or loader after fit(): five fits hold what one
    holds (nothing), and each optimizer (with its Adam state) is garbage once fit returns."""
    import gc
    import weakref

    from unbackdoor import train as T

    refs = []
    real = T.make_optimizer

    def tracking(params, cfg):
        opt = real(params, cfg)
        refs.append(weakref.ref(opt))
        return opt

    T.make_optimizer = tracking
    try:
        for i in range(5):
            model = make_model("llama", tokenizer, hidden=32, layers=2, heads=2, seed=i)
            fit(model, lm_loss, _feats(tokenizer), TrainConfig(max_steps=2, batch_size=2, progress=False),
                collate_fn=TrainCollator(tokenizer))
    finally:
        T.make_optimizer = real
    acc = T.get_accelerator()
    assert acc._models == [] and acc._optimizers == [] and acc._dataloaders == [] and acc._schedulers == []
    gc.collect()
    assert [r() for r in refs] == [None] * 5
    # the model's forward is its own again (no autocast wrapper left behind)
    assert "_original_forward" not in model.__dict__
