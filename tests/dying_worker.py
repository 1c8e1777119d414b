"""``metatl`` as torchrun runs it, except that in the launcher's first attempt the worker of rank 1
kills itself (SIGKILL, as a scheduler or the OOM killer would) before step ``METATL_DIE_AT`` + 1.

    torchrun --nproc-per-node 2 --max-restarts 1 tests/dying_worker.py train CONFIG --out DIR
"""

import os
import signal
import sys

from metatl.cli import main
from metatl.engine.trainer import Trainer

DIE_AT = int(os.environ["METATL_DIE_AT"])
_step = Trainer.step


def step_or_die(self):
    if self.rank == 1 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and self.iteration == DIE_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return _step(self)


Trainer.step = step_or_die

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
