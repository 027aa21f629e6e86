"""`python -m experiments.gpu_check` keeps working: the tool is `experiments.bench.gpu_check`."""

import runpy

if __name__ == "__main__":
    runpy.run_module("experiments.bench.gpu_check", run_name="__main__", alter_sys=True)
