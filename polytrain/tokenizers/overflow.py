"""What a tokenizer does with a sample longer than its limit: cut it (counted, logged) or refuse it."""

import logging

from polytrain.config.tokenizers import OverflowPolicy
from polytrain.errors import DataError

log = logging.getLogger(__name__)

LOG_EVERY = 1000
"""With ``truncate``, the first cut sample is logged, then every ``LOG_EVERY``-th."""


class Overflow:
    """Applies one policy and counts the samples it cut (per process: loader workers count their own)."""

    def __init__(self, policy: OverflowPolicy, key: str):
        self.policy = policy
        self.key = key
        """The config key of the limit, for messages (``tokenizers.text.max_len``)."""
        self.count = 0
        """Samples cut so far."""

    def __call__(self, sample: str, size: str, limit: str) -> None:
        """``sample`` measures ``size``, more than ``limit``: raise, or count and (sometimes) log the cut."""
        if self.policy == "error":
            raise DataError(f"{sample}: {size} exceeds {self.key}={limit} (overflow=error; "
                            f"overflow=truncate cuts it instead)")
        self.count += 1
        if self.count == 1 or self.count % LOG_EVERY == 0:
            log.warning("%s: %s cut to %s=%s (%d sample(s) cut so far; logged every %d)", sample, size, self.key,
                        limit, self.count, LOG_EVERY)
