"""The SuperNet runs B subnets per step; switching codes matches building each subnet on its own."""
from __future__ import annotations

import torch
import torch.nn as nn

from irep_deploy import ArchCode, apply_arch, build_model
from irep_deploy.search.supernet import SuperNet, averaged_loss

NAME = "resnet18_cifar"


def test_forward_of_b_codes_equals_each_subnet():
    torch.manual_seed(0)
    net = SuperNet(build_model(NAME, supernet=True, width=0.125).eval())
    codes = [ArchCode.random(NAME, ratio=0.5, seed=s) for s in range(3)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        outs = net(x, codes)
        for code, out in zip(codes, outs):
            apply_arch(net.model, code)
            assert torch.equal(out, net.model(x))
    assert net.alpha().shape == (17, 8) and net.beta().shape == (17,)


def test_one_step_updates_only_branches_of_the_sampled_codes():
    torch.manual_seed(0)
    net = SuperNet(build_model(NAME, supernet=True, width=0.125).train())
    codes = [ArchCode.random(NAME, count=3, seed=s) for s in range(2)]
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loss = averaged_loss(net(x, codes), y, nn.CrossEntropyLoss())
    loss.backward()
    used = {(name, op) for code in codes for name, row in zip(code.layers, code.bits)
            for op, b in zip(code.ops, row) if b}
    for (name, block) in zip(codes[0].layers, net.blocks):
        for op, branch in block.branches.items():
            has_grad = next(branch.parameters()).grad is not None
            assert has_grad == ((name, op) in used), (name, op)
    arch_ids = {id(p) for p in net.arch_parameters()}
    assert all(id(p) not in arch_ids for p in net.weight_parameters())
    assert len(arch_ids) == 2 * len(net.blocks)
