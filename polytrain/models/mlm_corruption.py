"""BERT's masked-language-model corruption (Devlin et al. 2019, section 3.1), as a pure function.

Of the real, non-special tokens, ``probability`` are selected; of those, 80%
become the mask id, 10% a random regular token, 10% stay as they are.  Labels
hold the original id at selected positions and ``IGNORE_INDEX`` elsewhere.
The data pipeline applies it to each masked_lm batch, with a generator seeded
by the batch's place in the data order.

Shape legend: B batch, T text length.
"""

import torch
from torch import Tensor

from polytrain.tokens import IGNORE_INDEX

MASK_SHARE = 0.8
"""Of the selected tokens, the share replaced by the mask id."""
RANDOM_SHARE = 0.1
"""Of the selected tokens, the share replaced by a random regular token (the rest stay unchanged)."""


def mask_tokens(ids_BT: Tensor, valid_BT: Tensor, probability: float, mask_id: int, special_ids: Tensor,
                vocab_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(corrupted ids, labels), both (B, T).

    ``special_ids`` (pad, bos, eos, the mask, span markers) are never selected and never drawn as random
    replacements.  ``generator`` makes the draw reproducible; None uses torch's global RNG.
    """
    device = ids_BT.device
    special_V = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    special_V[special_ids.to(device)] = True
    regular_R = (~special_V).nonzero().flatten()
    eligible_BT = valid_BT & ~special_V[ids_BT]
    draw_BT = torch.rand(ids_BT.shape, generator=generator, device=device)
    selected_BT = eligible_BT & (draw_BT < probability)
    action_BT = torch.rand(ids_BT.shape, generator=generator, device=device)
    to_mask_BT = selected_BT & (action_BT < MASK_SHARE)
    to_random_BT = selected_BT & (action_BT >= MASK_SHARE) & (action_BT < MASK_SHARE + RANDOM_SHARE)
    random_BT = regular_R[torch.randint(len(regular_R), ids_BT.shape, generator=generator, device=device)]
    corrupted_BT = torch.where(to_mask_BT, mask_id, torch.where(to_random_BT, random_BT, ids_BT))
    labels_BT = torch.where(selected_BT, ids_BT, IGNORE_INDEX)
    return corrupted_BT, labels_BT
