"""How well the quality models separate held-out reference pages from held-out random pages.

`train-quality-models` prints these figures and writes them to `diagnostics.json`: the reference
classifier's precision and recall at the reference stage's threshold, and the KenLM perplexity
distributions of both page sets with the chosen cutoffs. Reference text unlike the pages a user wants
to keep (another era, another domain) shows here as a classifier or language model that separates
poorly, before a whole crawl is filtered with it; the warnings say so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from llama_jax.curate.models import classifier_line, load_fasttext

PERCENTILES = (10, 25, 50, 75, 90)
MIN_PRECISION = MIN_RECALL = 0.8  # of the reference classifier, on held-out pages
MIN_AUC = 0.8  # probability that a held-out reference page has a lower perplexity than a random one
MIN_REFERENCE_KEPT = 0.8  # share of held-out reference pages the quality stage's default buckets keep


@dataclass(frozen=True)
class Figures:
    record: dict
    report: str
    warnings: tuple[str, ...]


def reference_probability(model, text: str) -> float:
    labels, scores = model.predict(classifier_line(text), k=-1)
    return dict(zip(labels, (float(s) for s in scores))).get("__label__reference", 0.0)


def _percentiles(values: list[float]) -> list[float]:
    import numpy as np

    finite = [v for v in values if math.isfinite(v)]
    return [float(v) for v in np.percentile(finite, PERCENTILES)] if finite else [math.inf] * len(PERCENTILES)


def lower_first_probability(low: list[float], high: list[float]) -> float:
    """P(a value of `low` < a value of `high`), ties counted half: the area under the ROC curve."""
    pairs = [(a < b) + 0.5 * (a == b) for a in low for b in high]
    return sum(pairs) / len(pairs)


def held_out_figures(lm, reference_model: str, references: list[str], randoms: list[str],
                     cutoffs: tuple[float, float], basis: str, min_score: float) -> Figures:
    classifier = load_fasttext(reference_model)
    ref_p = [reference_probability(classifier, t) for t in references]
    rand_p = [reference_probability(classifier, t) for t in randoms]
    true_pos = sum(p >= min_score for p in ref_p)
    flagged = true_pos + sum(p >= min_score for p in rand_p)
    precision = true_pos / flagged if flagged else 0.0
    recall = true_pos / len(ref_p)
    ref_ppl = [lm.perplexity(t) for t in references]
    rand_ppl = [lm.perplexity(t) for t in randoms]
    auc = lower_first_probability(ref_ppl, rand_ppl)
    ref_kept = sum(p <= cutoffs[1] for p in ref_ppl) / len(ref_ppl)
    rand_kept = sum(p <= cutoffs[1] for p in rand_ppl) / len(rand_ppl)
    record = {
        "held_out": {"reference": len(references), "random": len(randoms)},
        "classifier": {"threshold": min_score, "precision": precision, "recall": recall},
        "perplexity": {"percentiles": list(PERCENTILES), "reference": _percentiles(ref_ppl),
                       "random": _percentiles(rand_ppl), "auc": auc},
        "cutoffs": {"head": cutoffs[0], "middle": cutoffs[1], "basis": basis},
        "kept_by_head_and_middle": {"reference": ref_kept, "random": rand_kept},
    }
    warnings = []
    if precision < MIN_PRECISION or recall < MIN_RECALL:
        warnings.append(f"the reference classifier separates held-out pages poorly (precision {precision:.2f}, "
                        f"recall {recall:.2f} at p >= {min_score}): the reference stage will drop good pages "
                        f"or keep random ones; use reference text more like the pages to keep")
    if auc < MIN_AUC:
        warnings.append(f"KenLM perplexity separates held-out reference from random pages poorly (a reference page "
                        f"scores lower only {auc:.0%} of the time): the quality buckets will say little")
    if ref_kept < MIN_REFERENCE_KEPT:
        warnings.append(f"only {ref_kept:.0%} of held-out reference pages fall in the head and middle buckets "
                        f"(cutoffs from {basis}): the quality stage will drop pages like the references")
    header = "".join(f"{f'p{p}':>9}" for p in PERCENTILES)
    lines = [f"held out: {len(references)} reference pages, {len(randoms)} random pages",
             f"reference classifier at p(reference) >= {min_score}: precision {precision:.3f}, recall {recall:.3f}",
             f"perplexity {header}",
             *(f"{name:<10} " + "".join(f"{v:>9.1f}" for v in values)
               for name, values in (("reference", record["perplexity"]["reference"]),
                                    ("random", record["perplexity"]["random"]))),
             f"cutoffs: head <= {cutoffs[0]:.1f}, middle <= {cutoffs[1]:.1f} (from {basis}); head+middle keep "
             f"{ref_kept:.0%} of reference and {rand_kept:.0%} of random pages; "
             f"P(reference page scores lower) = {auc:.3f}"]
    return Figures(record, "\n".join(lines), tuple(warnings))
