"""The micro-batch lever: the replay's micro-batch axis, the joint search, ``bench --joint``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from bench.optimizer import joint_job_shape, main, run_joint_workload
from energy.optimizer import JointOptimizer, LeastEnergy, SettingSpace, ZeusCost
from telemetry.backends.base import InvalidSettingError
from telemetry.backends.replay import (
    ReplayBackend,
    ReplayNoise,
    load_trace,
    micro_batches_of,
    steps_per_epoch,
)
from telemetry.backends.traces import resolve_trace
from telemetry.clock import VirtualClock

A40 = resolve_trace("a40")
SPACE = SettingSpace.power_limits(100_000, 300_000)


def test_a_micro_batch_plays_the_trace_at_that_batch_size_g_over_m_times_a_step() -> None:
    exact = ReplayNoise.off()
    whole = ReplayBackend(A40, "imagenet/resnet50", 512, noise=exact)
    split = ReplayBackend(A40, "imagenet/resnet50", 512, micro_batch=128, noise=exact)
    assert split.steps_per_epoch == whole.steps_per_epoch == steps_per_epoch("imagenet", 512)
    assert split.micro_batches() == (8, 16, 32, 64, 128, 256, 512)
    curve = next(c for c in load_trace(A40)
                 if c.workload == "imagenet/resnet50" and c.batch_size == 128)
    for limit_w in (300, 200):
        split.set_power_limit(0, limit_w * 1000)
        t_epoch, power = curve.at(limit_w)
        # An optimizer step is four micro-batches, each an iteration of the batch-128 curve.
        assert split.step_time_s() == pytest.approx(4 * t_epoch / steps_per_epoch("imagenet", 128))
        assert split.power_w() == pytest.approx(power)
    # Without accumulation, the step is the batch-512 curve's, as before micro-batches.
    split.set_micro_batch(512)
    whole.set_power_limit(0, 200_000)
    assert split.step_time_s() == pytest.approx(whole.step_time_s())
    assert split.power_w() == pytest.approx(whole.power_w())
    with pytest.raises(InvalidSettingError, match="not one of"):
        split.set_micro_batch(192)  # measured, but it does not divide 512
    with pytest.raises(ValueError, match="does not divide"):
        ReplayBackend(A40, "imagenet/resnet50", 512, micro_batch=360)


def test_a_job_keeps_its_noise_across_micro_batches() -> None:
    # The noise is the job's (seed, workload, global batch), so policies that pick different
    # micro-batches meet the same noise on the same steps.
    a = ReplayBackend(A40, "imagenet/resnet50", 512, micro_batch=128, clock=VirtualClock())
    b = ReplayBackend(A40, "imagenet/resnet50", 512, micro_batch=64, clock=VirtualClock())
    b.set_micro_batch(128)
    assert [a.run_steps(3) for _ in range(4)] == [b.run_steps(3) for _ in range(4)]


def test_micro_batches_of_a_trace_divide_the_global_batch() -> None:
    curves = load_trace(A40)
    assert micro_batches_of(curves, "squad", 72) == (8, 12, 24, 72)
    assert joint_job_shape(curves, "cifar100/shufflenetv2") == (
        512, 128, (8, 16, 32, 64, 128, 256, 512))


def _job(m_best: int = 32) -> tuple[dict[int, float], float]:
    """Per micro-batch, a step-time factor: fixed per-micro-batch costs amortise up to
    ``m_best``, then memory pressure costs a little."""
    factors = {m: 1.0 + 0.4 * (m_best / m - 1.0 if m < m_best else 0.05 * math.log2(m / m_best))
               for m in (4, 8, 16, 32, 64)}
    return factors, 0.1


def drive(opt: JointOptimizer, factors: dict[int, float], *, steps: int = 20_000,
          oom_above: int | None = None, seed: int = 0) -> None:
    rng = random.Random(seed)
    done = 0
    while done < steps:
        if oom_above is not None and opt.micro_batch > oom_above:
            opt.out_of_memory()
            continue
        n = opt.steps_wanted if opt.done else 1
        limit_w = opt.setting / 1000.0
        power = min(limit_w, 280.0)
        clock = ((power - 80.0) / 200.0) ** (1 / 2.7) if power > 80.0 else 0.05
        t = 0.1 * factors[opt.micro_batch] * (0.8 / max(clock, 0.05) + 0.2)
        jitter = 1 + 0.03 / math.sqrt(n) * rng.gauss(0, 1)
        opt.observe(n, n * t * jitter, n * t * jitter * power)
        done += n


def test_the_joint_search_moves_the_micro_batch_and_the_limit() -> None:
    factors, _ = _job(m_best=32)
    opt = JointOptimizer(SPACE, ZeusCost(0.5, 300.0), micro_batches=(4, 8, 16, 32, 64),
                         default=8)
    drive(opt, factors)
    res = opt.result
    assert opt.done and res is not None and res.feasible
    assert res.micro_batch == opt.micro_batch == 32 and res.default_micro_batch == 8
    assert res.setting < 300_000 and res.search is not None
    assert "micro-batch 32 scores best" in res.reason
    # Every probe is paid for: the micro-batch probes and the setting search together.
    assert opt.profiling_steps == res.profiling_steps > res.search.profiling_steps


def test_the_job_s_own_micro_batch_is_kept_when_nothing_amortises_better() -> None:
    flat = dict.fromkeys((4, 8, 16, 32, 64), 1.0) | {4: 1.3, 16: 1.08, 32: 1.15, 64: 1.2}
    opt = JointOptimizer(SPACE, LeastEnergy(), micro_batches=(4, 8, 16, 32, 64), default=8)
    drive(opt, flat)
    res = opt.result
    assert res is not None, opt.profiling_steps
    assert res.micro_batch == 8, res.reason
    assert "the job's own micro-batch, 8, scores best" in res.reason


def test_out_of_memory_stops_the_walk_up() -> None:
    factors, _ = _job(m_best=64)
    opt = JointOptimizer(SPACE, ZeusCost(0.5, 300.0), micro_batches=(4, 8, 16, 32, 64),
                         default=8)
    drive(opt, factors, oom_above=16)
    res = opt.result
    assert res is not None and res.micro_batch == 16 and opt.allowed == (4, 8, 16)
    assert "32 ran out of memory" in res.reason
    with pytest.raises(ValueError, match="smallest"):
        JointOptimizer(SPACE, LeastEnergy(), (8, 16), 8).out_of_memory()
    with pytest.raises(ValueError, match="default"):
        JointOptimizer(SPACE, LeastEnergy(), (8, 16), 12)


def test_joint_bench_on_a_replayed_workload_beats_the_limit_alone() -> None:
    path = resolve_trace("a40")
    runs = {r.policy: r for r in run_joint_workload(
        path, load_trace(path), "cifar100/shufflenetv2", 0.5, 20, 0, use_package=False)}
    assert set(runs) == {"max", "zeus", "ours", "ours_joint", "oracle_joint"}
    assert runs["max"].micro_batch == runs["ours"].micro_batch == 128
    joint, ours = runs["ours_joint"], runs["ours"]
    assert joint.micro_batch != 128 and joint.energy_per_sample_j < ours.energy_per_sample_j
    # A 20-epoch job (the bench runs 100): the search is a larger share of it.
    assert joint.regret < 0.05 and runs["oracle_joint"].regret == 0.0


def _tiny_trace(tmp_path: Path) -> Path:
    trace = tmp_path / "summary_power_tiny.csv"
    rows = ["dataset,network,batch_size,optimizer,power_limit,time_per_epoch,average_power"]
    for bs, t in ((8, 40.0), (16, 30.0), (32, 26.0)):
        for limit in (100, 150, 200):
            rows.append(f"tiny,net,{bs},sgd,{limit},{t * (1 + (200 - limit) / 400):.2f},"
                        f"{0.9 * limit:.1f}")
    trace.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return trace


def test_joint_bench_writes_one_row_per_workload_and_policy(tmp_path: Path) -> None:
    trace = _tiny_trace(tmp_path)
    out = tmp_path / "joint.json"
    assert main(["--joint", "--trace", str(trace), "--epochs", "2", "--zeus",
                 "reimplementation", "--json", str(out), "--table",
                 str(tmp_path / "joint.txt")]) == 0
    got = json.loads(out.read_text(encoding="utf-8"))
    assert [r["policy"] for r in got] == ["max", "zeus", "ours", "ours_joint", "oracle_joint"]
    for r in got:
        assert {"gpu", "workload", "policy", "micro_batch", "power_limit_w",
                "energy_per_sample_j", "time_per_sample_s", "profiling_energy_j"} <= set(r)


def test_the_bench_runs_ours_with_the_search_config_asked_for(tmp_path: Path) -> None:
    trace = _tiny_trace(tmp_path)
    out, table = tmp_path / "runs.json", tmp_path / "runs.txt"

    def ours_profiling_j(*config: str) -> float:
        assert main(["--trace", str(trace), "--epochs", "2", "--zeus", "reimplementation",
                     "--json", str(out), "--table", str(table), *config]) == 0
        runs = json.loads(out.read_text(encoding="utf-8"))
        return float(sum(r["profiling_energy_j"] for r in runs if r["policy"] == "ours"))

    default = ours_profiling_j()
    assert not table.read_text(encoding="utf-8").startswith("ours with")
    longer = ours_profiling_j("--config", "min_measure_steps=60", "screen_steps=60",
                              "budget_steps_per_candidate=80")
    # Every probe now measures 60 steps: the search profiles for longer, and the table says why.
    assert longer > default
    assert table.read_text(encoding="utf-8").startswith(
        "ours with SearchConfig(min_measure_steps=60, screen_steps=60, "
        "budget_steps_per_candidate=80)")


@pytest.mark.parametrize("bad", ["nope=1", "revisions=x", "revisions=-1"])
def test_the_bench_refuses_a_config_it_cannot_run(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--config", bad])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
