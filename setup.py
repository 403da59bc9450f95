"""The C extensions; pyproject.toml declares the rest: the relay's core
(``pytest_tunpair/_link/_core.c``) and the spare namespace's builder
(``pytest_tunpair/_kernel/_build.c``).

Both are optional: where no C compiler or no Python headers are found, the build goes on
without them; the relay then runs its Python loop for every packet (docs/timing.md, "The
relay's C core") and spares are built in Python (slower beside a running test:
docs/internals.md, "What a pair's set-up costs"). The run's header says which a run uses.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pytest_tunpair._link._core",
            ["pytest_tunpair/_link/_core.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
        Extension(
            "pytest_tunpair._kernel._build",
            ["pytest_tunpair/_kernel/_build.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall"],
        ),
    ]
)
