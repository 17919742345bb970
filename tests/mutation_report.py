"""Mutation score and surviving mutants of `make mutation`, from mutmut 3's state in mutants/.

Writes ``results/mutation/score.json`` (per module and per function: mutants by status and the
score) and ``results/mutation/survivors.md`` (every mutant no test killed, with its diff and its
triage). Triage lives in ``tests/mutation_equivalents.toml``: a mutant listed there is equivalent
(no test can tell it from the original) and leaves the score's denominator; every other survivor,
and every mutant that no test reaches, counts against the score.

Each equivalent entry stores the lines its mutation changes (``change``). Mutant numbers shift
when a function is edited, so an entry whose key now names a different change is reported as
stale (with the mutant that now carries its change, if any) and does not count as equivalent.

A module whose mutants were not all run is reported as partial: which functions were checked, or,
when the checked mutants are the uniformly random sample drawn by ``sample`` (recorded in
``results/mutation/sample.json``), the sampled score with a 95% Wilson interval. When tests were
written against the survivors of the sample's first ``tests_written_for`` names, the rest of the
sample (a prefix of the same permutation, drawn and run after those tests) is scored apart as
``held_out``: the estimate that is not biased by tests aimed at the sample. A module that
this mutants/ state did not run at all keeps its entry from the previous score.json if its
source is byte-identical to the one that entry was measured on (``carried_from`` says so).

Usage:
  python tests/mutation_report.py --command "<the command that ran mutmut>"
  python tests/mutation_report.py sample harness/embed.py --size 300 --seed 18   # prints mutant names
  python tests/mutation_report.py sample harness/embed.py --size 540 --seed 18 --tests-written-for 300
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import math
import random
import re
import subprocess
import tomllib
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.toml"
OUT = ROOT / "results" / "mutation"
# mutmut 3's exit codes (mutmut/stats.py); everything else is "suspicious"
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}
MUTANT = re.compile(r"^(?P<function>.+)__mutmut_(?P<number>orig|\d+)$")
Z95 = 1.959963984540054


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def load_statuses(mutants: Path) -> dict[str, dict[str, str]]:
    """{module path: {mutant name: status}} from the .meta files mutmut leaves beside each mutated module."""
    out = {}
    for meta in sorted(mutants.rglob("*.py.meta")):
        module = str(meta.relative_to(mutants))[: -len(".meta")]
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        out[module] = {name: STATUS.get(code, "suspicious") for name, code in codes.items()}
    return out


def function_of(name: str) -> str:
    return MUTANT.match(name.rsplit(".", 1)[1])["function"]


def mutant_diffs(mutants: Path, module: str) -> dict[str, list[str]]:
    """{mutant name: unified diff lines against the original function}, read from the mutated
    module mutmut writes (every variant is a function ``<function>__mutmut_<N>`` beside
    ``<function>__mutmut_orig``); the same diff ``mutmut show`` prints, without its 2 s per mutant."""
    path = mutants / module
    source = path.read_text()
    lines = source.splitlines()
    prefix = module[: -len(".py")].replace("/", ".")
    variants: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (match := MUTANT.match(node.name)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            body = [line.replace(node.name, match["function"]) for line in lines[first - 1: node.end_lineno]]
            variants[match["function"]][match["number"]] = body
    out = {}
    for function, bodies in variants.items():
        original = bodies.pop("orig", [])
        for number, body in bodies.items():
            out[f"{prefix}.{function}__mutmut_{number}"] = list(
                difflib.unified_diff(original, body, module, module, n=2, lineterm=""))
    return out


def change_of(diff_lines: list[str]) -> list[str]:
    """The changed lines of a diff, stripped: what an equivalent entry records and is matched by."""
    return [line[0] + line[1:].strip() for line in diff_lines
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def wilson(successes: int, n: int) -> list[float] | None:
    if not n:
        return None
    p = successes / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return [round(centre - half, 4), round(centre + half, 4)]


def load_equivalents() -> dict[str, dict]:
    if not EQUIVALENTS.is_file():
        return {}
    return tomllib.loads(EQUIVALENTS.read_text())["equivalent"]


def check_equivalents(equivalent: dict[str, dict], statuses: dict[str, dict[str, str]],
                      diffs: dict[str, list[str]]) -> dict[str, str]:
    """{entry: problem} for entries that do not (or no longer) describe their mutant."""
    by_change = defaultdict(list)
    for name, lines in diffs.items():
        by_change[(function_of(name), tuple(change_of(lines)))].append(name)
    status = {name: s for module in statuses.values() for name, s in module.items()}
    problems = {}
    for name, entry in equivalent.items():
        if name not in status:
            problems[name] = "no such mutant"
            continue
        if name not in diffs:
            continue  # module not in this mutants/ state
        if change_of(diffs[name]) != entry.get("change"):
            moved = [n for n in by_change[(function_of(name), tuple(entry.get("change") or ()))] if n != name]
            problems[name] = "stale: the mutant's change differs" + (f"; the recorded change is now {', '.join(moved)}"
                                                                    if moved else "")
        elif status[name] in ("killed", "timeout"):
            problems[name] = f"listed as equivalent but {status[name]}"
    return problems


def score_of(statuses: dict[str, str], equivalent: set[str]) -> dict:
    checked = {n: s for n, s in statuses.items() if s not in ("not checked", "skipped")}
    equivalents = sum(1 for n, s in checked.items() if s == "survived" and n in equivalent)
    killed = sum(1 for s in checked.values() if s in ("killed", "timeout"))
    denominator = len(checked) - equivalents
    return {"mutants": len(statuses), "checked": len(checked), "by_status": dict(sorted(Counter(statuses.values()).items())),
            "equivalent": equivalents, "killed_or_timeout": killed,
            "score_of_non_equivalent": round(killed / denominator, 4) if denominator else None}


def module_entry(module: str, statuses: dict[str, str], equivalent: set[str], sample: dict | None) -> dict:
    entry = score_of(statuses, equivalent)
    entry["source_blob"] = git("hash-object", str(ROOT / module))
    drawn = [n for n in sample["names"] if n in statuses] if sample else []
    if drawn and all(statuses[n] not in ("not checked", "skipped") for n in drawn):
        # the score of the random sample alone (other checked mutants, e.g. whole functions, left out)
        entry["sample"] = score_of({n: statuses[n] for n in drawn}, equivalent)
        entry["sample"]["drawn_by"] = f"{sample['drawn_by']}, names in results/mutation/sample.json"
        entry["sample"]["score_95ci_wilson"] = wilson(entry["sample"]["killed_or_timeout"],
                                                      entry["sample"]["checked"] - entry["sample"]["equivalent"])
        if sample.get("tests_written_for"):
            # tests were written to kill the survivors of the first ones drawn: their score is biased
            # upwards; the rest of the sample, run after those tests, estimates the module's score
            held_out = [n for n in sample["names"][sample["tests_written_for"]:] if n in statuses]
            entry["held_out"] = score_of({n: statuses[n] for n in held_out}, equivalent)
            entry["held_out"]["drawn"] = f"names {sample['tests_written_for'] + 1}-{len(sample['names'])} of the sample"
            entry["held_out"]["score_95ci_wilson"] = wilson(entry["held_out"]["killed_or_timeout"],
                                                            entry["held_out"]["checked"] - entry["held_out"]["equivalent"])
    if entry["checked"] in (0, entry["mutants"]):
        entry["coverage"] = "none" if not entry["checked"] else "all mutants"
        return entry
    by_function = defaultdict(dict)
    for name, s in statuses.items():
        by_function[function_of(name)][name] = s
    entry["functions"] = {f: {k: v for k, v in score_of(s, equivalent).items() if k != "by_status"}
                          for f, s in sorted(by_function.items())}
    if "sample" in entry:
        entry["coverage"] = f"uniformly random sample of {len(drawn)} of {entry['mutants']} mutants: see sample"
        if "held_out" in entry:
            entry["coverage"] += (f"; the first {sample['tests_written_for']} were triaged and their survivors killed "
                                  "by new tests, the rest were run after those tests: see held_out for the unbiased estimate")
    else:
        done = [f for f, s in entry["functions"].items() if s["checked"] == s["mutants"]]
        entry["coverage"] = f"{len(done)} of {len(entry['functions'])} functions fully checked (see functions)"
    return entry


def carried(module: str, previous: dict) -> dict | None:
    """The previous score.json's entry for ``module`` if it was measured on the same source."""
    old = previous.get("modules", {}).get(module)
    if not old or not old.get("checked"):
        return None
    if "source_blob" in old:
        old_blob = old["source_blob"]
        origin = old.get("carried_from") or {"commit": previous.get("commit"), "harness_tree": previous.get("harness_tree")}
    else:  # score.json from before source_blob was recorded: the module's blob in that harness tree
        old_blob = git("rev-parse", f"{previous.get('harness_tree')}:{Path(module).relative_to('harness')}")
        origin = {"commit": previous.get("commit"), "harness_tree": previous.get("harness_tree")}
    if old_blob != git("hash-object", str(ROOT / module)):
        return None
    return {**old, "source_blob": old_blob, "carried_from": origin}


def report(args: argparse.Namespace) -> None:
    equivalent = load_equivalents()
    statuses = load_statuses(args.mutants)
    if not statuses:
        raise SystemExit(f"no mutmut state under {args.mutants}: run `make mutation` first")
    samples = json.loads((args.out / "sample.json").read_text()) if (args.out / "sample.json").is_file() else {}
    previous = json.loads((args.out / "score.json").read_text()) if (args.out / "score.json").is_file() else {}
    diffs = {}
    for module in statuses:
        diffs.update(mutant_diffs(args.mutants, module))
    problems = check_equivalents(equivalent, statuses, diffs)
    valid = {name for name in equivalent if name not in problems}

    modules = {}
    for module, names in statuses.items():
        entry = module_entry(module, names, valid, samples.get(module))
        if not entry["checked"] and (old := carried(module, previous)):
            entry = old
        modules[module] = entry
    measured = [m for m in modules.values() if m["checked"]]
    complete = [m for m in measured if m["checked"] == m["mutants"]]
    killed = sum(m["killed_or_timeout"] for m in complete)
    denominator = sum(m["checked"] - m["equivalent"] for m in complete)
    summary = {
        "command": args.command,
        # the code the mutants were made from: mutmut reruns a function's mutants when its source changes
        "commit": git("rev-parse", "--short", "HEAD"),
        "harness_tree": git("rev-parse", "--short", "HEAD:harness"),
        "harness_changed_since_commit": bool(git("status", "--porcelain", "--", "harness")),
        "modules": modules,
        "fully_measured": sorted(m for m, e in modules.items() if e["checked"] and e["checked"] == e["mutants"]),
        "partly_measured": sorted(m for m, e in modules.items() if 0 < e["checked"] < e["mutants"]),
        "not_measured": sorted(m for m, e in modules.items() if not e["checked"]),
        "total_of_fully_measured_modules": {
            "mutants": sum(m["mutants"] for m in complete), "killed_or_timeout": killed,
            "equivalent": sum(m["equivalent"] for m in complete),
            "score_of_non_equivalent": round(killed / denominator, 4) if denominator else None},
        "stale_equivalents": problems,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "score.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    lines = ["# Surviving mutants", "", f"Generated by `tests/mutation_report.py` after `{args.command}`.",
             "Equivalent mutants (and why) are listed in `tests/mutation_equivalents.toml`.", ""]
    if problems:
        lines += ["## Equivalent entries that no longer match their mutant", ""]
        lines += [f"- `{name}`: {problem}" for name, problem in problems.items()] + [""]
    for module, names in statuses.items():
        open_ = [n for n, s in names.items() if s in ("survived", "no tests", "suspicious")]
        if modules[module].get("carried_from"):
            origin = modules[module]["carried_from"]
            lines += [f"## {module}", "", f"Not run in this mutants/ state: the counts in score.json are carried from the run "
                      f"at commit {origin['commit']} (harness tree {origin['harness_tree']}), whose source of this module "
                      "is byte-identical; its survivors are listed in that commit's survivors.md "
                      f"({modules[module]['checked'] - modules[module]['killed_or_timeout'] - modules[module]['equivalent']}"
                      " of them not triaged as equivalent).", ""]
            continue
        if not open_:
            continue
        lines += [f"## {module}", ""]
        for name in open_:
            verdict = (f"equivalent: {equivalent[name]['reason']}" if name in valid
                       else f"{names[name].upper()} (not triaged)")
            lines += [f"### {name}", "", verdict, "", "```diff", *diffs.get(name, ["(no diff)"]), "```", ""]
    (args.out / "survivors.md").write_text("\n".join(lines))
    print(json.dumps({m: (e["checked"], e["mutants"], e["score_of_non_equivalent"]) for m, e in modules.items()}))
    if problems:
        print(f"{len(problems)} equivalent entries do not match their mutant: see survivors.md")


def sample(args: argparse.Namespace) -> None:
    """Draws a uniformly random sample of a module's mutants, records it in sample.json, prints the names
    (one line each, in drawing order: feed them to `mutmut run` in chunks)."""
    names = sorted(load_statuses(args.mutants)[args.module])
    # a prefix of one seeded permutation: a larger sample with the same seed contains the smaller one
    chosen = random.Random(args.seed).sample(names, len(names))[: args.size]
    path = args.out / "sample.json"
    samples = json.loads(path.read_text()) if path.is_file() else {}
    samples[args.module] = {"seed": args.seed, "size": len(chosen), "population": len(names),
                            "drawn_by": f"the first {len(chosen)} of random.Random({args.seed}).sample(sorted names, all)",
                            "names": chosen}
    if args.tests_written_for:
        samples[args.module]["tests_written_for"] = args.tests_written_for
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n")
    print("\n".join(chosen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "mutants")
    parser.add_argument("--out", type=Path, default=OUT)
    sub = parser.add_subparsers(dest="action")
    draw = sub.add_parser("sample", help="draw and record a random sample of one module's mutants")
    draw.add_argument("module", help="e.g. harness/embed.py")
    draw.add_argument("--size", type=int, required=True)
    draw.add_argument("--seed", type=int, required=True)
    draw.add_argument("--tests-written-for", type=int, default=0,
                      help="how many of the first names had their survivors killed by new tests (scored apart)")
    parser.add_argument("--command", help="the command that produced the run (recorded)")
    args = parser.parse_args(argv)
    if args.action == "sample":
        sample(args)
    elif args.command is None:
        parser.error("--command is required")
    else:
        report(args)


if __name__ == "__main__":
    main()
