r"""Diagnostic: how strongly each layer's alpha is pushed by the pFedLA update.

Prints, at a few rounds, the mean |G[s, l, j] - sum_j alpha[s, l, j] G[s, l, j]| per layer,
the centred closed-form cotangent (what moves a normalised alpha). BUILD_NOTES §4 quotes it.

  python -m experiments.cotangent_norms --samples_per_client=200 --lr=0.05 --rounds=20
"""

from __future__ import annotations

from absl import app, flags

from experiments.run import parse_flags, start

_AT = flags.DEFINE_list("report_rounds", ["1", "10", "19"], "Rounds (0-based) to report.")


def main(argv):
    start(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments.run import _config, _run_options, algorithm_config_from_flags
    from pfedla_jax.core.aggregation import alpha_cotangent
    from pfedla_jax.core.stacking import take_clients
    from pfedla_jax.training.config import with_algorithm
    from pfedla_jax.training.loop import build_experiment

    config = with_algorithm(_config(strict=False), "pfedla", algorithm_config_from_flags("pfedla"))
    exp = build_experiment(config, _run_options())
    algo, n = exp.algorithm, config.num_clients
    state = algo.init(exp.keys.init)  # the keys run_experiment uses
    ids = jnp.arange(n, dtype=jnp.int32)
    report = {int(r) for r in _AT.value}
    for t in range(config.rounds):
        if t in report:
            hn = take_clients(state["hn_params"], ids)
            alpha, _, bar = algo.personalize(hn, state["client_params"], ids)
            trained, _, _ = algo.ctx.trainer.train(
                bar, take_clients(state["batch_stats"], ids), ids, exp.round_key(t))
            delta = jax.tree.map(jnp.subtract, trained, bar)
            cot = alpha_cotangent(state["client_params"], delta, algo.layer_map)[:, :, :n]
            centred = np.abs(np.asarray(cot - (alpha * cot).sum(-1, keepdims=True))).mean((0, 2))
            print(f"round {t}: " + "  ".join(f"{n} {v:.4f}" for n, v in zip(algo.layer_map.names, centred)),
                  flush=True)
        state, _ = algo.round(state, t, exp.schedule[t], exp.round_key(t))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
