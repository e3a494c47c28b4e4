"""The engine's parts attached to an evaluation: factworld systems per policy, and the critic as verifier.

Parts are given as workdirs: `--stage2` (the trained retrieval encoder, `python -m mantis_jax.memory.train`),
`--critic` (`python -m mantis_jax.control.train_critic`), `--controller` (`python -m mantis_jax.control.train_rl`).
With any of them, factworld also runs the engine (memory on: every record's context is read into memory, the
question answered from retrieved spans and the window) under each policy present:
  engine            the fixed policy: retrieve always, full depth, no verification
  engine+critic     the same, verified by the critic (below its threshold the answer is "unknown")
  engine+controller the learned controller's decisions (it needs the critic for its verify gate)
and the critic is GSM8K's verifier and HaluEval's detector. With none, every task evaluates the LM alone, and the
report's notes say so.
"""

from __future__ import annotations

LM_ALONE = ("the checkpoint has no engine parts (no --stage2 retrieval encoder, --critic or --controller): "
            "evaluating the LM alone (factworld: attention only)")


def attach(ctx, *, stage2: str | None = None, critic: str | None = None, controller: str | None = None) -> None:
    """Adds the engine's systems and the critic to `ctx` (a tasks.Context), or the LM-alone note."""
    if not (stage2 or critic or controller):
        ctx.notes.append(LM_ALONE)
        return
    if controller and not critic:
        raise ValueError("--controller needs --critic: the controller's verify gate runs the critic (train one "
                         "with python -m mantis_jax.control.train_critic)")
    from mantis_jax.engine.core import Engine  # noqa: PLC0415
    from mantis_jax.engine.policy import FixedPolicy  # noqa: PLC0415
    from mantis_jax.eval import evidence  # noqa: PLC0415
    from mantis_jax.memory.train import load_encoder_params  # noqa: PLC0415

    params = ctx.float_params if ctx.float_params is not None else ctx.params
    lm_triple = (ctx.config, ctx.tokenizer, params)
    critic_obj = None
    if critic:
        from mantis_jax.control.critic import Critic  # noqa: PLC0415

        critic_obj = Critic.from_workdir(critic, lm=lm_triple)
        ctx.verifier = critic_obj
    encoder = load_encoder_params(stage2) if stage2 else None
    if not stage2:
        ctx.notes.append("no --stage2 retrieval encoder: the engine encodes spans with the LM's mean-pooled "
                         "hidden states")
    if ctx.float_params is not None:
        ctx.notes.append("the engine runs the float weights (--quantize applies to the LM-alone systems)")
    engine = Engine(ctx.config, params, ctx.tokenizer, policy=FixedPolicy(), critic=critic_obj,
                    encoder_params=encoder)
    ctx.systems["engine"] = evidence.engine_system(engine, FixedPolicy("always", 1.0, False), ctx.lm)
    if critic_obj is not None:
        ctx.systems["engine+critic"] = evidence.engine_system(engine, FixedPolicy("always", 1.0, True), ctx.lm)
    if controller:
        from mantis_jax.control.controller import Controller  # noqa: PLC0415

        ctl = Controller.from_workdir(controller)
        ctx.systems["engine+controller"] = evidence.engine_system(engine, ctl, ctx.lm)
