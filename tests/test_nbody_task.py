"""The N-body task (segnn_jax.tasks.nbody, segnn_jax.tasks.models): featurizer, equivariance from
raw simulation input, loss, a few training steps, overfitting, config validation."""

import e3nn_jax as e3nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from segnn_jax.batching import GraphLoader
from segnn_jax.configs import load_config
from segnn_jax.datasets import nbody as nbody_data
from segnn_jax.graph import batch_graphs, pad_graph
from segnn_jax.tasks import models, nbody
from segnn_jax.training import ConfigError, init_train_state, make_train_step


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = load_config("test_nbody")
    config.data.data_dir = str(tmp_path_factory.mktemp("nbody_data"))
    return config


@pytest.fixture(scope="module")
def splits(config):
    return nbody.load_splits(config, progress=False)


@pytest.fixture(scope="module")
def initial(config, splits):
    """Parameters and state of the tiny model, initialised once (independent of the centring)."""
    model = nbody.make_model(config)
    return jax.jit(model.init)(jax.random.PRNGKey(1), _batch(splits["test"]))


def _batch(data):
    """All systems of ``data`` in one padded batch (3 padding nodes, 8 padding edges)."""
    graph = batch_graphs(nbody_data.nbody_graphs(data))
    n_node, n_edge = int(graph.n_node.sum()), int(graph.n_edge.sum())
    return pad_graph(graph, n_node + 3, n_edge + 8, len(graph.n_node) + 1)


def _transformed(data, rotation, translation, permutation):
    """The systems rotated/reflected (x -> x R^T + t, v -> v R^T) with their bodies permuted."""
    return data._replace(
        positions=(data.positions @ rotation.T + translation)[:, permutation].astype(np.float32),
        velocities=(data.velocities @ rotation.T)[:, permutation].astype(np.float32),
        charges=data.charges[:, permutation],
        targets=(data.targets @ rotation.T + translation)[:, permutation].astype(np.float32))


def _random_orthogonal(key):
    rotation = np.asarray(e3nn.rand_matrix(key, ()), np.float64)
    return rotation @ np.diag([1.0, 1.0, -1.0])  # det -1: a rotation composed with a reflection


def test_featurize_layout_and_values(splits):
    data = splits["train"]
    batch = _batch(data)
    st = jax.jit(lambda g: nbody.featurize(g, lmax_attr=1))(batch)
    n = data.positions.size // 3
    assert st.node_features.irreps == e3nn.Irreps("2x1o+1x0e")
    positions = data.positions.reshape(-1, 3)
    centred = (data.positions - data.positions.mean(axis=1, keepdims=True)).reshape(-1, 3)
    velocities = data.velocities.reshape(-1, 3)
    features = np.asarray(st.node_features.array)[:n]
    np.testing.assert_allclose(features[:, 0:3], centred, atol=1e-5)
    np.testing.assert_allclose(features[:, 3:6], velocities, atol=1e-6)
    np.testing.assert_allclose(features[:, 6], np.linalg.norm(velocities, axis=1), rtol=1e-5)
    # Extra message features [|x_j - x_i|, q_i q_j] on the real edges.
    s, r = batch.senders[:20], batch.receivers[:20]
    extra = np.asarray(st.additional_message_features.array)[:20]
    np.testing.assert_allclose(extra[:, 0], np.linalg.norm(positions[s] - positions[r], axis=1),
                               rtol=1e-5)
    charges = data.charges.reshape(-1)
    np.testing.assert_array_equal(extra[:, 1], charges[s] * charges[r])
    assert st.node_attributes.irreps == st.edge_attributes.irreps == e3nn.Irreps("0e+1o")
    np.testing.assert_array_equal(np.asarray(st.node_attributes.array)[:, 0], 1.0)
    assert np.all(np.isfinite(np.asarray(st.node_features.array)))  # padding rows too


def test_centroid_features_are_translation_invariant_reference_centring_is_not(splits):
    data = splits["train"]
    shifted = data._replace(positions=data.positions + np.float32([3.0, -1.0, 2.0]))
    for centering, invariant in (("centroid", True), ("reference_per_particle", False)):
        def features(g, centering=centering):
            return nbody.featurize(g, lmax_attr=1, centering=centering).node_features

        before = jax.jit(features)(_batch(data)).array
        after = jax.jit(features)(_batch(shifted)).array
        assert np.allclose(before, after, atol=1e-5) == invariant, centering


def _predictor(model, params, state):
    """``data -> [S, N, 3]`` predicted positions; one compilation for all data of one size."""
    apply = jax.jit(lambda g: model.apply(params, state, None, g)[0])

    def predict(data):
        out = apply(_batch(data))
        return np.asarray(out)[:data.positions.size // 3].reshape(data.positions.shape)

    return predict


@pytest.mark.parametrize("centering, predict_from, velocity_frame", [
    ("centroid", "input_position", "lab"), ("reference_per_particle", "input_position", "lab"),
    ("centroid", "constant_velocity", "lab"), ("centroid", "input_position", "centre_of_mass")])
def test_equivariance_end_to_end_from_raw_simulation_input(config, splits, initial, keys,
                                                           centering, predict_from,
                                                           velocity_frame):
    """Rotate+reflect+translate positions and velocities and permute the bodies of raw simulated
    systems: the predicted positions transform the same way, unless the reference's centring is
    used (which the project keeps only for comparison)."""
    cfg = nbody.validate_config(config)
    cfg["data"].update(centering=centering, predict_from=predict_from,
                       velocity_frame=velocity_frame)
    model = nbody.make_model(cfg)
    data = splits["test"]
    params, state = initial
    rotation = _random_orthogonal(next(keys))
    translation = np.array([2.5, -1.0, 4.0])
    permutation = np.array([3, 0, 4, 1, 2])
    predict = _predictor(model, params, state)
    predicted = predict(data)
    moved = predict(_transformed(data, rotation, translation, permutation))
    expected = (predicted @ rotation.T + translation)[:, permutation]
    relative = np.max(np.abs(moved - expected)) / np.max(np.abs(expected))
    # The displacement (output minus input position) is what the network computes; compare it on
    # its own scale too, so a small untrained output cannot hide an error.
    displacement = expected - _transformed(data, rotation, translation, permutation).positions
    relative_displacement = np.max(np.abs(moved - expected)) / np.max(np.abs(displacement))
    if centering == "centroid":
        assert relative < 1e-4 and relative_displacement < 1e-3, (relative, relative_displacement)
    else:
        assert relative_displacement > 0.05, "the reference's centring should break equivariance"


def _dense_forces(positions, strength, law):
    """``[N, 3]`` forces of one system by the double loop, ``law(d, r2) -> scale of d``."""
    out = np.zeros_like(positions, dtype=np.float64)
    for i in range(len(positions)):
        for j in range(len(positions)):
            if i != j:
                d = positions[j].astype(np.float64) - positions[i]
                out[i] += strength[i] * strength[j] * law(d, d @ d) * d
    return out


def test_input_forces_follow_the_simulators_force_laws(splits):
    data = splits["test"]
    n = data.positions.size // 3
    forces = np.asarray(nbody.input_forces(_batch(data), "charged"))
    expected = np.concatenate([_dense_forces(x, q, lambda d, r2: -r2 ** -1.5)
                               for x, q in zip(data.positions, data.charges)])
    np.testing.assert_allclose(forces[:n], expected, rtol=1e-4, atol=1e-5)
    assert np.all(forces[n:] == 0)  # padding nodes receive only padding edges
    # Gravity with the simulator's softening, on k = 4 of 5 bodies (every other body).
    masses = np.random.RandomState(0).uniform(0.5, 2.0, data.charges.shape).astype(np.float32)
    heavy = data._replace(charges=None, masses=masses, name="gravity")
    graph = batch_graphs(nbody_data.nbody_graphs(heavy, k=4))
    forces = np.asarray(nbody.input_forces(graph, "gravity"))
    eps2 = nbody_data.GRAVITY.softening ** 2
    expected = np.concatenate([_dense_forces(x, m, lambda d, r2: (r2 + eps2) ** -1.5)
                               for x, m in zip(heavy.positions, masses)])
    np.testing.assert_allclose(forces, expected, rtol=1e-4, atol=1e-5)
    # Coincident bodies (and padding edges between padding nodes) give finite values.
    stacked = data._replace(positions=np.zeros_like(data.positions))
    assert np.all(np.isfinite(np.asarray(nbody.input_forces(_batch(stacked), "charged"))))


def test_force_input_is_equivariant_end_to_end(config, splits, keys):
    """With ``data.force_input`` the inputs carry the squashed force (1o) and its size (0e) and
    the attributes its harmonics; the prediction stays E(3)-equivariant from raw input."""
    cfg = nbody.validate_config(config)
    cfg["data"].update(force_input=True, predict_from="constant_velocity")
    data = splits["test"]
    batch = _batch(data)
    forces = nbody.input_forces(batch, "charged")
    st = nbody.featurize(batch, lmax_attr=1, forces=forces)
    assert st.node_features.irreps == e3nn.Irreps("3x1o+2x0e")
    n = data.positions.size // 3
    size = np.linalg.norm(np.asarray(forces)[:n], axis=1)
    np.testing.assert_allclose(np.asarray(st.node_features.filter("0e").array)[:n, 1],
                               np.log1p(size), rtol=1e-5)
    for block in (st.node_features, st.node_attributes):  # padding rows (zero force) too
        assert np.all(np.isfinite(np.asarray(block.array)))
    model = nbody.make_model(cfg)
    params, state = jax.jit(model.init)(jax.random.PRNGKey(2), batch)
    params = jax.tree.map(lambda w: w * 3.0, params)  # a non-trivial output
    predict = _predictor(model, params, state)
    rotation = _random_orthogonal(next(keys))
    translation = np.array([-1.5, 2.0, 0.5])
    permutation = np.array([2, 4, 0, 1, 3])
    moved_data = _transformed(data, rotation, translation, permutation)
    expected = (predict(data) @ rotation.T + translation)[:, permutation]
    moved = predict(moved_data)
    guess = moved_data.positions + moved_data.velocities  # the constant-velocity origin
    relative = np.max(np.abs(moved - expected)) / np.max(np.abs(expected - guess))
    assert relative < 1e-3, relative


def test_centre_of_mass_frame_features_are_boost_invariant(splits):
    data = splits["train"]
    st = jax.jit(lambda g: nbody.featurize(g, lmax_attr=1, velocity_frame="centre_of_mass"))(
        _batch(data))
    n = data.positions.size // 3
    relative = (data.velocities - data.velocities.mean(axis=1, keepdims=True)).reshape(-1, 3)
    features = np.asarray(st.node_features.array)[:n]
    np.testing.assert_allclose(features[:, 3:6], relative, atol=1e-6)
    np.testing.assert_allclose(features[:, 6], np.linalg.norm(relative, axis=1), rtol=1e-5,
                               atol=1e-6)
    assert np.all(np.isfinite(np.asarray(st.node_attributes.array)))  # padding rows too
    with pytest.raises(ValueError, match="velocity_frame"):
        nbody.featurize(_batch(data), lmax_attr=1, velocity_frame="galilean")


@pytest.mark.parametrize("predict_from", ["input_position", "constant_velocity"])
def test_galilean_boost_moves_the_prediction_by_the_drift_in_the_centre_of_mass_frame(
        config, splits, initial, predict_from):
    """Boosting every velocity by u moves the true target by h u (the forces depend on relative
    positions only). In the centre-of-mass frame the model does the same exactly; in the lab frame
    (the reference) it does not."""
    data = splits["test"]
    boost = np.float32([0.4, -0.3, 0.2])
    boosted = data._replace(velocities=data.velocities + boost)
    params, state = initial
    h = nbody.horizon(config)
    for frame, exact in (("centre_of_mass", True), ("lab", False)):
        cfg = nbody.validate_config(config)
        cfg["data"].update(velocity_frame=frame, predict_from=predict_from)
        predict = _predictor(nbody.make_model(cfg), params, state)
        predicted, moved = predict(data), predict(boosted)
        error = np.max(np.abs(moved - (predicted + h * boost)))
        scale = np.max(np.abs(predicted - data.positions))  # the size of the predicted motion
        assert (error < 1e-4 * scale) == exact, (frame, error, scale)
    with pytest.raises(ConfigError, match=r"config\.data\.velocity_frame"):
        cfg = nbody.validate_config(config)
        cfg["data"]["velocity_frame"] = "boosted"
        nbody.validate_config(cfg)


def test_loss_is_the_mse_over_all_elements_and_ignores_padding(config, splits, initial):
    """With zero output weights the model predicts the input position, so the loss must equal the
    input-position baseline of the data layer, whatever the padding."""
    model = nbody.make_model(config)
    loss_fn = jax.jit(nbody.make_loss_fn(model), static_argnums=4)
    data = splits["valid"]
    params, state = initial
    params = jax.tree.map(jnp.zeros_like, params)
    expected = nbody_data.trivial_baselines(data)["input_position"]
    clean = _batch(data)
    n_real = data.positions.size // 3
    # Same shapes, but garbage in the padding rows: must not change anything.
    garbage = clean._replace(nodes={k: v.copy() for k, v in clean.nodes.items()})
    for key in ("positions", "velocities", "targets"):
        garbage.nodes[key][n_real:] = 1e3
    for batch in (clean, garbage):
        loss_sum, (sums, _) = loss_fn(params, state, batch, None, False)
        assert float(sums["count"]) == data.positions.size
        np.testing.assert_allclose(float(loss_sum) / float(sums["count"]), expected, rtol=1e-5)


def test_predict_from_constant_velocity_starts_from_that_baseline(config, splits, initial):
    """With zero output weights the model predicts its origin: x + horizon v with
    predict_from="constant_velocity", so the loss equals the constant-velocity baseline."""
    cfg = nbody.validate_config(config)
    cfg["data"]["predict_from"] = "constant_velocity"
    model = nbody.make_model(cfg)
    data = splits["valid"]
    params, state = initial
    params = jax.tree.map(jnp.zeros_like, params)
    loss_sum, (sums, _) = jax.jit(nbody.make_loss_fn(model), static_argnums=4)(
        params, state, _batch(data), None, False)
    expected = nbody_data.trivial_baselines(data)["constant_velocity"]
    assert not np.isclose(expected, nbody_data.trivial_baselines(data)["input_position"])
    np.testing.assert_allclose(float(loss_sum) / float(sums["count"]), expected, rtol=1e-5)


def test_horizon_is_the_time_between_input_and_target_frames(config):
    cfg = nbody.validate_config(config)
    assert nbody.horizon(cfg) == pytest.approx(1.0)  # frames 30 -> 40: 1000 steps of 0.001
    cfg["data"]["target_frame"] = 35
    assert nbody.horizon(cfg) == pytest.approx(0.5)
    cfg["data"].update(dataset="gravity", target_frame=40)
    assert nbody.horizon(cfg) == pytest.approx(1.0)


def test_train_input_frames_add_samples_from_the_same_training_systems(config, splits):
    cfg = nbody.validate_config(config)
    cfg["data"]["train_input_frames"] = (28, 30)
    loaded = nbody.load_splits(cfg, progress=False)
    train, n = loaded["train"], len(splits["train"].positions)
    assert len(train.positions) == 2 * n
    frame_28 = nbody_data.load_nbody("charged", "train", n, cfg["data"]["data_dir"],
                                     input_frame=28, target_frame=38, progress=False)
    for field in ("positions", "velocities", "targets", "charges"):
        np.testing.assert_array_equal(getattr(train, field)[:n], getattr(frame_28, field))
        np.testing.assert_array_equal(getattr(train, field)[n:], getattr(splits["train"], field))
    for split in ("valid", "test"):  # evaluation keeps input_frame -> target_frame
        np.testing.assert_array_equal(loaded[split].positions, splits[split].positions)
        np.testing.assert_array_equal(loaded[split].targets, splits[split].targets)


def test_concatenate_refuses_different_horizons(config):
    data_dir = nbody.validate_config(config)["data"]["data_dir"]
    parts = [nbody_data.load_nbody("charged", "valid", 2, data_dir, input_frame=30,
                                   target_frame=target, progress=False) for target in (40, 35)]
    with pytest.raises(nbody_data.NBodyError, match="horizon"):
        nbody_data.concatenate(parts)


@pytest.fixture(scope="module")
def trainer(config, splits):
    """A jitted train step of the tiny model (learning rate 3e-3) and the batch of 8 systems."""
    cfg = nbody.validate_config(config)
    cfg["model"]["hidden_features"] = 16
    model = nbody.make_model(cfg)
    data = nbody_data.NBodyData(*[x[:8] if isinstance(x, np.ndarray) else x
                                  for x in splits["train"]])
    batch = jax.device_put(_batch(data))
    optimizer = optax.adam(3e-3)
    state = init_train_state(jax.jit(model.init), optimizer, jax.random.PRNGKey(0), batch)
    step = make_train_step(nbody.make_loss_fn(model), optimizer, donate=False)
    return step, state, batch, data


def test_a_few_training_steps_reduce_the_loss(trainer):
    step, state, batch, _ = trainer
    losses = []
    for _ in range(5):
        state, sums = step(state, batch)
        losses.append(float(sums["loss_sum"]) / float(sums["count"]))
    assert losses[-1] < losses[0]


def test_overfitting_8_systems_goes_far_below_the_constant_velocity_baseline(trainer):
    step, state, batch, data = trainer
    baseline = nbody_data.trivial_baselines(data)["constant_velocity"]
    for _ in range(400):
        state, sums = step(state, batch)
    mse = float(sums["loss_sum"]) / float(sums["count"])
    assert mse < 0.2 * baseline, (mse, baseline)


def test_loaders_cover_every_system_once_with_a_bounded_number_of_shapes(config, splits):
    loaders = nbody.make_loaders(config, splits)
    assert isinstance(loaders["train"], GraphLoader) and loaders["train"].shuffle
    for split, loader in loaders.items():
        seen = sum(int(np.sum(b.globals["graph_mask"])) for b in loader.epoch_batches(0))
        assert seen == len(splits[split].positions)
        assert len(loader.buckets) <= 5


@pytest.mark.parametrize("section, key, value, message", [
    ("batch", "batch_size", -1, "config.batch.batch_size"),
    ("batch", "max_nodes", 0, "config.batch.max_nodes"),
    ("data", "n_train", 20_000, "config.data.n_train"),
    ("data", "centering", "per_particle", "config.data.centering"),
    ("data", "target_frame", 20, "config.data.target_frame"),
    ("data", "predict_from", "velocity", "config.data.predict_from"),
    ("data", "force_input", "yes", "config.data.force_input"),
    ("data", "train_input_frames", [30, 39], "config.data.train_input_frames"),
    ("data", "train_input_frames", [], "config.data.train_input_frames"),
    ("data", "train_input_frames", [28, 28], "config.data.train_input_frames"),
    ("data", "train_input_frames", "30", "config.data.train_input_frames"),
    ("model", "name", "egnn", "config.model.name"),
    ("model", "hidden_irreps", "not irreps", "config.model.hidden_irreps"),
    ("train", "num_epochs", 0, "config.train.num_epochs"),
])
def test_invalid_options_are_named(config, section, key, value, message):
    cfg = nbody.validate_config(config)
    cfg[section][key] = value
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        nbody.validate_config(cfg)


def test_budget_smaller_than_a_graph_is_rejected(config, splits):
    cfg = nbody.validate_config(config)
    cfg["batch"]["max_edges"] = 10
    with pytest.raises(ConfigError, match=r"config\.batch\.max_edges"):
        nbody.make_loaders(cfg, splits)


def test_create_model_builds_each_model_and_weight_balanced_irreps():
    assert models.hidden_irreps({"hidden_features": 64}) == e3nn.Irreps("32x0e+32x1o")
    explicit = "4x0e+2x1o+1x2e"
    assert models.hidden_irreps({"hidden_irreps": explicit}) == e3nn.Irreps(explicit)
    names = {}
    for name in models.MODEL_NAMES:
        factory = models.create_model({"name": name, "num_layers": 1}, output_irreps="1x1o")
        module = hk.transform(factory).apply({}, None)
        names[name] = (type(module).__name__, getattr(module, "nonlinear", None))
    assert names == {"segnn": ("SEGNN", None), "seconv_linear": ("SEConv", False),
                     "seconv_nonlinear": ("SEConv", True)}
    with pytest.raises(ConfigError, match=r"config\.model\.num_layer"):
        models.create_model({"num_layer": 2}, output_irreps="1x1o")


def test_row_tile_option_is_validated():
    for value, expected in (("none", None), (None, None), ("128", 128), (64, 64)):
        assert models.validate_model_config({"row_tile": value})["row_tile"] == expected
    assert models.validate_model_config({})["row_tile"] is None
    module = hk.transform(models.create_model({"row_tile": 32}, output_irreps="1x1o")).apply({}, None)
    assert module.row_tile == 32
    for bad in (0, -3, True, "auto", 2.5):
        with pytest.raises(ConfigError, match=r"config\.model\.row_tile"):
            models.validate_model_config({"row_tile": bad})
