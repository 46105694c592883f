"""Declares the C simulation kernel (cffi, out-of-line API mode); metadata is in pyproject."""

from setuptools import setup

setup(cffi_modules=["native/build_sim.py:ffibuilder"])
