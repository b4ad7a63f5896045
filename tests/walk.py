"""Follow the config from ``polytrain ...`` through the calls until the first training step, and count.

Run as ``python -m tests.walk train CONFIG [overrides]`` from the repository (or with it on PYTHONPATH); prints one JSON object last.  The walk is the sequence,
in call order, of the package files whose functions are called with the config, a section of it or the job as
an argument other than ``self`` (the config handed down, not a section reading its own fields); consecutive calls
in one file are one visit.  ``files``: the distinct files visited; ``returns``: visits to a file visited before.
"""

import json
import sys
from pathlib import Path

import polytrain
from polytrain.cli import main
from polytrain.job import Job

ROOT = Path(polytrain.__file__).parent


def handed_down(value) -> bool:
    return isinstance(value, Job) or type(value).__module__.startswith("polytrain.config")


def walk(args: list[str]) -> list[str]:
    visits: list[str] = []
    recording = [True]

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call" or not recording[0] or not code.co_filename.startswith(str(ROOT)):
            return
        path = str(Path(code.co_filename).relative_to(ROOT.parent))
        if path.endswith("platform/train/step.py") and code.co_name == "__call__":
            recording[0] = False  # the first training step: the set-up is done
            return
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if any(handed_down(frame.f_locals.get(name)) for name in names if name != "self"):
            if not visits or visits[-1] != path:
                visits.append(path)

    sys.setprofile(profile)
    try:
        main(args)
    finally:
        sys.setprofile(None)
    return visits


if __name__ == "__main__":
    visits = walk(sys.argv[1:])
    print(json.dumps({"files": len(set(visits)), "returns": len(visits) - len(set(visits)), "visits": visits}))
