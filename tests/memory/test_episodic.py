"""Episodic memory: the functional core (update/read against references, constant state, learning) and the store."""

import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mantis_jax import config as config_lib
from mantis_jax.memory.episodic import EpisodicEntry, EpisodicMemory, EpisodicStore
from mantis_jax.model.ssm import SSMArgs

# Parameter init with "rbg" keys: threefry makes the init program compile ~3x slower on CPU.
init_key = lambda seed: jax.random.key(seed, impl="rbg")
ARGS = SSMArgs(d_model=8, d_state=4, d_conv=3, expand=2, n_layers=2, dt_rank=2, chunk_size=4)


@pytest.fixture(scope="module")
def memory():
    mem = EpisodicMemory(ARGS)
    params = mem.init_params(init_key(0))
    update = jax.jit(mem.update)
    return mem, params, update


def _hidden(b, t, seed=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, t, ARGS.d_model)), jnp.float32)


def test_state_size_is_independent_of_length_and_pieces_equal_whole(memory):
    mem, params, update = memory
    h = _hidden(2, 16)
    short = update(params, mem.init(2), h[:, :8])
    whole = update(params, mem.init(2), h)
    chex.assert_trees_all_equal_shapes_and_dtypes(short, whole, mem.init(2))
    np.testing.assert_array_equal(whole.tokens_seen_b, [16, 16])
    assert not np.allclose(short.caches[0].ssm_bdn, whole.caches[0].ssm_bdn)
    pieces = update(params, short, h[:, 8:])
    chex.assert_trees_all_close(pieces, whole, rtol=1e-4, atol=1e-5)


def test_masked_tokens_are_skipped_wherever_they_sit(memory):
    mem, params, update = memory
    h = _hidden(2, 8)
    valid0 = [0, 2, 3, 7]
    mask = np.ones((2, 8), bool)
    mask[0] = False
    mask[0, valid0] = True
    got = update(params, mem.init(2), h, jnp.asarray(mask))
    # Reference: row 0's valid tokens moved to the front by hand, the rest masked as a suffix ...
    h_ref = np.array(h)
    h_ref[0, :4] = h_ref[0, valid0]
    h_ref[0, 4:] = 1e3  # garbage that must not reach the state
    prefix = np.ones((2, 8), bool)
    prefix[0, 4:] = False
    ref = update(params, mem.init(2), jnp.asarray(h_ref), jnp.asarray(prefix))
    chex.assert_trees_all_close(got, ref, rtol=1e-4, atol=1e-5)
    # ... and the fully valid row 1 equals an unmasked update.
    plain = update(params, mem.init(2), h)
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[1:], got), jax.tree.map(lambda v: v[1:], plain),
                                rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got.tokens_seen_b, [4, 8])


def test_read_matches_dense_reference(memory):
    mem, params, update = memory
    state = update(params, mem.init(2), _hidden(2, 8))
    query = jnp.asarray(np.random.default_rng(5).standard_normal((2, 3, ARGS.d_model)), jnp.float32)
    got = jax.jit(mem.read)(params, state, query)
    p = params["params"]
    q = np.asarray(query, np.float64)
    q = q / np.sqrt(np.mean(q ** 2, -1, keepdims=True) + ARGS.norm_eps) * np.asarray(p["query_norm"]["scale"])
    want = np.zeros_like(q)
    for layer, cache in enumerate(state.caches):
        c = q @ np.asarray(p["read_c"][layer])  # [B, Q, N]
        r = np.einsum("ben,bqn->bqe", np.asarray(cache.ssm_bdn), c)
        g = q @ np.asarray(p["read_gate"][layer])
        want += (r * g / (1 + np.exp(-g))) @ np.asarray(p["read_out"][layer])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mem.read(params, state, query[:, 0]), got[:, 0], rtol=1e-5, atol=1e-6)


def test_width_mismatch_and_config_mismatch_raise(memory):
    mem, params, _ = memory
    with pytest.raises(ValueError, match="config.memory.episodic.d_model"):
        mem.update(params, mem.init(1), jnp.zeros((1, 3, ARGS.d_model + 1)))
    with pytest.raises(ValueError, match="mask shape"):
        mem.update(params, mem.init(1), jnp.zeros((1, 3, ARGS.d_model)), jnp.ones((1, 4), bool))
    cfg = config_lib.default_config()
    cfg.memory.episodic.d_model = cfg.model.d_model * 2
    with pytest.raises(config_lib.ConfigError, match="memory.episodic.d_model"):
        config_lib.validate(cfg)
    cfg = config_lib.default_config()
    cfg.memory.episodic.scan_impl = "parallel"
    with pytest.raises(config_lib.ConfigError, match="scan_impl"):
        config_lib.validate(cfg)
    cfg = config_lib.default_config()
    mem_cfg = EpisodicMemory.from_config(config_lib.validate(cfg))
    assert mem_cfg.args.d_model == cfg.model.d_model and mem_cfg.args.scan_impl == cfg.memory.episodic.scan_impl


@pytest.mark.slow
def test_tiny_memory_learns_to_copy_the_first_token():
    """The token at position 0 must be recalled from the state after 47 distractor tokens (chance: 25%)."""
    n_keys, n_fill, t, d = 4, 8, 48, 16
    mem = EpisodicMemory(SSMArgs(d_model=d, d_state=8, d_conv=2, expand=2, n_layers=1, dt_rank=2, chunk_size=8))
    rng = np.random.default_rng(0)
    params = {"mem": mem.init_params(init_key(0)),
              "embed": jnp.asarray(rng.standard_normal((n_keys + n_fill, d)), jnp.float32),
              "query": jnp.asarray(rng.standard_normal(d), jnp.float32), "out": jnp.zeros((d, n_keys))}

    def batch(rng, size=32):
        r1, r2 = jax.random.split(rng)
        first = jax.random.randint(r1, (size, 1), 0, n_keys)
        rest = jax.random.randint(r2, (size, t - 1), n_keys, n_keys + n_fill)
        return jnp.concatenate([first, rest], 1), first[:, 0]

    def logits_fn(p, tokens):
        state = mem.update(p["mem"], mem.init(tokens.shape[0]), p["embed"][tokens])
        query = jnp.broadcast_to(p["query"], (tokens.shape[0], d))
        return mem.read(p["mem"], state, query) @ p["out"]

    def loss_fn(p, tokens, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, tokens), labels).mean()

    opt = optax.adam(3e-3)

    @jax.jit
    def train(p, rng):
        def step(carry, r):
            p, s = carry
            tokens, labels = batch(r)
            loss, g = jax.value_and_grad(loss_fn)(p, tokens, labels)
            upd, s = opt.update(g, s, p)
            return (optax.apply_updates(p, upd), s), loss
        (p, _), losses = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(rng, 300))
        return p, losses

    @jax.jit
    def accuracy(p, rng):
        tokens, labels = batch(rng, 256)
        return jnp.mean(jnp.argmax(logits_fn(p, tokens), -1) == labels)

    params, losses = train(params, init_key(1))
    acc = float(accuracy(params, init_key(2)))
    assert acc > 0.9, (acc, losses[::30])


# ----------------------------------------------------------------------------------------------------------------
# Store.


def _emb(i, dim=4):
    return np.full((dim,), float(i), np.float32)


def test_store_evicts_exactly_the_oldest_in_order():
    evicted = []
    store = EpisodicStore(capacity=3, dim=4, on_evict=evicted.extend)
    for i in range(7):
        store.add(f"t{i}", (i * 10, i * 10 + 5), _emb(i), importance=i / 10)
    assert [e.text for e in evicted] == ["t0", "t1", "t2", "t3"]
    assert [e.timestamp for e in store.entries()] == [4, 5, 6]
    made = store.add_many([dict(text=f"b{i}", token_range=(0, 1), embedding=_emb(9)) for i in range(2)])
    assert [e.timestamp for e in made] == [7, 8]
    assert [e.text for e in evicted[4:]] == ["t4", "t5"]
    assert [e.text for e in store.entries()] == ["t6", "b0", "b1"]
    assert [e.text for e in store.evict(2)] == ["t6", "b0"] and evicted[-1].text == "b0"
    e = evicted[0]
    assert e.token_range == (0, 5) and e.importance == 0.0 and e.uncertainty == 0.0 and e.source == ""
    assert not e.embedding.flags.writeable
    assert store.search(_emb(1), 1)[0][1].text == "b1"


def test_store_is_safe_under_concurrent_writers():
    evicted, n_threads, per_thread, cap = [], 8, 150, 50
    store = EpisodicStore(capacity=cap, dim=4, on_evict=evicted.extend)
    barrier = threading.Barrier(n_threads)

    def writer(w):
        barrier.wait()
        for i in range(per_thread):
            store.add(f"{w}:{i}", (i, i + 1), _emb(w), source=str(w))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = n_threads * per_thread
    kept = store.entries()
    stamps = [e.timestamp for e in evicted] + [e.timestamp for e in kept]
    assert stamps == list(range(total))  # every entry once, eviction strictly oldest first
    assert len(kept) == cap and store.clock == total
    for w in range(n_threads):  # each writer's own entries keep their order
        mine = [int(e.text.split(":")[1]) for e in evicted + kept if e.source == str(w)]
        assert mine == list(range(per_thread))


def test_store_save_load_round_trip(tmp_path):
    store = EpisodicStore(capacity=4, dim=4)
    for i in range(6):
        store.add(f"t{i}", (i, i + 2), _emb(i) + 0.5, importance=0.1 * i, uncertainty=0.3, source="chat")
    path = str(tmp_path / "episodic.npz")
    store.save(path)
    evicted = []
    loaded = EpisodicStore.load(path, on_evict=evicted.extend)
    assert loaded.entries() == store.entries() and loaded.capacity == 4 and loaded.clock == 6
    loaded.add("next", (9, 10), _emb(7))
    assert [e.text for e in evicted] == ["t2"] and loaded.entries()[-1].timestamp == 6
    with pytest.raises(FileNotFoundError, match="EpisodicStore.save"):
        EpisodicStore.load(str(tmp_path / "missing.npz"))


def test_store_rejects_bad_input():
    store = EpisodicStore(capacity=2, dim=4)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        store.add("x", (0, 1), np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        store.add("x", (0, 1), np.full(4, np.nan))
    with pytest.raises(ValueError, match="token_range"):
        store.add("x", (3, 1), np.zeros(4))
    with pytest.raises(ValueError, match="store_capacity"):
        EpisodicStore(capacity=0, dim=4)
    assert len(store) == 0 and store.clock == 0
    assert EpisodicEntry("a", (0, 1), np.ones(2), 0, 1.0) == EpisodicEntry("a", (0, 1), np.ones(2), 0, 1.0)
