"""The one way ffscale reads a torch pickle (`.pth`): `weights_only=True` with a short allow-list.

A `.pth` is a pickle, and unpickling can run any code the file names. torch's weights-only loader
refuses every global that is not a tensor, a container or a number; DeiT's `main.py` also pickles
its `argparse.Namespace` (`'args'`), so that one type is allowed. Anything else stops with one line
naming the file and the type, unless the user passes `trust=True` (`--trust-pickle`), which is said
loudly because it lets the file run code (the globals it names are then allowed, nothing else).
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from pathlib import Path

import torch

from ffscale.errors import UntrustedFile

ALLOWED = (argparse.Namespace,)  # DeiT's main.py: checkpoint['args'] = parser.parse_args()


def load(path: str | Path, trust: bool = False, allowed: tuple = ALLOWED):
    """The object pickled in `path`, on the CPU."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "an object torch's weights-only loader refuses"
        if not trust:
            raise UntrustedFile(
                f"{path}: the pickle holds {what}, which loading could run as code; ffscale loads only "
                "tensors, containers, numbers and argparse.Namespace (--trust-pickle loads it anyway, "
                "if you trust whoever wrote the file)"
            ) from None
        print(f"ffscale: WARNING: --trust-pickle: unpickling {path}, which holds {what}: "
              "code in it runs now", file=sys.stderr, flush=True)  # fmt: skip
        # still the weights-only loader, with exactly the globals this file names allowed on top
        unsafe = [_resolve(name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
        with torch.serialization.safe_globals([*allowed, *unsafe]):
            return torch.load(path, map_location="cpu", weights_only=True)


def _resolve(name: str):
    """'module.attr' (the form torch reports a global in) -> the object, importing its module."""
    import importlib

    module, _, attr = name.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
