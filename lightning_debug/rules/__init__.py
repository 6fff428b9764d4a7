"""The decisions, as pure functions: one module per concern (``rules/<concern>.py``).

A rule takes plain values (lists of floats, small dataclasses, arrays) and returns a frozen verdict dataclass:
no trainer, no ``emit``, no logging, no sink, no hidden state (streaks and histories are passed in and
returned). The callback in ``callbacks/<concern>.py`` collects the inputs on the device, calls the rule, words
the verdict and emits it. Rules are tested without a Trainer in ``tests/rules/test_<concern>.py``, by feeding
them the series that should and should not trip them.
"""
