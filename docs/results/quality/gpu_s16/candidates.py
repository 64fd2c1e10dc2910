"""Issue 6, sessions 13-16: every keep-3 stage-2 candidate against the gate, on one page (H100, bf16, full task sets).

Joins the five candidates' committed evaluations beside session 13's baselines (`pipeline.evaluate.combine`), adds
each one's training tokens from its committed run files (stage 1 from plan.json, stage 2 from the finetune result;
a blend spends both of its sources' stage 2s), and judges each with the gate. Left: perplexity over the teacher's
against ARC-c's paired difference from SWA 64 + 4 sinks (+/- one paired standard error), the gate's pass region
shaded. Right: which of the gate's checks each candidate passes.

    .venv/bin/python docs/results/quality/gpu_s16/candidates.py
"""
import dataclasses
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.config import EvalConfig  # noqa: E402
from pipeline.evaluate import combine, gate, stage1_tokens_of_plan  # noqa: E402
from pipeline.finetune import trained_tokens  # noqa: E402
from pipeline.zero_shot import paired_difference  # noqa: E402

HERE = Path(__file__).parent
QUALITY = HERE.parent
BASELINES = QUALITY / "eval_fullsets_s13_baselines.json"
NEXT_TOKEN_RUN = QUALITY / "run_seq2048_20m_window128_keep3_s13"
DISTILL_RUN = QUALITY / "run_seq2048_20m_window128_keep3_distill_s13"
# label -> (evaluation, the stage-2 runs whose training the adapter embodies). All share session 13's stage 1.
CANDIDATES = {
    "next-token": ("eval_fullsets_s13_window128_keep3_stage2.json", [NEXT_TOKEN_RUN]),
    "blend 1/2": ("eval_fullsets_s15_blend_ce50_stage2.json", [NEXT_TOKEN_RUN, DISTILL_RUN]),
    "mixed 0.5": ("eval_fullsets_s16_keep3_mixed_stage2.json", [QUALITY / "run_keep3_mixed_s16"]),
    "blend 1/4": ("eval_fullsets_s15_blend_ce25_stage2.json", [NEXT_TOKEN_RUN, DISTILL_RUN]),
    "distilled": ("eval_fullsets_s13_window128_keep3_distill_stage2.json", [DISTILL_RUN]),
}


def training_tokens(stage2_runs: list[Path]) -> dict[str, int]:
    stage1 = stage1_tokens_of_plan(json.loads((NEXT_TOKEN_RUN / "plan.json").read_text()))
    stage2 = [trained_tokens(json.loads((run / "finetune_result.json").read_text())) for run in stage2_runs]
    return {"stage1": stage1, "stage2": sum(stage2)}


def judged() -> tuple[dict, list[dict]]:
    runs = []
    for label, (name, stage2_runs) in CANDIDATES.items():
        results = json.loads((QUALITY / name).read_text())
        # Evaluations older than session 15 did not record tokens: add them from the run files.
        results["models"]["stage2"]["training_tokens"] = training_tokens(stage2_runs)
        runs.append((label, results))
    combined = combine(json.loads(BASELINES.read_text()), runs)
    settings = EvalConfig(**combined["settings"])
    swa = combined["models"]["swa64+4sinks"]
    teacher = combined["models"]["teacher"]
    points = []
    for label, _ in runs:
        model = combined["models"][f"{label} stage2"]
        verdict = gate(combined, settings, model=f"{label} stage2")
        arc = paired_difference(model["zero_shot"]["arc_challenge"], swa["zero_shot"]["arc_challenge"])
        points.append({
            "candidate": label, "training_tokens": sum(model["training_tokens"].values()),
            "perplexity_over_teacher": model["held_out"]["perplexity"] / teacher["held_out"]["perplexity"],
            "arc_challenge_vs_swa": arc,
            "checks_passed": sum(c["passed"] for c in verdict["checks"]), "checks": len(verdict["checks"]),
            "failed": [c["check"] for c in verdict["checks"] if not c["passed"]],
            "verdict": verdict["checks"]})
    return combined, points


def plot(points: list[dict], settings: EvalConfig, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6.4), gridspec_kw={"width_ratios": [1, 1.5]})
    # The pass region of these two checks: ARC-c at least SWA+sinks', perplexity at most the limit.
    left.fill_between([0, 2.5], 0.9, settings.max_perplexity_ratio, color="tab:green", alpha=0.1,
                      label=f"gate: ARC-c >= SWA+sinks, perplexity <= {settings.max_perplexity_ratio}x")
    left.axhline(settings.max_perplexity_ratio, ls="--", color="gray", lw=1)
    left.axvline(0, color="black", lw=1)
    for p in points:
        arc = p["arc_challenge_vs_swa"]
        over = p["training_tokens"] > settings.max_training_tokens
        left.errorbar(100 * arc["difference"], p["perplexity_over_teacher"], xerr=100 * arc["stderr"], fmt="o",
                      capsize=3, mfc="white" if over else None,
                      label=f"{p['candidate']}: {p['training_tokens'] / 1e6:.0f}M tokens, "
                            f"{p['checks_passed']}/{p['checks']} checks")
    left.set(xlabel="ARC-c minus SWA+sinks', points (paired, +/- one standard error)",
             ylabel="held-out perplexity / teacher's", title="open markers: over the 40M-token budget")
    left.set_xlim(-2.6, 2.5)
    left.set_ylim(0.94, 1.09)
    left.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    names = [c["check"] for c in points[0]["verdict"]]
    grid = [[1.0 if c["passed"] else 0.0 for c in p["verdict"]] for p in points]
    right.imshow(grid, cmap="RdYlGn", vmin=-0.3, vmax=1.3, aspect="auto")
    right.set_yticks(range(len(points)), [p["candidate"] for p in points])
    right.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    for row, p in enumerate(points):
        for col, c in enumerate(p["verdict"]):
            if not c["passed"]:
                right.text(col, row, "fail", ha="center", va="center", fontsize=7)
    right.set_title("the gate's checks (green: passed)")
    fig.suptitle("Issue 6: keep-3 stage-2 candidates on the H100's full task sets (sessions 13-16)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    combined, points = judged()
    settings = EvalConfig(**combined["settings"])
    out = {"baselines": str(BASELINES.relative_to(HERE.parents[3])), "device": combined["device"],
           "dtype": combined["dtype"], "settings": dataclasses.asdict(settings), "candidates": points}
    (HERE / "candidates.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(points, settings, HERE / "candidates.png")
    print(f"{'candidate':<12} {'tokens':>7} {'ppl x':>6} {'ARC-c vs SWA (SE)':>18}  checks  failed")
    for p in points:
        arc = p["arc_challenge_vs_swa"]
        print(f"{p['candidate']:<12} {p['training_tokens'] / 1e6:6.1f}M {p['perplexity_over_teacher']:6.3f} "
              f"{100 * arc['difference']:+9.2f} ({100 * arc['stderr']:.2f})  {p['checks_passed']:>2}/{p['checks']}"
              f"   {', '.join(p['failed']) or '-'}")
    print(f"wrote {HERE / 'candidates.json'} and candidates.png")


if __name__ == "__main__":
    main()
