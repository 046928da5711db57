"""Passkey retrieval accuracy, as a local `evaluate` metric.

Load it from this folder, no Hub access needed::

    import evaluate
    metric = evaluate.load("examples/metrics/passkey_retrieval")   # or the folder's absolute path
    metric.compute(predictions=["48213. Remember"], references=["48213"], context_lengths=[4096], depths=[0.5])
"""

from __future__ import annotations

import re
from collections import defaultdict

import datasets
import evaluate

_DESCRIPTION = """\
Passkey retrieval (Mohtashami & Jaggi, 2023, "Landmark Attention"): a random number is hidden at some depth of
a long filler text and the model is asked to repeat it. A prediction is correct when the first run of digits
in the generated text equals the passkey. Besides the overall accuracy, the metric breaks the accuracy down by
context length, by depth (0 = start of the filler, 1 = end) and by both, when those are given.
"""

_KWARGS_DESCRIPTION = """\
Args:
    predictions (`list[str]`): the generated continuations.
    references (`list[str]`): the passkeys, as strings of digits.
    context_lengths (`list[int]`, optional): prompt length in tokens of each sample.
    depths (`list[float]`, optional): where the passkey sits in the filler, from 0 (start) to 1 (end).

Returns:
    accuracy (`float`): fraction of samples whose first digit run equals the passkey.
    num_samples (`int`): number of samples.
    by_context_length (`dict[int, float]`): accuracy per context length (with `context_lengths`).
    by_depth (`dict[float, float]`): accuracy per depth (with `depths`).
    by_context_length_and_depth (`list[dict]`): one record per (context length, depth) pair, with
        `context_length`, `depth`, `accuracy` and `num_samples` (with both).

Example:
    >>> metric = evaluate.load("examples/metrics/passkey_retrieval")
    >>> metric.compute(predictions=[" 123. It", "9"], references=["123", "456"])
    {'accuracy': 0.5, 'num_samples': 2}
"""

_CITATION = """\
@article{mohtashami2023landmark,
  title={Landmark Attention: Random-Access Infinite Context Length for Transformers},
  author={Mohtashami, Amirkeivan and Jaggi, Martin},
  journal={arXiv preprint arXiv:2305.16300},
  year={2023}
}
"""

_DIGITS = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    """The first run of digits in `text`, or None."""
    match = _DIGITS.search(text)
    return match.group() if match else None


def _group(keys: list, hits: list[bool]) -> dict:
    """The hits of each key, keys sorted."""
    groups = defaultdict(list)
    for key, hit in zip(keys, hits):
        groups[key].append(hit)
    return dict(sorted(groups.items()))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PasskeyRetrieval(evaluate.Metric):
    """Accuracy of retrieved passkeys, overall and by context length and depth."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            reference_urls=["https://arxiv.org/abs/2305.16300"],
        )

    def _compute(
        self,
        predictions: list[str],
        references: list[str],
        context_lengths: list[int] | None = None,
        depths: list[float] | None = None,
    ) -> dict:
        for name, values in (("context_lengths", context_lengths), ("depths", depths)):
            if values is not None and len(values) != len(references):
                raise ValueError(f"`{name}` has {len(values)} entries for {len(references)} references.")
        hits = [first_number(prediction) == reference.strip() for prediction, reference in zip(predictions, references)]
        result: dict = {"accuracy": sum(hits) / len(hits) if hits else 0.0, "num_samples": len(hits)}
        lengths = [int(n) for n in context_lengths] if context_lengths is not None else None
        depths = [float(d) for d in depths] if depths is not None else None
        if lengths is not None:
            result["by_context_length"] = {n: sum(g) / len(g) for n, g in _group(lengths, hits).items()}
        if depths is not None:
            result["by_depth"] = {d: sum(g) / len(g) for d, g in _group(depths, hits).items()}
        if lengths is not None and depths is not None:
            result["by_context_length_and_depth"] = [
                {"context_length": n, "depth": d, "accuracy": sum(g) / len(g), "num_samples": len(g)}
                for (n, d), g in _group(list(zip(lengths, depths)), hits).items()
            ]
        return result
