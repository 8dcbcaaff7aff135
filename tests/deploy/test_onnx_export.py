"""`irep-deploy export` with real onnx/onnxruntime on CPU."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from irep_deploy import load_checkpoint
from irep_deploy.engines import onnx as onnx_engine
from irep_deploy.engines.onnx import FUSED_OP_TYPES, op_types

from .conftest import cli, leftovers, one_line_error


def _ort(path, x):
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_fused_graph_holds_only_plain_ops(fused_onnx):
    ops = op_types(fused_onnx)
    assert set(ops) <= FUSED_OP_TYPES, ops
    assert "BatchNormalization" not in ops
    # one Conv per searchable 3x3 position + stem + 3 downsample 1x1: no branch survived
    assert ops["Conv"] == 20 and ops["Gemm"] == 1


def test_export_is_named_dynamic_and_matches_torch(fused_onnx, ckpts):
    model = onnx.load(str(fused_onnx))
    onnx.checker.check_model(model, full_check=True)
    name, out_name, dims = onnx_engine.io_spec(model)
    assert (name, out_name) == ("input", "logits")
    assert isinstance(dims[0], str) and dims[1:] == [3, 32, 32]
    torch_model = load_checkpoint(ckpts["deploy"]).build().eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = torch_model(x).numpy()
        np.testing.assert_allclose(_ort(fused_onnx, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_cli_prints_checks_at_batch_1_and_more(ckpts, tmp_path, capsys):
    rc, out, err = cli(capsys, "export", ckpts["deploy"], "-o", tmp_path / "m.onnx", "--verify-batch", 3,
                       "--simplify", "none")
    assert rc == 0, err
    assert "at batch 1:" in out and "at batch 3:" in out and "simplifier: none" in out
    assert set(op_types(tmp_path / "m.onnx")) <= FUSED_OP_TYPES  # fused graphs are plain even unsimplified


def test_multi_branch_checkpoint_is_fused_first(ckpts, tmp_path, capsys):
    out_path = tmp_path / "mb.onnx"
    rc, out, err = cli(capsys, "export", ckpts["multi"], "--arch", ckpts["arch"], "-o", out_path)
    assert rc == 0, err
    assert "fused the multi-branch checkpoint" in out
    assert set(op_types(out_path)) <= FUSED_OP_TYPES
    multi = load_checkpoint(ckpts["multi"]).build().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = multi(x).numpy()
    np.testing.assert_allclose(_ort(out_path, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_supernet_with_code_and_fixed_batch(ckpts, tmp_path, capsys):
    out_path = tmp_path / "s.onnx"
    rc, out, err = cli(capsys, "export", ckpts["supernet"], "--arch", ckpts["other"], "-o", out_path,
                       "--batch", 2, "--input-size", 40)
    assert rc == 0, err
    _, _, dims = onnx_engine.io_spec(onnx.load(str(out_path)))
    assert dims == [2, 3, 40, 40]


def test_multi_branch_graph_keeps_its_branches(ckpts):
    """The contrast that makes the op test meaningful: unfused, the graph has more convs."""
    multi = load_checkpoint(ckpts["multi"]).build().eval()
    ops = op_types(onnx_engine.export_module(multi, (1, 3, 32, 32)))
    assert ops["Conv"] > 20


class _Chatty(torch.nn.Module):
    """A user's model that warns and prints while it is traced."""

    def forward(self, x):
        warnings.warn("the user's own warning", UserWarning)
        print("the user's own print")
        return x * 2


def test_export_hides_only_torchs_own_noise(capsys):
    # torch 2.0 prints an empty diagnostic summary after every export, new torch warns that the
    # legacy exporter is deprecated; neither reaches the user. What the user's model says still does.
    with pytest.warns(UserWarning) as seen:  # records every warning, DeprecationWarnings included
        onnx_engine.export_module(_Chatty(), (1, 3, 4, 4))
    assert [str(w.message) for w in seen] == ["the user's own warning"]
    out = capsys.readouterr().out
    assert "the user's own print" in out and "Diagnostic Run" not in out


def test_load_checkpoint_hides_only_the_typed_storage_warning(ckpts):
    # torch 2.0's torch.load(weights_only=True) warns about TypedStorage, its own internals.
    from irep_deploy._io import no_typed_storage_warning
    with pytest.warns(UserWarning) as seen:
        load_checkpoint(ckpts["deploy"])
        with no_typed_storage_warning():
            warnings.warn("the user's own warning", UserWarning)
    assert [str(w.message) for w in seen] == ["the user's own warning"]


@pytest.mark.parametrize("argv, expect", [
    (["{dir}/missing.pt"], "missing.pt: no such file"),
    (["{junk}"], "not a readable checkpoint"),
    (["{deploy}", "--arch", "{arch}"], "already fused"),
    (["{supernet}"], "SuperNet"),
    (["{multi}", "--arch", "{other}"], "does not match"),
    (["{multi}", "--arch", "{vgg}"], "vgg16_cifar"),
    (["{supernet}", "--arch", "{vgg}"], "does not fit"),
    (["{deploy}", "--opset", "7"], "opset 7"),
    (["{deploy}", "--batch", "0"], "batch"),
    (["{deploy}", "--verify-batch", "1"], "--verify-batch"),
    (["{deploy}", "--input-size", "0"], "--input-size"),
    (["{deploy}", "--input-name", "x", "--output-name", "x"], "must differ"),
    (["{deploy}", "--tolerance", "0"], "relative error"),
])
def test_export_errors_are_one_line_and_write_nothing(ckpts, tmp_path, capsys, argv, expect):
    names = {k: str(v) for k, v in ckpts.items()}
    out_path = tmp_path / "out.onnx"
    rc, out, err = cli(capsys, "export", *[a.format(**names) for a in argv], "-o", out_path)
    assert rc != 0
    line = one_line_error(err)
    assert expect in line, line
    assert leftovers(tmp_path, ["out.onnx"]) == []


def test_tolerance_failure_exits_3(ckpts, tmp_path, capsys):
    rc, _, err = cli(capsys, "export", ckpts["deploy"], "-o", tmp_path / "o.onnx", "--tolerance", "0")
    assert rc == 3 and "nothing written" in err


def test_unwritable_output_is_refused_before_work(ckpts, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    rc, _, err = cli(capsys, "export", ckpts["deploy"], "-o", tmp_path / "afile" / "o.onnx")
    assert rc == 1 and "not a directory" in one_line_error(err)


def test_onnxsim_asked_but_missing(ckpts, tmp_path, capsys):
    try:
        import onnxsim  # noqa: F401
        pytest.skip("onnxsim is installed here")
    except ImportError:
        pass
    rc, _, err = cli(capsys, "export", ckpts["deploy"], "-o", tmp_path / "o.onnx", "--simplify", "onnxsim")
    assert rc == 4 and "onnxsim is not installed" in one_line_error(err)
    assert leftovers(tmp_path, ["o.onnx"]) == []
