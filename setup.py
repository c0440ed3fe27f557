"""Build shim: all metadata lives in pyproject.toml.

The C++ CPU kernels in csrc/ will be compiled just in time on first use (torch.utils.cpp_extension),
so the package itself stays pure Python and installs without build isolation pulling in torch again.
"""

from setuptools import setup

setup()
