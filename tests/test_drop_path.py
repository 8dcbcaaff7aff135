"""Drop-path on the re-parameterization branches (DARTS's, ``--drop-path``) and the rest of the
DARTS recipe ``train`` gained with it (``--cutout`` on real images, ``--grad-clip``): drop-path
changes training and only training; the fused network of a block trained with it equals the
multi-branch network in eval mode."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn as nn

from irep_deploy import ArchCode, load_checkpoint
from irep_deploy.block import IrepConv, set_drop_path
from irep_deploy.compare import FUSE_FP32, compare
from irep_deploy.data import FASHION_MNIST_ROOT, load_data
from irep_deploy.precision import exact_fp32
from irep_deploy.steps import optimizer_step
from irep_deploy.train import TrainConfig, drop_path_at, train

BRANCHES = ("conv1x3", "conv1x1", "dil2x2", "identity")
OPS = BRANCHES


def _block(active=BRANCHES, seed=0):
    torch.manual_seed(seed)
    block = IrepConv(8, 8, ops=OPS, branches=BRANCHES)
    with torch.no_grad():  # distinct branch scales, so a dropped branch is visible in the sum
        block.alpha.copy_(torch.linspace(-1.0, 1.0, len(OPS)))
    block.active = active
    return block.train()


def _input(seed=1, n=16):
    return torch.randn(n, 8, 6, 6, generator=torch.Generator().manual_seed(seed))


def _contributions(block, x):
    """Each active branch's scaled output, per example, as the block adds it (no drop-path)."""
    scales = block.branch_scales()
    index = {op: i for i, op in enumerate(block.ops)}
    with torch.no_grad():
        return {name: scales[index[name]] * block.branches[name](x) for name in block.active}


@pytest.mark.parametrize("active", [BRANCHES, ("conv1x3", "identity")])  # the search switches the active set
def test_each_branch_is_kept_or_dropped_per_example_and_kept_ones_are_rescaled(active):
    p = 0.5
    block = _block(active)
    x = _input()
    with torch.no_grad():
        fixed = block.conv(x)
        parts = _contributions(block, x)
        set_drop_path(block, p)
        torch.manual_seed(3)
        out = block(x)
    # per example, the output is the fixed conv plus each branch either dropped or divided by 1 - p;
    # identity is always kept as it is
    rest = out - fixed - sum(parts[n] for n in parts if n == "identity")
    droppable = [n for n in parts if n != "identity"]
    seen = set()
    for i in range(x.shape[0]):
        matched = None
        for keep in range(2 ** len(droppable)):
            guess = sum((parts[n][i] / (1 - p) if keep >> k & 1 else 0 * parts[n][i])
                        for k, n in enumerate(droppable))
            if torch.allclose(rest[i], guess, rtol=1e-5, atol=1e-5):
                matched = keep
                break
        assert matched is not None, "example {} is no combination of kept/dropped branches".format(i)
        seen.add(matched)
    assert len(seen) > 1  # 16 examples: the draws differ between examples


def test_drop_path_changes_training_forward_and_gradients_reproducibly():
    x = _input()
    results = []
    for p, seed in ((0.0, 3), (0.3, 3), (0.3, 3), (0.3, 4)):
        block = _block()
        set_drop_path(block, p)
        torch.manual_seed(seed)
        out = block(x)
        out.square().mean().backward()
        results.append((out.detach(), block.branches["conv1x3"].conv.weight.grad.clone(), block.alpha.grad.clone()))
    plain, a, b, other = results
    assert not torch.equal(plain[0], a[0]) and not torch.equal(plain[1], a[1]) and not torch.equal(plain[2], a[2])
    for u, v in zip(a, b):  # the same seed draws the same drops
        assert torch.equal(u, v)
    assert not torch.equal(a[0], other[0])


@pytest.mark.parametrize("why,block", [
    ("the fixed conv and identity are never dropped", lambda: _block(active=("identity",))),
    ("eval mode never drops", lambda: _block().eval()),
])
def test_drop_path_leaves_alone(why, block):
    x, block = _input(), block()
    with torch.no_grad():
        reference = block(x)
        set_drop_path(block, 0.9)
        torch.manual_seed(0)
        assert torch.equal(block(x), reference), why


def test_a_block_trained_with_drop_path_fuses_exactly():
    """Trained (BN statistics and weights moved by steps under drop-path), then fused: the one 3x3 conv
    equals the multi-branch block in eval mode within the fusion tolerance, and drop-path left on in
    the module changes neither."""
    block = _block()
    set_drop_path(block, 0.4)
    opt = torch.optim.SGD(block.parameters(), lr=0.05, momentum=0.9)
    torch.manual_seed(5)
    for step in range(5):
        loss = block(_input(seed=10 + step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    block.eval()
    x = _input(seed=99)
    with torch.no_grad(), exact_fp32():
        multi = block(x)
        fused = block.to_conv()(x)
        set_drop_path(block, 0.0)
        assert torch.equal(block(x), multi)
    result = compare(multi.numpy(), fused.numpy(), FUSE_FP32)
    assert result.passed, result.summary


def test_drop_path_under_bf16_autocast_and_channels_last():
    p = 0.5
    block = _block()
    x = _input()
    set_drop_path(block, p)
    with torch.no_grad():
        torch.manual_seed(7)
        reference = block(x)
        torch.manual_seed(7)
        nhwc = block.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = block(x)
    assert torch.allclose(nhwc, reference, rtol=1e-5, atol=1e-5)
    # the same examples dropped: bf16 rounding (about 1e-2 here) is far below a dropped branch's share
    assert (half.float() - reference).abs().max() < 0.05 < (reference - _block()(x)).abs().max()


def test_drop_path_probability_must_be_below_one():
    with pytest.raises(ValueError):
        set_drop_path(_block(), 1.0)


# -- cutout, on real images ---------------------------------------------------------------------------
needs_fmnist = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT),
                                  reason="the Debian package dataset-fashion-mnist is not installed")


@needs_fmnist
def test_cutout_zeroes_one_square_of_its_side_per_image_and_nothing_else():
    side = 16
    plain, cut = (load_data("fashion-mnist", val_fraction=0.5, limit=40, parts=("train", "val"), cutout=n)
                  for n in (0, side))
    full = 0
    for i in range(40):
        torch.manual_seed(i)  # the same crop and flip; cutout draws after them
        a, _ = plain.train[i]
        torch.manual_seed(i)
        b, _ = cut.train[i]
        changed = a != b
        assert changed.any()
        assert torch.all(b[changed] == 0) and torch.equal(a[~changed], b[~changed])
        rows = changed.any(dim=2)[0].nonzero().flatten()
        cols = changed.any(dim=1)[0].nonzero().flatten()
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        assert changed[:, top:bottom, left:right].all()  # one filled rectangle ...
        h, w = a.shape[-2:]
        for lo, hi, size in ((top, bottom, h), (left, right, w)):  # ... a square of `side` cut by the borders
            assert hi - lo == side or (lo == 0 or hi == size) and hi - lo < side
        full += (bottom - top, right - left) == (side, side)
    assert full > 0
    torch.manual_seed(0)
    assert torch.equal(plain.val[0][0], cut.val[0][0])  # evaluation transforms are untouched


# -- gradient clipping ----------------------------------------------------------------------------------
def _step(clip, scaler=None):
    """The weight change of one SGD step (lr 1) of a linear model on a loss with large gradients."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    loss = (model(torch.ones(4, 6)) * 10).square().mean()
    optimizer_step(loss, [opt], sched, scaler, grad_clip=clip)
    return before - torch.cat([p.detach().flatten() for p in model.parameters()])


def test_grad_clip_caps_the_total_gradient_norm_of_a_step():
    free, clipped = _step(0.0), _step(0.5)
    assert free.norm() > 0.5
    assert torch.allclose(clipped.norm(), torch.tensor(0.5), rtol=1e-5)
    assert torch.allclose(clipped, free * (0.5 / free.norm()), rtol=1e-4, atol=1e-6)
    # through a gradient scaler (--amp fp16; a CPU scaler here): the norm is the unscaled gradients'
    scaled = _step(0.5, torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert torch.allclose(scaled, clipped, rtol=1e-5, atol=1e-7)


# -- the training run: ramp, resume, fused check ---------------------------------------------------------
DIGITS = TrainConfig(backbone="resnet18_cifar", arch=ArchCode.random("resnet18_cifar", ratio=0.5, seed=2).dumps(),
                     dataset="digits", width=0.125, epochs=2, batch_size=32, limit=64, seed=1, drop_path=0.5,
                     cutout=4, grad_clip=5.0)


class Stop(Exception):
    pass


def test_a_run_with_drop_path_ramps_resumes_with_it_and_fuses(tmp_path):
    pytest.importorskip("sklearn")  # the digits data ship with scikit-learn
    torch.set_num_threads(1)
    full = train(tmp_path / "full", DIGITS, progress=False, device="cpu")
    records = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["drop_path"] for r in records if r["event"] == "epoch"] == [drop_path_at(DIGITS, e) for e in (0, 1)] \
        == [0.0, 0.25]  # DARTS's linear ramp: epoch e of E drops with p * e / E
    assert full.fused_rel_error <= 1e-4  # the run's own final check: fused vs multi-branch on the test set

    def stop(epoch, record):
        raise Stop()
    with pytest.raises(Stop):
        train(tmp_path / "cut", DIGITS, progress=False, device="cpu", on_epoch_end=stop)
    resumed = train(tmp_path / "cut", resume=True, progress=False, device="cpu")
    assert resumed.resumed_from_epoch == 1
    a, b = load_checkpoint(full.ckpt).state_dict, load_checkpoint(resumed.ckpt).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run dropped the same branches

    without = train(tmp_path / "plain", dataclasses.replace(DIGITS, drop_path=0.0), progress=False, device="cpu")
    c = load_checkpoint(without.ckpt).state_dict
    assert not all(torch.equal(a[k], c[k]) for k in a)  # epoch 2 dropped branches: another network
