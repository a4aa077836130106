"""Registry figures in words: the lines the demo prints and the pages show."""

from __future__ import annotations

from typing import Any


def quality_lines(q: dict[str, Any]) -> list[str]:
    """Class consistency and precision / recall beside their real-vs-real floors, each
    with a warning where its encoder was cut short."""
    if not q:
        return []
    lines = []
    training = q.get("encoder_training") or {}
    cc = q.get("class_consistency") or {}
    if cc.get("generated") is not None:
        lines.append(
            "class consistency: "
            f"{cc['generated']:.2f} (a real-trained classifier's balanced accuracy on the "
            f"synthetic images by their class; {cc['floor']:.2f} on real unseen patients)"
            + _cut_short(training.get("supervised"))
        )
    for name, space in (q.get("spaces") or {}).items():
        g, f = space["overall"]["generated"], space["overall"]["floor"]
        lines.append(
            f"{name.replace('_', '-')} space: "
            f"precision {g['precision']:.2f} (floor {f['precision']:.2f}), "
            f"recall {g['recall']:.2f} (floor {f['recall']:.2f}), "
            f"FID {g['fid']:.2f} (floor {f['fid']:.2f}{_fid_ratio(q, space)})"
            + _cut_short(training.get(name))
        )
    return lines


# What each way of choosing a pool's images leaves not independent of the choice.
_CHOICE_CAVEATS = {
    "typical": "the images were chosen by the same real-trained classifier that scores "
    "class consistency, so that figure is not independent of the choice",
    "realistic": "the images were chosen in the self-supervised space, so its figures are "
    "not independent of the choice; the supervised space's are",
}


def choice_caveats(selections: list[dict[str, Any]]) -> list[str]:
    """The caveats on a chosen pool's quality figures, one per way its draws were chosen
    (``selections``: the selection records of its draws; those that kept every image
    drawn add none, those recorded before there was a choice were ``typical``)."""
    ways = {s.get("by", "typical") for s in selections if s.get("oversample", 1) > 1}
    return [_CHOICE_CAVEATS[way] for way in sorted(ways, reverse=True)]


def _fid_ratio(q: dict[str, Any], space: dict[str, Any]) -> str:
    """The generated-to-floor FID ratio, its median and range over the subsamples compared
    (figures stored before there were several comparisons have none)."""
    ratio = (space.get("spread") or {}).get("fid_ratio") or {}
    if ratio.get("median") is None:
        return ""
    lo, hi = ratio["range"]
    return f"; ratio {ratio['median']:.1f}x, {lo:.1f}-{hi:.1f}x over {q['subsamples']} subsamples"


def _cut_short(training: dict[str, Any] | None) -> str:
    """A warning when an encoder ran out of time before its planned steps: the figures it
    measures are then weaker, and not comparable with those of a fully trained one."""
    if not training or training["steps"] >= training["planned_steps"]:
        return ""
    return (
        f"; WEAK ENCODER: it trained {training['steps']} of {training['planned_steps']} "
        f"steps in its time budget ({training['seconds']:.0f} s; a slow or busy machine), "
        "so these figures are not comparable with those of a fully trained encoder"
    )


def audit_unit(a: dict[str, Any]) -> str:
    """What the audit's groups count: patients (one film each), or films (audits stored
    before the unit was the patient)."""
    return "patients" if str(a.get("unit", "")).startswith("patient") else "films"


def audit_verdict(a: dict[str, Any]) -> str:
    """ "goal met", "goal NOT met", or why the audit cannot say (too few held-out
    patients to measure a TPR at 1% false positives)."""
    if a["passed"]:
        return "goal met"
    if a.get("conclusive") is False:
        return (
            f"inconclusive: {a['nonmembers']} non-member {audit_unit(a)} (from "
            f"{a.get('holdout_patients', '?')} held-out patients) cannot measure a TPR at "
            f"1% false positives, which needs {a['min_nonmembers']}"
        )
    return "goal NOT met"


def audit_line(a: dict[str, Any] | None) -> str | None:
    """The membership-inference audit in one line: worst attack, control, verdict."""
    if not a:
        return None
    if a.get("skipped"):
        return f"not measured ({a['skipped']})"
    verdict = audit_verdict(a)
    chance = a.get("worst_tpr_by_chance")
    by_chance = (
        f" (p = {chance['p_value']:.2f} against chance, whose 95th percentile is "
        f"{100 * chance['p95']:.1f}%)"
        if chance
        else ""
    )
    return (
        f"worst AUROC {a['worst_auroc']:.3f}, worst TPR at 1% FPR "
        f"{100 * a['worst_tpr_at_1pct_fpr']:.1f}%{by_chance} over {len(a['attacks'])} "
        f"attacks ({a['members']} member vs {a['nonmembers']} non-member {audit_unit(a)}; "
        "control AUROCs "
        f"within {a['control_worst_distance_from_half']:.3f} of 0.5; goal <= "
        f"{a['goal']['auroc']} and <= {100 * a['goal']['tpr_at_1pct_fpr']:.0f}%): {verdict}"
    )


def planted_line(a: dict[str, Any] | None) -> str | None:
    """The gate's detection of planted copies of the training films, in one line, with
    the families it missed most."""
    p = (a or {}).get("planted_copies")
    if not p:
        return None
    lo, hi = p["interval_95"]
    missed = sorted(
        ((f["planted"] - f["caught"], name) for name, f in p["per_family"].items()),
        reverse=True,
    )
    worst = ", ".join(
        f"{name} {n} of {p['per_family'][name]['planted']}" for n, name in missed[:3] if n
    )
    verdict = "goal met" if p["met"] else "goal NOT met"
    return (
        f"caught {p['caught']} of {p['planted']} altered copies of training films "
        f"({100 * p['rate']:.1f}%, 95% interval {100 * lo:.1f}-{100 * hi:.1f}%; goal "
        f"{100 * p['goal']:.0f}%: {verdict})" + (f"; missed {worst}" if worst else "")
    )
