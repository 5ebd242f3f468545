"""A streamed run in a process of its own, for tests that kill it with SIGKILL.

    python -m tests.stream_child RUN_DIR HOLD_AFTER OVERRIDE...

Composes the config from the overrides and runs it into RUN_DIR. Once decoder layer HOLD_AFTER is
written (LayerStream.finished returned for it) the process waits, holding the run directory, until it is
killed: the test kills it at a known point, not wherever a timer happens to land. HOLD_AFTER -1: no wait.
"""

import sys
import time

import torch


def main(argv: list[str]) -> None:
    run_dir, hold_after, overrides = argv[0], int(argv[1]), argv[2:]
    from hydra import compose, initialize_config_dir

    from ream_exp import CONF_DIR
    from ream_exp.run import run
    from ream_exp.methods.layer_stream import LayerStream

    torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py: the same float sums
    original = LayerStream.finished

    def finished(self, index, plan=None):
        original(self, index, plan)
        if index == hold_after:
            print(f"holding after layer {index}", flush=True)
            while True:
                time.sleep(60)

    LayerStream.finished = finished
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run(cfg, run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
