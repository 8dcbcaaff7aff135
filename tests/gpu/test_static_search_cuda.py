"""The search's static step captured in a CUDA graph (issue 23): ``search --search-step batched|sequential
--cuda-graph on`` on a real GPU.

The step is built as the search builds it (``_Search._static_step``: StaticSearchStep with
make_capturable's fused optimizers and device schedule, in a StepGraph) and run over 20 steps of real
data (sklearn digits) with codes that change at every step (population codes at 2/3, sparse codes,
the empty code, the full code, mixed steps): captured it equals the same step run eagerly on the GPU
(float64 to 1e-8; float32 and bf16 autocast within what float rounding moves the eager step itself),
its replays read nothing on the host, a replayed step leaves every branch no code held bit for bit,
and a whole search captures, finishes and resumes with the eager step. Skipped without CUDA
(tests/conftest.py); `make test-gpu` runs them. Written without a GPU at hand: none of these has run yet.
"""
from __future__ import annotations

import math
import random
from typing import Any, Dict, Iterator, List, Tuple

import pytest
import torch

from irep_deploy.cli import main
from irep_deploy.data import load_data, set_epoch, train_loader
from irep_deploy.graphs import WARMUP
from irep_deploy.runs import read_run_state
from irep_deploy.runtime import Dist
from irep_deploy.search.des import SearchConfig, _Search, make_config, search
from static_step_checks import assert_states_close, code_sets, state_tensors, unheld_moved

from .test_graph_cuda import _deterministic_cudnn

# tests/conftest.py marks every test under tests/gpu `cuda` and skips it, with the reason, without CUDA.
pytest.importorskip("sklearn")  # digits

DEVICE = torch.device("cuda")
LAYOUTS = ("sequential", "batched")
STEPS = 20
TIMES = 100  # yardsticks a captured float32/bf16 step may be off (test_..._stays_within_float_rounding_...)
# tests/search/test_static_step.py's search: B = 3 codes per step on the tiny resnet18_cifar
SETTINGS = dict(backbone="resnet18_cifar", dataset="digits", width=0.125, population=8, subnets=3,
                warmup_epochs=1, rounds=1, round_epochs=1, batch_size=32, seed=5)


def _job(tmp_path, name: str, layout: str, capture: bool, **overrides: Any) -> _Search:
    config = make_config(None, **dict(SETTINGS, **overrides))
    job = _Search(tmp_path / name, config, DEVICE, Dist(), None, progress=False, search_step=layout,
                  cuda_graph="on" if capture else "off")
    assert job.static == layout and job.capture == capture
    return job


def _batches(dtype: torch.dtype = torch.float32, count: int = STEPS,
             layout: torch.memory_format = torch.contiguous_format) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``count`` augmented training batches of digits on the GPU, the same for every run of a test."""
    data = load_data("digits", None)
    loader = train_loader(data.train, SETTINGS["batch_size"], seed=3)  # 1437 examples: 44 batches of 32
    set_epoch(loader, 3, 0)
    return [(x.to(DEVICE, dtype).contiguous(memory_format=layout), y.to(DEVICE)) for _, (x, y) in zip(range(count), loader)]


@torch.no_grad()
def _copy_state(dst: _Search, src: _Search) -> None:
    """``dst`` takes ``src``'s SuperNet and optimizer state, in place (a captured step reads those very
    tensors), converted to ``dst``'s dtype."""
    theirs = state_tensors(src)
    for key, tensor in state_tensors(dst).items():
        tensor.copy_(theirs[key])


def _lockstep(tmp_path, layout: str, dtype: torch.dtype = torch.float32, reference: bool = False,
              **overrides: Any) -> Iterator[Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]]:
    """STEPS steps of the search's own static step (``_Search._static_step``), run eagerly on the GPU
    and captured (and, with ``reference``, eagerly in float64 without autocast), each step from the
    state the eager run has reached: every pair of steps starts equal, so what a step yields
    ([losses], [states]: eager, captured[, reference]) differs by that one step's arithmetic alone.
    (Runs left to go their own way drift apart: at lr 0.1 a float32 rounding difference grows to a
    tenth of the loss within ten steps, which would hide any error of the capture.)"""
    channels_last = overrides.get("channels_last", False)
    jobs = [_job(tmp_path, "eager", layout, False, **overrides), _job(tmp_path, "captured", layout, True, **overrides)]
    if reference:
        plain = {k: v for k, v in overrides.items() if k not in ("amp", "channels_last")}
        jobs.append(_job(tmp_path, "reference", layout, False, **plain))
        jobs[-1].supernet.model.double()  # before its step is built: the optimizers' up-front state follows
    if dtype == torch.float64:
        for job in jobs[:2]:
            job.supernet.model.double()
    steps = [job._static_step() for job in jobs]
    batches = _batches(dtype, layout=torch.channels_last if channels_last else torch.contiguous_format)
    for (x, y), chosen in zip(batches, code_sets(jobs[0], random.Random(1))):
        for job in jobs[1:]:
            _copy_state(job, jobs[0])
        losses = []
        for job, (graph, _, stepper) in zip(jobs, steps):
            xin = x.double().contiguous() if job is jobs[-1] and reference else x
            losses.append(graph(xin, y, stepper.gates(chosen))[0].detach().double().clone())
        yield losses, [{k: v.detach().clone() for k, v in state_tensors(job).items()} for job in jobs]
    assert steps[0][0].captured is False and steps[1][0].captured is True
    for job, (_, schedule, _) in zip(jobs, steps):
        schedule.sync_to_scheduler()
        assert job.sched.last_epoch == STEPS


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_captured_static_step_equals_it_run_eagerly_in_float64(tmp_path, layout):
    """float64, so that only what the capture changes could show: every step of the 20, from equal
    states, to the 1e-8 that tests/search/test_static_step.py holds the static step to the eager
    search step on the CPU (here the same arithmetic on both sides: cuDNN deterministic)."""
    with _deterministic_cudnn():
        for step, ((eager_loss, graph_loss), (eager, graph)) in enumerate(_lockstep(tmp_path, layout, torch.float64)):
            assert torch.isfinite(graph_loss) and torch.allclose(graph_loss, eager_loss, rtol=1e-10, atol=0), step
            assert set(graph) == set(eager)
            assert_states_close(graph, eager, "step {}".format(step + 1), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("amp", ["none", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_captured_static_step_stays_within_float_rounding_of_it_run_eagerly(tmp_path, layout, amp):
    """float32 (TF32 off) and bf16 autocast + channels_last, every step of the 20 from equal states.
    The yardstick is the step's own rounding: how far the eager step in this precision ends from the
    same step in float64, tensor by tensor. A capture may change the rounding (other kernels, another
    order of sums) but not the arithmetic: the CPU's other order of sums (the sequential against the
    batched layout, both eager) came within 16 yardsticks on every tensor and step (float32; 3.5 in
    bf16), a stale input (the previous step's codes) 1e6 to 1e8 yardsticks off. So: within 100
    yardsticks, or a few units in the last place of the tensor's largest value. Integer state
    (BatchNorm batch counts) is exact."""
    extra = dict(amp="bf16", channels_last=True) if amp == "bf16" else {}
    ulps = 4 * torch.finfo(torch.float32).eps
    with _deterministic_cudnn():
        for step, (losses, (eager, graph, reference)) in enumerate(_lockstep(tmp_path, layout, reference=True,
                                                                             **extra)):
            eager_loss, graph_loss, ref_loss = losses
            assert torch.isfinite(graph_loss), step
            assert abs(graph_loss - eager_loss) <= TIMES * abs(eager_loss - ref_loss) + ulps * abs(eager_loss), step
            rounded = 0
            for key, value in eager.items():
                if not value.is_floating_point():
                    assert torch.equal(graph[key], value), (step, key)
                    continue
                ours = float((graph[key].double() - value.double()).abs().max()) if value.numel() else 0.0
                yardstick = float((value.double() - reference[key]).abs().max()) if value.numel() else 0.0
                rounded += yardstick > 0
                floor = ulps * (float(value.abs().max()) if value.numel() else 0.0)
                assert ours <= TIMES * yardstick + floor, (step, key, ours, yardstick)
            assert rounded > 0, step  # the precision does round: the yardstick measures something


@pytest.mark.parametrize("layout,amp", [("sequential", "none"), ("batched", "none"), ("batched", "fp16")])
def test_replays_of_the_static_step_read_nothing_on_the_host(tmp_path, layout, amp):
    """fp16: the gradient scaler's skip and update stay on the device (fused optimizers)."""
    job = _job(tmp_path, "sync", layout, True, amp=amp)
    graph, schedule, stepper = job._static_step()
    batches = _batches(count=12)
    # the gates are uploaded before: a pageable host-to-device copy waits for it, which is the
    # epoch loop's business (run_graph_epoch), not the replay's
    gates = [stepper.gates(chosen) for chosen, _ in zip(code_sets(job, random.Random(1)), batches)]
    for (x, y), g in zip(batches[:WARMUP + 1], gates):  # the warm-up steps and the capture
        graph(x, y, g)
    assert graph.captured
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for (x, y), g in zip(batches[WARMUP + 1:], gates[WARMUP + 1:]):
            graph(x, y, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    schedule.sync_to_scheduler()
    assert job.sched.last_epoch == len(batches)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_replayed_step_leaves_every_branch_no_code_held_bit_for_bit(tmp_path, layout):
    job = _job(tmp_path, "held", layout, True)
    graph, _, stepper = job._static_step()
    checked = replays = 0
    for (x, y), chosen in zip(_batches(), code_sets(job, random.Random(1))):
        replay = graph.captured  # this call replays (the calls before warm up and capture)
        before = {k: v.clone() for k, v in state_tensors(job).items()}
        graph(x, y, stepper.gates(chosen))
        after = state_tensors(job)
        if not replay:
            continue
        replays += 1
        assert any(not torch.equal(after[k], before[k]) for k in after), "a replay changed nothing"
        count, moved = unheld_moved(job, chosen, before, after)
        assert not moved, "replay {}: {} moved although no code held them".format(replays, moved)
        checked += count
    assert replays == STEPS - WARMUP - 1 and checked > 0


class _Stop(Exception):
    pass


def test_a_captured_search_finishes_and_its_state_resumes_with_the_eager_step(tmp_path, capsys, monkeypatch):
    """`search --search-step batched --cuda-graph on` end to end (the `cpu` preset on digits, 3 epochs:
    a warm-up and two rounds), then the same search stopped after its second epoch and resumed with
    ``search_step="eager"``: the captured run saves its optimizers as the eager step saves them."""
    flags = ["--preset", "cpu", "--dataset", "digits", "--rounds", "2", "--device", "cuda", "--quiet"]
    full_dir = tmp_path / "full"
    rc = main(["search", "-o", str(full_dir), *flags, "--search-step", "batched", "--cuda-graph", "on"])
    assert rc == 0, capsys.readouterr().err
    full, _ = read_run_state(full_dir, "search", SearchConfig)
    assert full["epoch"] == 3 and len(full["rounds"]) == 2
    for part in ("w_opt", "a_opt"):  # the eager step's format: float lr, unfused
        group = full[part]["param_groups"][0]
        assert isinstance(group["lr"], float) and not group.get("fused") and not group.get("capturable")

    config = make_config("cpu", dataset="digits", rounds=2)
    seen = []
    save = _Search.save

    def save_then_stop(job: _Search) -> None:
        save(job)
        seen.append((job.static, job.capture, job._graph is not None and job._graph.captured))
        if job.epoch == 2:
            raise _Stop()

    monkeypatch.setattr(_Search, "save", save_then_stop)
    run = tmp_path / "resumed"
    with pytest.raises(_Stop):
        search(run, config, device="cuda", progress=False, search_step="batched", cuda_graph="on")
    monkeypatch.undo()
    assert seen == [("batched", True, True)] * 2
    resumed = search(run, resume=True, device="cuda", progress=False, search_step="eager")
    assert resumed.resumed_from_epoch == 2 and len(resumed.rounds) == 2
    assert all(math.isfinite(r["mean_fitness"]) and 0 < r["best_fitness"] <= 100 for r in resumed.rounds)
    state, _ = read_run_state(run, "search", SearchConfig)
    assert state["epoch"] == 3 and state["sched"]["last_epoch"] == full["sched"]["last_epoch"]
    assert state["sched"]["_last_lr"] == pytest.approx(full["sched"]["_last_lr"], rel=1e-9)
