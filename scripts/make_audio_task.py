#!/usr/bin/env python
"""Generate the espeak-ng audio QA task (see llava_deft/tasks/audio_words.py).

    .venv/bin/python scripts/make_audio_task.py --out data/audio_words --n-train 2000 --n-test 500 --seed 0
"""

from llava_deft.tasks.audio_words import main

if __name__ == "__main__":
    raise SystemExit(main())
