"""`ream-exp ARGS` (ream_exp.cli.main) with Ctrl-C pressed in one run: the evaluation stage of the run whose
directory is named $INTERRUPT_RUN raises KeyboardInterrupt, after its plan and checkpoint are written.

    INTERRUPT_RUN=r0.5 python -m tests.interrupt_child -m ratio=0.25,0.5 hydra.sweep.subdir=r\\${ratio} ...
"""

import os
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    import ream_exp.run as run_module
    from ream_exp.cli import main as cli_main

    evaluate = run_module.evaluate

    def interrupted_evaluate(model, tokenizer, cfg, checkpoint_dir=None, output_dir=None):
        if checkpoint_dir is not None and Path(checkpoint_dir).parent.name == os.environ.get("INTERRUPT_RUN"):
            raise KeyboardInterrupt
        return evaluate(model, tokenizer, cfg, checkpoint_dir=checkpoint_dir, output_dir=output_dir)

    run_module.evaluate = interrupted_evaluate
    sys.argv = ["ream-exp", *argv]
    cli_main()


if __name__ == "__main__":
    main(sys.argv[1:])
