"""Goodhart-gap probes (caldera_jax/eval/goodhart.py, experiments/eval_goodhart.py): every
template's answer equals an independent computation read off the question's own text (each
wording), the problem set is deterministic and broad, each problem has exactly one correct plan,
answers are extracted from free text, the aggregation gives hand-computed rates and standard errors,
and the CLI runs end to end on a tiny random model, resumes from its cache and refuses bad input
before loading anything."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest

from caldera_jax.eval import goodhart as gh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ independent answers, from the text
def _ints(pattern: str, text: str) -> list[int]:
    return [int(x.replace(",", "")) for x in re.findall(pattern, text)]


def _half_up(x: Decimal, places: int = 0) -> float:
    return float(x.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


def _discount_coupon(t: str) -> float:
    price, coupon = _ints(r"\$(\d[\d,]*)", t)
    (pct,) = _ints(r"(\d+)%", t)
    return float(Decimal(price) - Decimal(price) * pct / 100 - coupon)


def _time_duration(t: str) -> float:
    start, end = (datetime.strptime(f"{h}:{m} {ap}", "%I:%M %p") for h, m, ap in
                  re.findall(r"(\d{1,2}):(\d{2}) (AM|PM)", t))
    return (end - start).total_seconds() / 60


def _compound_interest(t: str) -> float:
    (principal,) = _ints(r"\$(\d[\d,]*)", t)
    (rate,) = _ints(r"(\d+)%", t)
    (years,) = _ints(r"(\d+) years", t)
    balance = Decimal(principal)
    for _ in range(years):                       # interest added at the end of each year
        balance += balance * rate / 100
    return _half_up(balance)


def _recipe_scaling(t: str) -> float:
    serves, wanted = _ints(r"(\d+) people", t)
    butter, pack = _ints(r"(\d+)[- ](?:grams|gram|g)\b", t)
    packs = 0
    while packs * pack * serves < butter * wanted:   # buy packs until there is enough
        packs += 1
    return packs


def _unit_chain(t: str) -> float:
    (ml,) = _ints(r"(\d+) (?:mL|millilitres)", t)
    (hours,) = _ints(r"(\d+) hours", t)
    rest = _ints(r"\b(\d+)\b", t)
    rest.remove(ml)
    rest.remove(hours)
    (per_minute,) = rest
    litres_per_minute = Decimal(per_minute) * ml / 1000
    return _half_up(litres_per_minute * 60 * hours, 1)


def _transitive_order(t: str) -> float:
    found = list(re.finditer(r"([A-Z][a-z]+) finished (before|after) ([A-Z][a-z]+)\.", t))
    facts = [m.groups() for m in found]
    ahead = {}                                     # runner -> the runners directly behind them
    for a, rel, b in facts:
        first, second = (a, b) if rel == "before" else (b, a)
        ahead.setdefault(first, set()).add(second)
        ahead.setdefault(second, set())
    order = []
    while ahead:                                   # repeatedly take the runner nobody beat
        free = [r for r in ahead if not any(r in behind for behind in ahead.values())]
        assert len(free) == 1, f"the statements do not give one order: {t}"
        order.append(free[0])
        del ahead[free[0]]
    tail = t[found[-1].end():]                     # the question, after the statements
    (target,) = [r for r in order if r in tail]
    return order.index(target) + 1


def _scheduling(t: str) -> float:
    a, b, c, d = _ints(r"(\d+) minutes", t)[:4]
    duration = {"A": a, "B": b, "C": c, "D": d}
    needs = {"A": [], "B": ["A"], "C": [], "D": ["B", "C"]}

    def finish(task):                              # earliest finish: after every prerequisite
        return max((finish(x) for x in needs[task]), default=0) + duration[task]
    return max(finish(x) for x in duration)


def _percent_change(t: str) -> float:
    up, down = _ints(r"(\d+)%", t)
    price = Decimal(100)
    price *= 1 + Decimal(up) / 100
    price *= 1 - Decimal(down) / 100
    return _half_up(price - 100, 2)


def _average_speed(t: str) -> float:
    legs = [tuple(map(int, m)) for m in re.findall(r"(\d+) km (?:are driven )?at (?:a steady )?(\d+) km/h", t)]
    assert len(legs) == 2, t
    hours = sum(Fraction(d, v) for d, v in legs)
    speed = sum(d for d, _ in legs) / hours
    return _half_up(Decimal(speed.numerator) / Decimal(speed.denominator), 1)


def _work_rate(t: str) -> float:
    a, b = _ints(r"(\d+) hours", t)
    tanks_per_minute = Fraction(1, 60 * a) + Fraction(1, 60 * b)
    minutes = 1 / tanks_per_minute
    return _half_up(Decimal(minutes.numerator) / Decimal(minutes.denominator))


INDEPENDENT = {"discount_coupon": _discount_coupon, "time_duration": _time_duration,
               "compound_interest": _compound_interest, "recipe_scaling": _recipe_scaling, "unit_chain": _unit_chain,
               "transitive_order": _transitive_order, "scheduling": _scheduling, "percent_change": _percent_change,
               "average_speed": _average_speed, "work_rate": _work_rate}


def test_every_template_answer_matches_an_independent_computation():
    assert set(INDEPENDENT) == set(gh.TEMPLATES)
    for seed in range(4):
        for p in gh.problem_set(3, seed):
            for text in p.paraphrases:                     # every wording states the same problem
                want = INDEPENDENT[p.category](text)
                assert p.answer == pytest.approx(want, rel=1e-12, abs=1e-9), (p.id, text, p.answer, want)


def test_problem_set_is_deterministic_and_broad():
    ps = gh.problem_set()
    assert ps == gh.problem_set() and len(ps) >= 45
    assert gh.problem_set(2, 0) == [p for p in ps if int(ps.index(p) % 5) < 2]     # a prefix per category
    assert gh.problem_set(5, 1) != ps
    cats = {p.category for p in ps}
    assert len(cats) >= 9 and {"discount_coupon", "time_duration", "compound_interest", "recipe_scaling",
                               "unit_chain", "transitive_order", "scheduling"} <= cats
    assert len({p.id for p in ps}) == len(ps)
    for p in ps:
        assert len(set(p.paraphrases)) == len(p.paraphrases) >= 3 and p.unit
        assert p.understanding.question == p.paraphrases[0] and math.isfinite(p.answer)


def test_options_hold_exactly_one_correct_plan():
    ps = gh.problem_set(5, 0) + gh.problem_set(5, 7)
    for p in ps:
        c = p.understanding
        assert len(c.options) == len(set(c.options)) == len(c.values) == 4 and 0 <= c.correct < 4
        right = [i for i, v in enumerate(c.values) if gh.is_correct(v, p.answer, gh.DISTRACTOR_GAP)]
        assert right == [c.correct], (p.id, c.values, p.answer)
    assert len({p.understanding.correct for p in ps}) == 4          # shuffled: the right plan moves
    # length is no tell: the right plan is seldom the longest or the shortest option
    rank = [sorted(map(len, p.understanding.options)).index(len(p.understanding.options[p.understanding.correct]))
            for p in ps]
    assert rank.count(3) <= 0.4 * len(ps) and rank.count(0) <= 0.4 * len(ps)


@pytest.mark.parametrize("text, want", [
    ("So the final price is $94.50.\nAnswer: $94.50", 94.5),
    ("Answer: 1,158 dollars", 1158.0),
    ("The change is -12.5%. Answer: -12.5%", -12.5),
    ("First 3 + 4 = 7, then 7 x 2 = 14.", 14.0),
    ("**Answer:** 275 minutes (4 hours 35 minutes)", 275.0),
    ("answer: .5", 0.5),
    ("Answer: none\nI think it is 42.", 42.0),                       # nothing after "Answer:": the last number
    ("From 9:40-10:00 it is 20 minutes", 20.0),
    ("It drops by −45 percent", -45.0),
    ("1,234,567.25 is big", 1234567.25),
    ("no numbers here", None),
])
def test_extract_answer(text, want):
    assert gh.extract_answer(text) == want


def test_is_correct_and_plan_matching():
    assert gh.is_correct(1157.9, 1158) and not gh.is_correct(1160, 1158) and not gh.is_correct(None, 3)
    assert gh.is_correct(0.0005, 0.0) and not gh.is_correct(float("nan"), 1.0)
    p = gh.problem_set(1, 0, ["compound_interest"])[0]
    wrong = next(i for i in range(4) if i != p.understanding.correct)
    assert gh.matching_plan(p.answer, p) == p.understanding.correct
    assert gh.matching_plan(p.understanding.values[wrong], p) == wrong and gh.matching_plan(None, p) is None


def test_aggregate_matches_hand_computation():
    def row(pid, cat, u, c):
        return {"problem": pid, "category": cat, "understood": u, "correct": c}
    rows = [row("p1", "a", True, True), row("p1", "a", True, False),      # u 1, e 1/2, gap 1/2, rev 0
            row("p2", "a", False, True), row("p2", "a", False, False),    # u 0, e 1/2, gap 0, rev 1/2
            row("p3", "b", True, False), row("p3", "b", True, False)]     # u 1, e 0, gap 1, rev 0
    s = gh.aggregate(rows)
    assert s["n_problems"] == 3 and s["n_items"] == 6

    def close(m, rate, se):
        assert m["rate"] == pytest.approx(rate) and (m["stderr"] == pytest.approx(se) if se is not None
                                                     else m["stderr"] is None)
    close(s["understanding"], 2 / 3, 1 / 3)                 # values 1, 0, 1: sample var 1/3
    close(s["execution"], 1 / 3, 1 / 6)                     # 1/2, 1/2, 0: var 1/12
    close(s["gap"], 1 / 2, math.sqrt(0.25 / 3))             # 1/2, 0, 1: var 1/4
    close(s["reverse_gap"], 1 / 6, 1 / 6)
    # gaps / understood = 1.5 / 2; residuals -1/4, 0, 1/4: sqrt(1/8 / 6) / (2/3)
    close(s["gap_given_understood"], 0.75, math.sqrt(0.125 / 6) / (2 / 3))
    close(s["per_category"]["a"]["gap"], 0.25, 0.25)
    close(s["per_category"]["b"]["execution"], 0.0, None)
    assert gh.aggregate([row("p", "a", False, True)])["gap_given_understood"] == {"rate": None, "stderr": None}


# ------------------------------------------------------------------ the CLI, on a tiny random model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.hf_tiny import tiny_llama_dir
    return tiny_llama_dir(tmp_path_factory.mktemp("goodhart"), max_position_embeddings=2048)


def test_cli_end_to_end_and_resume(tiny, tmp_path, monkeypatch, capsys):
    from caldera_jax.lmeval.adapter import lm_class
    from experiments import eval_goodhart as cli
    out = tmp_path / "out"
    argv = ["--model", f"tiny={tiny}", "--per-category", "1", "--paraphrases", "1", "--max-gen-toks", "8",
            "--batch-size", "8", "--out", str(out), "--compile-cache", "none", "--no-progress"]
    rep = cli.main(argv)
    printed = capsys.readouterr().out
    assert "gap | understood" in printed and "tiny" in printed and "10 x 1" in printed
    saved = json.loads((out / "goodhart.json").read_text())
    (cfg,) = saved["configurations"]
    assert cfg["computed"] == 20 and cfg["cached"] == 0 and len(cfg["items"]) == 10 and len(saved["problems"]) == 10
    assert cfg["summary"] == json.loads(json.dumps(rep["configurations"][0]["summary"]))
    for it in cfg["items"]:
        assert it["execution"]["prompt"].startswith("<|im_start|>user")           # the chat template
        assert len(it["understanding"]["scores"]) == 4 and isinstance(it["execution"]["generation"], str)
        assert it["understood"] == (it["understanding"]["choice"] == it["understanding"]["correct_choice"])
    assert set(cfg["summary"]["per_category"]) == set(gh.TEMPLATES)
    assert not any(".tmp" in f for f in os.listdir(out))

    # an interrupted run: the last 5 results lost and a torn line; the rerun computes only those
    cache = out / "cache" / f"{cfg['model_key']}.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:-5]) + lines[-5][:20])
    again = cli.main(argv)["configurations"][0]
    assert again["computed"] == 5 and again["cached"] == 15 and again["summary"] == rep["configurations"][0]["summary"]

    # everything cached: no model is opened, nothing is scored or generated
    cls = lm_class()
    for name in ("__init__", "loglikelihood", "generate_until"):
        monkeypatch.setattr(cls, name, lambda *a, **k: pytest.fail("recomputed instead of read from the cache"))
    third = cli.main(argv)["configurations"][0]
    assert third["computed"] == 0 and all(it["cached"] for it in third["items"])
    assert [it["execution"]["generation"] for it in third["items"]] == [it["execution"]["generation"]
                                                                      for it in again["items"]]


def test_cli_refuses_bad_input_before_loading(tiny, tmp_path, monkeypatch):
    from caldera_jax.lmeval.adapter import lm_class
    from experiments import eval_goodhart as cli
    monkeypatch.setattr(lm_class(), "__init__", lambda *a, **k: pytest.fail("a model was loaded"))
    base = ["--out", str(tmp_path / "o"), "--compile-cache", "none"]
    for models, msg in ((["nolabel"], "expected LABEL=PATH"), (["=x"], "expected LABEL=PATH"),
                        ([f"a={tiny}", f"a={tiny}"], "given twice"), (["a=/no/such/model"], "no such file")):
        with pytest.raises(ValueError, match=msg):
            cli.main([x for m in models for x in ("--model", m)] + base)
    with pytest.raises(ValueError, match="wordings"):
        cli.main(["--model", f"a={tiny}", "--paraphrases", "9"] + base)
    r = subprocess.run([sys.executable, "-m", "experiments.eval_goodhart", "--model", "nolabel"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "LABEL=PATH" in r.stderr
    assert not os.path.exists(tmp_path / "o")
