"""Import every module of an installed package, and where the libraries it runs on were loaded from.

A module that imports only on some machines (a dependency missing from an environment, a wheel built for
another Python) fails here, before any training run reaches it.  Walks the package's files rather than
``pkgutil``, which skips folders without an ``__init__.py`` (namespace packages such as
``polytrain.platform``).  Prints one JSON object: the modules imported, the failures (module -> last line of
the error) and the file each of ``LIBRARIES`` was imported from.

    python scripts/import_all.py [PACKAGE]
"""

import importlib
import json
import sys
import traceback
from pathlib import Path

LIBRARIES = ("torch", "deepspeed", "accelerate", "transformers", "tokenizers", "timm", "wandb", "soundfile",
             "pydantic")
"""What a training run loads (W&B only when configured), imported too, so a reader sees where each came from."""


def module_names(package: str) -> list[str]:
    root = Path(importlib.import_module(package).__file__).parent
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((package, *parts)))
    return names


def main() -> None:
    package = sys.argv[1] if len(sys.argv) > 1 else "polytrain"
    imported, failed = [], {}
    for name in [*module_names(package), *LIBRARIES]:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception:  # any error at import time is the finding; its last line names it
            failed[name] = traceback.format_exc().strip().splitlines()[-1]
    paths = {name: getattr(sys.modules.get(name), "__file__", None) for name in (package, *LIBRARIES)}
    print(json.dumps({"imported": imported, "failed": failed, "paths": paths}))


if __name__ == "__main__":
    main()
