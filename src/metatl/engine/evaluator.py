"""The one evaluator: a fixed, seeded set of test episodes, mean +- 95% confidence interval.

Every method is scored the same way: for each episode, ``learner.adapt(support)`` returns a
predictor, which is scored on the query set (accuracy for classification, MSE for regression).
The interval is ``1.96 * std / sqrt(N)`` over the N episode scores.
"""

from __future__ import annotations

import warnings

import torch
from tqdm.auto import tqdm

from ..data.episode import fixed_episodes
from ..meta.base import METRIC_NAME, task_metric
from ..stats import mean_ci95  # noqa: F401 (re-exported: metatl.engine.mean_ci95)


def _predict(predictor, episode, transductive: bool) -> torch.Tensor:
    if transductive:
        return predictor(episode.query_x)
    # Each query is normalised together with the support set only, never with other queries.
    sx = episode.support_x
    return torch.cat([predictor(torch.cat([sx, q[None]]))[-1:] for q in episode.query_x])


def evaluate(
    learner,
    sampler,
    episodes: int = 600,
    seed: int = 1234,
    inner_steps: int | None = None,
    transductive: bool = True,
    progress: bool = True,
    device: str = "cpu",
    desc: str = "eval",
) -> dict:
    """Score ``learner`` on ``episodes`` episodes drawn from ``sampler`` with ``seed``.

    ``transductive=False`` classifies each query in a batch of its own with the support set, so
    that BatchNorm with batch statistics never mixes queries. A model without such layers (running
    statistics, or no BatchNorm) gives each query the same output either way, so it is scored with
    one batch of queries: the same scores, without a forward pass per query. This assumes that
    BatchNorm (``torch.nn.modules.batchnorm._BatchNorm``) is the only way queries of one batch can
    affect each other; a learner whose predictor couples them otherwise (attention across queries,
    transductive inference) sets the class attribute ``couples_queries = True``.

    An episode whose adapted predictor gives non-finite outputs (test-time adaptation diverged)
    is counted in ``diverged`` and named in a warning: its score is NaN for regression and that of
    arbitrary classes for classification, so the mean alone would hide it.

    Returns ``{"metric", "mean", "ci95", "std", "episodes", "scores", "diverged"}``.
    """
    from ..meta.base import queries_interact

    transductive = transductive or not queries_interact(learner)
    was_training = learner.training
    learner.eval()
    scores: list[float] = []
    diverged = 0
    kwargs = {} if inner_steps is None else {"steps": inner_steps}
    try:
        for ep in tqdm(
            fixed_episodes(sampler, episodes, seed), total=episodes, desc=desc, disable=not progress, leave=False
        ):
            ep = ep.to(device)
            predictor = learner.adapt(ep.support_x, ep.support_y, **kwargs)
            pred = _predict(predictor, ep, transductive)
            diverged += not bool(torch.isfinite(pred).all())
            scores.append(task_metric(learner.task_type, pred, ep.query_y))
    finally:
        learner.train(was_training)
    if diverged:
        warnings.warn(
            f"{diverged} of {episodes} test episodes gave non-finite predictions after test-time adaptation "
            f"(the inner loop diverged), so their scores mean nothing; lower the test-time inner learning "
            f"rate or number of steps (eval.inner_steps, the algorithm's inner_lr), or check the weights.",
            RuntimeWarning,
            stacklevel=2,
        )
    return {
        "metric": METRIC_NAME[learner.task_type],
        **mean_ci95(scores),
        "episodes": episodes,
        "scores": scores,
        "diverged": diverged,
    }
