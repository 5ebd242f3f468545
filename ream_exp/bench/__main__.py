"""`python -m ream_exp.bench NAME [args]`: see ream_exp/bench/__init__.py."""

from . import main

main()
