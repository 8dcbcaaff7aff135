"""Recompute the statistics of stored results files from the data they hold, without training,
searching or timing anything again.

Each script's own analysis function does the work (the one a rerun would call), so a file
reanalysed here reads as the script would write it today: Holm-corrected paired differences
(``evidence_fmnist.summarise``, ``search_phase.analyse``), intervals on every Kendall tau and on the
seed-to-seed ceiling (``ranking.analyse``), the latency trust rule and target verdicts
(``bench_search.reanalyse``). The file's ``command`` stays the one that produced its data; a
``reanalysed`` field records what was recomputed, by which command, on which commit and when.

    python benchmarks/reanalyse.py                 # every file below, in benchmarks/results
    python benchmarks/reanalyse.py ranking.json    # some of them
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

RESULTS = Path(__file__).resolve().parent / "results"


def _evidence(result: Dict[str, Any], folder: Path) -> Tuple[List[str], str]:
    import evidence_fmnist
    result["summary"] = evidence_fmnist.summarise(result["runs"])
    return ["summary"], evidence_fmnist.markdown(result)


def _search_phase(result: Dict[str, Any], folder: Path) -> Tuple[List[str], str]:
    import search_phase
    result["analysis"] = search_phase.analyse(result["searches"])
    fields = ["analysis"]
    if any(a.endswith("-recal") for a in result["arms"]):  # like for like: the unrecalibrated arms on these seeds
        name = "search_phase.json"
        baseline = json.loads((folder / name).read_text())
        result["baseline"] = search_phase.baseline_comparison(baseline, result["analysis"]["seeds"], name)
        fields.append("baseline")
    return fields, search_phase.markdown(result)


def _ranking(result: Dict[str, Any], folder: Path) -> Tuple[List[str], str]:
    import ranking
    result["analysis"] = ranking.analyse(result["codes"], result["runs"], result["seeds"])
    result["analysis_recalibrated"] = ranking.analyse(result["codes"], result["runs"], result["seeds"],
                                                      "fitness_recalibrated")
    return ["analysis", "analysis_recalibrated"], ranking.markdown(result)


def _search_cpu(result: Dict[str, Any], folder: Path) -> Tuple[List[str], str]:
    import bench_search
    bench_search.reanalyse(result)
    return [k for k in ("step", "population") if result.get(k)], bench_search.markdown(result)


FILES: Dict[str, Callable[[Dict[str, Any], Path], Tuple[List[str], str]]] = {
    "evidence_fmnist.json": _evidence, "evidence_fmnist_vgg16.json": _evidence,
    "evidence_fmnist_5seeds.json": _evidence, "search_phase.json": _search_phase,
    "search_phase_recal.json": _search_phase, "ranking.json": _ranking, "search_cpu.json": _search_cpu}


def reanalyse(path: Path, command: str) -> Dict[str, Any]:
    from _common import git_state, write_results  # torch: not needed to refuse a bad argument
    result = json.loads(path.read_text())
    fields, markdown = FILES[path.name](result, path.parent)
    result["reanalysed"] = {"command": command, **git_state(),
                            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            "fields": fields,
                            "note": "statistics recomputed from the data stored in this file; nothing was rerun"}
    write_results(path.with_suffix(""), result, markdown)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=list(FILES), help="results files (names in benchmarks/results)")
    parser.add_argument("--results", default=str(RESULTS), help="the results directory")
    args = parser.parse_args()
    unknown = [f for f in args.files if Path(f).name not in FILES]
    if unknown:
        raise SystemExit("reanalyse: no analysis for {} (known: {})".format(", ".join(unknown), ", ".join(FILES)))
    for name in args.files:
        path = Path(args.results) / Path(name).name
        if not path.is_file():
            raise SystemExit("reanalyse: {}: no such file".format(path))
        reanalyse(path, "python benchmarks/reanalyse.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
