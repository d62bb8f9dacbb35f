"""Package discovery only (everything else is in pyproject.toml): the design card's top-level folders
backends/ and python_backend/ install as kvrelay.backends and kvrelay.triton, so a new subpackage
needs no list kept by hand."""

from setuptools import find_packages, setup


def mapped(folder: str, as_: str) -> list[str]:
    return [as_ + p[len(folder) :] for p in find_packages(include=[folder, f"{folder}.*"])]


setup(
    packages=find_packages(include=["kvrelay", "kvrelay.*"])
    + mapped("backends", "kvrelay.backends")
    + mapped("python_backend", "kvrelay.triton")
)
