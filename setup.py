"""The optional C reader (shmcache/_native.c): built with the system's compiler when it can
be; if not, the install still succeeds and shmcache reads through its pure-Python reader.
Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("shmcache._native", ["shmcache/_native.c"], optional=True,
                             extra_compile_args=["-std=gnu11"])])
