"""BatchNorm recalibration before a code is scored (SearchConfig.recalibrate): the statistics are the
code's own, the SuperNet gets its own back, and a search that recalibrates trains the same SuperNet."""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from irep_deploy import ArchCode, build_model, fuse_model, load_checkpoint
from irep_deploy.data import eval_loader, load_data
from irep_deploy.evaluation import evaluate_models
from irep_deploy.search.des import make_config, recalibration_batches, search
from irep_deploy.search.supernet import SuperNet, recalibrated

NAME = "resnet18_cifar"


def _bn_state(model: nn.Module):
    return [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked), m.momentum)
            for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_statistics_are_the_average_over_the_batches_and_come_back_after():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3)
    net = nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)
    batches = [torch.randn(6, 3, 5, 5) + i for i in range(3)]
    with torch.no_grad():
        feats = [conv(x) for x in batches]
    with recalibrated(net, batches):
        assert not net.training  # the caller's mode inside the block too
        expected_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
        expected_var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1) for f in feats]).mean(0)
        assert torch.allclose(bn.running_mean, expected_mean, atol=1e-5)
        assert torch.allclose(bn.running_var, expected_var, atol=1e-4)
    assert torch.equal(bn.running_mean, torch.full((4,), 5.0)) and torch.equal(bn.running_var, torch.full((4,), 7.0))
    assert bn.momentum == 0.3 and not net.training


def test_a_code_fused_inside_keeps_its_statistics_and_the_supernet_is_unchanged():
    torch.manual_seed(0)
    supernet = SuperNet(build_model(NAME, supernet=True, width=0.125).eval())
    before = _bn_state(supernet.model)
    code = ArchCode.random(NAME, ratio=0.5, seed=1)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    x = torch.randn(4, 3, 16, 16)
    supernet.activate(code)
    with torch.no_grad():
        plain_stats = supernet.model(x)
        with recalibrated(supernet.model, batches):
            own_stats = supernet.model(x)  # eval mode, the code's own statistics
            fused = fuse_model(supernet.model, arch=code)
        again = supernet.model(x)
        out = fused(x)
    assert not torch.allclose(own_stats, plain_stats, atol=1e-3)  # the statistics did change the output
    assert torch.allclose(out, own_stats, rtol=1e-4, atol=1e-4)  # the fused copy kept them
    assert torch.equal(again, plain_stats)
    for (m0, v0, n0, p0), (m1, v1, n1, p1) in zip(before, _bn_state(supernet.model)):
        assert torch.equal(m0, m1) and torch.equal(v0, v1) and n0 == n1 and p0 == p1


def test_a_recalibrating_search_trains_the_same_supernet_and_records_recalibrated_fitness(tmp_path):
    settings = dict(dataset="digits", width=0.125, population=4, subnets=2, warmup_epochs=1, rounds=1,
                    batch_size=64, limit=320, seed=3, deterministic=True)
    runs = {}
    for n in (0, 3):
        runs[n] = tmp_path / "recal{}".format(n)
        search(runs[n], make_config("cpu", recalibrate=n, **settings), device="cpu", progress=False)
    weights = [load_checkpoint(runs[n] / "supernet.pt").build().state_dict() for n in (0, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # scoring never touches training
    pops = [json.loads((runs[n] / "population.json").read_text())["codes"] for n in (0, 3)]
    fitness = [{"".join(c["bits"]): c["fitness"] for c in pop} for pop in pops]  # population.json sorts by fitness
    assert set(fitness[0]) == set(fitness[1]) and fitness[0] != fitness[1]
    # rescore the recalibrating search's population by hand: the same numbers
    config = make_config("cpu", recalibrate=3, **settings)
    data = load_data("digits", val_fraction=config.val_fraction, split_seed=config.split_seed, limit=config.limit,
                     parts=("train", "val"))
    supernet = SuperNet(load_checkpoint(runs[3] / "supernet.pt").build())
    batches = recalibration_batches(data.train, config.batch_size, 3, config.seed, torch.device("cpu"))
    assert len(batches) == 3
    fused = []
    for c in pops[1]:
        code = ArchCode.full(NAME).with_bits([[int(ch) for ch in row] for row in c["bits"]])
        supernet.activate(code)
        with recalibrated(supernet.model, batches):
            fused.append(fuse_model(supernet.model, arch=code))
    results, _, _ = evaluate_models(fused, eval_loader(data.val, config.eval_batch_size), torch.device("cpu"))
    assert [r.top1 for r in results] == [c["fitness"] for c in pops[1]]
