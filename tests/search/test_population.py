"""DES population operators: budgets, availability, Eq. 8-10 direction, next-population make-up."""
from __future__ import annotations

import random

import torch

from irep_deploy import ArchCode
from irep_deploy.search.population import (EvolutionConfig, crossover, initial_population, mutate,
                                           next_population, repair, sample_from_supernet, uniform_code)

NAME = "vgg16_cifar"  # has unavailable slots (identity where channels change)
FULL = ArchCode.full(NAME)
BUDGET = FULL.budget(2 / 3)


def unavailable_clear(code: ArchCode) -> bool:
    slots = set(code.available_slots())
    return all(not b or (l, o) in slots for l, row in enumerate(code.bits) for o, b in enumerate(row))


def test_repair_enforces_the_budget_and_prefers_low_scores():
    rng = random.Random(0)
    assert repair(FULL, BUDGET, rng).count() == BUDGET
    scores = torch.zeros(len(FULL.layers), len(FULL.ops))
    scores[:, 0] = 1.0  # op 0 is the SuperNet's favourite
    kept = repair(FULL, len(FULL.layers), rng, scores)
    assert kept.count() == len(FULL.layers) and kept.op_counts()[FULL.ops[0]] == len(FULL.layers)
    small = ArchCode.random(NAME, count=5, seed=1)
    assert repair(small, BUDGET, rng) is small


def test_crossover_takes_whole_rows_from_the_parents():
    rng = random.Random(1)
    a, b = ArchCode.random(NAME, seed=1), ArchCode.random(NAME, seed=2)
    child = crossover(a, b, rng)
    assert all(rc in (ra, rb) for rc, ra, rb in zip(child.bits, a.bits, b.bits))
    assert child != a and child != b


def test_mutation_flips_available_bits_only():
    rng = random.Random(2)
    for seed in range(20):
        code = ArchCode.random(NAME, seed=seed)
        child = mutate(code, rng)
        assert child != code and unavailable_clear(child)


def test_sampling_follows_the_supernet_direction():
    gen = torch.Generator().manual_seed(0)
    L, O = len(FULL.layers), len(FULL.ops)
    alpha = torch.full((L, O), -5.0)
    alpha[:, 2] = 5.0  # the SuperNet has learned to like conv1x1 everywhere
    code = sample_from_supernet(FULL, alpha, torch.zeros(L), L, gen)
    assert code.count() == L and code.op_counts()["conv1x1"] == L
    # with all parameters still equal (start of the search) the noise has no spread: any code of size C
    flat = sample_from_supernet(FULL, torch.zeros(L, O), torch.zeros(L), BUDGET, gen)
    assert flat.count() == BUDGET and unavailable_clear(flat)


def test_sampling_is_random_but_biased():
    gen = torch.Generator().manual_seed(1)
    L, O = len(FULL.layers), len(FULL.ops)
    alpha = torch.linspace(-1, 1, O).repeat(L, 1)  # later ops slightly favoured
    counts = torch.zeros(O)
    codes = set()
    for _ in range(50):
        code = sample_from_supernet(FULL, alpha, torch.zeros(L), BUDGET, gen)
        codes.add(code)
        counts += torch.tensor([code.op_counts()[op] for op in FULL.ops], dtype=torch.float)
    assert len(codes) > 40  # noise makes codes differ
    assert counts[-2] > counts[0]  # but the favoured ops are kept more often


def test_initial_and_next_population():
    rng, gen = random.Random(3), torch.Generator().manual_seed(3)
    pop = initial_population(FULL, 16, BUDGET, rng)
    assert len(set(pop)) == 16 and all(c.count() == BUDGET for c in pop)
    fitness = [float(i) for i in range(16)]
    config = EvolutionConfig(population=16)
    L, O = len(FULL.layers), len(FULL.ops)
    nxt = next_population(pop, fitness, BUDGET, config, rng, gen, torch.randn(L, O), torch.randn(L))
    assert len(nxt) == 16 and len(set(nxt)) == 16
    assert all(c.count() <= BUDGET and unavailable_clear(c) for c in nxt)
    assert set(pop[-4:]) <= set(nxt)  # the four fittest parents survive


def test_initial_population_at_full_budget_is_as_large_as_asked():
    # budget = capacity: the full code is the only one with exactly C branches, so the rest carry
    # one branch fewer (there are `capacity` of those), all distinct and available.
    capacity = FULL.capacity()
    pop = initial_population(FULL, 16, capacity, random.Random(0))
    assert len(set(pop)) == 16 and FULL in pop
    assert sorted(c.count() for c in pop) == [capacity - 1] * 15 + [capacity]
    assert all(unavailable_clear(c) for c in pop)
    # a space smaller than the population (budget 0: only the empty code) is returned once
    assert initial_population(FULL, 16, 0, random.Random(0)) == [ArchCode.empty(NAME)]


def _sampled_share(sampler: str):
    """The SuperNet-sampled part of a next population, with alpha strongly favouring conv1x1."""
    L, O = len(FULL.layers), len(FULL.ops)
    alpha = torch.full((L, O), -5.0)
    alpha[:, 2] = 5.0
    pop = initial_population(FULL, 16, BUDGET, random.Random(4))
    config = EvolutionConfig(population=16, keep=0.25, sampled=0.5, sampler=sampler)
    nxt = next_population(pop, [float(i) for i in range(16)], BUDGET, config, random.Random(5),
                          torch.Generator().manual_seed(5), alpha, torch.zeros(L))
    return nxt[4:12]  # after the 4 kept parents, 8 sampled codes


def test_uniform_sampler_ignores_the_direction_but_keeps_the_budget():
    directional, uniform = _sampled_share("directional"), _sampled_share("uniform")
    assert all(c.count() == BUDGET and unavailable_clear(c) for c in directional + uniform)
    assert not set(directional) & set(uniform)
    # alpha favours conv1x1: the directional samples fill every layer's conv1x1 slot, uniform ones do not
    L = len(FULL.layers)
    assert all(c.op_counts()["conv1x1"] == L for c in directional)
    assert sum(c.op_counts()["conv1x1"] for c in uniform) < 8 * L * 0.8
    assert _sampled_share("uniform") == uniform  # seeded: the same codes again


def test_uniform_code_is_uniform_over_available_slots():
    gen = torch.Generator().manual_seed(2)
    hits = torch.zeros(len(FULL.layers), len(FULL.ops))
    codes = [uniform_code(FULL, BUDGET, gen) for _ in range(200)]
    for code in codes:
        hits += torch.tensor(code.bits, dtype=torch.float)
    assert len(set(codes)) == 200 and all(c.count() == BUDGET and unavailable_clear(c) for c in codes)
    expected = 200 * BUDGET / FULL.capacity()
    used = hits[hits > 0]
    assert len(used) == FULL.capacity() and (used - expected).abs().max() < 0.5 * expected
