"""Test-wide settings: no network, deterministic CPU threads."""

import os

import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU; it must be set before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and CI's 2 cores are then never oversubscribed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Tiny teachers shared across test packages, built once per session. Tests must not modify them in place.
from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    return tiny.tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    return tiny.tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def bert(tmp_path_factory):
    return tiny.tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def bert_mlm(tmp_path_factory):
    return tiny.tiny_bert_mlm(tmp_path_factory.mktemp("bert-mlm"))


@pytest.fixture(scope="session")
def bert_cls(tmp_path_factory):
    return tiny.tiny_bert_cls(tmp_path_factory.mktemp("bert-cls"))


@pytest.fixture(scope="session")
def vit(tmp_path_factory):
    return tiny.tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="session")
def vit_model(tmp_path_factory):
    return tiny.tiny_vit_model(tmp_path_factory.mktemp("vit-model"))
