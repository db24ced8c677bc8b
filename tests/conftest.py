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


AUDIO_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "audio_task")


@pytest.fixture(scope="session")
def tiny_tasks_dir(tmp_path_factory):
    """A tiny generated-task folder, as `python -m llava_deft.tasks` lays it out: video_shapes (3 train /
    2 test clips of 8 frames, 5 questions each) and passkey (4 / 3 passages of 64-96 tokens) generated
    here, audio_words copied from the committed fixture (no espeak-ng needed)."""
    import shutil

    from llava_deft.tasks.prepare import prepare_tasks

    out = tmp_path_factory.mktemp("tasks")
    prepare_tasks(out, preset="small", tasks=["video_shapes", "passkey"], progress=False, overrides={
        "video_shapes": {"n_train": 3, "n_test": 2, "frames": 8},
        "passkey": {"n_train": 4, "n_test": 3, "min_tokens": 64, "max_tokens": 96},
    })
    shutil.copytree(AUDIO_FIXTURE, out / "audio_words")
    return out
