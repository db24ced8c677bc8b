#!/usr/bin/env python
"""Generate the long-text pass-key retrieval task (see llava_deft/tasks/passkey.py).

Deterministic from --seed: the same arguments give the same JSON bytes. --needles k > 1 hides k
labelled keys per passage and asks for one of them (multi-needle retrieval; needs --min-tokens >= 64 + 32 (k - 1)).

    .venv/bin/python scripts/make_passkey_task.py --out data/passkey [--n-train 2000] [--n-test 500] \\
        [--min-tokens 256] [--max-tokens 1024] [--needles 1] [--seed 0]
    .venv/bin/python scripts/make_passkey_task.py --out data/passkey_long --n-train 0 --n-test 300 \\
        --min-tokens 2048 --max-tokens 8192 --needles 4
"""

from llava_deft.tasks.passkey import main

if __name__ == "__main__":
    main()
