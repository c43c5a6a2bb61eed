"""``Ensemble``: many same-architecture modules stored stacked and run as one."""

from __future__ import annotations

import copy
import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from ._errors import EnsembleError
from ._layers import attention_context, make_runner
from ._validate import check_members

__all__ = ["Ensemble"]

Randomness = Literal["different", "same", "error"]
InDims = int | None | Sequence[Any]

# Stateless element-wise modules: applying them to a [members, rows, features]
# tensor is the same as applying them to each member's [rows, features] slice.
_ELEMENTWISE = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)  # fmt: skip


def _is_torch_nn_class(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn.")


def _reset_method(module: nn.Module) -> Callable[[], None] | None:
    for name in ("reset_parameters", "_reset_parameters"):
        method = getattr(module, name, None)
        if callable(method):
            return method
    return None


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Children before parents: the order in which constructors initialize."""
    for child in module.children():
        yield from _post_order(child)
    yield module


class _Resetter(nn.Module):
    """Calls every ``reset_parameters`` of ``inner``; functional_call swaps the state in."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self) -> Tensor:
        for module in _post_order(self.inner):
            reset = _reset_method(module)
            if reset is not None:
                reset()
        return torch.zeros(())


class _Stack(nn.Module):
    """Holds stacked tensors at the same dotted paths as in the member (``fc1.weight``)."""

    def extra_repr(self) -> str:
        items = [*self._parameters.items(), *self._buffers.items()]
        return ", ".join(f"{name}: {list(t.shape)}" for name, t in items if t is not None)


def _container_and_attr(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, _Stack())
        module = module._modules[part]
    return module, attr


# Element-wise functions a traced forward may apply between Linear layers.
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.tanh, F.sigmoid,
    F.hardtanh, F.hardsigmoid, F.hardswish, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid,
}  # fmt: skip
_ELEMENTWISE_BUILTINS = {torch.relu, torch.tanh, torch.sigmoid}  # no extra arguments allowed
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid"}


def _is_fast_leaf(layer: nn.Module) -> bool:
    if type(layer) is nn.Linear:
        return True
    stateless = not list(layer.parameters(recurse=True)) and not list(layer.buffers())
    return stateless and (type(layer) in _ELEMENTWISE or type(layer) is nn.Dropout)


FastLayer = tuple[str, "nn.Module | Callable[[Tensor], Tensor]"]


def _fast_layers(template: nn.Module) -> list[FastLayer] | None:
    """The member as a chain of Linear, Dropout and element-wise steps, or None if it is not one.

    An ``nn.Sequential`` of such layers is read directly. Any other module
    whose leaves are all such layers (a custom MLP class, say) is traced with
    :func:`torch.fx.symbolic_trace`; it qualifies when its forward takes one
    input and applies those layers, or element-wise functions such as
    ``F.relu`` / ``torch.tanh``, one after another.
    """
    if type(template) is nn.Sequential:
        layers: list[FastLayer] = list(template.named_children())
        if not layers or not all(_is_fast_leaf(layer) for _, layer in layers):
            return None
    else:
        leaves = [m for m in template.modules() if not list(m.children())]
        if not leaves or not all(_is_fast_leaf(m) for m in leaves) or any(
            m._parameters or m._buffers for m in template.modules() if list(m.children())
        ):
            return None
        # Tracing bakes Python control flow in, e.g. `if not self.training:`; the
        # chain must be the same in both modes, or the fast path would follow one
        # mode's steps in the other.
        was_training = template.training
        chains = [_traced_chain(template.train(mode)) for mode in (True, False)]
        template.train(was_training)
        if chains[0] is None or chains[1] is None or _steps(chains[0]) != _steps(chains[1]):
            return None
        layers = chains[0]
    if not any(isinstance(layer, nn.Linear) for _, layer in layers):
        return None
    return layers


def _steps(layers: list[FastLayer]) -> list[tuple[Any, ...]]:
    """What a chain computes, comparable between two traces: modules by name, functions by identity and arguments."""
    return [
        (name,) if isinstance(layer, nn.Module)
        else (getattr(layer, "func", layer), sorted(getattr(layer, "keywords", {}).items()))
        for name, layer in layers
    ]  # fmt: skip


def _traced_chain(template: nn.Module) -> list[FastLayer] | None:
    """Trace ``template.forward``; return its steps if they form a single chain of fast layers."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(template).graph
    except Exception:  # dynamic control flow, unsupported Python: not a chain we can read
        return None
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or any(n.op == "placeholder" for n in nodes[1:]):
        return None
    previous, layers = nodes[0], []
    for node in nodes[1:]:
        if node.op == "output":
            return layers if node.args[0] is previous else None
        if node.all_input_nodes != [previous] or not node.args or node.args[0] is not previous:
            return None
        extra, kwargs = node.args[1:], dict(node.kwargs)
        if node.op == "call_module" and not extra and not kwargs:
            layers.append((node.target, template.get_submodule(node.target)))
        elif node.op == "call_function" and node.target in _ELEMENTWISE_BUILTINS and not extra and not kwargs:
            layers.append((node.name, node.target))
        elif node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS:
            try:
                signature = inspect.signature(node.target)
            except ValueError:  # a builtin (F.gelu): keyword arguments only
                if extra:
                    return None
                arguments = kwargs
            else:
                try:
                    arguments = dict(signature.bind(None, *extra, **kwargs).arguments)
                except TypeError:
                    return None
                arguments.pop(next(iter(arguments)))  # the input itself
            arguments.pop("inplace", None)  # the fast path decides what it may overwrite
            layers.append((node.name, functools.partial(node.target, **arguments) if arguments else node.target))
        elif node.op == "call_method" and node.target in _ELEMENTWISE_METHODS and not extra and not kwargs:
            layers.append((node.name, getattr(torch, node.target)))
        else:
            return None
        previous = node
    return None


class Ensemble(nn.Module):
    """Many modules of one architecture, stored stacked and evaluated with one call.

    Each parameter and buffer of the member architecture is stored once, as a
    registered ``nn.Parameter`` / buffer of the ensemble whose leading
    dimension indexes the members (``stacked.fc1.weight`` is
    ``[num_members, 128, 784]`` for ``fc1 = nn.Linear(784, 128)``). Calling the
    ensemble runs every member with :func:`torch.vmap` over
    :func:`torch.func.functional_call`, so ``ens.parameters()``, optimizers,
    ``state_dict()``, ``.to()``, ``train()`` / ``eval()`` and ``print(ens)``
    behave as for any module.

    Parameters
    ----------
    factory : callable
        Returns a new member, e.g. a module class or ``lambda: MLP(784, 128)``.
        It is called **once**: the members' initial values are drawn together,
        by running every submodule's ``reset_parameters()`` (or
        ``_reset_parameters()``) under :func:`torch.vmap` with
        ``randomness="different"``. Each member therefore gets an independent
        draw from exactly the distribution the layer's own initializer uses,
        with fan-in and fan-out computed from one member's shapes.
        Parameters of a submodule without such a method are copied from the
        one factory call to every member (a warning names them).
    num_members : int
        How many members, at least 1.
    device, dtype : optional
        Where to put, and what floating-point type to give, the stacked state.
        By default, those of the module ``factory`` returns.
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
        class using ``F.relu``), evaluate it with batched matrix products
        (:func:`torch.baddbmm`) instead of ``vmap``: the same results, with the
        per-layer overhead of ``vmap`` removed. Other architectures use
        ``vmap``; ``print(ens)`` shows which path (``path=baddbmm`` or ``vmap``).
    seed : int, optional
        Initialize member ``i`` from its own seed derived from ``(seed, i)``,
        one member after another, instead of drawing all members in one
        vectorized pass from the global generator. Slower, but member ``i``'s
        initial values then do not depend on how many members there are or on
        which process builds them (see :mod:`ensembling.distributed`).

    Examples
    --------
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
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
    ) -> None:
        super().__init__()
        self._build(factory, num_members, None, device, dtype, randomness, chunk_size, fast_path, seed)

    @classmethod
    def _shard(
        cls, factory: Callable[[], nn.Module], num_members: int, members: range, seed: int, **options: Any
    ) -> Ensemble:
        """Members ``members`` (a block of ``range(num_members)``) of ``Ensemble(factory, num_members, seed=seed)``."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._build(
            factory, num_members, members, options.pop("device", None), options.pop("dtype", None),
            options.pop("randomness", "different"), options.pop("chunk_size", None),
            options.pop("fast_path", True), seed, **options,
        )
        return self

    def _build(
        self,
        factory: Callable[[], nn.Module],
        num_members: int,
        members: range | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
        randomness: Randomness,
        chunk_size: int | None,
        fast_path: bool,
        seed: int | None,
    ) -> None:
        if isinstance(num_members, bool) or not isinstance(num_members, int):
            raise EnsembleError(
                f"Ensemble: num_members must be an int, got {type(num_members).__name__}; "
                "call Ensemble(factory, 10), for example."
            )
        if num_members < 1:
            raise EnsembleError(
                f"Ensemble: num_members must be at least 1, got {num_members}."
            )
        if isinstance(factory, nn.Module):
            raise EnsembleError(
                "Ensemble: the first argument is a module instance, but it must be a factory "
                "that builds one (a class or a lambda). To stack existing modules, use "
                "Ensemble.from_modules(modules)."
            )
        if not callable(factory):
            raise EnsembleError(
                f"Ensemble: factory must be callable, got {type(factory).__name__}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise EnsembleError(f"Ensemble: seed must be an int or None, got {type(seed).__name__}.")
        if seed is not None:
            # A seeded ensemble leaves the global generators alone: the CPU's, and the
            # current CUDA device's if CUDA is in use (never every GPU, nor starting CUDA).
            cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=cuda):
                prototype = factory()
        else:
            prototype = factory()
        if not isinstance(prototype, nn.Module):
            raise EnsembleError(
                f"Ensemble: factory() returned a {type(prototype).__name__}, not an nn.Module."
            )
        if device is not None or dtype is not None:
            prototype = prototype.to(device=device, dtype=dtype)
        members = range(num_members) if members is None else members
        if seed is None:
            params, buffers = self._init_members(prototype, num_members)
        else:
            params, buffers = self._init_seeded_members(prototype, seed, members)
        requires_grad = {name: p.requires_grad for name, p in prototype.named_parameters()}
        self._setup(prototype, params, buffers, requires_grad, randomness, chunk_size, fast_path)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_modules(
        cls,
        modules: Iterable[nn.Module],
        *,
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        fast_path: bool = True,
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
        randomness, chunk_size, fast_path
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
        ensembling._errors.EnsembleError: Ensemble.from_modules: parameter 'weight' of member 1 has shape [5, 3], but member 0's has [2, 3] ...
        """
        modules = check_members(modules, "Ensemble.from_modules")
        first = modules[0]
        with torch.no_grad():
            params = {
                name: torch.stack([m.get_parameter(name) for m in modules])
                for name, _ in first.named_parameters()
            }
            buffers = {
                name: torch.stack([m.get_buffer(name) for m in modules])
                for name, _ in first.named_buffers()
            }
        requires_grad = {name: p.requires_grad for name, p in first.named_parameters()}
        return cls._from_stacked(first, params, buffers, requires_grad, randomness, chunk_size, fast_path)

    @classmethod
    def _from_stacked(
        cls,
        prototype: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        requires_grad: Mapping[str, bool],
        randomness: Randomness = "different",
        chunk_size: int | None = None,
        fast_path: bool = True,
    ) -> Ensemble:
        """An ensemble that takes ownership of already stacked tensors (no copy)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(prototype, params, buffers, requires_grad, randomness, chunk_size, fast_path)
        return self

    @staticmethod
    def _init_seeded_members(
        prototype: nn.Module, seed: int, members: range
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Initialize member ``i`` from its own seed, derived from ``(seed, i)`` only.

        The members are drawn one after another (into views of the stacked
        tensors: no module is built), each under ``torch.manual_seed`` of its own
        seed, with the global random state restored afterwards. So member ``i``
        is the same whatever the number of members or the process that builds it,
        which is what sharding an ensemble across processes needs.
        """
        params, buffers, versions = Ensemble._allocate_members(prototype, len(members))
        resetter = _Resetter(meta_copy(prototype))
        device = next(iter({**params, **buffers}.values())).device
        fork = {"devices": [device] if device.type == "cuda" else [], "device_type": device.type}
        with torch.no_grad():
            for k, member in enumerate(members):
                with torch.random.fork_rng(**fork):
                    torch.manual_seed(member_seed(seed, member))
                    state = {f"inner.{name}": v[k] for name, v in {**params, **buffers}.items()}
                    functional_call(resetter, state, ())
            _fill_unwritten(prototype, {**params, **buffers}, versions)
        return params, buffers

    @staticmethod
    def _allocate_members(
        prototype: nn.Module, n: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, int]]:
        """Stacked tensors for ``n`` members, not yet drawn.

        A tensor that a ``torch.nn`` layer's own initializer is about to
        overwrite is only allocated (no copy); every other tensor holds the
        prototype's values. The third result maps each allocated-only tensor to
        its version counter, for :func:`_fill_unwritten` to check afterwards.
        """
        fully_reset: set[int] = set()  # ids of tensors a torch.nn layer's reset overwrites
        for module in prototype.modules():
            if _is_torch_nn_class(module) and _reset_method(module) is not None:
                fully_reset.update(id(t) for t in module._parameters.values() if t is not None)
                fully_reset.update(id(t) for t in module._buffers.values() if t is not None)
        uncovered = [
            f"{prefix}.{name}".lstrip(".")
            for prefix, module in prototype.named_modules()
            if _reset_method(module) is None
            for name, p in module._parameters.items()
            if p is not None and p.is_floating_point()
        ]
        if uncovered and n > 1:
            warnings.warn(
                f"Ensemble: {uncovered} belong to modules without reset_parameters(), so every "
                "member starts with the values of one factory() call. Give those modules a "
                "reset_parameters() method to draw them per member, or build the members "
                "yourself and use Ensemble.from_modules([factory() for _ in range(n)]).",
                stacklevel=4,
            )

        def stacked(t: Tensor) -> Tensor:
            if id(t) in fully_reset:  # about to be overwritten: skip copying
                return torch.empty((n, *t.shape), dtype=t.dtype, device=t.device)
            return t.detach().unsqueeze(0).expand(n, *t.shape).clone()

        with torch.no_grad():
            params = {name: stacked(p) for name, p in prototype.named_parameters()}
            buffers = {name: stacked(b) for name, b in prototype.named_buffers()}
        allocated = {**params, **buffers}
        versions = {
            name: allocated[name]._version
            for name, t in [*prototype.named_parameters(), *prototype.named_buffers()]
            if id(t) in fully_reset
        }
        return params, buffers, versions

    @staticmethod
    def _init_members(prototype: nn.Module, n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Draw ``n`` independent initializations with one vmapped pass of the initializers."""
        params, buffers, versions = Ensemble._allocate_members(prototype, n)
        with torch.no_grad():
            if any(_reset_method(m) is not None for m in prototype.modules()):
                resetter = _Resetter(meta_copy(prototype))
                state = {f"inner.{k}": v for k, v in {**params, **buffers}.items()}
                try:
                    torch.vmap(lambda s: functional_call(resetter, s, ()), randomness="different")(state)
                except Exception as err:  # an initializer vmap cannot batch
                    raise EnsembleError(
                        f"Ensemble: running the members' reset_parameters() under torch.vmap failed "
                        f"({type(err).__name__}: {err}). Build the members yourself and use "
                        "Ensemble.from_modules([factory() for _ in range(n)]) instead."
                    ) from err
            _fill_unwritten(prototype, {**params, **buffers}, versions)
        return params, buffers

    def _setup(
        self,
        prototype: nn.Module,
        params: Mapping[str, Tensor],
        buffers: Mapping[str, Tensor],
        requires_grad: Mapping[str, bool],
        randomness: Randomness,
        chunk_size: int | None,
        fast_path: bool,
    ) -> None:
        if randomness not in ("different", "same", "error"):
            raise EnsembleError(
                f"Ensemble: randomness must be 'different', 'same' or 'error', got {randomness!r}."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise EnsembleError(f"Ensemble: chunk_size must be a positive int or None, got {chunk_size!r}.")
        if not params and not buffers:
            raise EnsembleError(
                f"Ensemble: {type(prototype).__name__} has no parameters or buffers, so there "
                "is nothing to stack; every member would compute the same function."
            )
        self.num_members = int(next(iter({**params, **buffers}.values())).shape[0])
        self.randomness = randomness
        self.chunk_size = chunk_size
        self.fast_path = fast_path
        self.member_class = type(prototype)
        self._vmap_cache: dict[Any, Callable[..., Any]] = {}
        self.stacked = _Stack()
        self._param_slots: list[tuple[str, nn.Module, str]] = []
        self._buffer_slots: list[tuple[str, nn.Module, str]] = []
        for name, value in params.items():
            container, attr = _container_and_attr(self.stacked, name)
            container.register_parameter(attr, nn.Parameter(value.detach(), requires_grad=requires_grad[name]))
            self._param_slots.append((name, container, attr))
        persistent = {
            f"{prefix}.{name}".lstrip(".")
            for prefix, module in prototype.named_modules()
            for name in module._buffers
            if name not in module._non_persistent_buffers_set
        }
        for name, value in buffers.items():
            container, attr = _container_and_attr(self.stacked, name)
            container.register_buffer(attr, value.detach(), persistent=name in persistent)
            self._buffer_slots.append((name, container, attr))
        # The architecture without weights: on the meta device, and not registered as
        # a submodule, so it adds nothing to parameters(), state_dict() or .to().
        template = meta_copy(prototype)
        object.__setattr__(self, "_template", template)
        # What the members run: the same architecture, with vectorizable stand-ins
        # for the layers vmap cannot batch (see _layers.py). _template stays
        # untouched, for building ordinary member modules.
        object.__setattr__(self, "_runner", make_runner(template))
        self._aliases = {
            name: [alias for alias, p in template.named_parameters(remove_duplicate=False) if p is template.get_parameter(name)]
            for name, _, _ in self._param_slots
        }
        layers = _fast_layers(template)
        self._fast = None if layers is None else self._plan(layers)
        # Above about a million elements per stacked weight, copying a transposed
        # gradient (and allocating fresh memory for it every step) costs more than
        # the transposed layout's slightly slower small products; see _forward_fast.
        self._fast_weights_are_large = self._fast is not None and any(
            getattr(step[2], step[3]).numel() >= 2**20 for step in self._fast if step[0] == "linear"
        )
        self.train(prototype.training)

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
        path = "baddbmm" if self.fast_path and self._fast is not None else "vmap"
        return f"{extras}, path={path}"

    def named_stacked_parameters(self) -> dict[str, nn.Parameter]:
        """The stacked parameters, keyed by the member's parameter names (``fc1.weight``)."""
        return {name: getattr(container, attr) for name, container, attr in self._param_slots}

    def named_stacked_buffers(self) -> dict[str, Tensor]:
        """The stacked buffers, keyed by the member's buffer names (``bn.running_mean``)."""
        return {name: getattr(container, attr) for name, container, attr in self._buffer_slots}

    # ------------------------------------------------------------------ members

    def __getitem__(self, index: int | slice) -> nn.Module:
        """Member ``index`` as an ordinary module (an independent copy); a slice gives an Ensemble.

        The copy has the member class (``type(ens[i]) is ens.member_class``), the
        ensemble's train/eval mode, and bit-for-bit the stacked values of that member.
        """
        if isinstance(index, slice):
            picked = range(self.num_members)[index]
            if len(picked) == 0:
                raise EnsembleError(f"Ensemble: slice {index} selects no members of {self.num_members}.")
            with torch.no_grad():
                params = {k: v[index].clone() for k, v in self.named_stacked_parameters().items()}
                buffers = {k: v[index].clone() for k, v in self.named_stacked_buffers().items()}
            requires_grad = {k: v.requires_grad for k, v in self.named_stacked_parameters().items()}
            return type(self)._from_stacked(
                self._template, params, buffers, requires_grad, self.randomness, self.chunk_size, self.fast_path
            )
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"Ensemble indices must be int or slice, not {type(index).__name__}")
        if not -self.num_members <= index < self.num_members:
            raise IndexError(
                f"Ensemble: member index {index} is out of range for {self.num_members} members"
            )
        index %= self.num_members
        module = copy.deepcopy(self._template)
        with torch.no_grad():
            for name, stacked in self.named_stacked_parameters().items():
                value = nn.Parameter(stacked[index].clone(), requires_grad=stacked.requires_grad)
                for alias in self._aliases[name]:
                    owner, attr = _owner(module, alias)
                    owner._parameters[attr] = value
            for name, stacked in self.named_stacked_buffers().items():
                owner, attr = _owner(module, name)
                owner._buffers[attr] = stacked[index].clone()
        return module

    def unstack(self) -> list[nn.Module]:
        """Every member as an ordinary, independent module: ``[ens[0], ..., ens[n - 1]]``.

        ``Ensemble.from_modules(ens.unstack())`` reproduces the stacked tensors
        bit for bit.
        """
        return [self[i] for i in range(self.num_members)]

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.unstack())

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load a checkpoint, first checking it fits: member count and per-member shapes.

        As :meth:`torch.nn.Module.load_state_dict`, but a checkpoint of an
        ensemble with a different number of members or different member
        shapes raises :class:`EnsembleError` naming the tensor and saying how
        to fix it, before anything is copied.
        """
        own = self.state_dict(keep_vars=True)
        for key, value in state_dict.items():
            if key not in own or not isinstance(value, Tensor):
                continue
            mine = own[key]
            if value.dim() == 0 or value.shape[0] != mine.shape[0]:
                found = "a scalar" if value.dim() == 0 else f"{value.shape[0]} members"
                raise EnsembleError(
                    f"Ensemble.load_state_dict: {key!r} holds {found} in the checkpoint, but this "
                    f"ensemble has {mine.shape[0]}; build an Ensemble with the checkpoint's "
                    "member count (or load it into one and slice it, ens[:k])."
                )
            if value.shape[1:] != mine.shape[1:]:
                raise EnsembleError(
                    f"Ensemble.load_state_dict: {key!r} has member shape {list(value.shape[1:])} in "
                    f"the checkpoint but {list(mine.shape[1:])} here; the checkpoint was saved "
                    "from a different member architecture."
                )
        if strict:
            missing = sorted(set(own) - set(state_dict))
            unexpected = sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise EnsembleError(
                    f"Ensemble.load_state_dict: the checkpoint does not match this ensemble "
                    f"(missing: {missing}, unexpected: {unexpected}); was it saved from an "
                    "Ensemble of the same member class? Pass strict=False to load the overlap."
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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
        in_dims : int, None or tuple, default None
            As for :func:`torch.vmap`, for the positional inputs only: ``None``
            gives every member the same input; ``0`` gives member ``i`` slice
            ``i`` of dimension 0 (which must have ``num_members`` entries); a
            tuple gives one entry per positional input.
        randomness, chunk_size : optional
            Override the ensemble's settings for this call.
        **kwargs
            Keyword inputs, shared by every member.

        Returns
        -------
        Whatever the member returns, each tensor with a leading dimension of
        size ``num_members``.
        """
        randomness = self.randomness if randomness is None else randomness
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        if (
            self._fast is not None
            and self.fast_path
            and chunk_size is None
            and len(args) == 1
            and not kwargs
            and isinstance(args[0], Tensor)
            and in_dims in (None, 0, (None,), (0,))
        ):
            x = args[0]
            shared = in_dims is None or in_dims == (None,)
            if not shared and (x.dim() < 2 or x.shape[0] != self.num_members):
                self._check_inputs(args, in_dims)  # raises the explanatory error
            return self._forward_fast(x, shared, randomness)
        dims = self._check_inputs(args, in_dims)
        if any(isinstance(a, PackedSequence) for a in (*args, *kwargs.values())):
            raise EnsembleError(
                "Ensemble: got a PackedSequence, which cannot be split across members; pass the "
                "padded tensor instead (and use the lengths to pick each sequence's last output)."
            )
        params = self.named_stacked_parameters()
        buffers = self.named_stacked_buffers()
        key = (dims, randomness, chunk_size)
        compiling = torch.compiler.is_compiling()
        try:
            # (torch.compile traces the vmap anyway; a cache it reads would make it recompile when filled.)
            batched = None if compiling else self._vmap_cache.get(key)
        except TypeError:  # nested in_dims (lists) are not hashable: build it for this call
            key, batched = None, None
        if batched is None:
            runner = self._runner

            def member_forward(p: dict, b: dict, *member_args: Any, **member_kwargs: Any) -> Any:
                """One member's forward pass: the architecture run with one slice of the state."""
                return functional_call(runner, (p, b), member_args, member_kwargs)

            batched = torch.vmap(member_forward, in_dims=(0, 0, *dims), randomness=randomness, chunk_size=chunk_size)
            if key is not None and not compiling:
                self._vmap_cache[key] = batched
        device = next(iter({**params, **buffers}.values())).device
        try:
            with attention_context(device):
                return batched(params, buffers, *args, **kwargs)
        except RuntimeError as err:
            if "atching rule not implemented" not in str(err):
                raise
            raise EnsembleError(self._unbatchable_message(err)) from err

    def _unbatchable_message(self, err: RuntimeError) -> str:
        """Explain a vmap failure: the operator, the layers that likely called it, the ways out."""
        text = str(err)
        op = text[text.find("aten::"):].split()[0].rstrip(".") if "aten::" in text else "an operator"
        suspects = [
            f"{name or '<root>'} ({type(module).__name__})"
            for name, module in self._runner.named_modules()
            if isinstance(module, (nn.RNNBase, nn.RNNCellBase))  # the ones make_runner could not replace
        ] or [
            f"{name or '<root>'} ({type(module).__name__})"
            for name, module in self._runner.named_modules()
            if not _is_torch_nn_class(module)
        ]
        where = f" It is called by the forward of {', '.join(suspects)}." if suspects else ""
        return (
            f"Ensemble: torch.vmap has no batching rule for {op}, so the members cannot run as one "
            f"batched call.{where} Ensemble substitutes vectorized versions for torch's own RNN, GRU, "
            "LSTM and attention layers, but not for a subclass with its own forward or for custom "
            "code. Write that part with operations vmap batches (matmul, F.linear, element-wise ops), "
            "or run the members one by one: torch.stack([m(x) for m in ens.unstack()])."
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_vmap_cache"] = {}  # its closures hold this object's template: never share or pickle them
        return state

    def _check_inputs(self, args: tuple[Any, ...], in_dims: InDims) -> tuple[Any, ...]:
        if isinstance(in_dims, (int, type(None))):
            dims = (in_dims,) * len(args)
        elif isinstance(in_dims, (tuple, list)):
            if len(in_dims) != len(args):
                raise EnsembleError(
                    f"Ensemble: in_dims has {len(in_dims)} entries but {len(args)} positional "
                    "inputs were given; pass one entry per positional input (None = shared)."
                )
            dims = tuple(in_dims)
        else:
            raise EnsembleError(
                f"Ensemble: in_dims must be an int, None, or a tuple with one entry per positional "
                f"input, got {type(in_dims).__name__}."
            )
        for position, (arg, dim) in enumerate(zip(args, dims)):
            if not isinstance(dim, int) or isinstance(dim, bool):
                continue
            leaves = [arg] if isinstance(arg, Tensor) else tree_flatten(arg)[0]
            for leaf in leaves:
                if not isinstance(leaf, Tensor):
                    continue
                if leaf.dim() == 0 or not -leaf.dim() <= dim < leaf.dim():
                    raise EnsembleError(
                        f"Ensemble: positional input {position} has shape {list(leaf.shape)}, which has "
                        f"no dimension {dim} to split across the {self.num_members} members; pass "
                        "in_dims=None to give every member the same input."
                    )
                if leaf.shape[dim] != self.num_members:
                    raise EnsembleError(
                        f"Ensemble: positional input {position} has {leaf.shape[dim]} entries along "
                        f"dimension {dim} (shape {list(leaf.shape)}), but with in_dims={dim} it needs "
                        f"one per member: {self.num_members}. Pass in_dims=None to give every member "
                        "the same input, or stack one input per member along that dimension."
                    )
        return dims

    def _plan(self, layers: list[FastLayer]) -> list[tuple[Any, ...]]:
        """Steps of the fast path: where each Linear's stacked weight and bias live, and the rest."""
        slots = {
            alias: (container, attr)  # tied parameters are stored once, under their first name
            for name, container, attr in self._param_slots
            for alias in self._aliases[name]
        }
        plan: list[tuple[Any, ...]] = []
        for name, layer in layers:
            if not isinstance(layer, nn.Module):  # an element-wise function from a traced forward
                plan.append(("relu",) if layer in (torch.relu, F.relu) else ("elementwise", layer))
            elif isinstance(layer, nn.Linear):
                bias = slots.get(f"{name}.bias")
                plan.append(("linear", name, *slots[f"{name}.weight"], *(bias or (None, None))))
            elif isinstance(layer, nn.Dropout):
                plan.append(("dropout", layer.p))
            elif type(layer) is nn.ReLU:
                plan.append(("relu",))
            elif type(layer) is not nn.Identity:
                plan.append(("elementwise", layer.forward))
        return plan

    def _forward_fast(self, x: Tensor, shared: bool, randomness: Randomness) -> Tensor:
        """An nn.Sequential of Linear / Dropout / element-wise layers, with batched matrix products.

        Activations are normally kept as ``[members, rows, features]`` and each
        layer is ``baddbmm(bias, h, weight.mT)``. When autograd records and the
        stacked weights are large, they are kept transposed,
        ``[members, features, rows]``, and each layer is ``baddbmm(bias, weight, h)``:
        the weight gradient then comes out in the weight's own layout, so
        autograd keeps it instead of copying it into a fresh allocation every
        step. A shared input's first layer is then one ``addmm`` over all members.
        """
        n = self.num_members
        if x.dim() == 0:
            raise EnsembleError("Ensemble: the input is a scalar; the member's first layer needs features.")
        lead = x.shape[:-1] if shared else x.shape[1:-1]
        rows = x.reshape(1 if shared else n, -1, x.shape[-1])
        transposed = (
            self._fast_weights_are_large
            and torch.is_grad_enabled()
            and any(p.requires_grad for p in self.stacked.parameters())
        )
        h = rows.mT if transposed else rows
        pending = shared  # h still has a member dimension of 1, meaning "the same for all"
        fresh = False  # may h be modified in place (is it our own intermediate, not the input)?
        assert self._fast is not None
        for step in self._fast:
            kind = step[0]
            if kind == "linear":
                _, name, w_container, w_attr, b_container, b_attr = step
                weight = getattr(w_container, w_attr)  # [n, out, in]
                bias = None if b_container is None else getattr(b_container, b_attr)  # [n, out]
                features = h.shape[1] if transposed else h.shape[2]
                if features != weight.shape[2]:
                    raise EnsembleError(
                        f"Ensemble: layer {name!r} expects {weight.shape[2]} input features, got "
                        f"{features} (input shape {list(x.shape)})."
                    )
                if pending and transposed:
                    # One large product for all members: [n * out, in] @ [in, rows].
                    flat = weight.reshape(-1, weight.shape[2])
                    h = torch.mm(flat, h[0]) if bias is None else torch.addmm(bias.reshape(-1, 1), flat, h[0])
                    h = h.view(n, weight.shape[1], -1)
                elif transposed:
                    h = torch.bmm(weight, h) if bias is None else torch.baddbmm(bias.unsqueeze(2), weight, h)
                else:
                    h = h.expand(n, -1, -1) if pending else h
                    h = torch.bmm(h, weight.mT) if bias is None else torch.baddbmm(bias.unsqueeze(1), h, weight.mT)
                pending, fresh = False, True
            elif kind == "relu":
                h = torch.relu_(h) if fresh else torch.relu(h)
            elif kind == "dropout":
                if pending and self.training and randomness == "different":
                    h, pending = h.expand(n, -1, -1), False  # every member draws its own mask
                dropped = self._dropout(h, step[1], randomness)
                fresh = fresh or dropped is not h
                h = dropped
            else:
                h = step[1](h)
                fresh = True
        if transposed:
            h = h.mT.contiguous()
        return h.reshape(n, *lead, h.shape[-1])

    def _dropout(self, h: Tensor, p: float, randomness: Randomness) -> Tensor:
        if not self.training or p == 0.0:
            return h
        if randomness == "error":
            raise EnsembleError(
                "Ensemble: the members use dropout in training mode but randomness='error'; "
                "call ens.eval(), or pass randomness='different' (own masks per member) or 'same'."
            )
        if randomness == "different":
            return F.dropout(h, p, training=True)
        if p == 1.0:
            return torch.zeros_like(h)
        mask = torch.empty(h.shape[1:], dtype=h.dtype, device=h.device).bernoulli_(1 - p)
        return h * (mask / (1 - p))


def _fill_unwritten(prototype: nn.Module, stacked: Mapping[str, Tensor], versions: Mapping[str, int]) -> None:
    """Give every allocated-only tensor that no initializer wrote the prototype's values.

    A ``torch.nn`` layer's ``reset_parameters()`` normally overwrites all of its
    tensors, so they are allocated without a copy. One that writes through a
    computed attribute instead (the hook-based ``torch.nn.utils.weight_norm``,
    for instance) leaves them untouched: the version counter says so, and they
    get the values of the one ``factory()`` call instead of uninitialized memory.
    """
    unwritten = [name for name, version in versions.items() if stacked[name]._version == version]
    if not unwritten:
        return
    state = {**dict(prototype.named_parameters()), **dict(prototype.named_buffers())}
    for name in unwritten:
        stacked[name].copy_(state[name].detach().expand_as(stacked[name]))
    if len(next(iter(stacked.values()))) > 1:
        warnings.warn(
            f"Ensemble: the initializers of {unwritten} did not write them, so every member "
            "starts with the values of one factory() call. Build the members yourself and use "
            "Ensemble.from_modules([factory() for _ in range(n)]) to draw them per member.",
            stacklevel=4,
        )


def member_seed(seed: int, member: int) -> int:
    """The seed member ``member`` of an ``Ensemble(..., seed=seed)`` is initialized from.

    Examples
    --------
    >>> member_seed(0, 0) != member_seed(0, 1) != member_seed(1, 0)
    True
    """
    return (seed * 1_000_003 + member * 7_919 + 0x5EED) % 2**63


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers live on the ``meta`` device.

    Unlike ``copy.deepcopy(module).to("meta")`` it copies no data, and it keeps
    tied (shared) parameters tied.
    """
    memo: dict[int, Any] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in m._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    for part in path:
        module = module._modules[part]
    return module, attr

