"""``python -m llava_deft.train`` / ``deepspeed --module llava_deft.train``: see ``trainer.py``."""

import sys

from .trainer import main

main(sys.argv[1:])
