"""BERT's masked-language-model corruption (Devlin et al. 2019, section 3.1), as a pure function.

Of the real, non-special tokens, ``probability`` are selected; of those, 80%
become the mask id, 10% a random regular token, 10% stay as they are.  Labels
hold the original id at selected positions and ``IGNORE_INDEX`` elsewhere.

Shape legend: B batch, T text length.
"""

import torch
from torch import Tensor

from polytrain.tokens import IGNORE_INDEX

MASK_SHARE = 0.8
"""Of the selected tokens, the share replaced by the mask id."""
RANDOM_SHARE = 0.1
"""Of the selected tokens, the share replaced by a random regular token (the rest stay unchanged)."""


def mask_tokens(ids_BT: Tensor, valid_BT: Tensor, probability: float, mask_id: int, first_regular_id: int,
                vocab_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(corrupted ids, labels), both (B, T).

    Ids below ``first_regular_id`` (pad, bos, eos, mask, modality markers) are
    never selected and never drawn as random replacements.  ``generator`` makes
    the draw reproducible; None uses torch's global RNG (which checkpoints save).
    """
    device = ids_BT.device
    eligible_BT = valid_BT & (ids_BT >= first_regular_id)
    draw_BT = torch.rand(ids_BT.shape, generator=generator, device=device)
    selected_BT = eligible_BT & (draw_BT < probability)
    action_BT = torch.rand(ids_BT.shape, generator=generator, device=device)
    to_mask_BT = selected_BT & (action_BT < MASK_SHARE)
    to_random_BT = selected_BT & (action_BT >= MASK_SHARE) & (action_BT < MASK_SHARE + RANDOM_SHARE)
    random_BT = torch.randint(first_regular_id, vocab_size, ids_BT.shape, generator=generator, device=device)
    corrupted_BT = torch.where(to_mask_BT, mask_id, torch.where(to_random_BT, random_BT, ids_BT))
    labels_BT = torch.where(selected_BT, ids_BT, IGNORE_INDEX)
    return corrupted_BT, labels_BT
