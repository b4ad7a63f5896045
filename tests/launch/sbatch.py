"""Reading a generated sbatch script in tests."""


def node_command(script: str) -> str:
    """The command srun runs on every node: what follows the srun options, continuation lines included, up to the
    script's keeping of its exit status."""
    return script.split(" --kill-on-bad-exit=1 \\\n", 1)[1].split(" || status=$?", 1)[0].strip()
