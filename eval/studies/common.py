"""Report parts shared by the studies that compare generated tiles with reference sets (overfitting, domain)."""

from __future__ import annotations

from typing import Any

from ..harness import StudyResult
from ..report import fmt, fmt_ci

__all__ = ["comparisons_headline", "distances_markdown", "fidelity_headline"]


def comparisons_headline(metrics: dict[str, Any]) -> dict[str, float]:
    """``fd/kid/precision/recall/density/coverage/<extractor>/<reference>`` from ``metrics["comparisons"]``."""
    out: dict[str, float] = {}
    for ref, per_ext in metrics.get("comparisons", {}).items():
        for ext, vals in per_ext.items():
            out[f"fd/{ext}/{ref}"] = vals["fd"]["estimate"]
            out[f"kid/{ext}/{ref}"] = vals["kid"]["mean"]
            for k in ("precision", "recall", "density", "coverage"):
                if vals["prdc"] is not None:
                    out[f"{k}/{ext}/{ref}"] = vals["prdc"][k]
    return out


def fidelity_headline(metrics: dict[str, Any]) -> dict[str, float]:
    fid = metrics.get("conditional_fidelity")
    if fid and fid.get("estimate") is not None:
        return {f"conditional_fidelity/{fid['extractor']}": fid["estimate"]["estimate"]}
    return {}


def distances_markdown(result: StudyResult, gap: bool) -> list[str]:
    """The distances table (FD with CI, KID, PRDC per extractor and reference) and the fidelity line."""
    d = result.to_dict(strict=False)
    m, s = d["metrics"], d["settings"]
    out: list[str] = []
    roles = list(m["comparisons"])
    out.append("### Distances (seed " + str(s["seed"]) + ")")
    out.append("")
    header = ["extractor", "metric", *roles]
    if gap:
        header.append("gap (held-out − train)")
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "---|" * len(header))
    for name in d["extractors"]:
        rows = {
            "FD [95% CI]": [fmt_ci(m["comparisons"][x][name]["fd"]) for x in roles],
            "KID ×10³": [fmt(1e3 * m["comparisons"][x][name]["kid"]["mean"]) for x in roles],
        }
        for k in ("precision", "recall", "density", "coverage"):
            rows[k] = [
                fmt(m["comparisons"][x][name]["prdc"][k]) if m["comparisons"][x][name]["prdc"] else "—"
                for x in roles
            ]
        for metric, vals in rows.items():
            extra = []
            if gap:
                extra = [fmt_ci(m["overfitting_gap"].get(name)) if metric.startswith("FD") else ""]
            out.append("| " + " | ".join([f"`{name}`", metric, *vals, *extra]) + " |")
    out.append("")
    fid = m["conditional_fidelity"]
    if fid.get("estimate") is not None:
        out.append(
            f"Conditional fidelity in `{fid['extractor']}` (conditioning encoder `{fid['conditioning_encoder']}`): "
            f"{fmt_ci(fid['estimate'])} over {fid['n_pairs']} pairs; unpaired baseline {fmt(fid['unpaired_baseline'])}."
        )
    else:
        out.append(f"Conditional fidelity: not computed ({fid.get('note')}).")
    out.append("")
    return out
