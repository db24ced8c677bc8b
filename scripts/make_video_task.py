#!/usr/bin/env python
"""Generate the video-QA task (moving easy-VQA-style shapes; see llava_deft/tasks/video_shapes.py).

Deterministic from --seed: the same arguments give the same JSON and the same frames.

    .venv/bin/python scripts/make_video_task.py --out data/video_shapes [--n-train 2000] [--n-test 500] \\
        [--frames 16] [--fps 8] [--size 64] [--seed 0]
"""

from llava_deft.tasks.video_shapes import main

if __name__ == "__main__":
    main()
