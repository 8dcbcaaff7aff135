"""Which code a search answers with, and why (search/answer.py): the best-seen record beside the
answer in population.json, the explanation `show` prints for a run's codes, older runs without it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from irep_deploy import ArchCode
from irep_deploy.cli import main
from irep_deploy.errors import RecordError
from irep_deploy.search.answer import differs, explain_population
from irep_deploy.search.records import POPULATION_FILE, BestSeen, read_population, write_population

OLD_RUN = Path(__file__).parent / "data" / "search_run_v0"  # three codes of round 2, no best_seen


def _run(tmp_path: Path, seen_rank: int, seen_round: int = 1, seen_fitness: float = 78.17) -> Path:
    """The old run with the best-seen code of a newer search: the code ranked ``seen_rank`` in round 2."""
    run = tmp_path / "run"
    shutil.copytree(str(OLD_RUN), str(run))
    population = read_population(run / POPULATION_FILE)
    code = population.codes[seen_rank - 1]
    population.best_seen = BestSeen(round=seen_round, fitness=seen_fitness, branches=code.branches, bits=code.bits)
    write_population(run / POPULATION_FILE, population)
    answer = ArchCode.load(run / "arch.bin")
    answer.with_bits([[int(ch) for ch in row] for row in code.bits]).save(run / "best_seen_arch.bin")
    return run


def _show(capsys, path) -> str:
    assert main(["show", str(path)]) == 0
    return capsys.readouterr().out


def test_show_names_the_answer_and_a_differing_best_seen_code(tmp_path, capsys):
    run = _run(tmp_path, seen_rank=2)
    population = read_population(run / POPULATION_FILE)
    assert differs(population) and population.best_seen.round == 1
    out = _show(capsys, run)  # a run directory shows its answer
    assert out == _show(capsys, run / "arch.bin")
    lines = out.splitlines()
    assert lines[0].startswith("layer") and lines[-2] == "this code: the search's answer"
    final = population.codes[0].fitness
    assert lines[-1].startswith("answer: {0}/arch.bin, the best code of the final round 2 (fitness {1:.2f}%). "
                                "Algorithm 1 outputs the final population".format(run, final))
    assert lines[-1].endswith("The best fitness of any round, 78.17% in round 1, belongs to another code: "
                              "{}/best_seen_arch.bin.".format(run))
    seen = _show(capsys, run / "best_seen_arch.bin").splitlines()
    assert seen[-2] == "this code: the best-scoring code of any round (round 1, 78.17%), not the search's answer"
    assert seen[-1] == lines[-1]


def test_show_says_when_the_answer_is_also_the_best_seen_code(tmp_path, capsys):
    run = _run(tmp_path, seen_rank=1, seen_round=2, seen_fitness=read_population(
        OLD_RUN / POPULATION_FILE).codes[0].fitness)
    assert not differs(read_population(run / POPULATION_FILE))
    lines = _show(capsys, run).splitlines()
    assert lines[-2] == "this code: the search's answer, and the best-scoring code of any round"
    assert lines[-1].endswith("is the same code's ({}/best_seen_arch.bin equals it).".format(run))


def test_older_run_and_plain_code_files(tmp_path, capsys):
    """A run written before best_seen explains its answer and says the rest is not recorded; a code
    outside a run shows the matrix alone; a directory that is no run is refused in one line."""
    lines = _show(capsys, OLD_RUN).splitlines()
    assert lines[-1].endswith("This run records no best-seen code (written by an earlier version).")
    assert not differs(read_population(OLD_RUN / POPULATION_FILE))
    shutil.copy(str(OLD_RUN / "arch.bin"), str(tmp_path / "code.bin"))
    assert "answer" not in _show(capsys, tmp_path / "code.bin")
    assert main(["show", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an architecture code nor a search run directory" in err[0]


def test_a_malformed_best_seen_record_is_one_line_naming_it(tmp_path):
    run = _run(tmp_path, seen_rank=2)
    text = (run / POPULATION_FILE).read_text()
    (run / POPULATION_FILE).write_text(text.replace('"round": 1', '"round": "1"', 1))
    with pytest.raises(RecordError, match="population.json: best_seen: 'round' must be an integer"):
        read_population(run / POPULATION_FILE)
    population = read_population(OLD_RUN / POPULATION_FILE)
    population.codes = []
    with pytest.raises(RecordError, match="holds no code"):
        explain_population(population)
