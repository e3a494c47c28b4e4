"""What one answer cost and why: the trace of every decision, read, FLOP and millisecond of a query.

The engine fills a `Trace` as each stage runs (the FLOPs of a stage are added when the stage has run, from the
token and layer counts it actually processed) and returns it in an `Answer`. `to_dict()` is JSON-ready;
`format()` is the text the CLI and the demo print. `compute` = flops / flops_full is the reward's compute term:
`flops_full` is the same query on the full path (full depth, retrieval, a critic call when the engine has a critic),
a function of the query and memory only, never of the policy's decisions.
"""

from __future__ import annotations

import dataclasses
import json

COMPONENTS = ("summary", "retrieval_encoder", "prefill", "decode", "critic")


@dataclasses.dataclass
class Trace:
    question: str = ""
    decisions: dict = dataclasses.field(default_factory=dict)  # Decisions.to_dict(): the gates and their probs
    summary: dict = dataclasses.field(default_factory=dict)  # the StateSummary's scalars the policy saw
    retrieved: list = dataclasses.field(default_factory=list)  # [{text, score, tier, session}], best first
    memory: dict = dataclasses.field(default_factory=dict)  # items per tier when the question came
    notes: list = dataclasses.field(default_factory=list)  # e.g. "memory is empty: answered from the window"
    prompt: str = ""
    prompt_tokens: int = 0
    layers_per_token: list = dataclasses.field(default_factory=list)
    modulation: list = dataclasses.field(default_factory=list)  # decoding head: per chunk {m, temperature, ...}
    expert_load: list = dataclasses.field(default_factory=list)  # [L][E] router shares of the prompt decoded from
    flops: dict = dataclasses.field(default_factory=lambda: {c: 0.0 for c in COMPONENTS})
    flops_full: float = 0.0
    prefills: int = 0  # model passes over a prompt: the summary's, and a second one for retrieved spans or a bias
    full_prefills: int = 0  # the same on the full path: 2 when memory has spans to place, else 1
    latency_ms: dict = dataclasses.field(default_factory=dict)  # per stage
    candidate: str = ""  # the generated answer before verification
    critic_score: float | None = None
    abstained: bool = False

    @property
    def flops_total(self) -> float:
        return float(sum(self.flops.values()))

    @property
    def compute(self) -> float:
        return self.flops_total / self.flops_full if self.flops_full else 1.0

    def add_flops(self, component: str, flops: float) -> None:
        if component not in self.flops:
            raise KeyError(f"unknown FLOP component {component!r}; use one of {COMPONENTS}")
        self.flops[component] += float(flops)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(flops_total=self.flops_total, compute=self.compute,
                 mean_layers_per_token=(sum(self.layers_per_token) / len(self.layers_per_token)
                                        if self.layers_per_token else 0.0))
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def format(self) -> str:
        dec = self.decisions
        gates = ", ".join(f"{k}={dec[k]}" for k in ("episodic", "semantic", "exit_threshold", "verify") if k in dec)
        if dec.get("probs"):
            gates += " (p: " + ", ".join(f"{k} {v:.2f}" for k, v in dec["probs"].items()) + ")"
        lines = [f"decisions: {gates}",
                 f"memory: {self.memory}" + (f"  best score {self.summary.get('best_score', 0.0):.3f}"
                                             if self.summary else "")]
        lines += [f"note: {n}" for n in self.notes]
        for h in self.retrieved:
            lines.append(f"  read [{h['tier']:8s} {h['score']:.3f}] {h['text']}")
        mean_layers = (sum(self.layers_per_token) / len(self.layers_per_token)) if self.layers_per_token else 0
        lines.append(f"prompt: {self.prompt_tokens} tokens; generated {len(self.layers_per_token)} tokens, layers "
                     f"per token {self.layers_per_token} (mean {mean_layers:.2f})")
        if self.modulation:
            lines.append("decoding head: m per chunk " + " ".join(f"{c['m']:.2f}" for c in self.modulation)
                         + " (temperature " + " ".join(f"{c['temperature']:.2f}" for c in self.modulation)
                         + "; top-k " + " ".join(str(c["top_k"]) for c in self.modulation)
                         + "; top-p " + " ".join(f"{c['top_p']:.2f}" for c in self.modulation)
                         + "; penalty " + " ".join(f"{c['penalty']:.2f}" for c in self.modulation) + ")")
        lines.append("FLOPs: " + ", ".join(f"{k} {v:.3g}" for k, v in self.flops.items() if v)
                     + f"; total {self.flops_total:.3g} = {self.compute:.2f} of the full path ({self.flops_full:.3g})")
        lines.append("latency ms: " + ", ".join(f"{k} {v:.1f}" for k, v in self.latency_ms.items()))
        if self.critic_score is not None:
            lines.append(f"critic: P(supported) {self.critic_score:.3f}"
                         + (f" -> abstained (candidate {self.candidate!r})" if self.abstained else ""))
        return "\n".join(lines)


@dataclasses.dataclass
class Answer:
    text: str
    trace: Trace

    def to_dict(self) -> dict:
        return {"text": self.text, "trace": self.trace.to_dict()}
