"""``python -m lightning_debug checks``: print the check catalogue as Markdown (the source of docs/checks.md)."""

import sys

from lightning_debug.findings import render_catalogue

if __name__ == "__main__":
    if sys.argv[1:] != ["checks"]:
        sys.exit("usage: python -m lightning_debug checks > docs/checks.md")
    print(render_catalogue(), end="")
