"""The installed package has every module of the tree (an editable install hides a missing one)."""

import os
import tomllib

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_every_subpackage_is_listed():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"sagekv.backends"}
    for folder, _, files in os.walk(os.path.join(ROOT, "sagekv")):
        if "__init__.py" in files:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert found == listed
