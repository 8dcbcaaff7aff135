"""What the static search step's tests share: tests/search/test_static_step.py (on the CPU, against
the eager step) and tests/gpu/test_static_search_cuda.py (on CUDA, captured against eager).

A search job (``search.des._Search``) gives the codes; these helpers say which codes a step meets,
a job's state as named tensors, how far two such states are apart, and which tensors of branches no
code of a step held have moved (``from static_step_checks import ...``: tests/ is on sys.path, as
for ``from conftest import ...``)."""
from __future__ import annotations

import itertools
import random
from typing import Any, Dict, Iterator, List, Tuple

import torch

from irep_deploy import ArchCode
from irep_deploy.binding import plan_arch
from irep_deploy.search.population import initial_population

State = Dict[str, torch.Tensor]


def code_sets(job: Any, rng: random.Random) -> Iterator[List[ArchCode]]:
    """The B codes of each step, a different kind at every step in turn: the population's (at 2/3),
    sparse ones that leave whole blocks (alpha/beta included) untrained, the empty code, the full one,
    and a step that mixes a population code, a sparse one and the empty one."""
    template = job.template
    sparse = initial_population(template, 6, max(1, template.budget(0.1)), rng)
    empty = ArchCode.empty(template.backbone, template.ops)
    subnets = job.config.subnets

    def pick(pool: List[ArchCode]) -> ArchCode:
        return pool[rng.randrange(len(pool))]

    kinds = [lambda: [pick(job.population) for _ in range(subnets)],
             lambda: [pick(sparse) for _ in range(subnets)],
             lambda: [empty] * subnets,
             lambda: [template] * subnets,
             lambda: [[pick(job.population), pick(sparse), empty][i % 3] for i in range(subnets)]]
    for step in itertools.count():
        yield kinds[step % len(kinds)]()


def state_tensors(job: Any) -> State:
    """Every tensor a step may change: the SuperNet's state dict (``model.NAME``) and the optimizers'
    state (``w.NAME.KEY`` for the weights' SGD, ``a.NAME.KEY`` for alpha/beta's Adam). The live
    tensors: clone them to keep a copy."""
    out = {"model." + name: t for name, t in job.supernet.model.state_dict().items()}
    names = {id(p): n for n, p in job.supernet.model.named_parameters()}
    for tag, opt in (("w", job.w_opt), ("a", job.a_opt)):
        for p, state in opt.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    out["{}.{}.{}".format(tag, names[id(p)], key)] = value
    return out


def assert_states_close(a: State, b: State, what: str, rtol: float, atol: float) -> None:
    """``a`` and ``b`` equal within (rtol, atol), compared in float64. A key on one side only must be
    an optimizer state that is all zeros: the static step creates up front, as zeros, what the eager
    step creates at a parameter's first gradient."""
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b:
            other = a.get(key, b.get(key))
            assert key.startswith(("w.", "a.")) and not torch.any(other != 0), "{}: {} only on one side".format(what, key)
            continue
        x, y = a[key].double(), b[key].double()
        assert torch.allclose(x, y, rtol=rtol, atol=atol), "{}: {} differs by {:.3g}".format(
            what, key, float((x - y).abs().max()))


def relative_gap(a: State, b: State) -> float:
    """The largest difference of a floating-point tensor of ``a`` from its namesake in ``b``, relative
    to that tensor's largest magnitude in ``b`` (both states hold the same keys)."""
    gaps = [float((a[k].double() - b[k].double()).abs().max()) / max(float(b[k].double().abs().max()), 1e-12)
            for k in b if b[k].is_floating_point() and b[k].numel()]
    return max(gaps)


def unheld_moved(job: Any, chosen: List[ArchCode], before: State, after: State) -> Tuple[int, List[str]]:
    """(how many tensors were checked, which of them differ from ``before``): the tensors of every
    branch no code of ``chosen`` holds (weights, BatchNorm statistics, momentum buffers), and alpha,
    beta and their Adam state of every block in which no code holds a branch."""
    model = job.supernet.model
    names = {id(m): n for n, m in model.named_modules()}
    held: List[set] = [set() for _ in job.supernet.blocks]
    for code in chosen:
        for ops, (_, planned) in zip(held, plan_arch(model, code)):
            ops.update(planned)
    prefixes: List[str] = []
    for block, ops in zip(job.supernet.blocks, held):
        name = names[id(block)]
        prefixes += ["{}.branches.{}.".format(name, op) for op in block.branches if op not in ops]
        if not ops:
            prefixes += [name + ".alpha", name + ".beta"]
    keys = [k for k in after if k.split(".", 1)[1].startswith(tuple(prefixes))] if prefixes else []
    return len(keys), [k for k in keys if not torch.equal(after[k], before[k])]
