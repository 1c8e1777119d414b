"""Types shared by the meta-learners: parameters are data (a name -> tensor mapping), passed in and
out of adaptation and never written into a module; ``meta_loss`` returns the loss and its metrics."""

from torch import Tensor

Params = dict[str, Tensor]
Metrics = dict[str, float]  # what meta_loss reports besides the loss: a name -> number mapping
