"""Population operators of the directional evolutionary strategy (DES).

Codes are :class:`~irep_deploy.arch.ArchCode` values; every operator returns codes that obey the
budget (at most C branches) and never set an unavailable slot. Randomness comes only from the
``random.Random`` / ``torch.Generator`` passed in, so a seeded search is reproducible.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Set, Tuple

import torch

from ..arch import ArchCode

Slot = Tuple[int, int]

#: How the SuperNet-sampled share of a population is drawn: Eq. 8-10, or uniformly (the ablation).
SAMPLERS = ("directional", "uniform")
#: How a round's population is formed: DES (Algorithm 1), or random search (fresh random codes every round).
STRATEGIES = ("des", "random")


def repair(code: ArchCode, budget: int, rng: random.Random,
           scores: Optional[torch.Tensor] = None) -> ArchCode:
    """Switch branches off until at most ``budget`` remain.

    With ``scores`` (L x O, e.g. the SuperNet's sigmoid(alpha) * sigmoid(beta)) the lowest-scored
    branches go first, which keeps the repair pointed the way the SuperNet learned; otherwise at random.
    """
    on = [(l, o) for l, row in enumerate(code.bits) for o, b in enumerate(row) if b]
    excess = len(on) - budget
    if excess <= 0:
        return code
    if scores is not None:
        rng.shuffle(on)  # ties broken at random
        on.sort(key=lambda s: float(scores[s[0], s[1]]))
        drop = set(on[:excess])
    else:
        drop = set(rng.sample(on, excess))
    return code.with_bits([[0 if (l, o) in drop else b for o, b in enumerate(row)]
                           for l, row in enumerate(code.bits)])


def crossover(a: ArchCode, b: ArchCode, rng: random.Random) -> ArchCode:
    """Layer-wise uniform crossover: each layer's row comes from either parent with probability 1/2."""
    return a.with_bits([ra if rng.random() < 0.5 else rb for ra, rb in zip(a.bits, b.bits)])


def mutate(code: ArchCode, rng: random.Random, flips: float = 2.0) -> ArchCode:
    """Flip available bits, each with probability ``flips / capacity`` (at least one flip)."""
    slots = code.available_slots()
    rate = min(1.0, flips / max(1, len(slots)))
    chosen: Set[Slot] = {s for s in slots if rng.random() < rate} or {rng.choice(slots)}
    return code.with_bits([[1 - b if (l, o) in chosen else b for o, b in enumerate(row)]
                           for l, row in enumerate(code.bits)])


def availability_mask(template: ArchCode) -> torch.Tensor:
    mask = torch.zeros(len(template.layers), len(template.ops), dtype=torch.bool)
    for l, o in template.available_slots():
        mask[l, o] = True
    return mask


def sample_from_supernet(template: ArchCode, alpha: torch.Tensor, beta: torch.Tensor, budget: int,
                         generator: torch.Generator, a0: float = 0.5) -> ArchCode:
    """Eq. 8-10: a code drawn from the SuperNet's architecture parameters.

    ``a' = sigmoid(alpha)`` (L x O) and ``b' = sigmoid(beta)`` (L). Each gets uniform noise from
    ``(a0 - max, a0 - min)`` of its own values, where ``a0`` is the initial sigmoid value (0.5), so
    the spread of the noise equals the spread the SuperNet has learned: branches it favours are
    likely, not certain. ``score = (b' + noise_b) * (a' + noise_a)``; the top ``budget`` available
    scores, taken globally over all layers, form the code.
    """
    mask = availability_mask(template)
    a = torch.sigmoid(alpha.detach().float().cpu())
    b = torch.sigmoid(beta.detach().float().cpu())
    avail = a[mask]
    noise_a = _uniform(a.shape, a0 - avail.max().item(), a0 - avail.min().item(), generator)
    noise_b = _uniform(b.shape, a0 - b.max().item(), a0 - b.min().item(), generator)
    score = (b + noise_b).unsqueeze(1) * (a + noise_a)
    score[~mask] = float("-inf")
    k = min(budget, int(mask.sum()))
    top = torch.topk(score.flatten(), k).indices if k > 0 else torch.empty(0, dtype=torch.long)
    bits = torch.zeros(mask.numel(), dtype=torch.long)
    bits[top] = 1
    return template.with_bits(bits.view_as(mask).tolist())


def uniform_code(template: ArchCode, budget: int, generator: torch.Generator) -> ArchCode:
    """The undirected counterpart of :func:`sample_from_supernet`: ``budget`` available slots chosen
    uniformly at random (same count of branches, no use of alpha/beta)."""
    slots = template.available_slots()
    chosen = {slots[i] for i in torch.randperm(len(slots), generator=generator)[:budget].tolist()}
    return template.with_bits([[int((l, o) in chosen) for o in range(len(row))]
                               for l, row in enumerate(template.bits)])


def _uniform(shape, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=generator) * (high - low) + low


@dataclass
class EvolutionConfig:
    """How the next population is made (paper: p_mut = p_cross = 0.5).

    ``keep`` parents survive, ``sampled`` codes come from the SuperNet (Eq. 8-10; with ``sampler``
    ``uniform`` they are uniform random codes of the same size instead), the rest are
    offspring of parents chosen by tournament: a crossover with probability ``p_cross``, then a
    mutation with probability ``p_mut``, independently. A code already in the new population is
    rejected and drawn again, so the population holds distinct codes.
    """

    population: int = 128
    keep: float = 0.25
    sampled: float = 0.25
    p_cross: float = 0.5
    p_mut: float = 0.5
    tournament: int = 2
    max_tries: int = 50
    sampler: str = "directional"


def initial_population(template: ArchCode, size: int, budget: int, rng: random.Random) -> List[ArchCode]:
    """``size`` distinct random codes with exactly ``budget`` branches.

    Near the capacity there are too few such codes (at budget = capacity only the full code), so
    the rest are drawn with one branch fewer, then two, and so on: "at most C" stays the rule and
    the population stays as large as asked (fewer only if the whole space is smaller).
    """
    codes: List[ArchCode] = []
    seen: Set[ArchCode] = set()
    for count in range(budget, -1, -1):
        # a count with fewer than 20 * size distinct codes is mostly exhausted by these tries
        for _ in range(size * 20):
            if len(codes) == size:
                return codes
            code = ArchCode.random(template.backbone, ops=template.ops, count=count, seed=rng.getrandbits(64))
            if code not in seen:
                seen.add(code)
                codes.append(code)
    return codes


def next_population(parents: Sequence[ArchCode], fitness: Sequence[float], budget: int,
                    config: EvolutionConfig, rng: random.Random, generator: torch.Generator,
                    alpha: torch.Tensor, beta: torch.Tensor) -> List[ArchCode]:
    """Kept parents + SuperNet samples + crossover/mutation offspring, all distinct and within budget."""
    order = sorted(range(len(parents)), key=lambda i: -fitness[i])
    size = config.population
    n_keep = max(1, int(round(config.keep * size)))
    n_sampled = int(round(config.sampled * size))
    scores = (torch.sigmoid(alpha.detach().float().cpu()) * torch.sigmoid(beta.detach().float().cpu()).unsqueeze(1))
    out: List[ArchCode] = []
    seen: Set[ArchCode] = set()

    def add(code: ArchCode) -> bool:
        if code in seen:
            return False
        seen.add(code)
        out.append(code)
        return True

    for i in order[:n_keep]:
        add(parents[i])
    template = parents[0]
    for _ in range(n_sampled * config.max_tries):
        if len(out) >= n_keep + n_sampled:
            break
        if config.sampler == "uniform":
            add(uniform_code(template, budget, generator))
        else:
            add(sample_from_supernet(template, alpha, beta, budget, generator))

    def pick() -> ArchCode:
        contenders = [rng.randrange(len(parents)) for _ in range(config.tournament)]
        return parents[max(contenders, key=lambda i: fitness[i])]

    for _ in range(size * config.max_tries):
        if len(out) >= size:
            break
        child = pick()
        if rng.random() < config.p_cross:
            child = crossover(child, pick(), rng)
        if rng.random() < config.p_mut:
            child = mutate(child, rng)
        add(repair(child, budget, rng, scores))
    return out
