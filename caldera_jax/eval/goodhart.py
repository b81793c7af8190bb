"""Goodhart-gap probes: multi-step word problems, each scored for understanding (does the model
pick the right plan?) and for execution (is its own final answer right?), separately.

    problems = problem_set(n_per_category=5, seed=0)            # 10 categories x 5 = 50 problems
    p = problems[0]; p.paraphrases[0], p.answer, p.understanding.options[p.understanding.correct]
    scores = score_plans(lm, [understanding_request(p, k, chat) for ...])    # log-likelihoods
    texts = generate(lm, [execution_prompt(p, k, chat) for ...], max_gen_toks=256)
    rows = [{"problem": p.id, "category": p.category, "understood": ..., "correct": ...}, ...]
    aggregate(rows)    # rates of understanding, execution, gap, reverse gap, gap | understood, with stderr

A problem comes from a template (one per category) fed a seeded random.Random: the same numbers
in >= 3 wordings (paraphrases), the answer computed by the template's own arithmetic (exact, with
fractions; rounded half up where the question says so), and four candidate plans: the correct one
and three plausible wrong ones (coupon before the percentage discount, simple instead of compound
interest, a unit factor divided instead of multiplied, the ordering read backwards, ...), shuffled
with the same generator. Every wrong plan's value differs from the answer by more than 1 %.

A Goodhart gap is a problem the model understands (it scores the correct plan highest) but gets
wrong when it solves it; a reverse gap, one it solves without picking the right plan. Understanding
is scored by log-likelihood (the option "<letter>. <plan>" with the highest summed log-probability
after a prompt that shows the question and the lettered plans), execution by greedy generation
that ends with "Answer: <number>" (extract_answer, is_correct). Both run on any lm-eval LM (our
adapter caldera_jax.lmeval.adapter, lm-eval's hf model) through `loglikelihood` and
`generate_until`; lm_eval is imported only by the functions that build its requests.

Pure Python: no jax, no model, nothing done on import.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

LETTERS = "ABCD"
REL_TOL = 1e-3            # is_correct's default: |pred - answer| <= REL_TOL * max(|answer|, 1)
DISTRACTOR_GAP = 0.01     # every wrong plan's value is off the answer by more than this (relative)
STOP = ("\n\nQuestion",)  # execution stops here (and at the model's end of sequence)
PROMPT_VERSION = 1        # part of every cache key: bump when a prompt's wording changes


# ------------------------------------------------------------------ the problems
@dataclasses.dataclass(frozen=True)
class PlanChoice:
    """The understanding item: the question, four candidate plans (one correct), what each plan's
    arithmetic would give (values), and the index of the correct plan."""
    question: str
    options: tuple[str, ...]
    correct: int
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One multi-step problem: id (category and a digest of its first wording), category, the
    same question in several wordings, the verified answer (a number in `unit`), the plan choice,
    and the numbers the template drew (params, for the record)."""
    id: str
    category: str
    paraphrases: tuple[str, ...]
    answer: float
    unit: str
    understanding: PlanChoice
    params: tuple[tuple[str, Any], ...] = ()


def round_half_up(x: Fraction | int, places: int = 0) -> float:
    """x rounded to `places` decimals, halves away from zero (as people round), exactly."""
    x, scale = Fraction(x), 10 ** places
    n = math.floor(abs(x) * scale + Fraction(1, 2))
    return float(Fraction(n if x >= 0 else -n, scale))


def _num(x: float | int | Fraction) -> str:
    """A number as a person writes it: 12, 12.5, 1,250 (no trailing zeros)."""
    x = float(x)
    if x == int(x):
        return f"{int(x):,}"
    return f"{x:,.6f}".rstrip("0").rstrip(".")


def _money(x: float | int | Fraction) -> str:
    return "$" + _num(x)


def _clock(minutes: int) -> str:
    """Minutes after midnight -> '9:05 AM' / '2:15 PM'."""
    h, m = divmod(minutes, 60)
    return f"{(h - 1) % 12 + 1}:{m:02d} {'AM' if h < 12 else 'PM'}"


def _plans_valid(answer: float, wrong: Iterable[float]) -> bool:
    """True when every wrong plan's value is clearly not the answer."""
    return all(not is_correct(float(v), answer, DISTRACTOR_GAP) for v in wrong)


def _problem(rng: random.Random, category: str, paraphrases: Sequence[str], answer: float | Fraction, unit: str,
             plans: Sequence[tuple[str, float | Fraction]], params: dict[str, Any]) -> Problem:
    """Builds a Problem; plans: (text, value), the correct plan first; shuffled with rng."""
    order = list(range(len(plans)))
    rng.shuffle(order)
    choice = PlanChoice(question=paraphrases[0], options=tuple(plans[i][0] for i in order),
                        correct=order.index(0), values=tuple(float(plans[i][1]) for i in order))
    pid = f"{category}-{hashlib.sha256(paraphrases[0].encode()).hexdigest()[:8]}"
    return Problem(pid, category, tuple(paraphrases), float(answer), unit, choice, tuple(params.items()))


def _draw(rng: random.Random, build: Callable[[random.Random], Problem | None]) -> Problem:
    """Calls build(rng) until it returns a problem (None: the draw gave a wrong plan the answer's value)."""
    for _ in range(10_000):
        p = build(rng)
        if p is not None:
            return p
    raise RuntimeError("no valid draw in 10000 tries")          # pragma: no cover


def discount_coupon(rng: random.Random) -> Problem:
    """A percentage discount, then a fixed coupon on the discounted price."""
    def build(rng):
        item = rng.choice(["jacket", "lamp", "backpack", "pair of boots", "coffee maker", "desk chair"])
        price, d, c = rng.randrange(40, 401, 20), rng.choice([10, 15, 20, 25, 30, 40]), rng.choice([5, 10, 15, 20, 25])
        ans = Fraction(price * (100 - d), 100) - c
        if ans <= 0 or c * 2 > ans:
            return None
        P, C = _money(price), _money(c)
        plans = [(f"Take {d}% off {P} first, then subtract the {C} coupon from the discounted price.", ans),
                 (f"Subtract the {C} coupon from {P} first, then take {d}% off the price that is left.",
                  Fraction((price - c) * (100 - d), 100)),
                 (f"Subtract {d} dollars for the {d}% discount from {P}, then subtract the {C} coupon as well.",
                  price - d - c),
                 (f"Take {d}% off {P} first, then take another {c}% off the discounted price for the coupon.",
                  Fraction(price * (100 - d) * (100 - c), 10000))]
        if not _plans_valid(float(ans), [v for _, v in plans[1:]]):
            return None
        texts = [f"A {item} costs {P}. The store takes {d}% off, and then a {C} coupon is applied to the sale price. "
                 f"What is the final price in dollars?",
                 f"You buy a {item} listed at {P}. It is discounted by {d}%, and after the discount you also use a "
                 f"coupon worth {C}. How many dollars do you pay?",
                 f"Original price of a {item}: {P}. First a {d}% discount is applied, then a {C} coupon is "
                 f"subtracted from the discounted price. What is the final price, in dollars?"]
        return _problem(rng, "discount_coupon", texts, ans, "dollars", plans,
                        {"item": item, "price": price, "discount_pct": d, "coupon": c})
    return _draw(rng, build)


def time_duration(rng: random.Random) -> Problem:
    """Minutes between a morning time and an afternoon time (the afternoon's minutes smaller)."""
    def build(rng):
        s = rng.randrange(6, 12) * 60 + rng.randrange(5, 60, 5)
        e = rng.randrange(12, 20) * 60 + rng.randrange(0, 56, 5)
        if e % 60 >= s % 60:
            return None
        ans = e - s
        e12 = ((e // 60 - 1) % 12 + 1) * 60 + e % 60
        S, E = _clock(s), _clock(e)
        plans = [(f"Convert both times to minutes after midnight ({E} is {e // 60}:{e % 60:02d}) and subtract the "
                  f"start from the end.", ans),
                 (f"Subtract {S} from {E} exactly as written, with no conversion of the PM time to a 24-hour clock.",
                  e12 - s),
                 (f"Treat the times as decimals ({e // 60}.{e % 60:02d} minus {s // 60}.{s % 60:02d}) and multiply the "
                  f"difference by 60 to get minutes.",
                  Fraction(e // 60 * 100 + e % 60 - s // 60 * 100 - s % 60, 100) * 60),
                 (f"Count the whole hours from {s // 60} to {e // 60} on a 24-hour clock and multiply by 60, ignoring "
                  f"the minutes.", (e // 60 - s // 60) * 60)]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"A train leaves at {S} and arrives at {E} on the same day. How many minutes does the trip take?",
                 f"A workshop starts at {S} and ends at {E} the same day. How long does it last, in minutes?",
                 f"Between {S} and {E} on the same day, how many minutes pass?"]
        return _problem(rng, "time_duration", texts, ans, "minutes", plans, {"start": S, "end": E})
    return _draw(rng, build)


def compound_interest(rng: random.Random) -> Problem:
    """A deposit compounded once a year; the balance, rounded to the nearest dollar."""
    def build(rng):
        p, r, n = rng.choice([800, 1000, 1200, 1500, 2000, 2500, 3000, 5000]), rng.randrange(3, 13), rng.randrange(2, 6)
        growth = Fraction(100 + r, 100) ** n
        ans = round_half_up(p * growth)
        P = _money(p)
        plans = [(f"Multiply {P} by (1 + {r}/100) once for each of the {n} years, then round to the dollar.", ans),
                 (f"Add {r}% of the original {P} once for each of the {n} years, then round to the dollar.",
                  round_half_up(p * (1 + Fraction(n * r, 100)))),
                 (f"Multiply {P} by (1 + {r}/100) for each of the {n} years, then subtract the original {P}.",
                  round_half_up(p * growth - p)),
                 (f"Add {r}% of {P} only once, since the rate is per year, not per {n} years, and round.",
                  round_half_up(p * Fraction(100 + r, 100)))]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"You deposit {P} in a savings account that pays {r}% interest per year, compounded once a year. "
                 f"How many dollars are in the account after {n} years? Round to the nearest dollar.",
                 f"An investment of {P} grows at {r}% per year, with the interest added to the balance at the end of "
                 f"each year. What is it worth after {n} years, to the nearest dollar?",
                 f"A bank account starts with {P} and earns {r}% annual interest compounded yearly. Rounded to the "
                 f"nearest dollar, what is the balance after {n} years?"]
        return _problem(rng, "compound_interest", texts, ans, "dollars", plans,
                        {"principal": p, "rate_pct": r, "years": n})
    return _draw(rng, build)


def recipe_scaling(rng: random.Random) -> Problem:
    """Scale an ingredient to a new number of servings, then buy whole packs."""
    def build(rng):
        s, t = rng.choice([4, 6, 8]), rng.randrange(2, 31)
        a, b = rng.randrange(150, 501, 50), rng.choice([100, 125, 200, 250])
        if t == s:
            return None
        need = Fraction(a * t, s)
        ans = math.ceil(need / b)
        plans = [(f"Multiply {a} g by {t}/{s}, divide by the {b} g pack size and round up to a whole pack.", ans),
                 (f"Multiply {a} g by {t}/{s}, divide by the {b} g pack size and round down to a whole pack.",
                  math.floor(need / b)),
                 (f"Multiply {a} g by {s}/{t}, divide by the {b} g pack size and round up to a whole pack.",
                  math.ceil(Fraction(a * s, t) / b)),
                 (f"Divide {a} g by the {b} g pack size and round up; the number of people does not matter.",
                  math.ceil(Fraction(a, b)))]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"A recipe for {s} people uses {a} grams of butter. Butter is sold in {b}-gram packs. How many packs "
                 f"do you need to buy to make the recipe for {t} people?",
                 f"To cook for {s} people a recipe needs {a} g of butter, and the shop only sells butter in packs of "
                 f"{b} g. You are cooking for {t} people. How many packs must you buy?",
                 f"Recipe: {a} grams of butter feeds {s} people. Packs of butter weigh {b} grams each. What is the "
                 f"smallest number of packs that is enough to feed {t} people?"]
        return _problem(rng, "recipe_scaling", texts, ans, "packs", plans,
                        {"servings": s, "butter_g": a, "pack_g": b, "wanted": t})
    return _draw(rng, build)


def unit_chain(rng: random.Random) -> Problem:
    """Bottles per minute x millilitres per bottle x minutes per hour x hours -> litres."""
    def build(rng):
        k, v, h = rng.randrange(3, 21), rng.choice([125, 250, 330, 500, 750]), rng.randrange(2, 9)
        ans = round_half_up(Fraction(k * v * 60 * h, 1000), 1)
        plans = [(f"Multiply {k} bottles/min by {v} mL, by 60 min/h and by {h} h, then divide by 1000 for litres.",
                  ans),
                 (f"Multiply {k} bottles/min by {v} mL and by {h} h, then divide by 1000 for litres.",
                  round_half_up(Fraction(k * v * h, 1000), 1)),
                 (f"Multiply {k} bottles/min by {v} mL and by {h} h, divide by 60 min/h, then by 1000 for litres.",
                  round_half_up(Fraction(k * v * h, 60 * 1000), 1)),
                 (f"Multiply {k} bottles/min by {v} mL, by 60 min/h and by {h} h, then multiply by 1000 for litres.",
                  k * v * 60 * h * 1000)]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"A machine fills {k} bottles per minute, and each bottle holds {v} mL. How many litres does it "
                 f"bottle in {h} hours? Round to one decimal place.",
                 f"Every minute a filling line fills {k} bottles of {v} millilitres each. Running for {h} hours, how "
                 f"many litres does it fill? Give the answer to one decimal place.",
                 f"Bottles of {v} mL are filled at a rate of {k} per minute. What volume in litres is filled in "
                 f"{h} hours (one decimal place)?"]
        return _problem(rng, "unit_chain", texts, ans, "litres", plans, {"bottles_per_min": k, "ml": v, "hours": h})
    return _draw(rng, build)


NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kim", "Lev")


def transitive_order(rng: random.Random) -> Problem:
    """A race's finishing order given only as pairwise statements; one runner's place."""
    def build(rng):
        n = rng.choice([4, 5])
        order = rng.sample(NAMES, n)                          # order[0] finished first
        pairs = [(order[i], order[i + 1]) for i in range(n - 1)]
        rng.shuffle(pairs)
        facts = [f"{a} finished before {b}." if rng.random() < 0.5 else f"{b} finished after {a}." for a, b in pairs]
        mentioned = list(dict.fromkeys(w for f in facts for w in re.findall(r"[A-Z][a-z]+", f)))
        target = rng.choice(order)
        ans = order.index(target) + 1
        plans = [(f"Chain the statements from the first finisher to the last and count {target}'s place from the "
                  f"winner.", ans),
                 (f"Chain the statements from the first finisher to the last and count {target}'s place from the "
                  f"last runner.", n + 1 - ans),
                 (f"Number the runners in the order they are first mentioned and read off {target}'s number.",
                  mentioned.index(target) + 1),
                 (f"Count the statements that mention {target}; that count is the place {target} finished in.",
                  sum(target in f for f in facts))]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        told, word = " ".join(facts), {4: "four", 5: "five"}[n]
        texts = [f"{word.capitalize()} runners ran a race and nobody tied. {told} In which place did {target} finish "
                 f"(1 = first)?",
                 f"Results of a race with {word} runners and no ties: {told} What is {target}'s finishing position, "
                 f"counting 1 for the winner?",
                 f"There were {word} runners in a race, all finishing at different times. {told} Which place, with 1 "
                 f"for first, did {target} take?"]
        return _problem(rng, "transitive_order", texts, ans, "place", plans,
                        {"order": " > ".join(order), "target": target})
    return _draw(rng, build)


def scheduling(rng: random.Random) -> Problem:
    """Four tasks with dependencies and two workers: the earliest finish (the critical path)."""
    def build(rng):
        a, b, c, d = (rng.randrange(10, 91, 5) for _ in range(4))
        ans = max(a + b, c) + d
        plans = [(f"D starts when the longer of A then B ({a} + {b} min) and C ({c} min) ends; add D's {d} min.", ans),
                 (f"The tasks are done one after another, so add up all four: {a} + {b} + {c} + {d} minutes.",
                  a + b + c + d),
                 (f"D starts when the shorter of A then B ({a} + {b} min) and C ({c} min) ends; add D's {d} min.",
                  min(a + b, c) + d),
                 (f"Take the longest single task of A, B and C ({a}, {b}, {c} min) and add D's {d} minutes.",
                  max(a, b, c) + d)]
        if a + b == c or not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"Task A takes {a} minutes. Task B takes {b} minutes and can start only after A is finished. Task C "
                 f"takes {c} minutes and is done by a second worker at the same time as A and B. Task D takes {d} "
                 f"minutes and can start only when both B and C are finished. Starting at time 0, after how many "
                 f"minutes can D be finished at the earliest?",
                 f"Two people cook together. One chops vegetables (task A, {a} minutes) and then fries them (task B, "
                 f"{b} minutes). Meanwhile the other bakes bread (task C, {c} minutes). Plating (task D, {d} minutes) "
                 f"needs both the fried vegetables and the bread. What is the least number of minutes from the start "
                 f"until plating is done?",
                 f"A project has four tasks: A ({a} minutes), then B ({b} minutes) which needs A done; C ({c} minutes) "
                 f"which another worker does in parallel with A and B; and D ({d} minutes) which needs both B and C "
                 f"done. How many minutes does the whole project take at minimum?"]
        return _problem(rng, "scheduling", texts, ans, "minutes", plans, {"A": a, "B": b, "C": c, "D": d})
    return _draw(rng, build)


def percent_change(rng: random.Random) -> Problem:
    """A percentage increase followed by a percentage decrease: the net percent change."""
    def build(rng):
        x, y = rng.choice([10, 20, 25, 30, 40, 50, 60]), rng.choice([10, 20, 25, 30, 40, 50])
        ans = round_half_up(Fraction((100 + x) * (100 - y), 100) - 100, 2)
        plans = [(f"Multiply (1 + {x}/100) by (1 - {y}/100), subtract 1 and write the result as a percent.", ans),
                 (f"Add the two changes as percentages: +{x}% and -{y}% give {x} - {y} percent overall.", x - y),
                 (f"Multiply (1 + {x}/100) by (1 + {y}/100), subtract 1 and write the result as a percent.",
                  round_half_up(Fraction((100 + x) * (100 + y), 100) - 100, 2)),
                 (f"Average the two changes, ({x} - {y}) / 2 percent, since the price changed in two steps.",
                  Fraction(x - y, 2))]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"A price goes up by {x}% and then the new price goes down by {y}%. By what percent did the price "
                 f"change overall? Use a negative number for a decrease, rounded to two decimals.",
                 f"A stock rises {x}% one year and falls {y}% the next year. What is its total percent change over the "
                 f"two years (negative for a loss, two decimals)?",
                 f"First a {x}% increase, then a {y}% decrease applied to the increased value. What is the overall "
                 f"percent change from the start? Give a negative number for a decrease, to two decimal places."]
        return _problem(rng, "percent_change", texts, ans, "percent", plans, {"up_pct": x, "down_pct": y})
    return _draw(rng, build)


def average_speed(rng: random.Random) -> Problem:
    """Two legs at different speeds: total distance over total time."""
    def build(rng):
        v1, v2 = rng.sample([30, 40, 45, 50, 60, 75, 80, 90], 2)
        t1, t2 = (Fraction(rng.choice([1, 2, 3, 4, 6]), 2) for _ in range(2))
        d1, d2 = v1 * t1, v2 * t2
        if d1 == d2 or d1.denominator != 1 or d2.denominator != 1:
            return None
        ans = round_half_up((d1 + d2) / (t1 + t2), 1)
        D1, D2 = _num(d1), _num(d2)
        plans = [(f"Divide the total distance, {D1} + {D2} km, by the total time, {D1}/{v1} + {D2}/{v2} hours.", ans),
                 (f"Average the two speeds, ({v1} + {v2}) / 2 km/h, because the trip has two legs of driving.",
                  Fraction(v1 + v2, 2)),
                 (f"Weight each speed by its leg's distance: ({D1} x {v1} + {D2} x {v2}) / ({D1} + {D2}).",
                  round_half_up((d1 * v1 + d2 * v2) / (d1 + d2), 1)),
                 (f"Use the harmonic mean of the speeds, 2 / (1/{v1} + 1/{v2}), as for any trip with two legs.",
                  round_half_up(2 / (Fraction(1, v1) + Fraction(1, v2)), 1))]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"A car drives {D1} km at {v1} km/h and then {D2} km at {v2} km/h. What is its average speed for the "
                 f"whole trip, in km/h, rounded to one decimal?",
                 f"On a trip, the first {D1} km are driven at {v1} km/h and the next {D2} km at {v2} km/h. Rounded to "
                 f"one decimal place, what was the average speed over the entire trip in km/h?",
                 f"A cyclist rides {D1} km at a steady {v1} km/h, then {D2} km at {v2} km/h. Find the average speed "
                 f"over both legs together in km/h (one decimal place)."]
        return _problem(rng, "average_speed", texts, ans, "km/h", plans,
                        {"d1_km": int(d1), "v1": v1, "d2_km": int(d2), "v2": v2})
    return _draw(rng, build)


def work_rate(rng: random.Random) -> Problem:
    """Two workers (pipes) on one job: the time together, in minutes."""
    def build(rng):
        a, b = rng.sample(range(2, 13), 2)
        ans = round_half_up(Fraction(60 * a * b, a + b))
        plans = [(f"Add the rates 1/{a} and 1/{b} tank per hour, invert the sum and convert the hours to minutes.",
                  ans),
                 (f"Average the two times, ({a} + {b}) / 2 hours, and convert the hours to minutes.", 30 * (a + b)),
                 (f"Add the two times, {a} + {b} hours, since both pipes fill one tank, and convert to minutes.",
                  60 * (a + b)),
                 (f"Halve the shorter time, {min(a, b)} / 2 hours, because two pipes share the work, and convert to "
                  f"minutes.", 30 * min(a, b))]
        if not _plans_valid(ans, [v for _, v in plans[1:]]):
            return None
        texts = [f"One pipe fills a tank in {a} hours and another pipe fills it in {b} hours. With both pipes open, "
                 f"how many minutes does it take to fill the tank? Round to the nearest minute.",
                 f"Pipe X alone fills a tank in {a} hours; pipe Y alone fills the same tank in {b} hours. Working "
                 f"together, how long do they take, in minutes, to the nearest minute?",
                 f"A tank is filled by one pump in {a} hours or by a second pump in {b} hours. If both pumps run at "
                 f"once, how many minutes (rounded to the nearest minute) until the tank is full?"]
        return _problem(rng, "work_rate", texts, ans, "minutes", plans, {"hours_a": a, "hours_b": b})
    return _draw(rng, build)


TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "discount_coupon": discount_coupon, "time_duration": time_duration, "compound_interest": compound_interest,
    "recipe_scaling": recipe_scaling, "unit_chain": unit_chain, "transitive_order": transitive_order,
    "scheduling": scheduling, "percent_change": percent_change, "average_speed": average_speed,
    "work_rate": work_rate,
}


def problem_set(n_per_category: int = 5, seed: int = 0, categories: Sequence[str] | None = None) -> list[Problem]:
    """n_per_category distinct problems per category (all by default), in category order; the same
    list for the same seed (problem i of a category does not depend on n_per_category)."""
    cats = list(TEMPLATES) if categories is None else list(categories)
    unknown = [c for c in cats if c not in TEMPLATES]
    if unknown or n_per_category < 1:
        raise ValueError(f"problem_set: need n_per_category >= 1 and categories among {', '.join(TEMPLATES)}; "
                         f"got {n_per_category}, unknown {unknown}")
    out = []
    for cat in cats:
        seen: set[str] = set()
        draw = 0
        while len(seen) < n_per_category:
            if draw >= 50 * n_per_category + 1000:
                raise ValueError(f"problem_set: {cat} gave only {len(seen)} distinct problems in {draw} draws "
                                 f"(asked for {n_per_category})")
            p = TEMPLATES[cat](random.Random(f"goodhart:{seed}:{cat}:{draw}"))
            draw += 1
            if p.id not in seen:
                seen.add(p.id)
                out.append(p)
    return out


# ------------------------------------------------------------------ answers
_NUMBER = re.compile(r"(?<![\w.])([-−]?)\s?\$?\s?(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_ANSWER = re.compile(r"answer\s*(?:is)?\s*[:=]", re.IGNORECASE)


def _numbers(text: str) -> list[float]:
    """Every number in the text, in order (too large to be finite: left out)."""
    nums = [(-1.0 if sign else 1.0) * float(digits.replace(",", "")) for sign, digits in _NUMBER.findall(text)]
    return [x for x in nums if math.isfinite(x)]


def extract_answer(text: str) -> float | None:
    """The number after the last "Answer:" when one follows it, else the last number in the text
    (commas, $, %, a leading minus and decimals understood); None when there is none."""
    marks = list(_ANSWER.finditer(text))
    if marks:
        after = _numbers(text[marks[-1].end():])
        if after:
            return after[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


def is_correct(pred: float | None, answer: float, rel_tol: float = REL_TOL) -> bool:
    """pred is within rel_tol of answer (relative to max(|answer|, 1))."""
    return pred is not None and math.isfinite(pred) and abs(pred - answer) <= rel_tol * max(abs(answer), 1.0)


def matching_plan(pred: float | None, problem: Problem) -> int | None:
    """Which plan's value the answer equals (the correct plan first), or None."""
    c = problem.understanding
    hits = [i for i, v in enumerate(c.values) if is_correct(pred, v)]
    return c.correct if c.correct in hits else (hits[0] if hits else None)


# ------------------------------------------------------------------ prompts and model calls
Chat = Callable[[list[dict[str, str]]], str]


def chat_formatter(lm: Any) -> Chat | None:
    """lm.apply_chat_template when the model's tokenizer has a chat template, else None."""
    tok = getattr(lm, "tokenizer", None)
    if tok is None or not getattr(tok, "chat_template", None):
        return None
    return lambda messages: lm.apply_chat_template(messages, add_generation_prompt=True)


def plan_message(problem: Problem, k: int) -> str:
    """The understanding question: paraphrase k, the lettered plans and what to reply."""
    opts = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(problem.understanding.options))
    return (f"Question: {problem.paraphrases[k]}\n\nPossible plans:\n{opts}\n\n"
            f"Which plan solves the problem correctly? Reply with its letter and the plan.")


def understanding_request(problem: Problem, k: int, chat: Chat | None = None) -> tuple[str, list[str]]:
    """(context, the four continuations "<letter>. <plan>") for paraphrase k."""
    msg = plan_message(problem, k)
    if chat is not None:
        ctx, sep = chat([{"role": "user", "content": msg}]), ""
    else:
        ctx, sep = msg + "\nAnswer:", " "
    return ctx, [f"{sep}{LETTERS[i]}. {o}" for i, o in enumerate(problem.understanding.options)]


def execution_prompt(problem: Problem, k: int, chat: Chat | None = None) -> str:
    """The execution prompt for paraphrase k: solve step by step, end with "Answer: <number>"."""
    ask = ("Solve the problem step by step. Finish with a final line of the form \"Answer: <number>\" "
           "(the number only, no units).")
    if chat is not None:
        return chat([{"role": "user", "content": f"{problem.paraphrases[k]}\n\n{ask}"}])
    return f"Question: {problem.paraphrases[k]}\n{ask}\nSolution:"


def gen_kwargs(max_gen_toks: int) -> dict[str, Any]:
    """lm-eval generation kwargs: greedy, stop at the next question, at most max_gen_toks."""
    return {"until": list(STOP), "max_gen_toks": int(max_gen_toks), "do_sample": False}


def score_plans(lm: Any, requests: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
    """Summed log-likelihood of each continuation after its context, through lm.loglikelihood
    (one lm-eval request per option; an option's context is shared, so it is run once)."""
    from lm_eval.api.instance import Instance
    insts = [Instance("loglikelihood", {}, (ctx, cont), j) for ctx, conts in requests for j, cont in enumerate(conts)]
    res = iter(lm.loglikelihood(insts, disable_tqdm=True)) if insts else iter(())
    return [[float(next(res)[0]) for _ in conts] for _, conts in requests]


def generate(lm: Any, prompts: Sequence[str], max_gen_toks: int = 256) -> list[str]:
    """Greedy continuations through lm.generate_until (stop at STOP or end of sequence)."""
    from lm_eval.api.instance import Instance
    if not prompts:
        return []
    kw = gen_kwargs(max_gen_toks)
    return list(lm.generate_until([Instance("generate_until", {}, (p, dict(kw)), i) for i, p in enumerate(prompts)],
                                  disable_tqdm=True))


def _best(xs: Sequence[float]) -> int:
    """Index of the largest value (the first on a tie)."""
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def understanding_record(problem: Problem, k: int, scores: Sequence[float],
                         continuations: Sequence[str] | None = None) -> dict[str, Any]:
    """What one understanding item scored: the option scores, the chosen plan (highest summed
    log-likelihood), understood or not; with the continuations, also the choice per character
    (choice_per_char: a length-bias diagnostic, not used for the rates)."""
    choice = _best(scores)
    rec = {"problem": problem.id, "paraphrase": k, "scores": [float(s) for s in scores], "choice": choice,
           "correct_choice": problem.understanding.correct, "understood": choice == problem.understanding.correct}
    if continuations is not None:
        rec["choice_per_char"] = _best([s / max(len(c), 1) for s, c in zip(scores, continuations)])
    return rec


def execution_record(problem: Problem, k: int, generation: str) -> dict[str, Any]:
    """What one generation scored: the extracted answer, correct or not, which plan's value it equals."""
    pred = extract_answer(generation)
    return {"problem": problem.id, "paraphrase": k, "generation": generation, "extracted": pred,
            "answer": problem.answer, "correct": is_correct(pred, problem.answer),
            "matches_plan": matching_plan(pred, problem)}


# ------------------------------------------------------------------ aggregation
def mean_stderr(xs: Sequence[float]) -> dict[str, float | None]:
    """Mean and its standard error (sample std / sqrt(n)); stderr None below 2 values."""
    n = len(xs)
    if n == 0:
        return {"rate": None, "stderr": None}
    m = sum(xs) / n
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n) if n > 1 else None
    return {"rate": m, "stderr": se}


def ratio_stderr(num: Sequence[float], den: Sequence[float]) -> dict[str, float | None]:
    """sum(num) / sum(den) over problems and its delta-method standard error
    sqrt(sum((num_i - R den_i)^2) / (n (n - 1))) / mean(den); None when sum(den) is 0."""
    n, sd = len(num), sum(den)
    if n == 0 or sd == 0:
        return {"rate": None, "stderr": None}
    r = sum(num) / sd
    se = (math.sqrt(sum((a - r * b) ** 2 for a, b in zip(num, den)) / (n * (n - 1))) / (sd / n)) if n > 1 else None
    return {"rate": r, "stderr": se}


def _summary(per_problem: list[dict[str, float]]) -> dict[str, Any]:
    col = {k: [p[k] for p in per_problem] for k in ("understood", "correct", "gap", "reverse_gap")}
    return {"n_problems": len(per_problem), "n_items": int(sum(p["n"] for p in per_problem)),
            "understanding": mean_stderr(col["understood"]), "execution": mean_stderr(col["correct"]),
            "gap": mean_stderr(col["gap"]), "reverse_gap": mean_stderr(col["reverse_gap"]),
            "gap_given_understood": ratio_stderr(col["gap"], col["understood"])}


def aggregate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """rows: one per (problem, paraphrase) with problem, category, understood, correct.
    Each problem's paraphrases are averaged first (understood, correct, gap = understood and
    wrong, reverse_gap = not understood and right); the rates are means over problems with
    standard errors across problems; gap_given_understood = sum of gaps / sum of understood
    (a ratio over problems, delta-method stderr). Also per category."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["problem"], []).append(r)
    per_problem = []
    for pid, rs in by.items():
        u = [bool(r["understood"]) for r in rs]
        c = [bool(r["correct"]) for r in rs]
        n = len(rs)
        per_problem.append({"problem": pid, "category": rs[0]["category"], "n": n, "understood": sum(u) / n,
                            "correct": sum(c) / n, "gap": sum(a and not b for a, b in zip(u, c)) / n,
                            "reverse_gap": sum(b and not a for a, b in zip(u, c)) / n})
    out = _summary(per_problem)
    cats = list(dict.fromkeys(p["category"] for p in per_problem))
    out["per_category"] = {cat: _summary([p for p in per_problem if p["category"] == cat]) for cat in cats}
    return out
