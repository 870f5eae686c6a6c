"""The mutants of the mutation-testing run in BENCHMARKS.md: a fixed sample.

Mutation testing runs outside CI (``[tool.mutmut]`` in ``pyproject.toml``
says what is mutated and which tests run). Every mutant of the tower and
every 3rd, 4th and 8th of the schedule, the collectives and the periodic
engine, in mutmut's own order of functions and mutant numbers, so that a
rerun tests the same mutants:

    pip install mutmut==3.8.1
    mutmut run "optax_dist._tower*"      # makes every mutant, runs the tower's
    mutmut run --max-children 2 $(python benchmarks/mutation_sample.py)
    mutmut results

Prints the sampled mutant names, one per line.
"""

import re
import subprocess
import sys

# Every k-th mutant of each module.
# The periodic engine is _engine, _declare, _reduce, _syncloop and _flags
# (one module, _periodic, before the split: every 8th of its mutants).
STEPS = {
  "_tower": 1,
  "_schedule": 3,
  "_flags": 3,
  "_collectives": 4,
  "_engine": 8,
  "_declare": 8,
  "_reduce": 8,
  "_syncloop": 8,
}


def sample(names):
  by_module = {}
  for name in names:
    by_module.setdefault(name.split(".")[1], []).append(name)
  chosen = []
  for module, group in by_module.items():
    if module not in STEPS:
      continue
    group.sort(key=lambda n: (n.rsplit("__mutmut_", 1)[0], int(n.rsplit("_", 1)[1])))
    chosen += group[:: STEPS[module]]
  return chosen


def main():
  listing = subprocess.run(
    ["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True
  ).stdout
  names = re.findall(r"^\s*(optax_dist\.\S+__mutmut_\d+):", listing, re.M)
  if not names:
    sys.exit('no mutants listed: run `mutmut run "optax_dist._tower*"` first')
  print("\n".join(sample(names)))


if __name__ == "__main__":
  main()
