"""Exact multiple-choice knapsack: pick one option per group, minimise Σ value, Σ cost ≤ budget.

    sol = solve(costs, values, budget)        # costs: [[int bits, ...] per group], values: floats

Dynamic programming over discretised costs:
  1. every group's cheapest option is subtracted (costs and budget): only the excess over the
     cheapest choice is discretised; an impossible budget raises InfeasibleBudget naming the
     minimum achievable cost;
  2. the unit u: the gcd of the excess costs when budget/gcd fits in `max_cells` cells (then the
     DP is exact on the true integer costs), else ceil(excess budget / max_cells);
  3. costs are rounded UP to units and the capacity DOWN, so the chosen options never exceed the
     budget in true bits; with u > 1 a second DP with costs rounded DOWN (a relaxation: every
     feasible choice stays feasible) gives a lower bound on the true optimum, reported with the gap.
dp[c] = the least value of the groups so far with rounded cost ≤ c; per group O(options · cells)
numpy work; backtracking keeps one int8/int16 choice per (group, cell).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

DEFAULT_MAX_CELLS = 1 << 18


class InfeasibleBudget(ValueError):
    """The budget is below the cheapest choice of every group (the message gives that minimum)."""


class KnapsackError(ValueError):
    """Malformed instance (the message names the group and option)."""


@dataclasses.dataclass(frozen=True)
class Solution:
    choice: tuple[int, ...]    # option index per group
    cost: int                  # Σ true cost of the choice (bits) ≤ budget
    value: float               # Σ value of the choice
    budget: int
    min_cost: int              # the cheapest possible total (every group's cheapest option)
    unit: int                  # discretisation unit (bits); 1 cell = unit bits of excess cost
    cells: int                 # DP capacity in units
    exact: bool                # the DP ran on the true costs (every excess cost a multiple of unit)
    rounding_bits: int         # Σ over the choice of (rounded-up cost − true cost)
    lower_bound: float         # a proven lower bound on the optimum (== value when exact)

    @property
    def gap(self) -> float:
        """value − lower bound (0: proven optimal)."""
        return self.value - self.lower_bound


def _check(costs, values, budget):
    if len(costs) != len(values) or not costs:
        raise KnapsackError(f"knapsack: {len(costs)} cost lists and {len(values)} value lists (need equal, > 0)")
    cs, vs = [], []
    for g, (c, v) in enumerate(zip(costs, values)):
        c = [int(x) for x in c]
        v = [float(x) for x in v]
        if not c or len(c) != len(v):
            raise KnapsackError(f"knapsack: group {g} has {len(c)} costs and {len(v)} values (need equal, > 0)")
        if min(c) < 0:
            raise KnapsackError(f"knapsack: group {g} has a negative cost {min(c)}")
        if not all(math.isfinite(x) for x in v):
            raise KnapsackError(f"knapsack: group {g} has a non-finite value")
        if len(c) > 32767:
            raise KnapsackError(f"knapsack: group {g} has {len(c)} options (at most 32767)")
        cs.append(np.asarray(c, np.int64))
        vs.append(np.asarray(v, np.float64))
    if int(budget) != budget:
        raise KnapsackError(f"knapsack: budget {budget!r} must be an integer number of bits")
    return cs, vs, int(budget)


def _dp(w: list[np.ndarray], vs: list[np.ndarray], cells: int, track: bool):
    """min Σ v with Σ w ≤ cells (w integer ≥ 0); returns (best value, choice per group or None)."""
    inf = np.inf
    prev = np.zeros(cells + 1, np.float64)
    arg = [] if track else None
    dtype = np.int8 if max(len(x) for x in w) < 128 else np.int16
    for wg, vg in zip(w, vs):
        order, low = [], inf                            # cheaper first: argmin ties keep the cheaper;
        for j in np.argsort(wg, kind="stable"):         # an option no better than a cheaper one is
            if vg[j] < low and wg[j] <= cells:           # never needed (dominated): skipped
                order.append(j)
                low = vg[j]
        order = np.asarray(order, np.int64)
        cand = np.full((len(order), cells + 1), inf)
        for row, j in enumerate(order):
            k = int(wg[j])
            np.add(prev[: cells + 1 - k], vg[j], out=cand[row, k:])
        best_row = np.argmin(cand, axis=0)
        prev = np.take_along_axis(cand, best_row[None], axis=0)[0]
        if track:
            arg.append(order[best_row].astype(dtype))
    best = float(prev[cells])
    if not track:
        return best, None
    choice, c = [], cells
    for g in range(len(w) - 1, -1, -1):
        j = int(arg[g][c])
        choice.append(j)
        c -= int(w[g][j])
    return best, tuple(reversed(choice))


def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int, *,
          max_cells: int = DEFAULT_MAX_CELLS, lower_bound: bool = True) -> Solution:
    """The choice (one option per group) minimising Σ values with Σ costs ≤ budget (see module doc)."""
    cs, vs, budget = _check(costs, values, budget)
    mins = [int(c.min()) for c in cs]
    min_cost = sum(mins)
    if min_cost > budget:
        raise InfeasibleBudget(f"budget {budget} bits is below the minimum achievable {min_cost} bits "
                               f"(every matrix at its cheapest option)")
    excess = [c - m for c, m in zip(cs, mins)]
    slack = budget - min_cost
    g = 0
    for e in excess:
        g = math.gcd(g, *(int(x) for x in e[e <= slack]))
    if g and slack // g <= max_cells:
        unit = g
    else:
        unit = max(1, -(-slack // max_cells))
    cells = slack // unit
    up = [-(-e // unit) for e in excess]
    exact = all(bool(np.all(e[e <= slack] % unit == 0)) for e in excess)
    value, choice = _dp(up, vs, cells, track=True)
    if not math.isfinite(value):            # cannot happen: the cheapest options always fit
        raise KnapsackError("knapsack: no feasible choice found")
    cost = sum(int(c[j]) for c, j in zip(cs, choice))
    value = float(sum(v[j] for v, j in zip(vs, choice)))
    rounding = sum(int(u[j]) * unit - int(e[j]) for u, e, j in zip(up, excess, choice))
    lb = value
    if not exact and lower_bound:
        lb = min(value, _dp([e // unit for e in excess], vs, cells, track=False)[0])
    assert cost <= budget, (cost, budget)
    return Solution(choice, cost, value, budget, min_cost, unit, cells, exact, rounding, lb)

