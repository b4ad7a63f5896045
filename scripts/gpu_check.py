"""Every GPU path of polytrain in one command, on a lent GPU machine that reaches no package registry.

Phases, in order, the figures first; each runs under its own time limit (a hang in one cannot eat the
others' time) and all of them within ``--budget`` seconds, so the summary is always written before the
device tool's limit:

  install    polytrain (built from this tree) and the wheelhouse (``.whl/``, ``make wheelhouse``) into a
             target folder with ``pip --no-index --no-deps``: the image's own torch is left as it is
  imports    every module of the installed polytrain and the libraries it runs on, in a fresh interpreter;
             every requirement of polytrain and of what it needs, checked against what is installed now
  bench      ``bench/step_gpu.py``: decoder tokens/s and MFU per kernel, ViT-B/16 vs timm, attention
             TFLOP/s (FlexAttention's rows last: they compile, so a time-out loses only them)
  train      GPU: the quick start through DeepSpeed (ZeRO-2, bf16) on NCCL; CPU: 2 steps of the tiny recipe
  gpu_tests  the ``gpu``-marked tests on the GPU: first the ZeRO-2 bf16 step against the CPU's, then each
             attention kernel against the CPU math path (``GPU_TESTS``, only those files)
  doctor     ``polytrain doctor`` (versions, NCCL, the DeepSpeed ops a run loads)
  launch     with 2 GPUs or more: the quick start as 2 processes through ``polytrain launch``

A phase that needs CUDA says why it skips where there is none, so the script runs end to end in CI (the
slow test ``tests/test_gpu_check.py`` runs it there; the bench and the gpu tests themselves run on the CPU
in the test suite).  Any exception in a phase is that phase's failure, with its last line; the next phase
runs.  Writes ``OUT/gpu_check.json`` (each phase's status, seconds and figures) and ``OUT/<phase>.log``
(its commands' output); exit code 1 if a phase failed or ran out of time.  ``--only bench,gpu_tests``
reruns some phases on a warm machine, on the install of an earlier run in the same ``--work`` folder.

    python3 scripts/gpu_check.py [--out DIR] [--wheels .whl] [--work DIR] [--budget 420] [--only PHASES]
"""

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

from packaging.markers import default_environment
from wheelhouse import needed, walk

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 420
"""All phases together.  A lent GPU gives 900 s of device time in all, its start (120-240 s) included, and
600 s at most to one command: 240 + 420 + ~30 of transfers leave ~200 s for one rerun of a phase
(``--only``) on the warm machine."""
MIN_PHASE_S = 10
"""A phase is not started with less of the budget left than this."""
MAX_FILES_BACK = 8
"""Files the device tool brings back from OUT: the summary and one log per phase."""
GPU_TESTS = (("tests/platform/distributed/test_gpu_step.py", 0), ("tests/models/test_attention_gpu.py", 4))
"""The files of ``gpu``-marked tests, in the order run, and the pytest-xdist processes of each (0: pytest's
own; the attention cases compile FlexAttention once per mask, on the CPU cores)."""
TRAIN = {
    "cuda": ("configs/quickstart.yaml", "train.steps=300", "engine.precision=bf16", "engine.dist_backend=nccl",
             "tracking.log_every=50"),
    "cpu": ("configs/tiny.yaml", "train.steps=2", "tracking.log_every=1", "tracking.wandb.mode=offline"),
}
"""Recipe and overrides of the train (and launch) run by device.  On the CPU it is the wheelhouse's smoke
test, W&B (offline) included so that its wheels run; on the GPU it is the measured quick start, kept free
of the W&B service so that a W&B problem cannot cost those figures (the imports phase imports wandb)."""
BENCH = ("--steps", "5", "--no-compile")
"""bench/step_gpu.py's arguments: eager blocks, since compiling the decoder once per kernel would take most
of the budget; compiled figures come from running the benchmark itself."""
GPU_PROBE = ("import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
             "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda, "
             "'gpus': [torch.cuda.get_device_name(i) for i in range(n)]}))")


class Skipped(Exception):
    """The phase cannot run on this machine; the message says why."""


class Failed(Exception):
    """The phase ran and something in it failed; the message says what."""


class TimedOut(Exception):
    """A command of the phase ran past the phase's time limit and was killed."""


@dataclass(frozen=True)
class Phase:
    name: str
    limit_s: float
    """Longest this phase may take, in seconds (less where less of the budget is left)."""
    run: Callable[["Check", dict], None]
    """Fills the figures dict as it goes (so a phase that fails or times out keeps what it measured)."""


class Check:
    """What the phases share: folders, the environment their commands run in, the GPUs, the clock."""

    def __init__(self, out: Path, wheels: Path, work: Path, budget_s: float):
        self.out, self.wheels, self.work = out, wheels, work
        self.site = work / "site"
        self.deadline = time.monotonic() + budget_s
        self.env = {**os.environ, "PYTHONPATH": str(self.site), "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true",
                    "PATH": f"{self.site / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.machine: dict | None = None
        """torch, its CUDA and the GPUs, once a phase has needed them (``gpus``)."""
        self.log: Path | None = None
        """The current phase's log."""
        self.phase_deadline = self.deadline

    def command(self, *args, cwd: Path, ok: tuple[int, ...] = (0,)) -> str:
        """Run one command of the current phase (output appended to its log) within the phase's time
        limit; returns the command's output."""
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(map(str, args))}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen([str(a) for a in args], cwd=cwd, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code = proc.wait(timeout=max(0.0, self.phase_deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimedOut(f"`{' '.join(Path(str(a)).name for a in args[:3])} ...` killed at the time limit")
            finally:
                end_group(proc)
        with self.log.open() as log:
            log.seek(start)
            output = log.read()
        if code not in ok:
            last = (output.strip().splitlines() or ["no output"])[-1]
            raise Failed(f"exit code {code}: {last}")
        return output

    def polytrain(self, *args) -> str:
        """The installed CLI, from the work folder (so this tree's sources are not what gets imported)."""
        return self.command(sys.executable, "-m", "polytrain.cli", *args, cwd=self.work)

    def gpus(self) -> list[str]:
        """The CUDA devices' names, probed (as a command of the current phase) when first asked."""
        if self.machine is None:
            self.machine = last_json(self.command(sys.executable, "-c", GPU_PROBE, cwd=self.work))
            print(f"  torch {self.machine['torch']} (CUDA {self.machine['cuda']}); GPUs: "
                  f"{', '.join(self.machine['gpus']) or 'none'}")
        return self.machine["gpus"]


def end_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a command's own process group (its workers and services), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the command and everything it started have exited
        pass
    proc.wait()


def last_json(output: str) -> dict:
    """The last line of a command's output, a JSON object (libraries print their warnings above it)."""
    return json.loads(output.strip().splitlines()[-1])


def install(check: Check, figures: dict) -> None:
    wheels = sorted(check.wheels.glob("*.whl"))
    if not wheels:
        raise Failed(f"no wheels in {check.wheels}: run `make wheelhouse` where a registry is reachable, then "
                     f"carry .whl")
    source = check.work / "src"  # a copy: pip builds in the source folder, and this tree must stay as it is
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(REPO / "polytrain", source / "polytrain", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.rmtree(check.site, ignore_errors=True)
    check.command(sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                  "--no-cache-dir", "--no-build-isolation", "--upgrade", "--target", check.site, *wheels, source,
                  cwd=check.work)
    figures["python"] = platform.python_version()
    figures["installed"] = {d.name: d.version for d in metadata.distributions(path=[str(check.site)])}


def unmet_requirements(site: Path) -> list[str]:
    """polytrain's requirements (test extra included) and theirs, against what the phases' commands see:
    the installed folder first, then this interpreter's own packages."""
    path = [str(site), *sys.path]
    environment = {**default_environment(), "extra": ""}

    def find(name: str) -> metadata.Distribution | None:
        return next(iter(metadata.distributions(name=name, path=path)), None)

    def lookup(name: str):
        dist = find(name)
        return (None, []) if dist is None else (dist.version, needed(dist.requires or [], environment))

    polytrain = find("polytrain")
    if polytrain is None:
        return [f"polytrain is not installed in {site}"]
    return walk(needed(polytrain.requires or [], environment, ("test",)), lookup)[0]


def imports(check: Check, figures: dict) -> None:
    figures["requirements_unmet"] = unmet = unmet_requirements(check.site)
    for line in unmet:
        print(f"  warning: {line}")
    found = last_json(check.command(sys.executable, REPO / "scripts" / "import_all.py", "polytrain", cwd=check.work))
    figures.update(found)
    print(f"  {len(found['imported'])} modules imported, {len(found['failed'])} failed")
    if found["failed"]:
        first, why = next(iter(found["failed"].items()))
        raise Failed(f"{len(found['failed'])} module(s) do not import; {first}: {why}")


def doctor(check: Check, figures: dict) -> None:
    output = check.polytrain("doctor", REPO / "configs" / "quickstart.yaml")
    print(f"  {(output.strip().splitlines() or ['no output'])[-1]}")


def run_figures(run_dir: Path) -> dict:
    """What a training run logged: the machine, the loss of every logged step, the last rates, the evaluation."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(line["system"] for line in lines if line.get("event") == "start")
    logged = [line for line in lines if "loss" in line]
    last = logged[-1] if logged else {}
    rates = {key: last[key] for key in ("tokens_per_s", "mfu", "step_time_s", "memory/max_allocated_gib")
             if key in last}
    evaluation = run_dir / "eval.json"
    return {"device": start["device"], "devices": start["devices"], "world_size": start["world_size"],
            "loss": {line["step"]: line["loss"] for line in logged}, **rates,
            "eval": json.loads(evaluation.read_text()) if evaluation.exists() else None}


def training(check: Check, figures: dict, command: str, name: str, *extra: str) -> None:
    recipe, *overrides = TRAIN["cuda" if check.gpus() else "cpu"]
    try:
        check.polytrain(command, REPO / recipe, *overrides, *extra, f"train.out_dir={check.work / 'runs'}",
                        f"train.run_name={name}", f"data.cache_dir={check.work / 'data'}",
                        "tracking.progress_bar=false")
    finally:
        if (check.work / "runs" / name / "metrics.jsonl").exists():
            figures.update(run_figures(check.work / "runs" / name))
    losses = list(figures.get("loss", {}).values()) or [float("nan")]
    print(f"  loss {losses[0]:.4f} -> {losses[-1]:.4f}; tokens/s {figures.get('tokens_per_s', 0):.0f}; "
          f"MFU {figures.get('mfu')}")


def train(check: Check, figures: dict) -> None:
    training(check, figures, "train", "train")


def launch(check: Check, figures: dict) -> None:
    needs_cuda(check, "a 2-process launch needs 2 GPUs")
    if len(check.gpus()) < 2:
        raise Skipped(f"{len(check.gpus())} GPU(s): a 2-process launch needs 2")
    training(check, figures, "launch", "launch", "launch.procs_per_node=2")


def needs_cuda(check: Check, what: str) -> None:
    if not check.gpus():
        raise Skipped(f"no CUDA device here, and {what}")


def junit(path: Path, figures: dict) -> None:
    """Add pytest's JUnit XML to ``figures``: {passed: n, failed: {test: message}, skipped: {test: reason}}."""
    for case in ElementTree.parse(path).iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            figures["passed"] += 1
        else:
            message = (outcome.get("message") or "").splitlines() or [""]
            figures["skipped" if outcome.tag == "skipped" else "failed"][test] = message[0][:300]


def gpu_tests(check: Check, figures: dict) -> None:
    needs_cuda(check, "the gpu-marked tests need one")
    figures.update({"passed": 0, "failed": {}, "skipped": {}})
    for path, workers in GPU_TESTS:
        report = check.work / f"{Path(path).stem}.xml"
        report.unlink(missing_ok=True)
        try:
            check.command(sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-n", workers, "-p", "no:cacheprovider",
                          f"--junitxml={report}", path, cwd=REPO, ok=(0, 1))
        finally:
            if report.exists():
                junit(report, figures)
        if not report.exists():
            raise Failed(f"pytest wrote no report ({report.name})")
        print(f"  {path}: {figures['passed']} passed, {len(figures['failed'])} failed, "
              f"{len(figures['skipped'])} skipped so far")
    if figures["failed"]:
        first, why = next(iter(figures["failed"].items()))
        raise Failed(f"{len(figures['failed'])} of {figures['passed'] + len(figures['failed'])} run failed; "
                     f"{first}: {why}")


def bench(check: Check, figures: dict) -> None:
    needs_cuda(check, "bench/step_gpu.py needs one")
    result = check.work / "bench.json"
    result.unlink(missing_ok=True)  # an earlier run's, in a work folder kept for --only
    try:
        check.command(sys.executable, REPO / "bench" / "step_gpu.py", *BENCH, "--out", result, cwd=REPO)
    finally:
        if result.exists():
            figures.update(json.loads(result.read_text()))
            for section in ("decoder", "vit", "attention"):
                for key, row in figures.get(section, {}).items():
                    print(f"  {section} {key}: {row}")


PHASES = (Phase("install", 60, install), Phase("imports", 60, imports), Phase("bench", 180, bench),
          Phase("train", 240, train), Phase("gpu_tests", 150, gpu_tests), Phase("doctor", 90, doctor),
          Phase("launch", 120, launch))
"""Estimated on a GPU (none has run this yet): install ~30 s, imports ~30 s, bench ~150 s (eager decoders ~10 s
per kernel, FlexAttention's compiles last), train ~70 s, gpu_tests ~120 s (the CPU side of the ZeRO step
builds DeepSpeed's CPU communication op).  On a CPU the train phase builds that op and the data (up to ~200 s
on 2 busy cores): its limit is there for that, the budget binds first on a GPU."""
assert len(PHASES) + 1 <= MAX_FILES_BACK, "one log per phase and the summary must all come back"


def run_phase(check: Check, phase: Phase) -> dict:
    left = check.deadline - time.monotonic()
    if left < MIN_PHASE_S:
        return {"status": "not run", "why": f"{left:.0f} s of the budget left"}
    check.log = check.out / f"{phase.name}.log"
    check.log.write_text("")
    limit = min(phase.limit_s, left)
    check.phase_deadline = time.monotonic() + limit
    print(f"[gpu_check] {phase.name} (limit {limit:.0f} s)", flush=True)
    figures: dict = {}
    began = time.monotonic()
    try:
        phase.run(check, figures)
        status = {"status": "ok"}
    except Skipped as why:
        status = {"status": "skipped", "why": str(why)}
    except TimedOut as why:
        status = {"status": "timed out", "why": f"{why} ({limit:.0f} s)"}
    except Failed as why:
        status = {"status": "failed", "why": str(why)}
    except Exception as err:  # a mistake of this script or an output it did not expect: this phase's failure only
        last = (str(err).strip().splitlines() or [""])[-1]
        status = {"status": "failed", "why": f"{type(err).__name__}: {last}"}
        with check.log.open("a") as log:
            traceback.print_exc(file=log)
    status["seconds"] = round(time.monotonic() - began, 1)
    print(f"[gpu_check] {phase.name}: {status['status']} in {status['seconds']} s"
          + (f": {status['why']}" if "why" in status else ""), flush=True)
    return {**status, **figures}


def selected(only: str | None) -> tuple[Phase, ...]:
    """The phases ``--only`` names (comma-separated), in the order they always run; all without it."""
    if only is None:
        return PHASES
    names = [name.strip() for name in only.split(",") if name.strip()]
    known = [phase.name for phase in PHASES]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"--only {only!r}: unknown phase(s) {', '.join(unknown) or '(none named)'}; "
                         f"known: {', '.join(known)}")
    return tuple(phase for phase in PHASES if phase.name in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "build" / "gpu_check"),
                        help="where the summary and logs go (default: $OUT, else build/gpu_check)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="the wheelhouse (make wheelhouse)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "gpu_check_work",
                        help="install and run folder, kept for --only (default: build/gpu_check_work)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all phases together")
    parser.add_argument("--only", default=None, metavar="PHASES",
                        help=f"comma-separated phases to run again (of {', '.join(p.name for p in PHASES)}); without "
                             "install, on the install an earlier run left in --work")
    args = parser.parse_args(argv)
    try:
        phases = selected(args.only)
    except ValueError as err:
        parser.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.wheels.resolve(), args.work.resolve(), args.budget)
    summary = {"python": sys.executable, "budget_s": args.budget, "phases": {}}
    installed = None if phases[0].name == "install" else check.site / "polytrain"
    for phase in phases:
        if summary["phases"].get("install", {}).get("status", "ok") != "ok":
            result = {"status": "not run", "why": "install did not succeed"}
        elif installed is not None and not installed.is_dir():
            result = {"status": "not run", "why": f"nothing installed in {check.site}: run install first"}
        else:
            result = run_phase(check, phase)
        summary["phases"][phase.name] = result
        summary["machine"] = check.machine
        (check.out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    bad = [name for name, result in summary["phases"].items() if result["status"] not in ("ok", "skipped")]
    print(f"[gpu_check] {check.out / 'gpu_check.json'}: "
          + ", ".join(f"{name} {result['status']} ({result.get('seconds', 0)} s)"
                      for name, result in summary["phases"].items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
