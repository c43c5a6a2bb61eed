"""
Sharding an ensemble's members across processes
===============================================

Split the members of one ensemble across the processes of a
``torch.distributed`` group, train each share where it lives, gather the
predictions, and check that the result is the single-process ensemble's.

**What you will learn**

* when sharding members pays: memory (members x bytes per member against the
  device) and throughput;
* how :class:`ensembling.distributed.ShardedEnsemble` splits the members,
  initializes them exactly as the single-process ensemble does, and gathers
  predictions in member order;
* why training needs no gradient all-reduce between ranks;
* how to run it with ``torchrun`` on CPUs (gloo) and GPUs (NCCL).

**Prerequisites**: :ref:`sphx_glr_tutorials_2_in_practice_plot_04_training_an_ensemble.py`;
PyTorch 2.6 or newer with ``torch.distributed`` (any standard build). This
page starts two CPU processes itself; no GPU is needed.
"""

# %%
# Set-up
# ------
# The worker that each process runs lives in the package
# (:func:`ensembling.tutorial.digits.demo_worker`), because a new process must be
# able to import it: functions defined in a notebook or script cannot be sent.
import os

import matplotlib.pyplot as plt
import torch

import ensembling
from ensembling import Ensemble
from ensembling.distributed import shard_members
from ensembling.launcher import launch
from ensembling.tutorial import print_measured
from ensembling.tutorial.digits import demo_worker, digits_data, digits_member, train_digits

torch.manual_seed(0)
print_measured(
    f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
    f"distributed: {torch.distributed.is_available()}"
)

# %%
# When to shard
# -------------
# **Memory.** Training a member costs its parameters four times over in
# float32: the weights, their gradients and Adam's two moment estimates (plus
# activations, which ``chunk_size`` can bound). For the 784-128-128-10 MLP of
# the first tutorial:
layers = [torch.nn.Linear(784, 128), torch.nn.Linear(128, 128), torch.nn.Linear(128, 10)]
params_per_member = sum(p.numel() for layer in layers for p in layer.parameters())
bytes_per_member = 4 * 4 * params_per_member  # float32 x (weights, grads, 2 Adam moments)
print(f"parameters per member: {params_per_member:,}")
print(f"training state per member: {bytes_per_member / 2**20:.2f} MiB")
for budget_gib in (16, 80):
    print(
        f"members whose training state fits in {budget_gib} GiB: "
        f"{int(budget_gib * 2**30 // bytes_per_member):,}"
    )

# %%
# So memory forces sharding only for very large ensembles, or large members.
# **Throughput** is the more common reason: each process (each GPU) computes
# its members in parallel with the others. The cost is communication: the data
# must reach every rank, and the predictions must come back. When members are
# tiny, gathering their outputs can take longer than computing them; the live
# run below measures both.
#
# How the members are split
# -------------------------
# Members are split into contiguous blocks, balanced to within one member. The
# first ``num_members % world_size`` ranks get one extra:
for world_size in (2, 3, 4):
    print(
        f"10 members on {world_size} ranks:",
        [list(shard_members(10, world_size, r)) for r in range(world_size)],
    )

fig, ax = plt.subplots(figsize=(7, 1.8), layout="constrained")
# sphinx_gallery_thumbnail_path = "_static/thumbs/plot_09_shard_layout.png"
for row, world_size in enumerate((2, 3, 4)):
    for rank in range(world_size):
        block = shard_members(10, world_size, rank)
        ax.barh(row, len(block), left=block.start, color=f"C{rank}", edgecolor="white")
        ax.text(
            block.start + len(block) / 2,
            row,
            f"rank {rank}",
            ha="center",
            va="center",
            fontsize=8,
            color="white",
        )
ax.set_yticks(range(3), [f"{w} ranks" for w in (2, 3, 4)])
ax.set_xticks(range(11))
ax.set_xlabel("member index (each block holds members start..stop-1)")
ax.invert_yaxis()
plt.show()

# %%
# A rank builds *only* its members. To make their initial values independent of
# the split, member ``i`` is initialized from a seed derived from ``(seed, i)``
# (``Ensemble(..., seed=seed)``), so the union of the shards is exactly
# ``Ensemble(factory, num_members, seed=seed)``, member for member, for any
# number of ranks.
#
# Training needs no all-reduce
# ----------------------------
# In data-parallel training every rank holds *the same* model and gradients
# must be averaged across ranks. Here each rank holds *different* members, and
# member ``i``'s loss depends only on member ``i``'s weights: its gradient is
# complete on the rank that holds it. So each rank runs its own optimizer on
# its own members; no gradient crosses a process boundary. Only two things
# travel: the data (here every rank loads the same bundled digits, and draws
# the same minibatch indices from the same seed, then uses its members' rows)
# and the final predictions, which ``gather`` collects in member order on every
# rank with one ``all_gather``.
#
# A live run on two processes
# ---------------------------
# :func:`ensembling.launcher.launch` starts two local processes joined in a
# gloo process group (with a bounded timeout, so a failure is an error and not
# a hang). Each trains its half of an 8-member ensemble on the digits for 100
# steps and gathers the test predictions.
num_members, steps, seed = 8, 100, 0
results = launch(demo_worker, 2, num_members, steps, seed, timeout_s=120)
for rank, result in enumerate(results):
    print(
        f"rank {rank} trained members {list(result['members'])}; gathered",
        list(result["probs"].shape),
    )
assert torch.equal(results[0]["probs"], results[1]["probs"])  # every rank has the full result

# %%
# The same ensemble, trained in this process with the same seed and the same
# minibatches, must give the same predictions. The two computations differ
# only in how many members share a batched matrix product, so they agree to
# float32 rounding:
single = train_digits(
    Ensemble(digits_member, num_members, seed=seed), num_members, steps, seed=seed
).eval()
_, _, X_test, y_test = digits_data()
with torch.no_grad():
    single_probs = single(X_test).softmax(dim=-1)
torch.testing.assert_close(
    results[0]["probs"], single_probs, **ensembling.tolerances(torch.float32, "cpu")
)
print("2-process predictions match the single-process Ensemble (asserted above)")
accuracy = (results[0]["probs"].mean(0).argmax(-1) == y_test).float().mean().item()
print_measured(f"ensemble test accuracy {100 * accuracy:.1f}%")

# %%
# Where the time went on each rank (measured in the worker):
for rank, result in enumerate(results):
    s = result["seconds"]
    print_measured(
        f"rank {rank}: training {s['train']:.2f} s, "
        f"forward on the test set {1e3 * s['forward']:.2f} ms, gather {1e3 * s['gather']:.2f} ms"
    )
ratio = max(r["seconds"]["gather"] / r["seconds"]["forward"] for r in results)
verdict = "more" if ratio > 1 else "less"
print_measured(
    f"for these small members the gather took {ratio:.1f}x the forward time: "
    f"{verdict} than the compute"
)

# %%
# Small members on two CPU processes are the worst case for sharding: little
# compute to split, and a gather whose cost does not shrink with the members.
# ``python -m ensembling.bench --sections distributed`` measures 1 against 2
# processes for large and for tiny members side by side.
#
# Running it yourself
# -------------------
# The same module is a ``torchrun`` entry point. On CPUs (gloo)::
#
#     torchrun --nproc-per-node 2 -m ensembling.tutorial.digits --members 16 --steps 300
#
# On a machine with 4 GPUs (NCCL, one GPU per process)::
#
#     torchrun --nproc-per-node 4 -m ensembling.tutorial.digits --members 64 --checkpoint ckpt/
#
# ``--checkpoint`` writes a :mod:`torch.distributed.checkpoint` directory with
# one entry per member. :meth:`~ensembling.distributed.ShardedEnsemble.load`
# reads it into any number of ranks, and
# :func:`~ensembling.distributed.load_ensemble` into a single-process
# ``Ensemble``.
#
# Summary
# -------
# * Shard members when the training state of all members does not fit one
#   device, or to compute members in parallel; measure whether the gather
#   costs more than it saves.
# * Each rank holds a contiguous, balanced block of members, seeded per member,
#   so the shards together are exactly the single-process ensemble.
# * Members never share gradients: one optimizer per rank, no all-reduce.
# * ``gather`` / ``predict`` return all members' outputs in member order on
#   every rank; checkpoints reshard freely.
#
# Next steps
# ----------
# The :ref:`API reference <api>` documents :mod:`ensembling.distributed`.
