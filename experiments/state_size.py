"""`python -m experiments.state_size` keeps working: the tool is `experiments.bench.state_size`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("experiments.bench.state_size", run_name="__main__", alter_sys=True)
