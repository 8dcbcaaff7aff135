"""Hostile cases of issue 21, item 2 and the run state: files never cause imports, a spec is checked
before it is called, a corrupt run state or log is one line naming it, and the wrong successes and
crashes of train/search/eval.

``evilmod`` (on the import path of every case) writes a marker when imported: a file that names
``evilmod:factory`` (an architecture code, a checkpoint header, a run's saved settings) must be
refused without importing it, with or without another ``--model``. Run states are edited through
``runs.read_run_state``/``write_run_state`` (the one reader and writer), so the cases hold whatever
format state.pt has. Train/search cases use sklearn's digits (absent from the floor lane: skipped).
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

AREA = "imports"
EVIL = "evilmod:factory"
TINY = "--dataset digits --limit 64 --epochs 1 --width 0.125 --batch-size 32 --quiet"
TINY_SEARCH = ("--dataset digits --limit 64 --width 0.125 --batch-size 32 --population 2 --subnets 1 "
               "--warmup-epochs 0 --rounds 1 --eval-batch-size 64 --quiet")
DROP = object()  # a part to remove from a state
_CACHE: Dict[str, Any] = {}


def _cache_dir() -> Path:
    if "dir" not in _CACHE:
        _CACHE["dir"] = Path(tempfile.mkdtemp(prefix="hostile-imports-"))
        atexit.register(shutil.rmtree, str(_CACHE["dir"]), True)
    return _CACHE["dir"]


def _need_sklearn() -> None:
    if importlib.util.find_spec("sklearn") is None:
        raise _CACHE["H"].Skip("needs sklearn's digits (absent from this lane)")


# -- staged files -------------------------------------------------------------------------------------
def _evil_arch(case: Path, f: Dict[str, Path]) -> Path:
    """The version-2 spec code with its backbone line naming evilmod (its fingerprint still matches:
    the fingerprint covers the rows, not the label)."""
    text = f["s_arch"].read_text().replace("backbone: torchvision:mobilenet_v2", "backbone: " + EVIL)
    assert EVIL in text
    path = case / "evil_arch.bin"
    path.write_text(text)
    return path


def _evil_checkpoint(case: Path, f: Dict[str, Path], deploy: bool) -> Path:
    """A real checkpoint of the spec network whose header names evilmod (written by save_checkpoint)."""
    key = "deploy" if deploy else "multi"
    if key not in _CACHE:
        from irep_deploy import fuse_model, load_checkpoint, save_checkpoint

        net = load_checkpoint(f["s_multi"]).build("torchvision:mobilenet_v2").eval()
        if deploy:
            net = fuse_model(net)
        net.irep_config["backbone"] = EVIL
        path = _cache_dir() / "evil_{}.pt".format(key)
        save_checkpoint(path, net, extra={"dataset": "digits"})
        _CACHE[key] = path.read_bytes()
    path = case / "evil_{}.pt".format(key)
    path.write_bytes(_CACHE[key])
    return path


def _digits_checkpoint(case: Path) -> Path:
    """A checkpoint as `train` on digits writes it: 8x8 inputs, 1 channel, the dataset recorded."""
    if "digits" not in _CACHE:
        from irep_deploy import build_model, save_checkpoint

        net = build_model("resnet18_cifar", width=0.125, num_classes=10, in_channels=1, input_size=8).eval()
        save_checkpoint(_cache_dir() / "digits.pt", net, extra={"dataset": "digits"})
        _CACHE["digits"] = (_cache_dir() / "digits.pt").read_bytes()
    path = case / "digits.pt"
    path.write_bytes(_CACHE["digits"])
    return path


class _Stop(Exception):
    pass


def _base_run(kind: str, f: Dict[str, Path]) -> Path:
    """A real run directory, made once: a training run stopped after its first of two epochs (resumable),
    or a finished one-round search."""
    if kind not in _CACHE:
        import contextlib
        import io

        where = _cache_dir() / kind
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if kind == "train":
                from irep_deploy.train import TrainConfig, train

                def stop(epoch: int, record: Dict[str, Any]) -> None:
                    raise _Stop()
                config = TrainConfig(backbone="resnet18_cifar", arch=f["arch"].read_text(), dataset="digits",
                                     width=0.125, epochs=2, batch_size=32, limit=64)
                with contextlib.suppress(_Stop):
                    train(where, config, device="cpu", progress=False, on_epoch_end=stop)
            else:
                from irep_deploy.search.des import make_config, search

                search(where, make_config(backbone="resnet18_cifar", dataset="digits", width=0.125, limit=64,
                                          batch_size=32, population=2, subnets=1, warmup_epochs=0, rounds=1, round_epochs=1,
                                          eval_batch_size=64), device="cpu", progress=False)
        _CACHE[kind] = where
    return _CACHE[kind]


def _run(kind: str, config: Optional[Dict[str, Any]] = None, files: Optional[Dict[str, Any]] = None,
         **parts: Any) -> Callable[..., Any]:
    """A setup staging a copy of the base run as ``{case}/run``, its state rewritten with ``config``
    changes and ``parts`` changes (a value, DROP, or a function of the old value); ``files``: other
    files of the run to replace (bytes, or "dir" for a directory)."""
    def stage(case: Path, f: Dict[str, Path]):
        _need_sklearn()
        from irep_deploy.runs import read_run_state, write_run_state
        from irep_deploy.search.des import SearchConfig
        from irep_deploy.train import TrainConfig

        run = case / "run"
        shutil.copytree(str(_base_run(kind, f)), str(run))
        if config or parts:
            state, saved = read_run_state(run, kind, TrainConfig if kind == "train" else SearchConfig)
            kept = {k: v for k, v in state.items() if k not in ("format", "format_version", "config")}
            for key, value in parts.items():
                if value is DROP:
                    kept.pop(key, None)
                else:
                    kept[key] = value(kept[key]) if callable(value) else value
            write_run_state(run, kind, dataclasses.replace(saved, **(config or {})), **kept)
        for name, content in (files or {}).items():
            target = run / name
            if target.exists():
                target.unlink()
            if content == "dir":
                target.mkdir()
            else:
                target.write_bytes(content)
        return {"run": run}, None
    return stage


def _needs_sklearn(stage: Optional[Callable[..., Any]] = None) -> Callable[..., Any]:
    def setup(case: Path, f: Dict[str, Path]):
        _need_sklearn()
        return stage(case, f) if stage else ({}, None)
    return setup


def _files(**makers: Callable[[Path, Dict[str, Path]], Path]) -> Callable[..., Any]:
    def setup(case: Path, f: Dict[str, Path]):
        return {name: make(case, f) for name, make in makers.items()}, None
    return setup


def _with_sklearn(**makers: Callable[[Path, Dict[str, Path]], Path]) -> Callable[..., Any]:
    return _needs_sklearn(_files(**makers))


def _keep_dir(case: Path, f: Dict[str, Path]) -> Path:
    keep = case / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("must survive\n")
    return keep


def _evil_code_text(f: Dict[str, Path]) -> str:
    return f["s_arch"].read_text().replace("backbone: torchvision:mobilenet_v2", "backbone: " + EVIL)


def _train_arch_evil(case: Path, f: Dict[str, Path]):
    return _run("train", config={"arch": _evil_code_text(f)})(case, f)


def _shorter_code(population: Any) -> Any:
    return [population[0][:-1]] + population[1:]


def _longer_codes(population: Any) -> Any:
    return [rows + [rows[-1]] for rows in population]


def _bad_optimizer(optimizer: Any) -> Any:
    return dict(optimizer, param_groups=optimizer["param_groups"][:0] + [dict(optimizer["param_groups"][0],
                                                                           params=[0, 1])])


def cases(H: Any) -> list:
    _CACHE["H"] = H  # its Skip, for the setups
    C = H.H
    A = AREA
    evil_arch = _files(evil_arch=_evil_arch)
    evil_multi = _files(evil_ckpt=lambda c, f: _evil_checkpoint(c, f, False))
    evil_deploy = _files(evil_ckpt=lambda c, f: _evil_checkpoint(c, f, True))
    own = ("{case}",)
    cat_code, cat_ckpt, cat_state = "a code names code", "a checkpoint names code", "run settings name code"
    cat_spec, cat_corrupt, cat_log = "spec checked before a call", "corrupt run state", "corrupt run log"
    cat_wrong = "wrong success or crash"
    return [
        # an architecture code (version 2) whose backbone line names evilmod
        C(A, cat_code, "train -o {case}/r --arch {evil_arch} " + TINY, 1, "--model evilmod:factory",
          setup=_with_sklearn(evil_arch=_evil_arch)),
        C(A, cat_code, "train -o {case}/r --arch {evil_arch} --model torchvision:mobilenet_v2 " + TINY.replace(
            "--width 0.125 ", ""), 1, "evilmod:factory", setup=_with_sklearn(evil_arch=_evil_arch)),
        C(A, cat_code, "train -o {case}/r --baseline --arch {evil_arch} " + TINY, 1, "{evil_arch}",
          setup=_with_sklearn(evil_arch=_evil_arch)),
        C(A, cat_code, "show {evil_arch}", 0, "", setup=evil_arch),
        C(A, cat_code, "fuse {multi} {evil_arch} -o {case}/o.pt", 1, "{evil_arch}", setup=evil_arch),
        C(A, cat_code, "fuse {s_multi} {evil_arch} -o {case}/o.pt --model torchvision:mobilenet_v2", 1, "{evil_arch}",
          setup=evil_arch),
        C(A, cat_code, "export {multi} --arch {evil_arch} -o {case}/o.onnx", 1, "{evil_arch}", setup=evil_arch),
        C(A, cat_code, "bench {multi} --arch {evil_arch} --backend torch --duration 0.01", 1, "{evil_arch}",
          setup=evil_arch),
        # a checkpoint whose header names evilmod (a real checkpoint of another network, relabelled)
        C(A, cat_ckpt, "fuse {evil_ckpt} {s_arch} -o {case}/o.pt", 1, "{evil_ckpt}", setup=evil_multi),
        C(A, cat_ckpt, "fuse {evil_ckpt} {evil_arch} -o {case}/o.pt", 1, "--model evilmod:factory",
          setup=_files(evil_ckpt=lambda c, f: _evil_checkpoint(c, f, False), evil_arch=_evil_arch)),
        C(A, cat_ckpt, "fuse {evil_ckpt} {s_arch} -o {case}/o.pt --model torchvision:mobilenet_v2", 1,
          "evilmod:factory", setup=evil_multi),
        C(A, cat_ckpt, "export {evil_ckpt} -o {case}/o.onnx", 1, "{evil_ckpt}", setup=evil_deploy),
        C(A, cat_ckpt, "export {evil_ckpt} -o {case}/o.onnx --model torchvision:mobilenet_v2", 1, "{evil_ckpt}",
          setup=evil_deploy),
        C(A, cat_ckpt, "eval {evil_ckpt} --dataset digits", 1, "--model evilmod:factory", setup=evil_deploy),
        C(A, cat_ckpt, "eval {evil_ckpt} --dataset digits --model torchvision:resnet18", 1, "{evil_ckpt}",
          setup=evil_multi),
        C(A, cat_ckpt, "bench {evil_ckpt} --backend torch --duration 0.01", 1, "{evil_ckpt}", setup=evil_deploy),
        C(A, cat_ckpt, "bench {evil_ckpt} --model torchvision:mobilenet_v2 --backend torch --duration 0.01", 1,
          "{evil_ckpt}", setup=evil_multi),
        # a run whose saved settings were edited to name evilmod
        C(A, cat_state, "train --resume {run}", 1, "--model evilmod:factory", own=own,
          setup=_run("train", config={"backbone": EVIL}), label="train --resume: the settings name evilmod"),
        C(A, cat_state, "train --resume {run} --model resnet18_cifar", 1, "{run}/state.pt", own=own,
          setup=_run("train", config={"backbone": EVIL})),
        C(A, cat_state, "train --resume {run} --baseline", 1, "--model evilmod:factory", own=own,
          setup=_run("train", config={"backbone": EVIL})),
        C(A, cat_state, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_train_arch_evil,
          label="train --resume: the saved code text names evilmod"),
        C(A, cat_state, "search --resume {run}", 1, "--model evilmod:factory", own=own,
          setup=_run("search", config={"backbone": EVIL}), label="search --resume: the settings name evilmod"),
        C(A, cat_state, "search --resume {run} --model torchvision:mobilenet_v2", 1, "{run}/state.pt", own=own,
          setup=_run("search", config={"backbone": EVIL})),
        # what a spec the user typed names is checked before anything calls it
        C(A, cat_spec, "train -o {case}/r --model os:system --model-kwargs {{\"command\":\"touch${{IFS}}{case}/X\"}} "
          + TINY.replace("--width 0.125 ", ""), 2, "os:system", setup=_needs_sklearn()),
        C(A, cat_spec, "train -o {case}/r --model os:popen --model-kwargs {{\"cmd\":\"touch${{IFS}}{case}/X\"}} "
          + TINY.replace("--width 0.125 ", ""), 2, "os:popen", setup=_needs_sklearn()),
        C(A, cat_spec, "train -o {case}/r --model shutil:rmtree --model-kwargs {{\"path\":\"{keep}\"}} "
          + TINY.replace("--width 0.125 ", ""), 2, "shutil:rmtree", setup=_with_sklearn(keep=_keep_dir)),
        C(A, cat_spec, "search -o {case}/r --model builtins:eval --model-kwargs {{\"source\":\"1\"}} "
          + TINY_SEARCH.replace("--width 0.125 ", ""), 2, "builtins:eval", setup=_needs_sklearn()),
        C(A, cat_spec, "train -o {case}/r --model evilmod:_private " + TINY.replace("--width 0.125 ", ""), 2,
          "evilmod:_private", setup=_needs_sklearn()),
        C(A, cat_spec, "train -o {case}/r --model evilmod:factory.__globals__ " + TINY.replace("--width 0.125 ", ""),
          2, "__globals__", setup=_needs_sklearn()),
        C(A, cat_spec, "train -o {case}/r --model torch.nn:Module " + TINY.replace("--width 0.125 ", ""), 2,
          "torch.nn:Module", setup=_needs_sklearn()),
        C(A, cat_spec, "search -o {case}/r --model json:JSONDecoder " + TINY_SEARCH.replace("--width 0.125 ", ""), 2,
          "json:JSONDecoder", setup=_needs_sklearn()),
        C(A, cat_spec, "train -o {case}/r --model torch.nn:functional " + TINY.replace("--width 0.125 ", ""), 2,
          "torch.nn:functional", setup=_needs_sklearn()),
        # a damaged or edited state.pt: one line naming it, never a traceback
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("train", rng=DROP),
          label="train --resume: state.pt without its rng entry"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("train", rng={"torch": 5}),
          label="train --resume: rng entry of the wrong kind"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("train", epoch="abc"),
          label="train --resume: epoch 'abc'"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("train", epoch=99),
          label="train --resume: epoch beyond the run's epochs"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("train", model=DROP),
          label="train --resume: no model state"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("train", optimizer=[1, 2]), label="train --resume: optimizer state a list"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("train", optimizer=_bad_optimizer), label="train --resume: optimizer state of other parameters"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("train", config={"width": "abc"}), label="train --resume: saved width 'abc'"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("train", config={"epochs": -3}), label="train --resume: saved epochs -3"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("train", config={"backbone": "vgg16_cifar"}),
          label="train --resume: settings name another backbone than the run's code"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("train", config={"backbone": "vgg16_cifar", "arch": None}),
          label="train --resume: settings name another backbone than the saved model"),
        C(A, cat_corrupt, "train --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("train", history=7),
          label="train --resume: history not a list"),
        C(A, cat_corrupt, "search --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("search", population=_shorter_code), label="search --resume: one code a row short"),
        C(A, cat_corrupt, "search --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("search", population=_longer_codes), label="search --resume: every code a row too long"),
        C(A, cat_corrupt, "search --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("search", epoch="abc"),
          label="search --resume: epoch 'abc'"),
        C(A, cat_corrupt, "search --resume {run}", 1, "{run}/state.pt", own=own, setup=_run("search", model=DROP),
          label="search --resume: no SuperNet state"),
        C(A, cat_corrupt, "search --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("search", config={"backbone": "vgg16_cifar"}),
          label="search --resume: settings name another backbone than the SuperNet"),
        C(A, cat_corrupt, "search --resume {run}", 1, "{run}/state.pt", own=own,
          setup=_run("search", fitness=["x"]), label="search --resume: fitness not numbers"),
        # the run's log: not what the run wrote
        C(A, cat_log, "train --resume {run}", 1, "{run}/log.jsonl", own=own,
          setup=_run("train", files={"log.jsonl": b'{"event": "epoch", "epoch": 1}\n\xff\xfe\n'}),
          label="train --resume: log.jsonl not UTF-8"),
        C(A, cat_log, "train --resume {run}", 1, "{run}/log.jsonl", own=own,
          setup=_run("train", files={"log.jsonl": "dir"}), label="train --resume: log.jsonl a directory"),
        C(A, cat_log, "search --resume {run}", 1, "{run}/log.jsonl", own=own,
          setup=_run("search", files={"log.jsonl": b"\x80\x81 not text\n"}),
          label="search --resume: log.jsonl not UTF-8"),
        C(A, cat_log, "search --resume {run}", 1, "{run}/alpha_beta.jsonl", own=own,
          setup=_run("search", files={"alpha_beta.jsonl": "dir"}), label="search --resume: alpha_beta.jsonl a directory"),
        C(A, cat_log, "train --resume {run}", 0, "", own=own,
          setup=_run("train", files={"log.jsonl": b'[1, 2]\n5\n"text"\n{"event": "epoch", "epoch": 1}\n'}),
          label="train --resume: log.jsonl lines that are JSON but not records (dropped; the run ends)"),
        # wrong successes and crashes
        C(A, cat_wrong, "train --resume {run} -o {case}/other", 2, "-o", own=own, setup=_run("train")),
        C(A, cat_wrong, "search --resume {run} -o {case}/other", 2, "-o", own=own, setup=_run("search")),
        H.HCase(A, cat_wrong, tuple(("train -o {case}/r --model resnet18_cifar " + TINY).split()) + (
            "--data-root", ""), 2, "--data-root", setup=_needs_sklearn(), label="train --data-root ''"),
        H.HCase(A, cat_wrong, ("eval", "{deploy}", "--dataset", "digits", "--data-root", ""), 2, "--data-root",
                label="eval --data-root ''"),
        C(A, cat_wrong, "eval {digits} --dataset fashion-mnist --data-root {tiny_fmnist}", 1, "8x8",
          setup=_files(digits=lambda c, f: _digits_checkpoint(c))),
        C(A, cat_wrong, "train -o {case}/r --model resnet18_cifar " + TINY.replace("--batch-size 32", "--batch-size 1"),
          2, "--batch-size 1", setup=_needs_sklearn()),
        C(A, cat_wrong, "search -o {case}/r --model resnet18_cifar " + TINY_SEARCH.replace(
            "--batch-size 32", "--batch-size 1"), 2, "--batch-size 1", setup=_needs_sklearn()),
        C(A, cat_wrong, "train -o {case}/r --model resnet18_cifar --lr 1e300 " + TINY, 2, "--lr", own=own,
          setup=_needs_sklearn()),
        C(A, cat_wrong, "search -o {case}/r --model resnet18_cifar --lr 1e300 " + TINY_SEARCH, 2, "--lr", own=own,
          setup=_needs_sklearn()),
    ]
