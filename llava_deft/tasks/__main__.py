"""``python -m llava_deft.tasks --out data/tasks``: every generated task in one folder (see prepare.py)."""

from llava_deft.tasks.prepare import main

if __name__ == "__main__":
    raise SystemExit(main())
