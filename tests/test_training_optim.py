"""Optimisers and schedules of segnn_jax.training.optim against hand-computed values."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segnn_jax.training import make_optimizer, make_schedule


def _adam_reference(p, grads, lr, wd, b1=0.9, b2=0.999, eps=1e-8, l2=True):
    """PyTorch's Adam(weight_decay) (l2=True) or AdamW (l2=False), written out step by step."""
    m = v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g + wd * p if l2 else g
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        if not l2:
            p = p - lr * wd * p
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_weight_decay_matches_hand_computed_update(name):
    p0 = np.array([1.0, -2.0, 0.5], np.float64)
    grads = [np.array([0.1, 0.2, -0.3]), np.array([-0.2, 0.05, 0.4]), np.array([0.3, -0.1, 0.0])]
    lr, wd = 0.01, 0.5  # a large decay, so that L2 and decoupled decay differ clearly
    opt, _ = make_optimizer({"optimizer": name, "learning_rate": lr, "weight_decay": wd},
                            total_steps=10)
    p = jnp.asarray(p0, jnp.float32)
    state = opt.init(p)
    for g in grads:
        updates, state = opt.update(jnp.asarray(g, jnp.float32), state, p)
        p = optax.apply_updates(p, updates)
    expected = _adam_reference(p0, grads, lr, wd, l2=(name == "adam"))
    other = _adam_reference(p0, grads, lr, wd, l2=(name != "adam"))
    np.testing.assert_allclose(np.asarray(p), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(expected, other, rtol=1e-4)


def test_multistep_fractions_at_boundaries():
    s = make_schedule({"schedule": "multistep", "learning_rate": 5e-4,
                       "decay_fractions": (0.8, 0.9)}, total_steps=1000)
    values = {i: float(s(i)) for i in (0, 799, 800, 899, 900, 999)}
    np.testing.assert_allclose(
        [values[i] for i in sorted(values)], [5e-4, 5e-4, 5e-5, 5e-5, 5e-6, 5e-6], rtol=1e-5)


def test_multistep_epochs_with_warmup():
    # OC20 recipe: warm-up one epoch, x0.1 at epochs 10, 14, 18 (here 7 steps per epoch).
    s = make_schedule({"schedule": "multistep", "learning_rate": 1e-4, "decay_epochs": (10, 14, 18),
                       "warmup_epochs": 1}, total_steps=140, steps_per_epoch=7)
    np.testing.assert_allclose([float(s(i)) for i in (0, 6, 7, 69, 70, 97, 98, 126)],
                               [1e-4 / 7, 1e-4, 1e-4, 1e-4, 1e-5, 1e-5, 1e-6, 1e-7], rtol=1e-5)


def test_cosine_with_warmup():
    s = make_schedule({"schedule": "cosine", "learning_rate": 1.0, "min_learning_rate": 0.1,
                       "warmup_steps": 10}, total_steps=110)
    np.testing.assert_allclose([float(s(i)) for i in (0, 9, 10, 60, 110, 200)],
                               [0.1, 1.0, 1.0, 0.55, 0.1, 0.1], rtol=1e-5)


def test_gradient_clipping_by_global_norm():
    opt, _ = make_optimizer({"optimizer": "adam", "learning_rate": 1.0, "grad_clip_norm": 1.0},
                            total_steps=1)
    # Adam's first step is lr * sign(g) whatever the scale, so look at the clipped gradient itself.
    clip = optax.clip_by_global_norm(1.0)
    g = {"a": jnp.array([3.0, 4.0])}
    clipped, _ = clip.update(g, clip.init(g))
    np.testing.assert_allclose(clipped["a"], [0.6, 0.8], rtol=1e-6)
    state = opt.init(g)
    updates, _ = opt.update(g, state, g)
    np.testing.assert_allclose(updates["a"], [-1.0, -1.0], rtol=1e-4)


def test_unknown_names_rejected():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        make_optimizer({"optimizer": "sgd"}, total_steps=1)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule({"schedule": "poly"}, total_steps=1)
    with pytest.raises(ValueError, match="not both"):
        make_schedule({"schedule": "multistep", "decay_fractions": (0.5,), "decay_epochs": (1,)},
                      total_steps=10, steps_per_epoch=2)
