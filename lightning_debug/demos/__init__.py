"""Small real tasks for examples, tests and benchmarks (like ``lightning.pytorch.demos``).

- :mod:`~lightning_debug.demos.digits`: scikit-learn's digits with an MLP and fault knobs.
- :mod:`~lightning_debug.demos.modular`: modular addition, the CPU grokking task.
"""
