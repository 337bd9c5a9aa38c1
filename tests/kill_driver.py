"""A tiny training run (or cache build) that kills itself with SIGKILL at a chosen point.

Run by tests/test_interrupted.py in a subprocess::

    python tests/kill_driver.py train RUN_DIR OUT.npz KILL
    python tests/kill_driver.py qm9-cache SOURCE DATA_DIR KILL
    python tests/kill_driver.py nbody-cache DATA_DIR N_SYSTEMS KILL

KILL is ``none``, ``step:N`` (after the train event of step N), ``manifest:S`` (checkpoint of
step S: payload written, manifest not), ``manifest-tmp:S`` (half the manifest's temporary file
written), ``best:S`` (best.json of step S being replaced), ``prune:S`` (while deleting an old
checkpoint after saving step S, half its files gone), ``cache-write`` (the cache's temporary file
half written). SIGKILL cannot be caught: no cleanup code runs, exactly as when the machine dies.
"""

import os
import signal
import sys
from pathlib import Path

import numpy as np


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def tiny_fit(run_dir: str, kill: str):
    import haiku as hk
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(Path(__file__).parent))
    from model_fixtures import tiny_graphs

    from segnn_jax.graph import batch_graphs, graph_mask, node_graph_index, pad_graph
    from segnn_jax.training import checkpoint, fit

    def forward(graph):
        x = jnp.concatenate([graph.nodes["features"], graph.nodes["positions"]], axis=-1)
        h = hk.nets.MLP([8, 1], activation=jax.nn.silu)(x)
        return jax.ops.segment_sum(h, node_graph_index(graph), num_segments=graph.n_node.shape[0])

    model = hk.transform_with_state(forward)

    def loss_fn(params, model_state, graph, rng, is_training):
        pred, model_state = model.apply(params, model_state, rng, graph)
        mask = graph_mask(graph)
        err = pred[:, 0] - graph.globals["targets"][:, 0]
        sums = {"count": jnp.sum(mask).astype(jnp.float32)}
        return jnp.sum(jnp.where(mask, err**2, 0.0)), (sums, model_state)

    graphs = tiny_graphs(8, seed=0)
    val = [pad_graph(batch_graphs(tiny_graphs(5, seed=1)), 32, 100, 6)]

    def batches(epoch):
        order = np.random.default_rng([0, epoch]).permutation(len(graphs))
        return [pad_graph(batch_graphs([graphs[j] for j in order[i:i + 2]]), 16, 48, 3)
                for i in range(0, len(order), 2)]

    config = {"num_epochs": 3, "log_every": 1, "eval_every": 1, "progress_bar": False,
              "tensorboard": False, "checkpoint_every_steps": 3,
              "optimizer": {"optimizer": "adam", "learning_rate": 1e-2,
                            "schedule": "multistep", "decay_fractions": [0.5]}}

    what, _, arg = kill.partition(":")
    callbacks = []
    if what == "step":
        def at_step(event, record):
            if event == "train" and record["step"] == int(arg):
                die()
        callbacks.append(at_step)
    elif what in ("manifest", "manifest-tmp", "best"):
        original = checkpoint.atomic_write_text
        name = {"manifest": "segnn_manifest.json", "manifest-tmp": "segnn_manifest.json",
                "best": "best.json"}[what]

        def write(path, text):
            path = Path(path)
            if path.name == name and (what == "best" or path.parent.name == f"step_{int(arg):09d}"):
                if what == "manifest":
                    die()
                # A temporary file cut in half beside the target, then death.
                (path.parent / f".{path.name}.killed.tmp").write_text(text[: len(text) // 2])
                die()
            original(path, text)
        checkpoint.atomic_write_text = write
    elif what == "prune":
        import shutil

        rmtree = shutil.rmtree

        def partial_rmtree(path, *args, **kwargs):
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if CheckpointStep.saved == int(arg) and files:
                for f in files[: len(files) // 2]:
                    f.unlink()
                die()
            rmtree(path, *args, **kwargs)

        class CheckpointStep:
            saved = -1

        save = checkpoint.CheckpointManager.save

        def tracking_save(self, state, *, step, **kwargs):
            CheckpointStep.saved = step
            return save(self, state, step=step, **kwargs)

        checkpoint.shutil.rmtree = partial_rmtree
        checkpoint.CheckpointManager.save = tracking_save
    result = fit(model.init, loss_fn, batches, config=config, run_dir=run_dir, val_data=val,
                 callbacks=callbacks)
    return result


def save_result(result, out: str) -> None:
    import jax

    leaves = [np.asarray(x) for x in jax.tree.leaves((result.state.params,
                                                      result.state.opt_state))]
    np.savez(out, *leaves, step=np.asarray(result.state.step))


def kill_cache_writes(module) -> None:
    """Makes the next fsync of a cache's temporary file die after half of it was written."""
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".tmp"):
            os.truncate(fd, os.fstat(fd).st_size // 2)
            die()
        real_fsync(fd)

    module.os.fsync = fsync


def main(argv):
    mode = argv[1]
    if mode == "train":
        run_dir, out, kill = argv[2:5]
        save_result(tiny_fit(run_dir, kill), out)
    elif mode == "qm9-cache":
        from segnn_jax.datasets import qm9

        source, data_dir, kill = argv[2:5]
        if kill == "cache-write":
            kill_cache_writes(qm9)
        qm9.load_qm9(source, data_dir=data_dir)
    elif mode == "nbody-cache":
        sys.path.insert(0, str(Path(__file__).parent))
        from test_fuzz_cache_checkpoint import TINY, _fake_split

        from segnn_jax.datasets import nbody

        data_dir, n_systems, kill = argv[2:5]
        nbody.generate_split = _fake_split
        if kill == "cache-write":
            kill_cache_writes(nbody)
        nbody.load_nbody(TINY, "train", int(n_systems), data_dir, input_frame=0, target_frame=1,
                         progress=False)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
