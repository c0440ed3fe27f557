"""The C++ sources of the fused CPU kernels, shipped as package data (``fusedoptim.csrc``).

Nothing to import: ``fusedoptim._cpu`` compiles them just in time with ``torch.utils.cpp_extension.load``.
"""
