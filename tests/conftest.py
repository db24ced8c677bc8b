import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_PIPE = {"stages": [{"name": "sam", "semantic_dim": 32}, {"name": "fgcs", "retention_ratio": 0.25, "hidden_dim": 32}]}


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny default with a sam -> fgcs pipeline, in eval mode (tests must not mutate it)."""
    from llava_deft.model import LlavaDeftForCausalLM

    torch.manual_seed(0)
    return LlavaDeftForCausalLM({"pipeline": TINY_PIPE}).eval()
