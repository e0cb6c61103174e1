"""`make mutation`: mutmut over the core modules, one module at a time, and branch coverage beside it.

Each module is mutated in its own copy of the checkout (the git-tracked files, under
``build/mutation/<module>``) whose ``pyproject.toml`` names that module's source files and the test
files that exercise it directly.  mutmut records which of those tests reach each function and runs
only them against each mutant, so a module takes minutes: the end-to-end tests (every compile packs,
tiles and searches) would make every mutant of the core run the whole suite.  Branch coverage is
measured with the same test files (``coverage run --branch``).

Results go to ``docs/results/mutation.json`` (kept for modules not rerun) and the table in
``docs/results/mutation.md``.  Usage::

    python scripts/mutation.py [MODULE ...]       # default: every module below; `--list` shows them

Run it niced and on one worker (the Makefile does): mutation runs are CPU-heavy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_JSON = os.path.join(ROOT, "docs", "results", "mutation.json")
RESULTS_MD = os.path.join(ROOT, "docs", "results", "mutation.md")

#: module -> (source files to mutate, test files that exercise them directly)
MODULES: dict[str, tuple[list[str], list[str]]] = {
    "crossbar": (["psq_tvm/core/crossbar.py"],
                 ["tests/test_crossbar.py", "tests/test_crossbar_limits.py", "tests/test_adc_boundary.py"]),
    "tiling": (["psq_tvm/core/tiling.py"], ["tests/test_tiling.py", "tests/test_packing.py", "tests/test_search.py"]),
    "tables": (["psq_tvm/core/tables.py"], ["tests/test_packing.py"]),
    "packing": (["psq_tvm/core/packing.py"], ["tests/test_packing.py", "tests/test_allocation.py"]),
    "allocation": (["psq_tvm/core/allocation.py"], ["tests/test_allocation.py", "tests/test_search.py"]),
    "search": (["psq_tvm/core/search.py", "psq_tvm/core/candidates.py"],
               ["tests/test_search.py", "tests/test_search_properties.py", "tests/test_search_mutants.py",
                "tests/test_search_config.py", "tests/test_allocation.py"]),
    "simulator": (["psq_tvm/runtime/simulator/*"],
                  ["tests/test_simulator.py", "tests/test_simulator_devices.py", "tests/test_adc_boundary.py",
                   "tests/test_adc_range.py", "tests/test_simulator_mutants.py"]),
    "package": (["psq_tvm/runtime/package.py"],
                ["tests/test_package_units.py", "tests/test_package.py", "tests/test_package_blobs.py",
                 "tests/test_package_integrity.py"]),
    "verify": (["psq_tvm/runtime/verify.py"],
               ["tests/test_verify.py", "tests/test_cli.py", "tests/test_cli_options.py"]),
    # cli: the fast unit tests only (fakes in place of the compile, the loaders and verify).  The end-to-end
    # CLI tests (tests/test_cli.py, test_cli_options.py, test_reliability.py: real compiles, a minute or more
    # per mutant) are left out of the mutation run for cost, so cli's score is a lower bound.
    "cli": (["psq_tvm/cli.py"], ["tests/test_cli_units.py"]),
}

#: mutmut exit-code statuses that count as killed / as tested (mutmut's own score: killed + timeout)
KILLED = {"killed", "timeout", "caught by type check", "segfault"}
NOT_TESTED = {"not checked", "skipped", "check was interrupted by user"}


def _copy_tree(dst: str) -> None:
    """The git-tracked files of the checkout (with the working-tree contents) into ``dst``."""
    if os.path.exists(dst):
        shutil.rmtree(dst)
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout.split(b"\0")
    for f in (f.decode() for f in files if f):
        src = os.path.join(ROOT, f)
        if not os.path.isfile(src) or os.path.islink(src):
            continue
        os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
        shutil.copy2(src, os.path.join(dst, f))


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _write_config(work: str, sources: list[str], tests: list[str]) -> None:
    path = os.path.join(work, "pyproject.toml")
    with open(path) as f:
        text = f.read()
    text = text.split("\n[tool.mutmut]")[0].rstrip() + "\n"
    text += ("\n[tool.mutmut]\n"
             'source_paths = ["psq_tvm/"]\n'
             f"only_mutate = {_toml_list(sources)}\n"
             f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
             'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
             'also_copy = ["scripts/"]\n')
    with open(path, "w") as f:
        f.write(text)


def _run(cmd: list[str], cwd: str, log) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=cwd, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}  (exit {r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}\n")
    return r


def _statuses(work: str, log) -> dict[str, str]:
    """mutant name -> mutmut status, for every mutant of the run in ``work``."""
    res = _run([sys.executable, "-m", "mutmut", "results", "--all", "true"], work, log)
    status: dict[str, str] = {}
    for line in res.stdout.splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    return status


def _generate(work: str, log) -> list[str]:
    """Generate the mutants and mutmut's test-to-function map without running any mutant; their names.

    mutmut 3.8 has no command for this: ``mutmut run`` with a name pattern that matches no mutant does
    the generation and the traced test run, then stops with "nothing matches"."""
    r = _run([sys.executable, "-m", "mutmut", "run", "--max-children", "1", "psq_tvm.no_such_module.x_none*"],
             work, log)
    names = sorted(_statuses(work, log))
    if not names:
        raise SystemExit(f"mutation: mutmut generated no mutants in {work} (exit {r.returncode}); see the log")
    return names


def sample_names(names: list[str], n: int, seed: int) -> list[str]:
    """A seeded uniform sample of ``n`` mutant names (all of them when n >= len(names))."""
    return sorted(names) if n >= len(names) else sorted(random.Random(seed).sample(sorted(names), n))


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n (the score of a sampled run), in percent."""
    if n == 0:
        return 0.0, 100.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return round(100 * max(0.0, c - h), 1), round(100 * min(1.0, c + h), 1)


def measure(name: str, work_root: str, max_children: int, sample: int | None = None, seed: int = 0) -> dict:
    sources, tests = MODULES[name]
    work = os.path.join(work_root, name)
    _copy_tree(work)
    _write_config(work, sources, tests)
    t0 = time.time()
    chosen = None
    with open(os.path.join(work_root, f"{name}.log"), "w") as log:
        cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)]
        if sample:
            chosen = sample_names(_generate(work, log), sample, seed)
            cmd += chosen
        _run(cmd, work, log)
    minutes = (time.time() - t0) / 60
    return collect(name, work_root, minutes, sampled=chosen, seed=seed)


def collect(name: str, work_root: str, minutes: float | None = None, partial: bool = False,
            sampled: list[str] | None = None, seed: int = 0) -> dict:
    """Statuses, survivors and branch coverage of a module's mutmut run in ``work_root/name`` (with
    ``partial``: of a run stopped before the end; mutants not run yet are reported as such; with
    ``sampled``: only those mutants were run and count)."""
    sources, tests = MODULES[name]
    work = os.path.join(work_root, name)
    py = sys.executable
    with open(os.path.join(work_root, f"{name}.log"), "a") as log:
        status = _statuses(work, log)
        all_mutants = len(status)
        if sampled is not None:
            chosen = set(sampled)
            status = {k: v for k, v in status.items() if k in chosen}
        survivors = {}
        for k, v in sorted(status.items()):
            if v == "survived":
                survivors[k] = _run([py, "-m", "mutmut", "show", k], work, log).stdout.strip()
        # branch coverage of the module's files by the same tests
        _run([py, "-m", "coverage", "run", "--branch", "--source=psq_tvm", "-m", "pytest", "-q", "-p",
              "no:cacheprovider", *tests], work, log)
        _run([py, "-m", "coverage", "json", "-o", "coverage.json"], work, log)
    cov_files = {}
    try:
        with open(os.path.join(work, "coverage.json")) as f:
            cov_files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        pass
    covered = total = 0
    for f, data in cov_files.items():
        rel = os.path.relpath(f, work) if os.path.isabs(f) else f
        if any(re.fullmatch(s.replace("*", "[^/]*"), rel) for s in sources):
            covered += data["summary"].get("covered_branches", 0)
            total += data["summary"].get("num_branches", 0)
    counts: dict[str, int] = {}
    for v in status.values():
        counts[v] = counts.get(v, 0) + 1
    killed = sum(n for s, n in counts.items() if s in KILLED)
    tested = sum(n for s, n in counts.items() if s not in NOT_TESTED)
    sample = None
    if sampled is not None:
        sample = {"of": all_mutants, "n": len(status), "seed": seed, "interval": wilson_interval(killed, tested)}
    return {"sources": sources, "tests": tests, "mutants": all_mutants, "sample": sample, "counts": counts, "killed": killed,
            "tested": tested, "score": round(100.0 * killed / tested, 1) if tested else None,
            "branch_coverage": round(100.0 * covered / total, 1) if total else None,
            "branches": [covered, total], "minutes": None if minutes is None else round(minutes, 1),
            "partial": partial and counts.get("not checked", 0) > 0, "date": datetime.date.today().isoformat(), "survivors": survivors}


def write_report(results: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS_JSON), exist_ok=True)
    tmp = RESULTS_JSON + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, RESULTS_JSON)
    lines = ["# Mutation score and branch coverage of the core modules",
             "",
             "Written by `make mutation` (`scripts/mutation.py`; mutmut 3.8.1, one module at a time, each mutant",
             "run against the listed tests that reach the mutated function).  Score = killed / tested",
             "(mutmut's: killed + timeouts; mutants no test reaches count as survivors).  Where a module's",
             "mutants cost too much to run them all, a seeded uniform sample is run (`--sample N`) and the",
             "score is given with its 95 % Wilson interval.  Branch coverage:",
             "`coverage run --branch` of the same tests over the module's files.  What the survivors are and",
             "why they remain: [docs/testing.md](../testing.md).",
             "",
             "| module | files | tests | mutants | killed | survived | no tests | score | branch coverage | minutes | date |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in MODULES:
        r = results.get(name)
        if r is None:
            lines.append(f"| {name} | {', '.join(MODULES[name][0])} | | not measured yet | | | | | | | |")
            continue
        c = r["counts"]
        score = f"{r['score']:.1f} %" if r["score"] is not None else "-"
        if r.get("sample"):
            lo, hi = r["sample"]["interval"]
            score += f" (95 %: {lo:.1f}-{hi:.1f})"
        cov = f"{r['branch_coverage']:.1f} % ({r['branches'][0]}/{r['branches'][1]})" if r["branch_coverage"] is not None else "-"
        mutants = f"{r['mutants']}" + (f" ({c['not checked']} not run yet)" if c.get("not checked") else "")
        if r.get("sample"):
            mutants += f" (seeded sample of {r['sample']['n']} run, seed {r['sample']['seed']})"
        lines.append(f"| {name} | {', '.join(r['sources'])} | {', '.join(t.removeprefix('tests/') for t in r['tests'])} | "
                     f"{mutants} | {r['killed']} | {c.get('survived', 0)} | {c.get('no tests', 0)} | {score} | "
                     f"{cov} | {r['minutes'] if r['minutes'] is not None else '-'} | {r['date']} |")
    lines += ["", "## Surviving mutants", ""]
    for name in MODULES:
        r = results.get(name)
        if not r or not r["survivors"]:
            continue
        lines += [f"### {name} ({len(r['survivors'])})", ""]
        for k, diff in r["survivors"].items():
            body = "\n".join(l for l in diff.splitlines() if l.startswith(("+", "-")) and not l.startswith(("+++", "---")))
            lines += [f"* `{k}`", "", "  ```diff", *("  " + l for l in body.splitlines()), "  ```", ""]
    tmp = RESULTS_MD + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, RESULTS_MD)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"modules to measure (default: all of {list(MODULES)})")
    ap.add_argument("--list", action="store_true", help="list the modules, their files and tests")
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "mutation"), help="where the copies go")
    ap.add_argument("--max-children", type=int, default=1, help="mutmut workers (default 1)")
    ap.add_argument("--sample", type=int, default=None, metavar="N",
                    help="run a seeded uniform sample of N mutants per module (score with a 95%% interval)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    ap.add_argument("--collect-partial", action="store_true",
                    help="do not run: report the runs already in --work for the named modules (stopped ones; with --sample/--seed: that sample, e.g. after re-running its survivors)")
    a = ap.parse_args(argv)
    if a.list:
        for k, (src, tests) in MODULES.items():
            print(f"{k}: {' '.join(src)}  <-  {' '.join(tests)}")
        return 0
    unknown = [m for m in a.modules if m not in MODULES]
    if unknown:
        print(f"mutation: unknown module(s) {unknown}; choose from {list(MODULES)}", file=sys.stderr)
        return 2
    os.makedirs(a.work, exist_ok=True)
    for name in a.modules or list(MODULES):
        print(f"mutation: {name} ...", flush=True)
        if a.collect_partial:
            # a stopped run, or a sampled run whose survivors were run again (`mutmut run NAME...` in its
            # work copy after tests were added): the same --sample/--seed pick the same mutants
            sampled = None
            if a.sample:
                with open(os.path.join(a.work, f"{name}.log"), "a") as log:
                    sampled = sample_names(list(_statuses(os.path.join(a.work, name), log)), a.sample, a.seed)
            r = collect(name, a.work, _results().get(name, {}).get("minutes"), partial=True, sampled=sampled,
                        seed=a.seed)
        else:
            r = measure(name, a.work, a.max_children, a.sample, a.seed)
        print(f"mutation: {name}: {r['killed']}/{r['tested']} killed ({r['score']} %), branch coverage "
              f"{r['branch_coverage']} %, {r['minutes']} min", flush=True)
        results = _results()        # read again: another run may have written its module meanwhile
        results[name] = r
        write_report(results)
    return 0


def _results() -> dict:
    """The report's modules as last written (empty before the first run)."""
    if not os.path.exists(RESULTS_JSON):
        return {}
    with open(RESULTS_JSON) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
