"""The relay's C core (``pytest_tunpair/_link/_core.c``); pyproject.toml declares the rest.

The extension is optional: where no C compiler or no Python headers are found, the build
goes on without it and the relay runs its Python loop for every packet (docs/timing.md,
"The relay's C core"). ``tunpair doctor`` says which one a run uses.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pytest_tunpair._link._core",
            ["pytest_tunpair/_link/_core.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        )
    ]
)
