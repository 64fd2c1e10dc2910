"""Session 15: the gate's checks along the blend of session 13's keep-3 adapters (H100, bf16, full task sets).

x is the next-token adapter's share of the LoRA update (0 = the distilled adapter, 1 = the next-token one; 0.25 and
0.5 are `linearize finetune --mix` blends). Left: perplexity over the teacher's, with the gate's limits. Right: each
task's paired difference from SWA 64 + 4 sinks in points, with one paired standard error; the gate needs >= 0.

    .venv/bin/python docs/results/quality/gpu_s15/blend_curve.py
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.zero_shot import paired_difference  # noqa: E402

HERE = Path(__file__).parent
COMBINED = HERE.parent / "eval_combined_s15_fullsets.json"
BLEND = {"w128-keep3-20M-distill stage2": 0.0, "blend-ce25 stage2": 0.25, "blend-ce50 stage2": 0.5,
         "w128-keep3-20M stage2": 1.0}
TASKS = ["arc_challenge", "hellaswag", "piqa", "arc_easy", "winogrande", "mmlu"]


def curve(results: dict) -> list[dict]:
    models = results["models"]
    teacher, swa = models["teacher"], models["swa64+4sinks"]
    points = []
    for name, share in sorted(BLEND.items(), key=lambda item: item[1]):
        model = models[name]
        ppl = {"overall": model["held_out"]["perplexity"] / teacher["held_out"]["perplexity"],
               "1024-2048": (model["held_out"]["by_position"]["1024-2048"]
                             / teacher["held_out"]["by_position"]["1024-2048"])}
        versus_swa = {task: paired_difference(model["zero_shot"][task], swa["zero_shot"][task]) for task in TASKS}
        points.append({"model": name, "next_token_share": share, "perplexity_over_teacher": ppl,
                       "paired_vs_swa": versus_swa})
    return points


def gate_limits(results: dict) -> dict[str, float]:
    """The perplexity limits the combined results' gate used (eval.max_perplexity_ratio and the late one)."""
    settings = results["settings"]
    return {"overall": settings["max_perplexity_ratio"], "1024-2048": settings["max_late_perplexity_ratio"]}


def plot(points: list[dict], limits: dict[str, float], path: Path) -> None:
    shares = [p["next_token_share"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, limit in limits.items():
        line = left.plot(shares, [p["perplexity_over_teacher"][key] for p in points], "o-", label=f"{key} positions")
        left.axhline(limit, ls="--", color=line[0].get_color(), lw=1, label=f"gate limit {limit}")
    left.set(xlabel="next-token share of the LoRA update", ylabel="perplexity / teacher's",
             title="held-out Brown, 64 x 2,048 tokens")
    left.legend(fontsize=8)
    for offset, task in zip([-0.015, -0.009, -0.003, 0.003, 0.009, 0.015], TASKS):
        diffs = [p["paired_vs_swa"][task] for p in points]
        right.errorbar([s + offset for s in shares], [100 * d["difference"] for d in diffs],
                       yerr=[100 * d["stderr"] for d in diffs], fmt="o-", capsize=3, ms=4, label=task)
    right.axhline(0, color="black", lw=1)
    right.set(xlabel="next-token share of the LoRA update", ylabel="points vs SWA 64 + 4 sinks (paired)",
              title="accuracy minus SWA+sinks', +/- one paired standard error")
    right.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    results = json.loads(COMBINED.read_text())
    points = curve(results)
    out = {"source": str(COMBINED.relative_to(HERE.parents[3])), "device": f"{results['device']}, {results['dtype']}",
           "points": points}
    (HERE / "blend_curve.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(points, gate_limits(results), HERE / "blend_curve.png")
    print(f"{'share':>6} {'ppl x':>7} {'1024-2048 x':>12} " + " ".join(f"{t[:9]:>15}" for t in TASKS))
    for p in points:
        paired = [p["paired_vs_swa"][t] for t in TASKS]
        diffs = " ".join(f"{100 * d['difference']:+6.2f} ({100 * d['stderr']:.2f})" for d in paired)
        ppl = p["perplexity_over_teacher"]
        print(f"{p['next_token_share']:6.2f} {ppl['overall']:7.3f} {ppl['1024-2048']:12.3f} {diffs}")
    print(f"wrote {HERE / 'blend_curve.json'} and blend_curve.png")


if __name__ == "__main__":
    main()
