"""
Ensembles of Hugging Face models
================================

Eight BERT classifiers and eight GPT-2 language models from Hugging Face
``transformers``, each stacked into one :class:`ensembling.Ensemble`: the
classifiers checked against the loop over their members, the language models
decoding token by token with their caches, and their initialization compared
with separate ``factory()`` calls.

**What you will learn**

* how to ensemble a ``transformers`` model, with shared or per-member token
  ids and attention masks;
* how to decode greedily with an ensemble, feeding its returned cache back
  into the next call, and check it against each member decoding alone;
* why the members of ``Ensemble(factory, n)`` are drawn like ``n`` separate
  ``factory()`` calls, Hugging Face's own initialization included.

**Prerequisites**: :ref:`sphx_glr_tutorials_2_in_practice_plot_08_real_architectures.py`;
PyTorch 2.6 or newer and ``transformers`` 5.0 or newer
(``pip install "ensembling[tutorials,huggingface]"`` installs it; this page's
notebook does that in its first cell where it is missing). A GPU is optional.
No weights are downloaded: every model is built from a tiny configuration with
random initialization.
"""

# %%
# Eight BERT classifiers
# ----------------------
# A configuration written in code (hidden size 32, 2 layers, 2 heads, a
# vocabulary of 100 tokens) makes a model small enough to run in seconds on a
# CPU. The factory builds one classifier with three labels; ``Ensemble`` calls
# it to draw eight members. Token ids inside the vocabulary for ``bos`` and
# ``eos`` keep ``transformers`` from warning about the configuration.
import warnings

# tqdm, which transformers imports, warns in a Jupyter kernel without ipywidgets
warnings.filterwarnings("ignore", message="IProgress not found")

import matplotlib.pyplot as plt
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import ensembling
from ensembling import Ensemble
from ensembling.tutorial import print_measured

torch.manual_seed(0)
device = ensembling.default_device()
print_measured(f"running on {device}")
MEMBERS, BATCH, SEQ, VOCAB = 8, 4, 12, 100
TOKENS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)  # inside the vocabulary

bert_config = BertConfig(
    **TOKENS,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    num_labels=3,
)


def make_classifier() -> BertForSequenceClassification:
    return BertForSequenceClassification(bert_config)


classifiers = Ensemble(make_classifier, MEMBERS, device=device).eval()
ids = torch.randint(3, VOCAB, (BATCH, SEQ), device=device)  # [BATCH, SEQ], shared
with torch.no_grad():
    out = classifiers(ids)
print(type(out).__name__, "logits:", tuple(out.logits.shape))  # [MEMBERS, BATCH, 3]

# %%
# The output is the model's own ``SequenceClassifierOutput``, with a leading
# member dimension on every tensor. The check: the loop over the members,
# which ``unstack()`` returns as ordinary ``BertForSequenceClassification``
# modules.
members = classifiers.unstack()
with torch.no_grad():
    loop = torch.stack([m(ids).logits for m in members])
torch.testing.assert_close(out.logits, loop)
print(type(members[0]).__name__, "x", len(members), "- the ensemble equals the loop")

# %%
# A batch per member
# ------------------
# ``in_dims=0`` splits an input along its first dimension: member ``i`` reads
# ``per_member[i]``, as in bagging, where each member sees its own data.
per_member = torch.randint(3, VOCAB, (MEMBERS, BATCH, SEQ), device=device)
with torch.no_grad():
    got = classifiers(per_member, in_dims=0).logits
    loop = torch.stack([m(per_member[i]).logits for i, m in enumerate(members)])
torch.testing.assert_close(got, loop)
print("per-member token ids: the ensemble equals the loop")

# %%
# Attention masks
# ---------------
# Keyword inputs are shared unless ``in_dims`` names them, so one padding mask
# for the batch works as it does for a single model. A dict in ``in_dims``
# addresses an input by name: ``{"attention_mask": 0}`` would give member ``i``
# ``masks[i]``. BERT refuses that: ``transformers`` reads the mask's values in
# Python to decide whether it may skip it, and inside one vectorized call those
# values differ per member. ``Ensemble`` says so, naming the input.
shared_mask = torch.ones(BATCH, SEQ, dtype=torch.long, device=device)
shared_mask[:, SEQ - 4 :] = 0  # the last four positions are padding
with torch.no_grad():
    got = classifiers(ids, attention_mask=shared_mask).logits
    loop = torch.stack([m(ids, attention_mask=shared_mask).logits for m in members])
torch.testing.assert_close(got, loop)

masks = torch.ones(MEMBERS, BATCH, SEQ, dtype=torch.long, device=device)
for i in range(MEMBERS):
    masks[i, :, SEQ - i :] = 0  # member i pads the last i positions
try:
    with torch.no_grad():
        classifiers(ids, attention_mask=masks, in_dims={"attention_mask": 0})
    refused = None
except ensembling.EnsembleError as err:
    refused = str(err)
assert refused is not None and "attention_mask" in refused
print(refused[: refused.index(". ", 200) + 1])

# %%
# Eight GPT-2 models decoding together
# ------------------------------------
# A causal language model returns a cache of keys and values with its logits
# (``use_cache=True``). The ensemble returns that cache too, one per member
# along the member dimension; fed back as it is, it is split per member again.
# Greedy decoding then reads each member's next token from its own logits:
# ``[MEMBERS, BATCH]`` tokens, one column of the answer per step. The
# configuration asks for ``"eager"`` attention, for the masks further down.
gpt2_config = GPT2Config(
    **TOKENS, n_embd=32, n_layer=2, n_head=2, n_positions=64, attn_implementation="eager"
)


def make_lm() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(gpt2_config)


lms = Ensemble(make_lm, MEMBERS, device=device).eval()
prompt = torch.randint(3, VOCAB, (BATCH, 5), device=device)  # shared by the members
STEPS = 6
with torch.no_grad():
    out, tokens = lms(prompt, use_cache=True), []
    for _ in range(STEPS):
        tokens.append(out.logits[:, :, -1].argmax(-1))  # [MEMBERS, BATCH]
        # the new token differs per member (in_dims=0); the cache is split per member
        out = lms(tokens[-1][..., None], in_dims=0, past_key_values=out.past_key_values)
ensemble_tokens = torch.stack(tokens, dim=-1)  # [MEMBERS, BATCH, STEPS]
print(type(out.past_key_values).__name__, "tokens:", tuple(ensemble_tokens.shape))

# %%
# The check: each member, taken out with ``lms[i]``, decodes alone with its
# own cache, as you would without ``ensembling``, and must pick the same
# tokens at every step.
alone = []
with torch.no_grad():
    for i in range(MEMBERS):
        model = lms[i].eval()
        out, tokens = model(prompt, use_cache=True), []
        for _ in range(STEPS):
            tokens.append(out.logits[:, -1].argmax(-1))  # [BATCH]
            out = model(tokens[-1][:, None], past_key_values=out.past_key_values)
        alone.append(torch.stack(tokens, dim=-1))
assert torch.equal(ensemble_tokens, torch.stack(alone))
distinct = len({tuple(t.flatten().tolist()) for t in ensemble_tokens})
print(f"token for token as each member alone; {distinct} distinct answers from {MEMBERS} members")

# %%
# With eager attention, GPT-2's mask code does not read the mask's values, so
# each member can take its own mask: ``in_dims`` names it.
with torch.no_grad():
    got = lms(prompt, attention_mask=masks[:, :, :5], in_dims={"attention_mask": 0}).logits
    loop = torch.stack([lms[i].eval()(prompt, attention_mask=masks[i, :, :5]).logits
                        for i in range(MEMBERS)])  # fmt: skip
torch.testing.assert_close(got, loop)
print("per-member attention masks (eager attention): the ensemble equals the loop")

# %%
# Each member has its own random weights, so their answers can differ. With
# trained weights, the same loop averages their next-token probabilities, or lets
# them vote. To ensemble models you have fine-tuned, load each one with
# ``from_pretrained`` and stack them with ``Ensemble.from_modules(models)``.
#
# Initialization: the members are drawn like ``factory()``
# --------------------------------------------------------
# ``transformers`` initializes its own way (``_init_weights``): GPT-2 draws
# its weights from a normal law with standard deviation 0.02, and scales the
# projections that feed the residual stream down by ``sqrt(2 * n_layer)``.
# ``torch.nn``'s defaults would give the word embeddings a standard deviation
# of 1, and GPT-2's ``Conv1D`` layers have none. ``Ensemble(factory, n)``
# follows whatever ``factory()`` does. Compare 64 members with 64 separate
# ``factory()`` calls, parameter by parameter.
torch.manual_seed(1)
DRAWS = 64
drawn = Ensemble(make_lm, DRAWS).named_stacked_parameters()
separate = [make_lm() for _ in range(DRAWS)]
names = ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
         "transformer.h.0.attn.c_proj.weight", "transformer.h.0.ln_1.weight"]  # fmt: skip
print(f"{'parameter':36} {'Ensemble std':>12} {'factory() std':>14}")
rows = {}
for name in names:
    ours = drawn[name].detach()
    theirs = torch.stack([m.get_parameter(name).detach() for m in separate])
    rows[name] = (ours.std().item(), theirs.std().item(), ours.numel())
    print(f"{name:36} {rows[name][0]:12.4f} {rows[name][1]:14.4f}")

# %%
# The two columns should agree up to sampling noise: a standard deviation
# estimated from ``n`` normal values is off by about ``1 / sqrt(2 n)`` of
# itself, so five times that is the tolerance. A constant (``ln_1``'s ones)
# must match exactly.
for name, (ours, theirs, n) in rows.items():
    tolerance = 5 * theirs / (2 * n) ** 0.5
    agree = abs(ours - theirs) <= tolerance
    verdict = "agree" if agree else "DIFFER"
    print(f"{name}: {ours:.4f} vs {theirs:.4f}, {verdict} (tolerance {tolerance:.1e})")
    assert agree, name

# %%
# The histogram shows the whole distribution of one parameter, not only its
# spread: the query-key-value weights of the first attention block.
name = "transformer.h.0.attn.c_attn.weight"
theirs = torch.stack([m.get_parameter(name).detach() for m in separate])
fig, ax = plt.subplots(figsize=(6, 3))
bins = torch.linspace(-0.08, 0.08, 41).tolist()
ax.hist(drawn[name].detach().flatten(), bins=bins, alpha=0.6, label="Ensemble(make_lm, 64)")
ax.hist(theirs.flatten(), bins=bins, histtype="step", color="black", label="64 make_lm() calls")
ax.set_xlabel(name)
ax.set_ylabel("count")
ax.legend(frameon=False, fontsize=8)
plt.tight_layout()
plt.show()

# %%
# timm and torchvision
# --------------------
# Models from ``timm`` (a ViT, a ConvNeXt) and ``torchvision`` (ResNet,
# MobileNet) are ensembled the same way, and the project's test suite checks
# them with the same checks as this page (``tests/test_library_zoo.py``):
# outputs, float64 gradients and BatchNorm statistics against the loop, and
# initialization against ``factory()``. This page does not use them because
# installing ``timm`` pulls in ``torchvision``, whose wheel pins one exact
# ``torch`` release: pip would replace the ``torch`` you already have.
# Install them beside your ``torch`` yourself, with the ``torchvision``
# release made for it.
#
# Summary
# -------
# * A ``transformers`` model ensembles like any module: ``Ensemble(factory, n)``
#   or ``Ensemble.from_modules(models)``; outputs keep their type, with a
#   leading member dimension.
# * ``in_dims=0`` gives each member its own token ids, and
#   ``in_dims={"attention_mask": 0}`` its own mask (with eager attention).
# * The returned cache goes back into the next call as it is, so the members
#   decode step by step together, token for token as each would alone.
# * The members are drawn like separate ``factory()`` calls, Hugging Face's
#   own initialization included, as the table and the histogram show.
#
# Next steps
# ----------
# :ref:`sphx_glr_tutorials_3_scaling_out_plot_09_sharding_members.py` spreads
# members across processes or GPUs; the :ref:`API reference <api>` documents
# :class:`ensembling.Ensemble`.
