import pytest
import torch

from unbackdoor.arch import UnsupportedArchitecture, anatomy, lora_targets
from unbackdoor.generate import generate
from unbackdoor.models import ModelLoadError, apply_lora, load_model, load_tokenizer, save_model_atomic
from unbackdoor.record import OutputError
from unbackdoor.schema import LoraConfig, ModelConfig
from unbackdoor.templates import Template


def test_anatomy_finds_parts(tiny_model, arch):
    a = anatomy(tiny_model)
    assert a.num_layers == 2 and isinstance(a.embed, torch.nn.Embedding) and a.norm is not None
    out = tiny_model(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert len(out.hidden_states) == a.num_layers + 1
    assert a.embed is tiny_model.get_input_embeddings()


def test_anatomy_unknown_layout_fails_loudly():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList()
    with pytest.raises(UnsupportedArchitecture, match="Supported layouts"):
        anatomy(Odd())


def test_lora_targets_found_and_applied(tiny_model, arch):
    targets = lora_targets(tiny_model)
    names = {n.split(".")[-1] for n, _ in tiny_model.named_modules()}
    assert set(targets) <= names
    peft_model = apply_lora(tiny_model, LoraConfig(enabled=True, r=4))
    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert anatomy(peft_model).num_layers == 2


def test_fused_rank_gives_fused_layers_r_times_projections(tiny_model, arch):
    cfg = LoraConfig(enabled=True, r=4, alpha=8, target_modules=["all-linear"], fused_rank=True,
                     rank_pattern={"dense_4h_to_h": 2} if arch == "gpt_neox" else {"down_proj": 2})
    ranks = {n.rsplit(".", 1)[-1]: (m.r["default"], m.scaling["default"])
             for n, m in apply_lora(tiny_model, cfg).named_modules() if hasattr(m, "lora_A")}
    if arch == "gpt_neox":   # fused q/k/v: 3 x r; the explicit pattern wins where it names a module
        assert ranks == {"query_key_value": (12, 2.0), "dense": (4, 2.0), "dense_h_to_4h": (4, 2.0),
                         "dense_4h_to_h": (2, 2.0)}
    else:                    # separate projections: nothing is fused, every layer keeps r
        assert ranks["q_proj"] == ranks["k_proj"] == ranks["gate_proj"] == (4, 2.0)
        assert ranks["down_proj"] == (2, 2.0)


def test_rank_pattern_rejects_bad_rank():
    from unbackdoor.config import ConfigError, build

    with pytest.raises(ConfigError, match="rank_pattern"):
        build(LoraConfig, {"rank_pattern": {"q_proj": 0}})


def test_save_load_roundtrip_and_pickle_refused(tmp_path, tiny_model, tokenizer):
    out = save_model_atomic(tiny_model, tokenizer, tmp_path / "m")
    m2 = load_model(ModelConfig(path=str(out)))
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(tiny_model(input_ids=x).logits, m2(input_ids=x).logits)
    # a checkpoint with only pickle weights
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "config.json").write_text((out / "config.json").read_text())
    torch.save(tiny_model.state_dict(), pk / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights.*allow_pickle=true"):
        load_model(ModelConfig(path=str(pk)))
    with pytest.raises(OutputError, match="is the input model.path"):
        save_model_atomic(tiny_model, tokenizer, out, input_path=str(out))
    with pytest.raises(OutputError, match="is inside the input model.path"):
        save_model_atomic(tiny_model, tokenizer, out / "sub", input_path=str(out))


def test_folder_without_tokenizer(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        load_tokenizer(ModelConfig(path=str(tmp_path / "m")))


def test_batched_generation_matches_one_by_one(tiny_model, tokenizer):
    tpl = Template(tokenizer)
    prompts = ["what is two plus three", "c b a", "reverse the list a b c d e", "hello"]
    batched = generate(tiny_model, tpl, prompts, max_new_tokens=6, batch_size=4)
    single = [generate(tiny_model, tpl, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single and len(batched) == 4
