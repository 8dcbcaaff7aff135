"""Population evaluation reads the validation split once and scores as the per-code path did; the fp16
scaler copes with steps whose codes have no branch (issue 15, items 7 and 11). Real data: digits."""
from __future__ import annotations

import math

import pytest
import torch

from irep_deploy import ArchCode
from irep_deploy.data import Transformed, eval_loader
from irep_deploy.reparam import fuse_model
from irep_deploy.search.des import _Search, make_config
from irep_deploy.evaluation import evaluate_models
from irep_deploy.runtime import Dist

pytest.importorskip("sklearn")  # digits


class CountingTransformed(Transformed):
    """The validation split as the search builds it, counting every example read and transformed."""

    reads = 0

    def __getitem__(self, index):
        CountingTransformed.reads += 1
        return super().__getitem__(index)


def _job(tmp_path, **overrides):
    torch.set_num_threads(1)
    settings = dict(backbone="resnet18_cifar", dataset="digits", width=0.125, population=6, subnets=2,
                    warmup_epochs=0, rounds=1, round_epochs=1, batch_size=64, limit=640, eval_batch_size=50, seed=3)
    settings.update(overrides)
    return _Search(tmp_path, make_config(None, **settings), torch.device("cpu"), Dist(), None, progress=False)


def test_population_reads_the_validation_split_once_and_scores_as_the_per_code_path(tmp_path):
    job = _job(tmp_path)
    job.train_epoch()  # trained weights and BatchNorm statistics, not the initial ones
    val = job.data.val
    counting = CountingTransformed(val.base, val.transform)
    job.val_loader = eval_loader(counting, job.config.eval_batch_size)
    CountingTransformed.reads = 0
    fitness = job.evaluate_population()
    assert CountingTransformed.reads == len(val)  # once for 6 codes (the per-code path read it 6 times)
    assert job.evaluate_population() == fitness  # the next round reuses the decoded split
    assert CountingTransformed.reads == len(val)
    # the per-code path: fuse each code and evaluate it on a fresh pass over the loader
    reference = []
    for code in job.population:
        (res,), _, _ = evaluate_models([fuse_model(job.supernet.model, arch=code)],
                                       eval_loader(val, job.config.eval_batch_size), torch.device("cpu"))
        reference.append(res.top1)
    assert fitness == reference  # identical, not approximately equal
    assert len(set(fitness)) > 1  # the codes are told apart


def test_population_in_chunks_when_the_split_does_not_fit(tmp_path, monkeypatch):
    """Too large to keep: read once per round in chunks, every code scored on each chunk."""
    import irep_deploy.search.des as des

    job = _job(tmp_path)
    whole = job.evaluate_population()
    val = job.data.val
    counting = CountingTransformed(val.base, val.transform)
    job.val_loader = eval_loader(counting, job.config.eval_batch_size)
    job._val_cache = None
    monkeypatch.setattr(des, "VAL_CACHE_HOST_BYTES", 1)  # every batch is a chunk of its own
    CountingTransformed.reads = 0
    assert job.evaluate_population() == whole
    assert job.evaluate_population() == whole
    assert CountingTransformed.reads == 2 * len(val) and job._val_cache is None


def test_fp16_scaler_steps_when_no_sampled_code_has_a_branch(tmp_path):
    """All B codes without branches: alpha/beta get no gradient. The gradient scaler (fp16's) must
    skip their optimizer instead of raising "No inf checks were recorded for this optimizer"."""
    if not (hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler")):
        pytest.skip("torch.amp.GradScaler (torch >= 2.3) is needed for a gradient scaler on CPU")
    job = _job(tmp_path, population=2, limit=256)
    job.scaler = torch.amp.GradScaler("cpu")  # the fp16 step path, on CPU
    job.population = [ArchCode.empty(job.template.backbone, job.template.ops)] * 2
    arch_before = [p.detach().clone() for p in job.supernet.arch_parameters()]
    weights_before = [p.detach().clone() for p in job.supernet.weight_parameters()]
    record = job.train_epoch()
    assert math.isfinite(record.train_loss)
    assert all(torch.equal(a, p) for a, p in zip(arch_before, job.supernet.arch_parameters()))
    assert any(not torch.equal(w, p) for w, p in zip(weights_before, job.supernet.weight_parameters()))


def _rounds(tmp_path, strategy: str):
    """The populations a search scores in three rounds (untrained SuperNet: only the bookkeeping matters)."""
    job = _job(tmp_path / strategy, population=8, rounds=3, strategy=strategy)
    scored = []
    for round_no in (1, 2, 3):
        scored.append(list(job.population))
        job.finish_round(round_no)
    return job, scored


def test_random_strategy_scores_as_many_fresh_codes_as_des(tmp_path):
    des, des_rounds = _rounds(tmp_path, "des")
    rnd, rnd_rounds = _rounds(tmp_path, "random")
    assert [len(set(p)) for p in rnd_rounds] == [len(set(p)) for p in des_rounds] == [8, 8, 8]
    assert rnd_rounds[0] == des_rounds[0]  # the same initial population
    budget = rnd.budget
    assert all(c.count() == budget for p in rnd_rounds for c in p)  # fresh codes at the budget
    for before, after in zip(rnd_rounds, rnd_rounds[1:]):
        assert not set(before) & set(after)  # nothing carried over
    for before, after in zip(des_rounds, des_rounds[1:]):
        assert set(before) & set(after)  # DES keeps its fittest parents
    assert sum(len(h) for h in rnd.history.values()) == 24  # every scored code is in the history
