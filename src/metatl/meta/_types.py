"""Types shared by the meta-learners: parameters are data (a name -> tensor mapping), passed in and
out of adaptation and never written into a module."""

from torch import Tensor

Params = dict[str, Tensor]
