"""The errors polytrain raises for user mistakes; the CLI prints them without a traceback."""


class PolytrainError(ValueError):
    """A mistake in the user's config, data or command line, explained in the message."""


class ConfigError(PolytrainError):
    """A config key holds a value that is not allowed.

    ``key`` is the dotted path; components raise it with the key relative to
    their own section and the loader prefixes the section path.
    """

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={value!r}: {allowed}")

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


class DataError(PolytrainError):
    """A sample, file or manifest line that cannot be read; the message names where it is."""


class DivergenceError(PolytrainError):
    """Training produced values that are not finite (losses, gradients, weights, an evaluation): the run stops
    without a checkpoint of them; the message names the steps and the last checkpoint that is sound."""


STOPPED = 75
"""The exit code of a job that stopped on SIGTERM or SIGUSR1 after writing a checkpoint to resume from
(sysexits' EX_TEMPFAIL: a temporary failure, try again)."""


class Stopped(Exception):
    """The job stopped early on a signal and saved a checkpoint: not an error; the CLI exits with ``STOPPED``."""
