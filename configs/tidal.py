"""tidal: the decoding policy (TIDAL) trained on the demo model, the settings behind docs/tidal.md's figures.

    python -m mantis_jax.control.train_decoding --checkpoint=runs/demo_final --workdir=runs/demo_tidal \\
        --config=configs/tidal.py
    python benchmarks/tidal.py --checkpoint=runs/demo_final --policy=runs/demo_tidal --n=256 --out=docs/perf/tidal
    python -m mantis_jax.engine --checkpoint=runs/demo_final --decoding_policy=runs/demo_tidal --question="..."

Only the `decoding` section is read (the model and its tokenizer come from --checkpoint). What differs from the
defaults, and why (docs/tidal.md):
- chunk 2 × 24 chunks (48 tokens as before): the head acts every 2 tokens, so a modulation can follow the state
  within a continuation (a repetitive stretch, a confident position) instead of one setting per 8 tokens;
  gamma 0.9 (an action's effect is mostly on its own and the next chunks) and 8 minibatches (768 samples);
- repetition penalty up to 1.6 at m = 1 (1.3 by default): a wider map; at equal perplexity it repeats less than
  the default map for any m, constant or learned;
- the observation is the 7 scalars only (`observe_pooled` False): the state a rule would read, and 7 inputs
  instead of 199 for the samples a short run has (not compared with the pooled observation on this model);
- 8 prompts × 4 rollouts per update with the group baseline (`group` 4), so that a prompt's own difficulty does
  not enter the advantage;
- the reward is the two terms the benchmark reads (NLL and repetition): the band and coherence terms are off.
"""

from mantis_jax.config import default_config


def get_config():
    c = default_config()
    c.name = "tidal"
    d = c.decoding
    d.chunk, d.chunks = 2, 24
    d.gamma = 0.9
    d.penalty_high = 1.6
    d.observe_pooled = False
    d.episodes, d.group = 32, 4
    d.minibatches = 8
    d.updates, d.save_every = 400, 50
    d.entropy_coef = 0.003
    d.w_band, d.w_coherence = 0.0, 0.0
    d.w_nll, d.w_repeat = 0.2, 1.0
    return c
