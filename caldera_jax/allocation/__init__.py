"""Sensitivity-guided budget allocation (pure functions; no file I/O, no checkpoint reading).

    options.py      the per-matrix choices (bits, rank) or protection, and their exact cost in bits
    error_model.py  E_i(b, r) = s_i·(α·2^(−β·b) + γ·(r+1)^(−δ)) fitted to a sweep; interpolation fallback
    knapsack.py     exact multiple-choice knapsack (DP over discretised costs, with a lower bound)
    plan.py         one allocation: options + error model + weights + budget -> per-matrix choice,
                    and the compress job config (YAML text) that applies it
The jobs that read models and write files are caldera_jax.pipeline.error_sweep / .allocate.
"""
