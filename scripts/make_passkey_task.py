#!/usr/bin/env python
"""Generate the long-text pass-key retrieval task (see llava_deft/tasks/passkey.py).

Deterministic from --seed: the same arguments give the same JSON bytes.

    .venv/bin/python scripts/make_passkey_task.py --out data/passkey [--n-train 2000] [--n-test 500] \\
        [--min-tokens 256] [--max-tokens 1024] [--seed 0]
"""

from llava_deft.tasks.passkey import main

if __name__ == "__main__":
    main()
