"""The C extension (setuptools reads the rest from pyproject.toml). No libpq headers or link: see _reader.c."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("kerb_jupyter_copy._reader", ["kerb_jupyter_copy/_reader.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra"])])
