"""The search's records (search/records.py): writer -> reader round trips, the files of a run written
before the records existed (data/search_run_v0, from the inline-dict writer) read and rewritten byte
for byte, and malformed or fuzzed records refused with one line naming the file."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from irep_deploy.errors import RecordError
from irep_deploy.search.records import (ALPHA_BETA_FILE, LOG_FILE, POPULATION_FILE, AlphaBetaRecord, EpochRecord,
                                        Population, PopulationCode, RoundRecord, append_record, read_alpha_beta,
                                        read_log, read_population, write_population)

OLD_RUN = Path(__file__).parent / "data" / "search_run_v0"  # written by des.py before records.py (c2d79b3)
OPS, LAYERS = ["conv1x3", "dil2x1"], ["layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1"]


def _population() -> Population:
    return Population(round=2, budget=4, ops=OPS, layers=LAYERS, codes=[
        PopulationCode(rank=1, fitness=91.25, branches=4, bits=["11", "10", "01"], history=[(1, 90.0), (2, 91.25)]),
        PopulationCode(rank=2, fitness=88.5, branches=1, bits=["00", "01", "00"], history=[(2, 88.5)])])


def test_writer_reader_round_trip(tmp_path):
    log = [EpochRecord(epoch=1, phase="warmup", train_loss=2.3, train_acc=11.5, lr=0.1),
           EpochRecord(epoch=2, phase="round 1", train_loss=1.9, train_acc=30.25, lr=0.05),
           RoundRecord(round=1, epoch=2, best_fitness=91.25, mean_fitness=89.875, best_branches=4,
                       population_op_counts={"conv1x3": 2, "dil2x1": 3})]
    for rec in log:
        append_record(tmp_path / LOG_FILE, rec)
    assert read_log(tmp_path / LOG_FILE) == log
    assert read_log(tmp_path / LOG_FILE, kinds=(RoundRecord,)) == log[2:]
    ab = [AlphaBetaRecord(round=r, ops=OPS, layers=LAYERS, alpha=[[0.5 * r, -1e-4]] * 3, beta=[0.0, 1.0, -2.5])
          for r in (1, 2)]
    for rec in ab:
        append_record(tmp_path / ALPHA_BETA_FILE, rec)
    assert read_alpha_beta(tmp_path / ALPHA_BETA_FILE) == ab
    write_population(tmp_path / POPULATION_FILE, _population())
    assert read_population(tmp_path / POPULATION_FILE) == _population()


@pytest.mark.parametrize("name", [LOG_FILE, ALPHA_BETA_FILE, POPULATION_FILE])
def test_older_run_reads_and_rewrites_byte_for_byte(tmp_path, name):
    """What the inline-dict writer wrote, read through the records and written back, is the same file."""
    old = OLD_RUN / name
    new = tmp_path / name
    if name == POPULATION_FILE:
        population = read_population(old)
        assert [c.rank for c in population.codes] == [1, 2, 3] and population.round == 2
        assert population.codes[0].history[-1] == (2, population.codes[0].fitness)
        write_population(new, population)
    else:
        records = read_log(old) if name == LOG_FILE else read_alpha_beta(old)
        kinds = [type(r).__name__ for r in records]
        assert kinds == (["EpochRecord", "EpochRecord", "RoundRecord", "EpochRecord", "RoundRecord"]
                         if name == LOG_FILE else ["AlphaBetaRecord"] * 2)
        for rec in records:
            append_record(new, rec)
    assert new.read_bytes() == old.read_bytes()


def test_train_log_events_are_skipped_when_only_rounds_are_asked(tmp_path):
    """A train run's log.jsonl has epoch records of another shape: reading its rounds reads none of them."""
    path = tmp_path / LOG_FILE
    path.write_text('{"event": "epoch", "epoch": 1, "train_loss": 1.0, "train_top1": 50.0}\n{"event": "final"}\n')
    assert read_log(path, kinds=(RoundRecord,)) == []
    with pytest.raises(RecordError, match=r"log.jsonl:1: missing 'phase'"):
        read_log(path)


def _lines(name: str):
    return [json.loads(line) for line in (OLD_RUN / name).read_text().splitlines()]


def _write_lines(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("line, change, message", [
    (2, {"best_fitness": "12.5"}, r"log.jsonl:3: 'best_fitness' must be a finite number, got '12.5'"),
    (2, {"best_fitness": float("nan")}, r"log.jsonl:3: 'best_fitness' must be a finite number, got nan"),
    (2, {"round": True}, r"log.jsonl:3: 'round' must be an integer, got True"),
    (2, {"population_op_counts": {"conv1x1": 1.5}}, r"log.jsonl:3: count of 'conv1x1' must be an integer"),
    (0, {"phase": 3}, r"log.jsonl:1: 'phase' must be a string, got 3"),
    (4, {"mean_fitness": None}, r"log.jsonl:5: 'mean_fitness' must be a finite number, got None"),
])
def test_malformed_log_record_names_file_line_and_field(tmp_path, line, change, message):
    records = _lines(LOG_FILE)
    records[line].update(change)
    with pytest.raises(RecordError, match=message):
        read_log(_write_lines(tmp_path / LOG_FILE, records))


def test_malformed_alpha_beta_and_population(tmp_path):
    records = _lines(ALPHA_BETA_FILE)
    bad = [records[0], dict(records[1], ops=records[1]["ops"][::-1])]
    with pytest.raises(RecordError, match=r"alpha_beta.jsonl:2: ops or layers differ from the first record"):
        read_alpha_beta(_write_lines(tmp_path / ALPHA_BETA_FILE, bad))
    bad = [dict(records[0], beta=records[0]["beta"][:-1])]
    with pytest.raises(RecordError, match=r"alpha_beta.jsonl:1: 'beta' must hold 17 values \(one per layer\)"):
        read_alpha_beta(_write_lines(tmp_path / ALPHA_BETA_FILE, bad))

    population = json.loads((OLD_RUN / POPULATION_FILE).read_text())
    path = tmp_path / POPULATION_FILE
    for change, message in [
            (lambda p: p["codes"][1].update(branches=3), r"code 2: 'branches' is 3 but 'bits' keeps \d+"),
            (lambda p: p["codes"][0]["bits"].__setitem__(4, "1101x111"), r"code 1: 'bits' must hold 17 strings of 8"),
            (lambda p: p["codes"].reverse(), r"population.json: the codes' ranks must be 1, 2, ... in order"),
            (lambda p: p["codes"][2].update(history=[[1, 2, 3]]), r"code 3: 'history' must be a list of \[round"),
            (lambda p: p.pop("layers"), r"population.json: missing 'layers'"),
            (lambda p: p.update(codes={}), r"expected an object with a 'codes' list")]:
        data = json.loads(json.dumps(population))
        change(data)
        path.write_text(json.dumps(data))
        with pytest.raises(RecordError, match=message):
            read_population(path)


def test_unfinished_last_line_is_skipped_but_a_bad_middle_line_is_not(tmp_path):
    path = tmp_path / LOG_FILE
    text = (OLD_RUN / LOG_FILE).read_text()
    path.write_text(text + '{"event": "round", "round": 3, "best')  # a search still appending
    assert len(read_log(path)) == 5
    path.write_text('{"event": "epoch", "ep\n' + text)
    with pytest.raises(RecordError, match=r"log.jsonl:1: not valid JSON"):
        read_log(path)


# -- fuzzed: whatever the content, a record or one RecordError line naming the file ----------------
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_json = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
READERS = {LOG_FILE: read_log, ALPHA_BETA_FILE: read_alpha_beta, POPULATION_FILE: read_population}


def _read_or_refused(path: Path) -> None:
    try:
        READERS[path.name](path)
    except RecordError as exc:
        text = str(exc)
        assert str(path) in text and "\n" not in text and len(text) < 600, text[:1000]


@FUZZ
@given(name=st.sampled_from(sorted(READERS)), line=st.integers(0, 4), where=st.integers(0, 2),
       changes=st.dictionaries(st.sampled_from(["round", "epoch", "event", "ops", "layers", "alpha", "beta", "codes",
                                                "rank", "bits", "history", "branches", "fitness", "best_fitness",
                                                "population_op_counts", "phase", "lr"]), _json, max_size=3))
def test_fuzzed_record_fields(tmp_path_factory, name, line, where, changes):
    path = tmp_path_factory.mktemp("rec") / name
    if name == POPULATION_FILE:
        data = json.loads((OLD_RUN / name).read_text())
        data.update({k: v for k, v in changes.items() if k in ("round", "ops", "layers", "codes")})
        if isinstance(data.get("codes"), list) and data["codes"] and isinstance(data["codes"][0], dict):
            # a copy: when changes replaced "codes" with its own list, the row updated may hold the very
            # object being written into it, and the data would contain itself
            data["codes"][where % len(data["codes"])].update(copy.deepcopy(changes))
        path.write_text(json.dumps(data))
    else:
        records = _lines(name)
        records[line % len(records)].update(changes)
        _write_lines(path, records)
    _read_or_refused(path)


@FUZZ
@given(name=st.sampled_from(sorted(READERS)), data=st.binary(max_size=512) | st.text(max_size=200).map(str.encode))
def test_fuzzed_record_bytes(tmp_path_factory, name, data):
    path = tmp_path_factory.mktemp("rec") / name
    path.write_bytes(data)
    _read_or_refused(path)


def test_older_run_still_plots(tmp_path):
    """The figures read the older run through the records (no matplotlib: the lane without [viz] skips)."""
    pytest.importorskip("matplotlib")
    from irep_deploy import viz
    run = tmp_path / "run"
    shutil.copytree(str(OLD_RUN), str(run))
    report = viz.plot(run)
    assert report.skipped == ["accuracy vs latency: no --points file"]
    data = json.loads((run / "figures" / "fitness.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [1, 2] and len(data["codes"]) == 3
