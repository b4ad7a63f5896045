"""Turning a config into processes on 1..N nodes.

config.py (the launch section), backends.py (the launchers and ``launch()``), job.py (one launch),
hostfile.py, rendezvous.py, torchrun.py, deepspeed.py, slurm.py, failures.py (a failed rank's error,
from the process to its launcher), doctor.py (``polytrain doctor``).
"""
