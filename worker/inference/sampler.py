"""The next token of every row of a batch, each request with its own sampling settings.

Greedy rows take the argmax, together; sampled rows draw one by one with their temperature
and top_p, from their own generator when seeded, so a seeded request draws the same tokens in
any batch and leaves the process-wide random stream alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.inference.engine_types import GenerationParams
from worker.inference.request import GenerationRequest

# In place of a token: the row had no valid distribution (NaN or infinite scores).
NO_TOKEN = -1


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self._device = device

    def prepare(self, request: GenerationRequest) -> None:
        """Give a seeded sampled request its generator, before its first token."""
        params = request.params
        if params.temperature > 0 and params.seed is not None:
            request.generator = torch.Generator(self._device).manual_seed(params.seed)

    def sample(
        self, logits: Sequence[torch.Tensor], requests: Sequence[GenerationRequest]
    ) -> list[int]:
        """One token per request, or NO_TOKEN for a row with no valid distribution;
        ``logits`` are the rows' last logits [rows, vocab] in row order, in as many parts as
        there were forward passes since the last step."""
        tokens: list[int] = []
        for part in logits:
            chosen = part.argmax(dim=-1)
            valid = torch.isfinite(part).all(dim=-1)
            first = len(tokens)  # the batch row of the part's first row
            for row, request in enumerate(requests[first : first + part.shape[0]]):
                if request.params.temperature > 0:
                    token, ok = sample_row(part[row], request.params, request.generator)
                    chosen[row], valid[row] = token, valid[row] & ok
            chosen = torch.where(valid, chosen, torch.full_like(chosen, NO_TOKEN))
            # One transfer to the host per part, after every row is chosen on the device:
            # the checks above never stop the device to ask the host.
            tokens.extend(chosen.tolist())
        if len(tokens) != len(requests):
            raise ValueError(f"{len(tokens)} rows of logits for {len(requests)} requests")
        return tokens


def sample_row(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token id from one row's logits [vocab]: (the id, whether the distribution was
    valid), both tensors of one element, left on the device."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the first always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # multinomial refuses NaN, infinite or all-zero weights (on CUDA with an assert that
    # breaks the process): draw from valid weights always, and say whether they were.
    ok = torch.isfinite(probs).all() & (probs.sum() > 0)
    safe = torch.where(ok, probs, torch.ones_like(probs))
    return torch.multinomial(safe, 1, generator=generator)[0], ok
