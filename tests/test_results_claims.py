"""Every number the docs quote from a results file is that file's number, and no results file older
than its code is quoted as current (benchmarks/check_claims.py, benchmarks/check_results.py; the
rules are in docs/benchmarks.md). The repository's own docs are checked first, then the checkers on
small documents and results files of their own."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import check_claims  # noqa: E402
import check_results  # noqa: E402
import provenance  # noqa: E402


def test_every_claim_marker_of_the_docs_matches_its_results_file(capsys):
    assert check_claims.main([]) == 0, capsys.readouterr().out


def test_no_stale_results_file_and_the_docs_say_which_are_older_versions(capsys):
    assert check_results.main([]) == 0, capsys.readouterr().out


# -- the claims checker on its own documents ---------------------------------------------------------

RESULT = {"pairs": [{"name": "des-all", "ci": [0.19, 1.04], "mean": 0.625},
                    {"name": "des-plain", "ci": [-0.82, 1.7], "mean": 0.44}],
          "rows": [{"backbone": "resnet18_cifar", "code": "plain", "ms": 1234.5},
                   {"backbone": "resnet18_cifar", "code": "full", "ms": 8000.0},
                   {"backbone": "vgg16_cifar", "code": "plain", "ms": 2.0}],
          "fraction": 0.0735, "count": 7, "spread": -0.24, "tiny": 2.9e-7, "label": "x"}


def claims(tmp_path: Path, *lines: str):
    """The checker's output lines for README.md made of ``lines`` over results/r.json = RESULT."""
    (tmp_path / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (tmp_path / "benchmarks" / "results" / "r.json").write_text(json.dumps(RESULT))
    (tmp_path / "README.md").write_text("\n".join(lines) + "\n")
    return [check_claims.check(c, tmp_path / "benchmarks" / "results", {})
            for c in check_claims.markers("\n".join(lines), "README.md")]


def test_a_number_that_matches_its_file_passes(tmp_path, capsys):
    assert claims(tmp_path, "DES beats all by 0.62 [0.19, 1.04]<!-- claim r.json#pairs[name=des-all].ci --> pts",
                  "and 7<!-- claim r.json#count --> codes") == [None, None]
    assert check_claims.main(["--root", str(tmp_path)]) == 0
    assert "2 claims checked in 1 document: all hold" in capsys.readouterr().out


def test_a_wrong_number_is_named_with_its_document_line_and_both_values(tmp_path, capsys):
    claims(tmp_path, "intro", "DES beats all by [0.19, 1.05]<!-- claim r.json#pairs[name=des-all].ci -->")
    assert check_claims.main(["--root", str(tmp_path)]) == 1
    assert ("README.md:2: r.json#pairs[name=des-all].ci: text says 0.19, 1.05, file says 0.19, 1.04"
            in capsys.readouterr().out)


def test_missing_file_key_index_and_a_value_that_is_not_a_number(tmp_path):
    problems = claims(tmp_path, "1<!-- claim nope.json#count -->", "1<!-- claim r.json#counts -->",
                      "1<!-- claim r.json#pairs.5.mean -->", "1<!-- claim r.json#label -->",
                      "1<!-- claim r.json#count.x -->")
    assert problems[0] == "no such results file"
    assert problems[1] == "no key 'counts' in the file"
    assert problems[2] == "no index '5' in pairs (a list of 2)"
    assert problems[3] == 'file says "x", not a number or a list of numbers'
    assert "is a value" in problems[4]


def test_selectors_pick_exactly_one_element_with_one_or_several_fields(tmp_path):
    problems = claims(tmp_path, "8,000 ms<!-- claim r.json#rows[backbone=resnet18_cifar,code=full].ms -->",
                      "2<!-- claim r.json#rows[code=plain].ms -->", "2<!-- claim r.json#rows[code=half].ms -->",
                      "1,234.5<!-- claim r.json#rows.0.ms --> and 2.0<!-- claim r.json#rows.-1.ms -->")
    assert problems[0] is None
    assert problems[1] == "selector [code=plain] matches 2 elements of rows"
    assert problems[2] == "selector [code=half] matches 0 elements of rows"
    assert problems[3:] == [None, None]


def test_rounding_either_way_at_half_scaled_values_and_signs(tmp_path):
    problems = claims(tmp_path,
                      "0.62<!-- claim r.json#pairs.0.mean --> or 0.63<!-- claim r.json#pairs.0.mean -->",
                      "0.6<!-- claim r.json#pairs.0.mean --> but not 0.64<!-- claim r.json#pairs.0.mean -->",
                      "7.35 %<!-- claim r.json#fraction*100 --> 7.4%<!-- claim r.json#fraction*100 -->",
                      "0.0735<!-- claim r.json#fraction*100 -->",
                      "\u22120.24<!-- claim r.json#spread --> [-0.2]<!-- claim r.json#spread -->",
                      "0.24<!-- claim r.json#spread -->", "2.9e-7<!-- claim r.json#tiny -->",
                      "7 codes<!-- claim r.json#count --> 7.0<!-- claim r.json#count -->")
    assert problems[:3] == [None, None, None]
    assert problems[3] == "text says 0.64, file says 0.625"
    assert problems[4:6] == [None, None]
    assert problems[6] == "text says 0.0735, file says 0.0735 (times 100)"
    assert problems[7:9] == [None, None]
    assert problems[9] == "text says 0.24, file says -0.24"
    assert problems[10:] == [None, None, None]


def test_the_numbers_are_the_last_ones_before_the_marker_back_to_the_previous_marker(tmp_path):
    problems = claims(tmp_path,
                      "resnet18 at B=5 on an H200: 0.19-1.04<!-- claim r.json#pairs[name=des-all].ci -->",
                      "0.19 1.04<!-- claim r.json#pairs[name=des-all].ci --> then 1.04<!-- claim r.json#pairs[name=des-all].ci -->",
                      "0.19<!-- claim r.json#pairs.0.ci.0 -->-1.04<!-- claim r.json#pairs.0.ci.1 --> and "
                      "-0.82<!-- claim r.json#pairs.1.ci.0 -->")
    assert problems[0] is None  # a range dash is no sign; digits inside names are no numbers
    assert problems[1] is None
    assert problems[2] == "text says 1.04 (needs 2 numbers before the marker), file says 0.19, 1.04"
    assert problems[3:] == [None, None, None]  # a range split by a marker is still a range


def test_number_parsing():
    assert check_claims.numbers("8,000 of 1,2345; 0.96-1.02x, [-0.32, \u22120.16] +24 v2 H200 p=0.06.") == [
        "8000", "1", "2345", "0.96", "1.02", "-0.32", "-0.16", "24", "0.06"]


def test_a_bad_selector_is_a_problem_not_a_crash(tmp_path):
    assert claims(tmp_path, "1<!-- claim r.json#rows[code] -->") == ["selector [code] is not field=value"]


# -- the staleness check on a repository of its own ---------------------------------------------------

def small_repo(tmp_path: Path) -> Path:
    """A package module, a script importing it, one results file made now by that code, and a doc."""
    (tmp_path / "irep_deploy").mkdir()
    (tmp_path / "irep_deploy" / "__init__.py").write_text("")
    (tmp_path / "irep_deploy" / "calc.py").write_text("def value():\n    return 0.5  # the number\n")
    (tmp_path / "irep_deploy" / "errors.py").write_text("MESSAGE = 'no'\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "make_r.py").write_text(
        "from irep_deploy.calc import value\nfrom irep_deploy.errors import MESSAGE\nprint(value())\n")
    (tmp_path / "docs").mkdir()
    read = provenance.checkout(tmp_path)
    deps = provenance.dependencies(provenance.closure(["benchmarks/make_r.py"], read), read=read)
    prov = {"commit": "abc1234", "dirty": False, "command": "python benchmarks/make_r.py", "depends": deps}
    (tmp_path / "benchmarks" / "results" / "r.json").write_text(json.dumps({"value": 0.5, "provenance": prov}))
    return tmp_path


def results_check(root: Path, capsys, *args: str):
    rc = check_results.main(["--root", str(root)] + list(args))
    return rc, capsys.readouterr().out


def test_a_results_file_records_its_script_and_the_modules_it_imports_less_plumbing(tmp_path):
    root = small_repo(tmp_path)
    deps = json.loads((root / "benchmarks" / "results" / "r.json").read_text())["provenance"]["depends"]
    assert sorted(deps) == ["benchmarks/make_r.py", "irep_deploy/__init__.py", "irep_deploy/calc.py"]


def test_a_comment_edit_keeps_a_file_current_a_code_edit_makes_it_stale(tmp_path, capsys):
    root = small_repo(tmp_path)
    assert results_check(root, capsys)[0] == 0
    calc = root / "irep_deploy" / "calc.py"
    calc.write_text("def value():\n\n    return 0.5  # the number, as the paper has it\n")
    (root / "irep_deploy" / "errors.py").write_text("MESSAGE = 'no, not that'\n")  # plumbing
    assert results_check(root, capsys)[0] == 0
    calc.write_text("def value():\n    return 0.25\n")
    rc, out = results_check(root, capsys)
    assert rc == 1
    assert "benchmarks/results/r.json: stale, made on commit abc1234; changed since: irep_deploy/calc.py." in out
    calc.unlink()  # a dependency that is gone is a change too
    assert "changed since: irep_deploy/calc.py." in results_check(root, capsys)[1]


def test_an_acknowledged_change_is_kept_in_the_file_with_its_reason(tmp_path, capsys):
    root = small_repo(tmp_path)
    (root / "irep_deploy" / "calc.py").write_text("def value():\n    return 0.5 + 0.0\n")
    with pytest.raises(SystemExit):  # no reason, no acknowledgement
        check_results.main(["--root", str(root), "--acknowledge", "r", "--reason", " "])
    assert results_check(root, capsys, "--acknowledge", "r", "--reason", "adds 0.0: the same float")[0] == 0
    prov = json.loads((root / "benchmarks" / "results" / "r.json").read_text())["provenance"]
    [entry] = prov["acknowledged"]
    assert entry["reason"] == "adds 0.0: the same float" and list(entry["files"]) == ["irep_deploy/calc.py"]
    assert entry["files"]["irep_deploy/calc.py"]["now"] == prov["depends"]["irep_deploy/calc.py"]
    assert results_check(root, capsys)[0] == 0
    with pytest.raises(SystemExit, match="nothing to acknowledge"):
        check_results.main(["--root", str(root), "--acknowledge", "r", "--reason", "again"])


def test_a_record_of_an_older_version_must_be_called_one_wherever_the_docs_cite_it(tmp_path, capsys):
    root = small_repo(tmp_path)
    doc = root / "docs" / "perf.md"
    (root / "irep_deploy" / "calc.py").write_text("def value():\n    return 0.25\n")
    assert results_check(root, capsys, "--mark-older", "r", "--reason", "made before calc changed")[0] == 0
    older = json.loads((root / "benchmarks" / "results" / "r.json").read_text())["provenance"]["older_version"]
    assert older["reason"] == "made before calc changed" and older["commit"] == "abc1234"
    assert older["changed"] == ["irep_deploy/calc.py"]
    doc.write_text("See [r](../benchmarks/results/r.md) and `results/r.json`.\n\n"
                   "| x | 0.5<!-- claim r.json#value --> |\n")
    rc, out = results_check(root, capsys)
    assert rc == 1
    assert "docs/perf.md:1: links to results/r, a record of an older version (commit abc1234: made before calc " \
           "changed): follow it with '(record of an older version)'" in out
    assert "docs/perf.md:1: names results/r" in out
    assert "docs/perf.md:3: quotes results/r" in out and "its paragraph or table row must say" in out
    doc.write_text("See [r](../benchmarks/results/r.md)\n(record of an older version) and `results/r.json` "
                   "(record of an older version: calc changed).\n\n"
                   "| x | 0.5<!-- claim r.json#value --> (a record of an older version) |\n")
    assert results_check(root, capsys)[0] == 0


def test_a_table_whose_caption_calls_its_file_a_record_needs_no_mark_on_each_row(tmp_path, capsys):
    root = small_repo(tmp_path)
    doc = root / "docs" / "perf.md"
    (root / "irep_deploy" / "calc.py").write_text("def value():\n    return 0.25\n")
    assert results_check(root, capsys, "--mark-older", "r", "--reason", "made before calc changed")[0] == 0
    rows = "| x | 0.5<!-- claim r.json#value --> |\n| y | 0.5<!-- claim r.json#value --> |\n"
    doc.write_text("From [r](../benchmarks/results/r.md) (record of an older version):\n\n" + rows)
    assert results_check(root, capsys)[0] == 0
    doc.write_text("From [r](../benchmarks/results/r.md) (record of an older version).\n\nAnother paragraph.\n\n"
                   + rows)
    rc, out = results_check(root, capsys)
    assert rc == 1 and "docs/perf.md:5: quotes results/r" in out and "docs/perf.md:6: quotes results/r" in out


def test_a_stale_file_cited_needs_the_same_words_and_a_current_one_must_not_have_them(tmp_path, capsys):
    root = small_repo(tmp_path)
    doc = root / "docs" / "perf.md"
    doc.write_text("See [r](../benchmarks/results/r.md) (record of an older version).\n")
    rc, out = results_check(root, capsys)
    assert rc == 1 and "docs/perf.md:1: links to results/r, which is current: drop" in out
    doc.write_text("See [r](../benchmarks/results/r.md).\n\n```sh\nsee results/r.md (not a reference)\n```\n")
    assert results_check(root, capsys)[0] == 0
    (root / "irep_deploy" / "calc.py").write_text("def value():\n    return 0.25\n")
    out = results_check(root, capsys)[1]
    assert "docs/perf.md:1: links to results/r, which is stale" in out


def test_a_file_without_provenance_and_a_markdown_only_record(tmp_path, capsys):
    root = small_repo(tmp_path)
    results = root / "benchmarks" / "results"
    (results / "bare.json").write_text("{}")
    read = provenance.checkout(root)
    prov = {"commit": "def5678", "command": "python benchmarks/make_r.py",
            "depends": provenance.dependencies(["benchmarks/make_r.py"], read=read)}
    (results / "table.md").write_text(provenance.embed("# A table\n\n| a |\n", prov))
    rc, out = results_check(root, capsys, "--verbose")
    assert rc == 1
    assert "benchmarks/results/bare.json: no provenance record" in out
    assert "benchmarks/results/table.md: current" in out
    (root / "benchmarks" / "make_r.py").write_text("print(1)\n")
    assert "benchmarks/results/table.md: stale, made on commit def5678" in results_check(root, capsys)[1]
    check_results.main(["--root", str(root), "--mark-older", "table", "--reason", "kept"])
    text = (results / "table.md").read_text()
    assert text.startswith("# A table\n\n| a |\n") and text.count(provenance.MD_TAG) == 1
    assert provenance.embedded(text)["older_version"]["reason"] == "kept"
    (results / "bare.json").write_text("{not json")
    with pytest.raises(SystemExit, match="bare.json: unreadable results file"):
        check_results.main(["--root", str(root)])


def test_a_json_results_file_as_a_dependency_ignores_its_own_provenance():
    a = json.dumps({"x": 1, "provenance": {"commit": "a"}})
    b = json.dumps({"x": 1, "provenance": {"commit": "b", "acknowledged": []}})
    assert provenance.digest_text("benchmarks/results/e.json", a) == provenance.digest_text("benchmarks/results/e.json", b)
    assert provenance.digest_text("benchmarks/results/e.json", a) != provenance.digest_text(
        "benchmarks/results/e.json", json.dumps({"x": 2}))


def test_the_static_import_closure_follows_lazy_relative_and_sibling_imports(tmp_path):
    pkg = tmp_path / "irep_deploy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("_EXPORTS = {'fuse': 'reparam'}\n")
    (pkg / "reparam.py").write_text("def fuse():\n    from .sub import deep\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("from ..reparam import fuse\n")
    (pkg / "unused.py").write_text("")
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "helper.py").write_text("import json\n")
    (tmp_path / "benchmarks" / "s.py").write_text("from irep_deploy import fuse\nfrom helper import x\n")
    assert provenance.closure(["benchmarks/s.py"], provenance.checkout(tmp_path)) == {
        "benchmarks/s.py", "benchmarks/helper.py", "irep_deploy/__init__.py", "irep_deploy/reparam.py",
        "irep_deploy/sub/__init__.py", "irep_deploy/sub/deep.py"}


# -- cached runs are keyed by their code as well as their settings ------------------------------------

def test_a_cached_or_interrupted_run_of_other_code_is_refused_and_one_of_this_code_reused(tmp_path):
    import runs
    recipe = {"backbone": "resnet18_cifar", "epochs": 1}
    code = runs.code_of(runs.TRAIN_CODE)
    assert code == provenance.code_digest(runs.TRAIN_CODE) != runs.code_of(runs.SEARCH_CODE)
    done = tmp_path / "t"
    done.mkdir()
    info = {"recipe": recipe, "arch": None, "test_top1": 77.0, "code_digest": code}
    (done / "result.json").write_text(json.dumps(info))
    assert runs.run_training(done, "plain", 0, None, recipe) == info
    for stored in ("0" * 16, None):  # other code; made before runs recorded their code
        (done / "result.json").write_text(json.dumps(dict(info, code_digest=stored)))
        with pytest.raises(SystemExit, match="holds a run of other code"):
            runs.run_training(done, "plain", 0, None, recipe)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "state.pt").write_bytes(b"")
    (tmp_path / "cut.code").write_text("1" * 16 + "\n")
    with pytest.raises(SystemExit, match="cut: holds a run of other code"):
        runs.run_training(cut, "plain", 0, None, recipe)
    search = tmp_path / "des-seed0"
    search.mkdir()
    (search / "report.json").write_text(json.dumps({"code": "x", "code_digest": code}))
    with pytest.raises(SystemExit, match="des-seed0: holds a run of other code"):
        runs.finished_search(search)


def test_the_one_writer_records_provenance_in_json_and_in_a_markdown_only_file(tmp_path):
    import _common
    _common.write_results(tmp_path / "r", {"x": 1}, "# R\n", depends=[ROOT / "benchmarks" / "results" / "networks.json"])
    prov = json.loads((tmp_path / "r.json").read_text())["provenance"]
    assert prov["depends"]["benchmarks/results/networks.json"] == provenance.digest_text(
        "benchmarks/results/networks.json", (ROOT / "benchmarks" / "results" / "networks.json").read_text())
    assert "benchmarks/_common.py" in prov["depends"] and "irep_deploy/_io.py" in prov["ignored"]
    assert all(not Path(p).is_absolute() for p in prov["depends"])  # pytest's own files are no dependency
    assert set(prov) >= {"commit", "dirty", "command", "argv", "machine", "date", "load_avg"}
    assert (tmp_path / "r.md").read_text().startswith("# R\n\nProvenance: commit ")
    _common.write_results(tmp_path / "t", None, "# T\n", ignore=())
    text = (tmp_path / "t.md").read_text()
    markdown_only = provenance.embedded(text)
    assert not (tmp_path / "t.json").exists() and markdown_only["ignored"] == []
    assert set(markdown_only["depends"]) == (set(prov["depends"]) - {"benchmarks/results/networks.json"}
                                             | set(prov["ignored"]))  # ignore=(): the plumbing counts too


def test_a_package_imported_from_another_tree_is_hashed_as_it_ran_and_named(tmp_path, monkeypatch):
    import _common  # noqa: F401  (a benchmark module importing the package)
    import irep_deploy
    other = tmp_path / "old" / "irep_deploy"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OLD = True\n")
    monkeypatch.setattr(provenance, "STARTED", time.time() + 60)  # the old tree was not saved during the run
    monkeypatch.setattr(irep_deploy, "__file__", str(other / "__init__.py"))
    prov = provenance.record("m", argv=["benchmarks/x.py"])
    assert prov["package_from"] == str(tmp_path / "old")
    assert prov["depends"]["irep_deploy/__init__.py"] == provenance.digest_text("irep_deploy/__init__.py", "OLD = True\n")
    # a module loaded from the checkout but missing from the tree that ran is recorded as absent (None)
    assert all(d is None for rel, d in prov["depends"].items() if rel.startswith("irep_deploy/") and "__init__" not in rel)


def test_a_dependency_saved_while_the_run_went_on_has_no_digest(monkeypatch):
    import _common  # noqa: F401  (loads the package modules a results file depends on)
    monkeypatch.setattr(provenance, "STARTED", (ROOT / "benchmarks" / "_common.py").stat().st_mtime - 1)
    prov = provenance.record("m", argv=["benchmarks/x.py"])
    assert "benchmarks/_common.py" in prov["edited_during_run"] and prov["depends"]["benchmarks/_common.py"] is None
