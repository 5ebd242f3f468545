"""hydra/sweeper=mix_search: an optuna study over calibration mixes that maximises MC and GEN together."""
