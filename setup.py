"""Ships the repository's conf/ and sweeps/ inside the installed package, as ream_exp/conf and ream_exp/sweeps.

The checkout keeps them at the top level (the source of truth; docs/getting-started.md, Install). A wheel, and so a
`pip install` from a git URL, a directory or an sdist, copies them into the built package; an editable
install (`pip install -e .`, `make setup`) copies nothing and reads them where they are. ream_exp.CONF_DIR
and ream_exp.SWEEPS_DIR find either place. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("conf", "sweeps")  # top-level folders of the checkout -> ream_exp/<name> in the wheel


class build_py_with_configs(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # the checkout's folders are read in place
            return
        for name in SHIPPED:
            for src in sorted((ROOT / name).rglob("*")):
                if src.is_file() and "__pycache__" not in src.parts:
                    dst = Path(self.build_lib, "ream_exp", name, src.relative_to(ROOT / name))
                    self.mkpath(str(dst.parent))
                    self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": build_py_with_configs})
