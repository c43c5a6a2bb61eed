"""``Ensemble``: many same-architecture modules stored stacked and run as one.

The data flow, and where each part lives::

    Ensemble(factory, n)        _init.py      the prototype (one factory() call), then n draws
    Ensemble.from_modules(ms)   _validate.py  the modules checked member for member, then stacked
            |
            v
    _setup                      _state.py     stacked tensors registered under ens.stacked
                                _layers.py    the runner: the architecture with vectorizable stand-ins
                                _chain.py     the member read as a chain of typed steps, if it is one
            |
            v
    forward: options (_options.py) and in_dims checked once, then
             the fast path (_fastpath.py), or, as measured per input signature
             (_planner.py), vmap over the runner (_vmap.py) or the members back to back
             (_strategy.py)
            |
            v
    ens[i] / unstack() / state_dict() / load_state_dict()   _state.py
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import EnsembleError
from ._fastpath import FastPath
from ._init import draw_members, draw_seeded_members, make_prototype
from ._layers import describe_stand_ins, make_runner
from ._malloc import arm, make_room
from ._options import Options, Randomness, Strategy
from ._state import StackedState, check_checkpoint, meta_copy
from ._strategy import describe_plan, plan_summary, run_fast, run_strategy, shells_of
from ._validate import check_block, check_members, check_stacked
from ._vmap import InDims, VmapRunner

__all__ = ["Ensemble"]


def _option(name: str, doc: str) -> property:
    """A run option read from, and validated into, the ensemble's :class:`Options` (settable, e.g. ``ens.strategy``)."""

    def get(self: Ensemble) -> Any:
        return getattr(self._options, name)

    def set(self: Ensemble, value: Any) -> None:
        self._options = dataclasses.replace(self._options, **{name: value})
        self._prepare()

    return property(get, set, doc=doc)


class Ensemble(nn.Module):
    """Many modules of one architecture, stored stacked and evaluated with one call.

    Each parameter and buffer of the member architecture is stored once, as a
    registered ``nn.Parameter`` / buffer of the ensemble whose leading
    dimension indexes the members (``stacked.fc1.weight`` is
    ``[num_members, 128, 784]`` for ``fc1 = nn.Linear(784, 128)``). Calling the
    ensemble runs every member at once -- batched matrix products for a chain
    of Linear layers, :func:`torch.vmap` over the architecture holding the
    stacked state (what :func:`torch.func.functional_call` does) otherwise, or
    the members back to back through torch's own kernels where that measured
    faster (see :meth:`~ensembling.Ensemble.plan`) -- so ``ens.parameters()``, optimizers,
    ``state_dict()``, ``.to()``, ``train()`` / ``eval()`` and ``print(ens)``
    behave as for any module.

    Parameters
    ----------
    factory : callable
        Returns a new member, e.g. a module class or ``lambda: MLP(784, 128)``.
        The members are distributed exactly as ``num_members`` independent
        ``factory()`` calls, whatever the factory does: ``reset_parameters()``,
        ``nn.init`` calls in ``__init__``, ``self.apply(_init_weights)``
        (Hugging Face), timm's ``trunc_normal_``, parameters with no
        ``reset_parameters()``. One recorded call shows what happens to each
        tensor; where every write is a self-contained in-place op
        (``uniform_``, ``normal_``, ``nn.init.kaiming_uniform_``, ``fill_`` ...)
        those writes are replayed on all members at once (under
        :func:`torch.vmap` with ``randomness="different"`` where the law
        depends on the shape), and tensors no draw reaches are copied. Where
        that would not be exact (a tensor computed from others, ``orthogonal_``,
        cloned layers, a drawn value read in Python), ``factory()`` is called
        once per member instead: slower, never a different law. On the replay
        path the factory is called a second time, to check that the copied
        tensors are the same in every call.
    num_members : int
        How many members, at least 1.
    device : torch.device or str, optional
        Where to put the stacked state. By default, the device of the module
        ``factory`` returns.
    dtype : torch.dtype, optional
        The floating-point type of the stacked state. By default, that of the
        module ``factory`` returns.
    randomness : {"different", "same", "error"}, default "different"
        Passed to :func:`torch.vmap`: with ``"different"`` every member draws
        its own dropout masks; ``"same"`` shares them; ``"error"`` raises if
        the forward pass draws random numbers.
    chunk_size : int, optional
        Passed to :func:`torch.vmap`: evaluate this many members at a time,
        trading speed for peak memory. ``None`` evaluates all at once.
    fast_path : bool, default True
        When the member is a chain of ``nn.Linear``, ``nn.Dropout`` and
        element-wise activations (an ``nn.Sequential`` of them, or any module
        whose forward applies them one after another, such as a custom MLP
        class using ``F.relu``), with reshapes (``x.flatten(1)``, ``view``,
        ``transpose``) and reductions (``x.mean(dim=1)``, ``sum``, ``amax``,
        ``amin``) of the member's own dimensions in between and optionally an
        ``nn.Embedding`` first (a bag-of-embeddings model), evaluate it with
        batched matrix products (:func:`torch.baddbmm`) instead of ``vmap``:
        the same results, with the per-layer overhead of ``vmap`` removed.
        Other architectures use ``vmap``; ``print(ens)`` shows which path
        (``path=baddbmm`` or ``vmap``).
    strategy : {"auto", "vectorized", "loop"}, default "auto"
        How members off the fast path run: ``"vectorized"``, one ``vmap`` call;
        ``"loop"``, one after another through torch's own (fused) kernels,
        reading views of the stacked tensors; ``"auto"``, whichever the first
        calls of each input signature measure faster on this device (see
        :meth:`plan`), measured again after 50, 200, 800, ... more calls (later
        where the two measured far apart) in case conditions changed. All
        give the loop's answer.
    seed : int, optional
        Initialize member ``i`` from its own seed derived from ``(seed, i)``,
        one member after another, instead of drawing all members in one
        vectorized pass from the global generator. Slower, but member ``i``'s
        initial values then do not depend on how many members there are or on
        which process builds them (see :mod:`ensembling.distributed`).
    members : range, optional
        With ``seed``: build only these members (a contiguous block of
        ``range(num_members)``), each equal to the same member of the whole
        seeded ensemble. This is how a process of a sharded ensemble builds its
        share. ``len(ens)`` is then ``len(members)``.

    Attributes
    ----------
    stacked : nn.Module
        The stacked parameters and buffers, at the member's own dotted paths:
        ``ens.stacked.fc1.weight`` is ``[num_members, *fc1.weight.shape]``.
        :meth:`named_stacked_parameters` lists them by the member's names.
    num_members : int
        The number of members, ``len(ens)``.
    member_class : type
        The class of the members (``type(ens[i])``).

    Notes
    -----
    On a CPU with glibc, the first training call (eager or compiled) raises
    glibc's malloc thresholds to fit the stacked parameters, so that each
    training step reuses the memory the last one freed instead of
    page-faulting it in again (:func:`~ensembling.reuse_cpu_memory` says why,
    and turns it off).

    Examples
    --------
    >>> _ = torch.manual_seed(0)
    >>> ens = Ensemble(lambda: nn.Linear(3, 2), num_members=5)
    >>> len(ens), ens.stacked.weight.shape  # [members, out, in]
    (5, torch.Size([5, 2, 3]))
    >>> x = torch.randn(4, 3)  # one batch of 4 inputs, shared by every member
    >>> ens(x).shape  # [members, batch, out]
    torch.Size([5, 4, 2])
    >>> xs = torch.randn(5, 4, 3)  # xs[i] goes to member i
    >>> ens(xs, in_dims=0).shape
    torch.Size([5, 4, 2])
    >>> member = ens[2]  # an ordinary nn.Linear, an independent copy
    >>> torch.testing.assert_close(member(xs[2]), ens(xs, in_dims=0)[2])
    """

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        num_members: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        fast_path: bool = True,
        seed: int | None = None,
        members: range | None = None,
        strategy: Strategy = "auto",
    ) -> None:
        options = Options(randomness, chunk_size, fast_path, strategy)
        prototype = make_prototype(factory, num_members, device, dtype, seed)
        if members is not None:
            check_block(members, num_members, seed)
        if seed is None:
            params, buffers = draw_members(prototype, num_members)
        else:
            params, buffers = draw_seeded_members(prototype, seed, range(num_members) if members is None else members)
        super().__init__()
        self._setup(prototype, params, buffers, options)

    @classmethod
    def from_modules(
        cls,
        modules: Iterable[nn.Module],
        *,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        fast_path: bool = True,
        strategy: Strategy = "auto",
    ) -> Ensemble:
        """Stack existing modules of one architecture into a new ensemble.

        The ensemble holds copies: later changes to ``modules`` do not affect
        it, nor does training it change them (use :meth:`unstack` or
        ``ens[i]`` to get trained members back).

        Parameters
        ----------
        modules : iterable of nn.Module
            A list, tuple, ``nn.ModuleList`` or generator of at least one
            module; all of the same class, in the same train/eval
            mode, with the same parameter and buffer names, shapes, dtypes,
            devices and ``requires_grad`` flags.
        randomness, chunk_size, fast_path, strategy
            As for :class:`Ensemble`.

        Returns
        -------
        Ensemble
            With ``len(ens) == len(modules)``; member ``i`` is ``modules[i]``.

        Raises
        ------
        EnsembleError
            Naming the first offending member index and parameter or buffer.

        Examples
        --------
        >>> models = [nn.Linear(3, 2) for _ in range(4)]
        >>> ens = Ensemble.from_modules(models)
        >>> torch.equal(ens.stacked.bias[1], models[1].bias)  # bit-exact copies
        True
        >>> Ensemble.from_modules([nn.Linear(3, 2), nn.Linear(3, 5)])
        Traceback (most recent call last):
        ...
        ensembling.EnsembleError: Ensemble.from_modules: parameter 'weight' of member 1 has shape [5, 3], ...
        """
        options = Options(randomness, chunk_size, fast_path, strategy)
        modules = check_members(modules, "Ensemble.from_modules")
        first = modules[0]
        with torch.no_grad():
            params = {
                name: torch.stack([m.get_parameter(name) for m in modules]).requires_grad_(p.requires_grad)
                for name, p in first.named_parameters()
            }
            buffers = {name: torch.stack([m.get_buffer(name) for m in modules]) for name, _ in first.named_buffers()}
        return cls._assemble(first, params, buffers, options)

    @classmethod
    def from_stacked(
        cls,
        member: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor] | None = None,
        *,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        fast_path: bool = True,
    ) -> Ensemble:
        """An ensemble that takes over already stacked tensors, without copying them.

        Parameters
        ----------
        member : nn.Module
            One module of the architecture; only its structure is used (its
            values are ignored), and its train/eval mode becomes the ensemble's.
        params : mapping of str to Tensor
            For every parameter name of ``member``, a tensor of shape
            ``[num_members, *parameter.shape]``, as returned by
            :func:`torch.func.stack_module_state`. Each keeps its own
            ``requires_grad``.
        buffers : mapping of str to Tensor, optional
            The same for every buffer of ``member``.
        randomness, chunk_size, fast_path
            As for :class:`Ensemble`.

        Returns
        -------
        Ensemble

        Examples
        --------
        >>> from torch.func import stack_module_state
        >>> models = [nn.Linear(3, 2) for _ in range(4)]
        >>> params, buffers = stack_module_state(models)  # [4, 2, 3] and [4, 2]
        >>> ens = Ensemble.from_stacked(models[0], params, buffers)
        >>> ens.stacked.weight is params["weight"] or ens.stacked.weight.data_ptr() == params["weight"].data_ptr()
        True
        """
        options = Options(randomness, chunk_size, fast_path)
        buffers = {} if buffers is None else buffers
        check_stacked(member, params, buffers)
        return cls._assemble(member, dict(params), dict(buffers), options)

    @classmethod
    def _assemble(cls, prototype: nn.Module, params: dict, buffers: dict, options: Options) -> Ensemble:
        """The ensemble of already drawn or stacked tensors (every constructor but ``__init__`` ends here)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(prototype, params, buffers, options)
        return self

    def _setup(self, prototype: nn.Module, params: dict, buffers: dict, options: Options) -> None:
        """Register the stacked state, and plan how members run: the runner for vmap, a fast path if any."""
        if not params and not buffers:
            raise EnsembleError(
                f"Ensemble: {type(prototype).__name__} has no parameters or buffers, so there "
                "is nothing to stack; every member would compute the same function."
            )
        self._options = options
        self.member_class = type(prototype)
        # The architecture without weights: on the meta device, and not registered as
        # a submodule, so it adds nothing to parameters(), state_dict() or .to().
        template = meta_copy(prototype)
        self._state = StackedState(template, params, buffers)
        self.stacked = self._state.module
        self.num_members = self._state.num_members()
        object.__setattr__(self, "_template", template)
        # What the members run: the same architecture, with vectorizable stand-ins
        # for the layers vmap cannot batch (see _layers.py). _template stays
        # untouched, for building ordinary member modules.
        object.__setattr__(self, "_runner", make_runner(template))
        self._vmap = VmapRunner(self._runner, self._state.aliases, [slot.name for slot in self._state.buffer_slots])
        self._fast = FastPath.plan(template, self._state)
        self.train(prototype.training)
        arm(self)  # CPU training, compiled or not, keeps the memory a step frees: _malloc.py
        self._prepare()

    def _prepare(self) -> None:
        """Make what the options need ahead of the first call: with ``strategy="loop"``, the per-member copies,
        whose ``copy.deepcopy`` a ``torch.compile(fullgraph=True)`` of the first call could not trace."""
        if self._options.strategy == "loop":
            shells_of(self)

    # ------------------------------------------------------------------ options

    randomness = _option("randomness", "``'different'``, ``'same'`` or ``'error'``: random draws, as for vmap.")
    chunk_size = _option("chunk_size", "Members evaluated at a time under ``vmap`` (``None``: all at once).")
    fast_path = _option("fast_path", "Whether a chain member (see parameter ``fast_path``) runs as batched products.")
    strategy = _option("strategy", "``'auto'``, ``'vectorized'`` or ``'loop'``: how members off the fast path run.")

    def plan(self) -> str:
        """What runs the members: the fast path, the forced strategy, or the measured choice per input signature.

        Returns
        -------
        str
            One line for the ensemble, then one per path or input signature
            (shapes, dtypes, device, train/eval, grad mode) with the strategy
            chosen for it and the per-call times it was chosen from.

        Examples
        --------
        >>> ens = Ensemble(lambda: nn.GRU(3, 4, batch_first=True), 2, strategy="loop")
        >>> out, h = ens(torch.randn(5, 6, 3))  # [2, 5, 6, 4]: the members one by one, torch's fused GRU
        >>> print(ens.plan())
        Ensemble of 2 GRU, strategy='loop'
          other calls: loop (forced)
        >>> ens.strategy = "auto"
        >>> with torch.no_grad():
        ...     for _ in range(10):  # the first calls alternate strategies and time them
        ...         _ = ens(torch.randn(5, 6, 3))
        >>> print(ens.plan())  # doctest: +ELLIPSIS
        Ensemble of 2 GRU, strategy='auto'
          ([5, 6, 3] float32 cpu (shared)), train, no grad -> ... (measured: vectorized ... ms, loop ... ms)
        """
        return describe_plan(self)

    # ------------------------------------------------------------------ module protocol

    def train(self, mode: bool = True) -> Ensemble:
        """Set train/eval mode for every member (as :meth:`torch.nn.Module.train`)."""
        super().train(mode)
        for name in ("_template", "_runner"):
            inner = self.__dict__.get(name)
            if inner is not None:
                inner.train(mode)
        return self

    def __len__(self) -> int:
        return self.num_members

    def extra_repr(self) -> str:
        extras = f"num_members={self.num_members}, member={self.member_class.__qualname__}"
        if self.randomness != "different":
            extras += f", randomness={self.randomness!r}"
        if self.chunk_size is not None:
            extras += f", chunk_size={self.chunk_size}"
        if self.strategy != "auto":
            extras += f", strategy={self.strategy!r}"
        if self.fast_path and self._fast is not None and self.strategy != "loop":
            return f"{extras}, path=baddbmm"
        stand_ins = describe_stand_ins(self._runner, self._state.device())
        extras += plan_summary(self)  # ", plan: loop for 1 input signature", once measured
        return f"{extras}, path=vmap" + (f", stand-ins: {'; '.join(stand_ins)}" if stand_ins else "")

    def named_stacked_parameters(self) -> dict[str, nn.Parameter]:
        """The stacked parameters, keyed by the member's parameter names (``fc1.weight``)."""
        return self._state.params()

    def named_stacked_buffers(self) -> dict[str, Tensor]:
        """The stacked buffers, keyed by the member's buffer names (``bn.running_mean``)."""
        return self._state.buffers()

    # ------------------------------------------------------------------ members

    def __getitem__(self, index: int | slice) -> nn.Module:
        """Member ``index`` as an ordinary module (an independent copy); a slice gives an Ensemble.

        The copy has the member class (``type(ens[i]) is ens.member_class``), the
        ensemble's train/eval mode, and bit-for-bit the stacked values of that member.
        """
        if isinstance(index, slice):
            if len(range(self.num_members)[index]) == 0:
                raise EnsembleError(f"Ensemble: slice {index} selects no members of {self.num_members}.")
            params, buffers = self._state.sliced(index)
            return type(self)._assemble(self._template, params, buffers, self._options)
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"Ensemble indices must be int or slice, not {type(index).__name__}")
        if not -self.num_members <= index < self.num_members:
            raise IndexError(f"Ensemble: member index {index} is out of range for {self.num_members} members")
        return self._state.member(self._template, index % self.num_members)

    def unstack(self) -> list[nn.Module]:
        """Every member as an ordinary, independent module: ``[ens[0], ..., ens[n - 1]]``.

        ``Ensemble.from_modules(ens.unstack())`` reproduces the stacked tensors
        bit for bit.
        """
        return [self[i] for i in range(self.num_members)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.unstack())

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a checkpoint, first checking it fits: member count and per-member shapes.

        As :meth:`torch.nn.Module.load_state_dict`, but a checkpoint of an
        ensemble with a different number of members or different member
        shapes raises :class:`EnsembleError` naming the tensor and saying how
        to fix it, before anything is copied.
        """
        check_checkpoint(self.state_dict(keep_vars=True), state_dict, strict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:
            arm(self)  # the stacked parameters were replaced, and their hooks with them
        return result

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        *args: Any,
        in_dims: InDims = None,
        randomness: Randomness | None = None,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run every member on the inputs; outputs gain a leading member dimension.

        Parameters
        ----------
        *args
            The member's positional inputs.
        in_dims : int, None, tuple or dict, default None
            Which inputs are split across the members. ``None`` gives every
            member the same input; ``0`` gives member ``i`` slice ``i`` of
            dimension 0 (which must have ``num_members`` entries). An int or
            ``None`` applies to every positional input, a tuple gives one entry
            per positional input (as for :func:`torch.vmap`), and a dict
            addresses inputs by position or by name -- a keyword's name, or the
            name of a positional parameter of the member's ``forward`` -- e.g.
            ``{"attention_mask": 0}``; inputs it does not name are shared.
            Keyword inputs are shared unless a dict names them. An object this
            ensemble returned (a cache) is split at dimension 0 unless
            ``in_dims`` names it.
        randomness, chunk_size : optional
            Override the ensemble's settings for this call.
        **kwargs
            Keyword inputs, shared by every member unless ``in_dims`` names them.

        Returns
        -------
        Any
            Whatever the member returns, with a leading dimension of size ``num_members`` on each
            tensor, also inside containers and objects such as a ``ModelOutput`` holding a
            ``DynamicCache`` (feed that cache back as it is: it is split per member). Values that
            are not tensors (``None``, ints, strings) come back as they are.

        Raises
        ------
        EnsembleError
            A split input with the wrong member count; an ``in_dims`` key naming no input; a forward
            ``torch.vmap`` cannot run as one call (which layer and input, and the way out).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from ensembling import Ensemble
        >>> class Masked(nn.Module):
        ...     def __init__(self) -> None:
        ...         super().__init__()
        ...         self.lin = nn.Linear(3, 2)
        ...     def forward(self, x, mask=None):
        ...         return self.lin(x if mask is None else x * mask)
        >>> ens = Ensemble(Masked, 4)
        >>> x = torch.randn(5, 3)                            # [BATCH, 3], shared by the members
        >>> masks = torch.randint(0, 2, (4, 5, 3)).float()   # [N, BATCH, 3], one mask per member
        >>> out = ens(x, mask=masks, in_dims={"mask": 0})    # member i gets masks[i]
        >>> out.shape                                        # [N, BATCH, 2]
        torch.Size([4, 5, 2])
        >>> torch.testing.assert_close(out[1], ens[1](x, mask=masks[1]))
        """
        options = self._options.override(randomness, chunk_size)
        dims, kw_dims = self._vmap.check(args, kwargs, in_dims, self.num_members)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            make_room(self)  # on the CPU, glibc keeps what a training step frees: _malloc.py
        if self._fast is not None and options.fast_path and options.chunk_size is None and options.strategy != "loop":
            if len(args) == 1 and not kwargs and isinstance(args[0], Tensor) and dims[0] in (None, 0):
                return run_fast(self, args[0], dims[0] is None, options)  # the layout measured: _strategy.py

        def vectorized() -> Any:
            params, buffers = self._state.params(), self._state.buffers()
            device = self._state.device()
            randomness, chunk_size = options.randomness, options.chunk_size
            return self._vmap(params, buffers, args, kwargs, dims, randomness, chunk_size, device, kw_dims)

        return run_strategy(self, vectorized, args, kwargs, dims, kw_dims, options)  # vectorized or loop: _strategy.py
