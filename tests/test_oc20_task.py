"""Tests of the OC20 IS2RE task: periodic featurizer invariances, splits, baselines, metric sums,
end-to-end train / evaluate / predict on a few EMT samples, config errors, Xu & Kitchin loading."""

import csv
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segnn_jax.configs import load_config
from segnn_jax.graph import batch_graphs, pad_graph
from segnn_jax.tasks import get_task, oc20
from segnn_jax.training import ConfigError, metrics_from_sums

SHARED = Path(__file__).parents[1] / ".." / "shared" / "data"
XU_KITCHIN = SHARED / "adsorption_dft"


def _config(**data):
    config = load_config("test_oc20")
    config.data.update(data)
    return config


def _slab_system(seed=0):
    """O on a rattled 2x2x3 Cu(111) slab: a cell smaller than twice the cutoff."""
    from ase.build import add_adsorbate, fcc111

    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    atoms.pbc = True
    atoms.rattle(0.05, seed=seed)
    tags = np.where(atoms.numbers == 8, 2, 1)
    return oc20.System(atoms.positions.copy(), atoms.cell.array.copy(), np.ones(3, bool),
                       atoms.numbers.copy(), tags, -1.0, "O", "Cu", "slab")


@pytest.fixture(scope="module")
def tiny_apply():
    """A jitted ``apply(system) -> energy`` of a randomly initialised tiny model (one shape)."""
    config = _config(cutoff=4.0)
    config.model.num_layers = 2  # more than the test config: exercise the message passing
    model = oc20.make_model(config)

    def padded(system):
        graph = oc20.system_graph(system, 4.0)
        return pad_graph(batch_graphs([graph]), 32, 2048, 2)

    params, state = model.init(jax.random.PRNGKey(0), padded(_slab_system()))
    params = _perturbed(params)  # non-trivial weights
    apply = jax.jit(lambda g: model.apply(params, state, None, g, False)[0][0])
    return lambda system: float(apply(padded(system)))


def test_adsorbate_readout_sums_per_atom_energies_of_the_adsorbate(tmp_path):
    config = _config(cutoff=4.0)
    config.readout = {"atoms": "adsorbate"}
    model = oc20.make_model(config)
    system = _slab_system()
    other = _slab_system(seed=1)

    def batch(*systems):
        return pad_graph(batch_graphs([oc20.system_graph(s, 4.0) for s in systems]), 64, 4096, 3)

    params, state = model.init(jax.random.PRNGKey(0), batch(system))
    params = _perturbed(params)
    apply = jax.jit(lambda g: model.apply(params, state, None, g, False)[0])
    alone, together = apply(batch(system)), apply(batch(other, system))
    assert alone[0] != 0.0 and alone[1] == 0.0  # the padding graph gets exactly 0
    np.testing.assert_allclose(together[1], alone[0], rtol=1e-5)  # batching and padding
    rotation = _random_rotation(5)
    rotated = system._replace(positions=system.positions @ rotation.T,
                              cell=system.cell @ rotation.T)
    np.testing.assert_allclose(apply(batch(rotated))[0], alone[0], rtol=1e-4, atol=1e-6)
    bare = system._replace(tags=np.ones_like(system.tags))  # no adsorbate atom: nothing to sum
    assert float(apply(batch(bare))[0]) == 0.0
    with pytest.raises(oc20.OC20DataError, match="slab: no adsorbate atom"):
        oc20.check_adsorbate_atoms(oc20.validate_config(config), [bare])
    oc20.check_adsorbate_atoms(oc20.validate_config(_config()), [bare])  # the default needs none
    config.readout = {"atoms": "slab"}
    with pytest.raises(ConfigError, match=r"config\.readout\.atoms: expected one of"):
        oc20.make_model(config)


@jax.jit
def _perturbed(params):
    return jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)


def _random_rotation(seed):
    q, _ = np.linalg.qr(np.random.RandomState(seed).normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_featurizer_invariances(tiny_apply):
    system = _slab_system()
    energy = tiny_apply(system)
    assert energy != 0.0
    tolerance = 1e-4 * abs(energy) + 1e-7  # relative, with a float32 floor
    rotation = _random_rotation(3)
    rotated = system._replace(positions=system.positions @ rotation.T,
                              cell=system.cell @ rotation.T)
    translated = system._replace(positions=system.positions + np.array([0.7, -1.3, 2.1]))
    perm = np.random.RandomState(4).permutation(len(system.atomic_numbers))
    permuted = system._replace(positions=system.positions[perm],
                               atomic_numbers=system.atomic_numbers[perm], tags=system.tags[perm])
    wrapped_positions = system.positions.copy()
    wrapped_positions[2] += system.cell[0] - 2 * system.cell[1]
    wrapped = system._replace(positions=wrapped_positions)
    # The same lattice described by other cell vectors: a1 + a2, a2, a3.
    rebased = system._replace(cell=np.stack([system.cell[0] + system.cell[1], system.cell[1],
                                             system.cell[2]]))
    for name, variant in [("rotated", rotated), ("translated", translated),
                          ("permuted", permuted), ("wrapped", wrapped), ("rebased", rebased)]:
        assert abs(tiny_apply(variant) - energy) < tolerance, name
    # The test can fail: moving the adsorbate changes the energy.
    moved = system.positions.copy()
    moved[-1] += np.array([0.0, 0.0, 0.4])
    assert abs(tiny_apply(system._replace(positions=moved)) - energy) > 100 * tolerance


def test_periodic_graph_uses_cell_offsets():
    system = _slab_system()
    graph = oc20.system_graph(system, 4.0)
    shifts = graph.edges["shifts"]
    assert np.any(np.abs(shifts) > 0)  # a 2x2 cell at 4 A needs periodic images
    vectors = (graph.nodes["positions"][graph.senders] - graph.nodes["positions"][graph.receivers]
               + shifts)
    lengths = np.linalg.norm(vectors, axis=1)
    assert lengths.max() < 4.0 and lengths.min() > 0.5
    # An isolated atom (huge cell, no neighbours) gets no edge and the attribute (1, 0, ...).
    lone = system._replace(positions=system.positions[:1], atomic_numbers=system.atomic_numbers[:1],
                           tags=system.tags[:1], cell=np.eye(3) * 50.0)
    assert oc20.system_graph(lone, 4.0).n_edge[0] == 0


def test_random_split_disjoint_and_complete():
    parts = oc20.random_split(50, 0.2, 0.1, seed=1)
    joined = np.concatenate([parts[s] for s in oc20.SPLITS])
    assert sorted(joined.tolist()) == list(range(50))
    assert (len(parts["valid"]), len(parts["test"])) == (10, 5)
    with pytest.raises(oc20.OC20DataError):
        oc20.random_split(2, 0.4, 0.4, seed=0)


def test_group_split_holds_out_whole_groups():
    rng = np.random.RandomState(0)
    labels = [str(v) for v in rng.choice(["CO", "O", "H", "OH", "N", "C", "CH3"], size=300)]
    indices, groups = oc20.group_split(labels, 0.15, 0.15, seed=2)
    assert sorted(np.concatenate(list(indices.values())).tolist()) == list(range(300))
    seen = {split: {labels[i] for i in idx} for split, idx in indices.items()}
    for split in oc20.SPLITS:
        assert seen[split] == set(groups[split]) and seen[split]
    assert not seen["train"] & seen["valid"] and not seen["train"] & seen["test"]
    assert not seen["valid"] & seen["test"]
    # Every system of a held-out group is held out.
    for i, label in enumerate(labels):
        if label in seen["test"]:
            assert i in set(indices["test"].tolist())
    assert sum(len(indices[s]) for s in ("test",)) >= 0.15 * 300
    with pytest.raises(oc20.OC20DataError, match="at least 3"):
        oc20.group_split(["a", "b", "a"], 0.3, 0.3, seed=0)


def test_group_split_named_groups():
    labels = [g for g in ("Ag", "Al", "Au", "Cu", "Ni", "Pd", "Pt") for _ in range(10)]
    indices, groups = oc20.group_split(labels, 0.1, 0.1, seed=0, test_groups=["Pt"],
                                       valid_groups=["Au"])
    assert groups == {"test": ["Pt"], "valid": ["Au"],
                      "train": ["Ag", "Al", "Cu", "Ni", "Pd"]}
    assert {labels[i] for i in indices["test"]} == {"Pt"} and len(indices["test"]) == 10
    assert sorted(np.concatenate(list(indices.values())).tolist()) == list(range(70))
    # Naming only the test groups: validation is filled from the seeded order of the rest.
    _, only_test = oc20.group_split(labels, 0.1, 0.1, seed=3, test_groups=("Al",))
    assert only_test["test"] == ["Al"] and only_test["valid"]
    assert "Al" not in only_test["valid"] + only_test["train"]
    with pytest.raises(oc20.OC20DataError, match=r"test_groups: \['Zn'\] not in the data"):
        oc20.group_split(labels, 0.1, 0.1, seed=0, test_groups=["Zn"])
    with pytest.raises(oc20.OC20DataError, match="both name"):
        oc20.group_split(labels, 0.1, 0.1, seed=0, test_groups=["Pt"], valid_groups=["Pt", "Au"])
    with pytest.raises(oc20.OC20DataError, match="no group left for training"):
        oc20.group_split(labels[:30], 0.1, 0.1, seed=0, test_groups=["Ag"],
                         valid_groups=["Al", "Au"])


def test_split_systems_named_metals_and_config_checks():
    systems = [_slab_system()._replace(catalyst=m, adsorbate=a, name=f"{m}{a}{k}")
               for k, (m, a) in enumerate((m, a) for m in "ABCDEF" for a in ("O", "H") * 3)]
    cfg = oc20.validate_config(_config(split="ood_cat", test_groups="C", valid_groups=["E"]))
    assert cfg["data"]["test_groups"] == ("C",) and cfg["data"]["valid_groups"] == ("E",)
    splits, info = oc20.split_systems(cfg, systems)
    assert {s.catalyst for s in splits["test"]} == {"C"}
    assert {s.catalyst for s in splits["valid"]} == {"E"}
    assert info["groups"]["train"] == ["A", "B", "D", "F"]
    with pytest.raises(ConfigError, match=r"config\.data\.test_groups: names held-out groups"):
        oc20.validate_config(_config(split="id", test_groups=("C",)))
    for bad in ((), ("C", "C"), ("C", 3), 7):
        with pytest.raises(ConfigError, match=r"config\.data\.valid_groups: expected group"):
            oc20.validate_config(_config(split="ood_cat", valid_groups=bad))


def test_split_systems_by_metal():
    systems = [_slab_system()._replace(catalyst=m, adsorbate=a, name=f"{m}{a}{k}")
               for k, (m, a) in enumerate((m, a) for m in "ABCDEF" for a in ("O", "H") * 3)]
    cfg = oc20.validate_config(_config(split="ood_cat"))
    splits, info = oc20.split_systems(cfg, systems)
    metals = {split: {s.catalyst for s in items} for split, items in splits.items()}
    assert metals["train"].isdisjoint(metals["test"] | metals["valid"])
    assert metals["test"].isdisjoint(metals["valid"])
    assert set(info["groups"]["test"]) == metals["test"]


def test_ridge_exact_on_linear_data():
    rng = np.random.RandomState(0)
    x = rng.normal(size=(40, 5))
    w_true, b_true = rng.normal(size=5), 0.7
    w, b = oc20.ridge_fit(x, x @ w_true + b_true, alpha=0.0)
    np.testing.assert_allclose(w, w_true, atol=1e-10)
    assert abs(b - b_true) < 1e-10
    w_reg, _ = oc20.ridge_fit(x, x @ w_true + b_true, alpha=100.0)
    assert np.linalg.norm(w_reg) < np.linalg.norm(w_true)  # the penalty shrinks the weights


def test_composition_baseline_recovers_additive_energies():
    base = _slab_system()
    energies = {"O": -1.0, "H": 0.5, "CO": -2.0}
    systems = []
    for k in range(12):
        ads = list(energies)[k % 3]
        n_cu = 10 + k % 4
        numbers = np.array([29] * n_cu + [8])
        systems.append(base._replace(atomic_numbers=numbers, adsorbate=ads,
                                     energy=0.1 * n_cu + energies[ads]))
    model = oc20.CompositionBaseline(alpha=0.0).fit(systems)
    np.testing.assert_allclose(model.predict(systems), [s.energy for s in systems], atol=1e-10)
    means = oc20.adsorbate_mean_baseline(systems, [systems[0]._replace(adsorbate="NEW")])
    np.testing.assert_allclose(means, [np.mean([s.energy for s in systems])])


def _adsorbate_systems():
    """Cu slabs under additive adsorbate energies (H 0.5, O -1.0 eV per atom) plus a site term;
    the slab's size varies and must not matter."""
    base = _slab_system()
    systems = []
    for k, (ads, n_o, n_h) in enumerate([("OH", 1, 1), ("H2O", 1, 2), ("O2", 2, 0)] * 4):
        numbers = np.array([29] * (10 + k % 3) + [8] * n_o + [1] * n_h)
        tags = np.array([1] * (10 + k % 3) + [2] * (n_o + n_h))
        energy = -1.0 * n_o + 0.5 * n_h + 0.01 * np.sin(k)
        systems.append(base._replace(atomic_numbers=numbers, tags=tags, adsorbate=ads,
                                     energy=energy))
    return systems


def test_adsorbate_reference_and_baseline_carry_over_to_an_unseen_adsorbate():
    systems = _adsorbate_systems()
    h2 = systems[0]._replace(atomic_numbers=np.array([29] * 10 + [1, 1]),
                             tags=np.array([1] * 10 + [2, 2]), adsorbate="H2", energy=1.0)
    stats = oc20.standardise(systems, "EMT", reference="adsorbate", ridge_alpha=1e-8)
    assert stats.reference_atoms == "adsorbate"
    energy = dict(zip(stats.elements, stats.element_energies))
    assert energy[1] == pytest.approx(0.5, abs=0.02) and energy[8] == pytest.approx(-1.0, abs=0.02)
    assert energy[29] == 0.0  # slab atoms are never counted
    # Without an intercept the fit gives exactly 0 for an adsorbate of no atoms.
    x = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    w, b = oc20.ridge_fit(x, x @ [0.5, -1.0] + 0.3, 0.0, intercept=False)
    assert b == 0.0 and not np.allclose(w, [0.5, -1.0])  # the constant cannot hide in b
    assert stats.reference(h2) + stats.mean == pytest.approx(1.0, abs=0.05)
    assert oc20._standardisation(stats.to_json()) == stats
    # The baseline on adsorbate-atom counts predicts the unseen H2; the one-hot ridge cannot.
    adsorbate_ridge = oc20.AdsorbateCompositionBaseline(alpha=1e-8).fit(systems)
    assert adsorbate_ridge.predict([h2])[0] == pytest.approx(1.0, abs=0.05)
    everything = oc20.standardise(systems, "EMT", reference="composition", ridge_alpha=1e-8)
    assert everything.reference_atoms == "all"


def test_composition_reference_standardisation():
    """Per-element reference energies: fitted on training, subtracted before standardising, added
    back by the reference; an element never seen in training contributes 0."""
    base = _slab_system()
    element_energy = {29: -0.3, 8: -1.1, 1: 0.4}
    rng = np.random.RandomState(3)
    systems = []
    for k in range(30):
        numbers = np.array([29] * (8 + k % 5) + [8] * (1 + k % 2) + [1] * (k % 3))
        site_term = rng.normal(scale=0.01)  # what the network would have to learn
        energy = sum(element_energy[int(z)] for z in numbers) + 0.2 + site_term
        systems.append(base._replace(atomic_numbers=numbers, energy=energy))
    stats = oc20.standardise(systems, "EMT", reference="composition", ridge_alpha=1e-8)
    assert stats.elements == (1, 8, 29)
    np.testing.assert_allclose(stats.element_energies, [0.4, -1.1, -0.3], atol=0.02)
    z = np.array([oc20.standardised_target(s, stats) for s in systems])
    assert abs(z.mean()) < 1e-9 and abs(z.std() - 1.0) < 1e-9
    assert stats.std < 0.05  # the residual, not the spread of the totals
    restored = [stats.reference(s) + stats.mean + stats.std * t for s, t in zip(systems, z)]
    np.testing.assert_allclose(restored, [s.energy for s in systems], atol=1e-10)
    sulfur = base._replace(atomic_numbers=np.array([29, 16]))
    assert stats.reference(sulfur) == pytest.approx(stats.element_energies[2])
    plain = oc20.standardise(systems, "EMT")
    assert plain.element_energies == () and plain.reference(systems[0]) == 0.0
    assert plain.std == pytest.approx(np.std([s.energy for s in systems]))
    with pytest.raises(ValueError, match="reference must be one of"):
        oc20.standardise(systems, "EMT", reference="atomref")


def _metal_slab(system, metal_z, tags=None):
    """``system`` with every slab atom (tag != 2) turned into element ``metal_z``."""
    numbers = np.where(np.asarray(system.tags) == 2, system.atomic_numbers, metal_z)
    return system._replace(atomic_numbers=numbers,
                           tags=system.tags if tags is None else tags)


def test_surface_descriptors_describe_what_the_adsorbate_binds_to():
    table = oc20.element_descriptors().astype(np.float64)
    base = _slab_system()  # Cu slab (all tagged 1) with O
    surface_pt = base._replace(atomic_numbers=np.where(
        np.arange(len(base.tags)) < 4, 78, base.atomic_numbers))  # 4 of 12 metal atoms Pt
    np.testing.assert_allclose(oc20.surface_descriptors(surface_pt),
                               (4 * table[78] + 8 * table[29]) / 12)
    # Tagged sub-surface atoms (tag 0) do not count.
    tags = np.where(np.arange(len(base.tags)) < 4, 0, base.tags)
    np.testing.assert_allclose(oc20.surface_descriptors(surface_pt._replace(tags=tags)),
                               table[29])
    # Untagged slabs (every metal atom 0) fall back to all slab atoms; no slab gives zeros.
    untagged = _metal_slab(base, 79, tags=np.where(base.tags == 2, 2, 0))
    np.testing.assert_allclose(oc20.surface_descriptors(untagged), table[79])
    molecule = base._replace(atomic_numbers=np.array([8]), tags=np.array([2]),
                             positions=base.positions[-1:])
    assert np.all(oc20.surface_descriptors(molecule) == 0)


def _metal_adsorbate_systems(metals=(28, 29, 46, 47, 79)):
    """Energies linear in the surface metal's descriptors with a slope per adsorbate."""
    table = oc20.element_descriptors().astype(np.float64)
    slope = {"O": np.array([0.3, -0.2, 0.1]), "H": np.array([-0.1, 0.05, 0.2])}
    offset = {"O": -1.0, "H": 0.4}
    base = _slab_system()
    systems = []
    for z in metals:
        for ads in slope:
            systems.append(_metal_slab(base, z)._replace(
                adsorbate=ads, catalyst=str(z),
                energy=offset[ads] + float(slope[ads] @ table[z])))
    return systems, slope, offset


def test_adsorbate_surface_baseline_extrapolates_to_an_unseen_metal():
    systems, slope, offset = _metal_adsorbate_systems()
    model = oc20.AdsorbateSurfaceBaseline(alpha=0.0).fit(systems)
    np.testing.assert_allclose(model.predict(systems), [s.energy for s in systems], atol=1e-9)
    platinum = _metal_adsorbate_systems(metals=(78,))[0]  # a metal absent from training
    np.testing.assert_allclose(model.predict(platinum), [s.energy for s in platinum], atol=1e-9)
    # The per-adsorbate mean cannot tell Pt from the training metals.
    means = oc20.adsorbate_mean_baseline(systems, platinum)
    assert np.abs(means - [s.energy for s in platinum]).max() > 0.05
    # An adsorbate never seen in training gets the intercept alone.
    unseen = platinum[0]._replace(adsorbate="NEW")
    assert model.predict([unseen])[0] == pytest.approx(model.bias)


def test_adsorbate_surface_reference_standardisation():
    systems, _, _ = _metal_adsorbate_systems()
    rng = np.random.RandomState(0)
    systems = [s._replace(energy=s.energy + rng.normal(scale=0.01)) for s in systems]
    stats = oc20.standardise(systems, "EMT", reference="adsorbate_surface", ridge_alpha=1e-8)
    assert stats.reference_atoms == "adsorbate_surface"
    assert [a for a, _ in stats.adsorbate_weights] == ["H", "O"]
    assert stats.std < 0.02  # the residual, not the spread over metals and adsorbates
    z = np.array([oc20.standardised_target(s, stats) for s in systems])
    restored = [stats.reference(s) + stats.mean + stats.std * t for s, t in zip(systems, z)]
    np.testing.assert_allclose(restored, [s.energy for s in systems], atol=1e-10)
    platinum = _metal_adsorbate_systems(metals=(78,))[0]
    predicted = [stats.reference(s) + stats.mean for s in platinum]
    np.testing.assert_allclose(predicted, [s.energy for s in platinum], atol=0.05)
    assert stats.reference(platinum[0]._replace(adsorbate="NEW")) == 0.0
    assert oc20._standardisation(json.loads(json.dumps(stats.to_json()))) == stats
    # Every run reports the matching baseline.
    cfg = oc20.validate_config(_config(energy_reference="adsorbate_surface"))
    predictions = oc20.baseline_predictions(cfg, systems, {"test": platinum})
    assert "adsorbate_surface_ridge" in predictions


def test_element_descriptors():
    table = oc20.element_descriptors()
    assert table.shape == (oc20.MAX_Z + 1, 3) and np.all(table[0] == 0)
    # Same group (10) for Ni, Pd, Pt; Pt one period below Pd; Cu and Au in group 11.
    assert table[28, 1] == table[46, 1] == table[78, 1] != table[29, 1] == table[79, 1]
    assert table[78, 0] > table[46, 0] > table[28, 0]
    emt_elements = [1, 6, 7, 8, 13, 28, 29, 46, 47, 78, 79]  # H C N O and the EMT metals
    assert len({tuple(table[z]) for z in emt_elements}) == len(emt_elements)


def test_element_features_place_unseen_elements_by_descriptors():
    config = _config(cutoff=4.0)
    config.embedding.element_features = True
    model = oc20.make_model(config)
    cu = _slab_system()
    pt = cu._replace(atomic_numbers=np.where(cu.atomic_numbers == 29, 78, cu.atomic_numbers))

    def padded(system):
        return pad_graph(batch_graphs([oc20.system_graph(system, 4.0)]), 32, 2048, 2)

    params, state = model.init(jax.random.PRNGKey(0), padded(cu))
    assert float(jnp.abs(params["z_embedding"]["embeddings"]).max()) == 0.0  # zero start
    energy = jax.jit(lambda g: model.apply(params, state, None, g, False)[0][0])
    # With the lookup at zero the two metals still differ, through their descriptors.
    assert abs(float(energy(padded(cu))) - float(energy(padded(pt)))) > 1e-6
    bad = config.to_dict()
    bad["embedding"]["element_features"] = "yes"
    with pytest.raises(ConfigError, match=r"config\.embedding\.element_features"):
        oc20.validate_config(bad)


def test_descriptors_alone_without_the_lookup():
    config = _config(cutoff=4.0)
    config.embedding.update(element_features=True, lookup=False)
    model = oc20.make_model(config)
    cu = _slab_system()
    pt = cu._replace(atomic_numbers=np.where(cu.atomic_numbers == 29, 78, cu.atomic_numbers))
    graph = pad_graph(batch_graphs([oc20.system_graph(cu, 4.0)]), 32, 2048, 2)
    params, state = model.init(jax.random.PRNGKey(0), graph)
    assert "z_embedding" not in params and "element_features" in params
    energy = jax.jit(lambda g: model.apply(params, state, None, g, False)[0][0])
    pt_graph = pad_graph(batch_graphs([oc20.system_graph(pt, 4.0)]), 32, 2048, 2)
    assert abs(float(energy(graph)) - float(energy(pt_graph))) > 1e-6
    config.embedding.element_features = False
    with pytest.raises(ConfigError, match=r"config\.embedding\.lookup"):
        oc20.validate_config(config)


def test_energy_error_sums_exact():
    error = jnp.array([0.01, -0.019, 0.5, -0.03, 123.0])
    mask = jnp.array([True, True, True, True, False])
    sums = {k: float(v) for k, v in oc20.energy_error_sums(error, mask).items()}
    assert sums == pytest.approx({"mae_sum": 0.559, "ewt_sum": 2.0, "count": 4.0})
    metrics = metrics_from_sums(sums)
    assert metrics["mae"] == pytest.approx(0.559 / 4) and metrics["ewt"] == 0.5
    host = oc20.energy_metrics([0.01, -0.019, 0.5, -0.03], [0.0] * 4)
    assert host == pytest.approx({"mae_ev": 0.559 / 4, "ewt": 0.5, "count": 4})


def test_bad_options_fail_naming_the_option():
    with pytest.raises(ConfigError, match=r"config\.data\.spilt"):
        oc20.validate_config(_config(spilt="id"))
    with pytest.raises(ConfigError, match=r"config\.data\.split"):
        oc20.validate_config(_config(split="ood_both"))
    with pytest.raises(ConfigError, match=r"config\.data\.energy_reference"):
        oc20.validate_config(_config(energy_reference="atomref"))
    with pytest.raises(ConfigError, match=r"config\.data\.cutoff"):
        oc20.validate_config(_config(cutoff=-1.0))
    config = _config()
    config.embedding.dim = 0
    with pytest.raises(ConfigError, match=r"config\.embedding\.dim"):
        oc20.validate_config(config)
    with pytest.raises(ConfigError, match=r"config\.data\.path"):
        oc20.train(_config(), "unused")


@pytest.fixture(scope="module")
def emt_dir(tmp_path_factory):
    from segnn_jax.datasets.emt import generate_emt_dataset

    out = tmp_path_factory.mktemp("emt")
    generate_emt_dataset(out, n_samples=12, seed=0, n_workers=1, shard_size=12, progress=False)
    return out


@pytest.fixture(scope="module")
def emt_run(emt_dir, tmp_path_factory):
    """A trained tiny run with the composition reference: ``(run_dir, results)``."""
    run_dir = tmp_path_factory.mktemp("emt_run") / "run"
    results = oc20.train(_config(path=str(emt_dir), energy_reference="composition"), run_dir,
                         command="test")
    return run_dir, results


def test_train_evaluate_predict_on_emt(emt_run, tmp_path):
    assert get_task("oc20") is oc20
    # With the composition reference: evaluate and predict must add the same reference back.
    run_dir, results = emt_run
    assert results["level_of_theory"] == "EMT"
    assert len(results["standardisation"]["element_energies"]) == len(
        results["standardisation"]["elements"])
    assert results["n_train"] + results["n_valid"] + results["n_test"] == 12
    for split in ("valid", "test"):
        assert 0 <= results[split]["ewt"] <= 1 and np.isfinite(results[split]["mae_ev"])
        assert results[split]["count"] == results[f"n_{split}"]
        for baseline in ("composition_ridge", "adsorbate_composition_ridge",
                         "adsorbate_surface_ridge", "adsorbate_mean", "train_mean"):
            assert np.isfinite(results["baselines"][baseline][split]["mae_ev"])
    assert json.loads((run_dir / "results.json").read_text())["test"] == results["test"]
    evaluated = oc20.evaluate(run_dir, "test")
    assert evaluated["count"] == results["n_test"]
    assert evaluated["mae_ev"] == pytest.approx(results["test"]["mae_ev"], rel=1e-4)

    import ase.io
    from ase.build import add_adsorbate, fcc111
    from ase.data import chemical_symbols

    from segnn_jax.datasets.emt import METALS

    known = {chemical_symbols[z] for z in results["standardisation"]["elements"]}
    metal = next(m for m in METALS if m in known)
    adsorbate = next(a for a in ("O", "H", "C", "N") if a in known)
    structures = []
    for site in ("fcc", "ontop"):
        atoms = fcc111(metal, size=(3, 3, 3), vacuum=7.5)
        add_adsorbate(atoms, adsorbate, 1.5, site)
        del atoms.info["adsorbate_info"]  # not extxyz-writable
        atoms.pbc = True
        structures.append(atoms)
    path = tmp_path / "new.extxyz"
    ase.io.write(path, structures)
    out = oc20.predict(run_dir, path)
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["new.extxyz:0", "new.extxyz:1"]
    assert all(r["level_of_theory"] == "EMT" and np.isfinite(float(r["adsorption_energy_ev"]))
               for r in rows)
    assert rows[0]["adsorption_energy_ev"] != rows[1]["adsorption_energy_ev"]
    atoms = fcc111(metal, size=(2, 2, 3), vacuum=7.5)
    add_adsorbate(atoms, "S", 1.5, "fcc")  # S: no EMT sample has it
    del atoms.info["adsorbate_info"]
    ase.io.write(tmp_path / "sulfur.extxyz", atoms)
    with pytest.raises(oc20.OC20InputError, match="S"):
        oc20.predict(run_dir, tmp_path / "sulfur.extxyz")
    (tmp_path / "junk.xyz").write_text("not a structure\n")
    with pytest.raises(oc20.OC20InputError, match="junk.xyz"):
        oc20.predict(run_dir, tmp_path / "junk.xyz")


def test_ensemble_of_seeds_averages_split_predictions(emt_dir, emt_run, tmp_path, monkeypatch):
    import shutil

    first, first_results = emt_run  # composition reference; this one has none
    config = _config(path=str(emt_dir))
    config.train.seed = 1
    second_results = oc20.train(config, tmp_path / "seed1", command="test")
    runs = [first, tmp_path / "seed1"]
    ensemble = oc20.evaluate_ensemble(runs, "test")
    members, target = ensemble["member_predicted_ev"], ensemble["target_ev"]
    # Each member's host-side predictions reproduce its engine evaluation (its own reference).
    for member, results in zip(members, (first_results, second_results)):
        assert np.mean(np.abs(member - target)) == pytest.approx(results["test"]["mae_ev"],
                                                                 rel=1e-4)
    assert not np.allclose(members[0], members[1])
    np.testing.assert_allclose(ensemble["predicted_ev"], (members[0] + members[1]) / 2)
    assert ensemble["mae_ev"] == pytest.approx(np.mean(np.abs(ensemble["predicted_ev"] - target)))
    assert ensemble["count"] == len(ensemble["names"]) == first_results["n_test"]

    other = tmp_path / "other_split"  # same model, another split: not the same systems
    shutil.copytree(first, other)
    config = json.loads((other / "config.json").read_text())
    config["data"]["split_seed"] = 7
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="other_split"):
        oc20.evaluate_ensemble([first, other], "test")
    with pytest.raises(ValueError, match="at least one"):
        oc20.evaluate_ensemble([], "test")

    # A data set already loaded is used as given, not read again.
    loaded = {str(emt_dir): oc20.load_systems(emt_dir)[0]}
    monkeypatch.setattr(oc20, "load_systems", lambda path: pytest.fail(f"{path} read again"))
    again = oc20.evaluate_ensemble(runs, "test", systems=loaded)
    np.testing.assert_allclose(again["predicted_ev"], ensemble["predicted_ev"], rtol=1e-6)


def test_errors_by_group_splits_offset_from_scatter():
    target = np.array([0.0, 1.0, 2.0, 3.0, 0.5])
    predicted = target + np.array([0.1, 0.3, -0.2, -0.4, 0.0])
    groups = ["O", "O", "H", "H", "CO"]
    out = oc20.errors_by_group(predicted, target, groups)
    assert list(out) == ["CO", "H", "O"]
    assert out["O"] == pytest.approx({"count": 2, "bias_ev": 0.2, "mae_ev": 0.2,
                                      "mae_after_bias_ev": 0.1})
    assert out["H"] == pytest.approx({"count": 2, "bias_ev": -0.3, "mae_ev": 0.3,
                                      "mae_after_bias_ev": 0.1})
    assert out["CO"] == {"count": 1, "bias_ev": 0.0, "mae_ev": 0.0, "mae_after_bias_ev": 0.0}
    with pytest.raises(ValueError, match="one group per prediction"):
        oc20.errors_by_group(predicted, target, groups[:-1])


def test_group_summary_adds_up_to_the_reported_metrics(emt_run):
    """experiments/oc20/collect_emt.py --by-group: per-group figures of SEGNN and every baseline,
    weighted by the group sizes, give back the run's own validation and test MAE."""
    from experiment_scripts import load_experiment

    run_dir, results = emt_run
    summary = load_experiment("oc20/collect_emt.py").group_summary([run_dir])
    assert summary["group_by"] == "adsorbate"  # an in-distribution run groups by adsorbate
    for split in ("valid", "test"):
        by_model = summary[split]
        assert set(by_model) == {"segnn", *results["baselines"]}
        for name, groups in by_model.items():
            count = sum(g["count"] for g in groups.values())
            assert count == results[f"n_{split}"]
            mae = sum(g["mae_ev"] * g["count"] for g in groups.values()) / count
            reported = (results[split] if name == "segnn"
                        else results["baselines"][name][split])["mae_ev"]
            assert mae == pytest.approx(reported, rel=1e-4)


def test_run_baselines_reach_runs_trained_before_a_baseline_existed(emt_run, tmp_path):
    """oc20.run_baselines (collect_emt.py / leave_one_out.py --recompute-baselines): the current
    baselines, fitted again on a run's training split, agree with the ones it recorded and add
    those it lacks; a run whose recorded baseline no longer comes out the same is refused."""
    import shutil

    from experiment_scripts import load_experiment

    run_dir, results = emt_run
    recorded = results["baselines"]
    older = tmp_path / "older_run"  # a run of session 19: no adsorbate_surface_ridge recorded
    older.mkdir()
    shutil.copy(run_dir / "config.json", older)
    shutil.copy(run_dir / "oc20_standardisation.json", older)
    old_results = json.loads(json.dumps(results))  # a copy: the fixture is shared
    del old_results["baselines"]["adsorbate_surface_ridge"]
    (older / "results.json").write_text(json.dumps(old_results))
    fresh = oc20.run_baselines(older)
    assert set(fresh) == set(recorded)
    for name, by_split in recorded.items():
        for split, metrics in by_split.items():
            assert fresh[name][split]["mae_ev"] == pytest.approx(metrics["mae_ev"], rel=1e-9)
    summary = load_experiment("oc20/collect_emt.py").split_summary(older,
                                                                   recompute_baselines=True)
    assert summary["baselines_recomputed"]
    assert "adsorbate_surface_ridge" in summary["baselines_test"]
    old_results["baselines"]["composition_ridge"]["test"] = {"mae_ev": 1.0}
    (older / "results.json").write_text(json.dumps(old_results))
    with pytest.raises(ValueError, match="not the same data set"):
        oc20.run_baselines(older)
    old_results["baselines"] = {"retired_baseline": recorded["composition_ridge"]}
    (older / "results.json").write_text(json.dumps(old_results))
    with pytest.raises(ValueError, match="'retired_baseline' that the current code does not"):
        oc20.run_baselines(older)


def test_ood_split_on_emt_labels(emt_dir):
    systems, level = oc20.load_systems(emt_dir)
    assert level == "EMT" and all(s.adsorbate and s.catalyst for s in systems)
    cfg = oc20.validate_config(_config(path=str(emt_dir), split="ood_ads"))
    splits, _ = oc20.split_systems(cfg, systems)
    ads = {split: {s.adsorbate for s in items} for split, items in splits.items()}
    assert ads["train"].isdisjoint(ads["valid"] | ads["test"])


def test_xu_kitchin_samples():
    if not XU_KITCHIN.is_dir():
        pytest.skip(f"Xu & Kitchin data not found at {XU_KITCHIN}")
    systems = oc20.load_xu_kitchin(XU_KITCHIN)
    energies = json.loads((XU_KITCHIN / "xu_kitchin_2014_energies.json").read_text())
    numeric = sum(1 for m in energies.values() for a in m.values() for s in a.values()
                  for c, e in s.items() if c != "0.0" and e != "Q")
    assert len(systems) == numeric == 882
    assert all(16 < len(s.atomic_numbers) <= 20 and s.catalyst in s.name for s in systems)
    folds = oc20.kfold_indices(len(systems), 5, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(882))
    with pytest.raises(oc20.XuKitchinNotFoundError):
        oc20.load_xu_kitchin(SHARED)
