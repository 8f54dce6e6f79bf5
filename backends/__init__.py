"""Shard backends: one small class per inference engine, behind one contract.

``edgemesh.backends.base`` holds the contract and ``registry`` finds the
backends (every module in this package that defines ``BACKEND``, plus
entry points in the ``edgemesh.backends`` group). Runtimes are imported
only when a backend is constructed.
"""
