"""A/B experiments on a real engine: sticky assignment, the split, outcomes, the statistics as
scipy computes them on the same numbers, SRM, guardrails, promotion and rollback, restarts."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from headfleet.engine import Engine
from headfleet.errors import ConflictError, NotFoundError, ValidationError
from headfleet.heads import examples_from_records
from headfleet.lifecycle import experiment_stats
from headfleet.lifecycle.experiments import Experiments, assign
from headfleet.lifecycle.store_file import FileStore
from headfleet.settings import Settings

TRAIN = [("win a free prize now, text CLAIM", "spam"), ("urgent! your account won cash, call now", "spam"),
         ("free entry to win a holiday, reply YES", "spam"), ("claim your free ringtone today", "spam"),
         ("are we still on for lunch?", "ham"), ("see you at the station at six", "ham"),
         ("can you send me the notes from class", "ham"), ("mum says dinner is at eight", "ham"),
         ("running late, start without me", "ham"), ("thanks for yesterday, it was fun", "ham")] * 3
TEXT = ["is lunch still on today?"]


@pytest.fixture
def engine(minilm, tmp_path):
    eng = Engine.open(Settings(data_dir=tmp_path / "data", device="cpu", faiss_store=False), minilm)
    records = [{"text": t, "label": lab} for t, lab in TRAIN]
    eng.train("acme", "spam", examples_from_records(records))  # v1
    eng.train("acme", "spam", examples_from_records(records), kind="mlp", candidate=True)  # v2, the candidate
    yield eng
    eng.close()


@pytest.fixture
def exps(engine, tmp_path):
    ex = Experiments(engine, FileStore(tmp_path / "exp")).attach()
    yield ex
    ex.close()


def arm_of(engine, unit, ref="spam"):
    entry = engine.classify("acme", TEXT, [ref], unit=unit)["results"][0]["classifications"][ref]
    return entry.get("experiment"), entry["version"]


def test_assignment_is_sticky_and_only_the_bare_name_is_split(engine, exps):
    exp = exps.create("acme", {"classifier": "spam", "control": "latest", "treatment": "candidate"})
    assert (exp["arms"]["control"]["version"], exp["arms"]["treatment"]["version"]) == (1, 2)
    assert exp["config"]["control"] == {"ref": "latest", "version": 1} and exp["state"] == "running"
    for unit in ("user-1", "user-2", "user-3", "user-42"):
        seen = {arm_of(engine, unit)[0]["arm"] for _ in range(8)}
        assert len(seen) == 1  # the same unit, many requests: one arm
        tag, version = arm_of(engine, unit)
        assert tag == {"id": exp["id"], "arm": assign(exp["id"], unit, 0.5),
                       "version": 2 if tag["arm"] == "treatment" else 1}
        assert version == tag["version"]
        assert arm_of(engine, unit, "spam@latest")[0] == tag  # @latest is the bare name
    tag, version = arm_of(engine, None)
    assert tag["arm"] == "control" and version == 1  # no unit: control, counted nowhere
    assert arm_of(engine, "user-42", "spam@2") == (None, 2)  # pinned: bypasses the experiment
    assert arm_of(engine, "user-42", "spam@candidate") == (None, 2)
    # a job's chunk (live=False) is not routed either
    out = engine.classify("acme", TEXT, ["spam"], unit="user-42", live=False)
    assert "experiment" not in out["results"][0]["classifications"]["spam"]
    report = exps.report("acme", exp["id"])
    assert sum(a["n_units"] for a in report["arms"].values()) == 4  # "user-1..3", "user-42"; not the unit-less


def test_the_split_holds_over_2000_units_and_survives_a_restart(engine, exps, tmp_path):
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2, "split": 0.3})
    arms = {}
    for i in range(2000):
        arms[f"u{i}"] = arm_of(engine, f"u{i}")[0]["arm"]
    n_t = sum(a == "treatment" for a in arms.values())
    lo, hi = sps.binom.interval(0.999, 2000, 0.3)
    assert lo <= n_t <= hi
    report = exps.report("acme", exp["id"])
    assert report["arms"]["treatment"]["n_units"] == n_t and report["arms"]["control"]["n_units"] == 2000 - n_t
    assert report["srm"] is False
    # a second replica (or a restart) on the same store routes every unit to the same arm
    other = Experiments(engine, FileStore(tmp_path / "exp"))
    exps.close()
    other.attach()
    try:
        assert all(arm_of(engine, u)[0]["arm"] == arms[u] for u in list(arms)[:200])
    finally:
        other.close()


def test_outcomes_give_welch_as_scipy_computes_it_and_a_planted_lift_is_promoted(engine, exps):
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2, "min_samples": 150,
                               "sequential": False, "metric": "conversion"})
    rng = np.random.default_rng(7)
    units = [f"user-{i}" for i in range(400)]
    arms = {u: arm_of(engine, u)[0]["arm"] for u in units}
    items, values = [], {u: 0.0 for u in units}
    for u in units:
        rate = 0.45 if arms[u] == "treatment" else 0.15
        for k in range(rng.integers(0, 3)):  # several outcomes per unit add up
            v = float(rng.random() < rate)
            items.append({"unit": u, "value": v, "id": f"{u}-{k}"})
            values[u] += v
    got = exps.add_outcomes("acme", exp["id"], {"items": items})
    assert got == {"accepted": len(items), "duplicates": 0, "refused": []}
    assert exps.add_outcomes("acme", exp["id"], {"items": items[:5]})["duplicates"] == 5  # a retry adds nothing
    report = exps.report("acme", exp["id"])
    c = np.array([values[u] for u in units if arms[u] == "control"])  # missing outcomes count as 0
    t = np.array([values[u] for u in units if arms[u] == "treatment"])
    ref = sps.ttest_ind(t, c, equal_var=False)
    assert report["welch"]["t"] == pytest.approx(ref.statistic, rel=1e-9)
    assert report["welch"]["df"] == pytest.approx(ref.df, rel=1e-9)
    assert report["welch"]["p"] == pytest.approx(ref.pvalue, rel=1e-6)
    ci = ref.confidence_interval(0.95)
    assert report["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    assert report["lift"] == pytest.approx(t.mean() - c.mean())
    assert report["arms"]["treatment"]["mean"] == pytest.approx(t.mean())
    assert report["arms"]["control"]["variance"] == pytest.approx(c.var(ddof=1))
    assert report["srm_p"] == pytest.approx(sps.chisquare([len(c), len(t)], [200, 200]).pvalue)
    assert report["recommendation"] == "promote"
    stopped = exps.stop("acme", exp["id"], "promote")
    assert stopped["state"] == "stopped" and stopped["decision"] == "promote"
    assert engine.registry.aliases("acme", "spam")["latest"] == 2
    assert stopped["welch"] == report["welch"]  # the record keeps the full result
    assert arm_of(engine, "user-1")[0] is None  # traffic is no longer split
    with pytest.raises(ConflictError):
        exps.stop("acme", exp["id"], "rollback")
    with pytest.raises(ConflictError):
        exps.add_outcomes("acme", exp["id"], {"items": items[:1]})


def test_outcome_items_are_checked_one_by_one_and_missing_can_be_excluded(engine, exps):
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2, "missing": "exclude"})
    arm_of(engine, "seen")
    arm_of(engine, "quiet")  # exposed, never an outcome: left out
    got = exps.add_outcomes("acme", exp["id"], {"items": [
        {"unit": "seen", "value": 2.5, "segment": "mobile"}, {"unit": "never", "value": 1},
        {"unit": "seen", "value": float("nan")}, {"unit": "seen", "value": True}, {"unit": "seen"},
        {"unit": "seen", "value": 1, "colour": "red"}, "seen", {"unit": "seen", "value": 0.5}]})
    assert got["accepted"] == 2
    assert [r["index"] for r in got["refused"]] == [1, 2, 3, 4, 5, 6]
    assert "never assigned" in got["refused"][0]["reason"]
    report = exps.report("acme", exp["id"])
    arm = report["arms"][assign(exp["id"], "seen", 0.5)]
    assert arm["n_units"] == 1 and arm["mean"] == 3.0  # 2.5 + 0.5; "quiet" excluded
    assert list(report["slices"]) == ["mobile"]
    with pytest.raises(ValidationError):
        exps.add_outcomes("acme", exp["id"], {"items": []})


def test_skewed_assignment_is_flagged_as_a_sample_ratio_mismatch(engine, exps):
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2, "min_samples": 50})
    # a logging bug on purpose: only every third treatment unit's request reaches headfleet
    units = [f"s{i}" for i in range(600)]
    kept = [u for i, u in enumerate(units) if assign(exp["id"], u, 0.5) == "control" or i % 3 == 0]
    for u in kept:
        arm_of(engine, u)
    report = exps.report("acme", exp["id"])
    assert report["srm"] is True and report["srm_p"] < 0.001
    assert report["recommendation"] == "inconclusive"


def test_a_guardrail_breach_after_min_samples_rolls_back_by_itself(engine, exps):
    engine.registry.set_alias("acme", "spam", "latest", 2)  # the treatment had been made latest early
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2, "min_samples": 5,
                               "guardrails": {"p99_ms": 0.001}})  # nothing is that fast: a sure breach
    for i in range(4):
        arm_of(engine, f"g{i}")
    exps.flush()
    assert exps.report("acme", exp["id"])["state"] == "running"  # not judged before min_samples
    i = 4
    while min(a["n_units"] for a in exps.report("acme", exp["id"])["arms"].values()) < 5:
        arm_of(engine, f"g{i}")
        i += 1
    exps._checked.clear()
    exps.flush()
    report = exps.report("acme", exp["id"])
    assert report["state"] == "stopped" and report["decision"] == "rollback"
    assert "p99_ms" in report["reason"]
    assert engine.registry.aliases("acme", "spam")["latest"] == 1


def test_configuration_errors_and_tenant_isolation(engine, exps):
    with pytest.raises(NotFoundError):
        exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 9})
    with pytest.raises(NotFoundError):
        exps.create("acme", {"classifier": "nope", "control": 1, "treatment": 2})
    for bad in ({"classifier": "spam", "control": 1, "treatment": 2, "split": 1.0},
                {"classifier": "spam", "control": 1, "treatment": 2, "split": 0},
                {"classifier": "spam", "control": 1, "treatment": 2, "min_samples": 1},
                {"classifier": "spam", "control": 1, "treatment": 2, "guardrails": {"p50_ms": 3}},
                {"classifier": "spam@1", "control": 1, "treatment": 2},
                {"classifier": "spam", "control": True, "treatment": 2},
                {"classifier": "spam", "treatment": 2}):
        with pytest.raises(ValidationError):
            exps.create("acme", bad)
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2})
    with pytest.raises(ConflictError):
        exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2})
    with pytest.raises(NotFoundError):
        exps.report("other", exp["id"])  # another tenant's id is a made-up one
    with pytest.raises(NotFoundError):
        exps.stop("other", exp["id"], "promote")
    assert exps.list("other")["experiments"] == []
    assert [e["id"] for e in exps.list("acme")["experiments"]] == [exp["id"]]
    exps.stop("acme", exp["id"], "rollback")
    second = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2})
    page = exps.list("acme", limit=1)
    assert [e["id"] for e in page["experiments"]] == [second["id"]] and page["next"] == second["id"]
    assert [e["id"] for e in exps.list("acme", limit=1, after=page["next"])["experiments"]] == [exp["id"]]


def test_each_outcomes_post_is_a_look_and_the_always_valid_p_never_rises(engine, exps):
    """The lift as it accrues, one look per accepted post; the always-valid p is the running minimum
    over looks (Johari et al. 2022), so an unlucky later look cannot take back what an earlier one
    showed — and a post that only repeats ids is no look."""
    exp = exps.create("acme", {"classifier": "spam", "control": 1, "treatment": 2, "min_samples": 20,
                               "missing": "exclude"})
    rng = np.random.default_rng(11)
    units = [f"user-{i}" for i in range(300)]
    arms = {u: arm_of(engine, u)[0]["arm"] for u in units}
    posted, values = 0, {}
    for part in range(6):
        chunk = units[part * 50:(part + 1) * 50]
        # the treatment wins in the first half and loses in the second: the current look's p rises again
        better = "treatment" if part < 3 else "control"
        items = [{"unit": u, "value": float(rng.random() < (0.6 if arms[u] == better else 0.2)), "id": f"{u}-o"}
                 for u in chunk]
        values.update({it["unit"]: it["value"] for it in items})
        assert exps.add_outcomes("acme", exp["id"], {"items": items})["accepted"] == 50
        posted += 1
    assert exps.add_outcomes("acme", exp["id"], {"items": items[:3]})["duplicates"] == 3
    report = exps.report("acme", exp["id"])
    looks = report["looks"]
    assert len(looks) == posted
    assert [lk["n_control"] + lk["n_treatment"] for lk in looks] == [50 * (k + 1) for k in range(posted)]
    assert looks[2]["lift"] > looks[-1]["lift"]  # the lift as it accrued: strong, then diluted
    ps = [lk["sequential_p"] for lk in looks]
    assert all(later <= earlier for earlier, later in zip(ps, ps[1:]))  # never rises
    assert report["sequential_p"] == pytest.approx(min(ps)) and report["p"] == report["sequential_p"]
    assert looks[-1]["lift"] == pytest.approx(report["lift"]) and looks[-1]["ci95"] == pytest.approx(report["ci95"])
    # the premise: the current look alone says less than the best earlier look did
    c = np.array([v for u, v in values.items() if arms[u] == "control"])
    t = np.array([v for u, v in values.items() if arms[u] == "treatment"])
    alone = experiment_stats.compare(c, t, split=0.5, min_samples=20, sequential=True)["sequential_p"]
    assert alone > report["sequential_p"]
