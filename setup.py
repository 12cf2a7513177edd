"""Package discovery for the top-level layout (see docs/architecture.md).

Each code folder is a subpackage of `fusec`. pyproject.toml's `packages.find` cannot
give found packages a prefix, so the folder map lives here and every package below a
mapped folder (a directory with an __init__.py) ships without being listed.
"""
from setuptools import find_packages, setup

# import name -> folder; subpackages resolve through their parent's folder
PACKAGE_DIRS = {
    "fusec": "fusec",
    "fusec.fusion": "fusion",
    "fusec.kernels": "kernels",
    "fusec.models": "models",
    "fusec.runtime": "runtime",
    "fusec.cli": "cli",
}

setup(
    package_dir=PACKAGE_DIRS,
    packages=[pkg for name, folder in PACKAGE_DIRS.items()
              for pkg in (name, *(f"{name}.{sub}" for sub in find_packages(folder)))],
)
