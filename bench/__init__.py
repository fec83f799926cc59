"""Benchmarks of chatmail push, a package run from the repository root: ``bench/run``.

``bench/run`` is ``python -m bench`` (see :mod:`bench.__main__`); the sections
build on the dev stack (:mod:`devstack`) and run their servers and clients in
spawned child processes (:mod:`bench.common`), which import ``bench.*`` and
``devstack.*`` from the repository root like the parent.
"""
