"""How a model of this package switches between its forms: fused, eager twin, folded for inference.

A fused module and its eager twin have the same submodules, names and state_dict; they differ
in the class of some BatchNorm layers (``torch.nn.BatchNorm2d`` in the twin, a
:mod:`fastblocks.nn.batchnorm` class in the fused form), in whether a ``relu`` module exists
(the eager forward calls ``self.relu``; the fused forward applies the ReLU inside the BatchNorm
kernel) and in which forward runs. :class:`Fusable` implements the switch once for every block
and model; each class only lists which BatchNorm becomes which fused class
(:meth:`Fusable._fused_norms`).

Which forward runs: a block (``_class_per_form``) has one class per form, torchvision's eager
class and subclasses that override ``forward`` only (DenseNet's pattern), paired by
:func:`register_form`; switching form switches the instance's class in place
(``isinstance(block, Bottleneck)`` holds in every form). A network (ResNet, CifarResNet) keeps
its class and reads its ``fused`` / ``folded`` flags. Folding (:meth:`Fusable.fold_bn_`) is
:mod:`fastblocks.nn.fold`'s, by the module's ``fold_layout``.

Switching never copies a tensor: the new BatchNorm module holds the old one's own ``Parameter``
objects and buffers, so optimizers and hooks on parameters keep working.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from fastblocks.nn.batchnorm import BatchNorm2d as FastBatchNorm2d
from fastblocks.nn.conv import bn_relu_conv
from fastblocks.nn.fold import fold_layout_


def is_batchnorm2d(module: object) -> bool:
    """True for a plain ``nn.BatchNorm2d`` or a fastblocks BatchNorm (the layers that can be fused).

    Other subclasses of ``nn.BatchNorm2d`` may have their own forward, so they are left alone.
    """
    return type(module) is nn.BatchNorm2d or isinstance(module, FastBatchNorm2d)


def is_prologue_conv(module: object) -> bool:
    """A plain ``nn.Conv2d`` with zero padding, which :func:`bn_relu_conv` can run."""
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def fused_bn_relu_conv(x: Tensor, bn: FastBatchNorm2d, conv: nn.Conv2d) -> Tensor:
    """``conv(relu(bn(x)))`` through :func:`bn_relu_conv`, or through ``bn`` itself when it synchronizes.

    ``bn`` is a :class:`~fastblocks.nn.BatchNormReLU2d`. :func:`bn_relu_conv` takes local batch
    statistics, so a BatchNorm given a ``process_group`` (``convert_sync_batchnorm``) runs its
    own synchronized forward in training instead.
    Shapes: ``[N, C_in, H, W] -> [N, C_out, H_out, W_out]``.
    """
    if bn.training and getattr(bn, "process_group", None) is not None:
        return conv(bn(x))
    return bn_relu_conv(x, bn, conv)


def swap_batchnorm(bn: nn.BatchNorm2d, cls: type[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    """A ``cls`` BatchNorm with ``bn``'s configuration holding ``bn``'s own parameters and buffers.

    ``cls`` is ``nn.BatchNorm2d`` or a :mod:`fastblocks.nn.batchnorm` class (whose ``relu`` flag
    is the class default). ``bn`` itself is returned when it already is a ``cls``. A fastblocks
    ``process_group`` is kept when both classes have one and dropped otherwise.
    """
    if type(bn) is cls:
        return bn
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",
    )
    # Move, don't copy: the meta placeholders are replaced by bn's Parameter objects/buffers.
    for name, param in bn._parameters.items():
        new._parameters[name] = param
    for name, buf in bn._buffers.items():
        new._buffers[name] = buf
    if isinstance(bn, FastBatchNorm2d) and isinstance(new, FastBatchNorm2d):
        new.process_group = bn.process_group
    new.train(bn.training)
    return new


def _insert_after(module: nn.Module, anchor: str, name: str, child: nn.Module) -> None:
    """Register ``child`` as ``module.<name>`` right after ``module.<anchor>`` (torchvision's order)."""
    items = [(k, v) for k, v in module._modules.items() if k != name]
    out: OrderedDict[str, nn.Module | None] = OrderedDict()
    placed = False
    for key, value in items:
        out[key] = value
        if key == anchor:
            out[name] = child
            placed = True
    if not placed:
        out[name] = child
    module._modules = out


# A block family's classes by form ("eager", "fused", "folded"); its classes share one table.
_FORMS: dict[type, dict[str, type]] = {}


def register_form(eager: type, form: str, cls: type) -> None:
    """Record ``cls``, a subclass of the block class ``eager`` that overrides ``forward``, as its ``form``.

    ``form`` is ``"fused"`` or ``"folded"``. Every class of the family then finds every other
    form's class (:func:`form_class`); a subclass that registers nothing has no other form.
    """
    table = _FORMS.setdefault(eager, {"eager": eager})
    table[form] = cls
    _FORMS[cls] = table


def form_class(module: object, form: str) -> type | None:
    """The class of ``module``'s ``form`` (``None`` where ``type(module)`` registered none)."""
    return _FORMS.get(type(module), {}).get(form)


class Fusable:
    """Mixin of every block and model that has a fused form, an eager twin and a folded form.

    Attributes:
        fused: whether the forward runs the fused ops (``True``) or torchvision's eager code.
        folded: whether it is folded for inference (:meth:`fold_bn_`); then it has no other form.
        fold_layout: how :func:`fastblocks.nn.fold.fold_layout_` folds it (its attribute layout).
    """

    fused: bool
    folded: bool = False
    fold_layout: str
    _relu_after: str = "bn1"  # where torchvision registers ``relu`` (printing order only)
    _class_per_form: bool = False  # True: each form is a class (register_form); False: the flags only

    def _fused_norms(self) -> dict[str, type[FastBatchNorm2d]]:
        """Attribute name -> fastblocks BatchNorm class it becomes in the fused form."""
        raise NotImplementedError

    def _check_not_folded(self) -> None:
        if getattr(self, "folded", False):
            raise ValueError(
                f"{type(self).__name__} is folded for inference (fastblocks.fold_bn): its BatchNorms are inside "
                "its convolutions, so there is nothing to fuse or unfuse; switch the original model instead"
            )

    def _fusable(self) -> bool:
        """Whether it has a fused form: every norm layer to fuse is a BatchNorm2d (a custom ``norm_layer``
        is not) and, for a block, its class registered a fused class."""
        self._check_not_folded()
        if self._class_per_form and form_class(self, "fused") is None:
            return False
        return all(is_batchnorm2d(getattr(self, name)) for name in self._fused_norms())

    def _set_fused(self, fused: bool) -> None:
        """Switch this module (not its children) to the fused form or to the eager twin, in place."""
        assert isinstance(self, nn.Module)
        self._check_not_folded()
        if fused and self._class_per_form and form_class(self, "fused") is None:
            raise ValueError(
                f"{type(self).__name__} cannot be fused: it registered no fused form "
                "(fastblocks.models._fusion.register_form); it stays eager"
            )
        if fused and not self._fusable():
            kinds = sorted({type(getattr(self, n)).__name__ for n in self._fused_norms()})
            raise ValueError(
                f"{type(self).__name__} cannot be fused: its norm layers are {', '.join(kinds)}; "
                "fused blocks need BatchNorm2d (a custom norm_layer builds eager blocks only)"
            )
        for name, cls in self._fused_norms().items():
            setattr(self, name, swap_batchnorm(getattr(self, name), cls if fused else nn.BatchNorm2d))
        if fused:
            if "relu" in self._modules:
                del self._modules["relu"]
        elif not isinstance(self._modules.get("relu"), nn.ReLU):
            _insert_after(self, self._relu_after, "relu", nn.ReLU(inplace=True))
        cls = form_class(self, "fused" if fused else "eager") if self._class_per_form else None
        if cls is not None:
            self.__class__ = cls
        self.fused = fused

    @torch.no_grad()
    def fold_bn_(self) -> None:
        """Fold the BatchNorms into the convolutions, in place, for inference (:func:`fastblocks.fold_bn`).

        :func:`fastblocks.nn.fold.fold_layout_` folds the modules by ``fold_layout`` (each layout's
        result is described there); a block then takes its folded form (class). Works on the
        fused form and on the eager twin. When a BatchNorm has no running statistics nothing is
        folded; a block subclass that registered no folded form is left as it is. Calling it
        again is a no-op.
        """
        assert isinstance(self, nn.Module)
        folded = form_class(self, "folded")
        if self._class_per_form and folded is None:
            return  # its forward may be its own: it would not run the folded modules
        if fold_layout_(self) and folded is not None:
            self.__class__ = folded


def set_fused(model: nn.Module, fused: bool) -> int:
    """Switch every :class:`Fusable` module of ``model`` (itself included) in place.

    Returns:
        how many modules were switched (0: ``model`` has no fusable modules).
    """
    parts = [m for m in model.modules() if isinstance(m, Fusable)]
    if fused:
        for m in parts:
            if not m._fusable():
                m._set_fused(True)  # raises, naming the norm layers
    for m in parts:
        m._set_fused(fused)
    return len(parts)
