"""Optimizers whose hyperparameters may differ between members: a sweep in one training run.

:class:`SGD`, :class:`Adam` and :class:`AdamW` are :class:`torch.optim.Optimizer`
subclasses that take an ensemble's stacked parameters exactly like torch's
(``AdamW(ens.parameters(), lr=...)``). Every float hyperparameter may also be a
sequence or 1-D tensor with one value per member (the member count is the
leading dimension of every parameter); a param group then holds it as
:class:`MemberValues`. Each member trains exactly as a separate model under the
``torch.optim`` optimizer with its own values, and torch's learning-rate
schedulers scale each member's learning rate.

Examples
--------
>>> import torch
>>> from ensembling import Ensemble
>>> from ensembling.optim import AdamW
>>> ens = Ensemble(lambda: torch.nn.Linear(4, 2), 8)  # 8 members, weight [8, 2, 4]
>>> opt = AdamW(ens.parameters(), lr=torch.logspace(-4, -1, 8))  # 8 learning rates, one run
>>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
>>> ens(torch.randn(16, 4)).sum().backward()  # outputs [8, 16, 2]
>>> opt.step(); sched.step()
>>> torch.allclose(opt.param_groups[0]["lr"], torch.logspace(-4, -1, 8, dtype=torch.float64) / 2)
True
"""

from ._optim._adam import Adam, AdamW
from ._optim._sgd import SGD
from ._optim._values import MemberValues

__all__ = ["SGD", "Adam", "AdamW", "MemberValues"]
