"""`python -m experiments.benchmark` keeps working: the tool is `experiments.bench.benchmark`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("experiments.bench.benchmark", run_name="__main__", alter_sys=True)
