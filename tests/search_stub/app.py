"""A Hydra app with ream-exp's run-directory contract and a cheap objective, for the mix search's tests.

Each call appends its mix to <sweep dir>/launches.txt, then behaves as ream_exp.run.run does for the
sweeper: finished results of the same config are returned as they are; otherwise config.yaml and
metrics.json ({"status": "done", "eval": {"mc", "gen"}}) are written. MC rises with the general weight,
GEN with the math and code weights together, so the two conflict and the frontier is a curve.
With fail_general_at_least=x, a mix whose general weight is >= x fails (fail_mode: raise | none).
"""

import json
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from ream_exp.calib import DOMAINS
from ream_exp.atomic import write_json
from ream_exp.run_records import finished_metrics


def stub_scores(mix: dict) -> tuple[float, float]:
    g, m, c = (float(mix.get(s, 0.0)) for s in DOMAINS)
    return 0.2 + 0.6 * math.sqrt(g), 0.1 + 0.7 * math.sqrt(m * c) * 2 + 0.1 * (m + c)


def _mix(cfg) -> dict:
    mix = OmegaConf.to_container(cfg.calib.mix)
    return dict(zip(DOMAINS, mix)) if isinstance(mix, list) else mix  # the shorthand, or {source: weight}


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg):
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    mix = _mix(cfg)
    with open(Path(hc.sweep.dir) / "launches.txt", "a") as f:
        f.write(json.dumps(mix) + "\n")
    done = finished_metrics(run_dir, cfg)
    if done is not None:
        return done
    threshold = cfg.fail_general_at_least
    if threshold is not None and mix.get("general", 0.0) >= threshold:
        if cfg.fail_mode == "raise":
            raise RuntimeError(f"stub failure for {mix}")
        return None
    mc, gen = stub_scores(mix)
    metrics = {"status": "done", "mix": mix, "eval": {"mc": mc, "gen": gen}}
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    main()
